"""bench churn: goodput of a volunteer swarm whose members come and go, simulated around the real
coordinator ledger (bench/churn_sim.py) in virtual time, against the same swarm without churn
and against a static plan that restarts from its last checkpoint on any failure
(bench/churn_static.py). Volunteers, regions and sessions: bench/churn_volunteers.py.

GPT-J 6B, seq 2048, one sequence a micro-batch, micro_batches_per_replica x replicas_per_stage
sequences a step; the coordinator picks 4-8 stages of at most replicas_per_stage replicas
(so at most 64 volunteers train at once at the defaults; the rest wait on standby, ready to
step in); a checkpoint every checkpoint_every steps.

goodput_vs_no_churn          tokens trained (steps closed and kept at the end) per virtual
                             second, over the same for the same settings with nobody leaving.
                             One run each: a simulation repeats exactly (seeded volunteers,
                             sessions and worker ids; searches ended by their count), so two
                             runs of the same settings give the same figures.
static_goodput_vs_no_churn   the same for the static-restart policy, over the same ceiling (ours
                             without churn).
live_plan_vs_full_knowledge  ours without churn over the static plan without churn. The static
                             plan is searched with every link between regions known, the live
                             coordinator's with the links workers measured for it (8 per request),
                             unmeasured pairs filled in from sites found from measured latencies
                             (coordinator/sites.py); below 1 is what the rest costs.
rolled_back_share            virtual time of steps undone by rollbacks and of restarted attempts.
waiting_share                virtual time with no step running (loading, restores, noticing deaths).
unfinished_share             virtual time of the attempt still running when the time ran out (ours
                             and static alike; in none of the shares above).
idle_standby_share           alive volunteer-seconds spent on standby.
layers_moved_per_hour        layers the coordinator's plans moved (its layers_moved_total).
coordinator_cpu_per_sim_s    CPU seconds of the coordinator per virtual second: every ledger call
                             the simulation made (joins, link measurements, state changes,
                             tickets, reports, checkpoints, deaths, the reaper at each tick) plus
                             routine heartbeats (a timed sample of live volunteers, times the alive
                             volunteers / heartbeat_interval_s) plus the reaper's idle passes
                             between ticks (it runs every 0.5 s). gRPC, TLS and Watch streams are
                             not in it: bench heartbeat measures those.
plan_searches / plan_search_hits  placement searches run, and re-plans answered by the memo
                             (coordinator/scheduler.py DecisionMemo) instead.
plan_search_backstop_hits    searches the wall-clock backstop cut short (search_budget.py). Above 0
                             the run does not repeat exactly: those plans depended on how busy the
                             machine was (run the bench alone).
"""

from __future__ import annotations

import dataclasses

from .churn_measure import measure
from .churn_settings import ChurnSettings
from .churn_sweep import HOURS, PLOT, render, sweep
from .churn_sweep import settings as sweep_settings

DESCRIPTION = "goodput of a churning volunteer swarm (simulated, real ledger) vs no churn and vs static restarts"

QUICK = ChurnSettings(workers=1000, median_session_s=7200.0, hours=1.0)
FULL = ChurnSettings(workers=1000, median_session_s=7200.0, hours=4.0)


def settings(quick: bool) -> dict:
    s = dataclasses.asdict(QUICK if quick else FULL)
    del s["churn"]
    if not quick:
        s["sweep"] = sweep_settings(False)
    return s


def _goal_met(goodput: float | None) -> bool | None:
    """Above 1 the calm runs were not a ceiling (their plans were worse than the churned run's):
    the ratio then shows neither that the goal is met nor that it is missed (None)."""
    if goodput is None or goodput > 1.0:
        return None
    return goodput >= 0.85


def run(quick: bool = False) -> dict:
    headline = measure(QUICK if quick else FULL)
    out = {"benchmark": "churn", "quick": quick, **headline, "goal_goodput_vs_no_churn": 0.85,
           "goal_met": _goal_met(headline["goodput_vs_no_churn"])}
    if not quick:  # the sweep, and its plot (bench/churn_sweep.py; `gptjt bench churn-sweep` alone)
        out["sweep"] = sweep(HOURS)
        render(out["sweep"], PLOT, HOURS)
        out["sweep_plot"] = PLOT.name
    return out
