"""Test harness: a real coordinator and real workers as processes on loopback (console scripts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gptjt_cli.local_swarm import small_run_toml

BIN = Path(sys.executable).parent

swarm_toml = small_run_toml  # the tests' name for it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose stdout is captured to a file we can search."""

    def __init__(self, args: list[str], log: Path, cwd: Path, env: dict | None = None):
        self.log = log
        self._fh = open(log, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.p = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                  start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            if self.p.poll() is not None:
                raise AssertionError(f"{self.log.name} exited ({self.p.returncode}) before {needle!r}:\n{text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.log.name}: no {needle!r} within {timeout}s:\n{self.text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        self.kill(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            return self.p.wait(5)
        finally:
            self._fh.close()


class Swarm:
    """Start/stop a coordinator and workers; everything is killed on close."""

    def __init__(self, tmp: Path, config: Path):
        self.tmp, self.config = tmp, config
        self.procs: list[Proc] = []
        self.address = ""
        self.token = subprocess.run([str(BIN / "gptjt"), "token", "create", "--config", str(config)],
                                    capture_output=True, text=True, check=True).stdout.strip()
        self._n = 0

    def start_coordinator(self, *extra: str) -> Proc:
        port_file = self.tmp / "port"
        port_file.unlink(missing_ok=True)
        self._n += 1
        proc = Proc([str(BIN / "gptjt-coordinator"), "--config", str(self.config), "--port-file", str(port_file),
                     *extra], self.tmp / f"coordinator-{self._n}.log", self.tmp)
        self.procs.append(proc)
        proc.wait_for("listening on", 60)
        self.address = port_file.read_text().strip()
        return proc

    def start_worker(self, name: str, token: str | None = None, *extra: str, env: dict | None = None) -> Proc:
        proc = Proc([str(BIN / "gptjt-worker"), "--join", self.address, "--token", self.token if token is None else token,
                     "--threads", "1", "--name", name, *extra], self.tmp / f"worker-{name}.log", self.tmp, env)
        self.procs.append(proc)
        return proc

    def status(self) -> dict:
        out = subprocess.run([str(BIN / "gptjt"), "status", "--coordinator", self.address, "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait(self, predicate, timeout: float = 120.0, what: str = "condition") -> dict:
        from gptjt_cli.swarm_commands import fetch_status

        deadline = time.monotonic() + timeout
        status = {}
        while time.monotonic() < deadline:
            try:
                status = fetch_status(self.address, timeout=5)
                if predicate(status):
                    return status
            except RuntimeError:
                pass
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.log.name}\n{p.text()[-2000:]}" for p in self.procs)
        raise AssertionError(f"timed out waiting for {what}; last status phase={status.get('phase')} "
                             f"step={status.get('step')}\n{logs}")

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stop(timeout=10)
            except Exception:
                pass
            try:  # the process group: hivemind's p2pd daemons go with their worker
                os.killpg(proc.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def local_losses(config: Path, steps: int) -> tuple[list[float], dict]:
    """train-local on the same run config: the reference the swarm must reproduce."""
    from gptjt_core.config import load_run_config
    from gptjt_core.trainer import LocalTrainer

    run = load_run_config(config)
    out = config.parent / "local"
    shutil.rmtree(out, ignore_errors=True)
    trainer = LocalTrainer(run, out)
    losses = [trainer.train_step().loss for _ in range(steps)]
    return losses, trainer.model.state_dict()
