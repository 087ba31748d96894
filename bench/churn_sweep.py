"""bench churn-sweep: goodput of a churning volunteer swarm against the median session length and
the swarm size, ours and the static-restart baseline, plotted to bench/churn_sweep.png.

Each point is bench churn's measure (bench/churn_measure.py) for the first `hours` of it: ours
with churn, over one run of ours without churn (the ceiling; the headline form takes the median
of three), and the static-restart baseline over the same ceiling. `gptjt bench churn` (full)
runs this sweep after its headline figures; this benchmark runs the sweep alone.
"""

from __future__ import annotations

from pathlib import Path


DESCRIPTION = "goodput vs median session (15 min to 8 h) and swarm size, ours and static restarts, as a PNG"

MEDIANS_S = (900.0, 3600.0, 7200.0, 28800.0)  # 15 min to 8 h
WORKERS = (64, 256, 1000)
HOURS, QUICK_HOURS = 1.0, 0.5
PLOT = Path(__file__).resolve().parent / "churn_sweep.png"


def settings(quick: bool) -> dict:
    return {"median_session_s": list(MEDIANS_S), "workers": list(WORKERS), "hours": QUICK_HOURS if quick else HOURS,
            "plot": PLOT.name}


def sweep(hours: float) -> list[dict]:
    keep = ("workers", "median_session_s", "goodput_vs_no_churn", "static_goodput_vs_no_churn", "tokens_per_s",
            "no_churn_tokens_per_s", "static_tokens_per_s", "rolled_back_share", "waiting_share",
            "coordinator_cpu_per_sim_s", "wall_s")
    from .churn_measure import measure  # the simulation: imported only to run it (bench/goals.py reads the
    from .churn_settings import ChurnSettings  # constants above to name the figures)

    points = []
    for n in WORKERS:
        for m in MEDIANS_S:
            figures = measure(ChurnSettings(workers=n, median_session_s=m, hours=hours))
            points.append({k: figures[k] for k in keep})
    return points


def render(points: list[dict], path: Path, hours: float) -> None:
    """Goodput over no churn against the median session (log scale), one line per swarm size:
    ours solid, static restarts dashed (bench/plot_png.py)."""
    from .plot_png import line_chart

    series = []
    for key, style, who in (("goodput_vs_no_churn", "solid", "ours"),
                            ("static_goodput_vs_no_churn", "dashed", "static restart")):
        for n in sorted({p["workers"] for p in points}):
            xy = sorted((p["median_session_s"] / 3600.0, p[key]) for p in points if p["workers"] == n)
            series.append((f"{who}, {n} volunteers", xy, style))
    line_chart(path, series, title=f"goodput over no churn, first {hours:g} h",
               x_label="median volunteer session (hours, log scale)", y_label="goodput / no churn",
               log_x=True, y_range=(0.0, 1.2))


def run(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else HOURS
    points = sweep(hours)
    render(points, PLOT, hours)
    best = {n: max((p["goodput_vs_no_churn"] or 0.0) for p in points if p["workers"] == n) for n in WORKERS}
    return {"benchmark": "churn-sweep", "quick": quick, "hours": hours, "points": points, "plot": PLOT.name,
            "best_goodput_by_workers": {str(n): round(v, 4) for n, v in best.items()}}
