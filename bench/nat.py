"""bench nat: the same 2-stage swarm with its stage-1 worker behind NAT, relayed vs directly reachable.

local_swarm/nat_lab.py builds the namespaces: coordinator (with the relay) and stage 0 on the
public side, stage 1 in a home network behind a masquerading router. Relayed: no route into
the home network, so the home worker serves through the coordinator's relay (every activation
and gradient crosses the relay's process twice: in on one TCP connection, out on another).
Direct: the public side has a route in, the relay's check finds the worker reachable, and it
serves directly. Both run the same tiny-model run (fp32 activations and gradients, 2 micro-
batches of 2 x 64 tokens a step) on veth links at memory speed.

relayed_vs_direct_tokens_per_s  tokens/s relayed over tokens/s direct, each the median over its
                   runs of (tokens of the steps after the first) / (their seconds); runs in the
                   order relayed, direct (--quick) or relayed, direct, direct, relayed.
relayed_step_s / direct_step_s  the median step time of each.
Needs root and iptables (BenchmarkUnavailable otherwise).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.registry import BenchmarkUnavailable
from local_swarm.nat_lab import NatLab, NatSwarm

DESCRIPTION = "a stage behind NAT served through the coordinator's relay, against the same worker reachable directly"


def _one(workdir: Path, direct: bool, steps: int) -> dict:
    with NatLab(direct=direct) as lab:
        swarm = NatSwarm(lab, workdir, steps=steps)
        try:
            swarm.start()
            status = swarm.wait_done(600)
        finally:
            swarm.close()
    home = (workdir / "worker-home.log").read_text()
    relayed = "serving through the relay as" in home
    if relayed == direct:
        raise RuntimeError(f"the home worker was {'relayed' if relayed else 'direct'} in a "
                           f"{'direct' if direct else 'relayed'} run:\n{home[-2000:]}")
    later = status["history"][1:]
    seconds = [h["seconds"] for h in later]
    return {"tokens_per_s": sum(h["tokens"] for h in later) / sum(seconds), "step_s": statistics.median(seconds)}


def settings(quick: bool) -> dict:
    return {"steps": 6 if quick else 12, "order": "relayed, direct" if quick else "relayed, direct, direct, relayed",
            "stages": 2, "links": "veth pairs in network namespaces, home behind a masquerading router"}


def run(quick: bool = False) -> dict:
    why = NatLab.unavailable()
    if why:
        raise BenchmarkUnavailable(f"bench nat {why}")
    steps = 6 if quick else 12
    order = [False, True] if quick else [False, True, True, False]  # direct?
    with tempfile.TemporaryDirectory(prefix="gptjt-bench-nat-") as tmp:
        runs = [(direct, _one(Path(tmp) / f"run{i}", direct, steps)) for i, direct in enumerate(order)]
    relayed = [r for d, r in runs if not d]
    direct = [r for d, r in runs if d]
    relayed_tps = statistics.median(r["tokens_per_s"] for r in relayed)
    direct_tps = statistics.median(r["tokens_per_s"] for r in direct)
    return {"benchmark": "nat", "quick": quick, "steps": steps,
            "relayed_vs_direct_tokens_per_s": round(relayed_tps / direct_tps, 3),
            "relayed_tokens_per_s": round(relayed_tps, 1), "direct_tokens_per_s": round(direct_tps, 1),
            "relayed_step_s": round(statistics.median(r["step_s"] for r in relayed), 3),
            "direct_step_s": round(statistics.median(r["step_s"] for r in direct), 3),
            "runs": [{"direct": d, **{k: round(v, 3) for k, v in r.items()}} for d, r in runs]}
