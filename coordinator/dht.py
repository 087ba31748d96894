"""The run's bootstrap DHT peer: hivemind in a supervised child process that dies with the coordinator.

Replicas of a stage find each other through a hivemind DHT. Two things keep that network one
network across coordinator restarts:
- the peer keeps its identity (a key file beside the ledger) and its port (recorded beside the
  ledger on first start), so the address workers were given stays valid;
- on start it bootstraps from the live workers' own DHT peers, which the ledger records from
  their heartbeats: a restarted coordinator joins the network its workers already form, and
  joiners are handed those peers too (see RunLedger.dht_peers).

The peer runs in a SPAWNED process of its own process group, whose children (hivemind's DHT
process and its p2pd daemon) join that group. A watchdog thread there kills the whole group
when the coordinator dies, SIGKILL included; the group id is kept in a file beside the ledger
so the next start reaps a group whose watchdog itself was killed.

The peer serves run members only: it signs its DHT requests with a token of the run's DHT
authority and answers only requests that carry one (coordinator/dht_authority.py,
gptjt_core/dht_authorizer.py).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path

from gptjt_core.dht_auth import DhtCredentials
from gptjt_core.sidecar import become_group_leader, private_socket_dir, remove_socket_dir

log = logging.getLogger(__name__)

def host_maddr(listen: str, port: int = 0) -> str:
    """The multiaddr to listen on for a coordinator listening on `listen` (host:port)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        return f"/ip{ip.version}/{host}/tcp/{port}"
    except ValueError:  # a host name: listen on every interface
        return f"/ip4/0.0.0.0/tcp/{port}"


def _port_of(maddrs: list[str]) -> int:
    for maddr in maddrs:
        parts = maddr.split("/")
        if "tcp" in parts:
            return int(parts[parts.index("tcp") + 1])
    return 0


def _serve(conn, parent_pid: int, maddr: str, identity_path: str, initial_peers: list[str], socket_dir: str,
           credentials: DhtCredentials) -> None:
    become_group_leader(parent_pid)  # hivemind's children join our group, and die with it
    mp.set_start_method("fork", force=True)  # hivemind forks its DHT process (no threads but ours yet)
    import hivemind
    from hivemind.p2p import P2P

    from gptjt_core.dht_authorizer import RunMemberAuthorizer

    P2P._UNIX_SOCKET_PREFIX = f"/unix{socket_dir}/hivemind-"  # not /tmp: the coordinator removes the directory
    authorizer = RunMemberAuthorizer(credentials)  # hivemind's DHT process is forked: it inherits this

    any_port = maddr.rsplit("/", 1)[0] + "/0"
    attempts = [(maddr, initial_peers), (maddr, []), (any_port, [])]  # the recorded port, alone, anywhere
    dht, error = None, None
    for listen, peers in attempts if initial_peers else attempts[1:]:
        try:
            dht = hivemind.DHT(initial_peers=peers or None, host_maddrs=[listen], identity_path=identity_path,
                               check_if_identity_free=False, authorizer=authorizer, start=True)
            break
        except Exception as e:  # the port is taken, or no bootstrap peer answered (they may all be gone)
            error = e
    if dht is None:
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", [str(a) for a in dht.get_visible_maddrs()]))
    try:
        conn.recv()  # "stop", or EOF when the coordinator is gone
    except EOFError:
        pass
    dht.shutdown()


class CoordinatorDHT:
    """The bootstrap peer of the run's DHT. `maddrs`: its multiaddrs, handed to workers."""

    def __init__(self, listen: str, state_path: str, credentials: DhtCredentials,
                 initial_peers: list[str] | None = None, ready_timeout_s: float = 60.0):
        """credentials: the peer's DHT key and token (DhtAuthority.own_credentials())."""
        self._record = Path(f"{state_path}.dht.json")
        identity = f"{state_path}.dht-identity"
        saved = self._read_record()
        reap_group(saved.get("pgid", 0))
        ctx = mp.get_context("spawn")
        self._socket_dir = private_socket_dir()
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, name="gptjt-coordinator-dht",
                                    args=(child, os.getpid(), host_maddr(listen, saved.get("port", 0)), identity,
                                          list(initial_peers or []), self._socket_dir, credentials))
        self._process.start()
        child.close()
        if not self._conn.poll(ready_timeout_s):
            self.shutdown()
            raise RuntimeError(f"the coordinator's DHT did not start within {ready_timeout_s:.0f} s")
        status, detail = self._conn.recv()
        if status != "ready":
            self.shutdown()
            raise RuntimeError(f"the coordinator's DHT could not start: {detail}")
        self.maddrs: list[str] = detail
        self._record.write_text(json.dumps({"port": _port_of(self.maddrs), "pgid": self._process.pid}))

    def _read_record(self) -> dict:
        try:
            return json.loads(self._record.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def shutdown(self) -> None:
        try:
            self._conn.send("stop")
        except (OSError, BrokenPipeError):
            pass
        self._process.join(10)
        reap_group(self._process.pid)
        remove_socket_dir(self._socket_dir)


def reap_group(pgid: int) -> None:
    """Kill what is left of a DHT process group of an earlier coordinator (a watchdog that was
    itself killed), if that group still runs hivemind (process ids are reused)."""
    if pgid <= 0:
        return
    ours = False
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        ours |= b"p2pd" in cmd or b"multiprocessing" in cmd or b"gptjt" in cmd
    if ours:
        try:
            os.killpg(pgid, signal.SIGKILL)
            log.warning("killed process group %d left by an earlier coordinator's DHT", pgid)
        except (ProcessLookupError, PermissionError):
            pass
