"""The ledger's SQLite schema, and the columns added to ledgers written by older versions."""

from __future__ import annotations

import functools
import json
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS workers (
  id TEXT PRIMARY KEY, name TEXT, address TEXT, device TEXT, stage INTEGER NOT NULL DEFAULT -1,
  state TEXT NOT NULL, joined REAL NOT NULL, last_heartbeat REAL NOT NULL, metrics TEXT,
  tickets_done INTEGER NOT NULL DEFAULT 0,
  loaded_epoch INTEGER NOT NULL DEFAULT -1,  -- the restore epoch whose state its stage holds
  position INTEGER NOT NULL DEFAULT -1,      -- optimizer steps applied to that state
  dht_maddrs TEXT,                           -- JSON list: its averager's DHT peer, if any
  session_hash TEXT,                         -- SHA-256 of its session secret (sessions.py)
  token_id TEXT);                            -- the join token that admitted it (tokens.token_id)
-- The placed workers (Workers.stage_workers, read at every change of the ledger's version): at
-- 10,000 workers, mostly standbys, a scan of them all took ~2-4 ms per commit or lease, and when
-- 10,000 Watch streams closed at once (each one's death a version) it held the coordinator's
-- loop 0.3-0.6 s at a time for ~25 s (bench heartbeat's end).
CREATE INDEX IF NOT EXISTS workers_placed ON workers (joined) WHERE stage >= 0;
CREATE TABLE IF NOT EXISTS tickets (
  id INTEGER PRIMARY KEY, step INTEGER NOT NULL, attempt INTEGER NOT NULL, idx INTEGER NOT NULL,
  shard INTEGER NOT NULL, offset INTEGER NOT NULL, state TEXT NOT NULL, worker TEXT,
  leased_at REAL, committed_at REAL, loss REAL, tokens INTEGER,
  leases INTEGER NOT NULL DEFAULT 0,  -- times handed to a worker
  issues INTEGER NOT NULL DEFAULT 0,  -- times put back for re-issue (death, release, step restart)
  UNIQUE (step, attempt, idx));
CREATE INDEX IF NOT EXISTS tickets_by_step ON tickets (step, attempt, state);
CREATE TABLE IF NOT EXISTS reports (
  step INTEGER NOT NULL, attempt INTEGER NOT NULL, worker TEXT NOT NULL, kind TEXT NOT NULL,
  stage INTEGER NOT NULL, grad_norm_sq REAL, micro_batches INTEGER, group_weight REAL, digest TEXT,
  PRIMARY KEY (step, attempt, worker, kind));
CREATE TABLE IF NOT EXISTS steps (
  step INTEGER PRIMARY KEY, attempts INTEGER NOT NULL, loss REAL NOT NULL, tokens INTEGER NOT NULL,
  grad_norm REAL, opened REAL NOT NULL, closed REAL NOT NULL,  -- grad_norm NULL: not finite, update skipped
  detail TEXT NOT NULL DEFAULT '{}');  -- per stage: replicas, micro-batches summed, digests
CREATE TABLE IF NOT EXISTS checkpoints (
  step INTEGER NOT NULL, start_layer INTEGER NOT NULL, end_layer INTEGER NOT NULL, embed INTEGER NOT NULL,
  head INTEGER NOT NULL, path TEXT NOT NULL, ts REAL NOT NULL,
  nbytes INTEGER, sha256 TEXT,  -- declared by a worker that wrote a shared store itself; NULL: streamed here
  PRIMARY KEY (step, start_layer, end_layer));
CREATE TABLE IF NOT EXISTS step_audits (  -- each closed step's exactly-once verdict, taken as it closed
  step INTEGER PRIMARY KEY, lost INTEGER NOT NULL, double INTEGER NOT NULL, violation TEXT);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind, id);  -- counts and notable events, by kind
CREATE TABLE IF NOT EXISTS events_pruned (kind TEXT PRIMARY KEY, n INTEGER NOT NULL);  -- counts of events let go
CREATE TABLE IF NOT EXISTS commitments (  -- what each stage committed to per micro-batch (ledger/commitments.py)
  step INTEGER NOT NULL, attempt INTEGER NOT NULL, ticket INTEGER NOT NULL, stage INTEGER NOT NULL,
  worker TEXT NOT NULL, blob BLOB NOT NULL,                  -- gptjt_core.commitment.Commitment bytes
  sent BLOB, returned BLOB, sent_back BLOB,                  -- link digests (gptjt_core/chain.py); NULL: none
  PRIMARY KEY (step, attempt, ticket, stage, worker));
CREATE TABLE IF NOT EXISTS checks (  -- every check of stage work and its verdict
  id INTEGER PRIMARY KEY, step INTEGER NOT NULL, attempt INTEGER NOT NULL, ticket INTEGER NOT NULL,
  stage INTEGER NOT NULL, kind TEXT NOT NULL, verdict TEXT NOT NULL,
  worker TEXT NOT NULL, peers TEXT NOT NULL,  -- the worker checked; JSON list of the others involved
  detail TEXT NOT NULL,
  opinion_of INTEGER,   -- a spot check's third opinion: the id of the check it settles (ledger/spot_checks.py)
  epoch INTEGER,        -- a spot check's restore epoch: a restore makes the pending ones stale
  weights TEXT);        -- where its verifier takes the weights: NULL its own, 'store' or 'source'
CREATE INDEX IF NOT EXISTS checks_by_step ON checks (step);
CREATE TABLE IF NOT EXISTS verified_work (  -- a stage's micro-batch a spot check recomputed and agreed with
  step INTEGER NOT NULL, stage INTEGER NOT NULL, ticket INTEGER NOT NULL, tokens INTEGER NOT NULL,
  PRIMARY KEY (step, stage, ticket));
CREATE INDEX IF NOT EXISTS checks_by_verdict ON checks (verdict, peers);  -- a verifier's pending spot checks
CREATE INDEX IF NOT EXISTS checks_by_opinion ON checks (opinion_of);  -- a dispute's third opinions
CREATE TABLE IF NOT EXISTS loss_scales (  -- the loss scale each step attempt ran at (ledger/loss_scaling.py)
  step INTEGER NOT NULL, attempt INTEGER NOT NULL, scale REAL NOT NULL, PRIMARY KEY (step, attempt));
CREATE TABLE IF NOT EXISTS links (  -- measured by worker src towards the stage server at dst
  src TEXT NOT NULL, dst TEXT NOT NULL, latency_ms REAL NOT NULL, mbit REAL NOT NULL, measured REAL NOT NULL,
  PRIMARY KEY (src, dst));
"""

# Columns added after a ledger format was released: (table, column, declaration). A ledger
# written by an older version gains them when it is opened.
ADDED_COLUMNS = [("workers", "dht_maddrs", "TEXT"), ("workers", "session_hash", "TEXT"),
                 ("workers", "token_id", "TEXT"), ("checks", "opinion_of", "INTEGER"), ("checks", "epoch", "INTEGER"),
                 ("checks", "weights", "TEXT"), ("checkpoints", "nbytes", "INTEGER"),
                 ("checkpoints", "sha256", "TEXT")]


def create_or_upgrade(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    for table, column, declaration in ADDED_COLUMNS:
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _json_object(text) -> dict | None:
    try:
        value = json.loads(text) if isinstance(text, str | bytes) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# gptjt_json_field runs once a worker row: counting the measured workers parsed every worker's
# device at each status build (~25 % of a 10,000-worker build), though few devices change between
# builds. Only it keeps parses: gptjt_json_object_size reads each closed step's detail once a
# status, 26,900 distinct texts in GPT-JT's phase 1, which would push the devices out and hold
# every step's detail. The parsed objects are only read, never handed out.
@functools.lru_cache(maxsize=32_768)
def _kept_json_object(text: str | bytes) -> dict | None:
    return _json_object(text)


def json_object_size(text) -> int | None:
    """SQL gptjt_json_object_size(text): keys of a JSON object, NULL for anything else (a column
    an older version wrote may hold anything). PostgreSQL has the same function (pg_dialect.py)."""
    value = _json_object(text)
    return None if value is None else len(value)


def json_field(text, key: str) -> str | None:
    """SQL gptjt_json_field(text, key): the value at `key` of a JSON object as text (a string as
    it is, anything else as JSON: true -> 'true'), NULL when absent or not an object; what
    PostgreSQL's ->> gives (pg_dialect.py)."""
    value = _kept_json_object(text) if isinstance(text, str | bytes) else None
    if value is None or value.get(key) is None:
        return None
    found = value[key]
    return found if isinstance(found, str) else json.dumps(found)
