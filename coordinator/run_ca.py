"""The run's certificate authority: a key and certificate kept beside the ledger, signing stage-link certificates.

Created on the coordinator's first start (STATE.ca-key.pem, mode 0600, and STATE.ca.pem) and
kept across restarts, so certificates issued before a restart stay valid. See gptjt_core/pki.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptjt_core.pki import issue, new_ca

OPERATOR_PREFIX = "operator-"  # common names of the operator's tools' certificates


class RunCA:
    def __init__(self, state_path: str | Path, run_name: str, cert_days: float):
        """cert_days: lifetime of the certificates it issues (workers re-join well within it)."""
        self.key_path, self.cert_path = Path(f"{state_path}.ca-key.pem"), Path(f"{state_path}.ca.pem")
        self.cert_days = cert_days
        if not self.key_path.is_file():
            key, cert = new_ca(f"gptjt run {run_name} CA")
            self.key_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            self.cert_path.write_bytes(cert)
        self._key = self.key_path.read_bytes()
        self.cert_pem = self.cert_path.read_bytes()

    def issue(self, subject: str, public_key_pem: bytes) -> bytes:
        """A stage-link certificate for `subject` (a worker id, or operator-...). ValueError: not a key."""
        return issue(self._key, self.cert_pem, subject, public_key_pem, self.cert_days)
