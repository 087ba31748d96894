"""The coordinator's dashboard against one live swarm: JSON API, /metrics, admin API, and the page in
headless chromium (no console errors, workers and stage map shown, numbers equal `gptjt status
--json`, the loss plot grows as steps close, admin actions refused without the token). Then its
guard: an oversized body refused unread before the token, HTTPS with the coordinator's certificate,
a NaN heartbeat metric refused and one stored by an older version left out, and a plaintext non-loopback binding warned of."""

from __future__ import annotations

import json
import math
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection, HTTPException
from pathlib import Path

import grpc
import pytest

from gptjt_core.pki import new_key_pem, public_key_pem
from gptjt_core.status_gzip import gunzip_status
from gptjt_proto import coordinator_pb2 as cpb
from gptjt_proto import coordinator_pb2_grpc as cpb_grpc
from tests.browser import Browser, find_chromium
from tests.integration.test_tls import self_signed
from tests.swarm import BIN, Swarm, swarm_toml


def gptjt_json(*args: str) -> dict:
    r = subprocess.run([str(BIN / "gptjt"), *args, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def http(url: str, data: dict | None = None, token: str | None = None) -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(), headers=headers,
                                     method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def settled(s: dict) -> bool:
    """Paused, and nothing in flight: the numbers stay put until someone resumes."""
    return s["paused"] and s["phase"] == "open" and all(t["state"] != "leased" for t in s["current_step_tickets"])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    swarm = Swarm(tmp, swarm_toml(tmp, steps=40, placement="cost-model", min_workers=2))
    try:
        swarm.start_coordinator("--dashboard-port", "0", "--dashboard-file", str(tmp / "dashboard.url"))
        swarm.url = (tmp / "dashboard.url").read_text().strip()
        swarm.start_worker("a")
        swarm.start_worker("b")
        swarm.wait(lambda s: s["step"] >= 3, 120, "three steps to close")
        status, _, _ = http(swarm.url + "api/admin/pause", {}, swarm.admin_token)
        assert status == 200
        swarm.wait(settled, 30, "the paused run to settle")
        quiet = {}  # and the workers' heartbeats have reported their last counters

        def metrics_steady(s: dict) -> bool:
            nonlocal quiet
            now = {w["id"]: w["metrics"] for w in s["workers"]}
            steady, quiet = now == quiet, now
            time.sleep(0.6)  # more than a heartbeat interval
            return steady

        swarm.wait(metrics_steady, 30, "the workers' metrics to settle")
        yield swarm
    finally:  # also when the setup fails
        for proc in swarm.procs[1:]:
            proc.kill()
        swarm.close()


def test_api_status_is_the_cli_status(swarm):
    code, ctype, body = http(swarm.url + "api/status")
    assert code == 200 and ctype == "application/json"
    api, cli = json.loads(body), gptjt_json("status", "--coordinator", swarm.address)
    assert set(api) == set(cli)
    for key in ("step", "tokens", "loss", "tokens_per_s", "history", "tickets", "stages", "join_tokens", "lr"):
        assert api[key] == cli[key], key
    assert [w["id"] for w in api["workers"]] == [w["id"] for w in cli["workers"]]


def test_status_is_gzipped_for_a_caller_that_takes_it_and_says_the_same(swarm):
    """Status and /api/status gzipped (gptjt_core/status_gzip.py) for a caller that accepts it,
    plain for one that does not (an older `gptjt status`, curl without --compressed)."""
    request = urllib.request.Request(swarm.url + "api/status", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        assert reply.headers["Content-Encoding"] == "gzip" and reply.headers["Vary"] == "Accept-Encoding"
        web = json.loads(gunzip_status(reply.read()))
    with grpc.insecure_channel(swarm.address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        plain = stub.Status(cpb.StatusRequest(), timeout=10)
        packed = stub.Status(cpb.StatusRequest(accept_gzip=True), timeout=10)
    assert plain.json and not plain.json_gzip and packed.json_gzip and not packed.json
    expected = json.loads(plain.json)
    for status in (web, json.loads(gunzip_status(packed.json_gzip))):
        assert set(status) == set(expected)
        for key in ("step", "tokens", "loss", "history", "tickets", "stages", "lr"):
            assert status[key] == expected[key], key
        assert [w["id"] for w in status["workers"]] == [w["id"] for w in expected["workers"]]


def test_metrics_scrape(swarm):
    from prometheus_client.parser import text_string_to_metric_families

    code, ctype, body = http(swarm.url + "metrics")
    assert code == 200 and ctype.startswith("text/plain")
    s = gptjt_json("status", "--coordinator", swarm.address)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def value(family: str, **labels) -> float:
        return next(x.value for x in families[family].samples if labels.items() <= x.labels.items())

    assert value("gptjt_step") == s["step"] and value("gptjt_tokens") == s["tokens"]
    assert value("gptjt_paused") == 1 and value("gptjt_phase", phase="open") == 1
    assert value("gptjt_loss") == pytest.approx(s["loss"]) and value("gptjt_learning_rate") == pytest.approx(s["lr"])
    assert value("gptjt_workers", state="ready") == 2
    assert value("gptjt_tickets", state="committed") == s["tickets"]["committed"]
    for w in s["workers"]:
        assert value("gptjt_worker_tickets_done", worker=w["id"]) == w["tickets_done"]
        assert value("gptjt_worker_info", worker=w["id"], name=w["name"], stage=str(w["stage"])) == 1
        assert value("gptjt_worker_bytes_sent", worker=w["id"]) == w["metrics"]["bytes_sent"]
    assert value("gptjt_events", kind="step_closed") == s["event_counts"]["step_closed"]
    gauges = {"quarantined": "gptjt_quarantined_workers", "spot_verified_fraction": "gptjt_verified_fraction"}
    for what, n in s["verification"].items():  # commitments, chain checks, spot checks by verdict
        assert value(gauges[what]) == n if what in gauges else value("gptjt_verification", what=what) == n, what


def test_admin_api_needs_the_token(swarm):
    code, _, body = http(swarm.url + "api/admin/resume", {})
    assert code == 401 and "needs the run's admin token" in json.loads(body)["error"]
    code, _, body = http(swarm.url + "api/admin/resume", {}, "gptjt_admin_wrong")
    assert code == 401 and "not this run's" in json.loads(body)["error"]
    code, _, body = http(swarm.url + "api/admin/drain", {"worker": "nope"}, swarm.admin_token)
    assert code == 404 and "no worker 'nope' in this run" in json.loads(body)["error"]
    code, _, body = http(swarm.url + "api/admin/explode", {}, swarm.admin_token)
    assert code == 404 and "no admin action 'explode'" in json.loads(body)["error"]
    code, _, body = http(swarm.url + "api/events?kind=operator")
    assert code == 200 and [e["kind"] for e in json.loads(body)["events"]][-1] == "paused"
    assert gptjt_json("status", "--coordinator", swarm.address)["paused"]


def raw_post(url: str, headers: dict, body: bytes = b"") -> tuple[int, dict]:
    """POST with exactly these headers and body bytes (a Content-Length may promise more than is sent)."""
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("POST", parts.path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        reply = conn.getresponse()  # a server that waited for the promised body would time out here
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def test_oversized_body_is_refused_unread_before_the_token(swarm):
    promised = {"Content-Type": "application/json", "Content-Length": str(10 << 20)}  # 10 MiB, never sent
    for token in (None, "gptjt_admin_wrong", swarm.admin_token):
        auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        code, body = raw_post(swarm.url + "api/admin/resume", {**promised, **auth}, b'{"worker": "')
        assert code == 413 and "reads at most 65536 bytes" in body["error"], (token, body)
    # Within the cap, the token is checked first: no token, 401, whatever the body holds.
    code, body = raw_post(swarm.url + "api/admin/resume", {"Content-Length": "9"}, b"not json!")
    assert code == 401 and "needs the run's admin token" in body["error"]
    code, body = raw_post(swarm.url + "api/admin/resume", {"Content-Length": "9",
                                                            "Authorization": f"Bearer {swarm.admin_token}"}, b"not json!")
    assert code == 400 and "must be a JSON object" in body["error"]
    assert gptjt_json("status", "--coordinator", swarm.address)["paused"]  # nothing was done


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on this machine: install it (apt-get install -y chromium; .ci/run does this "
                    "before `make test`) to run the dashboard's browser test")
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_page_in_headless_chromium(browser, swarm, tmp_path):
    page = browser.new_page()
    page.goto(swarm.url)
    page.wait_for("window.gptjtRenders >= 2", 30, "the page to render twice (first fetch, then the stream)")
    assert page.errors() == []

    # The same moment: the run is paused and settled, so the page and the CLI see one state.
    shown = page.eval("window.gptjtStatus")
    s = gptjt_json("status", "--coordinator", swarm.address)
    assert (shown["step"], shown["tokens"], shown["history"]) == (s["step"], s["tokens"], s["history"])

    def text(sel: str) -> str:
        return page.eval(f"document.querySelector({json.dumps(sel)}).textContent")

    def data(sel: str) -> str:
        return page.eval(f"document.querySelector({json.dumps(sel)}).dataset.value")

    assert text("#ov-step") == f"{s['step']:,}" and text("#ov-steps-total") == f"{s['steps_total']:,}"
    assert text("#ov-tokens") == f"{s['tokens']:,}" and text("#ov-tokens-target") == f"{s['tokens_target']:,}"
    assert text("#ov-tokens-per-s") == f"{round(s['tokens_per_s']):,}"
    assert float(data("#ov-loss")) == s["loss"] and float(data("#ov-lr")) == s["lr"]
    assert float(data("#ov-eta")) == s["eta_s"] and float(data("#ov-step-s")) == s["measured_step_s"]
    for sel, key in (("#ov-spot-checks", "spot_checks"), ("#ov-spot-disagree", "spot_disagree"),
                     ("#ov-chain-mismatches", "mismatches"), ("#ov-quarantined", "quarantined")):
        assert int(data(sel)) == s["verification"][key], sel
    assert float(data("#ov-verified-fraction")) == s["verification"]["spot_verified_fraction"]
    for key in ("issued", "committed", "reissued", "pending"):
        assert int(data(f"#tk-{key}")) == s["tickets"][key], key
    assert page.eval("document.querySelector('#paused').hidden") is False

    # Workers table and stage map.
    rows = page.eval("[...document.querySelectorAll('#workers-table tbody tr')].map(r => "
                     "[r.dataset.worker, r.querySelector('td.tickets').dataset.value])")
    assert rows == [[w["id"], str(w["tickets_done"])] for w in s["workers"]]
    stages = page.eval("[...document.querySelectorAll('#stage-map .stage[data-stage]')].map(e => "
                       "[e.querySelector('h4').textContent, [...e.querySelectorAll('.replica')].map(r => r.dataset.worker)])")
    assert len(stages) == len(s["stages"]) == 2
    for (header, replicas), st in zip(stages, s["stages"]):
        assert f"stage {st['index']} layers {st['start_layer']}–{st['end_layer']}" in header
        assert replicas == st["workers"]

    # Every closed step is a point of the loss plot (a short run's curve is one step a point).
    points = page.eval("[...document.querySelectorAll('#loss-plot circle.pt')].map(c => Number(c.dataset.value))")
    assert points == [p["loss"] for p in s["loss_curve"]] == [h["loss"] for h in s["history"]]

    # Every valid join token has both revoke buttons (plain, and ending the sessions it admitted).
    valid = [k["id"] for k in s["join_tokens"] if not k["revoked"]]
    for cls in ("revoke", "revoke-end"):
        assert page.eval(f"[...document.querySelectorAll('#tokens-table button.{cls}')].map(b => b.dataset.token)") \
            == valid, cls

    # An admin action without the token is refused, and nothing changes ...
    page.eval("document.querySelector('#btn-resume').click()")
    page.wait_for("document.querySelector('#admin-result').dataset.status", 10, "the refusal")
    assert page.eval("document.querySelector('#admin-result').dataset.status") == "401"
    assert "needs the run's admin token" in text("#admin-result")
    assert gptjt_json("status", "--coordinator", swarm.address)["paused"]
    # ... with it, it takes effect, and the loss plot gains points as steps close.
    page.eval(f"const t = document.querySelector('#admin-token'); t.value = {json.dumps(swarm.admin_token)}; "
              "t.dispatchEvent(new Event('change'))")
    page.eval("document.querySelector('#btn-resume').click()")
    page.wait_for("document.querySelector('#admin-result').dataset.status === '200'", 10, "the resume")
    assert not gptjt_json("status", "--coordinator", swarm.address)["paused"]
    page.wait_for(f"document.querySelectorAll('#loss-plot circle.pt').length >= {len(points) + 2}", 60,
                  "two more points on the loss plot")
    page.wait_for("document.querySelector('#paused').hidden", 10, "the paused badge to go")

    # The refused request shows as a failed load (its 401); nothing else went wrong on the page.
    assert page.errors(network=False) == []
    assert all("401" in e for e in page.errors()), page.errors()
    page.screenshot(tmp_path / "dashboard.png")
    if os.environ.get("GPTJT_DASHBOARD_SCREENSHOT"):  # docs/dashboard.png is made this way
        page.screenshot(Path(os.environ["GPTJT_DASHBOARD_SCREENSHOT"]))


@pytest.fixture(scope="module")
def tls_swarm(tmp_path_factory):
    """A coordinator with a certificate (no workers): its dashboard serves HTTPS with it."""
    tmp = tmp_path_factory.mktemp("dashboard-tls")
    cert, key = self_signed(tmp)
    swarm = Swarm(tmp, swarm_toml(tmp, steps=5, extra=f'tls_cert = "{cert}"\ntls_key = "{key}"'))
    try:
        swarm.start_coordinator()
        swarm.cert = cert
        swarm.tls = ssl.create_default_context(cafile=cert)
        yield swarm
    finally:
        swarm.close()


def https(swarm, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(swarm.dashboard_url + path, timeout=20, context=swarm.tls) as reply:
        return reply.status, reply.read()


def strict_json(body: bytes):
    """As the page's JSON.parse reads it: NaN, Infinity and -Infinity are errors."""
    return json.loads(body, parse_constant=lambda word: pytest.fail(f"{word} in the dashboard's JSON"))


def test_https_with_the_coordinators_certificate(tls_swarm):
    assert tls_swarm.dashboard_url.startswith("https://127.0.0.1:")
    assert f"dashboard at {tls_swarm.dashboard_url} " in tls_swarm.coordinator.text()
    assert "WARNING" not in tls_swarm.coordinator.text()
    code, body = https(tls_swarm, "api/status")
    assert code == 200 and strict_json(body)["steps_total"] == 5
    request = urllib.request.Request(tls_swarm.dashboard_url + "api/admin/pause", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=20, context=tls_swarm.tls)
    assert refused.value.code == 401
    plain = tls_swarm.dashboard_url.replace("https://", "http://")
    with pytest.raises((OSError, HTTPException)):  # no plaintext answer on the TLS port
        urllib.request.urlopen(plain + "api/status", timeout=10).read()


def test_nan_heartbeat_metric_does_not_break_the_json(tls_swarm):
    """A NaN heartbeat metric is refused at the door; one an older version stored in the ledger is
    left out of the status, so the dashboard's JSON, its stream and /metrics stay standard."""
    import sqlite3

    creds = grpc.ssl_channel_credentials(Path(tls_swarm.cert).read_bytes())
    with grpc.secure_channel(tls_swarm.address, creds) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        joined = stub.Join(cpb.JoinRequest(token=tls_swarm.token, name="nan", address="127.0.0.1:1",
                                           public_key_pem=public_key_pem(new_key_pem()).decode()), timeout=10)
        worker, session = joined.worker_id, (("gptjt-worker", joined.worker_id), ("gptjt-session", joined.session))
        nan = cpb.WorkerMetrics(micro_batches_per_s=math.nan, busy_fraction=math.inf)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Heartbeat(cpb.HeartbeatRequest(worker_id=worker, state=cpb.READY, metrics=nan), timeout=10,
                           metadata=session)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "heartbeat.metrics.micro_batches_per_s = nan" in refused.value.details()
        old = '{"micro_batches_per_s": NaN, "busy_fraction": Infinity, "downstream_mbit": -Infinity, "micro_batches": 3}'

        def beat_and_store_nan() -> None:  # heartbeats keep the raw worker alive (the test config's timeout is 3 s)
            stub.Heartbeat(cpb.HeartbeatRequest(worker_id=worker, state=cpb.READY,
                                                metrics=cpb.WorkerMetrics(micro_batches=3)), timeout=10,
                           metadata=session)
            with sqlite3.connect(tls_swarm.ledger_path) as db:  # as a version before the door stored it
                db.execute("UPDATE workers SET metrics=? WHERE id=?", (old, worker))

        # The worker beats from a thread of its own from here to the end: on 2 loaded cores one
        # HTTPS request took ~2.6 s, and a status read then /metrics outlasted the 3 s timeout
        # (CI, 2026-12-05: declared dead in between, so /metrics rightly had no sample of it).
        stop = threading.Event()

        def keep_beating() -> None:
            while not stop.wait(0.5):
                beat_and_store_nan()

        beat_and_store_nan()
        beating = threading.Thread(target=keep_beating)
        beating.start()
        try:
            deadline = time.monotonic() + 20
            while True:
                code, body = https(tls_swarm, "api/status")
                assert code == 200
                shown = {w["id"]: w for w in strict_json(body)["workers"]}
                if shown.get(worker, {}).get("metrics", {}).get("micro_batches") == 3:
                    code, metrics = https(tls_swarm, "metrics")  # the worker alive, its NaN stored
                    break
                assert time.monotonic() < deadline, f"worker {worker}'s heartbeat never showed: {shown}"
                time.sleep(0.3)
            assert code == 200
            assert shown[worker]["state"] != "dead"
            assert not {"micro_batches_per_s", "busy_fraction", "downstream_mbit"} & set(shown[worker]["metrics"])
            with urllib.request.urlopen(tls_swarm.dashboard_url + "api/stream", timeout=20,
                                        context=tls_swarm.tls) as s:
                lines = iter(s.readline, b"")
                data = next(line for line in lines if line.startswith(b"data: "))
        finally:
            stop.set()
            beating.join()
        assert worker in {w["id"] for w in strict_json(data[6:])["workers"]}
        body = metrics
    from prometheus_client.parser import text_string_to_metric_families

    samples = [x for f in text_string_to_metric_families(body.decode()) for x in f.samples
               if x.labels.get("worker") == worker]
    assert samples and all(math.isfinite(x.value) for x in samples)


def test_revoking_a_token_from_the_dashboard_ends_its_sessions(tls_swarm):
    """The dashboard's 'revoke + end sessions': the worker that token admitted is refused at its next call."""
    def admin(action: str, body: dict) -> dict:
        request = urllib.request.Request(tls_swarm.dashboard_url + f"api/admin/{action}", method="POST",
                                         data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {tls_swarm.admin_token}"})
        with urllib.request.urlopen(request, timeout=20, context=tls_swarm.tls) as reply:
            return strict_json(reply.read())

    token = admin("token-create", {})
    creds = grpc.ssl_channel_credentials(Path(tls_swarm.cert).read_bytes())
    with grpc.secure_channel(tls_swarm.address, creds) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        joined = stub.Join(cpb.JoinRequest(token=token["token"], name="revoked", address="127.0.0.1:1",
                                           public_key_pem=public_key_pem(new_key_pem()).decode()), timeout=10)
        session = (("gptjt-worker", joined.worker_id), ("gptjt-session", joined.session))
        beat = cpb.HeartbeatRequest(worker_id=joined.worker_id, state=cpb.STANDBY, loaded_epoch=-1, position=-1)
        assert stub.Heartbeat(beat, timeout=10, metadata=session).known
        admin("token-revoke-and-end-sessions", {"token": token["id"]})
        with pytest.raises(grpc.RpcError) as refused:
            stub.Heartbeat(beat, timeout=10, metadata=session)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:  # nor can it join again with that token
            stub.Join(cpb.JoinRequest(token=token["token"], name="again", address="127.0.0.1:1",
                                      public_key_pem=public_key_pem(new_key_pem()).decode()), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_dashboard_beyond_loopback_is_served_with_a_warning(tmp_path):
    """A separate bind address: gRPC on loopback, the dashboard on every interface, said loudly; a
    SIGTERM ends it cleanly while a page streams."""
    swarm = Swarm(tmp_path, swarm_toml(tmp_path, steps=5))
    try:
        coordinator = swarm.start_coordinator("--dashboard-host", "0.0.0.0")
        assert swarm.address.startswith("127.0.0.1:") and swarm.dashboard_url.startswith("http://0.0.0.0:")
        ready = next(line for line in coordinator.text().splitlines() if "dashboard at" in line)
        assert "WARNING: the dashboard serves plain HTTP on 0.0.0.0" in ready and "admin token" in ready
        assert "WARNING" in coordinator.text().split(ready)[0]  # logged too, before the ready line
        local = swarm.dashboard_url.replace("0.0.0.0", "127.0.0.1")
        code, _, body = http(local + "api/status")
        assert code == 200 and json.loads(body)["steps_total"] == 5
        with urllib.request.urlopen(local + "api/stream", timeout=20) as stream:
            assert stream.readline() == b"retry: 2000\n"
            coordinator.kill(signal.SIGTERM)
            coordinator.p.wait(15)
        assert coordinator.p.returncode == 0, coordinator.text()[-2000:]
    finally:
        swarm.close()
