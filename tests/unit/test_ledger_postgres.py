"""The ledger in PostgreSQL (coordinator/ledger/postgres.py, pg_dialect.py): the stores' SQL said in
PostgreSQL, rows and numbers as SQLite gives them, and one leader per ledger. The ledger's own
rules run on both backends in tests/unit/test_ledger.py and the modules that mark
`both_ledger_backends`."""

from __future__ import annotations

import time

import psycopg
import pytest

from coordinator.ledger import LedgerError, RunLedger
from coordinator.ledger.db import LedgerDB, is_database_url
from coordinator.ledger.pg_dialect import TABLES, translate
from coordinator.ledger.postgres import redacted
from coordinator.scheduler import plan_stages
from tests.conftest import small_run


def test_the_sqlite_idioms_are_said_in_postgresql():
    assert translate("INSERT OR REPLACE INTO step_audits VALUES(?, ?, ?, ?)") == (
        'INSERT INTO step_audits VALUES(%s, %s, %s, %s) ON CONFLICT (step) DO UPDATE SET lost=EXCLUDED.lost, '
        '"double"=EXCLUDED."double", violation=EXCLUDED.violation')
    assert translate("INSERT OR IGNORE INTO loss_scales(step, attempt, scale) VALUES(?, ?, ?)") == (
        "INSERT INTO loss_scales(step, attempt, scale) VALUES(%s, %s, %s) ON CONFLICT DO NOTHING")
    assert translate("SELECT * FROM t WHERE shard % ? != ? AND (epoch IS NOT ? OR x IS NOT NULL)") == (
        "SELECT * FROM t WHERE shard %% %s != %s AND (epoch IS DISTINCT FROM %s OR x IS NOT NULL)")
    assert translate("SELECT SUM(tokens * MAX(1, COALESCE(f(d), 1))), MAX(attempt) FROM steps") == (
        "SELECT SUM(tokens * GREATEST(1, COALESCE(f(d), 1))), MAX(attempt) FROM steps")
    assert translate("SELECT idx, offset FROM tickets") == 'SELECT idx, "offset" FROM tickets'
    # every table's primary key is known (an INSERT OR REPLACE needs it), comments in the schema notwithstanding
    assert all(key for _, key in TABLES.values()) and TABLES["commitments"][1] == [
        "step", "attempt", "ticket", "stage", "worker"]


def test_locations_and_secrets():
    assert is_database_url("postgresql://u@h/db") and is_database_url("postgres://h/db")
    assert not is_database_url("/var/lib/gptjt/run.db")
    assert redacted("postgresql://gptjt:hunter2@db.example:5432/run") == "postgresql://gptjt@db.example:5432/run"
    assert redacted("postgresql://db.example/run") == "postgresql://db.example/run"


def test_a_ledger_of_another_run_is_refused_without_showing_its_password(postgres_server):
    url = postgres_server.database().replace("postgres@", "postgres:hunter2@")
    run = small_run(steps=2, global_batch=4, micro_batch=2)
    RunLedger(url, run, plan_stages(4, 2)).db.close()
    run.pipeline.num_stages = 1
    with pytest.raises(LedgerError, match="holds another run") as refused:
        RunLedger(url, run, plan_stages(4, 1))
    assert "hunter2" not in str(refused.value) and "postgresql://postgres@/" in str(refused.value)


def test_rows_numbers_and_text_read_as_from_sqlite(postgres_server):
    db = LedgerDB(postgres_server.database())
    with db.tx():
        db.execute("INSERT INTO tokens(hash, created, revoked) VALUES(?, ?, ?)", ("a\x00b", 1.5, True))
        db.execute("INSERT INTO tokens(hash, created) VALUES(?, ?)", ("c", 2.0))
    row = db.execute("SELECT hash, revoked FROM tokens ORDER BY created").fetchone()
    assert row["hash"] == "a\ufffdb" and row[1] == 1 and dict(row) == {"hash": "a\ufffdb", "revoked": 1}
    total, count = db.execute("SELECT SUM(revoked), COUNT(*) FROM tokens").fetchone()
    assert (total, count) == (1, 2) and type(total) is int  # NUMERIC comes back as int, never Decimal
    assert db.version == 1 and db.writes() == 2
    db.close()


def test_one_coordinator_leads_a_ledger_and_the_next_takes_over_when_it_is_gone(postgres_server):
    url = postgres_server.database()
    first, second = LedgerDB(url), LedgerDB(url)
    assert first.try_lead() and not second.try_lead()
    assert first.still_leading()
    first.close()  # as a killed process's connection is closed by its kernel
    deadline = time.monotonic() + 5.0
    while not second.try_lead():
        assert time.monotonic() < deadline, "the lock of a closed connection was never released"
        time.sleep(0.05)
    # a leader whose connection is cut (a network partition, the server restarting) knows it
    pid = second.conn.raw.info.backend_pid
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 5.0
    while second.still_leading():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_bad_url_says_what_to_check():
    with pytest.raises(ConnectionError, match=r"cannot reach the ledger database postgresql://gptjt@127\.0\.0\.1:1/x"):
        LedgerDB("postgresql://gptjt:secret@127.0.0.1:1/x")
