"""What keeps the console safe by default: a one-time sign-in token (as Jupyter's), a
session cookie it is exchanged for, a CSRF token checked on every POST, a strict
Content-Security-Policy (no inline script, nothing from another origin) and a Host check
(so a page of another site cannot reach the console through DNS rebinding)."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlencode

from starlette.datastructures import URL
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

from exchange.console.i18n import LANGUAGE_DEFAULT

COOKIE_NAME = "exchange_console"
TOKEN_BYTES = 32
SESSIONS_MAX = 16
SESSION_TTL_S = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'")
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


@dataclass
class BrowserSession:
    """One signed-in browser: its CSRF token and language."""

    session_id: str
    csrf: str
    created_s: float
    language: str = LANGUAGE_DEFAULT
    notes: dict[str, str] = field(default_factory=dict)


class Gate:
    """The console's one sign-in token and the browser sessions it opened."""

    def __init__(self, token: str | None = None) -> None:
        self.token: str | None = token or secrets.token_urlsafe(TOKEN_BYTES)
        self.sessions: OrderedDict[str, BrowserSession] = OrderedDict()

    def new_token(self) -> str:
        """A fresh one-time token (the console prints it again on request)."""
        self.token = secrets.token_urlsafe(TOKEN_BYTES)
        return self.token

    def spend(self, offered: str) -> BrowserSession | None:
        """A new session for the token, which is spent; None for any other value."""
        if self.token is None or not hmac.compare_digest(offered.encode(),
                                                         self.token.encode()):
            return None
        self.token = None
        session = BrowserSession(secrets.token_urlsafe(TOKEN_BYTES),
                                 secrets.token_urlsafe(TOKEN_BYTES), time.monotonic())
        self.sessions[session.session_id] = session
        while len(self.sessions) > SESSIONS_MAX:
            self.sessions.popitem(last=False)
        return session

    def session(self, cookie: str | None) -> BrowserSession | None:
        if not cookie:
            return None
        session = self.sessions.get(cookie)
        if session is None:
            return None
        if time.monotonic() - session.created_s > SESSION_TTL_S:
            del self.sessions[cookie]
            return None
        return session


def csrf_ok(session: BrowserSession, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(str(offered).encode(),
                                                 session.csrf.encode())


class GateMiddleware(BaseHTTPMiddleware):
    """Every request: the Host check, then the token or the session cookie, then (for a
    POST) the CSRF token; every response: the security headers."""

    def __init__(self, app: ASGIApp, gate: Gate, hosts: frozenset[str]) -> None:
        super().__init__(app)
        self.gate = gate
        self.hosts = hosts

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint
                       ) -> Response:
        response = await self._dispatch(request, call_next)
        for key, value in HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def _dispatch(self, request: Request, call_next: RequestResponseEndpoint
                        ) -> Response:
        if request.headers.get("host", "") not in self.hosts:
            return PlainTextResponse("unknown Host", status_code=421)
        token = request.query_params.get("token")
        if token is not None and request.method == "GET":
            session = self.gate.spend(token)
            if session is None:
                return PlainTextResponse(
                    "this sign-in link was used already or is not this console's: "
                    "ask the console for a new one", status_code=403)
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = URL(request.url.path + (f"?{urlencode(rest)}" if rest else ""))
            response = RedirectResponse(str(target), status_code=303)
            response.set_cookie(COOKIE_NAME, session.session_id, httponly=True,
                                samesite="strict", path="/")
            return response
        session = self.gate.session(request.cookies.get(COOKIE_NAME))
        if session is None:
            return PlainTextResponse(
                "not signed in: open the URL with the token the console printed",
                status_code=401)
        request.state.browser = session
        if request.method not in ("GET", "HEAD"):
            offered = request.headers.get(CSRF_HEADER)
            if offered is None and request.headers.get("content-type", "").startswith(
                    ("application/x-www-form-urlencoded", "multipart/form-data")):
                offered = await _form_csrf(request)
            if not csrf_ok(session, offered):
                return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        return await call_next(request)


async def _form_csrf(request: Request) -> str | None:
    """The CSRF field of a form, read from a copy of the body (the handler reads the
    body again: the middleware's request caches it)."""
    body = await request.body()
    sent = False

    async def replay() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    copy = Request(request.scope, replay)
    async with copy.form() as form:
        value = form.get(CSRF_FIELD)
    return value if isinstance(value, str) else None
