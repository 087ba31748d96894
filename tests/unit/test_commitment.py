"""Commitments of a stage's work: the binary format refuses hostile bytes, honest recomputations
of the real tiny stage agree across thread counts and precisions, and each kind of lie does not."""

import math
import struct

import pytest
import torch

from gptjt_core.commitment import (DEFAULT_KEY, TOLERANCE_FP32, TOLERANCE_REDUCED, Commitment, Sketch, compare,
                                   input_digest, tolerance_for)
from gptjt_core.sketching import sketch_tensor
from gptjt_core.config import ModelConfig, RunConfig, TrainConfig
from gptjt_core.model import StageSpec
from worker.stage import LayerSlice

FIRST, MIDDLE = StageSpec(0, 1, embed=True), StageSpec(1, 3)


def _run(precision: str = "fp32") -> RunConfig:
    return RunConfig(model=ModelConfig(source="random:tiny:0"),
                     train=TrainConfig(global_batch=4, micro_batch=2, seq_len=64, precision=precision))


@pytest.fixture(scope="module")
def wire():
    """Two micro-batches as the middle stage receives them: hidden states from the real first
    stage, prefix lengths, and a gradient coming back."""
    gen = torch.Generator().manual_seed(0)
    first = LayerSlice(_run(), FIRST)
    batches = []
    for i in range(2):
        ids = torch.randint(0, 50257, (2, 64), generator=gen)
        prefix = torch.tensor([10, 40])
        hidden = first.forward((i, 0), 0, ids, prefix)
        first.discard((i, 0))
        batches.append((hidden, prefix, torch.randn(hidden.shape, generator=gen) * 1e-3))
    return batches


def _middle(wire, precision: str, threads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, gradient sent back) of the real middle stage for each micro-batch."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stage = LayerSlice(_run(precision), MIDDLE)
        out = []
        for i, (hidden, prefix, grad_back) in enumerate(wire):
            y = stage.forward((i, 0), 0, hidden.clone(), prefix)
            out.append((y.float(), stage.backward((i, 0), 0, grad_back).float()))
        return out
    finally:
        torch.set_num_threads(saved)


def _commit(wire, i: int, output: torch.Tensor, grad: torch.Tensor) -> Commitment:
    return Commitment(input_digest(wire[i][0].numpy().tobytes()), sketch_tensor(output), sketch_tensor(grad))


@pytest.fixture(scope="module")
def fp32_two_threads(wire):
    return _middle(wire, "fp32", 2)


# -- the format -----------------------------------------------------------------------------

def _sample() -> Commitment:
    gen = torch.Generator().manual_seed(1)
    return Commitment(input_digest(b"codes"), sketch_tensor(torch.randn(2, 16, 128, generator=gen)),
                      sketch_tensor(torch.randn(2, 16, 128, generator=gen)))


def test_round_trip_and_size():
    c = _sample()
    data = c.to_bytes()
    assert Commitment.from_bytes(data) == c
    assert len(data) == c.size_bytes == 598 < 1024
    forward_only = Commitment(c.input, c.output)
    assert Commitment.from_bytes(forward_only.to_bytes()) == forward_only
    assert forward_only.size_bytes == 316
    assert Sketch.from_bytes(c.output.to_bytes()) == c.output


def test_input_digest_is_sha256_of_framed_parts():
    assert len(input_digest(b"a")) == 32
    assert input_digest(b"a") == input_digest(b"a") != input_digest(b"b")
    assert input_digest(b"ab", b"c") != input_digest(b"a", b"bc") != input_digest(b"abc")
    with pytest.raises(ValueError, match="at least one part"):
        input_digest()


def _with_value(data: bytes, offset: int, fmt: str, value) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


VALUES_AT = 34 + 26  # header (version, flags, digest) + output sketch head (key, numel, k, norm)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:10], "shorter than its 34-byte header"),
    (lambda d: d[:40], "bytes left, a sketch header needs 26"),
    (lambda d: d[:VALUES_AT + 100], "output sketch: truncated"),
    (lambda d: d[:-1], "gradient sketch: truncated"),
    (lambda d: d + b"\0", "1 bytes after"),
    (lambda d: b"\x02" + d[1:], "version 2 is unknown"),
    (lambda d: d[:1] + b"\x03" + d[2:], "flags 0x03 set unknown bits"),
    (lambda d: d[:1] + b"\x00" + d[2:], "bytes after"),  # no gradient announced, yet one follows
    (lambda d: _with_value(d, VALUES_AT + 8, "<f", math.nan), "output sketch: value 2 is nan"),
    (lambda d: _with_value(d, VALUES_AT - 4, "<f", math.inf), "norm inf is not a finite number"),
    (lambda d: _with_value(d, VALUES_AT - 4, "<f", -1.0), "norm -1.0 is not a finite number >= 0"),
    (lambda d: _with_value(d, VALUES_AT - 6, "<H", 63), "k=63 is not one of"),
    (lambda d: _with_value(d, VALUES_AT - 10, "<I", 2**31), "numel 2147483648 is above"),
    (lambda d: _with_value(d, VALUES_AT - 10, "<I", 0), "an empty tensor has norm 0"),
])
def test_hostile_bytes_are_refused_by_name(mutate, message):
    with pytest.raises(ValueError, match=message):
        Commitment.from_bytes(mutate(_sample().to_bytes()))


def test_not_bytes_and_bad_fields_are_refused():
    with pytest.raises(ValueError, match="must be bytes"):
        Commitment.from_bytes("text")
    with pytest.raises(ValueError, match="input digest must be 32 bytes"):
        Commitment(b"short", _sample().output)
    with pytest.raises(ValueError, match="key must be 16 bytes"):
        sketch_tensor(torch.ones(3), key=b"short")
    with pytest.raises(ValueError, match="non-finite"):
        sketch_tensor(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="float tensor"):
        sketch_tensor(torch.ones(3, dtype=torch.long))


# -- the sketch -----------------------------------------------------------------------------

def test_sketch_estimates_the_relative_error_of_any_shape_of_difference():
    """||P d|| / ||d|| stays within the chi^2_64 bounds ([0.61, 1.44] at 1e-6) for dense noise,
    one changed token, one changed channel, a constant shift and a few positions."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(2, 64, 128, generator=gen)
    diffs = {"dense": torch.randn(y.shape, generator=gen), "token": torch.zeros_like(y),
             "channel": torch.zeros_like(y), "shift": torch.randn(128, generator=gen).expand_as(y).clone(),
             "few": torch.zeros_like(y)}
    diffs["token"][1, 5] = torch.randn(128, generator=gen)
    diffs["channel"][..., 7] = 1.0
    diffs["few"].view(-1)[torch.randint(0, y.numel(), (5,), generator=gen)] = 3.0
    for name, d in diffs.items():
        for key in (DEFAULT_KEY, b"another key 16 b"):
            d = d * (0.01 * y.norm() / d.norm())  # a 1 % lie
            estimated = sketch_tensor(y, key).rel_error(sketch_tensor(y + d, key))
            exact = float(d.norm() / max(y.norm(), (y + d).norm()))
            assert 0.61 * exact < estimated < 1.44 * exact, (name, key, estimated, exact)


def test_the_index_hash_has_no_structure_that_periodic_tensors_see():
    """Buckets are uniform (chi^2 per degree of freedom ~1, std 0.016), and over 32 keys the
    sketch keeps the norm of constant and alternating tensors of 1M values on average (a weak
    hash maps periodic indices to correlated buckets and signs: one round gives 0.66)."""
    from gptjt_core import commitment, sketching

    index = sketching._signed_buckets(0, 1 << 20, sketching._salts(DEFAULT_KEY), torch.device("cpu"))
    counts = torch.bincount(index, minlength=2 * commitment.BUCKETS).double()
    expected = (1 << 20) / (2 * commitment.BUCKETS)
    assert 0.9 < float(((counts - expected) ** 2 / expected).sum()) / (2 * commitment.BUCKETS - 1) < 1.1
    ones = torch.ones(1, 256, 4096)
    alternating = ones.clone()
    alternating[..., 1::2] = -1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # integer ops on 2 shared cores run faster on one thread
    try:
        for periodic in (ones, alternating):
            kept = [math.hypot(*s.values) / s.norm for s in (sketch_tensor(periodic, key=k.to_bytes(16, "little"))
                                                             for k in range(32))]
            assert abs(sum(kept) / len(kept) - 1) < 0.07, kept
    finally:
        torch.set_num_threads(threads)


def test_chunking_and_the_index_cache_do_not_change_the_sketch(monkeypatch):
    from gptjt_core import sketching

    x = torch.randn(5003, generator=torch.Generator().manual_seed(4))
    whole = sketch_tensor(x)
    monkeypatch.setattr(sketching, "CHUNK", 1000)  # six chunks, the last one short
    chunked = sketch_tensor(x)
    monkeypatch.setattr(sketching, "CACHED_NUMEL", 0)  # hashed chunk by chunk, as tensors above 2**25 are
    uncached = sketch_tensor(x)
    assert chunked.numel == uncached.numel == 5003
    assert whole.rel_error(chunked) < 1e-6 and chunked.rel_error(uncached) < 1e-6
    assert whole.rel_error(sketch_tensor(x.flip(0))) > 0.5  # same norm, values moved: only positions tell


def test_sketch_depends_on_the_values_not_the_shape_and_keys_must_match():
    x = torch.randn(4, 8, 16)
    assert sketch_tensor(x) == sketch_tensor(x.reshape(32, 16)) == sketch_tensor(x.double())
    other = sketch_tensor(x, key=b"another key 16 b")
    assert other.values != sketch_tensor(x).values
    verdict = compare(Commitment(input_digest(b"x"), sketch_tensor(x)), Commitment(input_digest(b"x"), other), 0.01)
    assert not verdict.agrees and "recompute with the claimed sketch's key" in verdict.reason


# -- honest recomputations of the real stage ------------------------------------------------

def test_honest_recomputation_agrees_across_thread_counts(wire, fp32_two_threads):
    one_thread = _middle(wire, "fp32", 1)
    tolerance = tolerance_for("fp32", "fp32")
    for i, ((y1, g1), (y2, g2)) in enumerate(zip(one_thread, fp32_two_threads)):
        verdict = compare(_commit(wire, i, y1, g1), _commit(wire, i, y2, g2), tolerance)
        assert verdict.agrees and verdict.input_matches, verdict.reason
        assert verdict.output_rel_error < tolerance / 100 and verdict.grad_rel_error < tolerance / 100


def test_bf16_agrees_with_fp32_only_at_the_reduced_tolerance(wire, fp32_two_threads):
    bf16 = _middle(wire, "bf16", 1)
    for i, ((yb, gb), (y, g)) in enumerate(zip(bf16, fp32_two_threads)):
        claimed, recomputed = _commit(wire, i, yb, gb), _commit(wire, i, y, g)
        assert compare(claimed, recomputed, tolerance_for("bf16", "fp32")).agrees
        assert not compare(claimed, recomputed, TOLERANCE_FP32).agrees  # the check does see bf16's rounding


# -- lies -----------------------------------------------------------------------------------

def _lies(wire, honest):
    gen = torch.Generator().manual_seed(3)
    y, g = honest[0]
    noise = torch.randn(y.shape, generator=gen) * (0.01 * y.norm() / y.numel() ** 0.5)
    return {
        "scale 1.05": _commit(wire, 0, y * 1.05, g),
        "noise 1% of the norm": _commit(wire, 0, y + noise, g),
        "zeros": _commit(wire, 0, torch.zeros_like(y), g),
        "stale output of another micro-batch": _commit(wire, 0, honest[1][0], g),
        "gradient scaled 1.05": _commit(wire, 0, y, g * 1.05),
        "gradient zeroed": _commit(wire, 0, y, torch.zeros_like(g)),
        "different input": Commitment(input_digest(b"other codes"), sketch_tensor(y), sketch_tensor(g)),
    }


def test_each_lie_disagrees_at_the_fp32_tolerance(wire, fp32_two_threads):
    honest = _middle(wire, "fp32", 1)
    recomputed = _commit(wire, 0, *fp32_two_threads[0])
    assert compare(_commit(wire, 0, *honest[0]), recomputed, TOLERANCE_FP32).agrees
    for name, lie in _lies(wire, honest).items():
        verdict = compare(lie, recomputed, TOLERANCE_FP32)
        assert not verdict.agrees, name
        assert verdict.reason.startswith("disagrees: "), verdict.reason
    assert "input digests differ" in compare(_lies(wire, honest)["different input"], recomputed, TOLERANCE_FP32).reason
    scaled = compare(_lies(wire, honest)["scale 1.05"], recomputed, TOLERANCE_FP32)
    assert scaled.input_matches and 0.045 < scaled.output_rel_error < 0.06 and "output relative error" in scaled.reason


def test_gross_lies_disagree_at_the_reduced_tolerance(wire, fp32_two_threads):
    bf16 = _middle(wire, "bf16", 1)
    recomputed = _commit(wire, 0, *fp32_two_threads[0])
    lies = _lies(wire, bf16)
    for name in ("zeros", "stale output of another micro-batch", "gradient zeroed", "different input"):
        assert not compare(lies[name], recomputed, TOLERANCE_REDUCED).agrees, name


def test_compare_refuses_a_meaningless_tolerance_and_a_missing_gradient():
    c = _sample()
    for bad in (0, -0.1, 1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tolerance"):
            compare(c, c, bad)
    verdict = compare(c, Commitment(c.input, c.output), 0.01)
    assert not verdict.agrees and verdict.grad_rel_error == math.inf and "no gradient sketch" in verdict.reason
    with pytest.raises(ValueError, match="precision 'int8' is unknown"):
        tolerance_for("int8", "fp32")
    assert tolerance_for("fp32", "fp32") == TOLERANCE_FP32 < tolerance_for("fp32", "bf16") == TOLERANCE_REDUCED
