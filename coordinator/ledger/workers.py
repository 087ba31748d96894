"""The worker registry: who joined, where they serve, which stage they hold, when they were last heard.

A worker row is live while its state is one of ALIVE_STATES; `left`, `dead` and `quarantined` are final (a
worker the coordinator declared dead joins again under a new id). This store returns facts
and writes rows; what a death or a join means for the step is the step machine's business.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from typing import Callable

from .db import ALIVE_STATES, LedgerDB, alive_marks
from .errors import OperatorError
from .events import EventLog
from .stored_values import stored_json


class WorkerRegistry:
    """The `workers` table: rows, lookups and the writes a join, a heartbeat or a move makes."""

    def __init__(self, db: LedgerDB, events: EventLog):
        self.db, self.events = db, events
        # a new worker's id (12 hex digits, random); a simulation sets a seeded one, so that its
        # runs repeat (ids order the candidates a placement search sees)
        self.new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12]
        # Moves with every write that changes who is live, where or at which stage (add, set_state,
        # assign; a heartbeat only moves within the live states, and an address never changes):
        # AssignmentView.live_addresses keeps its read of every live worker until it moves (or a
        # rollback undoes what was read: LedgerDB.rollbacks). Probes write links many times a second
        # at 1,000 workers, and each RunState read them all again (bench churn: ~10 % of its time).
        self.roster_version = 0

    # -- reading -----------------------------------------------------------------------
    def row(self, worker_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM workers WHERE id=?", (worker_id,)).fetchone()

    def is_alive(self, worker_id: str) -> bool:
        row = self.row(worker_id)
        return row is not None and row["state"] in ALIVE_STATES

    def stage_workers(self) -> dict[int, list[sqlite3.Row]]:
        """Every live worker assigned to a stage, by stage (oldest first)."""
        rows = self.db.execute(f"SELECT * FROM workers WHERE stage>=0 AND state IN ({alive_marks()}) ORDER BY joined",
                               ALIVE_STATES).fetchall()
        out: dict[int, list[sqlite3.Row]] = {}
        for r in rows:
            out.setdefault(r["stage"], []).append(r)
        return out

    def live(self, states: tuple[str, ...] = ALIVE_STATES) -> list[sqlite3.Row]:
        """Workers in `states`, oldest first."""
        return self.db.execute("SELECT * FROM workers WHERE state IN (%s) ORDER BY joined" % ",".join("?" * len(states)),
                               states).fetchall()

    def addresses(self) -> list[sqlite3.Row]:
        """id, address and stage of every live worker, oldest first."""
        return self.db.execute(f"SELECT id, address, stage FROM workers WHERE state IN ({alive_marks()}) "
                               "ORDER BY joined", ALIVE_STATES).fetchall()

    def standby(self) -> list[sqlite3.Row]:
        """Live workers without a stage, longest-waiting first."""
        return self.db.execute("SELECT * FROM workers WHERE state='standby' AND stage=-1 ORDER BY joined").fetchall()

    def all(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM workers ORDER BY joined").fetchall()

    def at(self, address: str) -> str | None:
        """The live worker serving its stage at `address`."""
        row = self.db.execute(f"SELECT id FROM workers WHERE address=? AND state IN ({alive_marks()})",
                              (address, *ALIVE_STATES)).fetchone()
        return row["id"] if row else None

    def silent_since(self, deadline: float) -> list[str]:
        """Live workers whose last heartbeat is older than `deadline` (unix seconds)."""
        return [r["id"] for r in self.db.execute(f"SELECT id FROM workers WHERE last_heartbeat<? AND state IN "
                                                 f"({alive_marks()})", (deadline, *ALIVE_STATES)).fetchall()]

    def resolve(self, ref: str) -> sqlite3.Row:
        """The worker row for an id, or for a name that exactly one live worker has."""
        if not ref:
            raise OperatorError("no worker given; `gptjt workers --coordinator HOST:PORT` lists worker ids")
        row = self.row(ref)
        if row is not None:
            return row
        rows = self.db.execute(f"SELECT * FROM workers WHERE name=? AND state IN ({alive_marks()})",
                               (ref, *ALIVE_STATES)).fetchall()
        if len(rows) == 1:
            return rows[0]
        known = ", ".join(f"{r['id']} ({r['name']})" for r in self.live()) or "none"
        if len(rows) > 1:
            raise OperatorError(f"worker name {ref!r} is shared by {len(rows)} live workers; give one of their ids "
                                f"({', '.join(r['id'] for r in rows)})", "invalid")
        raise OperatorError(f"no worker {ref!r} in this run (live workers: {known}); "
                            "`gptjt workers --coordinator HOST:PORT` lists them", "not_found")

    def dht_peers(self, worker_id: str = "", limit: int = 8) -> list[str]:
        """DHT multiaddrs of live workers' averagers (the asking worker's own stage first, then the
        most recently heard): bootstrap peers that keep the run's DHT one network when the
        coordinator's peer restarts (coordinator/dht.py)."""
        me = self.row(worker_id) if worker_id else None
        stage = me["stage"] if me is not None else -2
        rows = self.db.execute(f"SELECT id, stage, dht_maddrs FROM workers WHERE state IN ({alive_marks()}) AND "
                               "dht_maddrs IS NOT NULL AND dht_maddrs != '[]' ORDER BY last_heartbeat DESC",
                               ALIVE_STATES).fetchall()
        peers: list[str] = []
        for r in sorted(rows, key=lambda r: r["stage"] != stage):
            if r["id"] != worker_id:
                peers.extend(m for m in stored_json(r["dht_maddrs"], [], "workers.dht_maddrs")
                             if isinstance(m, str) and m not in peers)
        return peers[:limit]

    # -- writing -----------------------------------------------------------------------
    def add(self, name: str, address: str, device: dict, session_hash: str = "", token_id: str = "") -> str:
        """A new worker on standby, its session (the hash of its secret) and the join token that
        admitted it; returns its id."""
        worker_id = self.new_id()
        now = self.db.clock()
        self.roster_version += 1
        self.db.execute("INSERT INTO workers(id, name, address, device, state, joined, last_heartbeat, session_hash, "
                        "token_id) VALUES(?, ?, ?, ?, 'standby', ?, ?, ?, ?)",
                        (worker_id, name, address, json.dumps(device), now, now, session_hash, token_id))
        self.events.record("worker_joined", f"{worker_id} ({name}) at {address}")
        return worker_id

    def session_of(self, worker_id: str) -> str | None:
        """The hash of a live worker's session secret (None: unknown, dead or left)."""
        row = self.row(worker_id)
        return row["session_hash"] if row is not None and row["state"] in ALIVE_STATES else None

    def quarantined_as(self, name: str, token_id: str) -> str | None:
        """A quarantined worker that joined under this name with this token (its id), if any: a
        volunteer whose machine computes wrong would otherwise join again at once. A stranger
        who renames itself gets past this; revoking its token is what keeps it out."""
        row = self.db.execute("SELECT id FROM workers WHERE state='quarantined' AND name=? AND token_id=?",
                              (name, token_id)).fetchone()
        return row[0] if row is not None else None

    def admitted_by(self, token_id: str) -> list[str]:
        """Live workers a join token admitted."""
        return [r["id"] for r in self.db.execute(f"SELECT id FROM workers WHERE token_id=? AND state IN "
                                                 f"({alive_marks()})", (token_id, *ALIVE_STATES)).fetchall()]

    def beat(self, worker_id: str, state: str, metrics: dict, loaded_epoch: int, position: int,
             dht_maddrs: list[str]) -> None:
        self.db.execute("UPDATE workers SET last_heartbeat=?, state=?, metrics=?, loaded_epoch=?, position=?, "
                        "dht_maddrs=? WHERE id=?", (self.db.clock(), state, json.dumps(metrics), loaded_epoch,
                                                    position, json.dumps(dht_maddrs), worker_id))

    def grant_grace(self) -> None:
        """A restarted coordinator gives every live worker one heartbeat timeout to reconnect."""
        self.db.execute(f"UPDATE workers SET last_heartbeat=? WHERE state IN ({alive_marks()})",
                        (self.db.clock(), *ALIVE_STATES))

    def set_state(self, worker_id: str, state: str) -> None:
        self.roster_version += 1
        self.db.execute("UPDATE workers SET state=? WHERE id=?", (state, worker_id))

    def assign(self, worker_id: str, stage: int) -> None:
        """Give a worker a stage (loading) or take it away (stage -1: standby); it holds nothing yet."""
        self.roster_version += 1
        self.db.execute("UPDATE workers SET stage=?, state=?, loaded_epoch=-1, position=-1 WHERE id=?",
                        (stage, "loading" if stage >= 0 else "standby", worker_id))

    def set_position(self, worker_id: str, position: int) -> None:
        self.db.execute("UPDATE workers SET position=? WHERE id=?", (position, worker_id))

    def count_ticket(self, worker_id: str) -> None:
        self.db.execute("UPDATE workers SET tickets_done=tickets_done+1 WHERE id=?", (worker_id,))
