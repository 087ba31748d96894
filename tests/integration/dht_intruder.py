"""Peers for the DHT part of the hostile test: a run member, then outsiders, against the run's DHT.

Usage: python -m tests.integration.dht_intruder SETUP.json  (written by test_hostile.py: the
member's key and the token Join returned for it, the authority's public key, the run's
authority key file, the coordinator's DHT multiaddrs). Prints one JSON line of what each peer's
direct store and find RPCs (hivemind DHTProtocol.call_store / call_find) got from the
coordinator's DHT peer and from the member's, and what the member holds afterwards.

Outsiders: "none" (a plain hivemind peer), "foreign" (a valid token of another authority) and
"expired" (a token the run's authority signed that has expired). The last two are hostile:
they present their token unchecked and believe any answer, so a refusal can only come from
the run's side.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys

import torch.multiprocessing

os.environ["HIVEMIND_MEMORY_SHARING_STRATEGY"] = torch.multiprocessing.get_sharing_strategy()

import hivemind  # noqa: E402  (after the sharing strategy is set)
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402

from gptjt_core.dht_auth import DhtCredentials, DhtToken, dht_public_key, issue_token, new_dht_key  # noqa: E402
from gptjt_core.dht_authorizer import RunMemberAuthorizer, access_token  # noqa: E402

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Hostile(RunMemberAuthorizer):
    """Presents its token whatever it is, and takes any answer as valid."""

    async def get_token(self):
        return access_token(self.credentials.token)

    def is_token_valid(self, access_token) -> bool:
        return True

    def does_token_need_refreshing(self, access_token) -> bool:
        return False


async def store_at(dht, node, peer: str, key: str, value: str):
    """One store RPC to `peer`: [True] if it stored, None if it did not answer (or refused)."""
    stored = await node.protocol.call_store(PeerID.from_base58(peer), [DHTID.generate(source=key)],
                                            [node.protocol.serializer.dumps(value)], get_dht_time() + 300)
    return None if stored is None else list(stored)


async def find_at(dht, node, peer: str, key: str):
    """One find RPC to `peer`: "found", "not found", or None if it did not answer (or refused)."""
    result = await node.protocol.call_find(PeerID.from_base58(peer), [DHTID.generate(source=key)])
    if result is None:
        return None
    (value, _), = result.values()
    return "found" if value is not None else "not found"


async def held(dht, node, key: str) -> bool:
    """Whether this peer's own storage holds `key`."""
    return node.protocol.storage.get(DHTID.generate(source=key)) is not None


def outsider_authorizer(kind: str, authority_key_file: str):
    key = new_dht_key()
    if kind == "none":
        return None
    if kind == "foreign":
        other = new_dht_key()
        return Hostile(DhtCredentials(key, issue_token(other, "mallory", dht_public_key(key), 3600),
                                      dht_public_key(other)))
    authority = open(authority_key_file, "rb").read()
    an_hour_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    lapsed = issue_token(authority, "0123456789ab", dht_public_key(key), 60, now=an_hour_ago)
    return Hostile(DhtCredentials(key, lapsed, dht_public_key(authority)))


def attempts(dht, targets: dict[str, str], kind: str) -> dict:
    """What `dht` gets when it stores its own key at each target and looks up the member's record."""
    out = {}
    for name, peer in targets.items():
        out[f"store_at_{name}"] = dht.run_coroutine(functools.partial(
            store_at, peer=peer, key=f"gptjt_hostile_{kind}", value=f"poison from {kind}"))
        out[f"find_at_{name}"] = dht.run_coroutine(functools.partial(find_at, peer=peer, key="gptjt_hostile_member"))
    out["get"] = dht.get("gptjt_hostile_member", latest=True) is not None
    return out


def main() -> None:
    setup = json.loads(open(sys.argv[1]).read())
    P2P._UNIX_SOCKET_PREFIX = f"/unix{os.path.dirname(os.path.abspath(sys.argv[1]))}/hivemind-"  # not /tmp
    t = setup["token"]
    member_credentials = DhtCredentials(bytes.fromhex(setup["key"]), DhtToken(
        t["username"], bytes.fromhex(t["public_key"]), t["expiration_time"], bytes.fromhex(t["signature"])),
        bytes.fromhex(setup["authority_key"]))
    coordinator = setup["coordinator_maddrs"][0].rsplit("/p2p/", 1)[1]
    member = hivemind.DHT(initial_peers=setup["coordinator_maddrs"], host_maddrs=LOOPBACK,
                          authorizer=RunMemberAuthorizer(member_credentials), start=True)
    report = {"member": {"store_at_coordinator": member.run_coroutine(functools.partial(
        store_at, peer=coordinator, key="gptjt_hostile_member", value="member's record"))}}
    report["member"]["find_at_coordinator"] = member.run_coroutine(
        functools.partial(find_at, peer=coordinator, key="gptjt_hostile_member"))
    targets = {"coordinator": coordinator, "member": str(member.peer_id)}
    peers = setup["coordinator_maddrs"] + [str(a) for a in member.get_visible_maddrs()]
    for kind in ("none", "foreign", "expired"):
        outsider = hivemind.DHT(initial_peers=peers, host_maddrs=LOOPBACK, ensure_bootstrap_success=False,
                                authorizer=outsider_authorizer(kind, setup["authority_key_file"]), start=True)
        try:
            report[kind] = attempts(outsider, targets, kind)
        finally:
            outsider.shutdown()
        key = f"gptjt_hostile_{kind}"
        report[kind]["held_by_member"] = member.run_coroutine(functools.partial(held, key=key))
        report[kind]["member_finds_at_coordinator"] = member.run_coroutine(
            functools.partial(find_at, peer=coordinator, key=key))
    report["member"]["get"] = member.get("gptjt_hostile_member", latest=True) is not None
    member.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
