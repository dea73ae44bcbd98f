"""What every handler needs: the console's parts, who is asking, the form, the templates."""

from __future__ import annotations

import datetime
import time
from typing import Any

import attrs
import jinja2
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse

from lars.core.model import format_host, int_to_ip
from lars.store import Actor
from lars.web.auth import Accounts, Principal, Session, Signer, csrf_matches
from lars.web.monitor import MonitorService
from lars.web.service import ConsoleService, Forbidden

#: Scope keys the auth middleware fills in (and reads back for the response's cookies).
PRINCIPAL = "lars.principal"
SESSION = "lars.session"
SESSION_OUT = "lars.session_out"
FLASH_IN = "lars.flash_in"
FLASH_OUT = "lars.flash_out"
FORM = "lars.form"

#: Cookie names.
SESSION_COOKIE = "lars_session"
FLASH_COOKIE = "lars_flash"
#: The form field that carries the CSRF token.
CSRF_FIELD = "csrf"
#: Largest form field (an import file's text travels in one between preview and apply).
FORM_PART_MAX = 17 << 20


@attrs.frozen
class Console:
    """The parts of a running console, kept in ``app.state.console``."""

    service: ConsoleService
    monitor: MonitorService
    accounts: Accounts
    session_signer: Signer
    flash_signer: Signer
    templates: jinja2.Environment


def console(request: Request) -> Console:
    """The console this request reached."""
    found: Console = request.app.state.console
    return found


def principal(request: Request) -> Principal:
    """Who the request acts as (the auth middleware let it through, so someone)."""
    who: Principal = request.scope[PRINCIPAL]
    return who


def session(request: Request) -> Session:
    """The page request's session (every page visitor has one, logged in or not)."""
    current: Session = request.scope[SESSION]
    return current


def client_address(request: Request) -> str:
    """The client's address as the audit log records it."""
    return request.client.host if request.client else "unknown"


def actor(request: Request) -> Actor:
    """The audit log's name for who makes this write."""
    return Actor(principal(request).name, client_address(request)[:64])


async def checked_form(request: Request) -> FormData:
    """The posted form, after checking its CSRF token (Forbidden if missing or wrong)."""
    form = await request.form(max_part_size=FORM_PART_MAX)
    request.scope[FORM] = form  # the gate closes its uploaded files after the answer
    token = form.get(CSRF_FIELD)
    if not csrf_matches(session(request), token if isinstance(token, str) else None):
        raise Forbidden(
            "the form's security token is missing or out of date: reload the page and try again"
        )
    return form


def form_text(form: FormData, name: str) -> str:
    """A text field of a form ("" when absent, or a file where text was expected)."""
    value = form.get(name)
    return value if isinstance(value, str) else ""


def flash(request: Request, kind: str, text: str) -> None:
    """A message for the next page this browser shows (``kind``: ``ok`` or ``error``)."""
    request.scope[FLASH_OUT] = {"k": kind, "m": text}


def redirect(url: str) -> RedirectResponse:
    """See Other: after a POST, the browser GETs ``url``."""
    return RedirectResponse(url, status_code=303)


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """Render a page template with what every page shows (user, CSRF token, flash)."""
    c = console(request)
    context.setdefault("error", None)
    page = c.templates.get_template(template).render(
        request=request,
        user=request.scope.get(PRINCIPAL),
        open_mode=c.accounts.open,
        csrf=session(request).csrf,
        flash=request.scope.get(FLASH_IN),
        path=request.url.path,
        **context,
    )
    return HTMLResponse(page, status_code=status)


# --- template filters ------------------------------------------------------------------------


def fmt_time(ts: float | None) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``."""
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(ts: float | None, now: float | None = None) -> str:
    """How long ago, roughly: ``4s ago``, ``12min ago``, ``3h ago``, ``2d ago``."""
    if ts is None:
        return ""
    age = max(0.0, (time.time() if now is None else now) - ts)
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= seconds:
            return f"{int(age // seconds)}{unit} ago"
    return f"{int(age)}s ago"


def fmt_version(version: int | None) -> str:
    """A route version, with the time it stands for when it is a wall-clock version."""
    if version is None:
        return ""
    if version > 1_000_000_000:
        return f"{version} ({fmt_time(version)})"
    return str(version)


def fmt_rate(succ: int, err: int) -> str:
    """The error rate of some calls, as a percentage ("" when there were none)."""
    calls = succ + err
    if not calls:
        return ""
    return f"{100 * err / calls:.1f}%"


def fmt_host(key: tuple[int, int]) -> str:
    """``(ip, port)`` as ``IP:PORT``."""
    return format_host(key)


def template_environment() -> jinja2.Environment:
    """The page templates (package data under lars/web/templates), with their filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lars.web", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        time=fmt_time,
        ago=fmt_ago,
        version=fmt_version,
        host=fmt_host,
        ip=int_to_ip,
    )
    env.globals.update(rate=fmt_rate, now=time.time)
    return env
