"""The stage's validation layer (worker/micro_batch_validation.py) on a header built as stage 0 builds it.

The header comes from the real path: the micro-batch of a ticket (gptjt_core.batches, as
worker/pipeline.py reads it), stage 0's forward of it, the codec the downstream sender picks.
Each case spoils one field and expects the status, the field and the value in the refusal;
the stream reader must refuse a bad header before it takes any activation byte.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from gptjt_core.batches import MicroBatchBuilder
from gptjt_core.compression import encode
from gptjt_core.data import MicroBatchRef
from gptjt_core.model import StageSpec
from gptjt_core.wire_checks import Refused, shown
from gptjt_proto import stage_pb2 as spb
from tests.conftest import small_run
from worker.label_wire import labels_to_wire
from worker.micro_batch_validation import StageLimits, check_header, check_payload
from worker.stage import LayerSlice
from worker.transport import LinkCounters, read_micro_batch
from worker.wire import data_chunks, meta_pb

RUN = small_run(steps=3, global_batch=4, micro_batch=2, seq_len=64)
IA, OOR, RE, FP = "INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"


@pytest.fixture(scope="module")
def real():
    """(header, payload, limits) of micro-batch 1 of step 0, as stage 0 sends it to stage 1."""
    mb = MicroBatchBuilder(RUN).build(MicroBatchRef(0, 1, 1, 0))
    stage0 = LayerSlice(RUN, StageSpec(0, 2, embed=True))
    out = stage0.forward((11, 0), 0, mb.input_ids, mb.prefix_lengths)  # (B, T, D)
    # worker/pipeline.py's next_header, then DownstreamSender.send / StageClient.process
    header = spb.MicroBatchHeader(ticket_id=11, step=0, attempt=0, global_batch=RUN.train.global_batch,
                                  prefix_lengths=mb.prefix_lengths.tolist(), labels=labels_to_wire(mb.labels), stage=1)
    header.gradient_codec = "fp16"
    enc = encode(out, "fp16")
    header.activations.CopyFrom(meta_pb(enc))
    config = stage0.model.config
    return header, enc.data, StageLimits.of(RUN, 1, config.n_embd, config.vocab_size)


def spoil(header: spb.MicroBatchHeader, path: str, value) -> spb.MicroBatchHeader:
    h = spb.MicroBatchHeader()
    h.CopyFrom(header)
    target, name = (h.activations, path.split(".")[1]) if path.startswith("activations.") else (h, path)
    if isinstance(value, (list, tuple)):
        del getattr(target, name)[:]
        getattr(target, name).extend(value)
        if name == "shape":  # the size the codec makes of the new shape, so the shape is what is wrong
            target.nbytes = 2 * int(torch.Size(value).numel())
    else:
        setattr(target, name, value)
    return h


HEADER_CASES = [
    ("stage", 0, FP), ("stage", 2, FP), ("ticket_id", 0, IA), ("step", -1, IA), ("attempt", -1, IA),
    ("global_batch", 0, IA), ("global_batch", 5, IA), ("gradient_codec", "zip", IA),
    ("activations.shape", [2, 64], IA), ("activations.shape", [2, 64, 64], IA), ("activations.shape", [0, 64, 128], IA),
    ("activations.shape", [3, 64, 128], OOR), ("activations.shape", [2, 65, 128], OOR),
    ("activations.shape", [2, 100_000, 128], OOR),  # the (B, 1, T, T) mask would be 20 GB
    ("activations.dtype", "float64", IA), ("activations.dtype", "int8", IA), ("activations.codec", "zip", IA),
    ("activations.nbytes", 1 << 40, RE), ("activations.nbytes", 100, IA),
    ("prefix_lengths", [3], IA), ("prefix_lengths", [3, -1], IA), ("prefix_lengths", [3, 65], IA),
    ("labels", b"\x00" * 8, IA), ("labels", b"\x00" * 8 * 2 * 64, IA),  # int64 labels: neither width
]


def field_of(path: str, value) -> str:
    if path == "activations.shape" and len(value) == 3 and min(value) >= 1 and value[2] == 128:
        return f"micro_batch.activations.shape[{0 if value[0] != 2 else 1}]"
    return f"micro_batch.{path}"


def test_the_real_micro_batch_passes(real):
    header, payload, lim = real
    check_header(header, lim)
    inc = check_payload(header, payload, lim)
    assert inc.activations.shape == (2, 64, 128) and inc.labels.shape == (2, 64)
    assert int((inc.labels == -100).sum()) > 0  # UL2 prefixes carry the ignore index, which passes


@pytest.mark.parametrize("path,value,code", HEADER_CASES, ids=[f"{p}={v!r:.20}" for p, v, _ in HEADER_CASES])
def test_a_bad_header_field_is_refused(real, path, value, code):
    header, _, lim = real
    with pytest.raises(Refused) as refused:
        check_header(spoil(header, path, value), lim)
    e = refused.value
    assert (e.code, e.field) == (code, field_of(path, value)), str(e)
    assert str(e).startswith(f"{e.field} = ") and " refused: expected " in str(e)
    if path not in ("labels", "activations.shape", "prefix_lengths"):
        assert str(e).startswith(f"{e.field} = {shown(value)} ")


@pytest.mark.parametrize("label,width,ok", [(-100, 2, True), (0, 2, True), (50399, 2, True), (50400, 2, False),
                                            (0xFFFE, 2, False), (-100, 4, True), (50399, 4, True), (-1, 4, False),
                                            (-101, 4, False), ((1 << 31) - 1, 4, False)])
def test_labels_are_token_ids_or_the_ignore_index(real, label, width, ok):
    """An out-of-range label is a device-side assert in a GPU's cross_entropy: refused at the door,
    in either of the link's label widths (worker/label_wire.py; a sender's bytes need not be
    what labels_to_wire would have chosen)."""
    header, payload, lim = real
    labels = np.full((2, 64), 7, dtype=np.int64)
    labels[1, 5] = label
    if width == 2:
        wire = np.where(labels == -100, 0xFFFF, labels).astype("<u2").tobytes()
    else:
        wire = labels.astype("<i4").tobytes()
    h = spoil(header, "labels", wire)
    if ok:
        check_payload(h, payload, lim)
        return
    with pytest.raises(Refused) as refused:
        check_payload(h, payload, lim)
    assert (refused.value.code, refused.value.field) == (IA, "micro_batch.labels")
    assert str(label) in str(refused.value) and "[0, 50400) or -100" in str(refused.value)


def test_activations_must_be_complete_and_finite(real):
    header, payload, lim = real
    with pytest.raises(Refused, match="truncated") as refused:
        check_payload(header, payload[:-8], lim)
    assert refused.value.field == "micro_batch.activations"
    nan = encode(torch.full((2, 64, 128), float("nan")), "fp16").data
    with pytest.raises(Refused, match="NaN/Inf"):
        check_payload(header, nan, lim)


def stream(header, payload, after_header=None):
    async def chunks():
        yield spb.StageChunk(header=header)
        if after_header is not None:
            after_header()
        for chunk in data_chunks(payload, 4096):
            yield chunk
    return chunks()


def test_the_stream_reader_refuses_a_bad_header_before_taking_any_byte(real):
    header, payload, lim = real
    taken = []
    bad = spoil(header, "activations.shape", [2, 100_000, 128])
    with pytest.raises(Refused) as refused:
        asyncio.run(read_micro_batch(stream(bad, payload, lambda: taken.append(1)), lim, LinkCounters()))
    assert refused.value.code == OOR and taken == []  # refused on the header alone
    counters = LinkCounters()
    inc = asyncio.run(read_micro_batch(stream(header, payload), lim, counters))
    assert counters.received == len(payload) and inc.prefix_lengths.tolist() == list(header.prefix_lengths)
    with pytest.raises(Refused) as refused:
        asyncio.run(read_micro_batch(stream(header, payload + b"\x00" * 8), lim, LinkCounters()))
    assert refused.value.code == RE and refused.value.field == "micro_batch.activations"

    async def data_first():
        yield spb.StageChunk(data=b"\x00")
    with pytest.raises(Refused, match="a header as the first chunk"):
        asyncio.run(read_micro_batch(data_first(), lim, LinkCounters()))
