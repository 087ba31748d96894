"""The run's DHT access tokens (gptjt_core/dht_auth.py) and hivemind's authorizer over them (dht_authorizer.py).

A request counts only with a token the run's authority signed, not expired, a signature by the
token's key, and a nonce not seen before; the same for responses. The hostile peers here sign
their requests exactly as hivemind's TokenAuthorizerBase.sign_request does.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pickle
import secrets

import pytest
import torch.multiprocessing

from gptjt_core.dht_auth import (DhtCredentials, DhtToken, dht_public_key, issue_token, new_dht_key, sign,
                                 token_problem)

# hivemind switches torch's sharing strategy when imported; keep this process's (as the sidecars do)
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", torch.multiprocessing.get_sharing_strategy())

UTC = datetime.timezone.utc
AUTHORITY, OTHER_AUTHORITY, ALICE, BOB, MALLORY = (new_dht_key() for _ in range(5))
RUN_KEY = dht_public_key(AUTHORITY)


def member(credentials: DhtCredentials):
    """hivemind's authorizer over `credentials` (a peer of the run, or of another)."""
    from gptjt_core.dht_authorizer import RunMemberAuthorizer

    return RunMemberAuthorizer(credentials)


def credentials(key: bytes, name: str, authority: bytes = AUTHORITY, lifetime_s: float = 3600.0) -> DhtCredentials:
    return DhtCredentials(key, issue_token(authority, name, dht_public_key(key), lifetime_s), RUN_KEY)


def other_runs_peer():
    """Mallory, a member of another run: a valid token of another authority."""
    return member(DhtCredentials(MALLORY, issue_token(OTHER_AUTHORITY, "m", dht_public_key(MALLORY), 60),
                                 dht_public_key(OTHER_AUTHORITY)))


def expired_token(key: bytes, name: str) -> DhtToken:
    """A token the run's authority really signed, an hour ago, for a minute."""
    return issue_token(AUTHORITY, name, dht_public_key(key), 60.0,
                       now=datetime.datetime.now(UTC) - datetime.timedelta(hours=1))


# -- the tokens, without hivemind ----------------------------------------------------------------
def test_a_token_of_the_authority_is_valid_until_it_expires():
    token = issue_token(AUTHORITY, "0123456789ab", dht_public_key(ALICE), 60.0)
    assert token_problem(token, RUN_KEY) == ""
    later = datetime.datetime.now(UTC) + datetime.timedelta(seconds=61)
    assert "expired at" in token_problem(token, RUN_KEY, now=later)
    assert "expired at" in token_problem(expired_token(ALICE, "a"), RUN_KEY)


def test_a_token_of_another_signer_or_altered_is_refused():
    foreign = issue_token(OTHER_AUTHORITY, "mallory", dht_public_key(MALLORY), 60.0)
    assert "not signed by this run's DHT authority" in token_problem(foreign, RUN_KEY)
    good = issue_token(AUTHORITY, "alice", dht_public_key(ALICE), 60.0)
    for altered in (DhtToken("bob", good.public_key, good.expiration_time, good.signature),
                    DhtToken(good.username, dht_public_key(MALLORY), good.expiration_time, good.signature),
                    DhtToken(good.username, good.public_key, "2999-01-01T00:00:00+00:00", good.signature),
                    DhtToken(good.username, good.public_key, good.expiration_time, b"not base64 !")):
        assert "not signed by this run's DHT authority" in token_problem(altered, RUN_KEY)
    unsigned = DhtToken("alice", good.public_key, "tomorrow")
    assert token_problem(DhtToken("", b"", ""), RUN_KEY) == "the token names no member or no key"
    assert "not signed" in token_problem(unsigned, RUN_KEY)


def test_the_authority_signs_only_rsa_keys_of_2048_bits_or_more():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def openssh(key) -> bytes:
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    with pytest.raises(ValueError, match="1024 bits is too short"):
        issue_token(AUTHORITY, "a", openssh(rsa.generate_private_key(public_exponent=65537, key_size=1024)), 60)
    with pytest.raises(ValueError, match="an RSA key is needed"):
        issue_token(AUTHORITY, "a", openssh(ec.generate_private_key(ec.SECP256R1())), 60)
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        issue_token(AUTHORITY, "a", b"ssh-rsa AAAA garbage", 60)


# -- hivemind's authorizer over them --------------------------------------------------------------
def store_request():
    from hivemind.proto import dht_pb2

    return dht_pb2.StoreRequest(keys=[b"gptjt_run_stage0.0123"], values=[b"peer"], expiration_time=[1e10])


def forged_request(key: bytes, token: DhtToken):
    """A store request signed the way hivemind signs one, with any token (a hostile peer's)."""
    from hivemind.utils.timed_storage import get_dht_time

    from gptjt_core.dht_authorizer import access_token

    request = store_request()
    request.auth.client_access_token.CopyFrom(access_token(token))
    request.auth.time, request.auth.nonce = get_dht_time(), secrets.token_bytes(8)
    request.auth.signature = sign(key, request.SerializeToString())
    return request


def validates(authorizer, request) -> bool:
    return asyncio.run(authorizer.validate_request(request))


def signed(authorizer):
    request = store_request()
    asyncio.run(authorizer.sign_request(request, None))
    return request


def test_members_accept_members_and_refuse_everyone_else():
    alice, bob = member(credentials(ALICE, "alice")), member(credentials(BOB, "bob"))
    assert validates(bob, signed(alice))
    assert validates(bob, forged_request(ALICE, credentials(ALICE, "alice").token))  # the forger's method is right
    assert not validates(bob, signed(other_runs_peer()))  # a token of another authority
    assert not validates(bob, forged_request(MALLORY, expired_token(MALLORY, "m")))  # expired
    # Alice's real token, but the request signed by Mallory's key: the token is not Mallory's
    assert not validates(bob, forged_request(MALLORY, credentials(ALICE, "alice").token))
    unsigned = store_request()  # a plain hivemind peer: no auth at all
    assert not validates(bob, unsigned)


def test_a_replayed_request_is_refused():
    alice, bob = member(credentials(ALICE, "alice")), member(credentials(BOB, "bob"))
    request = signed(alice)
    replay = type(request).FromString(request.SerializeToString())
    assert validates(bob, request)
    assert not validates(bob, replay)


def test_a_response_from_a_non_member_is_dropped():
    from hivemind.proto import dht_pb2

    alice = member(credentials(ALICE, "alice"))
    request = signed(alice)
    for server, ok in ((member(credentials(BOB, "bob")), True),
                       (other_runs_peer(), False)):
        response = dht_pb2.StoreResponse(store_ok=[True])
        asyncio.run(server.sign_response(response, request))
        assert asyncio.run(alice.validate_response(response, request)) is ok


def test_a_peer_with_an_expired_token_says_why_it_is_refused():
    lapsed = member(DhtCredentials(ALICE, expired_token(ALICE, "alice"), RUN_KEY))
    with pytest.raises(RuntimeError, match="own DHT token is not valid .*expired at.*joins again"):
        signed(lapsed)


def test_the_coordinators_peer_renews_its_own_token():
    issued = issue_token(AUTHORITY, "coordinator", dht_public_key(ALICE), 60.0,
                         now=datetime.datetime.now(UTC) - datetime.timedelta(seconds=40))  # 20 s left of 60
    peer = member(DhtCredentials(ALICE, issued, RUN_KEY, authority_key_der=AUTHORITY, lifetime_s=60.0))
    request = signed(peer)
    renewed = request.auth.client_access_token
    assert renewed.expiration_time > issued.expiration_time
    assert validates(member(credentials(BOB, "bob")), request)


def test_the_authorizer_pickles_as_its_credentials():
    """The sidecars receive their credentials across a spawn; the authorizer survives it too."""
    alice = credentials(ALICE, "alice")
    copy = pickle.loads(pickle.dumps(member(alice)))
    assert copy.credentials == alice
    assert copy.local_public_key.to_bytes() == dht_public_key(ALICE)
    assert validates(member(credentials(BOB, "bob")), signed(copy))
