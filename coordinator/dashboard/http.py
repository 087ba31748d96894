"""The dashboard's HTTP server: a stdlib ThreadingHTTPServer in a thread beside the coordinator's event loop.

Every ledger call runs on the event loop (the ledger's one SQLite connection lives there);
the HTTP threads hand it over with `run_coroutine_threadsafe` and wait.

  GET  /                      the page (static/index.html; app.js and style.css under /static/)
  GET  /api/status            the status object, exactly what `gptjt status --json` prints
  GET  /api/stream            the status object as Server-Sent Events, once a second
  GET  /api/events            the event log: ?after_id=N&limit=N&kind=K (as `gptjt events --json`)
  GET  /metrics               Prometheus text format (the run, and each live worker)
  POST /api/admin/ACTION      drain | pause | resume | token-create | token-revoke, with the
                              header "Authorization: Bearer ADMIN_TOKEN" and a JSON body
                              {"worker": ID} (drain) or {"token": ID_OR_TOKEN} (token-revoke)
Errors are JSON {"error": message}: 400 bad argument, 401 no/wrong admin token, 404 unknown
worker or token, 409 cannot be done now (the worker already left).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from ..admin_token import Unauthorized
from ..ledger import OperatorError
from .metrics import render_metrics

log = logging.getLogger(__name__)

_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8"}
_ERROR_STATUS = {"not_found": HTTPStatus.NOT_FOUND, "precondition": HTTPStatus.CONFLICT,
                 "invalid": HTTPStatus.BAD_REQUEST}


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    """A ThreadingHTTPServer that binds IPv6 listen hosts too."""
    address_family = socket.AF_INET6  # a coordinator listening on [::] or an IPv6 address


class Dashboard:
    """Serves the page and API for one coordinator; `stop()` ends it."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop, ledger, actions,
                 stream_interval_s: float = 1.0):
        self.loop, self.ledger, self.actions = loop, ledger, actions
        self.stream_interval_s = stream_interval_s
        self.stopping = threading.Event()
        self._cache: tuple[float, bytes] = (0.0, b"")
        self._cache_lock = threading.Lock()
        self.assets = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in _STATIC}
        server_class = _ThreadingHTTPServerV6 if ":" in host else ThreadingHTTPServer
        self.httpd = server_class((host.strip("[]"), port), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    def start(self) -> Dashboard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- on the event loop -------------------------------------------------------------
    def on_loop(self, fn: Callable, timeout_s: float = 15.0):
        async def call():
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout_s)

    def status_json(self, max_age_s: float = 0.25) -> bytes:
        """The status object as JSON; requests within max_age_s share one computation."""
        with self._cache_lock:
            at, body = self._cache
            if time.monotonic() - at > max_age_s or not body:
                body = json.dumps(self.on_loop(self.ledger.status)).encode()
                self._cache = (time.monotonic(), body)
            return body

    def act(self, action: str, admin_token: str, arg: str) -> dict:
        future = asyncio.run_coroutine_threadsafe(self.actions.perform(action, admin_token, arg), self.loop)
        result = future.result(15.0)
        with self._cache_lock:
            self._cache = (0.0, b"")  # the next status shows the change
        return result


class DashboardHandler(BaseHTTPRequestHandler):
    """One request: the page, its assets, the JSON API, the SSE stream, /metrics, admin actions.
    `dash` is set on a subclass per server (_handler)."""

    dash: Dashboard
    server_version = "gptjt-dashboard"

    def log_message(self, fmt, *args):  # access logs at debug level, not on stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode())

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._send(200, self.dash.assets["index.html"], _STATIC["index.html"])
            elif path.startswith("/static/") and path[8:] in self.dash.assets:
                self._send(200, self.dash.assets[path[8:]], _STATIC[path[8:]])
            elif path == "/api/status":
                self._send(200, self.dash.status_json())
            elif path == "/api/stream":
                self._stream()
            elif path == "/api/events":
                self._events(parse_qs(url.query))
            elif path == "/metrics":
                self._send(200, render_metrics(lambda: json.loads(self.dash.status_json())),
                           "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._error(404, f"no page {path!r}; try / or /api/status")
        except (TimeoutError, RuntimeError) as e:  # the event loop is busy or shutting down
            self._error(503, f"the coordinator did not answer in time ({e!r}); retry")

    do_HEAD = do_GET

    def _events(self, query: dict) -> None:
        try:
            after = int(query.get("after_id", ["0"])[0])
            limit = int(query.get("limit", ["50"])[0])
        except ValueError:
            return self._error(400, "after_id and limit must be integers")
        kind = query.get("kind", [""])[0]
        try:
            events = self.dash.on_loop(lambda: self.dash.ledger.events.query(after, limit, kind))
        except OperatorError as e:
            return self._error(_ERROR_STATUS[e.code], str(e))
        self._send(200, json.dumps({"events": events}).encode())

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not self.dash.stopping.is_set():
                self.wfile.write(b"event: status\ndata: " + self.dash.status_json() + b"\n\n")
                self.wfile.flush()
                self.dash.stopping.wait(self.dash.stream_interval_s)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, RuntimeError):
            pass  # the page went away, or the coordinator stops

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if not path.startswith("/api/admin/"):
            return self._error(404, f"no action at {path!r}; actions are under /api/admin/")
        action = path[len("/api/admin/"):]
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return self._error(400, f"the request body must be a JSON object ({e})")
        auth = self.headers.get("Authorization", "")
        admin_token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        arg = str(body.get("worker") or body.get("token") or "")
        try:
            result = self.dash.act(action, admin_token, arg)
        except Unauthorized as e:
            return self._error(401, str(e))
        except OperatorError as e:
            return self._error(_ERROR_STATUS[e.code], str(e))
        except (TimeoutError, RuntimeError) as e:
            return self._error(503, f"the coordinator did not answer in time ({e!r}); retry")
        self._send(200, json.dumps(result).encode())



def _handler(dash: Dashboard) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (DashboardHandler,), {"dash": dash})


def start_dashboard(host: str, port: int, ledger, actions, loop: asyncio.AbstractEventLoop | None = None) -> Dashboard:
    """Bind (port 0: any free port) and serve in a daemon thread."""
    return Dashboard(host, port, loop or asyncio.get_running_loop(), ledger, actions).start()
