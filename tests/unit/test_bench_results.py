"""The results file: one entry per benchmark, merged one run at a time; goals judged met or missed."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap

import pytest

from bench import goals, registry
from bench import results as results_file
from bench.goals import Figure, Goal

MACHINE = {"cpu_cores": 2, "cpu_model": "test cpu", "device": "cpu", "torch": "2.13.0", "python": "3.11.7"}


def stamp(date: str, commit: str) -> dict:
    return {"date": date, "commit": commit, "dirty": False, "dirty_paths": [], "machine": MACHINE}


def entry(name: str, date: str, commit: str, **kind) -> dict:
    return results_file.make_entry(name, True, wall_s=12.34, settings={"steps": 3}, stamp=stamp(date, commit),
                                   **kind)


# ---- merging


def test_merge_replaces_one_benchmark_and_keeps_the_others_date_and_commit(tmp_path):
    path = tmp_path / "results.json"
    results_file.record(path, entry("link", "2026-12-01T10:00:00+00:00", "aaa", figures={"x": 1.0}),
                        stamp("2026-12-01T10:00:00+00:00", "aaa"))
    results_file.record(path, entry("codec", "2026-12-01T11:00:00+00:00", "aaa", figures={"y": 2.0}),
                        stamp("2026-12-01T11:00:00+00:00", "aaa"))
    data = results_file.record(path, entry("link", "2026-12-02T09:00:00+00:00", "bbb", figures={"x": 3.0}),
                               stamp("2026-12-02T09:00:00+00:00", "bbb"))
    assert json.loads(path.read_text()) == data
    assert sorted(data["benchmarks"]) == ["codec", "link"]
    assert data["benchmarks"]["link"]["figures"] == {"x": 3.0}
    assert data["benchmarks"]["link"]["commit"] == "bbb"
    assert data["benchmarks"]["codec"]["commit"] == "aaa"  # untouched: its own date and commit
    assert data["benchmarks"]["codec"]["date"] == "2026-12-01T11:00:00+00:00"
    assert (data["date"], data["commit"]) == ("2026-12-02T09:00:00+00:00", "bbb")  # the latest writer
    assert data["benchmarks"]["link"]["wall_s"] == 12.3 and data["benchmarks"]["link"]["settings"] == {"steps": 3}


def test_a_skip_does_not_replace_figures_measured_elsewhere():
    measured = results_file.merge(None, entry("gpu-block", "d1", "aaa", figures={"block_tflops": 246.0}),
                                  stamp("d1", "aaa"))
    after = results_file.merge(measured, entry("gpu-block", "d2", "bbb", skipped="no CUDA"), stamp("d2", "bbb"))
    assert after["benchmarks"]["gpu-block"]["figures"] == {"block_tflops": 246.0}
    # ... but a skip is recorded where nothing was measured, and a failure replaces figures
    assert "skipped" in results_file.merge(None, entry("nat", "d", "c", skipped="no root"), stamp("d", "c"))[
        "benchmarks"]["nat"]
    failed = results_file.merge(measured, entry("gpu-block", "d3", "c", failed="boom"), stamp("d3", "c"))
    assert failed["benchmarks"]["gpu-block"]["failed"] == "boom"


def test_an_entry_is_exactly_one_of_figures_skipped_failed():
    with pytest.raises(ValueError, match="exactly one"):
        entry("x", "d", "c", figures={"a": 1}, skipped="why")
    with pytest.raises(ValueError, match="exactly one"):
        entry("x", "d", "c")


def test_a_results_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"format": 99, "benchmarks": {}}))
    with pytest.raises(ValueError, match="format 99"):
        results_file.load(path)
    assert results_file.load(tmp_path / "absent.json") is None


def test_git_state_names_the_commit_and_ignores_markdown_plots_and_the_results_file(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    for name in ("a.py", "README.md", "results.json", "sweep.png"):
        (tmp_path / name).write_text("1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    (tmp_path / "README.md").write_text("2\n")
    (tmp_path / "results.json").write_text("2\n")
    (tmp_path / "sweep.png").write_text("2\n")  # a plot a benchmark redrew
    state = results_file.git_state(tmp_path, results=tmp_path / "results.json")
    assert state["commit"] == head.strip()
    assert state["dirty"] is False and sorted(state["dirty_paths"]) == ["README.md", "results.json", "sweep.png"]
    (tmp_path / "a.py").write_text("2\n")
    assert results_file.git_state(tmp_path, results=tmp_path / "results.json")["dirty"] is True


def test_cpu_model_reads_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\n")
    assert results_file.cpu_model(cpuinfo) == "Some CPU @ 2.0GHz"
    assert results_file.cpu_model(tmp_path / "absent") is None


# ---- `gptjt bench ... --results`, with three small benchmark modules written for the test

FAKES = {
    "fake_ok": """
        def settings(quick):
            return {"quick_steps": 2 if quick else 9}
        def run(quick=False):
            return {"speedup": 4.7, "quick": quick}
    """,
    "fake_unavailable": """
        from bench.registry import BenchmarkUnavailable
        def run(quick=False):
            raise BenchmarkUnavailable("needs a CUDA GPU")
    """,
    "fake_crash": """
        def run(quick=False):
            return {"settings": {"from_run": 1}, "ratio": 1 / 0}
    """,
}


@pytest.fixture()
def fake_benchmarks(tmp_path, monkeypatch):
    for name, body in FAKES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "BENCHMARKS", {name.replace("_", "-"): name for name in FAKES})
    yield
    for name in FAKES:
        sys.modules.pop(name, None)


def bench(name: str, results, quick: bool = True) -> int:
    return registry.cmd_bench(argparse.Namespace(name=name, quick=quick, json=True, results=results))


def test_bench_all_records_figures_skips_and_failures(fake_benchmarks, tmp_path, capsys):
    path = tmp_path / "results.json"
    assert bench("all", path) == 1  # one benchmark crashed: recorded, and the exit code says so
    data = results_file.load(path)
    ok, skipped, crashed = (data["benchmarks"][n] for n in ("fake-ok", "fake-unavailable", "fake-crash"))
    assert ok["figures"] == {"speedup": 4.7, "quick": True} and ok["settings"] == {"quick_steps": 2}
    assert ok["quick"] is True and ok["wall_s"] >= 0 and ok["machine"]["cpu_cores"]
    assert len(ok["load_avg_1m"]) == 2 and all(x >= 0 for x in ok["load_avg_1m"])
    assert skipped["skipped"] == "needs a CUDA GPU" and "figures" not in skipped
    assert crashed["failed"].startswith("ZeroDivisionError")
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"benchmark": "fake-unavailable", "skipped": "needs a CUDA GPU"} in printed


def test_one_benchmark_with_results_merges_into_the_file(fake_benchmarks, tmp_path):
    path = tmp_path / "results.json"
    bench("all", path)
    before = results_file.load(path)
    assert bench("fake-ok", path, quick=False) == 0
    after = results_file.load(path)
    assert after["benchmarks"]["fake-ok"]["quick"] is False
    assert after["benchmarks"]["fake-ok"]["settings"] == {"quick_steps": 9}
    assert after["benchmarks"]["fake-crash"] == before["benchmarks"]["fake-crash"]
    bench("fake-ok", path)
    with pytest.raises(ZeroDivisionError):  # one benchmark on its own fails loudly, as before ...
        bench("fake-crash", path)
    crashed = results_file.load(path)["benchmarks"]["fake-crash"]  # ... and is recorded as failed
    assert crashed["failed"].startswith("ZeroDivisionError") and crashed["date"] >= before["benchmarks"][
        "fake-crash"]["date"]
    assert "figures" in results_file.load(path)["benchmarks"]["fake-ok"]


def test_a_crash_replaces_older_figures_with_the_failure(fake_benchmarks, tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    bench("fake-ok", path)
    monkeypatch.setattr(registry, "BENCHMARKS", {"fake-ok": "fake_crash"})  # the same name now crashes
    with pytest.raises(ZeroDivisionError):
        bench("fake-ok", path)
    entry = results_file.load(path)["benchmarks"]["fake-ok"]
    assert "figures" not in entry and entry["failed"].startswith("ZeroDivisionError")


def test_an_entry_names_the_commit_the_run_started_at(fake_benchmarks, tmp_path, monkeypatch):
    head = {"commit": "commit-at-start"}
    monkeypatch.setattr(results_file, "git_state", lambda *a, **k: {**head, "dirty": False, "dirty_paths": []})
    real_run = registry.run_benchmark

    def run_while_someone_commits(name: str, quick: bool) -> dict:
        figures = real_run(name, quick)
        head["commit"] = "commit-at-end"
        return figures

    monkeypatch.setattr(registry, "run_benchmark", run_while_someone_commits)
    bench("fake-ok", tmp_path / "results.json")
    assert results_file.load(tmp_path / "results.json")["benchmarks"]["fake-ok"]["commit"] == "commit-at-start"


def test_one_benchmark_without_results_writes_no_file(fake_benchmarks, tmp_path, monkeypatch):
    monkeypatch.setattr(results_file, "DEFAULT_PATH", tmp_path / "default.json")
    assert bench("fake-ok", None) == 0
    assert not (tmp_path / "default.json").exists()
    bench("all", None)  # `all` writes the default file
    assert sorted(results_file.load(tmp_path / "default.json")["benchmarks"]) == sorted(registry.BENCHMARKS)


# ---- goals


@pytest.mark.parametrize("op,target,value,met", [
    (">=", 4.6, 4.6, True), (">=", 4.6, 4.59, False), ("<", 10, 9.99, True), ("<", 10, 10.0, False),
    ("<=", 2, 2.5, False), ("==", 0, 0, True), ("==", 0, 1, False), ("==", True, True, True),
    ("==", False, True, False), (">=", 0.8, None, False), ("<", 10, math.nan, False), (">=", 0.8, math.inf, False),
])
def test_goal_met_or_missed(op, target, value, met):
    assert Goal(op, target, "test").met(value, {}) is met


def test_a_goal_can_name_another_figure():
    goal = Goal("==", "runs_attempted", "test")
    assert goal.met(2, {"runs_attempted": 2}) and not goal.met(1, {"runs_attempted": 2})
    assert not goal.met(2, {})  # nothing to compare with: not met


def test_a_goal_with_an_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op"):
        Goal("~", 1, "test")


def test_status_says_met_missed_or_why_there_is_no_value():
    fig = Figure("link", "a.speedup", "speedup", goal=Goal(">=", 4.6, "test"))
    measured = lambda v: {"figures": {"a": {"speedup": v}}}  # noqa: E731
    assert goals.status(fig, measured(4.7)) == "met"
    assert goals.status(fig, measured(4.1)) == "missed"
    assert goals.status(fig, None) == "not measured"
    assert goals.status(fig, {"skipped": "no GPU"}) == "skipped"
    assert goals.status(fig, {"failed": "boom"}) == "failed"
    assert goals.status(fig, {"figures": {"a": {}}}) == "not in the results"
    assert goals.status(Figure("link", "x", "x"), {"figures": {"x": 1}}) == "no goal"


def test_a_benchmark_can_say_its_run_cannot_show_a_goal_either_way():
    fig = Figure("churn", "goodput", "goodput", goal=Goal(">=", 0.85, "test"), verdict_key="goal_met")
    assert goals.status(fig, {"figures": {"goodput": 1.2, "goal_met": None}}) == "not shown"
    assert goals.status(fig, {"figures": {"goodput": 0.9, "goal_met": True}}) == "met"
    assert goals.status(fig, {"figures": {"goodput": 0.5, "goal_met": False}}) == "missed"
    from bench.churn import _goal_met
    assert (_goal_met(1.2), _goal_met(0.9), _goal_met(0.5), _goal_met(None)) == (None, True, False, None)
