"""The dashboard's routes: an aiohttp application whose handlers run on the coordinator's event loop.

The loop is the one that owns the ledger's SQLite connection, so handlers call the ledger directly.

  GET  /                      the page (static/index.html; app.js and style.css under /static/)
  GET  /api/status            the status object, exactly what `gptjt status --json` prints
  GET  /api/stream            the status object as Server-Sent Events, once a second (less often
                              for a status of megabytes: status_events.py)
  GET  /api/events            the event log: ?after_id=N&limit=N&kind=K (as `gptjt events --json`)
  GET  /metrics               Prometheus text format (the run, and each live worker)
With coordinator.read_access = "token", the data routes (all but the page, its assets and the
admin actions) need the read or admin token, as a Bearer header or the page's cookie
(read_access.py); without it they answer 401.
  POST /api/admin/ACTION      drain | pause | resume | token-create | token-revoke |
                              token-revoke-and-end-sessions | quarantine-lift, with the
                              header "Authorization: Bearer ADMIN_TOKEN" and a JSON body
                              {"worker": ID} (drain, quarantine-lift) or {"token": ID_OR_TOKEN} (token-revoke*)
Errors are JSON {"error": message}: 400 bad argument, 401 no/wrong admin (or read) token, 404 unknown
page, worker or token, 409 cannot be done now (the worker already left), 413 body over the cap.
A body over the cap is refused from its Content-Length, unread and before any token is looked
at; an admin action checks the token before it reads the body. JSON replies never hold NaN or
Infinity (they become null); /metrics writes them as Prometheus does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gptjt_core.event_wait import wait_for_event

from ..admin_token import Unauthorized
from ..ledger import OperatorError
from ..finite_json import dumps
from ..status_cache import StatusCache
from .read_access import read_guard
from .status_events import pause_after, write_status_event

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # an admin body is {"worker": ID} or {"token": ID}: a few dozen bytes
_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8"}
_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ERROR_STATUS = {"not_found": 404, "precondition": 409, "invalid": 400}


def _reply(code: int, body: bytes, content_type: str = "application/json") -> web.Response:
    return web.Response(status=code, body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _accepts_gzip(accept_encoding: str) -> bool:
    """An Accept-Encoding header that takes gzip (RFC 9110: "gzip" or "x-gzip", not given q=0)."""
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        if coding.strip() in ("gzip", "x-gzip"):
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _json(code: int, value) -> web.Response:
    return _reply(code, dumps(value))


def _error(code: int, message: str) -> web.Response:
    return _json(code, {"error": message})


def _body_guard(max_body_bytes: int):
    """Middleware: refuse an oversized body from its Content-Length, unread, before any handler
    (so before any token check); give aiohttp's own refusals (404, 405, 413) the JSON shape."""

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            return _too_large(length, max_body_bytes)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:  # a chunked body that ran past the cap while read
            return _too_large(None, max_body_bytes)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            if request.method == "POST":
                return _error(404, f"no action at {request.path!r}; actions are under /api/admin/")
            if request.method in ("GET", "HEAD"):
                return _error(404, f"no page {request.path!r}; try / or /api/status")
            return _error(405, f"{request.method} is not served here: GET the pages, POST /api/admin/ACTION")

    return guard


def _too_large(length: int | None, cap: int) -> web.Response:
    size = f"{length} bytes" if length is not None else "larger than that"
    response = _error(413, f"the request body is {size}; the dashboard reads at most {cap} bytes "
                           "(an admin action's body is {\"worker\": ID} or {\"token\": ID})")
    response.force_close()  # the rest of the body is never read: the connection ends with the reply
    return response


class _DebugAccessLog(AbstractAccessLogger):
    """Access lines at debug level (-v), not on every request at INFO."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug("%s %s %s %d %.1f ms", request.remote, request.method, request.path_qs, response.status,
                          time * 1e3)


class Dashboard:
    """The page and API of one coordinator, served on its event loop; `start()` binds, `stop()` ends."""

    def __init__(self, ledger, actions, stream_interval_s: float = 1.0, max_body_bytes: int = MAX_BODY_BYTES,
                 reader=None, statuses: StatusCache | None = None):
        """reader: the run's ReadToken where reading needs it (coordinator.read_access = "token"), else
        None; statuses: the coordinator's shared status builder (its own one if None)."""
        self.ledger, self.actions = ledger, actions
        self.statuses = statuses if statuses is not None else StatusCache(ledger)
        self.stream_interval_s = stream_interval_s
        self.stopping = asyncio.Event()  # ends the SSE streams
        self.assets = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in _STATIC}
        middlewares = [_body_guard(max_body_bytes)]  # first: an oversized body is refused before any token
        if reader is not None:  # the page and its assets stay open, so it can ask for the token
            public = frozenset({self.page, self.static, self.favicon, self.admin})
            middlewares.append(read_guard(public, lambda t: reader.valid(t) or actions.admin.valid(t), reader.where))
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
        self.app.add_routes([
            web.get("/", self.page), web.get("/index.html", self.page), web.get("/static/{name}", self.static),
            web.get("/favicon.ico", self.favicon), web.get("/api/status", self.status),
            web.get("/api/stream", self.stream), web.get("/api/events", self.events),
            web.get("/metrics", self.metrics), web.post("/api/admin/{action}", self.admin)])
        self.runner = web.AppRunner(self.app, access_log_class=_DebugAccessLog, access_log=log,
                                    shutdown_timeout=2.0)  # streams end on `stopping` well before
        self.port, self.url = 0, ""
        self.exposure = ""  # set by start_dashboard: why this binding exposes the admin token, if it does

    async def start(self, host: str, port: int, ssl_context=None) -> Dashboard:
        """Bind host:port (port 0: any free one; an IPv6 host may be bracketed); HTTPS with ssl_context."""
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host.strip("[]"), port, ssl_context=ssl_context).start()
        except BaseException:
            await self.runner.cleanup()
            raise
        self.port = self.runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address
        self.url = f"{'https' if ssl_context else 'http'}://{shown}:{self.port}/"
        return self

    async def stop(self) -> None:
        self.stopping.set()
        await self.runner.cleanup()

    # -- routes ---------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        return _reply(200, self.assets["index.html"], _STATIC["index.html"])

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.assets:
            raise web.HTTPNotFound()  # the guard words it
        return _reply(200, self.assets[name], _STATIC[name])

    async def favicon(self, request: web.Request) -> web.Response:
        return _reply(204, b"", "image/x-icon")

    async def status(self, request: web.Request) -> web.Response:
        if _accepts_gzip(request.headers.get("Accept-Encoding", "")):  # as the Status RPC: gzipped off the loop
            response = _reply(200, await self.statuses.gzipped())
            response.headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
            return response
        return _reply(200, await self.statuses.get())

    async def metrics(self, request: web.Request) -> web.Response:
        return _reply(200, await self.statuses.metrics(), _METRICS_TYPE)

    async def events(self, request: web.Request) -> web.Response:
        query = request.query  # a blank value counts as absent
        try:
            after, limit = int(query.get("after_id") or 0), int(query.get("limit") or 50)
        except ValueError:
            return _error(400, "after_id and limit must be integers")
        try:
            events = self.ledger.events.query(after, limit, query.get("kind") or "")
        except OperatorError as e:
            return _error(_ERROR_STATUS[e.code], str(e))
        return _json(200, {"events": events})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            await response.write(b"retry: 2000\n\n")
            while not self.stopping.is_set():
                payload = await self.statuses.get()
                await write_status_event(response, payload)
                await wait_for_event(self.stopping, pause_after(len(payload), self.stream_interval_s))
        except ConnectionError:  # reset by the peer, or aiohttp's "Connection lost" on a drain
            pass  # the page went away
        return response

    async def admin(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        admin_token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        try:
            self.actions.admin.check(admin_token)  # before the body is read or the action looked up
        except Unauthorized as e:
            return _error(401, str(e))
        try:
            raw = await request.read()  # at most max_body_bytes (client_max_size)
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return _error(400, f"the request body must be a JSON object ({e})")
        arg = str(body.get("worker") or body.get("token") or "")
        try:
            result = await self.actions.perform(request.match_info["action"], admin_token, arg)
        except OperatorError as e:
            return _error(_ERROR_STATUS[e.code], str(e))
        return _json(200, result)
