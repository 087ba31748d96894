"""bench status: what one status object costs the coordinator on a long run's ledger.

The dashboard asks for the status object once a second and `gptjt status` on demand, and the
ledger answers on the coordinator's event loop, the loop that also serves heartbeats, leases
and commits. So its cost must not grow with the run. The ledger here is GPT-JT's shape: 64
micro-batches a step (one ticket each), the phase-1 length of 26,900 steps (3.53B tokens /
(64 x 2048), about 1.7 M tickets) or shorter ones with --quick. Tickets, closed steps and
their routine events (3 a step) are written with SQL (building them through leases and commits would take hours); each step's
exactly-once verdict is taken by the ledger's own code, as when a step closes.

by_workers: what one build of the status process costs at 10,000 joined workers (all but one
on standby, as in bench heartbeat, each after one heartbeat with its metrics), read through the status process's own code
(coordinator/ledger/reader.py) on a ledger written by the ledger's own joins:
`workers_build_ms` the status object and its JSON (what every `Status` call and dashboard
update waits for), `workers_metrics_ms` the /metrics text rendered from it (only on a scrape
since 2026-12-05; it was part of every build before), `workers_nan_walk_ms` the Python walk
for non-finite floats that every JSON encoding ran before 2026-12-05 (now only when the encoder
refuses one: coordinator/finite_json.py), `workers_status_mb` the JSON's size,
`workers_status_gzip_mb` its gzip (what `Status` sends a caller that accepts it, since
2026-12-08: gptjt_core/status_gzip.py) and `workers_gzip_ms` the status process's time to make
it. Medians of 5 after a first, cold build.

status_ms: median of 5 calls on a warm ledger. cold_ms: the first call after opening it, which
counts the tickets of every closed step once. full_scan_ms: the queries each call used to run
before verdicts and counts were kept (re-check every closed step's tickets, join every closed
step with its committed tickets for the lost / double counts, count every ticket, decode the
whole history), minus the building of the status object itself. ratio_vs_full_scan = full_scan_ms / status_ms.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

DESCRIPTION = "status object cost on a long ledger (GPT-JT phase-1 length): warm, cold, vs a full scan"
MICRO_BATCHES = 64  # GPT-JT: 64 sequences a step, one a micro-batch
PHASE1_STEPS = 26_900  # 3.53e9 tokens / (64 x 2048)
WORKERS = 10_000  # bench heartbeat's swarm
# What the coordinator stores from a standby's heartbeat in bench heartbeat (coordinator/server.py
# Heartbeat): every metric present, one rate set. Until 2026-12-07 by_workers built its status
# before any heartbeat, with empty metrics: ~3.8 MB and ~140 ms, against ~6 MB and ~335 ms with
# them (at 30d8d25, by hand), the status bench heartbeat's poller and dashboard get.
STANDBY_METRICS = {"micro_batches_per_s": 1.0, "busy_fraction": 0.0, "bytes_sent": 0, "bytes_received": 0,
                   "micro_batches": 0, "downstream_mbit": 0.0, "activation_codec": "", "gradient_codec": "",
                   "averaging_bytes": 0, "peak_memory_bytes": 0}


def build_ledger(path: Path, steps: int):
    """A ledger whose first `steps` steps are closed, every micro-batch committed once."""
    from coordinator.scheduler import plan_stages
    from coordinator.ledger import RunLedger
    from gptjt_core.config import RunConfig

    run = RunConfig()
    run.train.global_batch, run.train.micro_batch, run.train.steps = MICRO_BATCHES, 1, steps + 100
    ledger = RunLedger(path, run, plan_stages(28, 8), time.time)
    t = time.time()
    with ledger.db.tx():
        ledger.db.conn.executemany(
            "INSERT INTO tickets(step, attempt, idx, shard, offset, state, worker, loss, tokens, leases) "
            "VALUES(?, 0, ?, 0, 0, 'committed', 'w0', 2.0, 2048, 1)",
            ((s, i) for s in range(steps) for i in range(MICRO_BATCHES)))
        ledger.db.conn.executemany("INSERT INTO steps VALUES(?, 1, ?, ?, 4.0, ?, ?, '{}')",
                              ((s, 2.0 * MICRO_BATCHES / (1 + s / 1000), MICRO_BATCHES * 2048, t + 10 * s,
                                t + 10 * s + 9.5) for s in range(steps)))
        # the routine events each step writes (the ledger writes these three at least)
        ledger.db.conn.executemany("INSERT INTO events(ts, kind, detail) VALUES(?, ?, ?)",
                              ((t + 10 * s, kind, f"step {s}") for s in range(steps)
                               for kind in ("step_open", "step_accumulated", "step_closed")))
        for s in range(steps):
            ledger.tickets.audit(s)
        ledger.state.step = steps
    return ledger


def full_scan(ledger) -> None:
    """The work each status call did before: every closed step re-checked, every ticket
    counted, the whole history decoded."""
    from coordinator.ledger import count_tickets

    ledger.audit_exactly_once()
    # the lost / double counts were a join of every closed step with its committed tickets
    ledger.db.execute("SELECT s.step, t.idx, COUNT(t.id) FROM steps s JOIN tickets t ON t.step = s.step "
                      "AND t.state = 'committed' GROUP BY s.step, t.idx").fetchall()
    count_tickets(ledger.db, 0, None)
    [json.loads(r["detail"]) for r in ledger.db.execute("SELECT * FROM steps ORDER BY step").fetchall()]


def _ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(steps: int) -> dict:
    from coordinator.ledger import RunLedger

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.db"
        built = build_ledger(path, steps)
        run, plan = built.run, built.plan
        built.db.close()
        ledger = RunLedger(path, run, plan, time.time)  # reopened, as after a coordinator restart
        cold = _ms(ledger.status, 1)
        warm = _ms(ledger.status, 5)
        scan = _ms(lambda: full_scan(ledger), 3)
        status = ledger.status()
        assert status["tickets"]["committed"] == steps * MICRO_BATCHES and not status["tickets"]["lost"]
        ledger.db.close()
    return {"steps": steps, "tickets": steps * MICRO_BATCHES, "status_ms": round(warm, 2), "cold_ms": round(cold, 1),
            "full_scan_ms": round(scan, 1), "ratio_vs_full_scan": round(scan / warm, 1),
            "status_kb": round(len(json.dumps(status)) / 1024, 1), "loss_curve_points": len(status["loss_curve"]),
            "history_rows": len(status["history"])}


def measure_workers(workers: int) -> dict:
    """One status build and one /metrics render at `workers` joined workers, as the status process does them."""
    from coordinator.dashboard.metrics import render_metrics
    from coordinator.finite_json import dumps, finite
    from coordinator.ledger import RunLedger
    from coordinator.ledger.reader import LedgerReader
    from coordinator.scheduler import plan_stages
    from gptjt_core.config import RunConfig
    from gptjt_core.status_gzip import gzip_status

    with tempfile.TemporaryDirectory() as tmp:
        run = RunConfig()
        run.pipeline.num_stages = 1  # one stage, as in bench heartbeat: one worker placed, the rest standby
        ledger = RunLedger(Path(tmp) / "run.db", run, plan_stages(4, 1), time.time)  # the tiny model's 4 layers
        device = {"kind": "cpu", "matmul_tflops": 0.1, "memory_gb": 16.0}
        ids = [ledger.join(f"w{i}", f"127.0.0.1:{10000 + i}", device)["id"] for i in range(workers)]
        for worker_id in ids:  # one heartbeat each, with what a standby in bench heartbeat reports
            ledger.heartbeat(worker_id, "standby", STANDBY_METRICS)
        reader = LedgerReader(ledger.path, ledger.run, ledger.planner.plan, ledger.shape)
        body = dumps(reader.status())  # the first build reads the ledger cold
        build = _ms(lambda: dumps(reader.status()), 5)
        status = reader.status()
        metrics = _ms(lambda: render_metrics(lambda: status), 5)
        nan_walk = _ms(lambda: finite(status), 5)
        gzipped = gzip_status(body)
        gzip_ms = _ms(lambda: gzip_status(body), 5)
        assert len(status["workers"]) == workers
        ledger.db.close()
    return {"workers": workers, "workers_build_ms": round(build, 1), "workers_metrics_ms": round(metrics, 1),
            "workers_nan_walk_ms": round(nan_walk, 1), "workers_status_mb": round(len(body) / 1e6, 2),
            "workers_gzip_ms": round(gzip_ms, 1), "workers_status_gzip_mb": round(len(gzipped) / 1e6, 3)}


def settings(quick: bool) -> dict:
    return {"ledger_steps": [1000, 5000] if quick else [1000, 5000, PHASE1_STEPS],
            "micro_batches_per_step": MICRO_BATCHES, "workers": WORKERS}


def run(quick: bool = False) -> dict:
    sizes = (1000, 5000) if quick else (1000, 5000, PHASE1_STEPS)
    rows = [measure(n) for n in sizes]
    longest = rows[-1]
    return {"benchmark": "status", "steps": longest["steps"], "status_ms": longest["status_ms"],
            "cold_ms": longest["cold_ms"], "full_scan_ms": longest["full_scan_ms"],
            "ratio_vs_full_scan": longest["ratio_vs_full_scan"], "status_kb": longest["status_kb"],
            "by_length": rows, "by_workers": measure_workers(WORKERS)}
