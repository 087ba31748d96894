"""`gptjt-coordinator --config run.toml`: serve the run's ledger and API until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import grpc

from gptjt_core.config import ConfigError, RunConfig, load_run_config, tiny_demo_config
from gptjt_core.model import model_config_for
from gptjt_proto import coordinator_pb2_grpc as pb_grpc
from gptjt_proto.malformed import MalformedRequests
from gptjt_proto import operator_pb2_grpc as opb_grpc

from .checkpoint_store import CheckpointStore
from .dht import CoordinatorDHT
from .dht_authority import DhtAuthority
from .gc_schedule import collect_on_the_clock
from .run_ca import RunCA
from .sessions import SessionGuard
from .sole_server import sole_server_of
from .standby import bind, lead, watch_leadership
from .ledger.postgres import redacted
from .admin_token import AdminToken, ReadToken
from .operator_service import OperatorActions, OperatorService

from .scheduler import model_shape, plan_stages
from .server import CoordinatorService
from .ledger import LedgerError, RunLedger
from .ledger.db import LedgerDB
from .ledger.wal_checkpoints import WalCheckpoints

log = logging.getLogger("gptjt.coordinator")
# Calls received and not yet taken up by the event loop that gRPC holds before cancelling new
# ones: twice the 10,000 workers one coordinator is sized for (deploy/README.md).
PENDING_CALLS = 20_000


async def serve(run: RunConfig, ready_line: bool = True, port_file: str | None = None,
                dashboard_file: str | None = None, admin_token_file: str | None = None) -> None:
    location, listen = await lead(run, port_file, ready_line)  # a standby waits here while another leads
    # a SQLite ledger: this process alone serves it (for PostgreSQL the leadership lock did that)
    with sole_server_of(location if isinstance(location, str) else None):
        await _serve_ledger(run, location, listen, ready_line, port_file, dashboard_file, admin_token_file)


async def _serve_ledger(run: RunConfig, location: LedgerDB | str, listen: str, ready_line: bool,
                        port_file: str | None, dashboard_file: str | None, admin_token_file: str | None) -> None:
    run.coordinator.listen = listen
    config = model_config_for(run.model.source)
    n_layer = config.n_layer
    shape = model_shape(n_layer, config.n_embd, config.n_inner or 4 * config.n_embd, config.vocab_size)
    store = CheckpointStore(run.coordinator.store_root)
    stored = [(step, spec, f"{store.root}/step-{step:08d}/{store.file_name(spec)}")
              for step in store.steps() for spec in store.specs(step)]
    if max(run.pipeline.stage_counts) > n_layer:
        raise ValueError(f"pipeline.max_stages = {run.pipeline.max_stages} exceeds the model's {n_layer} layers; "
                         "use at most one stage per layer")
    ledger = RunLedger(location, run, plan_stages(n_layer, run.pipeline.num_stages),
                       stored=stored, shape=shape)
    dht, authority = None, None
    if run.pipeline.replicas_per_stage > 1:
        authority = DhtAuthority(run.coordinator.state_path, run.link.cert_days)
        dht = CoordinatorDHT(run.coordinator.listen, run.coordinator.state_path, authority.own_credentials(),
                             ledger.worker_dht_peers())
        log.info("hivemind DHT for replica averaging at %s (run members only)", ", ".join(dht.maddrs))
    # A SQLite ledger's log is copied back by a thread, not by commits on the event loop (wal_checkpoints.py).
    checkpoints = None if ledger.db.postgres else WalCheckpoints(ledger.path).start()
    try:
        await _serve_with(run, ledger, store, dht, authority, ready_line, port_file, dashboard_file,
                          admin_token_file)
    finally:
        if checkpoints is not None:
            checkpoints.stop()
        if dht is not None:
            dht.shutdown()


def _grpc_server(interceptors: list) -> grpc.aio.Server:
    # A bound on concurrent calls per connection: a client cannot open streams without end.
    # Calls gRPC has received but the event loop has not yet taken up wait in a backlog; past
    # its default 1,000 gRPC cancels new calls at random (CANCELLED, unseen by any handler).
    # When 10,000 workers join at once (a restart, a failover) the loop falls behind for a
    # minute: their heartbeats wait instead of failing (gptjt bench heartbeat).
    return grpc.aio.server(interceptors=interceptors,
                           options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 256),
                                    ("grpc.server.max_pending_requests", PENDING_CALLS),
                                    ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS)])


async def _serve_with(run: RunConfig, ledger: RunLedger, store: CheckpointStore,
                      dht: CoordinatorDHT | None, authority: DhtAuthority | None, ready_line: bool, port_file: str | None, dashboard_file: str | None,
                      admin_token_file: str | None) -> None:
    cfg = run.coordinator
    ca = RunCA(cfg.state_path, run.name, run.link.cert_days)
    service = CoordinatorService(ledger, store, dht.maddrs if dht is not None else [], ca=ca, dht_authority=authority)
    admin = AdminToken.load(cfg.state_path, admin_token_file)
    reader = ReadToken.load(cfg.state_path) if cfg.read_access == "token" else None
    guard = SessionGuard(ledger.session_valid, admin.valid, reader.valid if reader is not None else None)
    server = _grpc_server([MalformedRequests(), guard])
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    actions = OperatorActions(ledger, service, admin, ca)
    opb_grpc.add_OperatorServicer_to_server(OperatorService(actions), server)
    address = bind(server, run, cfg.listen)
    await server.start()
    relay = await start_relay(cfg.relay_listen, ledger) if cfg.relay_listen else None
    # The dashboard starts before the port file and ready line, so its URL file is there by then.
    dashboard = await start_operator_dashboard(run, ledger, actions, dashboard_file, reader)
    if ready_line:
        print(f"gptjt-coordinator: run {run.name!r} listening on {address} "
              f"({'TLS' if cfg.tls_cert else 'plaintext'}), step {ledger.step}/{run.train.steps}, "
              f"state {redacted(str(ledger.path))}", flush=True)
    if ready_line and relay is not None:
        print(f"gptjt-coordinator: relay for workers behind NAT on {cfg.relay_listen.rsplit(':', 1)[0]}:{relay.port} "
              "(gptjt-worker --relay HOST:PORT)", flush=True)
    if ready_line and dashboard is not None:
        reading = f"reading needs the read token in {reader.where}; " if reader is not None else ""
        print(f"gptjt-coordinator: dashboard at {dashboard.url} (read-only; {reading}admin actions need the admin "
              f"token in {actions.admin.where})" + (f"; WARNING: {dashboard.exposure}" if dashboard.exposure else ""),
              flush=True)
    if port_file:  # last: whoever waits for the file finds the lines above already written
        Path(port_file).write_text(address)
    reaper = asyncio.create_task(service.reap_forever())
    collector = asyncio.create_task(collect_on_the_clock())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    leadership = asyncio.create_task(watch_leadership(ledger.db, stop.set)) if ledger.db.postgres else None
    await stop.wait()
    if leadership is not None and leadership.done():
        raise LedgerError("the ledger database connection broke; this coordinator stopped so that a standby leads")
    if leadership is not None:
        leadership.cancel()
    log.info("shutting down")
    service.stopping = True  # before the server closes the workers' streams (server.py _probe_after_disconnect)
    reaper.cancel()
    collector.cancel()
    if dashboard is not None:
        await dashboard.stop()
    if relay is not None:
        await relay.close()
    await server.stop(grace=1.0)
    service.statuses.close()


async def start_relay(listen: str, ledger: RunLedger):
    """The relay for workers that cannot accept connections (coordinator/relay.py) on
    coordinator.relay_listen; a join token opens it."""
    from .relay import Relay

    host, _, port = listen.rpartition(":")
    relay = Relay(host.strip("[]"), int(port), ledger.check_token)
    try:
        await relay.start()
    except OSError as e:
        raise RuntimeError(f"cannot serve the relay on {listen} ({e.strerror or e}); choose another "
                           "coordinator.relay_listen, or '' for none") from None
    return relay


async def start_operator_dashboard(run: RunConfig, ledger: RunLedger, actions: OperatorActions,
                                   url_file: str | None = None, reader: ReadToken | None = None):
    """The dashboard on coordinator.dashboard_host:dashboard_port (-1: none), on this event loop;
    HTTPS with the API's certificate when the run has one; reading behind `reader` when given."""
    from .dashboard import start_dashboard

    cfg = run.coordinator
    if cfg.dashboard_port < 0:
        return None
    try:
        dashboard = await start_dashboard(cfg.dashboard_host, cfg.dashboard_port, ledger, actions,
                                          (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None, reader)
    except OSError as e:
        raise RuntimeError(f"cannot serve the dashboard on {cfg.dashboard_host}:{cfg.dashboard_port} "
                           f"({e.strerror or e}); choose another --dashboard-host or --dashboard-port "
                           "(0 = any free port, -1 = none)") from None
    if dashboard.exposure:
        log.warning("!!! %s !!!", dashboard.exposure)
    if url_file:
        Path(url_file).write_text(dashboard.url)
    return dashboard


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gptjt-coordinator", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="run config TOML (default: the embedded tiny demo run)")
    ap.add_argument("--listen", help="override coordinator.listen (host:port; port 0 = any free port)")
    ap.add_argument("--state", help="override coordinator.state_path (the SQLite ledger)")
    ap.add_argument("--steps", type=int, help="override train.steps (e.g. to extend a run)")
    ap.add_argument("--store", help="override coordinator.checkpoint_store (directory or fsspec URL)")
    ap.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every (steps)")
    ap.add_argument("--port-file", help="write the bound host:port here once listening")
    ap.add_argument("--dashboard-host", metavar="HOST",
                    help="override coordinator.dashboard_host (the dashboard's bind address; default 127.0.0.1)")
    ap.add_argument("--dashboard-port", type=int, metavar="PORT",
                    help="override coordinator.dashboard_port (HTTP dashboard; 0 = any free port, -1 = none)")
    ap.add_argument("--dashboard-file", help="write the dashboard's URL here once serving")
    ap.add_argument("--admin-token-file", help="the admin token for drain/pause/tokens (default: $GPTJT_ADMIN_TOKEN, "
                    "else STATE.admin-token beside the ledger, created on first start)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run = load_run_config(args.config) if args.config else tiny_demo_config()
        if args.listen:
            run.coordinator.listen = args.listen
        if args.state:
            run.coordinator.state_path = args.state
        if args.store:
            run.coordinator.checkpoint_store = args.store
        if args.dashboard_host is not None:
            run.coordinator.dashboard_host = args.dashboard_host
        if args.dashboard_port is not None:
            run.coordinator.dashboard_port = args.dashboard_port
        if args.dashboard_host is not None or args.dashboard_port is not None:
            run.coordinator.__post_init__()  # the dashboard's host and port range
        if args.checkpoint_every is not None:
            run.train.checkpoint_every = args.checkpoint_every
        if args.steps is not None:
            if args.steps < 1:
                raise ConfigError(f"--steps {args.steps} must be >= 1")
            run.train.steps = args.steps
            run.optim.warmup_steps = min(run.optim.warmup_steps, args.steps)
        import uvloop

        uvloop.run(serve(run, port_file=args.port_file, dashboard_file=args.dashboard_file,
                         admin_token_file=args.admin_token_file))
    except (ConfigError, LedgerError, ValueError, RuntimeError, FileNotFoundError, ConnectionError) as e:
        print(f"gptjt-coordinator: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
