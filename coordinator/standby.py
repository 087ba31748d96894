"""A coordinator that waits its turn: with the ledger in PostgreSQL (coordinator.ledger_url), the
first coordinator to take the leadership lock serves the run; another one started on the same
ledger stands by until that lock is free, then takes over the run where the ledger says it is.

While it stands by, a coordinator already listens on its address and answers every call with
UNAVAILABLE: a worker given every coordinator's address (gptjt-worker --join A,B) moves on to
the next one at once, rather than waiting for a connection to time out. Once it leads, it
closes that listener and serves the real API on the same address. A leader whose database
connection breaks stops serving (`watch_leadership`): PostgreSQL has released its lock, so the
standby may lead already, and two coordinators must never both answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from gptjt_core.config import RunConfig

from .ledger.db import LedgerDB
from .ledger.postgres import redacted

log = logging.getLogger("gptjt.coordinator")

STANDBY_DETAIL = "this coordinator is standing by (another one leads the run); try the next coordinator address"


class RefuseEverything(grpc.GenericRpcHandler):
    """Every method of every service: UNAVAILABLE, before reading the request."""

    def service(self, handler_call_details):
        async def refuse(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, STANDBY_DETAIL)

        return grpc.stream_stream_rpc_method_handler(refuse)


def bind(server: grpc.aio.Server, run: RunConfig, listen: str) -> str:
    """Add the API's port to `server` (TLS when the run has a certificate); the bound host:port."""
    cfg = run.coordinator
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}: address in use or not local")
    return f"{listen.rsplit(':', 1)[0]}:{port}"


async def lead(run: RunConfig, port_file: str | None, ready_line: bool) -> tuple[LedgerDB | str, str]:
    """The ledger location to open and the address to serve on, once this coordinator leads.

    SQLite (no ledger_url): at once, the state file and coordinator.listen. PostgreSQL: the
    connection that holds the leadership lock, after standing by for as long as another holds it;
    the address is the one stood by on (a port 0 was bound to a real one then)."""
    cfg = run.coordinator
    if not cfg.ledger_url:
        return cfg.state_path, cfg.listen
    db = LedgerDB(cfg.ledger_url)
    if db.try_lead():
        log.info("leading the run on the ledger at %s", redacted(cfg.ledger_url))
        return db, cfg.listen
    server = grpc.aio.server(handlers=[RefuseEverything()], options=[("grpc.so_reuseport", 0)])
    address = bind(server, run, cfg.listen)
    await server.start()
    if ready_line:
        print(f"gptjt-coordinator: run {run.name!r} standing by on {address}: another coordinator leads the "
              f"ledger at {redacted(cfg.ledger_url)}; taking over when it stops", flush=True)
    if port_file:  # after the line, as when serving (cli.py)
        Path(port_file).write_text(address)
    started = time.monotonic()
    try:
        while not db.try_lead():
            await asyncio.sleep(cfg.standby_poll_s)
    finally:
        await server.stop(grace=None)
    log.warning("took over the run after standing by for %.1f s", time.monotonic() - started)
    return db, address


async def watch_leadership(db: LedgerDB, lost: Callable[[], None], period_s: float = 1.0) -> None:
    """Calls `lost()` and returns once `db` no longer holds the leadership (its connection broke)."""
    while True:
        await asyncio.sleep(period_s)
        if not db.still_leading():
            log.error("lost the ledger database connection, and with it the leadership: stopping (a standby "
                      "coordinator takes over)")
            lost()
            return
