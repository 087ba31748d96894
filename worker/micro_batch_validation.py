"""The stage's door: every field of an incoming micro-batch checked against the run and this stage.

`check_header` runs as soon as a Process call's header arrives, before any activation byte is
buffered: the shape must be one this run produces (B <= train.micro_batch, T <= train.seq_len,
D = the model's hidden size), so no caller can make the stage build a huge (B, 1, T, T) mask;
the announced size must be what the codec makes of that shape. `check_payload` then decodes
the activations and checks their values (finite) and the labels' (inside the vocabulary or
the ignore index: an out-of-range label is a device-side assert in a GPU's cross_entropy).
Both raise `gptjt_core.wire_checks.Refused`; the servicer answers with its status.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptjt_core.compression import CODECS, CodecError, Encoded, decode, encoded_nbytes
from gptjt_core.config import RunConfig
from gptjt_core.ul2 import IGNORE
from gptjt_core.wire_checks import (FAILED_PRECONDITION, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, Refused, choice,
                                    integer)
from gptjt_proto import stage_pb2 as pb

from .label_wire import expected_lengths, labels_from_wire, wire_lengths

ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class StageLimits:
    """What a micro-batch sent to this stage may be."""

    stage: int  # the stage this worker serves
    hidden: int  # the model's n_embd: D of (B, T, D)
    vocab_size: int  # labels are token ids below it, or IGNORE
    seq_len: int  # train.seq_len: T at most
    micro_batch: int  # train.micro_batch: B at most
    global_batch: int  # train.global_batch: the loss normaliser every micro-batch carries
    max_payload: int  # pipeline.max_payload_bytes

    @staticmethod
    def of(run: RunConfig, stage: int, hidden: int, vocab_size: int) -> StageLimits:
        t = run.train
        return StageLimits(stage, hidden, vocab_size, t.seq_len, t.micro_batch, t.global_batch,
                           run.pipeline.max_payload_bytes)


@dataclass
class Incoming:
    """A decoded micro-batch as a stage receives it."""

    header: pb.MicroBatchHeader
    activations: torch.Tensor  # (B, T, D)
    prefix_lengths: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B, T)
    payload: bytes  # the activation codes as they arrived: the stage commits to them (worker/commitments.py)


def check_header(h: pb.MicroBatchHeader, lim: StageLimits) -> None:
    """Every header field, before the activations are received."""
    if h.stage != lim.stage:
        raise Refused(FAILED_PRECONDITION, "micro_batch.stage", h.stage,
                      f"{lim.stage}: micro-batch for stage {h.stage} sent to a worker holding stage {lim.stage}")
    integer("micro_batch.ticket_id", h.ticket_id, 1)
    integer("micro_batch.step", h.step, 0)
    integer("micro_batch.attempt", h.attempt, 0)
    if h.global_batch != lim.global_batch:
        raise Refused(INVALID_ARGUMENT, "micro_batch.global_batch", h.global_batch,
                      f"{lim.global_batch}, the run's train.global_batch")
    if h.gradient_codec:
        choice("micro_batch.gradient_codec", h.gradient_codec, CODECS)
    meta = h.activations
    shape = tuple(meta.shape)
    if len(shape) != 3 or shape[2] != lim.hidden or min(shape) < 1:
        raise Refused(INVALID_ARGUMENT, "micro_batch.activations.shape", shape,
                      f"(B, T, {lim.hidden}): this stage takes (B, T, {lim.hidden}) hidden states")
    B, T, D = shape
    integer("micro_batch.activations.shape[0]", B, 1, lim.micro_batch, "train.micro_batch")
    integer("micro_batch.activations.shape[1]", T, 1, lim.seq_len, "train.seq_len")
    choice("micro_batch.activations.dtype", meta.dtype, ACTIVATION_DTYPES)
    choice("micro_batch.activations.codec", meta.codec, CODECS)
    _check_size(meta, B * T * D, lim)
    if len(h.prefix_lengths) != B:
        raise Refused(INVALID_ARGUMENT, "micro_batch.prefix_lengths", list(h.prefix_lengths)[:8],
                      f"{B} prefix lengths, one per sequence ({len(h.prefix_lengths)} given)")
    bad = [p for p in h.prefix_lengths if not 0 <= p <= T]
    if bad:
        raise Refused(INVALID_ARGUMENT, "micro_batch.prefix_lengths", list(h.prefix_lengths)[:8],
                      f"prefix lengths in [0, {T}] (T); {bad[:4]} are not")
    if len(h.labels) not in wire_lengths(B, T):
        raise Refused(INVALID_ARGUMENT, "micro_batch.labels", f"{len(h.labels)} bytes",
                      f"(B, T) = {(B, T)} labels (worker/label_wire.py): {expected_lengths(B, T)}",
                      show=f"{len(h.labels)} bytes")


def _check_size(meta: pb.TensorMeta, numel: int, lim: StageLimits) -> None:
    """The announced size: under the stage's cap, and what the codec makes of the shape."""
    if meta.nbytes > lim.max_payload:
        raise Refused(RESOURCE_EXHAUSTED, "micro_batch.activations.nbytes", meta.nbytes,
                      f"at most {lim.max_payload} bytes: the payload exceeds this stage's limit "
                      "(pipeline.max_payload_bytes)")
    expected = encoded_nbytes(numel, meta.codec)
    if meta.nbytes != expected:
        raise Refused(INVALID_ARGUMENT, "micro_batch.activations.nbytes", meta.nbytes,
                      f"{expected} bytes: what {meta.codec} makes of shape {tuple(meta.shape)}")


def check_payload(h: pb.MicroBatchHeader, payload: bytes, lim: StageLimits) -> Incoming:
    """Decode the activations (a header that passed check_header) and check every value."""
    meta = h.activations
    if len(payload) != meta.nbytes:
        raise Refused(INVALID_ARGUMENT, "micro_batch.activations", f"{len(payload)} bytes",
                      f"the {meta.nbytes} bytes announced (the stream was truncated)",
                      show=f"{len(payload)} bytes")
    try:
        x = decode(Encoded(payload, tuple(meta.shape), meta.dtype, meta.codec))
    except CodecError as e:
        raise Refused(INVALID_ARGUMENT, "micro_batch.activations", f"{len(payload)} bytes",
                      f"activations that decode ({e})", show=f"{len(payload)} bytes") from None
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise Refused(INVALID_ARGUMENT, "micro_batch.activations", f"{bad} NaN/Inf value(s)",
                      "finite values; activations contain NaN/Inf, refusing the micro-batch", show=f"{bad} NaN/Inf")
    B, T = x.shape[0], x.shape[1]
    labels = labels_from_wire(h.labels, B, T)  # its length passed check_header
    check_labels(labels, lim.vocab_size)
    return Incoming(h, x, torch.tensor(list(h.prefix_lengths), dtype=torch.long), labels, payload)


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Every label a token id below the vocabulary size, or IGNORE (no loss there)."""
    bad = labels[(labels != IGNORE) & ((labels < 0) | (labels >= vocab_size))]
    if bad.numel():
        raise Refused(INVALID_ARGUMENT, "micro_batch.labels", bad[:4].tolist(),
                      f"token ids in [0, {vocab_size}) or {IGNORE} (ignored); {bad.numel()} label(s) are not")
