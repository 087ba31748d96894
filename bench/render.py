"""`python -m bench.render [--check]`: the READMEs' figure tables, rendered from bench/results.json.

Each table sits between `<!-- figures:NAME:begin -->` and `<!-- figures:NAME:end -->`; NAME is
`headline` (README.md), `runs` (which benchmark ran when, where), `scheduler-scenarios`, or a
benchmark's name. Everything between a pair is replaced; prose around it is left alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench import goals, results as results_file
from bench.goals import FIGURES, Figure

REPO = results_file.REPO
# file (relative to the repository) -> the blocks it must hold
REQUIRED = {"README.md": ["headline"],
            "bench/README.md": ["runs", *goals.benchmarks_shown(), "scheduler-scenarios", "scheduler-small"]}
# a marker is a line of its own (a marker quoted in prose is not one)
MARKER = re.compile(r"^<!-- figures:(?P<name>[\w-]+):begin -->\n(?P<body>.*?)^<!-- figures:(?P=name):end -->\n",
                    re.DOTALL | re.MULTILINE)
BEGIN = re.compile(r"^<!-- figures:([\w-]+):begin -->$", re.MULTILINE)
NOT_MEASURED = "not measured"
SCENARIOS = ("datacenter", "spot_datacenter", "multi_university", "regional", "worldwide", "homogeneous_tc")


def fmt(value) -> str:
    """A figure as a table shows it: 4 significant digits, thousands separated."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0 or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))[:80]


def _entry(results: dict | None, bench: str) -> dict | None:
    return ((results or {}).get("benchmarks") or {}).get(bench)


def _value(figure: Figure, entry: dict | None) -> str:
    if entry is None:
        return NOT_MEASURED
    if "skipped" in entry:
        return f"{NOT_MEASURED} (skipped)"
    if "failed" in entry:
        return f"{NOT_MEASURED} (the run failed)"
    value = goals.lookup(entry["figures"], figure.key, goals.MISSING)
    return "not in the results" if value is goals.MISSING else fmt(value)


def _verdict(figure: Figure, entry: dict | None) -> str:
    status = goals.status(figure, entry)
    return {"met": "met", "missed": "**missed**", "no goal": "—"}.get(status, status)


def _provenance(entry: dict | None) -> tuple[str, str, str]:
    """(form, date, commit) of an entry."""
    if entry is None:
        return "—", "—", "—"
    commit = (entry.get("commit") or "unknown")[:7] + (" (dirty)" if entry.get("dirty") else "")
    return ("quick" if entry.get("quick") else "full"), (entry.get("date") or "—")[:10], commit


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _kind(figure: Figure) -> str:
    return "predicted" if figure.predicted else "measured"


def render_bench(bench: str, results: dict | None) -> str:
    """One benchmark's figures (bench/README.md)."""
    entry = _entry(results, bench)
    form, date, commit = _provenance(entry)
    rows = [[f"{f.what} (`{f.key}`)", _value(f, entry), _kind(f), f.against,
             f.goal.text() if f.goal else "—", _verdict(f, entry), form, date, commit]
            for f in FIGURES if f.bench == bench]
    return _table(["figure", "value", "measured / predicted", "against", "goal", "met?", "form", "date", "commit"],
                  rows)


def render_headline(results: dict | None) -> str:
    """The headline figures of every benchmark, beside published ones (README.md)."""
    rows = []
    for f in FIGURES:
        if not f.headline:
            continue
        entry = _entry(results, f.bench)
        form, date, commit = _provenance(entry)
        rows.append([f"{f.what} (`bench {f.bench}`, `{f.key}`)", _value(f, entry), _kind(f), f.against,
                     f.goal.text() if f.goal else "—", _verdict(f, entry), f"{form}, {date}, {commit}",
                     f.published or "—"])
    return _table(["figure", "ours", "measured / predicted", "against", "goal", "met?", "form, date, commit",
                   "published elsewhere (external, not measured here)"], rows)


def _machine(entry: dict) -> str:
    m = entry.get("machine") or {}
    return (f"{m.get('cpu_cores')} cores ({m.get('cpu_model') or 'cpu model unknown'}), {m.get('device')}, "
            f"torch {m.get('torch')}, Python {m.get('python')}")


def render_runs(results: dict | None) -> str:
    """Which benchmark ran when, where and for how long; why the others have no figures."""
    from bench.registry import BENCHMARKS

    rows = []
    for bench in sorted(BENCHMARKS):
        entry = _entry(results, bench)
        if entry is None:
            rows.append([f"`{bench}`", NOT_MEASURED, "—", "—", "—", "—", "—", "—"])
            continue
        form, date, commit = _provenance(entry)
        outcome = ("measured" if "figures" in entry else f"skipped: {entry['skipped']}" if "skipped" in entry
                   else f"failed: {entry['failed'].splitlines()[0][:160]} (the whole error: bench/results.json)")
        load = entry.get("load_avg_1m") or []
        load = " / ".join(fmt(x) for x in load) if load else "not recorded"
        rows.append([f"`{bench}`", outcome, form, fmt(entry.get("wall_s")), load, date, commit, _machine(entry)])
    return _table(["benchmark", "result", "form", "wall time (s)", "load average (1 min) before / after", "date (UTC)",
                   "commit", "machine"], rows)


def render_scenarios(results: dict | None) -> str:
    """Predicted step times of our placement per network scenario (bench scheduler)."""
    entry = _entry(results, "scheduler")
    figures = (entry or {}).get("figures") or {}
    rows = []
    for name in SCENARIOS:
        s = figures.get(name)
        if not isinstance(s, dict):
            rows.append([name] + [NOT_MEASURED] * 7)
            continue
        stages = f"{s['stages']} x {s['replicas'][0]} replicas" if len(set(s.get("replicas", []))) == 1 \
            and s["replicas"][0] > 1 else fmt(s.get("stages"))
        rows.append([name, fmt(s.get("predicted_step_s")), fmt(s.get("random_step_s")),
                     fmt(s.get("round_robin_step_s")), fmt(s.get("ratio_vs_random")),
                     fmt(s.get("gap_vs_longer_search")), fmt(s.get("plan_ms")), stages])
    form, date, commit = _provenance(entry)
    note = f"Predicted by the cost model ({form} form, {date}, {commit}); `plan_ms` is measured.\n\n"
    return note + _table(["scenario", "ours (s)", "random (s)", "round-robin (s)", "`ratio_vs_random`",
                          "`gap_vs_longer_search`", "`plan_ms`", "stages"], rows)


def render_small(results: dict | None) -> str:
    """Our search against the proven optimum on the small instances (bench scheduler, "small")."""
    entry = _entry(results, "scheduler")
    small = ((entry or {}).get("figures") or {}).get("small")
    if not isinstance(small, dict) or not small:
        return _table(["instance", "workers", "ours (s)", "optimal (s)", "`gap_vs_optimal`", "proof (s)"],
                      [[NOT_MEASURED] * 6])
    rows = [[name, fmt(s.get("workers")), fmt(s.get("predicted_step_s")), fmt(s.get("optimal_step_s")),
             fmt(s.get("gap_vs_optimal")), fmt(s.get("exact_s"))] for name, s in small.items()]
    form, date, commit = _provenance(entry)
    note = f"Predicted by the cost model ({form} form, {date}, {commit}); the proof time is measured.\n\n"
    return note + _table(["instance", "workers", "ours (s)", "optimal (s)", "`gap_vs_optimal`", "proof (s)"], rows)


def render_block(name: str, results: dict | None) -> str:
    if name == "headline":
        return render_headline(results)
    if name == "runs":
        return render_runs(results)
    if name == "scheduler-scenarios":
        return render_scenarios(results)
    if name == "scheduler-small":
        return render_small(results)
    if name in goals.benchmarks_shown():
        return render_bench(name, results)
    raise ValueError(f"unknown figures block {name!r}: use headline, runs, scheduler-scenarios, scheduler-small or one of "
                     f"{goals.benchmarks_shown()}")


def render_text(text: str, results: dict | None) -> str:
    """`text` with every figures block re-rendered."""
    def replace(m: re.Match) -> str:
        name = m.group("name")
        return f"<!-- figures:{name}:begin -->\n{render_block(name, results)}<!-- figures:{name}:end -->\n"

    return MARKER.sub(replace, text)


def blocks_in(text: str) -> list[str]:
    return [m.group("name") for m in MARKER.finditer(text)]


def problems(path: Path, text: str, results: dict | None, required: list[str]) -> list[str]:
    """What is wrong with a file's figure blocks: missing or stale ones."""
    found = blocks_in(text)
    out = [f"{path}: no `<!-- figures:{name}:begin -->` ... `end` block" for name in required if name not in found]
    opened = BEGIN.findall(text)
    out += [f"{path}: block {name!r} has no matching end marker" for name in opened if name not in found]
    if render_text(text, results) != text:
        out.append(f"{path}: figures differ from {results_file.DEFAULT_PATH.relative_to(REPO)}; "
                   f"run `python -m bench.render`")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=results_file.DEFAULT_PATH, help="the results file")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale or missing")
    args = p.parse_args(argv)
    results = results_file.load(args.results)
    found = []
    for rel, required in REQUIRED.items():
        path = REPO / rel
        text = path.read_text()
        if args.check:
            found += problems(Path(rel), text, results, required)
        else:
            new = render_text(text, results)
            if new != text:
                path.write_text(new)
                print(f"rendered {rel}")
            found += [m for m in problems(Path(rel), new, results, required) if "differ" not in m]
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
