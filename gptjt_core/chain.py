"""A micro-batch's chain of custody: digests of the codes each stage sent and got back, and whether neighbours agree."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .commitment import DIGEST_BYTES, input_digest


def int64_bytes(values: Sequence[int]) -> bytes:
    """Little-endian int64s: how token ids, labels and prefix lengths enter a digest."""
    return struct.pack(f"<{len(values)}q", *values)


def codes_parts(codec: str, dtype: str, shape: Sequence[int], data: bytes, *extra: bytes) -> tuple[bytes, ...]:
    """What codes_digest hashes, in order (a receiver digests them on its compute thread)."""
    return (f"{codec}|{dtype}|{','.join(str(int(d)) for d in shape)}".encode(), data, *extra)


def codes_digest(codec: str, dtype: str, shape: Sequence[int], data: bytes, *extra: bytes) -> bytes:
    """sha256 of codes as they travel between two stages: what decodes them (codec, dtype,
    shape), the codes, and what travels with them (`extra`: labels and prefix lengths down the
    pipeline, nothing with a gradient). Sender and receiver each compute it from their side of
    the same message, so equal digests say that the bytes arrived as they left."""
    return input_digest(*codes_parts(codec, dtype, shape, data, *extra))


def _digest(name: str, value: bytes | None) -> None:
    if value is not None and (not isinstance(value, bytes) or len(value) != DIGEST_BYTES):
        raise ValueError(f"{name} digest must be {DIGEST_BYTES} bytes or absent, got {value!r}")


@dataclass(frozen=True)
class Links:
    """What a stage committed to on its links for one micro-batch, beside its Commitment (whose
    `input` is the digest of what came down to it: codes_digest at stages > 0)."""

    sent: bytes | None  # codes_digest of the output codes sent to the next stage; None at the last stage
    returned: bytes | None  # of the gradient codes the next stage sent back; None at the last stage
    sent_back: bytes | None  # of the gradient codes sent to the previous stage; None at stage 0

    def __post_init__(self) -> None:
        for name in ("sent", "returned", "sent_back"):
            _digest(name, getattr(self, name))


@dataclass(frozen=True)
class Record:
    """One stage's commitment to one micro-batch, as the coordinator keeps it."""

    ticket: int
    stage: int
    worker: str
    input: bytes  # Commitment.input
    links: Links


@dataclass(frozen=True)
class LinkCheck:
    """Whether neighbours agree about the bytes between them for one ticket; when they do not,
    one of them lies (or is broken), and which one takes a third opinion."""

    ticket: int
    stage: int  # the upstream stage; the link is stage -> stage + 1
    upstream: str  # its worker
    downstream: tuple[str, ...]  # the workers of stage + 1 that committed to this ticket
    agrees: bool
    detail: str  # "" when they agree; else which digests differ


def _why(u: Record, downs: list[Record]) -> str:
    """Which side of the link the upstream's digests match none of."""
    short = lambda d: d.hex()[:16] if d else "none"  # noqa: E731
    forward = [d for d in downs if d.input == u.links.sent]
    if not forward:
        return (f"stage {u.stage} committed to sending codes {short(u.links.sent)}; stage {u.stage + 1} to receiving "
                + ", ".join(short(d.input) for d in downs))
    return (f"stage {u.stage} committed to getting gradient codes {short(u.links.returned)} back; stage "
            f"{u.stage + 1} to sending " + ", ".join(short(d.links.sent_back) for d in forward))


def check_chain(records: Iterable[Record]) -> list[LinkCheck]:
    """One LinkCheck per link checked in one step attempt's records.

    A link stage -> stage + 1 of a ticket is checked for every upstream record that sent
    something (not the last stage) when stage + 1 committed to the ticket at all (its worker
    may have died before reporting). It holds when some downstream record received exactly the
    codes the upstream sent and sent back exactly the gradient codes the upstream got: a stage
    commits only once its backward is done, so the upstream's gradient came from a downstream
    record. Downstream records that match no upstream one are not evidence: a try whose reply
    was lost leaves one behind (the upstream retried, perhaps over other codecs)."""
    by_place: dict[tuple[int, int], list[Record]] = {}
    for r in records:
        by_place.setdefault((r.ticket, r.stage), []).append(r)
    checks = []
    for (ticket, stage), ups in sorted(by_place.items()):
        downs = by_place.get((ticket, stage + 1))
        if not downs:
            continue
        workers = tuple(sorted({d.worker for d in downs}))
        for u in ups:
            if u.links.sent is None:
                continue
            agrees = any(d.input == u.links.sent and d.links.sent_back == u.links.returned for d in downs)
            checks.append(LinkCheck(ticket, stage, u.worker, workers, agrees, "" if agrees else _why(u, downs)))
    return checks
