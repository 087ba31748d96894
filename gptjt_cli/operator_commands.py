"""Operator commands: status | workers | stages | tickets | events | token | drain | lift | pause | resume.

Each reads or changes a running coordinator through its gRPC API; `--json` prints one JSON
object (schemas in docs/cli.md); exit codes are in operator_client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from gptjt_proto import operator_pb2 as opb

from . import tables
from .operator_client import (ADMIN_TOKEN_ENV, COORDINATOR_ENV, READ_TOKEN_ENV, BadArgument, CommandError, Unreachable,
                              admin_token, call_operator, call_status, read_metadata, read_token)

VIEWS = {"workers": tables.workers_table, "stages": tables.stages_table, "tickets": tables.tickets_table}


def _coordinator(args: argparse.Namespace) -> str:
    if not args.coordinator:
        raise BadArgument(f"which coordinator? pass --coordinator HOST:PORT or set ${COORDINATOR_ENV}")
    return args.coordinator


def _print_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# -- reading -------------------------------------------------------------------------------
def _reader(args: argparse.Namespace) -> tuple:
    """The read call's metadata: --read-token / $GPTJT_READ_TOKEN, else the admin token (it reads too)."""
    return read_metadata(read_token(args.read_token), admin_token(args.admin_token))


def _show(s: dict, view: str) -> None:
    out = tables.console()
    if view == "status":
        out.print(tables.summary(s))
        for table in (tables.stages_table(s), tables.workers_table(s), tables.tickets_table(s)):
            out.print()
            out.print(table)
    else:
        out.print(VIEWS[view](s))


def cmd_status(args: argparse.Namespace) -> int:
    address, view = _coordinator(args), args.view
    watch = getattr(args, "watch", None)
    reader = _reader(args)
    shown, s = 0, call_status(address, args.tls_ca, metadata=reader)  # the first failure is the exit code
    while True:
        if args.json:
            _print_json(s if view == "status" else {view: s[view]})
        else:
            if watch and sys.stdout.isatty():
                tables.console().clear()
            _show(s, view)
            if watch:
                print(flush=True)
        shown += 1
        if not watch or (args.count and shown >= args.count):
            return 0
        try:
            time.sleep(watch)
            s = call_status(address, args.tls_ca, metadata=reader)
        except Unreachable as e:  # keep watching through a coordinator restart
            print(f"gptjt status: {e}; retrying", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            return 0


def cmd_events(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise BadArgument(f"--limit {args.limit} must be >= 1")
    request = opb.EventsRequest(after_id=args.after_id, limit=args.limit, kind=args.kind)
    reply = call_operator(_coordinator(args), "Events", request, args.tls_ca, metadata=_reader(args))
    if args.json:
        _print_json(reply)
    else:
        tables.console().print(tables.events_table(reply["events"]))
    return 0


# -- admin ---------------------------------------------------------------------------------
def _admin(args: argparse.Namespace, method: str, request) -> dict:
    return call_operator(_coordinator(args), method, request, args.tls_ca)


def cmd_drain(args: argparse.Namespace) -> int:
    r = _admin(args, "Drain", opb.DrainRequest(admin_token=admin_token(args.admin_token), worker=args.worker))
    if args.json:
        _print_json(r)
    else:
        again = " (it was already asked)" if r["already_requested"] else ""
        print(f"asked worker {r['worker']} ({r['name']}) to drain{again}: it finishes the current step, hands back "
              "its tickets and leaves")
        if r["warning"]:
            print(f"warning: {r['warning']}", file=sys.stderr)
    return 0


def cmd_lift(args: argparse.Namespace) -> int:
    r = _admin(args, "LiftQuarantine", opb.LiftQuarantineRequest(admin_token=admin_token(args.admin_token),
                                                                 worker=args.worker))
    if args.json:
        _print_json(r)
    else:
        print(f"lifted the quarantine of worker {r['worker']} ({r['name']}): a join under that name is taken again")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    paused = args.command == "pause"
    r = _admin(args, "SetPaused", opb.PauseRequest(admin_token=admin_token(args.admin_token), paused=paused))
    if args.json:
        _print_json(r)
    else:
        state = "paused" if paused else "resumed"
        print(f"ticket issue {state} at step {r['step']}" if r["changed"] else f"ticket issue was already {state}")
    return 0


def _ledger_path(args: argparse.Namespace) -> str:
    if args.state:
        return args.state
    from gptjt_core.config import load_run_config, tiny_demo_config

    cfg = (load_run_config(args.config) if args.config else tiny_demo_config()).coordinator
    return cfg.ledger_url or cfg.state_path  # a ledger in PostgreSQL is written there, beside the coordinator


def _through_coordinator(args: argparse.Namespace) -> bool:
    """Token commands go to the ledger file when --config/--state is given, else to the coordinator."""
    return bool(args.coordinator) and not (args.config or args.state)


def cmd_token_create(args: argparse.Namespace) -> int:
    if _through_coordinator(args):
        r = _admin(args, "CreateToken", opb.CreateTokenRequest(admin_token=admin_token(args.admin_token)))
    else:  # straight into the ledger file: works before the coordinator starts, or beside it (WAL)
        from coordinator.ledger import create_token_in, token_id

        token = create_token_in(_ledger_path(args))
        r = {"token": token, "id": token_id(token)}
    if args.json:
        _print_json(r)
    else:
        print(r["token"])  # only the token: scripts capture it (`TOKEN=$(gptjt token create ...)`)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if _through_coordinator(args):
        r = _admin(args, "RevokeToken", opb.RevokeTokenRequest(admin_token=admin_token(args.admin_token),
                                                               token=args.token, end_sessions=args.end_sessions))
    else:
        if args.end_sessions:
            raise BadArgument("--end-sessions needs the running coordinator (--coordinator HOST:PORT): it ends the "
                              "sessions of live workers")
        from coordinator.ledger import OperatorError, revoke_token_in

        try:
            r = revoke_token_in(_ledger_path(args), args.token)
        except OperatorError as e:
            raise BadArgument(str(e)) from None
    if args.json:
        _print_json(r)
    else:
        print(f"join token {r['id']} {'was already' if r['already_revoked'] else 'is now'} revoked"
              + (f"; ended the sessions of {', '.join(r['sessions_ended'])}" if r.get("sessions_ended") else ""))
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens = call_status(_coordinator(args), args.tls_ca, metadata=_reader(args))["join_tokens"]
    if args.json:
        _print_json({"join_tokens": tokens})
    else:
        tables.console().print(tables.tokens_table(tokens))
    return 0


# -- the parser ----------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
    default = os.environ.get(COORDINATOR_ENV)
    p.add_argument("--coordinator", metavar="HOST:PORT", default=default,
                   help=f"the coordinator's gRPC address (default: ${COORDINATOR_ENV})"
                   + ("" if required else "; without it, the ledger file of --config/--state is used"))
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")
    p.add_argument("--tls-ca", default="", help="PEM root certificate of a TLS coordinator")


def _admin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-token", help=f"the run's admin token (default: ${ADMIN_TOKEN_ENV})")


def _read_flags(p: argparse.ArgumentParser) -> None:
    """A read command's credentials, for a coordinator with read_access = "token"."""
    p.add_argument("--read-token", help=f"the run's read token, where reading needs one (default: ${READ_TOKEN_ENV})")
    p.add_argument("--admin-token", help=f"the admin token reads too; sent only without a read token "
                   f"(default: ${ADMIN_TOKEN_ENV})")


def _watch_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--watch {text}: the interval must be > 0 seconds")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    for view, help_text in [("status", "run overview: step, loss, tokens/s, ETA, stages, workers, tickets"),
                            ("workers", "the workers table"), ("stages", "the stage map (layers, replicas)"),
                            ("tickets", "the ticket ledger counters")]:
        p = sub.add_parser(view, help=help_text)
        _common(p)
        _read_flags(p)
        if view == "status":
            p.add_argument("--watch", nargs="?", const=2.0, type=_watch_seconds, metavar="SECONDS",
                           help="refresh every SECONDS (default 2) until interrupted; with --json, one object a line")
            p.add_argument("--count", type=int, default=0, help="with --watch: stop after this many updates")
        p.set_defaults(func=cmd_status, view=view)

    p = sub.add_parser("events", help="the event log: joins, leaves, deaths, re-plans, checkpoints, rejected updates")
    _common(p)
    _read_flags(p)
    p.add_argument("--limit", type=int, default=50, help="the newest N events (default 50)")
    p.add_argument("--kind", default="", help="one kind (e.g. worker_dead) or category (joins, leaves, deaths, "
                   "replans, recovery, checkpoints, rejected, steps, operator, workers, other)")
    p.add_argument("--after-id", type=int, default=0, help="only events after this id (to follow the log)")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("drain", help="ask a worker to finish the current step and leave (admin)")
    p.add_argument("worker", help="worker id (or a name only one live worker has)")
    _common(p)
    _admin_flag(p)
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("lift", help="lift the quarantine of a worker spot checks out-voted (admin)")
    p.add_argument("worker", help="the quarantined worker's id (`gptjt events --kind verification` names it)")
    _common(p)
    _admin_flag(p)
    p.set_defaults(func=cmd_lift)
    for name, help_text in [("pause", "stop issuing micro-batch tickets (admin); leased ones still finish"),
                            ("resume", "issue tickets again (admin)")]:
        p = sub.add_parser(name, help=help_text)
        _common(p)
        _admin_flag(p)
        p.set_defaults(func=cmd_pause)

    p = sub.add_parser("token", help="join tokens: create, revoke, list")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="create a join token and print it (stored hashed in the ledger)")
    _common(c, required=False)
    _admin_flag(c)
    c.add_argument("--config", help="run config TOML (its coordinator.state_path is the ledger)")
    c.add_argument("--state", help="the ledger file directly")
    c.set_defaults(func=cmd_token_create)
    r = tsub.add_parser("revoke", help="revoke a join token: later joins with it are refused")
    r.add_argument("token", help="the token id (from `gptjt token list`) or the token itself")
    _common(r, required=False)
    _admin_flag(r)
    r.add_argument("--config", help="run config TOML (its coordinator.state_path is the ledger)")
    r.add_argument("--state", help="the ledger file directly")
    r.add_argument("--end-sessions", action="store_true",
                   help="also end the sessions of the live workers this token admitted (they leave the run)")
    r.set_defaults(func=cmd_token_revoke)
    ls = tsub.add_parser("list", help="the run's join tokens (ids, created, revoked)")
    _common(ls)
    _read_flags(ls)
    ls.set_defaults(func=cmd_token_list)


__all__ = ["register", "CommandError"]
