"""coordinator/sole_server.py: while one coordinator serves a SQLite ledger, another is refused."""

from __future__ import annotations

import os

import pytest

from coordinator.sole_server import LedgerInUse, sole_server_of


def test_a_second_server_of_one_ledger_is_refused_naming_the_first_and_admitted_once_it_is_gone(tmp_path):
    state = str(tmp_path / "runs" / "run.db")  # its directory is made, as the ledger's would be
    with sole_server_of(state):
        with pytest.raises(LedgerInUse, match=rf"another coordinator \(process {os.getpid()}\) serves the ledger "
                                              rf"{state}; two must never serve one run: stop that one first"):
            with sole_server_of(state):
                pass
        with sole_server_of(str(tmp_path / "other.db")):  # another run's ledger is another matter
            pass
    with sole_server_of(state):  # the first has stopped serving
        pass


def test_nothing_is_held_for_a_ledger_in_postgresql(tmp_path):
    with sole_server_of(None), sole_server_of(None):
        pass
    assert list(tmp_path.iterdir()) == []
