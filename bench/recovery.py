"""bench recovery: how long a 2 stages x 2 replicas swarm on loopback needs to close its next
step after a replica is SIGKILLed mid-forward, and whether any micro-batch was lost or
counted twice.

recovery_s runs from the SIGKILL to the close of the first step that was not yet closed when
it landed. The heartbeat timeout is 10 s (as in PRIME), so a figure well below it shows that
the dead replica was found through its neighbours' reports and the coordinator's probe. A
replacement worker joins after each kill, so every kill meets a full 2 x 2 swarm.
"""

from __future__ import annotations

import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.swarm_run import keep_workdir
from local_swarm import LocalSwarm, SwarmFailed, small_run_toml

DESCRIPTION = "seconds from SIGKILL of a replica to the next closed step (2 x 2 swarm); tickets lost/double"

AVERAGING = """
[averaging]
compression = "none"
matchmaking_s = 1.0
timeout_s = 10.0
"""


def settings(quick: bool) -> dict:
    return {"kills": 1 if quick else 3, "stages": 2, "replicas_per_stage": 2, "global_batch": 8, "micro_batch": 2,
            "seq_len": 64, "heartbeat_timeout_s": 10.0, "averaging_compression": "none"}


def run(quick: bool = False) -> dict:
    kills = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # 8 x 64 tokens per step as 4 micro-batches, so both replicas of each stage get work
        config = small_run_toml(tmp, steps=4 + 4 * kills, global_batch=8, micro_batch=2, seq_len=64,
                                timeout_s=10.0, interval_s=1.0, replicas_per_stage=2, start_with_replicas=2,
                                extra=AVERAGING)
        swarm = LocalSwarm(tmp, config, state=tmp / "run.db")
        recoveries = []
        try:
            swarm.start_coordinator(steps=4 + 4 * kills, listen="127.0.0.1:0")
            procs = {f"w{i}": swarm.start_worker(f"w{i}") for i in range(4)}
            status = swarm.wait(lambda s: s["step"] >= 2, 300, "two steps", poll_s=0.05)
            for k in range(kills):
                # mid-forward: the step is open and micro-batches are moving
                status = swarm.wait(lambda s: s["phase"] == "open" and s["tickets"]["leased"] > 0, 120,
                                    "an open step with micro-batches in flight", poll_s=0.05)
                by_name = {w["name"]: w for w in status["workers"] if w["state"] not in ("dead", "left")}
                victim = next(n for n, w in by_name.items() if w["stage"] == 1)
                open_step = status["step"]
                t_kill = time.monotonic()
                swarm.kill(procs[victim], signal.SIGKILL)
                swarm.wait(lambda s, step=open_step: s["step"] > step, 120, "step close after the kill", poll_s=0.05)
                recoveries.append(time.monotonic() - t_kill)
                name = f"replacement{k}"
                procs[name] = swarm.start_worker(name)
                # until the replacement takes part in a step: killing the other replica of its stage
                # before that would be killing the stage's last holder (a rollback, not this bench)
                swarm.wait(lambda s, n=name: any(w["name"] == n and w["id"] in s["stages"][w["stage"]]["members"]
                                                 for w in s["workers"] if w["stage"] >= 0),
                           120, f"{name} taking part in a step", poll_s=0.05)
            status = swarm.wait(lambda s: s["phase"] == "done", 600, "the run to finish", poll_s=0.05)
        except SwarmFailed:
            swarm.stop()
            kept = keep_workdir(Path(tmp), "gptjt-bench-recovery-")
            raise RuntimeError(f"bench recovery failed; the run's logs and ledger are kept in {kept}") from None
        finally:
            swarm.stop()
    tickets = status["tickets"]
    return {"recovery_s": statistics.median(recoveries), "recovery_s_max": max(recoveries), "kills": kills,
            "tickets_lost": tickets["lost"], "tickets_double": tickets["double"],
            "detected_by_peer_report": status["event_counts"].get("worker_unreachable", 0),
            "steps_closed": len(status["history"]), "heartbeat_timeout_s": 10.0}
