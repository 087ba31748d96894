"""Access tokens for the run's hivemind DHT, as pure functions over bytes (no hivemind, no files, no network).

The coordinator is the DHT's authority: it keeps an RSA key (coordinator/dht_authority.py) and,
at Join, signs a token for the RSA key each worker made for its averaging sidecar: the worker
id, that key's public half, and an expiry. Every DHT request and response of the run then
carries the sender's token and a signature by the token's key, and peers drop what the
authority did not sign (gptjt_core/dht_authorizer.py plugs this into hivemind's
TokenAuthorizerBase). Formats are hivemind's (hivemind.utils.crypto): private keys are DER
(traditional OpenSSL), public keys OpenSSH (`ssh-rsa AAAA...`), signatures base64 of RSA-PSS
over SHA-256; what the authority signs is `DhtToken.payload()`, our own canonical bytes.

No hivemind import here: importing hivemind changes torch's sharing strategy process-wide, and
the coordinator and the worker's main process never import it (only their sidecars do).
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

RSA_BITS = 2048  # hivemind's own key size (RSAPrivateKey)
MIN_RSA_BITS = 2048  # a shorter key is refused at Join
_PAYLOAD_TAG = b"gptjt-dht-token-v1"


def _padding():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    # hivemind.utils.crypto signs and verifies with exactly these
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256()


def new_dht_key() -> bytes:
    """A fresh RSA private key, DER (hivemind.utils.crypto.RSAPrivateKey's own format)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _private(key_der: bytes):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_der_private_key(key_der, password=None)


def dht_public_key(key_der: bytes) -> bytes:
    """The OpenSSH public half of a DER RSA private key (hivemind's RSAPublicKey.to_bytes())."""
    from cryptography.hazmat.primitives import serialization

    return _private(key_der).public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH)


def load_public_key(public_key: bytes):
    """An OpenSSH RSA public key of at least MIN_RSA_BITS; ValueError naming what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_ssh_public_key(public_key)
    except (ValueError, TypeError, IndexError) as e:  # cryptography raises these on malformed input
        raise ValueError(f"not an OpenSSH public key ({e})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"an RSA key is needed (hivemind signs with RSA), not {type(key).__name__}")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"an RSA key of {key.key_size} bits is too short; at least {MIN_RSA_BITS}")
    return key


def sign(key_der: bytes, data: bytes) -> bytes:
    """base64 of an RSA-PSS/SHA-256 signature, as hivemind's RSAPrivateKey.sign makes it."""
    pss, sha256 = _padding()
    return base64.b64encode(_private(key_der).sign(data, pss, sha256))


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    pss, sha256 = _padding()
    try:
        load_public_key(public_key).verify(base64.b64decode(signature), data, pss, sha256)
        return True
    except (ValueError, InvalidSignature):  # a bad key, bad base64, a wrong signature
        return False


@dataclass(frozen=True)
class DhtToken:
    """What the authority vouches for: `username` (a worker id, or "coordinator") holds the key
    `public_key` until `expiration_time` (ISO 8601, UTC). The fields of hivemind's AccessToken."""

    username: str
    public_key: bytes
    expiration_time: str
    signature: bytes = b""

    def payload(self) -> bytes:
        """The bytes the authority signs: every field but the signature, unambiguously joined."""
        parts = (self.username.encode(), self.public_key, self.expiration_time.encode())
        return b"\0".join([_PAYLOAD_TAG, *(len(p).to_bytes(4, "big") + p for p in parts)])

    def expires_at(self) -> datetime.datetime | None:
        """The expiry as an aware UTC datetime; None if `expiration_time` is not one."""
        try:
            at = datetime.datetime.fromisoformat(self.expiration_time)
        except ValueError:
            return None
        return at if at.tzinfo is not None else None


def issue_token(authority_key_der: bytes, username: str, public_key: bytes, lifetime_s: float,
                now: datetime.datetime | None = None) -> DhtToken:
    """A token for `username`'s `public_key`, valid for lifetime_s from `now`, signed by the
    authority. ValueError if `public_key` is not an RSA key of MIN_RSA_BITS or more."""
    load_public_key(public_key)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    expiry = (now + datetime.timedelta(seconds=lifetime_s)).isoformat()
    token = DhtToken(username, public_key, expiry)
    return DhtToken(username, public_key, expiry, sign(authority_key_der, token.payload()))


def token_problem(token: DhtToken, authority_public_key: bytes, now: datetime.datetime | None = None) -> str:
    """Why `token` grants nothing ("" if it is valid now): not signed by the authority, or expired."""
    if not token.username or not token.public_key:
        return "the token names no member or no key"
    if not verify(authority_public_key, token.payload(), token.signature):
        return "the token is not signed by this run's DHT authority"
    expiry = token.expires_at()
    if expiry is None:
        return f"the token's expiration_time {token.expiration_time!r} is not an ISO 8601 UTC time"
    if expiry <= (now or datetime.datetime.now(datetime.timezone.utc)):
        return f"the token expired at {token.expiration_time}"
    return ""


@dataclass(frozen=True)
class DhtCredentials:
    """What a DHT peer of the run needs, as plain bytes (they cross a spawn: they must pickle).

    key_der: this peer's RSA private key; token: the authority's token for its public half;
    authority_public_key: to check others' tokens; authority_key_der and lifetime_s: only the
    coordinator's own peer has them, to renew its token itself (for lifetime_s more seconds) once
    half of it is gone. A worker's token is not renewed: it expires with the worker's stage-link
    certificate (link.cert_days), after which peers refuse it until the worker is restarted and
    joins again (docs/security.md).
    """

    key_der: bytes
    token: DhtToken
    authority_public_key: bytes
    authority_key_der: bytes = b""
    lifetime_s: float = 0.0
