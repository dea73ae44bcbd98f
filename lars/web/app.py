"""The console's ASGI app: routes, who may do what, errors, and the request counter.

Layers, outermost first:

1. :class:`CountRequests` counts every answer in ``lars_web_http_requests_total{route,
   status}``, ``route`` being the matched route's path template (bounded cardinality).
2. Starlette's own error middleware (a bug is a 500, and a traceback in the log).
3. :class:`Gate` decides who the request acts as and whether it may go on:

   * ``/static/`` is public; so is ``/login``.
   * ``/api/...``: a bearer token (401 without a valid one), or anybody in open mode.
   * pages: the session cookie's user, or a redirect to ``/login``. Every page visitor
     gets a session (and so a CSRF token), logged in or not.
   * a write (any method but GET/HEAD) by a viewer is a 403, whatever the path.
   * in open mode the ``Host`` header must be a loopback name (DNS rebinding).

   It also writes the session and flash cookies the handlers asked for, and the security
   headers of every answer.
4. The routes: :mod:`lars.web.pages` and :mod:`lars.web.api`; their errors (LarsError,
   Starlette's HTTPException) become a JSON ``{"error"}`` under ``/api/`` and an error page
   elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lars.config import AlarmsConfig
from lars.errors import LarsError
from lars.web import api, pages
from lars.web.auth import (
    ANONYMOUS,
    SESSION_MAX_AGE,
    Accounts,
    Principal,
    Session,
    Signer,
    bearer_token,
    loopback_host_header,
)
from lars.web.context import (
    FLASH_COOKIE,
    FLASH_IN,
    FLASH_OUT,
    FORM,
    PRINCIPAL,
    SESSION,
    SESSION_COOKIE,
    SESSION_OUT,
    Console,
    render,
    template_environment,
)
from lars.web.monitor import MonitorService
from lars.web.service import BadInput, ConsoleService, http_status

#: Largest request body: an import file, and some room for the form around it.
MAX_BODY = 18 << 20
#: Paths anyone may reach (the login page; the stylesheet).
PUBLIC_PATHS = ("/login",)
STATIC = Path(__file__).parent / "static"
SAFE_METHODS = ("GET", "HEAD")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


def routes() -> list[BaseRoute]:
    """Every page and API route."""
    return [
        Route("/", pages.overview),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login_submit, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/modules", pages.create_module, methods=["POST"]),
        Route("/modules/{modid}/{cmdid}", pages.module_page),
        Route("/modules/{modid}/{cmdid}/hosts", pages.add_hosts, methods=["POST"]),
        Route("/modules/{modid}/{cmdid}/hosts/remove", pages.remove_hosts, methods=["POST"]),
        Route("/modules/{modid}/{cmdid}/hosts/set", pages.set_host, methods=["POST"]),
        Route("/modules/{modid}/{cmdid}/policy", pages.set_policy, methods=["POST"]),
        Route("/modules/{modid}/{cmdid}/delete", pages.delete_module_page, methods=["GET"]),
        Route("/modules/{modid}/{cmdid}/delete", pages.delete_module, methods=["POST"]),
        Route("/status", pages.status_page),
        Route("/changes", pages.changes_page),
        Route("/names", pages.names_page, methods=["GET"]),
        Route("/names", pages.set_name, methods=["POST"]),
        Route("/names/delete", pages.delete_name, methods=["POST"]),
        Route("/import", pages.import_page, methods=["GET"]),
        Route("/import", pages.import_preview, methods=["POST"]),
        Route("/import/apply", pages.import_apply, methods=["POST"]),
        Route("/export", pages.export),
        Route("/api/v1/whoami", api.whoami),
        Route("/api/v1/modules", api.list_modules, methods=["GET"]),
        Route("/api/v1/modules", api.create_module, methods=["POST"]),
        Route("/api/v1/modules/{modid}/{cmdid}", api.get_module, methods=["GET"]),
        Route("/api/v1/modules/{modid}/{cmdid}", api.delete_module, methods=["DELETE"]),
        Route("/api/v1/modules/{modid}/{cmdid}/hosts", api.add_hosts, methods=["POST"]),
        Route("/api/v1/modules/{modid}/{cmdid}/hosts", api.remove_hosts, methods=["DELETE"]),
        Route("/api/v1/modules/{modid}/{cmdid}/hosts/{host}", api.remove_host, methods=["DELETE"]),
        Route("/api/v1/modules/{modid}/{cmdid}/hosts/{host}", api.set_host, methods=["PUT"]),
        Route("/api/v1/modules/{modid}/{cmdid}/policy", api.get_policy, methods=["GET"]),
        Route("/api/v1/modules/{modid}/{cmdid}/policy", api.put_policy, methods=["PUT"]),
        Route("/api/v1/modules/{modid}/{cmdid}/policy", api.delete_policy, methods=["DELETE"]),
        Route("/api/v1/status", api.call_status),
        Route("/api/v1/changes", api.changes),
        Route("/api/v1/names/{kind}", api.list_names, methods=["GET"]),
        Route("/api/v1/names/{kind}/{ident}", api.put_name, methods=["PUT"]),
        Route("/api/v1/names/{kind}/{ident}", api.delete_name, methods=["DELETE"]),
        Route("/api/v1/modules/{modid}/{cmdid}/history", api.module_history),
        Route("/api/v1/alarms", api.list_alarms),
        Route("/api/v1/alarms/events", api.alarm_events),
        Route("/api/v1/alarms/rules/{name}", api.put_alarm_rule, methods=["PUT"]),
        Route("/api/v1/alarms/rules/{name}", api.delete_alarm_rule, methods=["DELETE"]),
        Route("/alarms", pages.alarms_page, methods=["GET"]),
        Route("/alarms/rules", pages.save_alarm_rule, methods=["POST"]),
        Route("/alarms/rules/delete", pages.delete_alarm_rule, methods=["POST"]),
        Route("/api/v1/export", api.export),
        Route("/api/v1/import", api.import_routes, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def _is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_response(
    request: Request, status: int, message: str, field: str | None = None
) -> Response:
    """An error as the API (JSON) or a page (HTML) reports it."""
    if _is_api(request.url.path):
        body: dict[str, str] = {"error": message}
        if field:
            body["field"] = field
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)
    if SESSION not in request.scope:  # stopped before the gate gave it a session
        return Response(f"{status}: {message}\n", status_code=status, media_type="text/plain")
    return render(
        request,
        "error.html",
        status=status,
        title=f"Error {status}",
        error=message,
        back=("/", "Back to the overview"),
    )


async def _lars_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LarsError)
    field = exc.field if isinstance(exc, BadInput) else None
    return error_response(request, http_status(exc), str(exc), field)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404:
        message = f"nothing at {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    response = error_response(request, exc.status_code, message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


TOO_LARGE = f"the request is larger than {MAX_BODY >> 20} MiB"


def _limited(receive: Receive) -> Receive:
    """``receive``, failing the request with a 413 once its body passes MAX_BODY (a body
    without Content-Length is counted as it arrives)."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise HTTPException(413, TOO_LARGE)
        return message

    return limited


class Gate:
    """Authentication, authorisation and cookies (see the module docstring)."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        path, method = scope["path"], scope["method"]
        accounts = self.console.accounts
        send = self._send_wrapper(scope, send)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            await self._refuse(scope, receive, send, 413, TOO_LARGE)
            return
        receive = _limited(receive)
        if accounts.open and not loopback_host_header(request.headers.get("host", "")):
            await self._refuse(
                scope,
                receive,
                send,
                403,
                "with no users configured the console answers only to loopback names"
                " (127.0.0.1, localhost)",
            )
            return
        if path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        who: Principal | None
        if _is_api(path):
            who = self._api_principal(request, accounts)
            if who is None:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    401,
                    "send Authorization: Bearer TOKEN (a token of [[web.tokens]])",
                )
                return
        else:
            who = self._page_principal(scope, request, accounts)
            if who is None and path not in PUBLIC_PATHS:
                target = path + (
                    f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else ""
                )
                await RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)(
                    scope, receive, send
                )
                return
        scope[PRINCIPAL] = who
        if (
            who is not None
            and method not in SAFE_METHODS
            and not who.can_write
            and path not in ("/login", "/logout")
        ):
            await self._refuse(
                scope, receive, send, 403, f"{who.name} is a viewer: viewers cannot change anything"
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            form = scope.get(FORM)
            if form is not None:
                await form.close()

    def _api_principal(self, request: Request, accounts: Accounts) -> Principal | None:
        if accounts.open:
            return Principal(ANONYMOUS, "admin")
        token = bearer_token(request.headers.get("authorization"))
        return accounts.bearer(token) if token else None

    def _page_principal(
        self, scope: Scope, request: Request, accounts: Accounts
    ) -> Principal | None:
        cookies = cookie_parser(request.headers.get("cookie", ""))
        session = Session.decode(cookies.get(SESSION_COOKIE, ""), self.console.session_signer)
        if session is None:
            session = Session.new()
            scope[SESSION_OUT] = session
        scope[SESSION] = session
        if FLASH_COOKIE in cookies:
            scope[FLASH_IN] = self.console.flash_signer.unsign(cookies[FLASH_COOKIE]) or None
            scope["lars.flash_seen"] = True
        if accounts.open:
            return Principal(ANONYMOUS, "admin")
        return accounts.user(session.user) if session.user else None

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, message: str
    ) -> None:
        request = Request(scope, receive)
        await error_response(request, status, message)(scope, receive, send)

    def _send_wrapper(self, scope: Scope, send: Send) -> Send:
        secure = "; Secure" if scope.get("scheme") == "https" else ""

        def cookie(name: str, value: str, max_age: int) -> str:
            return f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if not _is_api(scope["path"]):
                    headers.setdefault("Cache-Control", "no-store")
                    session: Session | None = scope.get(SESSION_OUT)
                    if session is not None:
                        value = session.encode(self.console.session_signer)
                        headers.append(
                            "Set-Cookie", cookie(SESSION_COOKIE, value, int(SESSION_MAX_AGE))
                        )
                    flash = scope.get(FLASH_OUT)
                    if flash is not None:
                        value = self.console.flash_signer.sign(flash)
                        headers.append("Set-Cookie", cookie(FLASH_COOKIE, value, 300))
                    elif scope.get("lars.flash_seen") and not 300 <= message["status"] < 400:
                        headers.append("Set-Cookie", cookie(FLASH_COOKIE, "", 0))
            await send(message)

        return wrapped


class CountRequests:
    """Counts answers by route template and status in ``counter``."""

    def __init__(self, app: Starlette, counter: Counter) -> None:
        self.app = app
        self.counter = counter
        self.templates: dict[Any, str] = {}
        for route in app.routes:
            if isinstance(route, Route):
                self.templates[route.endpoint] = route.path
            elif isinstance(route, Mount):
                self.templates[route.app] = route.path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            self.counter.labels(route=self._route(scope), status=str(status[0])).inc()

    def _route(self, scope: Scope) -> str:
        """The template of the route the request was for: the one that answered, else
        (refused before routing: 401, 403, a redirect to the login) the one that matches."""
        route = self.templates.get(scope.get("endpoint"))
        if route is not None:
            return route
        for candidate in self.app.routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                return str(getattr(candidate, "path", "unmatched"))
        return "unmatched"


def requests_counter(registry: Any = None) -> Counter:
    """``lars_web_http_requests_total{route,status}`` in ``registry``."""
    return Counter(
        "lars_web_http_requests",
        "HTTP requests the console and its API answered, by route template and status.",
        ["route", "status"],
        registry=registry,
    )


def make_app(
    service: ConsoleService,
    accounts: Accounts,
    secret: bytes,
    counter: Counter | None = None,
    monitor: MonitorService | None = None,
) -> Callable[[MutableMapping[str, Any], Receive, Send], Any]:
    """The console's ASGI app over ``service``; ``secret`` signs its cookies; ``counter``
    (see :func:`requests_counter`) counts its answers; ``monitor`` serves the charts and
    alarms (by default over the service's store, default alarm settings, no engine)."""
    console = Console(
        service=service,
        monitor=monitor or MonitorService(service.store, AlarmsConfig()),
        accounts=accounts,
        session_signer=Signer(secret, "session"),
        flash_signer=Signer(secret, "flash"),
        templates=template_environment(),
    )
    app = Starlette(
        routes=routes(),
        exception_handlers={LarsError: _lars_error, HTTPException: _http_error},
    )
    app.state.console = console
    app.add_middleware(Gate, console=console)
    if counter is None:
        return app
    return CountRequests(app, counter)
