"""The console's pages: server-rendered HTML over :class:`~lars.web.service.ConsoleService`.

Reads are GETs; every change is a POST of a form carrying the session's CSRF token
(:func:`~lars.web.context.checked_form`), answered with a redirect to the page that shows
the result (post/redirect/get) and a one-line message. A rejected change renders the page
again with the message and the status the API would give (400, 404, 409), the typed input
kept.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import anyio.to_thread
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from lars.core.model import PolicySpec, format_host
from lars.errors import LarsError
from lars.store.base import CALL_STATUS_SORTS
from lars.web import charts as charts_
from lars.web.auth import Session
from lars.web.context import (
    PRINCIPAL,
    SESSION_OUT,
    actor,
    checked_form,
    console,
    flash,
    form_text,
    redirect,
    render,
)
from lars.web.monitor import HISTORY_PERIODS, SPARKLINE_STEP, rule_from_form
from lars.web.service import (
    IMPORT_FORMATS,
    IMPORT_MAX_BYTES,
    BadInput,
    NeedsForce,
    NotFound,
    http_status,
    parse_bool,
    parse_caller,
    parse_choice,
    parse_hosts,
    parse_id,
    parse_int,
    parse_module,
    parse_name,
    parse_policy,
    parse_weight,
    parse_zone,
)

#: Rows per page of the overview and the call status.
OVERVIEW_PAGE = 50
STATUS_PAGE = 100
CHANGES_PAGE = 50
#: Highest page number accepted in a URL.
PAGE_NUMBER_MAX = 10_000_000


def _page_number(request: Request) -> int:
    return parse_int(
        request.query_params.get("page"), "page", default=1, low=1, high=PAGE_NUMBER_MAX
    )


def _query(request: Request, **changes: Any) -> str:
    """This page's query string with some parameters changed (None drops one)."""
    params = dict(request.query_params)
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    return "?" + urlencode(params) if params else "?"


def _safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only (never ``//elsewhere``)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


# --- login ---------------------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    """The login form."""
    c = console(request)
    if c.accounts.open or request.scope.get(PRINCIPAL) is not None:
        return redirect(_safe_next(request.query_params.get("next")))
    return render(request, "login.html", next=_safe_next(request.query_params.get("next")))


async def login_submit(request: Request) -> Response:
    """Check a name and password; on success start a logged-in session (a new cookie with a
    new CSRF token)."""
    form = await checked_form(request)
    name, password = form_text(form, "name").strip(), form_text(form, "password")
    target = _safe_next(form_text(form, "next"))
    accounts = console(request).accounts
    who = await anyio.to_thread.run_sync(accounts.login, name, password) if name else None
    if who is None:
        return render(
            request,
            "login.html",
            status=401,
            error="unknown user or wrong password",
            next=target,
            name=name,
        )
    request.scope[SESSION_OUT] = Session.new(user=who.name)
    return redirect(target)


async def logout(request: Request) -> Response:
    """End the session (POST with the CSRF token, so no page can log a user out)."""
    await checked_form(request)
    request.scope[SESSION_OUT] = Session.new()
    return redirect("/login")


# --- overview and modules -------------------------------------------------------------------


async def overview(
    request: Request, *, error: str | None = None, status: int = 200, form: Any = None
) -> Response:
    """Every module: names, hosts, overloaded hosts, latest calls and error rate, last
    change; search and paging."""
    search = request.query_params.get("q", "").strip()
    try:
        page_number = _page_number(request)
    except BadInput as exc:
        page_number, error, status = 1, str(exc), 400
    offset = (page_number - 1) * OVERVIEW_PAGE
    page = await console(request).service.overview(search, offset, OVERVIEW_PAGE)
    modules = [(m.modid, m.cmdid) for m in page.items]
    start, end, series = await console(request).monitor.sparklines(modules)
    sparklines = {
        module: charts_.sparkline_svg(
            series.get(module, []), start=start, end=end, step=SPARKLINE_STEP
        )
        for module in modules
    }
    return render(
        request,
        "overview.html",
        status=status,
        page=page,
        sparklines=sparklines,
        page_number=page_number,
        search=search,
        query=lambda **kw: _query(request, **kw),
        error=error,
        form=form or {},
    )


async def create_module(request: Request) -> Response:
    """Register a new module with its hosts (the overview's form)."""
    form = await checked_form(request)
    values = {k: form_text(form, k) for k in ("modid", "cmdid", "hosts")}
    try:
        module = parse_module(values["modid"], values["cmdid"])
        hosts = parse_hosts(values["hosts"])
        outcome = await console(request).service.create_module(actor(request), module, hosts)
    except LarsError as exc:
        return await overview(request, error=str(exc), status=http_status(exc), form=values)
    _report(request, f"module {module[0]}/{module[1]}: {outcome.describe()}", outcome.warnings)
    return redirect(f"/modules/{module[0]}/{module[1]}")


def _report(request: Request, message: str, warnings: tuple[str, ...] = ()) -> None:
    flash(request, "warning" if warnings else "ok", "; ".join((message, *warnings)))


def _module_of(request: Request) -> tuple[int, int]:
    return parse_module(request.path_params["modid"], request.path_params["cmdid"])


async def module_page(
    request: Request, *, error: str | None = None, status: int = 200, form: Any = None
) -> Response:
    """One module: its hosts with calls, errors and overload per caller; forms to add and
    remove hosts; its recent changes."""
    module = _module_of(request)
    try:
        view = await console(request).service.module(module)
    except NotFound as exc:
        return render(
            request,
            "error.html",
            status=404,
            title=f"Module {module[0]}/{module[1]}",
            error=f"{exc} (removed, or never registered).",
            back=("/", "Back to the overview"),
        )
    callers = sorted({row.caller for host in view.hosts for row in host.callers})
    try:
        period = parse_choice(
            request.query_params.get("period"), "period", tuple(HISTORY_PERIODS), default="hour"
        )
    except BadInput as exc:
        period, error, status = "hour", str(exc), 400
    history = await console(request).monitor.history(module, period)
    span = {"start": history.start, "end": history.end, "step": history.step}
    label = "the last hour" if period == "hour" else "the last day"
    charts = {
        "module": charts_.chart_svg(
            history.module, title=f"Module {module[0]}/{module[1]}, {label}", **span
        ),
        "hosts": [
            (
                host,
                charts_.chart_svg(
                    history.hosts.get(host, []),
                    height=120,
                    title=f"{format_host(host)}, {label}",
                    **span,
                ),
            )
            for host in sorted({h.host for h in view.hosts} | set(history.hosts))
        ],
    }
    return render(
        request,
        "module.html",
        status=status,
        module=module,
        view=view,
        callers=callers,
        period=period,
        periods=tuple(HISTORY_PERIODS),
        charts=charts,
        error=error,
        form=form or {},
    )


async def add_hosts(request: Request) -> Response:
    """Add several hosts to a module at once."""
    form = await checked_form(request)
    text = form_text(form, "hosts")
    try:
        module = _module_of(request)
        outcome = await console(request).service.add_hosts(
            actor(request), module, parse_hosts(text)
        )
    except LarsError as exc:
        return await module_page(
            request, error=str(exc), status=http_status(exc), form={"hosts": text}
        )
    _report(request, f"module {module[0]}/{module[1]}: {outcome.describe()}", outcome.warnings)
    return redirect(f"/modules/{module[0]}/{module[1]}")


async def set_host(request: Request) -> Response:
    """Set the weight and/or the zone of a host of the module (DESIGN §13)."""
    form = await checked_form(request)
    try:
        module = _module_of(request)
        (host,) = parse_hosts([form_text(form, "host")], "host")
        weight = parse_weight(form_text(form, "weight").strip())
        zone_text = form_text(form, "zone")
        zone = parse_zone(zone_text.strip()) if zone_text.strip() or "clear_zone" in form else None
        outcome = await console(request).service.set_host(
            actor(request), module, host, weight, zone
        )
    except LarsError as exc:
        return await module_page(request, error=str(exc), status=http_status(exc))
    _report(request, f"module {module[0]}/{module[1]}: {outcome.describe()}", outcome.warnings)
    return redirect(f"/modules/{module[0]}/{module[1]}")


async def set_policy(request: Request) -> Response:
    """Set the module's own policy, or (``remove``) go back to the agents' default."""
    form = await checked_form(request)
    try:
        module = _module_of(request)
        fields = {name: form_text(form, name) or None for name in PolicySpec._fields}
        fields["zone_affinity"] = "1" if form_text(form, "zone_affinity") else "0"
        spec = None if form_text(form, "action") == "remove" else parse_policy(fields)
        outcome = await console(request).service.set_policy(actor(request), module, spec)
    except LarsError as exc:
        return await module_page(request, error=str(exc), status=http_status(exc))
    _report(request, f"module {module[0]}/{module[1]}: {outcome.describe()}", outcome.warnings)
    return redirect(f"/modules/{module[0]}/{module[1]}")


async def remove_hosts(request: Request) -> Response:
    """Remove the hosts ticked on the module page (more than half of them, or all, only
    with the confirmation box ticked)."""
    form = await checked_form(request)
    try:
        module = _module_of(request)
        picked = [v for v in form.getlist("host") if isinstance(v, str)]
        if not picked:
            raise BadInput("host", "tick at least one host to remove")
        service = console(request).service
        force = bool(parse_bool(form_text(form, "force"), "force", default=False))
        outcome = await service.remove_hosts(
            actor(request), module, parse_hosts(picked, "host"), force
        )
    except LarsError as exc:
        return await module_page(request, error=str(exc), status=http_status(exc))
    _report(request, f"module {module[0]}/{module[1]}: {outcome.describe()}", outcome.warnings)
    if not await service.has_module(module):
        return redirect("/")  # its last host is gone, and the module with it
    return redirect(f"/modules/{module[0]}/{module[1]}")


async def delete_module_page(request: Request) -> Response:
    """Ask before removing a whole module."""
    module = _module_of(request)
    try:
        view = await console(request).service.module(module)
    except NotFound as exc:
        return render(
            request,
            "error.html",
            status=404,
            title="Remove module",
            error=str(exc),
            back=("/", "Back"),
        )
    return render(request, "delete_module.html", module=module, view=view)


async def delete_module(request: Request) -> Response:
    """Remove every host of a module (after the confirmation page, whose box must be
    ticked: DESIGN §13)."""
    form = await checked_form(request)
    module = _module_of(request)
    try:
        force = bool(parse_bool(form_text(form, "force"), "force", default=False))
        outcome = await console(request).service.remove_module(actor(request), module, force)
    except NeedsForce:
        view = await console(request).service.module(module)
        return render(
            request,
            "delete_module.html",
            status=409,
            module=module,
            view=view,
            error="tick the box to confirm that every host of the module goes",
        )
    except NotFound as exc:
        return render(
            request,
            "error.html",
            status=404,
            title="Remove module",
            error=str(exc),
            back=("/", "Back"),
        )
    _report(
        request, f"module {module[0]}/{module[1]} removed: {outcome.describe()}", outcome.warnings
    )
    return redirect("/")


# --- call status and changes -----------------------------------------------------------------


async def status_page(request: Request) -> Response:
    """ServerCallStatus rows: filter by module, caller, overloaded; sort; page."""
    q = request.query_params
    error = None
    filters: dict[str, Any] = {}
    try:
        page_number = _page_number(request)
        if q.get("modid") or q.get("cmdid"):
            filters["module"] = parse_module(q.get("modid"), q.get("cmdid"))
        filters["caller"] = parse_caller(q.get("caller"))
        filters["overloaded"] = parse_bool(q.get("overloaded"), "overloaded")
        filters["sort"] = parse_choice(q.get("sort"), "sort", CALL_STATUS_SORTS, default="module")
        filters["descending"] = bool(parse_bool(q.get("desc"), "desc", default=False))
    except BadInput as exc:
        error, filters, page_number = str(exc), {}, 1
    offset = (page_number - 1) * STATUS_PAGE
    page = await console(request).service.call_status(**filters, offset=offset, limit=STATUS_PAGE)
    return render(
        request,
        "status.html",
        status=400 if error else 200,
        page=page,
        page_number=page_number,
        sort=filters.get("sort", "module"),
        descending=filters.get("descending", False),
        params=dict(q),
        query=lambda **kw: _query(request, **kw),
        error=error,
    )


async def changes_page(request: Request) -> Response:
    """The audit log (who changed what, when, from where, which version), the current
    RouteVersion and the recent RouteChange rows."""
    q = request.query_params
    error = None
    filters: dict[str, Any] = {}
    try:
        if q.get("modid") or q.get("cmdid"):
            filters["module"] = parse_module(q.get("modid"), q.get("cmdid"))
        filters["actor"] = q.get("actor") or None
        before = q.get("before")
        if before:
            filters["before_id"] = parse_int(before, "before", default=0, low=1, high=2**63 - 1)
    except BadInput as exc:
        error, filters = str(exc), {}
    view = await console(request).service.changes(**filters, limit=CHANGES_PAGE)
    return render(
        request,
        "changes.html",
        status=400 if error else 200,
        view=view,
        params=dict(q),
        query=lambda **kw: _query(request, **kw),
        error=error,
    )


# --- names -----------------------------------------------------------------------------------


async def names_page(
    request: Request, *, error: str | None = None, status: int = 200, form: Any = None
) -> Response:
    """The modid and cmdid dictionaries."""
    service = console(request).service
    names = {kind: await service.names(kind) for kind in ("mod", "cmd")}
    return render(request, "names.html", status=status, names=names, error=error, form=form or {})


async def set_name(request: Request) -> Response:
    """Add a name, or change one."""
    form = await checked_form(request)
    values = {k: form_text(form, k) for k in ("kind", "id", "name")}
    try:
        kind = parse_choice(values["kind"], "kind", ("mod", "cmd"), default="")
        ident = parse_id(values["id"], f"{kind or 'mod'}id")
        name = parse_name(values["name"])
        await console(request).service.set_name(kind, ident, name)
    except LarsError as exc:
        return await names_page(request, error=str(exc), status=http_status(exc), form=values)
    flash(request, "ok", f"{kind}id {ident} is now named {name!r}")
    return redirect("/names")


async def delete_name(request: Request) -> Response:
    """Forget a name."""
    form = await checked_form(request)
    try:
        kind = parse_choice(form_text(form, "kind"), "kind", ("mod", "cmd"), default="")
        ident = parse_id(form_text(form, "id"), f"{kind or 'mod'}id")
        await console(request).service.delete_name(kind, ident)
    except LarsError as exc:
        return await names_page(request, error=str(exc), status=http_status(exc))
    flash(request, "ok", f"{kind}id {ident} has no name any more")
    return redirect("/names")


# --- import and export -----------------------------------------------------------------------


async def import_page(request: Request) -> Response:
    """Upload a route file (JSON or CSV); download the routes."""
    return render(request, "import.html", plan=None, data="", fmt="json", replace=False, error=None)


def _format_of(filename: str, chosen: str) -> str:
    if chosen in IMPORT_FORMATS:
        return chosen
    return "csv" if filename.lower().endswith(".csv") else "json"


async def import_preview(request: Request) -> Response:
    """Dry run: show what the uploaded file would change, with a button to apply it."""
    form = await checked_form(request)
    upload = form.get("file")
    data: bytes | str = form_text(form, "text")
    filename = ""
    if isinstance(upload, UploadFile) and upload.filename:
        filename = upload.filename
        data = await upload.read(IMPORT_MAX_BYTES + 1)
    fmt = _format_of(filename, form_text(form, "format"))
    replace = bool(parse_bool(form_text(form, "replace"), "replace", default=False))
    try:
        plan = await console(request).service.plan_import(data, fmt, replace)
    except LarsError as exc:
        return render(
            request,
            "import.html",
            status=http_status(exc),
            plan=None,
            data="",
            fmt=fmt,
            replace=replace,
            error=f"{filename or 'the file'}: {exc}; nothing was changed",
        )
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    return render(
        request, "import.html", plan=plan, data=text, fmt=fmt, replace=replace, error=None
    )


async def import_apply(request: Request) -> Response:
    """Apply a previewed import in one transaction."""
    form = await checked_form(request)
    fmt = _format_of("", form_text(form, "format"))
    replace = bool(parse_bool(form_text(form, "replace"), "replace", default=False))
    data = form_text(form, "data")
    try:
        force = bool(parse_bool(form_text(form, "force"), "force", default=False))
        outcome = await console(request).service.apply_import(
            actor(request), data, fmt, replace, force
        )
    except LarsError as exc:
        return render(
            request,
            "import.html",
            status=http_status(exc),
            plan=None,
            data="",
            fmt=fmt,
            replace=replace,
            error=f"{exc}; nothing was changed",
        )
    _report(request, f"import: {outcome.describe()}", outcome.warnings)
    return redirect("/changes")


async def export(request: Request) -> Response:
    """Download every route as JSON or CSV."""
    fmt = parse_choice(request.query_params.get("format"), "format", IMPORT_FORMATS, default="json")
    body = await console(request).service.export(fmt)
    media = "text/csv" if fmt == "csv" else "application/json"
    return Response(
        body,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="lars-routes.{fmt}"'},
    )


# --- alarms ------------------------------------------------------------------------------------


async def alarms_page(
    request: Request, *, error: str | None = None, status: int = 200, form: Any = None
) -> Response:
    """The alarms: firing and resolved states, the rules, the webhooks' delivery, the
    latest transitions; a form to write a rule."""
    view = await console(request).monitor.alarms()
    edit = request.query_params.get("edit")
    if form is None and edit:
        stored = {r.name: r for r in view.rules.stored}
        if edit in stored:
            form = {k: str(v) for k, v in stored[edit].definition().items()}
            form["enabled"] = "1" if stored[edit].enabled else ""
    return render(
        request, "alarms.html", status=status, view=view, error=error, form=form or {"enabled": "1"}
    )


async def save_alarm_rule(request: Request) -> Response:
    """Write a rule (a new one, or a stored one again)."""
    form = await checked_form(request)
    values = {k: form_text(form, k) for k in form}
    try:
        rule = rule_from_form(values)
        created = await console(request).monitor.put_rule(actor(request), rule)
    except LarsError as exc:
        return await alarms_page(request, error=str(exc), status=http_status(exc), form=values)
    flash(
        request,
        "ok",
        f"rule {rule.name!r} {'added' if created else 'saved'};"
        " it applies from the next evaluation",
    )
    return redirect("/alarms")


async def delete_alarm_rule(request: Request) -> Response:
    """Delete a stored rule; its firing alarms resolve at the next evaluation."""
    form = await checked_form(request)
    name = form_text(form, "name")
    try:
        await console(request).monitor.delete_rule(name)
    except LarsError as exc:
        return await alarms_page(request, error=str(exc), status=http_status(exc))
    flash(request, "ok", f"rule {name!r} deleted")
    return redirect("/alarms")
