"""A home network behind NAT, in Linux network namespaces, with a 2-stage swarm across it.

    [public 10.N.0.1]  --veth--  [router 10.N.0.2 | 10.N.1.1]  --veth--  [home 10.N.1.2]
     coordinator + relay           forwards; MASQUERADE out               stage-1 worker
     stage-0 worker                to the public side

The home namespace reaches the public side through the router's masquerading NAT; the public
side has no route back into the home network (no port forwarding), so nothing there can open
a connection to the home worker: it serves its stage through the coordinator's relay. With
`direct=True` the public side gets that route (a forwarded port, as it were): the home worker
is reachable and needs no relay. Used by tests/integration/test_nat.py and `gptjt bench nat`.
Needs root, iproute2 and iptables; `NatLab.unavailable()` says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .process import BIN, SwarmProcess
from .run_toml import small_run_toml

_STATUS = """
import json, sys, time
from gptjt_cli.swarm_commands import fetch_status
address, deadline, status = sys.argv[1], time.monotonic() + float(sys.argv[2]), {}
while time.monotonic() < deadline:
    try:
        status = fetch_status(address, timeout=5)
    except RuntimeError:
        status = {}
    if status.get("phase") == "done":
        break
    time.sleep(0.2)
print(json.dumps(status))
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a network-setup command (ip, iptables, tc); RuntimeError with its stderr if it fails."""
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


class NatLab:
    """The three namespaces and their links; a context manager that removes them."""

    def __init__(self, direct: bool = False):
        pid = os.getpid() % 100000
        self.direct = direct
        self.ns = {role: f"gjn{pid}{role[0]}" for role in ("public", "router", "home")}
        n = 20 + os.getpid() % 200
        self.public_ip, self.router_public_ip = f"10.{n}.0.1", f"10.{n}.0.2"
        self.router_home_ip, self.home_ip = f"10.{n}.1.1", f"10.{n}.1.2"
        self.home_net = f"10.{n}.1.0/24"
        self._created: list[str] = []

    @staticmethod
    def unavailable() -> str:
        """Why this machine cannot build the lab ('' if it can)."""
        if os.geteuid() != 0:
            return "needs root (network namespaces, NAT)"
        missing = [t for t in ("ip", "iptables") if not shutil.which(t)]
        return f"needs {' and '.join(missing)} (iproute2, iptables)" if missing else ""

    def exec(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role]]

    def __enter__(self) -> NatLab:
        try:
            for ns in self.ns.values():
                sh("ip", "netns", "add", ns)
                self._created.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            pub, rtr, home = self.ns["public"], self.ns["router"], self.ns["home"]
            for a, b, ip_a, ip_b, name in ((pub, rtr, self.public_ip, self.router_public_ip, "p"),
                                           (home, rtr, self.home_ip, self.router_home_ip, "h")):
                va, vb = f"{a}{name}", f"{b}{name}"[-15:]
                sh("ip", "link", "add", va[-15:], "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
                sh("ip", "-n", a, "addr", "add", f"{ip_a}/24", "dev", va[-15:])
                sh("ip", "-n", b, "addr", "add", f"{ip_b}/24", "dev", vb)
                sh("ip", "-n", a, "link", "set", va[-15:], "up")
                sh("ip", "-n", b, "link", "set", vb, "up")
            sh("ip", "-n", home, "route", "add", "default", "via", self.router_home_ip)
            sh(*self.exec("router"), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            sh(*self.exec("router"), "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", self.home_net,
                "-j", "MASQUERADE")
            if self.direct:  # a route back in: the home worker is reachable from the public side
                sh("ip", "-n", pub, "route", "add", self.home_net, "via", self.router_public_ip)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self._created:
            sh("ip", "netns", "del", ns, check=False)
        self._created = []


class NatSwarm:
    """A 2-stage tiny run across the lab: coordinator, relay and stage 0 public; stage 1 at home."""

    def __init__(self, lab: NatLab, workdir: Path, steps: int = 4, extra: str = ""):
        from coordinator.ledger import create_token_in
        from gptjt_core.config import load_run_config

        self.lab, self.workdir, self.steps = lab, workdir, steps
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = small_run_toml(workdir, steps=steps, extra=f'relay_listen = "{lab.public_ip}:0"\n{extra}')
        self.config.write_text(self.config.read_text().replace('listen = "127.0.0.1:0"',
                                                               f'listen = "{lab.public_ip}:0"', 1))
        self.token = create_token_in(load_run_config(self.config).coordinator.state_path)
        self.procs: list[SwarmProcess] = []
        self.address = self.relay = ""

    def start(self) -> None:
        coordinator = self._spawn("public", [str(BIN / "gptjt-coordinator"), "--config", str(self.config),
                                             "--port-file", str(self.workdir / "port")], "coordinator")
        text = coordinator.wait_for("relay for workers behind NAT on", 60)
        self.address = coordinator.wait_for_file(self.workdir / "port", 10)
        self.relay = text.split("relay for workers behind NAT on ", 1)[1].split()[0]
        for name, role, ip in (("public", "public", self.lab.public_ip), ("home", "home", self.lab.home_ip)):
            proc = self._spawn(role, [str(BIN / "gptjt-worker"), "--join", self.address, "--token", self.token,
                                      "--threads", "1", "--name", name, "--listen", f"{ip}:0",
                                      "--relay", self.relay], f"worker-{name}")
            proc.wait_for("joined", 120)  # in order: the public worker takes stage 0, home stage 1

    def _spawn(self, role: str, args: list[str], name: str) -> SwarmProcess:
        proc = SwarmProcess([*self.lab.exec(role), *args], self.workdir / f"{name}.log", self.workdir)
        self.procs.append(proc)
        return proc

    def wait_done(self, timeout: float) -> dict:
        """The run's status once it is done (read from the public side); AssertionError with the
        logs if it does not finish in time."""
        out = subprocess.run([*self.lab.exec("public"), sys.executable, "-c", _STATUS, self.address, str(timeout)],
                             capture_output=True, text=True, timeout=timeout + 60, cwd=self.workdir)
        status = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}
        if status.get("phase") != "done":
            logs = "\n".join(f"--- {p.log.name}\n{p.text()[-2500:]}" for p in self.procs)
            raise AssertionError(f"the NAT run did not finish within {timeout}s (phase={status.get('phase')}): "
                                 f"{out.stderr[-800:]}\n{logs}")
        return status

    def close(self) -> None:
        for proc in self.procs:
            proc.kill(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proc.kill_group()  # whatever it left behind (closes its log too)
            proc.p.wait(5)
