"""`gptjt-worker --join HOST:PORT`: volunteer this machine to a run. Only local knobs here."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time

from .membership import JoinRefused
from .options import WorkerOptions
from .runner import WorkerRunner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gptjt-worker", description=__doc__.splitlines()[0])
    ap.add_argument("--join", required=True, metavar="HOST:PORT[,HOST:PORT]",
                    help="the coordinator's address; with a standby coordinator (coordinator.ledger_url), every "
                         "coordinator's, comma-separated: the worker moves to whichever one leads")
    ap.add_argument("--token", default=os.environ.get("GPTJT_TOKEN", ""),
                    help="run token from the operator (default: $GPTJT_TOKEN)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    ap.add_argument("--listen", default="127.0.0.1:0",
                    help="host:port to serve the stage API on (default 127.0.0.1, any free port)")
    ap.add_argument("--announce", default="", help="host:port other workers reach this one at (default: --listen)")
    ap.add_argument("--relay", default="", metavar="HOST:PORT",
                    help="the run's relay: used when the relay cannot reach this worker (behind NAT)")
    ap.add_argument("--name", default="", help="label shown to the operator (default: the host name)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--drain-timeout", type=float, default=60.0,
                    help="seconds to finish the current step on SIGTERM before handing tickets back")
    ap.add_argument("--tls-ca", default="", help="PEM root certificate of a TLS coordinator")
    ap.add_argument("--simulate-device", default="", metavar="TFLOPS:MEMORY_GB",
                    help="tests and benchmarks only: report this device instead of probing, and compute at "
                         "its pace (e.g. 0.02:24)")
    ap.add_argument("--no-rejoin", action="store_true",
                    help="exit (status 75) when the coordinator declares this worker dead, instead of joining "
                         "again as a new worker")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    options = WorkerOptions(coordinator=args.join, token=args.token, device=args.device, listen=args.listen,
                            announce=args.announce, relay=args.relay, name=args.name, threads=args.threads,
                            drain_timeout_s=args.drain_timeout, tls_ca=args.tls_ca,
                            simulate_device=args.simulate_device)
    try:
        return _run_until_done(options, rejoin=not args.no_rejoin)
    except JoinRefused as e:
        print(f"gptjt-worker: error: {e}", file=sys.stderr)
        return 3
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"gptjt-worker: error: {e}", file=sys.stderr)
        return 2
    return 0


# Exit status of a worker the coordinator declared dead, with --no-rejoin (sysexits EX_TEMPFAIL:
# trying again later may work).
EXIT_DECLARED_DEAD = 75
REJOIN_DELAY_S = (2.0, 60.0)  # first and longest wait before joining again, in seconds
STABLE_S = 600.0  # a membership that lasted this long resets the delay


def _run_until_done(options: WorkerOptions, rejoin: bool) -> int:
    """Run the worker; when the coordinator declares it dead (a stall or a partition outlasted
    the heartbeat timeout) join again as a new worker, backing off if that keeps happening.
    Each membership is a fresh WorkerRunner: its stage, server and averager are rebuilt."""
    import uvloop

    delay = REJOIN_DELAY_S[0]
    while True:
        runner = WorkerRunner(options)
        started = time.monotonic()
        uvloop.run(runner.main())
        if runner.failed:
            return 1
        if not runner.declared_dead:
            return 0
        if not rejoin:
            return EXIT_DECLARED_DEAD
        if time.monotonic() - started > STABLE_S:
            delay = REJOIN_DELAY_S[0]
        print(f"gptjt-worker: {runner.worker_id} was declared dead by the coordinator; joining again in "
              f"{delay:.0f} s", flush=True)
        del runner  # free the old stage before the next one loads on the same device
        gc.collect()
        if options.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        time.sleep(delay)
        delay = min(2 * delay, REJOIN_DELAY_S[1])


if __name__ == "__main__":
    sys.exit(main())
