"""bench gradsync's full form re-runs the setting its sweep picks and reports the medians of that
setting's runs, each median with the figures of its own run (a gap with the losses it is of)."""

from __future__ import annotations

import bench.gradsync as gradsync


def _run_figures(gap: float, heldout: float, ratio: float, outer_every: int = 100) -> dict:
    return {"loss_gap_pct": gap, "chosen_final_loss": 6.6 * (1 + gap / 100), "chosen_seconds": 400.0,
            "chosen_failed_rounds": int(gap), "chosen_step_reruns": 0, "heldout_loss_gap_pct": heldout,
            "chosen_heldout_loss": 6.7 * (1 + heldout / 100), "grad_bytes_ratio_vs_fp32": ratio,
            "chosen_bytes_per_step": 27e6 / ratio, "outer_every": outer_every, "outer_density": 1.0,
            "baseline_final_loss": 6.6, "baseline_heldout_loss": 6.7}


def test_each_median_comes_with_the_figures_of_its_own_run():
    runs = [_run_figures(2.6, 1.2, 425.0), _run_figures(1.2, 2.9, 424.0), _run_figures(1.7, 1.8, 426.0)]
    figures = gradsync._medians(runs)
    assert figures["loss_gap_pct"] == 1.7 and figures["chosen_final_loss"] == runs[2]["chosen_final_loss"]
    assert figures["chosen_failed_rounds"] == 1
    assert figures["heldout_loss_gap_pct"] == 1.8 and figures["chosen_heldout_loss"] == runs[2]["chosen_heldout_loss"]
    assert figures["grad_bytes_ratio_vs_fp32"] == 425.0
    assert figures["chosen_bytes_per_step"] == runs[0]["chosen_bytes_per_step"]


def test_the_full_form_repeats_the_setting_its_sweep_picked(monkeypatch):
    # The sweep's runs: (80, 0.5) misses, (100, 1) is within the goal at fewer bytes than (110, 1),
    # which is within it too: the most bytes saved within the goal is (110, 1). Its repeats then
    # miss: the figure is their median, and the goal is reported missed.
    gaps = {(80, 0.5): [4.5], (100, 1.0): [1.5], (110, 1.0): [1.9, 2.7, 2.4]}
    ratios = {(80, 0.5): 636.0, (100, 1.0): 425.0, (110, 1.0): 638.0}
    calls = []

    def chosen_run(baseline, outer_every, density):
        calls.append((outer_every, density))
        gap = gaps[(outer_every, density)].pop(0)
        return {**_run_figures(gap, gap, ratios[(outer_every, density)], outer_every), "outer_density": density}

    monkeypatch.setattr(gradsync, "_chosen_run", chosen_run)
    monkeypatch.setattr(gradsync, "_run", lambda *a, **k: {"bytes_per_replica": 1.0})
    monkeypatch.setattr(gradsync, "_local_final_loss", lambda steps: {"final_loss": 6.6, "heldout_loss": 6.7})
    result = gradsync.run(quick=False)
    assert calls == [*gradsync.FULL_SWEEP, (110, 1.0), (110, 1.0)] and gradsync.REPEATS == 3
    assert result["outer_every"] == 110 and result["loss_gap_pct"] == 2.4 and result["loss_goal_met"] is False
    assert [r["loss_gap_pct"] for r in result["repeats"]] == [1.9, 2.7, 2.4]
    assert [s["loss_gap_pct"] for s in result["sweep"]] == [4.5, 1.5, 1.9]
