"""Checks every value from the network passes: the Refused error, field checks, and the protocol's caps.

Both sides share them: the coordinator's validation layer (coordinator/validation.py) and the
stage's (worker/micro_batch_validation.py) raise `Refused`, and each servicer answers it with
the gRPC status it names; honest clients read the same caps so they never send more. No
grpc here (gptjt_core knows no network): a status travels as its name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sized

# gRPC status names a refusal answers with (grpc.StatusCode[name] in the servicers).
INVALID_ARGUMENT = "INVALID_ARGUMENT"  # malformed: NaN, a negative count, an unknown enum, a bad format
OUT_OF_RANGE = "OUT_OF_RANGE"  # well formed, outside what this run allows (a step past train.steps)
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # larger than a cap (a list, a string, a payload)
FAILED_PRECONDITION = "FAILED_PRECONDITION"  # fine in itself, meant for someone else (another stage)

# The protocol's caps; clients trim to them, the coordinator refuses what is over them.
MAX_NAME_CHARS = 256  # a worker's human label (a host name is at most 253)
MAX_DETAIL_CHARS = 500  # AVERAGING_FAILED details, peer-failure reasons
MAX_TOKEN_CHARS = 256  # a run token as presented at Join (never echoed back)
MAX_PEM_CHARS = 4096  # a worker's stage-link public key, PEM (an EC P-256 key is ~180, RSA-4096 ~800)
MAX_ADDRESS_CHARS = 300  # host:port, a 253-character host name or a bracketed IPv6 address
MAX_LINKS = 64  # link measurements on one heartbeat
MAX_DHT_MADDRS = 8  # multiaddrs a worker may announce for its DHT peer
MAX_MADDR_CHARS = 256
MAX_DIGEST_CHARS = 128  # a state digest, hex (gptjt_core/state_digest.py: SHA-256 gives 64)
MAX_DHT_KEY_BYTES = 1024  # a worker's DHT public key, OpenSSH (RSA-2048 is 380 bytes, RSA-4096 724)
INT64_MAX = (1 << 63) - 1

WORKER_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12], as the ledger issues them
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.%a-zA-Z]{2,64}\]")
_HEX = re.compile(r"[0-9a-f]*")
_WORD = re.compile(r"[a-z0-9_]{1,32}")
_SSH_RSA = re.compile(rb"ssh-rsa [A-Za-z0-9+/]+={0,2}")  # OpenSSH, no comment (hivemind writes none)


def shown(value: object, limit: int = 80) -> str:
    """`value` as a refusal message shows it: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'" + f" ({len(text)} chars)"


class Refused(ValueError):
    """A value from the network that must not reach the ledger or a stage.

    code: the gRPC status name to answer with; field: its path in the message (e.g.
    'heartbeat.links[2].mbit'); value: what was sent; expected: what is accepted, or what to do.
    """

    def __init__(self, code: str, field: str, value: object, expected: str, show: str | None = None):
        self.code, self.field, self.value, self.expected = code, field, value, expected
        super().__init__(f"{field} = {show if show is not None else shown(value)} refused: expected {expected}")


def integer(field: str, value: int, lo: int, hi: int = INT64_MAX, what: str = "") -> None:
    """lo <= value <= hi: below lo is malformed (INVALID_ARGUMENT), above hi outside the run
    (OUT_OF_RANGE). `what` says what hi is, e.g. 'train.steps'."""
    if value < lo:
        raise Refused(INVALID_ARGUMENT, field, value, f"an integer >= {lo}")
    if value > hi:
        raise Refused(OUT_OF_RANGE, field, value, f"an integer in {lo}..{hi}" + (f" ({what})" if what else ""))


def number(field: str, value: float, lo: float = 0.0, hi: float = math.inf, what: str = "") -> None:
    """A finite lo <= value <= hi."""
    if not math.isfinite(value) or value < lo:
        raise Refused(INVALID_ARGUMENT, field, value, f"a finite number >= {lo:g}")
    if value > hi:
        raise Refused(OUT_OF_RANGE, field, value, f"a number in [{lo:g}, {hi:g}]" + (f" ({what})" if what else ""))


def measure(field: str, value: float) -> None:
    """A measured non-negative quantity that may honestly be non-finite (the loss or gradient
    norm^2 of a diverged model): NaN and +Inf pass, a negative value or -Inf never does."""
    if value < 0:  # NaN < 0 is False
        raise Refused(INVALID_ARGUMENT, field, value, "a number >= 0 (NaN or +Inf for a diverged model)")


def choice(field: str, value: object, allowed: Collection) -> None:
    """One of `allowed`; a dict names its values (an enum: {1: 'LOADING', ...})."""
    if value not in allowed:
        names = [f"{label} ({v})" for v, label in allowed.items()] if isinstance(allowed, dict) else \
            [repr(v) for v in sorted(allowed, key=str)]
        raise Refused(INVALID_ARGUMENT, field, value, f"one of {', '.join(names)}")


def text(field: str, value: str, max_chars: int, printable: bool = True) -> None:
    """A string of at most `max_chars`, printable unless told otherwise."""
    if len(value) > max_chars:
        raise Refused(RESOURCE_EXHAUSTED, field, value, f"at most {max_chars} characters, got {len(value)}")
    if printable and not value.isprintable():
        raise Refused(INVALID_ARGUMENT, field, value, "printable characters only")


def escaped(value: str) -> str:
    """`value` on one printable line: each character that is not printable (a newline, an escape
    sequence) as its Python escape. For text a peer may fill with an exception's message (so it
    is not refused) that then reaches a log, an event or a terminal, where a raw newline could
    forge a line."""
    return value if value.isprintable() else "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)


def items(field: str, value: Sized, max_items: int) -> None:
    if len(value) > max_items:
        raise Refused(RESOURCE_EXHAUSTED, field, f"{len(value)} items", f"at most {max_items} items",
                      show=f"{len(value)} items")


def worker_id(field: str, value: str, optional: bool = False) -> None:
    """12 lowercase hex characters, as the ledger issues ids ('' too when `optional`)."""
    if optional and value == "":
        return
    if not WORKER_ID.fullmatch(value):
        raise Refused(INVALID_ARGUMENT, field, value, "a worker id: 12 lowercase hex characters, as Join returned")


def host_port(field: str, value: str) -> None:
    """host:port with a port in 1..65535 (a host name, IPv4, or [IPv6])."""
    text(field, value, MAX_ADDRESS_CHARS)
    host, _, port = value.rpartition(":")
    if not (_HOST.fullmatch(host) and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise Refused(INVALID_ARGUMENT, field, value, "host:port with a port in 1..65535, e.g. 10.0.0.5:7001")


def hex_text(field: str, value: str, max_chars: int) -> None:
    text(field, value, max_chars)
    if not _HEX.fullmatch(value):
        raise Refused(INVALID_ARGUMENT, field, value, "lowercase hex characters")


def word(field: str, value: str, optional: bool = True) -> None:
    """A short lowercase identifier ('cuda', 'cpu'), or '' when `optional`."""
    if not (optional and value == "") and not _WORD.fullmatch(value):
        raise Refused(INVALID_ARGUMENT, field, value, "a short lowercase identifier such as 'cuda' or 'cpu'")


def multiaddr(field: str, value: str) -> None:
    text(field, value, MAX_MADDR_CHARS)
    if not value.startswith("/") or " " in value:
        raise Refused(INVALID_ARGUMENT, field, value, "a multiaddr such as /ip4/10.0.0.5/tcp/31337/p2p/Qm...")


def dht_key(field: str, value: bytes) -> None:
    """An RSA public key as OpenSSH writes it ("ssh-rsa AAAA..."), under MAX_DHT_KEY_BYTES, or b"".
    (Whether it parses, and its size, is checked where it is signed: gptjt_core/dht_auth.py.)"""
    if len(value) > MAX_DHT_KEY_BYTES:
        raise Refused(RESOURCE_EXHAUSTED, field, value, f"at most {MAX_DHT_KEY_BYTES} bytes, got {len(value)}")
    if value and not _SSH_RSA.fullmatch(value):
        raise Refused(INVALID_ARGUMENT, field, value, "an OpenSSH RSA public key, b'ssh-rsa AAAA...'")
