"""The adapter between codec output (bytes + metadata) and protobuf stage messages."""

from __future__ import annotations

from collections.abc import Iterator

from gptjt_core.compression import Encoded
from gptjt_proto import stage_pb2 as pb


def meta_pb(enc: Encoded) -> pb.TensorMeta:
    return pb.TensorMeta(shape=list(enc.shape), dtype=enc.dtype, codec=enc.codec, nbytes=len(enc.data))


def data_chunks(data: bytes, chunk_bytes: int) -> Iterator[pb.StageChunk]:
    view = memoryview(data)
    for i in range(0, len(data), chunk_bytes):
        yield pb.StageChunk(data=bytes(view[i:i + chunk_bytes]))


def encoded_from(meta: pb.TensorMeta, data: bytes) -> Encoded:
    return Encoded(data=data, shape=tuple(meta.shape), dtype=meta.dtype, codec=meta.codec)
