"""hivemind's TokenAuthorizerBase for the run's DHT: requests and responses only from holders of the authority's tokens.

hivemind's DHTProtocol wraps every DHT RPC (ping, store, find) in this authorizer
(hivemind.utils.auth.AuthRPCWrapper): a client signs each request with its own RSA key and
attaches its token; a server answers only a request whose token the run's DHT authority (the
coordinator) signed and has not expired, whose signature matches the token's key, whose time is
within a minute of its own and whose nonce it has not seen (a replay); the client in turn drops
a response that fails the same checks. An outsider's store or find therefore gets no answer, and
a member never stores what an outsider sent.

Imported only by the processes that run hivemind (the worker's averaging sidecar, the
coordinator's DHT sidecar): importing hivemind changes torch's sharing strategy process-wide.
"""

from __future__ import annotations

import datetime

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from .dht_auth import DhtCredentials, DhtToken, issue_token, token_problem


def rsa_key(key_der: bytes) -> RSAPrivateKey:
    """hivemind's key object for a DER RSA key (through its pickle state: its constructor makes a new key)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": key_der})
    return key


def access_token(token: DhtToken) -> AccessToken:
    return AccessToken(username=token.username, public_key=token.public_key,
                       expiration_time=token.expiration_time, signature=token.signature)


def dht_token(token: AccessToken) -> DhtToken:
    return DhtToken(token.username, token.public_key, token.expiration_time, token.signature)


class RunMemberAuthorizer(TokenAuthorizerBase):
    """Signs this peer's DHT requests and responses with its credentials and accepts only those
    of peers holding a valid token of the same authority.

    Pickles as its credentials (plain bytes): hivemind's key objects do not all pickle, and
    the authorizer may cross a process boundary with the DHT's arguments.
    """

    def __init__(self, credentials: DhtCredentials):
        super().__init__(rsa_key(credentials.key_der))
        self.credentials = credentials

    def __reduce__(self):
        return RunMemberAuthorizer, (self.credentials,)

    async def get_token(self) -> AccessToken:
        c = self.credentials
        token = c.token
        if c.authority_key_der:  # the coordinator's own peer: a fresh token from its own authority
            token = issue_token(c.authority_key_der, token.username, token.public_key, c.lifetime_s)
        problem = token_problem(token, c.authority_public_key)
        if problem:
            raise RuntimeError(f"this peer's own DHT token is not valid ({problem}): its DHT requests are refused "
                               "by the run's peers; restart the worker so that it joins again")
        return access_token(token)

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return not token_problem(dht_token(access_token), self.credentials.authority_public_key)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        """The coordinator's own token once half its lifetime is gone; anyone's once expired
        (get_token then says why this peer is refused)."""
        expiry = dht_token(access_token).expires_at()
        now = datetime.datetime.now(datetime.timezone.utc)
        if expiry is None or expiry <= now:
            return True
        margin = self.credentials.lifetime_s / 2 if self.credentials.authority_key_der else 0.0
        return (expiry - now).total_seconds() < margin
