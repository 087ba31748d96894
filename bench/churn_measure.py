"""bench churn's figures for one setting: ours with churn, ours without (the ceiling), static
restarts with and without churn (bench/churn.py documents each figure)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .churn_settings import ChurnResult, ChurnSettings
from .churn_sim import ChurnSimulation
from .churn_static import simulate_static


def _ours(s: ChurnSettings) -> tuple[ChurnResult, ChurnSimulation]:
    with tempfile.TemporaryDirectory(prefix="gptjt-bench-churn-") as tmp:
        sim = ChurnSimulation(s, Path(tmp))
        result = sim.run_sim()
        sim.ledger.db.close()
    return result, sim


def _baselines(s: ChurnSettings) -> tuple[ChurnResult, ChurnResult, ChurnResult]:
    """Ours without churn (the ceiling), static restarts with churn and without."""
    calm = dataclasses.replace(s, churn=False)
    return _ours(calm)[0], simulate_static(s), simulate_static(calm)


def measure(s: ChurnSettings) -> dict:
    """Ours with churn, ours without, static restarts with churn: the figures of one setting.
    A simulation repeats exactly (seeded volunteers and worker ids, a search ended by its count),
    so one run of each is the figure, and where it runs does not change it: the baselines run in
    a second process beside the churned run (the churned run takes ~80 % of the CPU of the four;
    each is single-threaded, and this machine has 2 cores). A fresh interpreter (spawn), not a
    fork: `gptjt bench all` may have started gRPC's and torch's threads before this runs."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        baselines = pool.submit(_baselines, s)
        churned, sim = _ours(s)
        ceiling, static, static_calm = baselines.result()
    seconds = churned.seconds
    beats_per_s = churned.mean_alive / s.heartbeat_interval_s
    cpu = (churned.ledger_cpu_s / seconds + churned.heartbeat_cpu_per_beat_s * beats_per_s
           + churned.reaper_cpu_per_sim_s)
    memo = sim.ledger.planner.memo
    return {
        "workers": s.workers, "median_session_s": s.median_session_s, "hours": s.hours,
        "goodput_vs_no_churn": _ratio(churned.tokens_per_s, ceiling.tokens_per_s),
        "static_goodput_vs_no_churn": _ratio(static.tokens_per_s, ceiling.tokens_per_s),
        "tokens_per_s": round(churned.tokens_per_s, 1), "no_churn_tokens_per_s": round(ceiling.tokens_per_s, 1),
        "static_tokens_per_s": round(static.tokens_per_s, 1),
        "static_no_churn_tokens_per_s": round(static_calm.tokens_per_s, 1),
        "live_plan_vs_full_knowledge": _ratio(ceiling.tokens_per_s, static_calm.tokens_per_s),
        "steps": churned.steps, "no_churn_steps": ceiling.steps, "static_steps": static.steps,
        "rolled_back_share": round(churned.rolled_back_s / seconds, 4),
        "waiting_share": round(max(0.0, seconds - churned.useful_s - churned.rolled_back_s - churned.unfinished_s)
                               / seconds, 4),
        "unfinished_share": round(churned.unfinished_s / seconds, 4),
        "static_rolled_back_share": round(static.rolled_back_s / seconds, 4),
        "static_unfinished_share": round(static.unfinished_s / seconds, 4),
        "idle_standby_share": round(churned.idle_standby_share, 4),
        "layers_moved_per_hour": round(churned.layers_moved / s.hours, 1),
        "departures": churned.departures, "placed_departures": churned.placed_departures,
        "static_placed_departures": static.placed_departures,
        "rollbacks": churned.rollbacks, "static_restarts": static.rollbacks, "replans": churned.replans,
        "stage_counts": churned.stage_counts,
        "coordinator_cpu_per_sim_s": round(cpu, 5),
        "ledger_cpu_per_sim_s": round(churned.ledger_cpu_s / seconds, 5),
        "heartbeat_cpu_per_sim_s": round(churned.heartbeat_cpu_per_beat_s * beats_per_s, 5),
        "reaper_cpu_per_sim_s": round(churned.reaper_cpu_per_sim_s, 5),
        "plan_searches": memo.searches, "plan_search_hits": memo.hits, "plan_search_backstop_hits": memo.backstop_hits,
        "wall_s": round(churned.wall_s, 1),
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None
