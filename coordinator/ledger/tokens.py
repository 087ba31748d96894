"""Join tokens: who may join the run. Only SHA-256 hashes are stored; a token is shown once.

Invariant: a token is valid iff its hash is in `tokens` and not revoked; checks compare in
constant time against every valid hash, and the token itself is never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from .db import LedgerDB, is_database_url
from .errors import OperatorError
from .events import EventLog


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str:
    """A join token's public id: the first 10 hex digits of its SHA-256 (what the ledger stores)."""
    return hash_token(token)[:10]


def new_token() -> str:
    return "gptjt_" + secrets.token_urlsafe(24)


def new_session_secret() -> str:
    """A worker's session secret (coordinator/sessions.py): 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


class TokenStore:
    """Create, check, revoke and list join tokens (inside the caller's transaction)."""

    def __init__(self, db: LedgerDB, events: EventLog):
        self.db, self.events = db, events

    def check(self, token: str) -> bool:
        return self.admitting(token) is not None

    def admitting(self, token: str) -> str | None:
        """The id of the valid join token `token` is (None if it is none): a constant-time
        comparison of its hash against every valid one."""
        presented = hash_token(token or "")
        found = None
        for (stored,) in self.db.execute("SELECT hash FROM tokens WHERE revoked=0"):
            if hmac.compare_digest(presented, stored):
                found = stored[:10]
        return found if token else None

    def create(self, by: str = "the operator") -> dict:
        """A new join token; only its hash is stored, so this is the one time it is shown."""
        token = new_token()
        digest = hash_token(token)
        self.db.execute("INSERT INTO tokens(hash, created) VALUES(?, ?)", (digest, self.db.clock()))
        self.events.record("token_created", f"join token {digest[:10]} created by {by}")
        return {"token": token, "id": digest[:10]}

    def find(self, ref: str):
        """The token row for a token (gptjt_...) or an id (a prefix of 6+ hex digits)."""
        ref = (ref or "").strip()
        if ref.startswith("gptjt_"):
            rows = self.db.execute("SELECT hash, revoked FROM tokens WHERE hash=?", (hash_token(ref),)).fetchall()
            shown = "the token given"
        elif len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref.lower()):
            rows = self.db.execute("SELECT hash, revoked FROM tokens WHERE hash LIKE ?", (ref.lower() + "%",)).fetchall()
            shown = f"token id {ref!r}"
        else:
            raise OperatorError(f"{ref!r} is neither a join token (gptjt_...) nor a token id (6+ hex digits); "
                                "`gptjt token list --coordinator HOST:PORT` shows the ids")
        if not rows:
            raise OperatorError(f"no join token matches {shown}; `gptjt token list --coordinator HOST:PORT` shows "
                                "the ids", "not_found")
        if len(rows) > 1:
            raise OperatorError(f"token id {ref!r} matches {len(rows)} tokens; give more digits")
        return rows[0]

    def revoke(self, ref: str) -> dict:
        """Revoke a join token by id or by the token itself (new joins with it are refused)."""
        row = self.find(ref)
        digest = row["hash"]
        if not row["revoked"]:
            self.db.execute("UPDATE tokens SET revoked=1 WHERE hash=?", (digest,))
            self.events.record("token_revoked", f"join token {digest[:10]} revoked by the operator; new joins "
                               "with it are refused")
        return {"id": digest[:10], "revoked": True, "already_revoked": bool(row["revoked"])}

    def listing(self) -> list[dict]:
        return [{"id": r["hash"][:10], "created": r["created"], "revoked": bool(r["revoked"])}
                for r in self.db.execute("SELECT * FROM tokens ORDER BY created")]


def create_token_in(path: str | Path) -> str:
    """Create a join token in the ledger at `path` (works while the coordinator runs: WAL)."""
    db = LedgerDB(path)
    try:
        with db.tx():
            token = new_token()
            db.execute("INSERT INTO tokens(hash, created) VALUES(?, ?)", (hash_token(token), db.clock()))
            EventLog(db).record("token_created", "a join token was created")
        return token
    finally:
        db.close()


def revoke_token_in(path: str | Path, ref: str) -> dict:
    """Revoke a join token in the ledger at `path` (works while the coordinator runs: WAL)."""
    if not is_database_url(path) and not Path(path).is_file():
        raise OperatorError(f"no ledger at {path}; pass the run's --config or --state", "not_found")
    db = LedgerDB(path)
    try:
        with db.tx():
            return TokenStore(db, EventLog(db)).revoke(ref)
    finally:
        db.close()
