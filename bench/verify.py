"""bench verify: spot checks on a loopback swarm: how fast a liar is caught, how often an honest one is, and what it costs.

The swarm: one stage (the whole tiny model) with three replicas, so a dispute has a third member
to settle it (docs/security.md, "Spot checks"); 8 micro-batches per replica per step; fp32.

detection_steps    median over liar runs of the steps from the liar's first lie (lie-noise on every
                   micro-batch from step LIE_FROM) to its quarantine, counting the step it lied in
                   first as 1, at the default verify.sample_rate (0.05). The run's step when the
                   `worker_quarantined` event lands says which step that was. A liar the run never
                   quarantined counts as caught in the step after the run's last (median_detection):
                   until 2026-12-07 such runs were left out, which made the median look faster.
predicted_*        what docs/security.md's formula predicts for the same settings: a step catches it
                   with probability 1 - (1 - p)^m (m: its micro-batches in a step), so the median is
                   the smallest k with 1 - (1 - p)^(m k) >= 1/2. A third opinion must then also be
                   answered before the verifiers' weights of that step are gone; the formula
                   leaves that out, the measurement does not.
liar_check_verdicts_each  per liar run, the verdicts of the checks of the liar's work (a run that
                   never quarantined it says why: no disagreement drawn, or the third opinion stale).
false_positive_rate  disagreements over answered checks of honest work, over every run (the honest
                   run at sample rate 1, and the honest workers' work in the liar runs).
verify_overhead_pct  tokens/s of the same honest run with spot checks off (sample_rate 0 and
                   first_checks 0: no evidence kept, no weights copied) over on (the default
                   0.05): the mean of two runs each, in the order off, on, on, off, steps after
                   the first of each.
commitment_bytes   mean size of one micro-batch's MicroBatchCommitment on the wire (from the ledger).
"""

from __future__ import annotations

import collections
import math
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from gptjt_proto import coordinator_pb2 as cpb
from local_swarm import LocalSwarm, SwarmFailed, small_run_toml

DESCRIPTION = "spot checks on a 1-stage x 3-replica swarm: steps to quarantine a liar, false positives, overhead"
LIE_FROM = 2
GLOBAL_BATCH, MICRO_BATCH, REPLICAS = 48, 2, 3


def _run(workdir: Path, steps: int, verify: str, liar: bool, timeout_s: float = 900.0) -> dict:
    """One swarm run to its end; facts read from its status and ledger."""
    workdir.mkdir(parents=True)
    config = small_run_toml(workdir, steps=steps, num_stages=1, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH,
                            replicas_per_stage=REPLICAS, start_with_replicas=REPLICAS, extra=verify)
    swarm = LocalSwarm(workdir, config)
    try:
        swarm.start_coordinator()
        for i in range(REPLICAS - 1):
            swarm.start_worker(f"w{i}").wait_for("joined", 120)
        env = {"GPTJT_FAULTS": f"lie-noise@{LIE_FROM}", "GPTJT_LIE_NOISE": "0.5"} if liar else None
        swarm.start_worker("liar" if liar else f"w{REPLICAS - 1}", env=env)
        status = swarm.wait(lambda s: s["phase"] == "done", timeout_s, "the run to finish")
    finally:
        swarm.close()
    with sqlite3.connect(f"file:{workdir / 'run.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        events = [dict(r) for r in db.execute("SELECT ts, kind, detail FROM events ORDER BY id")]
        checks = [dict(r) for r in db.execute("SELECT worker, step, verdict FROM checks WHERE kind='recompute'")]
        sizes = [cpb.MicroBatchCommitment(ticket_id=r["ticket"], attempt=r["attempt"], commitment=r["blob"],
                                          sent=r["sent"] or b"", returned=r["returned"] or b"",
                                          sent_back=r["sent_back"] or b"").ByteSize()
                 for r in db.execute("SELECT * FROM commitments")]
        names = {r[0]: r[1] for r in db.execute("SELECT id, name FROM workers")}
    return {"status": status, "events": events, "checks": checks, "sizes": sizes, "names": names,
            "tokens_per_s": _tokens_per_s(status["history"])}


def _tokens_per_s(history: list[dict]) -> float | None:
    """The median of the closed steps' tokens/s after the first (startup and the first plan
    excluded): one stalled step (an averaging round that timed out) moved the whole-run rate of
    two identical runs 2.3x apart on 2026-12-02, far more than what is measured here."""
    rates = [h["tokens"] / h["seconds"] for h in history[1:] if h.get("tokens") and h.get("seconds")]
    return statistics.median(rates) if rates else None


def _detection_steps(run: dict) -> int | None:
    """The step (counted from the first lie, which is 1) during which the liar was quarantined."""
    quarantine = next((e for e in run["events"] if e["kind"] == "worker_quarantined"), None)
    if quarantine is None:
        return None
    closed = [e for e in run["events"] if e["kind"] == "step_closed" and e["ts"] <= quarantine["ts"]]
    step_then = len(closed)  # steps close in order until the rollback, which comes after the quarantine
    return step_then - LIE_FROM + 1


def _mean_rate(runs: list[dict]) -> float | None:
    rates = [r["tokens_per_s"] for r in runs]
    return statistics.mean(rates) if all(rates) else None


def predicted_median_steps(p: float, m: int) -> int:
    """Smallest k with 1 - (1 - p)^(m k) >= 1/2."""
    return math.ceil(math.log(0.5) / (m * math.log(1.0 - p)))


def median_detection(detected: list[int | None], lying_steps: int) -> float | None:
    """The median of the liar runs' detection steps, a run that never quarantined its liar (None)
    counted as `lying_steps` + 1: at least that, so where the median falls on such a run it is a
    lower bound. None without liar runs."""
    if not detected:
        return None
    return statistics.median(lying_steps + 1 if d is None else d for d in detected)


def run(quick: bool = False) -> dict:
    liar_runs, steps = (3, 10) if quick else (7, 14)
    default_rate = 0.05
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gptjt-verify-") as tmp:
        root = Path(tmp)
        # off, on, on, off: the machine's drift over the runs (the first run was slower in every
        # earlier measurement, whichever mode it had) weighs on both modes alike
        off_cfg, on_cfg = "[verify]\nsample_rate = 0.0\nfirst_checks = 0\n", f"[verify]\nsample_rate = {default_rate}\n"
        offs, ons = [_run(root / "off0", steps, off_cfg, liar=False)], []
        ons += [_run(root / "on0", steps, on_cfg, liar=False), _run(root / "on1", steps, on_cfg, liar=False)]
        offs.append(_run(root / "off1", steps, off_cfg, liar=False))
        every = _run(root / "every", 4, "[verify]\nsample_rate = 1.0\n", liar=False)
        liars, failed = [], []
        for i in range(liar_runs):
            try:
                liars.append(_run(root / f"liar{i}", steps, f"[verify]\nsample_rate = {default_rate}\n", liar=True))
            except SwarmFailed as e:  # counted and shown, not fatal: the other runs still measure
                failed.append(f"liar run {i}: {str(e)[:300]}")
    honest_checks = [c for r in (*ons, every) for c in r["checks"]]
    honest_checks += [c for r in liars for c in r["checks"] if r["names"].get(c["worker"]) != "liar"]
    answered = [c for c in honest_checks if c["verdict"] in ("agree", "disagree")]
    detected = [_detection_steps(r) for r in liars]
    # what became of the checks of each liar's work: a run that never quarantined it says why
    liar_verdicts = [dict(sorted(collections.Counter(c["verdict"] for c in r["checks"]
                                                     if r["names"].get(c["worker"]) == "liar").items()))
                     for r in liars]
    m = GLOBAL_BATCH // MICRO_BATCH // REPLICAS
    sizes = [n for r in (*ons, every) for n in r["sizes"]]
    results.update({
        "detection_steps": median_detection(detected, steps - LIE_FROM),
        "detection_steps_each": detected, "liar_check_verdicts_each": liar_verdicts,
        "liars_quarantined": sum(d is not None for d in detected), "liar_runs": liar_runs,
        "liar_runs_failed": failed,
        "predicted_detection_steps_median": predicted_median_steps(default_rate, m),
        "predicted_detection_within_3_steps": round(1 - (1 - default_rate) ** (3 * m), 3),
        "false_positive_rate": (sum(c["verdict"] == "disagree" for c in answered) / len(answered)) if answered
        else None,
        "honest_checks_answered": len(answered),
        "verify_overhead_pct": round(100.0 * (_mean_rate(offs) / _mean_rate(ons) - 1.0), 2)
        if _mean_rate(offs) and _mean_rate(ons) else None,
        "tokens_per_s_off_each": [r["tokens_per_s"] for r in offs], "tokens_per_s_on_each": [r["tokens_per_s"] for r in ons],
        "commitment_bytes": round(statistics.mean(sizes), 1) if sizes else None,
        "settings": {"stages": 1, "replicas": REPLICAS, "micro_batches_per_replica_per_step": m,
                     "sample_rate": default_rate, "lie": f"lie-noise@{LIE_FROM} (0.5 x rms, every micro-batch)",
                     "steps": steps, "measured_at": time.strftime("%Y-%m-%d")},
    })
    return results
