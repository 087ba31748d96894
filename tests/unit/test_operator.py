"""Operator actions on the ledger (pause, drain, join tokens, events), the admin token, /metrics rendering."""

from __future__ import annotations

import os
import stat

import pytest

from coordinator.admin_token import AdminToken, Unauthorized
from coordinator.ledger import OperatorError, create_token_in, revoke_token_in, token_id
from tests.unit.test_ledger import Clock, finish_step, make, ready_swarm
from tests.conftest import at

pytestmark = pytest.mark.usefixtures("both_ledger_backends")  # SQLite and PostgreSQL


def test_pause_stops_ticket_issue_and_is_an_event(tmp_path):
    ledger = make(tmp_path)
    ids = ready_swarm(ledger, 2)
    assert ledger.set_paused(True) == {"paused": True, "changed": True, "step": 0}
    assert ledger.run_state(ids[0])["paused"]
    assert ledger.lease(ids[0], 10) == ([], "ticket issue is paused by the operator")
    assert not ledger.set_paused(True)["changed"]
    ledger.set_paused(False)
    assert ledger.lease(ids[0], 10)[0]
    assert [e["kind"] for e in ledger.events.query(kind="operator")][-2:] == ["paused", "resumed"]


def test_drain_reaches_only_that_worker_and_survives_a_restart(tmp_path):
    clock = Clock()
    ledger = make(tmp_path, clock=clock)
    a, b, c = ready_swarm(ledger, 3)  # c is on standby
    version = ledger.version
    r = ledger.request_drain("w2")  # by name
    assert (r["worker"], r["stage"], r["warning"]) == (c, -1, "")
    assert ledger.version > version  # Watch streams push the change
    assert ledger.run_state(c)["drain"] and not ledger.run_state(a)["drain"]
    # the last replica of a stage with nobody else on standby: say the run will wait
    assert "the run waits for a new worker" in make(tmp_path, clock=clock).request_drain(b)["warning"]
    again = make(tmp_path, clock=clock)  # a coordinator restart keeps requests and events
    assert again.run_state(c)["drain"]
    assert [e["kind"] for e in again.events.query(kind="drain_requested")] == ["drain_requested"] * 2
    status = again.status()
    assert {w["id"]: w["drain_requested"] for w in status["workers"]} == {a: False, b: True, c: True}


def test_drain_errors_name_the_value_and_what_to_do(tmp_path):
    ledger = make(tmp_path)
    a, _ = ready_swarm(ledger, 2)
    with pytest.raises(OperatorError, match=r"no worker 'nope' in this run \(live workers: .*\(w0\).*gptjt workers") as e:
        ledger.request_drain("nope")
    assert e.value.code == "not_found"
    ledger.leave(a)
    with pytest.raises(OperatorError, match=f"worker {a} \\(w0\\) is left; there is nothing to drain") as e:
        ledger.request_drain(a)
    assert e.value.code == "precondition"


def test_join_tokens_create_revoke_list(tmp_path):
    offline = create_token_in(at(tmp_path))
    ledger = make(tmp_path)
    made = ledger.create_token()
    assert made["id"] == token_id(made["token"]) and ledger.check_token(made["token"])
    assert {t["id"] for t in ledger.join_tokens()} == {token_id(offline), made["id"]}
    assert ledger.revoke_token(made["id"][:6]) == {"id": made["id"], "revoked": True, "already_revoked": False,
                                                  "sessions_ended": []}
    assert not ledger.check_token(made["token"]) and ledger.check_token(offline)
    assert ledger.revoke_token(made["token"])["already_revoked"]
    with pytest.raises(OperatorError, match="no join token matches token id 'abcdef'; `gptjt token list"):
        ledger.revoke_token("abcdef")
    with pytest.raises(OperatorError, match="'xyz' is neither a join token"):
        ledger.revoke_token("xyz")
    assert revoke_token_in(at(tmp_path), offline)["revoked"]  # the ledger file, no coordinator
    assert not ledger.check_token(offline)
    kinds = [e["kind"] for e in ledger.events.query(kind="operator")]
    assert kinds.count("token_created") == 2 and kinds.count("token_revoked") == 2


def test_events_by_category_and_status_extras(tmp_path):
    ledger = make(tmp_path, steps=4)
    a, b = ready_swarm(ledger, 2)
    ledger.heartbeat(a, "ready", {"micro_batches_per_s": 4.0, "busy_fraction": 0.2}, 0, 0)
    ledger.heartbeat(b, "ready", {"micro_batches_per_s": 4.0, "busy_fraction": 0.8}, 0, 0)
    ledger.clock.t += 2.0
    finish_step(ledger, [a, b])
    assert [e["kind"] for e in ledger.events.query(kind="joins")] == ["worker_joined"] * 2
    assert ledger.events.query(kind="steps", limit=1)[0]["kind"] == "step_open"
    with pytest.raises(OperatorError, match="no event kind or category 'bogus'"):
        ledger.events.query(kind="bogus")
    s = ledger.status()
    assert s["tokens_target"] == 4 * 4 * 64 and s["tokens"] == 4 * 64
    assert s["straggler"] == b  # 0.2 s of compute per micro-batch against a's 0.05 s
    assert s["eta_s"] == pytest.approx((s["tokens_target"] - s["tokens"]) / s["tokens_per_s"])
    assert s["measured_step_s"] == pytest.approx(2.0) and s["lr"] > 0
    assert all(e["category"] not in ("steps", "workers") for e in s["notable_events"])
    assert {e["category"] for e in s["events"]} >= {"joins", "replans", "steps"}
    assert len(s["current_step_tickets"]) == 2 and {t["state"] for t in s["current_step_tickets"]} == {"pending"}


def test_admin_token_file_env_and_check(tmp_path, monkeypatch):
    monkeypatch.delenv(AdminToken.ENV, raising=False)
    admin = AdminToken.load(tmp_path / "run.db")  # beside the state path, whatever holds the ledger
    path = tmp_path / "run.db.admin-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text().strip()
    admin.check(token)
    assert AdminToken.load(tmp_path / "run.db").where == str(path)  # the same token after a restart
    with pytest.raises(Unauthorized, match=f"needs the run's admin token: pass --admin-token or set "
                                           f"GPTJT_ADMIN_TOKEN; the coordinator keeps the token in {path}"):
        admin.check("")
    with pytest.raises(Unauthorized, match="the admin token given is not this run's"):
        admin.check(token + "x")
    monkeypatch.setenv(AdminToken.ENV, "from-env")
    AdminToken.load(tmp_path / "run.db").check("from-env")


def test_metrics_render_parses(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from coordinator.dashboard.metrics import render_metrics

    ledger = make(tmp_path)
    a, b = ready_swarm(ledger, 2)
    finish_step(ledger, [a, b])
    status = ledger.status()
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(lambda: status).decode())}
    assert families["gptjt_step"].samples[0].value == 1
    assert families["gptjt_tokens"].samples[0].value == status["tokens"]
    assert families["gptjt_verified_fraction"].samples[0].value == status["verification"]["spot_verified_fraction"]
    assert families["gptjt_quarantined_workers"].samples[0].value == 0
    assert "quarantined" not in {s.labels["what"] for s in families["gptjt_verification"].samples}
    assert {s.labels["worker"] for s in families["gptjt_worker_tickets_done"].samples} == {a, b}
    phases = {s.labels["phase"]: s.value for s in families["gptjt_phase"].samples}
    assert phases[status["phase"]] == 1 and sum(phases.values()) == 1


def test_the_status_summary_says_what_the_checks_verified(tmp_path):
    from gptjt_cli.tables import summary

    ledger = make(tmp_path)
    a, b = ready_swarm(ledger, 2)
    finish_step(ledger, [a, b])
    status = ledger.status()
    status["verification"].update(spot_checks=3, spot_agree=2, spot_disagree=1, spot_verified_fraction=0.0125)
    assert summary(status).splitlines()[2] == ("spot checks 3 (2 agreed, 1 disagreed), 1.25 % of the work verified, "
                                               "0 quarantined, chain mismatches 0")


def test_a_hand_back_with_a_reason_is_a_notable_event_and_tables_show_it_on_one_safe_line(tmp_path):
    from gptjt_cli.tables import events_table, to_text

    ledger = make(tmp_path)
    a, b = ready_swarm(ledger, 2)
    ids = [t.id for t in ledger.lease(a, 2)[0]]
    assert ledger.release(a, ids[:1]) == 1  # routine (a drain, a failed downstream call)
    assert ledger.release(a, ids[1:], "DataError: data file 'x' does not exist") == 1
    notable = [e for e in ledger.events.notable() if e["kind"] in ("work_failed", "tickets_released")]
    assert [e["kind"] for e in notable] == ["work_failed"]
    assert notable[0]["detail"] == f"{a} handed back 1 ticket(s) after its work failed: DataError: data file 'x' " \
                                   "does not exist"
    # a detail from a worker (some fields may hold any characters) never reaches a terminal raw,
    # and is never read as rich markup
    shown = to_text(events_table([{**notable[0], "detail": "bad\x1b[2J\nline [bold]x[/bold]"}]))
    assert "\x1b" not in shown and "bad\\x1b[2J\\nline [bold]x[/bold]" in shown


def test_the_stage_table_shows_the_head_rate_where_a_stage_holds_the_head(tmp_path):
    from gptjt_cli.tables import stages_table, to_text

    ledger = make(tmp_path)
    device = {"kind": "cpu", "name": "x", "memory_bytes": 8 << 30, "matmul_tflops": 0.1, "dtype": "fp32",
              "block_tflops": 0.0412, "head_tflops": 0.0213}
    for i in range(2):
        ledger.join(f"w{i}", f"127.0.0.1:{9000 + i}", device)
    shown = to_text(stages_table(ledger.status())).splitlines()
    assert any("0.0412 (head 0.0213)" in line for line in shown), shown
    assert sum("(head " in line for line in shown) == 1, shown  # the stage without the head shows none
