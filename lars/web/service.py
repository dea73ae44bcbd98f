"""What the console does, without HTTP: the functions behind every page and API endpoint.

Pages and the API parse their input with the ``parse_*`` functions here (one message per
bad field, naming it), call one :class:`ConsoleService` method, and render the result.
Every write validates all of its input first and then makes one store call (one
transaction: RouteData, RouteVersion, RouteChange and the RouteAudit row naming the
actor), so a bad request writes nothing; then it tells the DNS instances, best effort,
exactly as ``lars route`` does.

Errors carry their HTTP meaning: :class:`BadInput` (400, with the field), :class:`NotFound`
(404), :class:`Conflict` (409), :class:`Forbidden` (403), :class:`Unauthorized` (401); the
store's own ``InvalidValue`` is a 400 too (:func:`http_status`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

import attrs

from lars import routes_io
from lars.config import DnsConfig
from lars.core.model import (
    POLICIES,
    UINT32_MAX,
    Host,
    HostKey,
    HostMeta,
    ModuleKey,
    PolicySpec,
    check_id,
    check_weight,
    check_zone,
    format_host,
    ip_to_int,
)
from lars.errors import InvalidValue, LarsError, ShrinkRefused, StoreError, StoreUnavailable
from lars.store import (
    Actor,
    AuditEntry,
    CallStatus,
    HostStatus,
    ModuleSummary,
    RouteStore,
    RouteWrite,
)
from lars.store.base import CALL_STATUS_SORTS, NAME_KINDS, NAME_MAX

T = TypeVar("T")

#: What tells the DNS instances that the routes changed: version in, failures out.
Notify = Callable[[int], Awaitable[list[str]]]

#: Largest import, bytes (about 300,000 hosts of JSON).
IMPORT_MAX_BYTES = 16 << 20
#: Audit rows shown with one module.
MODULE_AUDIT_ROWS = 20
IMPORT_FORMATS = routes_io.FORMATS

_HOST_SEPARATORS = re.compile(r"[\s,;]+")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class BadInput(InvalidValue):
    """A request field is missing or malformed (HTTP 400); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(LarsError):
    """The module, host or name asked about does not exist (HTTP 404)."""


class Conflict(LarsError):
    """The write contradicts what is there, such as adding a host twice (HTTP 409)."""


class Unauthorized(LarsError):
    """The request names nobody the console knows (HTTP 401)."""


class Forbidden(LarsError):
    """The request is not allowed: a viewer changing something, a form without its CSRF
    token (HTTP 403)."""


def http_status(exc: LarsError) -> int:
    """The HTTP status that reports ``exc``."""
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, InvalidValue):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, StoreUnavailable):
        return 503
    if isinstance(exc, StoreError):
        return 500
    return 400


# --- input ---------------------------------------------------------------------------------


def parse_id(value: object, field: str) -> int:
    """A modid/cmdid from JSON (an integer) or a form (decimal text)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise BadInput(field, "is required")
        if not text.isascii() or not text.isdigit():
            raise BadInput(field, f"must be an integer from 0 to {UINT32_MAX}, got {value!r}")
        value = int(text)
    if value is None:
        raise BadInput(field, "is required")
    try:
        return check_id(value, field)
    except InvalidValue:
        raise BadInput(field, f"must be an integer from 0 to {UINT32_MAX}, got {value!r}") from None


def parse_module(modid: object, cmdid: object) -> ModuleKey:
    """A module from its two ids."""
    return parse_id(modid, "modid"), parse_id(cmdid, "cmdid")


def parse_hosts(value: object, field: str = "hosts") -> list[HostKey]:
    """Hosts from a JSON list of ``"IP:PORT"`` or text (separated by spaces, commas or new
    lines, as typed in a form). At least one; none twice."""
    if isinstance(value, str):
        items: list[object] = [t for t in _HOST_SEPARATORS.split(value) if t]
    elif isinstance(value, list):
        items = value
    elif value is None:
        items = []
    else:
        raise BadInput(field, 'must be a list of "IP:PORT" texts')
    if not items:
        raise BadInput(field, "give at least one host (IP:PORT)")
    hosts: list[HostKey] = []
    for item in items:
        if not isinstance(item, str):
            raise BadInput(field, f'must be a list of "IP:PORT" texts, got {item!r}')
        try:
            key = Host.parse(item).key
        except InvalidValue as exc:
            raise BadInput(field, str(exc)) from None
        if key in hosts:
            raise BadInput(field, f"{format_host(key)} is listed twice")
        hosts.append(key)
    return hosts


def parse_caller(value: object, field: str = "caller") -> int | None:
    """A caller's IPv4 address (empty: any caller)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadInput(field, f"must be an IPv4 address, got {value!r}")
    try:
        return ip_to_int(value.strip())
    except InvalidValue as exc:
        raise BadInput(field, str(exc)) from None


def parse_int(value: object, field: str, *, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``[low, high]``; ``default`` when absent."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if type(value) is not int or not low <= value <= high:
        raise BadInput(field, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def parse_bool(value: object, field: str, *, default: bool | None = None) -> bool | None:
    """A yes/no parameter: JSON true/false, or 1/0, true/false, yes/no, on/off."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise BadInput(field, f"must be true or false, got {value!r}")


def parse_choice(value: object, field: str, choices: Sequence[str], *, default: str) -> str:
    """One of ``choices`` (``default`` when absent)."""
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in choices:
        raise BadInput(field, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_kind(value: object) -> str:
    """A names dictionary: ``mod`` (ModIDConfig) or ``cmd`` (CmdIDConfig)."""
    if value not in NAME_KINDS:
        raise NotFound(f"no names of kind {value!r} (mod or cmd)")
    assert isinstance(value, str)
    return value


def parse_name(value: object, field: str = "name") -> str:
    """A module or command name: 1 to 255 printable characters."""
    if not isinstance(value, str) or not value.strip():
        raise BadInput(field, "is required")
    text = value.strip()
    if len(text) > NAME_MAX:
        raise BadInput(field, f"is longer than {NAME_MAX} characters")
    if not text.isprintable():
        raise BadInput(field, "must not contain control characters")
    return text


class NeedsForce(Conflict):
    """A write would remove more than half of a module's hosts, or all of them, and was not
    confirmed (DESIGN §13): nothing was written (HTTP 409)."""


def parse_weight(value: object, field: str = "weight") -> int | None:
    """A host's weight (a number or its text), or None when not given."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise BadInput(field, "must be a whole number")
        value = int(value.strip())
    try:
        return check_weight(value)
    except InvalidValue as exc:
        raise BadInput(field, str(exc)) from None


def parse_zone(value: object, field: str = "zone") -> str | None:
    """A host's zone ("" for none), or None when not given."""
    if value is None:
        return None
    try:
        return check_zone(value)
    except InvalidValue as exc:
        raise BadInput(field, str(exc)) from None


def _parse_fraction(value: object, field: str, default: float, high: float = 1.0) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise BadInput(field, "must be a number") from None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise BadInput(field, "must be a number")
    if not 0.0 <= number <= high:
        raise BadInput(field, f"must be a number from 0 to {high:g}")
    return float(number)


def parse_policy(data: Mapping[str, object]) -> PolicySpec:
    """A policy from a form or a JSON object (fields as PolicySpec's; missing ones take
    PolicySpec's defaults)."""
    spec = PolicySpec(
        parse_choice(data.get("policy"), "policy", POLICIES, default="rr"),
        bool(parse_bool(data.get("zone_affinity"), "zone_affinity", default=False)),
        _parse_fraction(data.get("zone_failover"), "zone_failover", PolicySpec().zone_failover),
        _parse_fraction(data.get("panic_threshold"), "panic_threshold", 0.0),
        _parse_fraction(data.get("slow_start"), "slow_start", 0.0, high=3600.0),
    )
    try:
        return spec.check()
    except InvalidValue as exc:
        raise BadInput("policy", str(exc)) from None


def parse_import(data: object, fmt: object, field: str = "data") -> tuple[str, routes_io.RouteFile]:
    """An import file's text and format into routes. Nothing partial: any malformed entry
    is a BadInput naming it."""
    fmt = parse_choice(fmt, "format", IMPORT_FORMATS, default="json")
    if isinstance(data, bytes):
        if len(data) > IMPORT_MAX_BYTES:
            raise BadInput(field, f"larger than {IMPORT_MAX_BYTES >> 20} MiB")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadInput(field, f"not UTF-8 text (byte {exc.start})") from None
    if not isinstance(data, str):
        raise BadInput(field, "must be the file's text")
    if not data.strip():
        raise BadInput(field, "the file is empty")
    if len(data) > IMPORT_MAX_BYTES:
        raise BadInput(field, f"larger than {IMPORT_MAX_BYTES >> 20} MiB")
    try:
        return fmt, routes_io.parse_route_file(data, fmt)
    except InvalidValue as exc:
        raise BadInput(field, str(exc)) from None


# --- results -------------------------------------------------------------------------------


@attrs.frozen
class Page(Generic[T]):
    """One page of a longer list."""

    total: int
    offset: int
    limit: int
    items: list[T]

    @property
    def next_offset(self) -> int | None:
        """Where the next page starts, if there is one."""
        end = self.offset + len(self.items)
        return end if end < self.total else None

    @property
    def prev_offset(self) -> int | None:
        """Where the previous page starts, if there is one."""
        return max(0, self.offset - self.limit) if self.offset > 0 else None


@attrs.frozen
class ModuleView:
    """A module's page: its summary (names, counts), hosts with status, recent changes."""

    summary: ModuleSummary
    hosts: list[HostStatus]
    audit: list[AuditEntry]
    #: Every host's weight and zone (DESIGN §13).
    meta: Mapping[HostKey, HostMeta] = attrs.field(factory=dict)
    #: The module's own policy (None: the agents' default).
    policy: PolicySpec | None = None
    #: Its self-registered hosts and when their lease expires (unix ms); static hosts are
    #: absent (DESIGN §14).
    leases: Mapping[HostKey, int] = attrs.field(factory=dict)
    #: Its hosts the fleet view demotes (empty unless ``[dns] fleet_view``).
    demoted: frozenset[HostKey] = frozenset()


@attrs.frozen
class FleetView:
    """The fleet view's rule (``[dns] demote_callers``, ``demote_share``, ``demote_window``):
    the console shows the hosts the DNS instances send demoted."""

    callers: int
    share: float
    window: float

    @classmethod
    def of(cls, dns: DnsConfig) -> FleetView | None:
        """The rule of a ``[dns]`` section, or None when ``fleet_view`` is off."""
        if not dns.fleet_view:
            return None
        return cls(dns.demote_callers, dns.demote_share, dns.demote_window)


@attrs.frozen
class ChangesView:
    """The audit log page: audit rows, the current RouteVersion, recent RouteChange rows."""

    audit: list[AuditEntry]
    version: int
    recent: list[tuple[int, int, int]]
    next_before: int | None


@attrs.frozen
class Outcome:
    """What a write did: the version it made (None: nothing changed), hosts added and
    removed, and the DNS instances that could not be told (they will poll)."""

    version: int | None
    added: int = 0
    removed: int = 0
    modules: int = 0
    warnings: tuple[str, ...] = ()
    #: Hosts whose weight or zone changed.
    updated: int = 0

    def describe(self) -> str:
        """One line for people."""
        if self.version is None:
            return "nothing to change"
        parts = []
        if self.added:
            parts.append(f"added {self.added} host(s)")
        if self.removed:
            parts.append(f"removed {self.removed} host(s)")
        if self.updated:
            parts.append(f"updated {self.updated} host(s)")
        if not parts:
            parts.append("changed the policy")
        where = f" in {self.modules} modules" if self.modules > 1 else ""
        return f"{', '.join(parts)}{where}; route version {self.version}"


@attrs.frozen
class ImportPlan:
    """What an import would change: per module, hosts added and removed."""

    fmt: str
    replace: bool
    modules_in_file: int
    diff: list[tuple[ModuleKey, frozenset[HostKey], frozenset[HostKey]]]

    @property
    def added(self) -> int:
        """Hosts the import adds."""
        return sum(len(added) for _, added, _ in self.diff)

    @property
    def removed(self) -> int:
        """Hosts the import removes."""
        return sum(len(removed) for _, _, removed in self.diff)


# --- the service ---------------------------------------------------------------------------


class ConsoleService:
    """Every console query and write over one store; ``notify`` tells the DNS instances."""

    def __init__(self, store: RouteStore, notify: Notify, fleet: FleetView | None = None) -> None:
        self.store = store
        self.notify = notify
        #: The fleet view's rule (None: off, nothing is demoted).
        self.fleet = fleet

    # reads

    async def overview(self, search: str | None, offset: int, limit: int) -> Page[ModuleSummary]:
        """Modules matching ``search`` (ids "12", "12/3", or part of a name), one page."""
        search = (search or "").strip() or None
        total, items = await self.store.module_overview(search=search, offset=offset, limit=limit)
        return Page(total, offset, limit, items)

    async def module(self, module: ModuleKey) -> ModuleView:
        """One module's hosts with their status, names and recent changes; NotFound if it
        has no hosts."""
        hosts = await self.store.module_detail(*module)
        if hosts is None:
            raise NotFound(f"module {module[0]}/{module[1]} has no hosts")
        _, summaries = await self.store.module_overview(search=f"{module[0]}/{module[1]}", limit=1)
        summary = next(
            (s for s in summaries if (s.modid, s.cmdid) == module),
            ModuleSummary(*module, "", "", len(hosts), 0, 0, 0, None),
        )
        audit = await self.store.list_audit(module=module, limit=MODULE_AUDIT_ROWS)
        meta = (await self.store.list_route_meta(*module)).get(module, {})
        policy = await self.store.get_policy(module)
        leases = await self.store.lease_expiries(module)
        return ModuleView(
            summary, hosts, audit, meta, policy, leases, await self.demoted(module, hosts)
        )

    async def demoted(self, module: ModuleKey, hosts: Sequence[HostStatus]) -> frozenset[HostKey]:
        """The module's hosts the fleet view demotes now (none when it is off)."""
        if self.fleet is None:
            return frozenset()
        since = max(0, math.ceil(time.time() - self.fleet.window))
        demoted = await self.store.demoted_hosts(
            since, callers=self.fleet.callers, share=self.fleet.share
        )
        return demoted.get(module, frozenset()) & {h.host for h in hosts}

    async def call_status(
        self,
        *,
        module: ModuleKey | None = None,
        caller: int | None = None,
        overloaded: bool | None = None,
        sort: str = "module",
        descending: bool = False,
        offset: int = 0,
        limit: int = 100,
    ) -> Page[CallStatus]:
        """ServerCallStatus rows, filtered, sorted and paged."""
        sort = parse_choice(sort, "sort", CALL_STATUS_SORTS, default="module")
        total, rows = await self.store.call_status(
            module=module,
            caller=caller,
            overloaded=overloaded,
            sort=sort,
            descending=descending,
            offset=offset,
            limit=limit,
        )
        return Page(total, offset, limit, rows)

    async def has_module(self, module: ModuleKey) -> bool:
        """True while the module has hosts."""
        return bool(await self.store.list_routes(*module))

    async def changes(
        self,
        *,
        module: ModuleKey | None = None,
        actor: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
        recent: int = 20,
    ) -> ChangesView:
        """The audit log (newest first, paged by id), the version and recent RouteChanges."""
        actor = (actor or "").strip() or None
        audit = await self.store.list_audit(
            module=module, actor=actor, limit=limit + 1, before_id=before_id
        )
        more = len(audit) > limit
        audit = audit[:limit]
        version = await self.store.route_version()
        recent_rows = await self.store.recent_changes(recent)
        return ChangesView(audit, version, recent_rows, audit[-1].id if more else None)

    async def names(self, kind: str) -> dict[int, str]:
        """A names dictionary, by id."""
        return dict(sorted((await self.store.list_names(parse_kind(kind))).items()))

    async def export(self, fmt: str) -> str:
        """Every route as a JSON or CSV file."""
        fmt = parse_choice(fmt, "format", IMPORT_FORMATS, default="json")
        meta = await self.store.list_route_meta()
        return routes_io.export_routes(meta, fmt, meta, await self.store.list_policies())

    async def plan_import(self, data: object, fmt: object, replace: bool) -> ImportPlan:
        """What importing the file would change in hosts (writes nothing)."""
        fmt_name, parsed = parse_import(data, fmt)
        return await self._plan(fmt_name, parsed.routes, replace)

    async def _plan(
        self, fmt: str, routes: Mapping[ModuleKey, frozenset[HostKey]], replace: bool
    ) -> ImportPlan:
        current = await self.store.list_routes()
        target = routes if replace else routes_io.merge_routes(current, routes)
        diff = routes_io.diff_routes(current, target)
        return ImportPlan(fmt, replace, len(routes), diff)

    # writes

    async def _written(self, result: RouteWrite) -> Outcome:
        warnings: list[str] = []
        if result.version is not None:
            # Committed; telling DNS is best effort (it polls as a fallback).
            warnings = [
                f"could not notify DNS {failure}; it will notice by polling"
                for failure in await self.notify(result.version)
            ]
        return Outcome(
            result.version,
            result.added,
            result.removed,
            len(result.modules),
            tuple(warnings),
            result.updated,
        )

    async def _guarded(self, write: Awaitable[RouteWrite]) -> Outcome:
        """The outcome of a write that may remove many hosts: NeedsForce when it removes
        more than half of a module's hosts unconfirmed."""
        try:
            result = await write
        except ShrinkRefused as exc:
            raise NeedsForce(
                f'{exc}; confirm the removal to do it anyway (API: "force": true)'
            ) from None
        return await self._written(result)

    async def create_module(
        self, actor: Actor, module: ModuleKey, hosts: Sequence[HostKey]
    ) -> Outcome:
        """Register a new module with its hosts; Conflict if it already has hosts."""
        if await self.store.list_routes(*module):
            raise Conflict(
                f"module {module[0]}/{module[1]} already exists; add hosts to it instead"
            )
        return await self._written(await self.store.add_hosts(module, hosts, actor=actor))

    async def add_hosts(self, actor: Actor, module: ModuleKey, hosts: Sequence[HostKey]) -> Outcome:
        """Add hosts to a module (new or not); Conflict if any is already there."""
        current = set((await self.store.list_routes(*module)).get(module, ()))
        there = [format_host(h) for h in hosts if h in current]
        if there:
            raise Conflict(
                f"module {module[0]}/{module[1]} already has {', '.join(there)}; nothing was added"
            )
        return await self._written(await self.store.add_hosts(module, hosts, actor=actor))

    async def remove_hosts(
        self, actor: Actor, module: ModuleKey, hosts: Sequence[HostKey], force: bool = False
    ) -> Outcome:
        """Remove hosts from a module; NotFound if the module or any host is not there;
        NeedsForce if they are more than half of its hosts and ``force`` is not given."""
        current = set(await self._hosts_of(module))
        missing = [format_host(h) for h in hosts if h not in current]
        if missing:
            raise NotFound(
                f"module {module[0]}/{module[1]} has no host {', '.join(missing)};"
                " nothing was removed"
            )
        return await self._guarded(self.store.remove_hosts(module, hosts, actor=actor, force=force))

    async def remove_module(self, actor: Actor, module: ModuleKey, force: bool = False) -> Outcome:
        """Remove every host of a module (which needs ``force``); NotFound if it has none."""
        await self._hosts_of(module)
        return await self._guarded(self.store.remove_hosts(module, None, actor=actor, force=force))

    async def set_host(
        self,
        actor: Actor,
        module: ModuleKey,
        host: HostKey,
        weight: int | None,
        zone: str | None,
    ) -> Outcome:
        """Set a host's weight and/or zone; NotFound if the host is not in the module."""
        if weight is None and zone is None:
            raise BadInput("weight", "give a weight, a zone or both")
        if host not in set(await self._hosts_of(module)):
            raise NotFound(f"module {module[0]}/{module[1]} has no host {format_host(host)}")
        return await self._written(
            await self.store.set_host_meta(module, host, weight=weight, zone=zone, actor=actor)
        )

    async def policy(self, module: ModuleKey) -> PolicySpec | None:
        """The module's own policy, or None."""
        return await self.store.get_policy(module)

    async def set_policy(self, actor: Actor, module: ModuleKey, spec: PolicySpec | None) -> Outcome:
        """Give a module its own policy, or (None) remove it."""
        return await self._written(await self.store.set_policy(module, spec, actor=actor))

    async def _hosts_of(self, module: ModuleKey) -> list[HostKey]:
        hosts = (await self.store.list_routes(*module)).get(module)
        if not hosts:
            raise NotFound(f"module {module[0]}/{module[1]} has no hosts")
        return hosts

    async def apply_import(
        self, actor: Actor, data: object, fmt: object, replace: bool, force: bool = False
    ) -> Outcome:
        """Import a route file in one transaction: add its hosts, or with ``replace`` make
        the routes exactly the file's (removing more than half of a module's hosts needs
        ``force``). The file's weights, zones and policies are written too."""
        _, parsed = parse_import(data, fmt)
        if replace:
            return await self._guarded(
                self.store.replace_routes(
                    parsed.routes,
                    meta=parsed.meta,
                    policies=parsed.policies,
                    actor=actor,
                    force=force,
                )
            )
        return await self._written(
            await self.store.change_routes(
                add=parsed.routes, meta=parsed.meta, policies=parsed.policies, actor=actor
            )
        )

    async def set_name(self, kind: str, ident: int, name: str) -> None:
        """Name a modid or cmdid (a new entry, or a new name for an old one)."""
        await self.store.set_name(parse_kind(kind), ident, name)

    async def delete_name(self, kind: str, ident: int) -> None:
        """Forget a modid's or cmdid's name; NotFound if it has none."""
        if not await self.store.delete_name(parse_kind(kind), ident):
            raise NotFound(f"{kind}id {ident} has no name")
