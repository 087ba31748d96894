"""A swarm on this machine: a coordinator and workers as child processes on loopback (demo, bench)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


class LocalSwarm:
    """Starts the real console scripts; `stop()` drains the workers, then stops the coordinator."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.address = ""
        self.dashboard_url = ""

    def _spawn(self, args: list[str], log_name: str, threads: int | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.Popen(args, stdout=open(self.workdir / log_name, "w"), stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_coordinator(self, state: Path, steps: int, config: Path | None = None, timeout: float = 60.0) -> str:
        """Start `gptjt-coordinator` on a free loopback port; returns its host:port."""
        addr_file = self.workdir / "coordinator.addr"
        addr_file.unlink(missing_ok=True)
        args = [str(BIN / "gptjt-coordinator"), "--state", str(state), "--listen", "127.0.0.1:0",
                "--steps", str(steps), "--port-file", str(addr_file),
                "--dashboard-file", str(self.workdir / "dashboard.url")]
        proc = self._spawn(args + (["--config", str(config)] if config else []), "coordinator.log", threads=1)
        deadline = time.monotonic() + timeout
        while not (addr_file.is_file() and addr_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "coordinator.log").read_text()[-2000:]
                raise RuntimeError(f"the coordinator did not start; its log ends:\n{log}")
            time.sleep(0.1)
        self.address = addr_file.read_text().strip()
        url_file = self.workdir / "dashboard.url"
        until = time.monotonic() + 3.0  # written right after the gRPC port (unless dashboard_port = -1)
        while not url_file.is_file() and proc.poll() is None and time.monotonic() < until:
            time.sleep(0.05)
        self.dashboard_url = url_file.read_text().strip() if url_file.is_file() else ""
        return self.address

    def start_worker(self, token: str, name: str, threads: int = 0, device: str = "cpu") -> subprocess.Popen:
        args = [str(BIN / "gptjt-worker"), "--join", self.address, "--token", token, "--device", device,
                "--name", name]
        if threads:
            args += ["--threads", str(threads)]
        return self._spawn(args, f"{name}.log", threads or None)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{Path(p.args[0]).name} exited with code {p.returncode}; logs in {self.workdir}")

    def stop(self, timeout: float = 30.0) -> None:
        for p in reversed(self.procs):  # workers first (they drain and leave), the coordinator last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()


def small_run_toml(tmp: Path, steps: int = 3, num_stages: int = 2, global_batch: int = 4, micro_batch: int = 2,
                   seq_len: int = 64, port: int = 0, timeout_s: float = 3.0, extra: str = "",
                   checkpoint_every: int = 0, replicas_per_stage: int = 1, start_with_replicas: int = 1,
                   interval_s: float = 0.5, placement: str = "even", min_workers: int = 0) -> Path:
    """tmp/run.toml: a small fp32 run of the tiny flavour on the bundled wiki text, with heartbeats
    fast enough for fault drills (tests and benchmarks). `extra` is appended to the [coordinator] table (more keys, or more sections).
    placement 'even' (the default here) keeps the layer ranges the drills expect; the
    cost-model scheduler has its own tests."""
    repo = Path(__file__).resolve().parent.parent
    path = tmp / "run.toml"
    path.write_text(f"""
name = "test-swarm"
[model]
source = "random:tiny:0"
[data]
num_shards = 2
shuffle_buffer = 0
[[data.sources]]
name = "wiki"
path = "{repo / 'data' / 'demo' / 'wiki.jsonl.gz'}"
weight = 1.0
[optim]
lr = 2e-3
warmup_steps = 1
[train]
global_batch = {global_batch}
micro_batch = {micro_batch}
seq_len = {seq_len}
steps = {steps}
precision = "fp32"
checkpoint_every = {checkpoint_every}
[pipeline]
num_stages = {num_stages}
activation_codec = "fp32"
gradient_codec = "fp32"
replicas_per_stage = {replicas_per_stage}
start_with_replicas = {start_with_replicas}
[scheduler]
placement = "{placement}"
min_workers = {min_workers}
[coordinator]
listen = "127.0.0.1:{port}"
state_path = "run.db"
heartbeat_interval_s = {interval_s}
heartbeat_timeout_s = {timeout_s}
{extra}
""")
    return path
