"""A seeded chaos soak: faults one after another, at random moments, over a real 2 x 2 swarm, until the run ends.

What an operator of a volunteer run sees, compressed into minutes. The seed fixes the order of
fault kinds, their targets and the gaps between them; when each lands in the step protocol
depends on the machine, which is the point. Fault kinds:

  kill_worker          SIGKILL one worker; a replacement joins
  kill_stage           SIGKILL every replica of one stage (restore from the store or roll
                       back); as many replacements join
  restart_coordinator  SIGKILL the coordinator, restart it with the same config and ledger
                       on the same address; its DHT and daemons must not outlive it
  stop_worker          SIGSTOP a worker past the heartbeat timeout, then SIGCONT: it must
                       leave or re-join cleanly, never as the ghost of its old id
  kill_averaging       SIGKILL a member replica while the step is in AVERAGING
  kill_checkpoint      every worker is armed with die-checkpoint at one checkpoint step (one
                       process only, worker/faults.py): the writer dies mid-upload

The run must finish; the exactly-once audit must hold; every step's loss must be finite; no
worker may exit on its own (a crash) and no process of a killed coordinator may survive it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .process import SwarmProcess
from .replacement_hold import ReplacementHold
from .run_toml import small_run_toml
from .swarm import LocalSwarm, SwarmFailed

FAULT_KINDS = ("kill_worker", "kill_stage", "restart_coordinator", "stop_worker", "kill_averaging")
ARMED_KINDS = ("kill_checkpoint",)  # injected by the workers themselves at a seeded step

AVERAGING = """
[averaging]
compression = "none"
timeout_s = 10.0
matchmaking_s = 1.0
"""


@dataclass
class ChaosSettings:
    """One soak: the run, the faults and how often they come."""

    seed: int = 0
    steps: int = 12
    """Optimizer steps of the run (2 stages x 2 replicas, 4 micro-batches of 2 x 32 tokens a step)."""
    checkpoint_every: int = 3
    gap_s: tuple[float, float] = (4.0, 8.0)
    """Seconds between two faults: uniform in this range."""
    fault_every_steps: int = 0
    """A fault is also due once the run has closed this many steps since the last one (0: by time
    only). On a fast machine a short run can end between two timed faults; this keeps the number of
    faults a short soak sees independent of the machine's speed."""
    stop_s: float = 5.0
    """How long a SIGSTOPped worker stays frozen (past heartbeat_timeout_s, so it is declared dead)."""
    heartbeat_timeout_s: float = 3.0
    kinds: tuple[str, ...] = FAULT_KINDS
    armed: tuple[str, ...] = ARMED_KINDS
    max_faults: int = 1000
    """Stop injecting after this many (the run then finishes calmly)."""
    timeout_s: float = 300.0
    """The run must be done within this many seconds of its first step (not counting holds)."""
    hold_for_replacements: bool = True
    """Pause ticket issue while the replacements the soak started are loading, and inject nothing
    until they have (local_swarm/replacement_hold.py says why)."""
    after_hold_s: tuple[float, float] = (0.5, 3.0)
    """Seconds from the end of a hold to the next fault: uniform in this range (the hold already
    spaced the faults; the draw lands the next one anywhere in a step)."""
    hold_limit_s: float = 240.0
    """A replacement that has not loaded this long after a hold began fails the soak."""


@dataclass
class FaultRecord:
    """One fault the soak injected: when, what, whom, and where the step stood."""
    at_s: float  # since the soak's first step
    kind: str
    targets: list[str]
    step: int
    phase: str


@dataclass
class ChaosResult:
    """What one soak found."""
    seed: int
    completed: bool = False
    failure: str = ""
    wall_s: float = 0.0
    faults: list[FaultRecord] = field(default_factory=list)
    steps_closed: int = 0
    steps_rerun: int = 0
    """Closed steps undone by rollbacks and run again."""
    tickets_lost: int = 0
    tickets_double: int = 0
    violations: list[str] = field(default_factory=list)
    losses_finite: bool = True
    crashes: list[str] = field(default_factory=list)
    """Workers that exited by themselves, with the end of their log."""
    orphans: list[str] = field(default_factory=list)
    """Processes of a killed coordinator still alive 5 s after it died."""
    address: str = ""
    held_s: float = 0.0
    """Seconds the soak held ticket issue while replacements loaded (not in wall_s)."""
    kept: str = ""
    """Where a failed soak's directory (logs, ledger, store) was copied to outlive it; "" if not."""

    @property
    def ok(self) -> bool:
        return (self.completed and not self.failure and self.tickets_lost == 0 and self.tickets_double == 0
                and not self.violations and self.losses_finite and not self.crashes and not self.orphans)


def chaos_config(workdir: Path, settings: ChaosSettings) -> Path:
    # The cost-model planner (the product's default) re-plans on joins, deaths and measurements:
    # layer ranges move under the faults, as they do in a volunteer run.
    return small_run_toml(workdir, steps=settings.steps, global_batch=8, micro_batch=2, seq_len=32,
                          timeout_s=settings.heartbeat_timeout_s, checkpoint_every=settings.checkpoint_every,
                          replicas_per_stage=2, start_with_replicas=2, placement="cost-model", min_workers=4,
                          extra=AVERAGING)


class ChaosSoak:
    """Runs one soak in `workdir` (logs, ledger and store stay there)."""

    def __init__(self, workdir: Path, settings: ChaosSettings):
        self.workdir, self.s = Path(workdir), settings
        self.rng = random.Random(settings.seed)
        self.swarm = LocalSwarm(self.workdir, chaos_config(self.workdir, settings))
        self.result = ChaosResult(settings.seed)
        self.live: dict[str, SwarmProcess] = {}  # name -> process, workers we have not killed
        self.frozen: dict[str, float] = {}  # name -> monotonic time to SIGCONT it
        self._serial = 0
        self._t0 = 0.0
        self._dying_coordinators: list[tuple[int, float]] = []  # (session id, time of the kill)
        self.hold = ReplacementHold(self.swarm, settings.hold_limit_s, settings.seed)
        (self.workdir / "faults-once").mkdir(exist_ok=True)

    # -- the soak --------------------------------------------------------------------------
    def run(self, calm: bool = False) -> ChaosResult:
        """The whole soak (no faults at all with calm=True: the baseline for wall_vs_calm)."""
        try:
            if calm:
                self.s.armed = ()
            self.swarm.start_coordinator()
            for _ in range(4):
                self._start_worker(replacement=False)
            self.swarm.wait(lambda s: s["step"] >= 1, 240, "the first step")
            self._t0 = time.monotonic()
            self._soak(calm)
            status = self.swarm.wait(lambda s: s["phase"] == "done", 60, "the run to be done")
            self._record_end(status)
        except SwarmFailed as e:
            self.result.failure = str(e)[-4000:]
        finally:
            self.result.held_s = self.hold.total_s(time.monotonic())
            self.result.wall_s = time.monotonic() - self._t0 - self.result.held_s if self._t0 else 0.0
            self.result.address = self.swarm.address
        return self.result

    def close(self) -> None:
        self.swarm.close()

    def export(self, out: Path) -> str:
        """The finished run's weights, gathered from its workers, as a Hugging Face checkpoint
        (`gptjt export --coordinator`)."""
        return self.swarm.export(out)

    def _soak(self, calm: bool) -> None:
        next_fault = time.monotonic() + self._gap()
        deadline = time.monotonic() + self.s.timeout_s
        last_fault_step = 1  # the soak starts once step 1 is under way
        while True:
            now = time.monotonic()
            self._thaw(now)
            self._check_orphans(now)
            self._replace_crashed()
            status = self._status()
            if status is not None and status["phase"] == "done" and not self.frozen:
                return
            holding, hold_ended_s = self.hold.update(status, now) if self.s.hold_for_replacements else (False, 0.0)
            if holding:
                time.sleep(0.2)
                continue
            if hold_ended_s:  # the fault clock starts again, and the deadline does not count the hold
                deadline += hold_ended_s
                next_fault = time.monotonic() + self.rng.uniform(*self.s.after_hold_s)
                last_fault_step = status["step"]
            if now > deadline:
                raise SwarmFailed(f"seed {self.s.seed}: the run was not done {self.s.timeout_s:.0f} s after its "
                                  f"first step (step {status and status['step']}, phase {status and status['phase']})"
                                  f"\n{self.swarm.logs_tail(1500)}")
            by_steps = self.s.fault_every_steps and status is not None \
                and status["step"] >= last_fault_step + self.s.fault_every_steps
            if (not calm and status is not None and status["phase"] != "done" and (now >= next_fault or by_steps)
                    and len(self.result.faults) < self.s.max_faults):
                if self._inject(self.rng.choice(self.s.kinds), status):
                    next_fault, last_fault_step = time.monotonic() + self._gap(), status["step"]
                else:  # nothing to hit (the averaging round passed, every worker frozen): try again soon
                    next_fault = time.monotonic() + 0.5
            time.sleep(0.1)

    def _gap(self) -> float:
        return self.rng.uniform(*self.s.gap_s)

    def _status(self) -> dict | None:
        try:
            return self.swarm.status(timeout=5)
        except RuntimeError:
            if self.swarm.coordinator is not None and not self.swarm.coordinator.alive \
                    and self.swarm.coordinator not in self.swarm.expected_exits:
                raise SwarmFailed(f"the coordinator exited by itself:\n{self.swarm.coordinator.text()[-3000:]}")
            return None  # restarting

    # -- faults ----------------------------------------------------------------------------
    def _inject(self, kind: str, status: dict) -> bool:
        """Injects one fault of `kind`; False when it found nothing to hit."""
        if kind == "kill_averaging":
            status = self._wait_phase("averaging", 20) or status
        targets = getattr(self, f"_fault_{kind}")(status)
        if targets is not None:
            self.result.faults.append(FaultRecord(round(time.monotonic() - self._t0, 2), kind, targets,
                                                  status["step"], status["phase"]))
        return targets is not None

    def _wait_phase(self, phase: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._status()
            if status is not None and status["phase"] == phase:
                return status
            if status is not None and status["phase"] == "done":
                return None
            time.sleep(0.05)
        return None

    def _fault_kill_worker(self, status: dict) -> list[str] | None:
        candidates = [n for n in self.live if n not in self.frozen]
        if not candidates:
            return None
        name = self.rng.choice(sorted(candidates))
        self._kill(name)
        self._start_worker()
        return [name]

    def _fault_kill_stage(self, status: dict) -> list[str] | None:
        stage = self.rng.randrange(len(status["stages"]))
        names = sorted(w["name"] for w in status["workers"]
                       if w["stage"] == stage and w["state"] not in ("dead", "left") and w["name"] in self.live
                       and w["name"] not in self.frozen)
        for name in names:
            self._kill(name)
        for _ in names:
            self._start_worker()
        return names or None

    def _fault_restart_coordinator(self, status: dict) -> list[str]:
        old = self.swarm.coordinator
        self.swarm.kill(old, signal.SIGKILL)
        old.p.wait(10)
        self._dying_coordinators.append((old.p.pid, time.monotonic()))
        time.sleep(self.rng.uniform(0.2, 2.0))
        self.swarm.restart_coordinator()
        return ["coordinator"]

    def _fault_stop_worker(self, status: dict) -> list[str] | None:
        candidates = [n for n in self.live if n not in self.frozen]
        if not candidates:
            return None
        name = self.rng.choice(sorted(candidates))
        self.live[name].kill(signal.SIGSTOP)
        self.frozen[name] = time.monotonic() + self.s.stop_s
        return [name]

    def _fault_kill_averaging(self, status: dict) -> list[str] | None:
        if status["phase"] != "averaging":
            return None  # the run moved on (or ended) before a round came
        by_id = {w["id"]: w["name"] for w in status["workers"]}
        members = [by_id[m] for s in status["stages"] for m in s["members"] if by_id.get(m) in self.live]
        members = [n for n in members if n not in self.frozen]
        if not members:
            return None
        name = self.rng.choice(sorted(members))
        self._kill(name)
        self._start_worker()
        return [name]

    # -- bookkeeping -----------------------------------------------------------------------
    def _start_worker(self, replacement: bool = True) -> None:
        name = f"w{self._serial}"
        self._serial += 1
        env = {"GPTJT_FAULTS_ONCE_DIR": str(self.workdir / "faults-once")}
        if "kill_checkpoint" in self.s.armed:
            # one of the run's checkpoint steps, fixed by the seed (the rng's first draws)
            every = self.s.checkpoint_every
            steps = list(range(every, self.s.steps, every)) or [every]
            env["GPTJT_FAULTS"] = f"die-checkpoint@{random.Random(self.s.seed).choice(steps)}"
        self.live[name] = self.swarm.start_worker(name, env=env)
        if replacement:
            self.hold.started(name)

    def _kill(self, name: str) -> None:
        proc = self.live.pop(name)
        self.swarm.kill(proc, signal.SIGKILL)
        self.frozen.pop(name, None)
        self.hold.gone(name)

    def _thaw(self, now: float) -> None:
        for name, at in list(self.frozen.items()):
            if now >= at:
                self.live[name].kill(signal.SIGCONT)
                del self.frozen[name]

    def _replace_crashed(self) -> None:
        """A worker that exited by itself: an armed fault (kept as a fault, replaced) or a crash."""
        for name, proc in list(self.live.items()):
            if proc.alive:
                continue
            del self.live[name]
            self.hold.gone(name)
            text = proc.text()
            if "fault injection: SIGKILL" in text[-5000:]:
                kind = "kill_checkpoint" if "uploading the checkpoint" in text[-5000:] else "kill_averaging"
                self.result.faults.append(FaultRecord(round(time.monotonic() - self._t0, 2), kind, [name], -1,
                                                      "armed"))
                self.swarm.expected_exits.append(proc)
            else:
                self.result.crashes.append(f"{name} exited with {proc.p.returncode}:\n{text[-2500:]}")
            self._start_worker()

    def _check_orphans(self, now: float) -> None:
        """Processes of a killed coordinator's session (its DHT, their p2pd daemons) must be gone
        within 5 s of it."""
        for sid, killed_at in list(self._dying_coordinators):
            if now - killed_at < 5.0:
                continue
            self._dying_coordinators.remove((sid, killed_at))
            left = [f"{pid} {cmd}" for pid, cmd in _session_processes(sid)]
            self.result.orphans.extend(left)

    def _record_end(self, status: dict) -> None:
        r = self.result
        r.completed = status["phase"] == "done"
        r.steps_closed = len(status["history"])
        t = status["tickets"]
        r.tickets_lost, r.tickets_double = t["lost"], t["double"]
        r.violations = list(t["exactly_once_violations"])
        r.losses_finite = all(h["loss"] is not None and math.isfinite(h["loss"]) for h in status["history"])
        r.steps_rerun = _steps_rerun(self.swarm.ledger_path)
        for sid, killed_at in self._dying_coordinators:  # killed less than 5 s before the end
            time.sleep(max(0.0, 5.0 - (time.monotonic() - killed_at)))
            r.orphans.extend(f"{pid} {cmd}" for pid, cmd in _session_processes(sid))


def _steps_rerun(ledger: Path) -> int:
    """Closed steps undone by rollbacks, from the ledger's rolled_back events ("steps [3, 4] will be re-run")."""
    import re
    import sqlite3

    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        details = [r[0] for r in db.execute("SELECT detail FROM events WHERE kind='rolled_back'")]
    finally:
        db.close()
    total = 0
    for detail in details:
        if m := re.search(r"steps \[([0-9, ]*)\] will be re-run", detail):
            total += len([x for x in m.group(1).split(",") if x.strip()])
    return total


def _session_processes(sid: int) -> list[tuple[int, str]]:
    """Live processes of session `sid` (our console scripts start their own sessions)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is dead, only not yet reaped
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        out.append((pid, cmd[:200]))
    return out
