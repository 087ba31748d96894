"""Two coordinators never serve one SQLite ledger: a second `gptjt-coordinator` on the same state
refuses to start and names the first; once the first is SIGKILLed, a restart serves at once."""

from __future__ import annotations

import signal
import subprocess

from tests.swarm import BIN, Swarm, swarm_toml


def test_a_second_coordinator_on_a_served_ledger_is_refused_and_a_restart_after_a_kill_is_not(tmp_path, swarms):
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=2), state=tmp_path / "run.db")
    swarms.append(swarm)
    first = swarm.start_coordinator()
    second = subprocess.run([str(BIN / "gptjt-coordinator"), "--config", str(swarm.config), "--state",
                             str(tmp_path / "run.db"), "--listen", "127.0.0.1:0", "--dashboard-port", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert (f"gptjt-coordinator: error: another coordinator (process {first.p.pid}) serves the ledger "
            f"{tmp_path / 'run.db'}; two must never serve one run") in second.stderr, second.stderr
    assert "listening on" not in second.stdout  # it never served
    swarm.kill(first, signal.SIGKILL)
    first.p.wait(10)
    swarm.restart_coordinator()  # the kernel freed the lock with the killed process
    swarm.start_worker("a")
    swarm.start_worker("b")
    status = swarm.wait(lambda s: s["phase"] == "done", 180, "the run to finish on the restarted coordinator")
    assert status["tickets"]["exactly_once_violations"] == []
