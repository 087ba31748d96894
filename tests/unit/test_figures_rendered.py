"""The READMEs' figure tables are what `python -m bench.render` makes of the committed bench/results.json."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from bench import goals, registry, render
from bench import results as results_file
from tests.conftest import REPO

RESULTS = results_file.load(results_file.DEFAULT_PATH)


@pytest.mark.parametrize("rel", sorted(render.REQUIRED))
def test_committed_tables_match_the_results_file(rel):
    """Fails when a figure in README.md or bench/README.md was typed by hand, when the results
    file changed without `python -m bench.render`, or when a table's markers went missing."""
    assert render.problems(Path(rel), (REPO / rel).read_text(), RESULTS, render.REQUIRED[rel]) == []


def test_every_catalogued_figure_is_reported_by_its_benchmark():
    """A row whose key the benchmark no longer reports would read 'not in the results' for ever."""
    missing = [f"{f.bench}: {f.key}" for f in goals.FIGURES
               if (entry := ((RESULTS or {}).get("benchmarks") or {}).get(f.bench)) and "figures" in entry
               and goals.lookup(entry["figures"], f.key, goals.MISSING) is goals.MISSING]
    assert missing == []


def test_every_catalogued_benchmark_is_registered():
    assert set(goals.benchmarks_shown()) <= set(registry.BENCHMARKS)


SYNTHETIC = {
    "format": 1, "date": "2026-12-02T09:00:00+00:00", "commit": "0123456789abcdef", "dirty": False,
    "machine": {"cpu_cores": 2},
    "benchmarks": {
        "link": {"name": "link", "quick": True, "date": "2026-12-02T09:00:00+00:00", "commit": "0123456789abcdef",
                 "dirty": True, "dirty_paths": ["bench/link.py"], "wall_s": 300.0, "settings": {},
                 "machine": {"cpu_cores": 2, "cpu_model": "test cpu", "device": "cpu", "torch": "2.13.0",
                             "python": "3.11.7"},
                 "figures": {"slow_link_speedup": 4.1, "loss_gap_pct": 0.03, "chosen_codecs": "q3/q3",
                             "predicted_step_s_fp16": 13.97, "step_s_fp16": 14.27,
                             "predicted_step_s_chosen": 3.22, "step_s_chosen": 3.52}},
        "gpu-block": {"name": "gpu-block", "quick": True, "date": "2026-12-02T09:05:00+00:00", "commit": "0123456",
                      "dirty": False, "dirty_paths": [], "wall_s": 0.0, "settings": {}, "machine": {},
                      "skipped": "bench gpu-block needs a CUDA GPU"},
    },
}


def _row(table: str, key: str) -> list[str]:
    line = next(line for line in table.splitlines() if f"(`{key}`)" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_rows_say_measured_or_predicted_met_or_missed_and_where_from():
    table = render.render_bench("link", SYNTHETIC)
    speedup = _row(table, "slow_link_speedup")
    assert speedup[1:6] == ["4.1", "measured", "fp16 both ways over the same link", "≥ 4.6 (issue 18)", "**missed**"]
    assert speedup[6:] == ["quick", "2026-12-02", "0123456 (dirty)"]
    assert _row(table, "loss_gap_pct")[5] == "met"
    assert _row(table, "predicted_step_s_fp16")[1:3] == ["13.97", "predicted"]
    gpu = _row(render.render_bench("gpu-block", SYNTHETIC), "block_tflops")
    assert gpu[1] == "not measured (skipped)" and gpu[5] == "skipped"
    nat = _row(render.render_bench("nat", SYNTHETIC), "relayed_vs_direct_tokens_per_s")
    assert nat[1] == "not measured" and nat[5] == "not measured" and nat[6:] == ["—", "—", "—"]


def test_a_changed_figure_or_a_lost_block_fails_the_check():
    text = "# t\n\n<!-- figures:headline:begin -->\n<!-- figures:headline:end -->\n\nprose\n"
    rendered = render.render_text(text, SYNTHETIC)
    assert "| 4.1 |" in rendered and rendered.endswith("\nprose\n")
    assert render.problems(Path("README.md"), rendered, SYNTHETIC, ["headline"]) == []
    changed = copy.deepcopy(SYNTHETIC)
    changed["benchmarks"]["link"]["figures"]["slow_link_speedup"] = 4.7
    assert any("differ" in p for p in render.problems(Path("README.md"), rendered, changed, ["headline"]))
    hand_edited = rendered.replace("| 4.1 |", "| 4.8 |")
    assert any("differ" in p for p in render.problems(Path("README.md"), hand_edited, SYNTHETIC, ["headline"]))
    assert any("no `<!-- figures:runs" in p for p in render.problems(Path("x.md"), rendered, SYNTHETIC, ["runs"]))
    unclosed = "<!-- figures:link:begin -->\n| old |\n"
    assert any("no matching end" in p for p in render.problems(Path("x.md"), unclosed, SYNTHETIC, []))


def test_an_unknown_block_name_is_an_error():
    with pytest.raises(ValueError, match="unknown figures block 'linq'"):
        render.render_text("<!-- figures:linq:begin -->\n<!-- figures:linq:end -->\n", SYNTHETIC)


def test_formatting():
    assert [render.fmt(v) for v in (4.1234, 0.0, 1234.5, 5.4e-07, True, 128, None, "q3/q3")] == \
        ["4.123", "0", "1,234", "5.4e-07", "true", "128", "none", "q3/q3"]
