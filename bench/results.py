"""The results file (`bench/results.json`): every benchmark's latest figures, with when, where and at which commit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO / "bench" / "results.json"
FORMAT = 1  # bump when an entry's fields change meaning


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first 'model name' of /proc/cpuinfo (None where there is no such file, e.g. macOS)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    """What ran the benchmarks: the figures mean little without it."""
    import torch

    return {"cpu_cores": os.cpu_count(), "cpu_model": cpu_model(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "python": platform.python_version()}


def git_state(repo: Path = REPO, results: Path | None = None) -> dict:
    """HEAD's commit and whether the tree differs from it. Changes to Markdown files, to PNG plots
    (a benchmark draws them from its figures: bench/churn_sweep.png) and to the results file itself
    do not make the tree dirty (none can move a figure), but every changed path is listed in
    `dirty_paths`. Until 2026-12-07 a redrawn plot marked the next benchmark's run dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "dirty_paths": []}
    skip = {str(Path(results).resolve().relative_to(repo))} if results and _inside(results, repo) else set()
    code = [p for p in changed if p not in skip and not p.endswith((".md", ".png"))]
    return {"commit": commit, "dirty": bool(code), "dirty_paths": changed[:20]}


def _inside(path: Path, repo: Path) -> bool:
    try:
        Path(path).resolve().relative_to(repo)
        return True
    except ValueError:
        return False


def load_avg() -> float | None:
    """The 1-minute load average: on a shared machine, what else was running says how far to trust a speed."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def make_entry(name: str, quick: bool, *, figures: dict | None = None, settings: dict | None = None,
               wall_s: float | None = None, skipped: str | None = None, failed: str | None = None,
               stamp: dict, load: list | None = None) -> dict:
    """One benchmark's record. `stamp` carries date, commit, dirty, dirty_paths and machine; `load`
    the 1-minute load average before and after the run; exactly one of figures, skipped and
    failed says how the run went."""
    if sum(x is not None for x in (figures, skipped, failed)) != 1:
        raise ValueError(f"bench {name}: an entry has figures, a skip reason or a failure, exactly one")
    entry = {"name": name, "quick": quick, **stamp, "wall_s": None if wall_s is None else round(wall_s, 1),
             "load_avg_1m": load, "settings": settings or {}}
    if figures is not None:
        entry["figures"] = figures
    elif skipped is not None:
        entry["skipped"] = skipped
    else:
        entry["failed"] = failed
    return entry


def merge(existing: dict | None, entry: dict, stamp: dict) -> dict:
    """The results with `entry` replacing that benchmark's old one; every other entry keeps its
    own date and commit. A skip (e.g. gpu-block on a machine without CUDA) does not replace
    figures measured elsewhere. The top-level date, commit and machine are the latest writer's."""
    benchmarks = dict((existing or {}).get("benchmarks", {}))
    old = benchmarks.get(entry["name"])
    if not ("skipped" in entry and old is not None and "figures" in old):
        benchmarks[entry["name"]] = entry
    return {"format": FORMAT, **{k: stamp[k] for k in ("date", "commit", "dirty", "machine")},
            "benchmarks": dict(sorted(benchmarks.items()))}


def load(path: Path) -> dict | None:
    """The results file, or None where there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: results format {data.get('format')!r}, this code reads {FORMAT}; "
                         f"re-run the benchmarks with --results {path}")
    return data


def save(path: Path, data: dict) -> None:
    """Write through a temporary file: a benchmark killed while writing leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(value):
    """JSON for what benchmarks return besides plain types (tuples are lists already)."""
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def record(path: Path, entry: dict, stamp: dict) -> dict:
    """Merge one entry into the file at `path` and write it; returns the new contents."""
    data = merge(load(path), entry, stamp)
    save(path, data)
    return data


def stamp_now(results: Path | None = None) -> dict:
    return {"date": utc_now(), **git_state(results=results), "machine": machine()}
