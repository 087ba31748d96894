"""`gptjt bench NAME [--quick] [--json]`: find the benchmark module, run it, print its figures."""

from __future__ import annotations

import argparse
import importlib
import json

# name -> module under bench/; each module defines DESCRIPTION and run(quick: bool) -> dict.
BENCHMARKS = {
    "local": "bench.local",
    "gpu-block": "bench.gpu_block",
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
}


class BenchmarkUnavailable(RuntimeError):
    """The benchmark needs hardware this machine lacks (e.g. a CUDA GPU)."""


def run_benchmark(name: str, quick: bool) -> dict:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).run(quick=quick)


def cmd_bench(args: argparse.Namespace) -> int:
    names = sorted(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        try:
            result = run_benchmark(name, args.quick)
        except BenchmarkUnavailable as e:
            if args.name != "all":
                raise
            result = {"benchmark": name, "skipped": str(e)}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"== bench {name}")
            for key, value in result.items():
                print(f"  {key:32s} {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print its figures")
    p.add_argument("name", choices=sorted(BENCHMARKS) + ["all"], help="benchmark to run")
    p.add_argument("--quick", action="store_true", help="short version (under a minute on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object per benchmark")
    p.set_defaults(func=cmd_bench)
