"""`gptjt bench NAME [--quick] [--json] [--results PATH]`: run a benchmark, print its figures, record them."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from bench import results as results_file

# name -> module under bench/; each module defines DESCRIPTION and run(quick: bool) -> dict, and
# settings(quick: bool) -> dict (what the run is set to; else run()'s "settings" key is taken).
BENCHMARKS = {
    "local": "bench.local",
    "gpu-block": "bench.gpu_block",
    "gpu-swarm": "bench.gpu_swarm",
    "swarm": "bench.swarm",
    "recovery": "bench.recovery",
    "codec": "bench.codec",
    "link": "bench.link",
    "gradsync": "bench.gradsync",
    "scheduler": "bench.scheduler",
    "status": "bench.status",
    "chaos": "bench.chaos",
    "heartbeat": "bench.heartbeat",
    "verify-calibration": "bench.verify_calibration",
    "verify": "bench.verify",
    "nat": "bench.nat",
    "costmodel": "bench.costmodel",
    "churn": "bench.churn",
    "churn-sweep": "bench.churn_sweep",
}


class BenchmarkUnavailable(RuntimeError):
    """The benchmark needs hardware this machine lacks (e.g. a CUDA GPU)."""


def run_benchmark(name: str, quick: bool) -> dict:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).run(quick=quick)


def benchmark_settings(name: str, quick: bool, figures: dict | None) -> dict:
    module = importlib.import_module(BENCHMARKS[name])
    if hasattr(module, "settings"):
        return module.settings(quick)
    return dict((figures or {}).get("settings") or {})


def _run_one(name: str, args: argparse.Namespace, results: Path | None) -> tuple[dict, bool]:
    """Run one benchmark, record it in `results` (if any); (what to print, whether it failed).
    A crash is recorded as failed (the file must not go on showing older figures as if they were
    the latest run's); `all` then goes on with the next benchmark, one benchmark re-raises."""
    # date, commit and machine as the run starts: a commit made while it runs did not produce it
    stamp = results_file.stamp_now(results) if results is not None else None
    started, load_before = time.monotonic(), results_file.load_avg()
    figures = skipped = failed = error = None
    try:
        figures = run_benchmark(name, args.quick)
    except BenchmarkUnavailable as e:
        if args.name != "all" and results is None:
            raise
        skipped = str(e)
    except Exception as e:
        if args.name != "all" and results is None:
            raise
        failed, error = f"{type(e).__name__}: {e}"[:2000], e
    wall = time.monotonic() - started
    if results is not None:
        entry = results_file.make_entry(name, args.quick, figures=figures, skipped=skipped, failed=failed,
                                        settings=benchmark_settings(name, args.quick, figures), wall_s=wall,
                                        stamp=stamp, load=[load_before, results_file.load_avg()])
        results_file.record(results, entry, stamp)
    if error is not None and args.name != "all":
        raise error
    if figures is not None:
        return figures, False
    return {"benchmark": name, "skipped": skipped} if skipped else {"benchmark": name, "failed": failed}, bool(failed)


def cmd_bench(args: argparse.Namespace) -> int:
    names = sorted(BENCHMARKS) if args.name == "all" else [args.name]
    results = args.results if args.results is not None else (
        results_file.DEFAULT_PATH if args.name == "all" else None)
    failures = []
    for name in names:
        result, failed = _run_one(name, args, results)
        if failed:
            failures.append(name)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"== bench {name}")
            for key, value in result.items():
                print(f"  {key:32s} {value}")
    if results is not None:
        print(f"figures recorded in {results}; `python -m bench.render` puts them in the READMEs", file=sys.stderr)
    if failures:
        print(f"gptjt bench: failed: {', '.join(failures)} (recorded as failed)", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print its figures")
    p.add_argument("name", choices=sorted(BENCHMARKS) + ["all"], help="benchmark to run")
    p.add_argument("--quick", action="store_true", help="short version (under a minute on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object per benchmark")
    p.add_argument("--results", type=Path, default=None, metavar="PATH",
                   help="merge the figures into this results file, replacing each benchmark's old entry "
                        f"(`all` writes {results_file.DEFAULT_PATH.relative_to(results_file.REPO)} unless given)")
    p.set_defaults(func=cmd_bench)
