"""coordinator.read_access = "token" against one live coordinator (no workers): the `gptjt` read
commands are refused (exit 4) without the read token and work with --read-token, $GPTJT_READ_TOKEN
or the admin token; local_swarm reads with the token beside the ledger; the dashboard's data routes
answer 401 without it and 200 with a Bearer header or the page's cookie, while the page itself
still loads, asks for the token in headless chromium, and then renders."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from local_swarm.swarm import fetch_status
from tests.browser import Browser, find_chromium
from tests.swarm import BIN, Swarm, swarm_toml

DATA_ROUTES = ("api/status", "api/stream", "api/events?limit=5", "metrics")
COOKIE = "gptjt-read-token"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("read-token")
    swarm = Swarm(tmp, swarm_toml(tmp, steps=5, extra='read_access = "token"'))
    try:
        swarm.start_coordinator()
        yield swarm
    finally:
        swarm.close()


def gptjt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GPTJT_ADMIN_TOKEN", "GPTJT_READ_TOKEN", "GPTJT_COORDINATOR")}
    return subprocess.run([str(BIN / "gptjt"), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def as_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def get(url: str, headers: dict | None = None, method: str = "GET", data: bytes | None = None):
    """(status, headers, the body's first line for a stream or the whole body otherwise)."""
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            stream = reply.headers.get("Content-Type", "").startswith("text/event-stream")
            return reply.status, reply.headers, reply.readline() if stream else reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# -- the CLI --------------------------------------------------------------------------------
def test_read_commands_without_a_token_exit_4_saying_what_to_do(swarm):
    assert swarm.read_token.startswith("gptjt_read_")
    ready = swarm.coordinator.text()
    assert f"reading needs the read token in {swarm.ledger_path}.read-token" in ready
    for command in (["status"], ["events"], ["token", "list"]):
        r = gptjt(*command, "--coordinator", swarm.address, "--json")
        assert r.returncode == 4, (command, r.stdout, r.stderr)
        assert r.stdout == ""
        assert "needs its read token" in r.stderr and "--read-token" in r.stderr, r.stderr
        assert "GPTJT_READ_TOKEN" in r.stderr and "admin token reads too" in r.stderr
    r = gptjt("status", "--coordinator", swarm.address, "--read-token", "gptjt_read_wrong")
    assert r.returncode == 4 and "neither this run's read token nor its admin token" in r.stderr, r.stderr


def test_read_commands_with_the_read_or_admin_token(swarm):
    address = swarm.address
    s = as_json(gptjt("status", "--coordinator", address, "--json", "--read-token", swarm.read_token))
    assert s["steps_total"] == 5 and s["workers"] == []
    env = {"GPTJT_READ_TOKEN": swarm.read_token, "GPTJT_COORDINATOR": address}
    assert as_json(gptjt("stages", "--json", env=env))["stages"]
    events = as_json(gptjt("events", "--json", "--kind", "operator", env=env))["events"]
    assert "run_created" in [e["kind"] for e in events]
    # The admin token reads too: from the flag, and from the environment.
    s = as_json(gptjt("tickets", "--coordinator", address, "--json", "--admin-token", swarm.admin_token))
    assert s["tickets"]["issued"] == 0
    tokens = as_json(gptjt("token", "list", "--coordinator", address, "--json",
                           env={"GPTJT_ADMIN_TOKEN": swarm.admin_token}))["join_tokens"]
    assert [k["revoked"] for k in tokens] == [False]  # the swarm's own join token
    r = gptjt("status", "--coordinator", address, "--read-token", swarm.read_token)  # the tables, for people
    assert r.returncode == 0 and "test-swarm" in r.stdout, r.stderr


def test_local_swarm_reads_with_the_token_beside_the_ledger(swarm, tmp_path):
    assert swarm.status()["steps_total"] == 5  # LocalSwarm found STATE.read-token
    with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
        fetch_status(swarm.address, timeout=10)
    # A coordinator given $GPTJT_READ_TOKEN writes no file: the swarm's env says it.
    other = Swarm(tmp_path, swarm.config, env={"GPTJT_READ_TOKEN": "gptjt_read_from_env"})
    assert other.read_token == "gptjt_read_from_env"


# -- the dashboard ---------------------------------------------------------------------------
def test_dashboard_data_needs_the_read_or_admin_token(swarm):
    url = swarm.dashboard_url
    for route in DATA_ROUTES:
        code, headers, body = get(url + route)
        assert code == 401, (route, body)
        assert headers["WWW-Authenticate"].startswith("Bearer ")  # not Basic: no browser login box
        assert "shows the run only to holders of its read token" in json.loads(body)["error"]
        code, _, body = get(url + route, {"Authorization": "Bearer gptjt_read_wrong"})
        assert code == 401 and "neither this run's read token" in json.loads(body)["error"], route
        code, _, body = get(url + route, {"Cookie": f"{COOKIE}=gptjt_read_wrong"})
        assert code == 401, route
        for headers in ({"Authorization": f"Bearer {swarm.read_token}"}, {"Cookie": f"{COOKIE}={swarm.read_token}"},
                        {"Authorization": f"Bearer {swarm.admin_token}"}):
            code, _, body = get(url + route, headers)
            assert code == 200, (route, headers, body)
            if route == "api/stream":
                assert body == b"retry: 2000\n"
    _, _, body = get(url + "api/status", {"Authorization": f"Bearer {swarm.read_token}"})
    assert json.loads(body)["steps_total"] == 5
    _, _, body = get(url + "metrics", {"Cookie": f"{COOKIE}={swarm.read_token}"})
    assert b"gptjt_steps_target 5.0" in body


def test_dashboard_page_and_admin_actions_keep_their_own_rules(swarm):
    url = swarm.dashboard_url
    for page, kind in (("", "text/html"), ("index.html", "text/html"), ("static/app.js", "text/javascript"),
                       ("static/style.css", "text/css")):
        code, headers, body = get(url + page)
        assert code == 200 and headers["Content-Type"].startswith(kind) and body, page
    assert get(url + "favicon.ico")[0] == 204
    assert get(url + "no-such-page")[0] == 404  # no data behind it either way
    # Admin actions check the admin token themselves (a read token is not enough).
    code, _, body = get(url + "api/admin/pause", method="POST", data=b"{}")
    assert code == 401 and "needs the run's admin token" in json.loads(body)["error"]
    code, _, body = get(url + "api/admin/pause", {"Authorization": f"Bearer {swarm.read_token}"}, "POST", b"{}")
    assert code == 401 and "not this run's" in json.loads(body)["error"]
    for action in ("pause", "resume"):
        code, _, body = get(url + f"api/admin/{action}", {"Authorization": f"Bearer {swarm.admin_token}"}, "POST",
                            b"{}")
        assert code == 200, body


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on this machine: install it (apt-get install -y chromium) to run the page's test")
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_page_asks_for_the_read_token_then_renders(browser, swarm):
    page = browser.new_page()
    page.goto(swarm.dashboard_url)
    page.wait_for("!document.querySelector('#read-token-prompt').hidden", 30, "the read-token prompt")
    assert page.eval("window.gptjtRenders") == 0
    assert "read token" in page.eval("document.querySelector('#read-token-error').textContent")

    def submit(token: str) -> None:
        page.eval(f"document.querySelector('#read-token').value = {json.dumps(token)}; "
                  "document.querySelector('#read-token-form').requestSubmit()")

    submit("gptjt_read_wrong")  # refused again, and the page says why
    page.wait_for("document.querySelector('#read-token-error').textContent.includes('neither')", 15,
                  "the refusal of a wrong token")
    assert not page.eval("document.querySelector('#read-token-prompt').hidden")
    submit(swarm.read_token)
    page.wait_for("window.gptjtRenders >= 2", 30, "the page to render twice (first fetch, then the stream)")
    assert page.eval("document.querySelector('#read-token-prompt').hidden")
    assert page.eval("window.gptjtStatus.steps_total") == 5
    cookie = next(c for c in page.send("Network.getCookies")["cookies"] if c["name"] == COOKIE)
    assert cookie["value"] == swarm.read_token and cookie["sameSite"] == "Strict"
    assert cookie["session"] and not cookie["httpOnly"]  # set by the page's script: cannot be HttpOnly
    assert page.errors(network=False) == []
    assert all("401" in e for e in page.errors()), page.errors()  # the refused loads, nothing else

    again = browser.new_page()  # the cookie stays for the browser session: no prompt this time
    again.goto(swarm.dashboard_url)
    again.wait_for("window.gptjtRenders >= 1", 30, "a second tab to render")
    assert again.eval("document.querySelector('#read-token-prompt').hidden")
    assert again.errors() == []
