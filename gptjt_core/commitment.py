"""What a stage commits to per micro-batch: a digest of its input and tolerance-aware sketches of its outputs."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass


VERSION = 1  # the first byte of Commitment.to_bytes(); from_bytes reads only this version
DIGEST_BYTES = 32  # sha256
KEY_BYTES = 16
DEFAULT_KEY = b"gptjt/sketch/v1/"  # public: see Sketch on what a keyed sketch adds
DEFAULT_K = 64
K_CHOICES = (16, 32, 64, 128, 256)
BUCKETS = 4096  # width of the count sketch stage (m); the dense stage maps it to k values
MAX_NUMEL = 2**31 - 1  # the index hash works on 31-bit integers
CHUNK = 1 << 20  # values hashed at a time: bounds the int64 index temporary to 8 MB
CACHED_NUMEL = 1 << 25  # tensors up to this size keep their bucket index (int16, <= 64 MB) for the next sketch

# Tolerances on the relative error a spot check accepts, from `gptjt bench verify-calibration`
# (docs/security.md, "How tolerant a spot check is"): 10x the worst honest disagreement
# measured, never below a floor. fp32 against fp32 (thread counts, grouping): worst 5.4e-7, so
# the floor 1e-3 holds. "Reduced" when either side ran its matmuls in bf16, fp16 or TF32:
# worst 0.0108 (bf16 autocast vs fp32, a 16-layer stage of width 512), so 0.11.
TOLERANCE_FP32 = 1e-3
TOLERANCE_REDUCED = 0.11

_SKETCH_HEAD = struct.Struct("<16sIHf")  # key, numel, k, norm; then k float32 values
_COMMIT_HEAD = struct.Struct("<BB32s")  # version, flags (bit 0: a gradient sketch follows), input digest


def input_digest(*parts: bytes) -> bytes:
    """sha256 over the exact bytes a stage received for one micro-batch: the codes on the wire
    (token ids for stage 0) and, for a check of the backward, the gradient codes that came back.
    Each part is length-prefixed, so (a, b) and (a + b,) never share a digest."""
    if not parts:
        raise ValueError("input_digest needs at least one part (the bytes the stage received)")
    h = hashlib.sha256(b"gptjt-input-v1")
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def check_key(key: bytes, k: int) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"sketch key must be {KEY_BYTES} bytes, got {key!r}")
    if k not in K_CHOICES:
        raise ValueError(f"sketch size k={k} is not one of {K_CHOICES}")


@dataclass(frozen=True)
class Sketch:
    """A tolerance-aware fingerprint of a float tensor of any shape: k values of a random
    projection of the flattened tensor, its L2 norm and its number of values.

    The projection is P = R S: S is a count sketch (each value goes, with a +-1 sign, to one of
    BUCKETS = 4096 buckets chosen by a keyed integer hash of its flat index), R a dense
    (k x 4096) +-1/sqrt(k) matrix from SHAKE-256 of the key. Both are fixed by the key, k and
    the index alone, identical on every device, computed in fp32 in chunks of 2**20 values
    (nothing of size n x k exists; R is 1 MB), O(n) work. E||P d||^2 = ||d||^2, and
    ||P d||^2 / ||d||^2 is distributed as chi^2_k / k for any difference d whose mass is not
    concentrated in two values that share a bucket (a Johnson-Lindenstrauss projection): with
    k = 64, ||P d|| lies within [0.61, 1.44] x ||d|| except with probability 1e-6 each way.

    rel_error(a, b) = max(||Pa - Pb||, | ||a|| - ||b|| |) / max(||a||, ||b||) estimates the
    relative L2 error between a claimed and a recomputed tensor (the norm term is exact and a
    lower bound of the true error). What a liar who lies about its output can hide, at a
    tolerance t:
      - scaling by s: the norm gap is exactly |s - 1| / max(s, 1), so s = 1.01 is caught at
        t < 0.0099, deterministically;
      - noise of relative size r: caught whenever r x ||Pd||/||d|| > t, i.e. always (1 - 1e-6)
        for r > 1.65 t;
      - zeroing: relative error 1, caught at any t < 1;
      - replaying another micro-batch's output: the error is the distance between two
        micro-batches' outputs (>= 1.1 on the tiny flavour, `bench verify-calibration`);
      - changing a few positions by a total of ||d||: caught like noise of size ||d|| / ||y||;
        one changed value is measured exactly (every column of R has norm 1); two cancel only
        when they share one of 4096 buckets with opposite signs (1 in 8192).
      In every case a lie smaller than t ||y|| in L2 passes: that is the budget the tolerance
      gives away, wherever the liar spends it. Top-k value and position sets (TOPLOC) add one
      thing: a spike above the k-th largest honest value enters the claimed set, so they bound
      a concentrated lie per position, where this sketch bounds it only by t ||y|| (at t = 0.11
      and a 1 x 2048 x 4096 output, ~300x a value's rms, on one value). They see nothing of a
      lie below that k-th value, which is most of a tensor, their sets flip at honest near-ties
      (so they need a slack of their own), and k positions + values do not fit in 1 KB beside
      this; a cheaper spike bound, if the protocol needs one, is max |value| (4 bytes).
    A liar who knows the key before it lies can pick d in the null space of P (two values
    in one bucket, moved by +v and -+v), of any size. The default key is public, so the
    default catches faults and modified compute, not a liar who reads this code. Keying each
    sketch with a digest of the exact bytes the stage sent (which the receiver commits as its
    input) fixes P only after the output is fixed: the liar must then grind keys (a re-encoding
    and a hash of its output per try), one try in 8192 passing per two-value lie.
    """

    key: bytes
    numel: int
    norm: float
    values: tuple[float, ...]


    @property
    def k(self) -> int:
        return len(self.values)

    def comparable_with(self, other: Sketch) -> str | None:
        """None, or why the two sketches cannot be compared."""
        if self.key != other.key or self.k != other.k:
            return (f"sketches differ in key or k ({self.key.hex()}/{self.k} vs {other.key.hex()}/{other.k}): "
                    "recompute with the claimed sketch's key and k")
        if self.numel != other.numel:
            return f"the tensors have {self.numel} and {other.numel} values"
        return None

    def rel_error(self, other: Sketch) -> float:
        """Estimated ||a - b|| / max(||a||, ||b||); inf when not comparable."""
        if self.comparable_with(other) is not None:
            return math.inf
        scale = max(self.norm, other.norm)
        if scale == 0.0:
            return 0.0
        diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(self.values, other.values)))
        return max(diff, abs(self.norm - other.norm)) / scale

    @property
    def size_bytes(self) -> int:
        return _SKETCH_HEAD.size + 4 * self.k

    def to_bytes(self) -> bytes:
        return _SKETCH_HEAD.pack(self.key, self.numel, self.k, self.norm) + struct.pack(f"<{self.k}f", *self.values)

    @classmethod
    def read(cls, data: bytes, offset: int, what: str) -> tuple[Sketch, int]:
        """Parse and validate the sketch at data[offset:]; returns it and the offset after it."""
        if len(data) - offset < _SKETCH_HEAD.size:
            raise ValueError(f"{what}: {len(data) - offset} bytes left, a sketch header needs {_SKETCH_HEAD.size}")
        key, numel, k, norm = _SKETCH_HEAD.unpack_from(data, offset)
        if k not in K_CHOICES:
            raise ValueError(f"{what}: k={k} is not one of {K_CHOICES}")
        end = offset + _SKETCH_HEAD.size + 4 * k
        if len(data) < end:
            raise ValueError(f"{what}: truncated, {k} values need {4 * k} bytes, "
                             f"{len(data) - offset - _SKETCH_HEAD.size} are there")
        values = struct.unpack_from(f"<{k}f", data, offset + _SKETCH_HEAD.size)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"{what}: value {bad} is {values[bad]}; a sketch holds finite numbers")
        if not math.isfinite(norm) or norm < 0:
            raise ValueError(f"{what}: norm {norm} is not a finite number >= 0")
        if numel > MAX_NUMEL:
            raise ValueError(f"{what}: numel {numel} is above the {MAX_NUMEL} a sketch covers")
        if numel == 0 and (norm != 0 or any(values)):
            raise ValueError(f"{what}: an empty tensor has norm 0 and zero values, got norm {norm}")
        return cls(key, numel, norm, values), end

    @classmethod
    def from_bytes(cls, data: bytes) -> Sketch:
        sketch, end = cls.read(bytes(data), 0, "sketch")
        if end != len(data):
            raise ValueError(f"sketch: {len(data) - end} bytes after the sketch's {end}")
        return sketch


@dataclass(frozen=True)
class Commitment:
    """What a stage processed for one micro-batch: the digest of its input, a sketch of the
    output it sent forward and, when it ran a backward, of the gradient it sent back.

    Sketch what the stage computed, before the codec: a recomputation reproduces that, not the
    codec's rounding (q3 alone is a 0.27 relative error). That the codes sent match the sketched
    tensor is a check of its own (a receiver holds the codes; input digests name them)."""

    input: bytes  # input_digest(...) of what the stage received
    output: Sketch
    grad: Sketch | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.input, bytes) or len(self.input) != DIGEST_BYTES:
            raise ValueError(f"commitment input digest must be {DIGEST_BYTES} bytes, got {self.input!r}")

    @property
    def size_bytes(self) -> int:
        return _COMMIT_HEAD.size + self.output.size_bytes + (self.grad.size_bytes if self.grad else 0)

    def to_bytes(self) -> bytes:
        head = _COMMIT_HEAD.pack(VERSION, 1 if self.grad is not None else 0, self.input)
        return head + self.output.to_bytes() + (self.grad.to_bytes() if self.grad is not None else b"")

    @classmethod
    def from_bytes(cls, data: bytes) -> Commitment:
        """Parse bytes from a stranger: every length, the version and every number is checked;
        a ValueError names what is wrong."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"commitment must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < _COMMIT_HEAD.size:
            raise ValueError(f"commitment is {len(data)} bytes, shorter than its {_COMMIT_HEAD.size}-byte header")
        version, flags, digest = _COMMIT_HEAD.unpack_from(data, 0)
        if version != VERSION:
            raise ValueError(f"commitment version {version} is unknown; this build reads version {VERSION}")
        if flags not in (0, 1):
            raise ValueError(f"commitment flags {flags:#04x} set unknown bits (only bit 0, 'has a gradient sketch')")
        output, offset = Sketch.read(data, _COMMIT_HEAD.size, "output sketch")
        grad = None
        if flags & 1:
            grad, offset = Sketch.read(data, offset, "gradient sketch")
        if offset != len(data):
            raise ValueError(f"commitment has {len(data) - offset} bytes after its {offset} bytes of content")
        return cls(digest, output, grad)


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing a claimed commitment with a recomputation."""

    agrees: bool
    input_matches: bool
    output_rel_error: float
    grad_rel_error: float | None  # None when neither side has a gradient sketch
    reason: str


def _judge(name: str, claimed: Sketch | None, recomputed: Sketch | None,
           tolerance: float) -> tuple[float | None, str | None]:
    """(estimated relative error, why it fails or None)."""
    if claimed is None and recomputed is None:
        return None, None
    if claimed is None or recomputed is None:
        which = "claimed" if claimed is None else "recomputed"
        return math.inf, f"the {which} commitment has no {name} sketch"
    why = claimed.comparable_with(recomputed)
    if why is not None:
        return math.inf, f"{name}: {why}"
    err = claimed.rel_error(recomputed)
    if err > tolerance:
        return err, (f"{name} relative error {err:.3g} > tolerance {tolerance:.3g} "
                     f"(norms {claimed.norm:.6g} claimed, {recomputed.norm:.6g} recomputed)")
    return err, None


def compare(claimed: Commitment, recomputed: Commitment, tolerance: float) -> Verdict:
    """Does a recomputation from the same input and weights agree with what a stage claimed?"""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 < tolerance < 1):
        raise ValueError(f"tolerance {tolerance!r} must be a relative error in (0, 1), e.g. {TOLERANCE_FP32}")
    input_matches = claimed.input == recomputed.input
    out_err, out_why = _judge("output", claimed.output, recomputed.output, tolerance)
    grad_err, grad_why = _judge("gradient", claimed.grad, recomputed.grad, tolerance)
    failures = [] if input_matches else [f"input digests differ (claimed {claimed.input.hex()[:16]}, "
                                         f"recomputed {recomputed.input.hex()[:16]}): not the same work"]
    failures += [why for why in (out_why, grad_why) if why is not None]
    if failures:
        reason = "disagrees: " + "; ".join(failures)
    else:
        grad_part = "" if grad_err is None else f", gradient relative error {grad_err:.3g}"
        reason = f"agrees: same input, output relative error {out_err:.3g}{grad_part} <= tolerance {tolerance:.3g}"
    return Verdict(not failures, input_matches, out_err, grad_err, reason)


def tolerance_for(claimed_precision: str, recompute_precision: str) -> float:
    """The tolerance for a check between two precisions ('fp32', 'bf16', 'fp16', 'tf32')."""
    known = ("fp32", "bf16", "fp16", "tf32")
    for p in (claimed_precision, recompute_precision):
        if p not in known:
            raise ValueError(f"precision {p!r} is unknown; use one of {known}")
    return TOLERANCE_FP32 if claimed_precision == recompute_precision == "fp32" else TOLERANCE_REDUCED
