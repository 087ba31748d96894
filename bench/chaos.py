"""bench chaos: seeded chaos soaks of a 2 x 2 loopback swarm (local_swarm/chaos.py) against a calm run.

Each soak runs the same short run while faults arrive one after another at random moments
(SIGKILL of a worker, of both replicas of a stage, of the coordinator which is restarted;
SIGSTOP past the heartbeat timeout; SIGKILL inside an averaging round; a worker dying
mid-upload of a checkpoint). A soak is completed when the run finishes with every
micro-batch counted exactly once, finite losses, no crashed worker and no orphaned process.

faults_survived: faults injected over the completed soaks; wall_vs_calm: median wall time of a
soak over the calm run's (same settings, no faults), each from its first step to the end, not
counting the time a soak held ticket issue while its replacement workers loaded (held_s: each
fault that kills a worker starts one; local_swarm/replacement_hold.py says why).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path

from bench.swarm_run import keep_workdir
from local_swarm.chaos import ChaosSettings, ChaosSoak

DESCRIPTION = "seeded chaos soaks of a 2 x 2 swarm: runs completed, tickets lost/double, wall time vs a calm run"


def _soak(seed: int, settings: dict, calm: bool = False):
    """One soak in a temporary directory; a failed soak's directory (every process's log, the
    ledger, the store) is kept in the system's temp folder, named in the result's `kept`: a crash
    seen once in a quick run did not come back in three runs of its seed, and its report held only
    the first line of the error."""
    with tempfile.TemporaryDirectory(prefix="gptjt-chaos-") as tmp:
        soak = ChaosSoak(Path(tmp), ChaosSettings(seed=seed, **settings))
        try:
            result = soak.run(calm=calm)
        finally:
            soak.close()
        if not result.ok:
            result.kept = str(keep_workdir(Path(tmp), f"gptjt-chaos-failed-seed{seed}-"))
        return result


def _soak_settings(quick: bool) -> dict:
    return {"steps": 9, "checkpoint_every": 3, "gap_s": (5.0, 9.0), "max_faults": 6, "timeout_s": 400.0} \
        if quick else {"steps": 15, "checkpoint_every": 3, "gap_s": (5.0, 10.0), "timeout_s": 900.0}


def settings(quick: bool) -> dict:
    """Every setting a soak ran with, the defaults of ChaosSettings included (the hold's among
    them), so that a result says what it measured when the defaults change."""
    effective = dataclasses.asdict(ChaosSettings(**_soak_settings(quick)))
    del effective["seed"]  # one per soak: "seeds"
    return {"seeds": [1, 2] if quick else list(range(1, 11)),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in effective.items()}}


def run(quick: bool = False) -> dict:
    seeds = [1, 2] if quick else list(range(1, 11))
    soak = _soak_settings(quick)
    calm = _soak(0, soak, calm=True)
    results = [_soak(seed, soak) for seed in seeds]
    completed = [r for r in results if r.ok]
    kinds: dict[str, int] = {}
    for r in results:
        for f in r.faults:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return {
        "runs_attempted": len(results), "runs_completed": len(completed),
        "faults_survived": sum(len(r.faults) for r in completed), "faults_by_kind": kinds,
        "tickets_lost": sum(r.tickets_lost for r in results), "tickets_double": sum(r.tickets_double for r in results),
        "steps_rerun": sum(r.steps_rerun for r in results),
        "crashes": sum(len(r.crashes) for r in results), "orphans": sum(len(r.orphans) for r in results),
        "wall_vs_calm": statistics.median(r.wall_s for r in completed) / calm.wall_s if completed and calm.ok
        else None,
        "calm_wall_s": round(calm.wall_s, 1), "soak_wall_s": [round(r.wall_s, 1) for r in results],
        "soak_held_s": [round(r.held_s, 1) for r in results],
        # the end of a crash's text: a worker's log tail ends with the error and its traceback
        "failures": [f"seed {r.seed} (logs kept in {r.kept}): "
                     f"{(r.failure or '; '.join(r.crashes) or r.orphans or r.violations)}"[-1500:]
                     for r in results if not r.ok],
        "seeds": seeds, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in soak.items()},
    }
