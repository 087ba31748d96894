"""The run's admin token (every operator action that changes the run presents it) and its read token."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


class Unauthorized(PermissionError):
    """A missing or wrong admin token."""


class AdminToken:
    """The run's admin token: needed for every action that changes the run.

    From `--admin-token-file`, else GPTJT_ADMIN_TOKEN, else the file beside the ledger
    (`<state_path>.admin-token`, created with mode 0600 on first start)."""

    ENV = "GPTJT_ADMIN_TOKEN"
    SUFFIX, PREFIX = ".admin-token", "gptjt_admin_"

    def __init__(self, token: str, where: str):
        self._hash = hashlib.sha256(token.encode()).hexdigest()
        self.where = where  # told to callers without the token

    @classmethod
    def load(cls, state_path: str | Path, token_file: str | None = None) -> AdminToken:
        if token_file:
            token = Path(token_file).read_text().strip()
            if not token:
                raise ValueError(f"--admin-token-file {token_file} is empty; put the admin token in it")
            return cls(token, token_file)
        if os.environ.get(cls.ENV):
            return cls(os.environ[cls.ENV].strip(), f"${cls.ENV} of the coordinator")
        path = Path(f"{state_path}{cls.SUFFIX}")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(cls.PREFIX + secrets.token_urlsafe(24) + "\n")
        return cls(path.read_text().strip(), str(path))

    def valid(self, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(hashlib.sha256(presented.encode()).hexdigest(), self._hash)

    def check(self, presented: str) -> None:
        """Raise Unauthorized (saying what to do) unless `presented` is the admin token."""
        how = f"pass --admin-token or set {self.ENV}; the coordinator keeps the token in {self.where}"
        if not presented:
            raise Unauthorized(f"this action needs the run's admin token: {how}")
        if not self.valid(presented):
            raise Unauthorized(f"the admin token given is not this run's: {how}")


class ReadToken(AdminToken):
    """The run's read token: with coordinator.read_access = "token", what Status and Events need
    (GPTJT_READ_TOKEN of the coordinator, else STATE.read-token beside the ledger)."""

    ENV = "GPTJT_READ_TOKEN"
    SUFFIX, PREFIX = ".read-token", "gptjt_read_"
