"""The operator CLI through the real console scripts against one live swarm: --json schemas, tables,
--watch, exit codes, pause/resume, join tokens, drain."""

from __future__ import annotations

import json
import os
import subprocess

import grpc
import pytest

from tests.swarm import BIN, Swarm, swarm_toml

# The documented --json schemas (docs/cli.md): keys may be added, never removed or renamed.
STATUS_KEYS = {"run", "model_source", "tokenizer", "step", "steps_total", "attempt", "phase", "paused", "tokens",
               "tokens_target", "tokens_per_s", "eta_s", "lr", "loss", "measured_step_s", "straggler", "history", "loss_curve",
               "workers", "stages", "tickets", "events", "notable_events", "event_counts", "join_tokens",
               "current_step_tickets", "checkpoints", "plan_version", "restore_epoch", "replicas_per_stage",
               "global_batch", "seq_len", "now", "liveness", "stage_link_tls", "verification"}
WORKER_KEYS = {"id", "name", "address", "stage", "state", "last_heartbeat_s", "device", "metrics", "tickets_done",
               "joined", "drain_requested", "seconds_per_micro_batch"}
STAGE_KEYS = {"index", "start_layer", "end_layer", "embed", "head", "workers", "members"}
TICKET_KEYS = {"issued", "committed", "reissued", "leased", "pending", "aborted", "rolled_back", "lost", "double",
               "exactly_once_violations"}
EVENT_KEYS = {"id", "ts", "kind", "category", "detail"}
HISTORY_KEYS = {"step", "loss", "tokens", "seconds", "grad_norm", "attempts", "stages"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A paused run (nothing computes while the tests read it) with two stage workers and one on standby."""
    tmp = tmp_path_factory.mktemp("operator-cli")
    swarm = Swarm(tmp, swarm_toml(tmp, steps=20))
    try:
        swarm.start_coordinator()
        r = gptjt("pause", "--coordinator", swarm.address, "--admin-token", swarm.admin_token)
        assert r.returncode == 0, r.stderr
        for name in "abc":
            swarm.start_worker(name)
        swarm.wait(lambda s: sorted(w["state"] for w in s["workers"]) == ["ready", "ready", "standby"], 120,
                   "two ready stage workers and one on standby")
        yield swarm
    finally:  # also when the setup fails
        for proc in swarm.procs[1:]:
            proc.kill()  # a paused run's workers would wait out their drain timeout
        swarm.close()


def gptjt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("GPTJT_ADMIN_TOKEN", "GPTJT_COORDINATOR")}
    return subprocess.run([str(BIN / "gptjt"), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def as_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_json_keys_are_stable(swarm):
    s = as_json(gptjt("status", "--coordinator", swarm.address, "--json"))
    assert STATUS_KEYS <= set(s), STATUS_KEYS - set(s)
    assert all(WORKER_KEYS <= set(w) for w in s["workers"]) and len(s["workers"]) == 3
    assert all(STAGE_KEYS <= set(st) for st in s["stages"])
    assert TICKET_KEYS <= set(s["tickets"])
    assert all(EVENT_KEYS <= set(e) for e in s["events"] + s["notable_events"])
    assert s["paused"] and s["step"] == 0 and s["tokens_target"] == 20 * 4 * 64
    env = {"GPTJT_COORDINATOR": swarm.address}  # the address from the environment
    for view, keys in [("workers", WORKER_KEYS), ("stages", STAGE_KEYS)]:
        out = as_json(gptjt(view, "--json", env=env))
        assert list(out) == [view] and all(keys <= set(x) for x in out[view])
    assert TICKET_KEYS <= set(as_json(gptjt("tickets", "--json", env=env))["tickets"])
    events = as_json(gptjt("events", "--json", "--kind", "joins", env=env))["events"]
    assert [e["kind"] for e in events] == ["worker_joined"] * 3 and all(EVENT_KEYS <= set(e) for e in events)


def test_tables_for_people(swarm):
    r = gptjt("status", "--coordinator", swarm.address)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first.startswith("run test-swarm: step 0/20 (open, paused), loss -, 0 tokens")
    assert second.startswith("tokens 0 of 5,120, ETA -, lr ")
    for view, header in [("workers", "worker"), ("stages", "stage"), ("tickets", "issued"), ("events", "id")]:
        r = gptjt(view, "--coordinator", swarm.address)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0].split()[0] == header, r.stdout
    workers = gptjt("workers", "--coordinator", swarm.address).stdout
    assert all(f" {name} " in workers for name in "abc") and "standby" in workers


def test_watch_prints_one_object_per_update(swarm):
    r = gptjt("status", "--coordinator", swarm.address, "--json", "--watch", "0.2", "--count", "3")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stderr
    assert all(json.loads(line)["run"] == "test-swarm" for line in lines)


def test_exit_codes_and_messages(swarm):
    r = gptjt("status", "--coordinator", "127.0.0.1:1", "--json")
    assert r.returncode == 3 and "coordinator 127.0.0.1:1 did not answer" in r.stderr and "is it running?" in r.stderr
    r = gptjt("pause", "--coordinator", swarm.address)
    assert r.returncode == 4 and "needs the run's admin token: pass --admin-token or set GPTJT_ADMIN_TOKEN" in r.stderr
    assert "run.db.admin-token" in r.stderr  # where to find it
    r = gptjt("resume", "--coordinator", swarm.address, "--admin-token", "gptjt_admin_wrong")
    assert r.returncode == 4 and "the admin token given is not this run's" in r.stderr
    r = gptjt("drain", "nope", "--coordinator", swarm.address, "--admin-token", swarm.admin_token)
    assert r.returncode == 2 and "no worker 'nope' in this run" in r.stderr and "gptjt workers" in r.stderr
    r = gptjt("events", "--coordinator", swarm.address, "--kind", "bogus")
    assert r.returncode == 2 and "no event kind or category 'bogus'" in r.stderr
    r = gptjt("status", "--coordinator", swarm.address, "--watch", "-1")
    assert r.returncode == 2 and "the interval must be > 0 seconds" in r.stderr
    r = gptjt("workers")
    assert r.returncode == 2 and "pass --coordinator HOST:PORT or set $GPTJT_COORDINATOR" in r.stderr
    assert as_json(gptjt("status", "--coordinator", swarm.address, "--json"))["paused"]  # nothing was changed


def test_resume_and_pause_take_effect(swarm):
    env = {"GPTJT_ADMIN_TOKEN": swarm.admin_token}  # the token from the environment
    assert as_json(gptjt("resume", "--coordinator", swarm.address, "--json", env=env)) == \
        {"paused": False, "changed": True, "step": 0}
    swarm.wait(lambda s: s["step"] >= 1, 60, "a step to close after resume")
    r = gptjt("pause", "--coordinator", swarm.address, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ticket issue paused at step "), r.stderr
    assert as_json(gptjt("status", "--coordinator", swarm.address, "--json"))["paused"]
    kinds = [e["kind"] for e in as_json(gptjt("events", "--coordinator", swarm.address, "--json",
                                              "--kind", "operator"))["events"]]
    assert kinds[-3:] == ["paused", "resumed", "paused"]


def test_join_tokens_create_list_revoke(swarm):
    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    admin = ["--coordinator", swarm.address, "--admin-token", swarm.admin_token]
    made = as_json(gptjt("token", "create", *admin, "--json"))
    assert made["token"].startswith("gptjt_") and len(made["id"]) == 10
    listed = as_json(gptjt("token", "list", "--coordinator", swarm.address, "--json"))["join_tokens"]
    assert {"id": made["id"], "revoked": False} in [{k: t[k] for k in ("id", "revoked")} for t in listed]
    r = gptjt("token", "revoke", made["id"], *admin)
    assert r.returncode == 0 and r.stdout.strip() == f"join token {made['id']} is now revoked"
    listed = as_json(gptjt("token", "list", "--coordinator", swarm.address, "--json"))["join_tokens"]
    assert [t["revoked"] for t in listed if t["id"] == made["id"]] == [True]
    with grpc.insecure_channel(swarm.address) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(token=made["token"], name="late"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    r = gptjt("token", "revoke", "0123456789", *admin)
    assert r.returncode == 2 and "no join token matches token id '0123456789'" in r.stderr


def test_drain_a_worker(swarm):
    s = as_json(gptjt("status", "--coordinator", swarm.address, "--json"))
    standby = next(w for w in s["workers"] if w["state"] == "standby")
    r = as_json(gptjt("drain", standby["name"], "--coordinator", swarm.address, "--admin-token", swarm.admin_token,
                      "--json"))
    assert (r["worker"], r["drain_requested"], r["warning"]) == (standby["id"], True, "")
    proc = next(p for p in swarm.procs if p.log.name == f"worker-{standby['name']}.log")
    assert proc.p.wait(30) == 0  # it hears it on its Watch stream, drains and exits cleanly
    assert "left the run" in proc.text()
    swarm.wait(lambda s: {w["id"]: w["state"] for w in s["workers"]}[standby["id"]] == "left", 10, "state left")
    leaves = as_json(gptjt("events", "--coordinator", swarm.address, "--json", "--kind", "leaves"))["events"]
    assert standby["id"] in leaves[-1]["detail"]
    r = gptjt("drain", standby["id"], "--coordinator", swarm.address, "--admin-token", swarm.admin_token)
    assert r.returncode == 4 and f"worker {standby['id']} ({standby['name']}) is left; there is nothing to drain" \
        in r.stderr
