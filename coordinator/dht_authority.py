"""The run's DHT authority: an RSA key kept beside the ledger, signing the access tokens of the run's DHT peers.

Created on the coordinator's first start (STATE.dht-authority.der, mode 0600) and kept across
restarts, so tokens issued before a restart stay valid and replicas that joined under either
coordinator still accept each other. At Join it signs a token for the worker's averaging key
(the worker id, the key's public half, link.cert_days like the stage-link certificate); its
own DHT peer gets a token it issues itself and renews. See gptjt_core/dht_auth.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptjt_core.dht_auth import DhtCredentials, DhtToken, dht_public_key, issue_token, new_dht_key

SELF = "coordinator"  # the username on the coordinator's own token (worker ids are 12 hex characters)


class DhtAuthority:
    def __init__(self, state_path: str | Path, token_days: float):
        """token_days: lifetime of the tokens it issues (link.cert_days)."""
        self.key_path = Path(f"{state_path}.dht-authority.der")
        self.lifetime_s = token_days * 86400.0
        if not self.key_path.is_file():
            self.key_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(new_dht_key())
        self._key = self.key_path.read_bytes()
        self.public_key = dht_public_key(self._key)

    def issue(self, worker_id: str, public_key: bytes) -> DhtToken:
        """A token for a worker's averaging key. ValueError: not an RSA key of 2048 bits or more."""
        return issue_token(self._key, worker_id, public_key, self.lifetime_s)

    def own_credentials(self) -> DhtCredentials:
        """For the coordinator's own DHT peer: a fresh key, a token for it, and the authority key
        to renew that token (the peer is the coordinator's child: the same trust)."""
        key = new_dht_key()
        return DhtCredentials(key, self.issue(SELF, dht_public_key(key)), self.public_key,
                              authority_key_der=self._key, lifetime_s=self.lifetime_s)
