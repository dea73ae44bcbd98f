"""The JSON API under ``/api/v1/``: the pages' functions, as JSON.

Requests authenticate with ``Authorization: Bearer TOKEN`` (no cookies: a browser cannot
be tricked into sending a token, so the API needs no CSRF token); in open mode (no users,
no tokens, loopback only) no header is needed. Bodies are JSON objects sent as
``Content-Type: application/json``. Errors are ``{"error": "...", "field": "..."}`` (the
field when one is to blame) with the status of :func:`~lars.web.service.http_status`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import attrs
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from lars.alarms.rules import Rule
from lars.core.model import HostKey, HostMeta, PolicySpec, format_host
from lars.store import AuditEntry, HostStatus, ModuleSummary
from lars.store.base import CALL_STATUS_SORTS, PAGE_MAX, CallPoint
from lars.web.charts import fill
from lars.web.context import actor, console, principal
from lars.web.monitor import HISTORY_PERIODS, checked_rule
from lars.web.service import (
    IMPORT_FORMATS,
    BadInput,
    ImportPlan,
    Outcome,
    Page,
    parse_bool,
    parse_caller,
    parse_choice,
    parse_hosts,
    parse_id,
    parse_int,
    parse_kind,
    parse_module,
    parse_name,
    parse_policy,
    parse_weight,
    parse_zone,
)

# --- JSON shapes -----------------------------------------------------------------------------


def summary_json(s: ModuleSummary) -> dict[str, Any]:
    """One module of the overview."""
    calls = s.succ + s.err
    return {
        "modid": s.modid,
        "cmdid": s.cmdid,
        "mod_name": s.mod_name,
        "cmd_name": s.cmd_name,
        "host_count": s.hosts,
        "overloaded_hosts": s.overloaded_hosts,
        "succ_cnt": s.succ,
        "err_cnt": s.err,
        "error_rate": round(s.err / calls, 4) if calls else None,
        "last_version": s.last_version,
    }


def host_json(
    h: HostStatus,
    meta: Mapping[HostKey, HostMeta] | None = None,
    leases: Mapping[HostKey, int] | None = None,
    demoted: Collection[HostKey] = (),
) -> dict[str, Any]:
    """A host of a module, its weight and zone, whether it registered itself (and when its
    lease expires, unix ms; null for a static host) and whether the fleet view demotes it,
    with one status row per caller."""
    value = (meta or {}).get(h.host, HostMeta())
    expires = (leases or {}).get(h.host)
    return {
        "host": format_host(h.host),
        "weight": value.weight,
        "zone": value.zone,
        "dynamic": expires is not None,
        "lease_expires": expires,
        "demoted": h.host in demoted,
        "overloaded": any(r.overload for r in h.callers),
        "callers": [
            {k: v for k, v in r.as_json().items() if k not in ("modid", "cmdid", "host")}
            for r in h.callers
        ],
    }


def audit_json(a: AuditEntry) -> dict[str, Any]:
    """One audit row."""
    return {
        "id": a.id,
        "ts": a.ts,
        "actor": a.actor,
        "source": a.source,
        "modid": a.modid,
        "cmdid": a.cmdid,
        "added": [format_host(h) for h in a.added],
        "removed": [format_host(h) for h in a.removed],
        "version": a.version,
        "changes": dict(a.changes),
    }


def policy_json(spec: PolicySpec | None) -> dict[str, Any] | None:
    """A module's own policy (None: the agents' default applies)."""
    return None if spec is None else spec._asdict()


def outcome_json(o: Outcome) -> dict[str, Any]:
    """What a write did."""
    return {
        "version": o.version,
        "added": o.added,
        "removed": o.removed,
        "modules": o.modules,
        "updated": o.updated,
        "warnings": list(o.warnings),
    }


def plan_json(p: ImportPlan) -> dict[str, Any]:
    """What an import would change."""
    return {
        "format": p.fmt,
        "replace": p.replace,
        "modules_in_file": p.modules_in_file,
        "added": p.added,
        "removed": p.removed,
        "changes": [
            {
                "modid": m,
                "cmdid": c,
                "added": sorted(format_host(h) for h in added),
                "removed": sorted(format_host(h) for h in removed),
            }
            for (m, c), added, removed in p.diff
        ],
    }


def page_json(page: Page[Any], key: str, items: list[Any]) -> dict[str, Any]:
    """A page of a listing, with where the next one starts."""
    return {
        "total": page.total,
        "offset": page.offset,
        "limit": page.limit,
        "next_offset": page.next_offset,
        key: items,
    }


# --- input -----------------------------------------------------------------------------------


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise BadInput("body", "send a JSON object with Content-Type: application/json")
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput("body", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput("body", "must be a JSON object")
    return data


def _paging(request: Request, default_limit: int) -> tuple[int, int]:
    q = request.query_params
    offset = parse_int(q.get("offset"), "offset", default=0, low=0, high=2**31)
    limit = parse_int(q.get("limit"), "limit", default=default_limit, low=1, high=PAGE_MAX)
    return offset, limit


def _module(request: Request) -> tuple[int, int]:
    return parse_module(request.path_params["modid"], request.path_params["cmdid"])


def ok(data: dict[str, Any], status: int = 200) -> JSONResponse:
    """A JSON answer."""
    return JSONResponse(data, status_code=status)


# --- endpoints -------------------------------------------------------------------------------


async def whoami(request: Request) -> Response:
    """Who the request acts as."""
    who = principal(request)
    return ok({"name": who.name, "role": who.role, "can_write": who.can_write})


async def list_modules(request: Request) -> Response:
    """``GET /api/v1/modules?q=&offset=&limit=``: the overview."""
    offset, limit = _paging(request, 50)
    page = await console(request).service.overview(request.query_params.get("q"), offset, limit)
    return ok(page_json(page, "modules", [summary_json(s) for s in page.items]))


async def create_module(request: Request) -> Response:
    """``POST /api/v1/modules {"modid", "cmdid", "hosts": [...]}``: a new module (409 if it
    exists)."""
    body = await json_body(request)
    module = parse_module(body.get("modid"), body.get("cmdid"))
    hosts = parse_hosts(body.get("hosts"))
    outcome = await console(request).service.create_module(actor(request), module, hosts)
    return ok(outcome_json(outcome), 201)


async def get_module(request: Request) -> Response:
    """``GET /api/v1/modules/MODID/CMDID``: hosts with status per caller, recent changes."""
    view = await console(request).service.module(_module(request))
    return ok(
        {
            **summary_json(view.summary),
            "policy": policy_json(view.policy),
            "hosts": [host_json(h, view.meta, view.leases, view.demoted) for h in view.hosts],
            "changes": [audit_json(a) for a in view.audit],
        }
    )


def _force(request: Request, body: Mapping[str, Any] | None = None) -> bool:
    """The ``force`` flag of a write that may remove many hosts: ``?force=true`` or
    ``"force": true`` in the body."""
    value = (body or {}).get("force", request.query_params.get("force"))
    return bool(parse_bool(value, "force", default=False))


async def delete_module(request: Request) -> Response:
    """``DELETE /api/v1/modules/MODID/CMDID?force=true``: remove every host (409 without
    ``force``, DESIGN §13)."""
    force = _force(request)
    outcome = await console(request).service.remove_module(actor(request), _module(request), force)
    return ok(outcome_json(outcome))


async def set_host(request: Request) -> Response:
    """``PUT /api/v1/modules/MODID/CMDID/hosts/IP:PORT {"weight": N, "zone": "Z"}``
    (either or both; 404 if the host is not in the module)."""
    module = _module(request)
    (host,) = parse_hosts([request.path_params["host"]], "host")
    body = await json_body(request)
    unknown = sorted(set(body) - {"weight", "zone"})
    if unknown:
        raise BadInput(unknown[0], "unknown field")
    weight, zone = parse_weight(body.get("weight")), parse_zone(body.get("zone"))
    outcome = await console(request).service.set_host(actor(request), module, host, weight, zone)
    return ok(outcome_json(outcome))


async def get_policy(request: Request) -> Response:
    """``GET /api/v1/modules/MODID/CMDID/policy``: ``{"policy": {...} or null}``."""
    spec = await console(request).service.policy(_module(request))
    return ok({"policy": policy_json(spec)})


async def put_policy(request: Request) -> Response:
    """``PUT /api/v1/modules/MODID/CMDID/policy {"policy": "weighted", "zone_affinity":
    true, ...}``: the module's own policy (fields left out take the defaults)."""
    module = _module(request)
    body = await json_body(request)
    unknown = sorted(set(body) - set(PolicySpec._fields))
    if unknown:
        raise BadInput(unknown[0], "unknown field")
    spec = parse_policy(body)
    outcome = await console(request).service.set_policy(actor(request), module, spec)
    return ok({"policy": policy_json(spec), "result": outcome_json(outcome)})


async def delete_policy(request: Request) -> Response:
    """``DELETE /api/v1/modules/MODID/CMDID/policy``: back to the agents' default."""
    outcome = await console(request).service.set_policy(actor(request), _module(request), None)
    return ok({"policy": None, "result": outcome_json(outcome)})


async def add_hosts(request: Request) -> Response:
    """``POST /api/v1/modules/MODID/CMDID/hosts {"hosts": [...]}`` (409 if one is there)."""
    module = _module(request)
    hosts = parse_hosts((await json_body(request)).get("hosts"))
    outcome = await console(request).service.add_hosts(actor(request), module, hosts)
    return ok(outcome_json(outcome))


async def remove_hosts(request: Request) -> Response:
    """``DELETE /api/v1/modules/MODID/CMDID/hosts {"hosts": [...], "force": false}`` (404 if
    one is not there; 409 if they are more than half of the module's and not forced)."""
    module = _module(request)
    body = await json_body(request)
    hosts = parse_hosts(body.get("hosts"))
    outcome = await console(request).service.remove_hosts(
        actor(request), module, hosts, _force(request, body)
    )
    return ok(outcome_json(outcome))


async def remove_host(request: Request) -> Response:
    """``DELETE /api/v1/modules/MODID/CMDID/hosts/IP:PORT?force=true``: one host."""
    module = _module(request)
    hosts = parse_hosts([request.path_params["host"]], "host")
    outcome = await console(request).service.remove_hosts(
        actor(request), module, hosts, _force(request)
    )
    return ok(outcome_json(outcome))


async def call_status(request: Request) -> Response:
    """``GET /api/v1/status?modid=&cmdid=&caller=&overloaded=&sort=&desc=&offset=&limit=``."""
    q = request.query_params
    offset, limit = _paging(request, 100)
    module = parse_module(q.get("modid"), q.get("cmdid")) if "modid" in q or "cmdid" in q else None
    page = await console(request).service.call_status(
        module=module,
        caller=parse_caller(q.get("caller")),
        overloaded=parse_bool(q.get("overloaded"), "overloaded"),
        sort=parse_choice(q.get("sort"), "sort", CALL_STATUS_SORTS, default="module"),
        descending=bool(parse_bool(q.get("desc"), "desc", default=False)),
        offset=offset,
        limit=limit,
    )
    return ok(page_json(page, "rows", [r.as_json() for r in page.items]))


async def changes(request: Request) -> Response:
    """``GET /api/v1/changes?modid=&cmdid=&actor=&before_id=&limit=``: the audit log
    (newest first; ``next_before_id`` pages on), the version, recent RouteChange rows."""
    q = request.query_params
    module = parse_module(q.get("modid"), q.get("cmdid")) if "modid" in q or "cmdid" in q else None
    before = q.get("before_id")
    view = await console(request).service.changes(
        module=module,
        actor=q.get("actor"),
        before_id=parse_int(before, "before_id", default=0, low=1, high=2**63 - 1)
        if before
        else None,
        limit=parse_int(q.get("limit"), "limit", default=50, low=1, high=PAGE_MAX),
    )
    return ok(
        {
            "version": view.version,
            "audit": [audit_json(a) for a in view.audit],
            "next_before_id": view.next_before,
            "recent_changes": [{"modid": m, "cmdid": c, "version": v} for m, c, v in view.recent],
        }
    )


async def list_names(request: Request) -> Response:
    """``GET /api/v1/names/mod`` (or ``cmd``): ``{"names": {"ID": "NAME"}}``."""
    names = await console(request).service.names(request.path_params["kind"])
    return ok({"kind": request.path_params["kind"], "names": {str(k): v for k, v in names.items()}})


async def put_name(request: Request) -> Response:
    """``PUT /api/v1/names/KIND/ID {"name": "..."}``: add or change a name."""
    kind = parse_kind(request.path_params["kind"])  # 404 for an unknown kind first
    service = console(request).service
    ident = parse_id(request.path_params["ident"], f"{kind}id")
    name = parse_name((await json_body(request)).get("name"))
    await service.set_name(kind, ident, name)
    return ok({"kind": kind, "id": ident, "name": name})


async def delete_name(request: Request) -> Response:
    """``DELETE /api/v1/names/KIND/ID``."""
    kind = parse_kind(request.path_params["kind"])
    service = console(request).service
    ident = parse_id(request.path_params["ident"], f"{kind}id")
    await service.delete_name(kind, ident)
    return ok({"kind": kind, "id": ident, "deleted": True})


async def export(request: Request) -> Response:
    """``GET /api/v1/export?format=json|csv``: every route, in the import format."""
    fmt = parse_choice(request.query_params.get("format"), "format", IMPORT_FORMATS, default="json")
    body = await console(request).service.export(fmt)
    if fmt == "json":
        return Response(body, media_type="application/json")
    return PlainTextResponse(body, media_type="text/csv")


async def import_routes(request: Request) -> Response:
    """``POST /api/v1/import {"data": "...", "format": "json|csv", "replace": false,
    "dry_run": true, "force": false}``: the diff, and with ``dry_run`` false the write (a
    replace removing more than half of a module's hosts needs ``force``)."""
    body = await json_body(request)
    replace = bool(parse_bool(body.get("replace"), "replace", default=False))
    force = _force(request, body)
    dry_run = bool(parse_bool(body.get("dry_run"), "dry_run", default=False))
    service = console(request).service
    plan = await service.plan_import(body.get("data"), body.get("format"), replace)
    result: dict[str, Any] = {"dry_run": dry_run, **plan_json(plan)}
    if not dry_run:
        outcome = await service.apply_import(
            actor(request), body.get("data"), body.get("format"), replace, force
        )
        result["result"] = outcome_json(outcome)
    return ok(result)


# --- call history and alarms -------------------------------------------------------------------


def series_json(points: list[CallPoint], start: int, end: int, step: int) -> list[dict[str, int]]:
    """A call series, one point per step (zeros included), as the charts draw it."""
    return [{"ts": p.ts, "succ": p.succ, "err": p.err} for p in fill(points, start, end, step)]


def rule_json(rule: Rule, source: str) -> dict[str, Any]:
    """A rule: its definition, where it is kept (``config`` or ``store``), and in words."""
    return {**rule.definition(), "source": source, "description": rule.describe()}


async def module_history(request: Request) -> Response:
    """``GET /api/v1/modules/MODID/CMDID/history?period=hour|day``: calls and errors per
    minute (hour) or per 10 minutes (day), for the module and each of its hosts."""
    period = parse_choice(
        request.query_params.get("period"), "period", tuple(HISTORY_PERIODS), default="hour"
    )
    modid, cmdid = _module(request)
    view = await console(request).monitor.history((modid, cmdid), period)
    span = (view.start, view.end, view.step)
    return ok(
        {
            "modid": modid,
            "cmdid": cmdid,
            "period": view.period,
            "start": view.start,
            "end": view.end,
            "step": view.step,
            "points": series_json(view.module, *span),
            "hosts": [
                {"host": format_host(host), "points": series_json(points, *span)}
                for host, points in sorted(view.hosts.items())
            ],
        }
    )


async def list_alarms(request: Request) -> Response:
    """``GET /api/v1/alarms?firing=``: every firing alarm and the latest 1,000 resolved ones
    (newest first), the rules in force, stored rules that cannot be used, and the webhooks'
    delivery."""
    firing = parse_bool(request.query_params.get("firing"), "firing")
    view = await console(request).monitor.alarms(events=0, resolved=PAGE_MAX)
    states = [s for s in view.states if firing is None or s.firing == firing]
    return ok(
        {
            "alarms": [s.as_json() for s in states],
            "firing": len(view.firing),
            "resolved_not_listed": view.resolved_hidden,
            "rules": [rule_json(r, "config") for r in view.rules.configured]
            + [rule_json(r, "store") for r in view.rules.stored],
            "broken_rules": view.rules.broken,
            "webhooks": [attrs.asdict(w) for w in view.webhooks],
            "evaluator": view.lease.holder if view.lease else None,
        }
    )


async def alarm_events(request: Request) -> Response:
    """``GET /api/v1/alarms/events?rule=&before_id=&limit=``: transitions, newest first."""
    q = request.query_params
    before = q.get("before_id")
    events = await console(request).monitor.events(
        q.get("rule") or None,
        parse_int(q.get("limit"), "limit", default=100, low=1, high=PAGE_MAX),
        parse_int(before, "before_id", default=0, low=1, high=2**63 - 1) if before else None,
    )
    return ok({"events": [e.as_json() for e in events]})


async def put_alarm_rule(request: Request) -> Response:
    """``PUT /api/v1/alarms/rules/NAME {"kind": ..., ...}``: add or replace a stored rule
    (201 when new); 409 for a rule of the config file."""
    name = request.path_params["name"]
    body = await json_body(request)
    if body.setdefault("name", name) != name:
        raise BadInput("name", f"the body names {body['name']!r}, the URL {name!r}")
    rule = checked_rule(body)
    created = await console(request).monitor.put_rule(actor(request), rule)
    return ok(rule_json(rule, "store"), 201 if created else 200)


async def delete_alarm_rule(request: Request) -> Response:
    """``DELETE /api/v1/alarms/rules/NAME``: a stored rule; its firing alarms resolve at the
    next evaluation."""
    name = request.path_params["name"]
    await console(request).monitor.delete_rule(name)
    return ok({"name": name, "deleted": True})
