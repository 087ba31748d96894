"""LocalSwarm: start, signal, restart and stop a coordinator and its workers on this machine."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from .process import BIN, SwarmProcess


class SwarmFailed(RuntimeError):
    """A swarm process exited, or the run did not reach what was waited for; names the logs."""


def fetch_status(address: str, timeout: float = 10.0, read_token: str = "") -> dict:
    """The coordinator's status object (`gptjt status --json`); RuntimeError when unreachable or
    refused (read_token: the run's, where coordinator.read_access = "token")."""
    return json.loads(fetch_status_json(address, timeout, read_token))


def fetch_status_json(address: str, timeout: float = 10.0, read_token: str = "") -> str:
    """fetch_status's JSON text, unparsed (bench heartbeat's poller: the parse of a 6 MB status
    is the operator's machine's work, not the coordinator's)."""
    import grpc

    from coordinator.sessions import READ_TOKEN
    from gptjt_cli.operator_client import STATUS_OPTIONS, CommandError, status_json
    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    metadata = ((READ_TOKEN, read_token),) if read_token else ()
    with grpc.insecure_channel(address, options=STATUS_OPTIONS) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(accept_gzip=True), timeout=timeout,
                                                             metadata=metadata)
        except grpc.RpcError as e:
            raise RuntimeError(f"coordinator {address} did not answer Status: {e.code().name}") from None
    try:
        return status_json(reply, address)
    except CommandError as e:
        raise RuntimeError(str(e)) from None


class LocalSwarm:
    """A coordinator and workers as console-script processes in `workdir` (logs land there).

    config: a run TOML (None: the embedded tiny demo run). The coordinator's ledger is the
    config's state_path unless `state` is given. Every process is killed by `close()`; `stop()`
    first lets workers drain and the coordinator shut down as an operator's SIGTERM would.
    """

    def __init__(self, workdir: Path, config: Path | None = None, state: Path | None = None,
                 env: dict | None = None):
        # Absolute, because every process runs in `workdir`: a relative --state or --port-file
        # (`gptjt demo`'s default runs/demo) would name another file there than here.
        self.workdir = Path(workdir).resolve()
        self.config = Path(config).resolve() if config is not None else None
        self.state = Path(state).resolve() if state is not None else None
        self.env = env or {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[SwarmProcess] = []
        self.coordinator: SwarmProcess | None = None
        self.address = ""
        self.dashboard_url = ""
        self._token = ""
        self.expected_exits: list[SwarmProcess] = []  # killed on purpose
        self._coordinator_args: list[str] = []
        self._starts = 0

    # -- the run's join token ------------------------------------------------------------
    @property
    def ledger_path(self) -> Path:
        """The state path: the SQLite ledger, and the base name of the run's keys and tokens."""
        if self.state is not None:
            return self.state
        # a run file's state_path is absolute once loaded (relative to the file); the embedded
        # demo run's is relative to the coordinator's working directory, which is workdir
        return self.workdir / self._run().coordinator.state_path

    @property
    def ledger_location(self) -> str | Path:
        """Where the ledger lives: the config's coordinator.ledger_url (PostgreSQL), else ledger_path."""
        return self._run().coordinator.ledger_url or self.ledger_path

    def _run(self):
        from gptjt_core.config import load_run_config, tiny_demo_config

        return load_run_config(self.config) if self.config else tiny_demo_config()

    @property
    def admin_token(self) -> str:
        """The run's admin token, which the coordinator keeps beside the ledger (once it has started)."""
        return Path(f"{self.ledger_path}.admin-token").read_text().strip()

    @property
    def read_token(self) -> str:
        """The run's read token, where the coordinator has one (coordinator.read_access = "token"): its
        $GPTJT_READ_TOKEN (this swarm's env), else the file it created beside the ledger; "" if neither."""
        if self.env.get("GPTJT_READ_TOKEN"):
            return self.env["GPTJT_READ_TOKEN"].strip()
        path = Path(f"{self.ledger_path}.read-token")
        return path.read_text().strip() if path.is_file() else ""

    @property
    def token(self) -> str:
        """A join token, created in the ledger on first use (a coordinator need not run yet)."""
        if not self._token:
            from coordinator.ledger import create_token_in

            self._token = create_token_in(self.ledger_location)
        return self._token

    # -- starting ------------------------------------------------------------------------
    def start_coordinator(self, *extra: str, steps: int | None = None, listen: str | None = None,
                          timeout: float = 60.0) -> SwarmProcess:
        """Start `gptjt-coordinator` and wait until it listens; `extra` are more CLI flags.
        listen: host:port (default: the config's; the tests' configs use port 0)."""
        port_file = self.workdir / "coordinator.addr"
        args = [str(BIN / "gptjt-coordinator"), "--port-file", str(port_file),
                "--dashboard-file", str(self.workdir / "dashboard.url")]
        if self.config is not None:
            args += ["--config", str(self.config)]
        if self.state is not None:
            args += ["--state", str(self.state)]
        if steps is not None:
            args += ["--steps", str(steps)]
        if listen is not None:
            args += ["--listen", listen]
        self._coordinator_args = args + list(extra)
        self.token  # created now, before an operator action could be recorded after it
        return self._launch_coordinator(timeout)

    def restart_coordinator(self, timeout: float = 60.0) -> SwarmProcess:
        """Start the coordinator again with the same flags, on the address it had (workers
        reconnect there); the previous one must be gone (killed or stopped)."""
        if self.coordinator is not None and self.coordinator.alive:
            raise RuntimeError("the coordinator is still running; kill or stop it first")
        args = list(self._coordinator_args)
        if "--listen" in args:
            args[args.index("--listen") + 1] = self.address
        else:
            args += ["--listen", self.address]
        self._coordinator_args = args
        return self._launch_coordinator(timeout)

    def _launch_coordinator(self, timeout: float) -> SwarmProcess:
        self._starts += 1
        port_file = self.workdir / "coordinator.addr"
        port_file.unlink(missing_ok=True)  # written again once the new one listens
        proc = SwarmProcess(self._coordinator_args, self.workdir / f"coordinator-{self._starts}.log", self.workdir,
                            {"OMP_NUM_THREADS": "1", **self.env})
        self.procs.append(proc)
        self.coordinator = proc
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if not proc.alive or time.monotonic() > deadline:
                raise SwarmFailed(f"the coordinator did not start; its log ends:\n{proc.text()[-3000:]}")
            time.sleep(0.1)
        self.address = port_file.read_text().strip()
        url_file = self.workdir / "dashboard.url"  # written before the port file (none if dashboard_port = -1)
        self.dashboard_url = url_file.read_text().strip() if url_file.is_file() else ""
        return proc

    def start_worker(self, name: str, token: str | None = None, *extra: str, threads: int = 1,
                     device: str = "cpu", env: dict | None = None, join: str = "") -> SwarmProcess:
        """Start `gptjt-worker --join` the coordinator as `name` (log: worker-NAME.log); `extra`
        are more CLI flags. token: None for the swarm's own. threads: torch CPU threads (0:
        torch's default, every core). join: the addresses to join (default: the coordinator's)."""
        args = [str(BIN / "gptjt-worker"), "--join", join or self.address, "--token", self.token if token is None else token,
                "--name", name, "--device", device, *extra]
        if threads:
            args += ["--threads", str(threads)]
        proc_env = {**self.env, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
        proc = SwarmProcess(args, self.workdir / f"worker-{name}.log", self.workdir, proc_env)
        self.procs.append(proc)
        return proc

    def operate(self, *command: str) -> str:
        """An admin command of the operator CLI on this run (`gptjt pause`, `resume`, `drain NAME`);
        its output. Raises SwarmFailed with the CLI's error when it fails."""
        done = subprocess.run([str(BIN / "gptjt"), *command, "--coordinator", self.address,
                               "--admin-token", self.admin_token], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SwarmFailed(f"gptjt {' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def set_paused(self, paused: bool) -> None:
        """`gptjt pause` / `resume` as one RPC from this process: a CLI process takes ~2 s to start
        on two loaded cores, in which a short run moves on a step or two."""
        from gptjt_cli.operator_client import call_operator
        from gptjt_proto import operator_pb2 as opb

        try:
            call_operator(self.address, "SetPaused", opb.PauseRequest(admin_token=self.admin_token, paused=paused))
        except RuntimeError as e:
            raise SwarmFailed(f"{'pause' if paused else 'resume'} of {self.address} failed: {e}") from None

    def export(self, out: Path) -> str:
        """The run's weights, gathered from its workers (each stage the mean of its members'), as a Hugging
        Face checkpoint in `out` (`gptjt export --coordinator`)."""
        done = subprocess.run([str(BIN / "gptjt"), "export", "--coordinator", self.address, "--out", str(out),
                               "--admin-token", self.admin_token], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SwarmFailed(f"gptjt export failed ({done.returncode}): {done.stderr[-2000:]}")
        return str(out)

    # -- watching ------------------------------------------------------------------------
    def status(self, timeout: float = 10.0) -> dict:
        return fetch_status(self.address, timeout, self.read_token)

    def workers(self) -> list[SwarmProcess]:
        return [p for p in self.procs if p is not self.coordinator and p.name.startswith("worker-")]

    def check_alive(self) -> None:
        """SwarmFailed if a process exited that nobody stopped on purpose (see `kill`)."""
        for p in self.procs:
            if not p.alive and p not in self.expected_exits:
                raise SwarmFailed(f"{p.log.name} exited with code {p.p.returncode}; logs in {self.workdir}:\n"
                                  f"{p.text()[-2000:]}")

    def kill(self, proc: SwarmProcess, sig: int = signal.SIGKILL) -> None:
        """Signal one process on purpose (a drill): check_alive() will not count its exit."""
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self.expected_exits.append(proc)
        proc.kill(sig)

    def wait(self, predicate, timeout: float = 120.0, what: str = "condition", check_alive: bool = False,
             poll_s: float = 0.2) -> dict:
        """Poll the status until `predicate(status)`; SwarmFailed (an AssertionError for tests)
        with every log's end if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            if check_alive:
                self.check_alive()
            try:
                status = fetch_status(self.address, timeout=5, read_token=self.read_token)
                if predicate(status):
                    return status
            except RuntimeError:
                pass  # a coordinator restarting
            time.sleep(poll_s)
        raise SwarmFailed(f"timed out waiting for {what}; last status phase={status.get('phase')} "
                          f"step={status.get('step')}\n{self.logs_tail()}")

    def logs_tail(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.text()[-chars:]}" for p in self.procs)

    # -- stopping ------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM workers first (they drain and leave), the coordinator last, then kill what is
        left of every process group."""
        workers = [p for p in self.procs if p is not self.coordinator]
        self._terminate(workers, timeout)
        self._terminate([p for p in self.procs if p not in workers], timeout)
        self.close()

    def close(self, grace_s: float = 3.0) -> None:
        """SIGTERM every process, SIGKILL what is left after `grace_s`, with its session (hivemind's
        p2pd daemons go with their worker). A worker stopped mid-run drains, waiting for a step
        boundary of a coordinator that is stopping too: nothing it would save is needed here, so
        the grace is short (it was 10 s a swarm, minutes over the suite)."""
        self._terminate(self.procs, grace_s)
        for p in self.procs:
            p.kill_group()

    def _terminate(self, procs: list[SwarmProcess], timeout: float) -> None:
        self.expected_exits.extend(procs)
        for p in procs:
            p.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.p.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                p.kill(signal.SIGKILL)
