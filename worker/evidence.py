"""What a stage keeps of each recent micro-batch so that a replica can recompute it: the evidence of a spot check."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptjt_core.chain import codes_digest
from gptjt_core.commitment import input_digest
from gptjt_core.compression import CodecError, Encoded, decode
from gptjt_proto import stage_pb2 as spb

from .label_wire import LabelWireError, labels_from_wire

# A spot check's evidence travels in one message (Stage.FetchEvidence): the stage links' 8 MiB
# cap (worker/transport.py GRPC_OPTIONS). A micro-batch whose codes are larger cannot be checked
# this way yet (GPT-J 6B at fp16 codes: 1 x 2048 x 4096 x 2 B = 16 MiB; at q8, 8 MiB + scales).
MAX_EVIDENCE_BYTES = 8 << 20


@dataclass(frozen=True)
class Evidence:
    """One micro-batch as this stage received it (kept for the step it belongs to and the next)."""

    step: int
    wire: tuple[bytes, ...]  # the parts its commitment's input digest hashes (worker/commitments.py)
    input_shape: tuple[int, ...]  # (B, T) of the token ids at stage 0; () elsewhere (wire[0] says it)
    returned: Encoded | None  # the gradient codes the next stage sent back; None at the last stage

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.wire) + (len(self.returned.data) if self.returned is not None else 0)

    def to_pb(self) -> spb.EvidenceReply:
        reply = spb.EvidenceReply(wire=list(self.wire), input_shape=list(self.input_shape), step=self.step)
        if self.returned is not None:
            r = self.returned
            reply.returned.CopyFrom(spb.TensorMeta(shape=list(r.shape), dtype=r.dtype, codec=r.codec,
                                                   nbytes=len(r.data)))
            reply.returned_data = r.data
        return reply


class EvidenceError(ValueError):
    """Evidence that cannot be what the checked worker committed to, or cannot be decoded."""


@dataclass(frozen=True)
class StageInputs:
    """A micro-batch's inputs rebuilt from its evidence, ready to recompute."""

    inputs: torch.Tensor  # (B, T) int64 token ids at stage 0, else (B, T, D) activations
    labels: torch.Tensor  # (B, T) int64
    prefix_lengths: torch.Tensor  # (B,) int64
    returned: torch.Tensor | None  # (B, T, D) the gradient that came back; None at the last stage


def _int64s(data: bytes, shape: tuple[int, ...], what: str) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    if len(data) != 8 * n:
        raise EvidenceError(f"evidence {what}: {len(data)} bytes, shape {shape} needs {8 * n}")
    return torch.frombuffer(bytearray(data), dtype=torch.int64).reshape(shape) if n else torch.zeros(shape,
                                                                                                    dtype=torch.int64)


def read_evidence(reply: spb.EvidenceReply, claimed_input: bytes, claimed_returned: bytes | None,
                  embed: bool, head: bool) -> StageInputs:
    """Check evidence from the worker being checked against what it committed to, and decode it.

    The input digest must equal its commitment's (so these are the bytes it computed on, which
    the chain check ties to what the previous stage sent), and the gradient codes must be the
    ones it committed to getting back. Anything else raises EvidenceError naming the difference."""
    wire = tuple(bytes(p) for p in reply.wire)
    if sum(len(p) for p in wire) + len(reply.returned_data) > MAX_EVIDENCE_BYTES:
        raise EvidenceError(f"evidence of {sum(len(p) for p in wire) + len(reply.returned_data)} bytes is "
                            f"above the {MAX_EVIDENCE_BYTES} a check takes")
    if not wire or input_digest(*wire) != claimed_input:
        raise EvidenceError("the evidence's input digest is not the one its commitment names: these are not the "
                            "bytes it computed on")
    if embed:
        if len(wire) != 3 or len(reply.input_shape) != 2 or any(d <= 0 for d in reply.input_shape):
            raise EvidenceError(f"stage-0 evidence needs 3 parts and a (B, T) shape, got {len(wire)} parts and "
                                f"shape {list(reply.input_shape)}")
        shape = tuple(int(d) for d in reply.input_shape)
        inputs, labels = _int64s(wire[0], shape, "token ids"), _int64s(wire[1], shape, "labels")
        prefix = _int64s(wire[2], shape[:1], "prefix lengths")
    else:
        if len(wire) != 4:
            raise EvidenceError(f"evidence of a stage > 0 has 4 parts (codes header, codes, labels, prefix "
                                f"lengths), got {len(wire)}")
        try:
            codec, dtype, dims = wire[0].decode().split("|")
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError as e:
            raise EvidenceError(f"evidence codes header {wire[0][:80]!r} is not codec|dtype|shape") from e
        if len(shape) != 3:
            raise EvidenceError(f"evidence activations have shape {shape}, not (B, T, D)")
        try:
            inputs = decode(Encoded(wire[1], shape, dtype, codec))
        except CodecError as e:
            raise EvidenceError(f"evidence activations do not decode: {e}") from e
        try:  # as the stage link carried them (worker/label_wire.py)
            labels = labels_from_wire(wire[2], shape[0], shape[1])
        except LabelWireError as e:
            raise EvidenceError(f"evidence labels: {e}") from e
        prefix = _int64s(wire[3], shape[:1], "prefix lengths")
    returned = None
    if not head:
        m = reply.returned
        if not reply.HasField("returned"):
            raise EvidenceError("evidence has no returned gradient; a stage before the last one got one back")
        if codes_digest(m.codec, m.dtype, list(m.shape), reply.returned_data) != claimed_returned:
            raise EvidenceError("the evidence's gradient codes are not the ones its commitment says came back")
        try:
            returned = decode(Encoded(reply.returned_data, tuple(int(d) for d in m.shape), m.dtype, m.codec))
        except CodecError as e:
            raise EvidenceError(f"evidence gradient does not decode: {e}") from e
    return StageInputs(inputs, labels, prefix, returned)


def check_fits(inputs: StageInputs, micro_batch: int, seq_len: int, width: int, embed: bool) -> None:
    """Evidence whose digests match can still be crafted by the worker it comes from: refuse
    shapes the run never sends before computing on them (a long sequence is a quadratic
    attention bill for the verifier)."""
    shape = tuple(inputs.inputs.shape)
    b, t = shape[0], shape[1]
    if not (1 <= b <= micro_batch and 1 <= t <= seq_len):
        raise EvidenceError(f"evidence of shape {shape}: the run's micro-batches are at most {micro_batch} x "
                            f"{seq_len}")
    if not embed and shape[2] != width:
        raise EvidenceError(f"evidence activations of width {shape[2]}; this stage takes {width}")
    if tuple(inputs.labels.shape) != (b, t) or tuple(inputs.prefix_lengths.shape) != (b,):
        raise EvidenceError(f"evidence labels {tuple(inputs.labels.shape)} / prefix lengths "
                            f"{tuple(inputs.prefix_lengths.shape)} do not fit inputs of shape {shape}")
    if inputs.returned is not None and tuple(inputs.returned.shape) != (b, t, width):
        raise EvidenceError(f"evidence gradient of shape {tuple(inputs.returned.shape)}; the output is "
                            f"{(b, t, width)}")
    if inputs.inputs.is_floating_point() and not bool(torch.isfinite(inputs.inputs).all()):
        raise EvidenceError("evidence activations hold NaN or Inf")
