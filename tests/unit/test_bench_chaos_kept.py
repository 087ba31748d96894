"""bench chaos keeps a failed soak's directory (its processes' logs) for whoever reads the failure."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench import chaos
from local_swarm.chaos import ChaosResult

SETTINGS = {"steps": 9, "checkpoint_every": 3, "gap_s": (5.0, 9.0), "max_faults": 6, "timeout_s": 400.0}


class ScriptedSoak:
    """Stands in for the swarm (a real soak takes minutes): writes a worker log, ends as told."""
    completes = False

    def __init__(self, workdir: Path, settings) -> None:
        self.workdir, self.seed = workdir, settings.seed

    def run(self, calm: bool = False) -> ChaosResult:
        (self.workdir / "w1.log").write_text("ERROR gptjt.worker: worker loop failed\nTraceback (most recent call last)\n")
        return ChaosResult(seed=self.seed, completed=True, crashes=[] if self.completes else ["w1 exited with 1"])

    def close(self) -> None:
        pass


def test_a_failed_soaks_logs_outlive_it_and_a_completed_soaks_do_not(monkeypatch, tmp_path):
    monkeypatch.setattr(chaos, "ChaosSoak", ScriptedSoak)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    failed = chaos._soak(1, SETTINGS)
    kept = Path(failed.kept)
    assert kept.parent == tmp_path and kept.name.startswith("gptjt-chaos-failed-seed1-")
    assert "worker loop failed" in (kept / "w1.log").read_text()
    monkeypatch.setattr(ScriptedSoak, "completes", True)
    completed = chaos._soak(2, SETTINGS)
    assert completed.ok and completed.kept == ""
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]  # the passing soak's directory is gone
