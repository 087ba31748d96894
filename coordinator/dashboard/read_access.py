"""Who may read the dashboard's data: anyone, or only holders of the read or admin token.

With coordinator.read_access = "token", a reader presents the token as `Authorization: Bearer
TOKEN` (curl, Prometheus' `authorization` setting) or in the cookie COOKIE, which the page sets
once the token is typed in: EventSource (/api/stream) cannot send headers. Deny by default: every matched route needs the token except
the page itself and its assets (so it can ask for the token), and the admin actions, which check
the admin token themselves before reading their body.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from aiohttp import web

from ..finite_json import dumps

COOKIE = "gptjt-read-token"


def presented_tokens(request: web.Request) -> list[str]:
    """The tokens a request carries: its Bearer header and its read-token cookie (either may be absent)."""
    auth = request.headers.get("Authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return [t for t in (bearer, request.cookies.get(COOKIE, "").strip()) if t]


def refusal(presented: bool, where: str) -> web.Response:
    """401 with the JSON error shape of the other routes; Bearer (not Basic): no browser login box."""
    how = (f"send 'Authorization: Bearer TOKEN' or enter it in the dashboard's page (it keeps it in the cookie "
           f"{COOKIE}); the coordinator keeps the read token in {where}, and the admin token reads too")
    message = (f"the token given is neither this run's read token nor its admin token: {how}" if presented
               else f"this dashboard shows the run only to holders of its read token: {how}")
    return web.Response(status=401, body=dumps({"error": message}),
                        headers={"Content-Type": "application/json", "Cache-Control": "no-store",
                                 "WWW-Authenticate": 'Bearer realm="gptjt"'})


def read_guard(public_handlers: Collection, token_valid: Callable[[str], bool], where: str):
    """Middleware: a request routed to a handler outside `public_handlers` needs a token for which
    token_valid(token) holds (the read token or the admin token; both compare in constant time).
    Requests that match no route go on to their 404/405, which shows no data."""

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        info = request.match_info
        if getattr(info, "http_exception", None) is not None or info.handler in public_handlers:
            return await handler(request)
        tokens = presented_tokens(request)
        if any(token_valid(t) for t in tokens):
            return await handler(request)
        return refusal(bool(tokens), where)

    return guard
