"""The route store interface and its records."""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from lars.core.model import HostKey, HostMeta, ModuleKey, PolicySpec, format_host, int_to_ip
from lars.errors import InvalidValue, StoreError

if TYPE_CHECKING:
    from lars.store.schema import ColumnLimits, UpgradePlan, UpgradeStep

#: Module -> its hosts.
RouteMap = dict[ModuleKey, frozenset[HostKey]]
#: Module -> the weight and zone of those of its hosts that have other than the defaults
#: (a host absent has HostMeta(); a module absent has only such hosts).
MetaMap = dict[ModuleKey, dict[HostKey, HostMeta]]
#: Module -> its own scheduling policy (a module absent uses the agents' default).
PolicyMap = dict[ModuleKey, PolicySpec]


@attrs.frozen
class RouteSnapshot:
    """All routes at one store version, read in one consistent transaction.

    ``changed`` holds the modules with a ``RouteChange`` row newer than the version asked
    about (empty when no version was given).
    """

    version: int
    routes: RouteMap
    changed: frozenset[ModuleKey] = frozenset()
    #: The hosts' weights and zones other than the defaults (DESIGN §13).
    meta: MetaMap = attrs.field(factory=dict)
    #: The modules' own policies.
    policies: PolicyMap = attrs.field(factory=dict)


@attrs.frozen
class RouteDelta:
    """The routes of the modules changed since a version, read in one transaction.

    ``routes`` holds the current hosts of every module in ``changed``; a changed module
    missing from it has no hosts any more. ``changed`` is empty when the version moved
    without any ``RouteChange`` row, in which case only a full load can tell what changed.
    """

    version: int
    changed: frozenset[ModuleKey]
    routes: RouteMap
    #: As :attr:`RouteSnapshot.meta`, for the changed modules.
    meta: MetaMap = attrs.field(factory=dict)
    #: The policies of the changed modules that have one.
    policies: PolicyMap = attrs.field(factory=dict)


@attrs.frozen
class CallStatus:
    """One ``ServerCallStatus`` row: one node's call counts as seen from one caller."""

    modid: int
    cmdid: int
    ip: int
    port: int
    caller: int
    succ: int
    err: int
    ts: int
    overload: bool
    succ_total: int = 0
    err_total: int = 0
    #: On a row to write: what to add to the totals, when not ``succ``/``err`` themselves
    #: (an original agent reports running window counts; its increments are counted).
    add_succ: int | None = None
    add_err: int | None = None

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """The row's primary key."""
        return (self.modid, self.cmdid, self.ip, self.port, self.caller)

    def as_json(self) -> dict[str, Any]:
        """The row as ``lars query --stats --json`` and the console's API show it."""
        return {
            "modid": self.modid,
            "cmdid": self.cmdid,
            "host": format_host((self.ip, self.port)),
            "caller": int_to_ip(self.caller),
            "succ_cnt": self.succ,
            "err_cnt": self.err,
            "succ_total": self.succ_total,
            "err_total": self.err_total,
            "overload": self.overload,
            "ts": self.ts,
        }


#: Longest :attr:`Actor.name` and :attr:`Actor.source` (RouteAudit.actor and .source).
ACTOR_NAME_MAX = 128
ACTOR_SOURCE_MAX = 64


@attrs.frozen
class Actor:
    """Who makes a route write, for the audit log (``RouteAudit``).

    ``name`` is a console user's name, an API token's name or ``"cli:USER@HOST"``;
    ``source`` the client's address (``"127.0.0.1"``) or ``"cli"``. Both are checked here,
    so that an actor the audit table cannot hold fails before anything is written.
    """

    name: str
    source: str

    def __attrs_post_init__(self) -> None:
        for field, value, most in (
            ("name", self.name, ACTOR_NAME_MAX),
            ("source", self.source, ACTOR_SOURCE_MAX),
        ):
            if type(value) is not str or not value.strip() or len(value) > most:
                raise InvalidValue(
                    f"actor {field} must be text of 1 to {most} characters, got {value!r}"
                )


@attrs.frozen
class AuditEntry:
    """One ``RouteAudit`` row: who changed one module's hosts, when, and the version made."""

    id: int
    #: Epoch seconds.
    ts: float
    actor: str
    source: str
    modid: int
    cmdid: int
    added: tuple[HostKey, ...]
    removed: tuple[HostKey, ...]
    version: int
    #: What else the write changed (``RouteAudit.changes``): ``{"hosts": {"ip:port":
    #: {"weight": [old, new], "zone": [old, new]}}, "policy": [old, new]}``, either part
    #: absent when unchanged; a policy is a map of PolicySpec's fields, or None.
    changes: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ModuleSummary:
    """One module as the console's overview shows it.

    The status figures count only the module's current hosts (``RouteData``): rows that
    ``ServerCallStatus`` keeps for a host removed since do not count.
    """

    modid: int
    cmdid: int
    #: ``ModIDConfig.content``, ``""`` if none.
    mod_name: str
    #: ``CmdIDConfig.content``, ``""`` if none.
    cmd_name: str
    hosts: int
    #: Hosts that at least one caller flags overloaded.
    overloaded_hosts: int
    #: ``succ_cnt`` (the latest report interval) summed over hosts and callers.
    succ: int
    #: ``err_cnt`` summed likewise.
    err: int
    #: The newest ``RouteChange`` version of the module (None once purged, or never written).
    last_version: int | None


@attrs.frozen
class HostStatus:
    """One host of a module's route with its ``ServerCallStatus`` rows, one per caller."""

    host: HostKey
    callers: tuple[CallStatus, ...]


#: Sort keys of :meth:`RouteStore.call_status`.
CALL_STATUS_SORTS = ("module", "host", "caller", "succ", "err", "ts")
#: Kinds of :meth:`RouteStore.list_names`: ``"mod"`` (ModIDConfig), ``"cmd"`` (CmdIDConfig).
NAME_KINDS = ("mod", "cmd")
#: Longest name (ModIDConfig.content, CmdIDConfig.content are CHAR(255)).
NAME_MAX = 255
#: Most rows one page of a listing may ask for.
PAGE_MAX = 1000


@attrs.frozen
class RouteWrite:
    """Outcome of a route write: the new version, or ``None`` if nothing changed."""

    version: int | None
    #: Modules whose host set changed.
    modules: frozenset[ModuleKey] = frozenset()
    #: Hosts added and removed, over all modules.
    added: int = 0
    removed: int = 0
    #: Hosts whose weight or zone changed, over all modules.
    updated: int = 0

    @property
    def changed(self) -> bool:
        """True if the write changed anything."""
        return self.version is not None


# --- call history and alarms (issue 10) --------------------------------------------------------

#: Width of one ``CallHistory`` bucket, seconds.
HISTORY_STEP = 60
#: Longest alarm rule name (AlarmRule.name, AlarmState.rule, AlarmEvent.rule).
ALARM_NAME_MAX = 64
#: Longest alarm subject (AlarmState.subject, AlarmEvent.subject).
ALARM_SUBJECT_MAX = 128
#: Largest stored rule definition, bytes of JSON.
ALARM_RULE_MAX_BYTES = 4096


@attrs.frozen
class HostCalls:
    """Calls to one host of a module summed over its callers and a span of ``CallHistory``
    minutes."""

    modid: int
    cmdid: int
    ip: int
    port: int
    succ: int
    err: int


@attrs.frozen
class CallPoint:
    """One step of a call series: the bucket's start (epoch seconds, a multiple of the
    step) and the calls in it."""

    ts: int
    succ: int
    err: int


class HistoryRow(NamedTuple):
    """What one write adds to one ``CallHistory`` bucket: the calls to one host of a module
    in one minute (epoch seconds, a multiple of :data:`HISTORY_STEP`), summed over callers.

    A named tuple rather than an attrs class: the reporter makes one per host result, tens
    of thousands a second, and the store writes its fields as they are.
    """

    modid: int
    cmdid: int
    ip: int
    port: int
    minute: int
    succ: int
    err: int


@attrs.frozen
class StoredRule:
    """One ``AlarmRule`` row: a rule written in the console. ``definition`` is the rule as
    JSON data (``lars.alarms.rules`` checks its meaning; the store only keeps it)."""

    name: str
    definition: Mapping[str, Any]
    #: Epoch seconds of the last write.
    updated: float
    actor: str


@attrs.frozen
class AlarmState:
    """One ``AlarmState`` row: the present state of one alarm, that is one rule applied to
    one subject (a module, a host of a module, a caller)."""

    rule: str
    #: What the rule looked at, unique per rule: ``"12/3"``, ``"12/3 10.0.0.1:80"``,
    #: ``"caller 10.0.0.9"``.
    subject: str
    kind: str
    firing: bool
    #: Epoch seconds since which the alarm is in this state.
    since: float
    #: The value that made the last transition (an error rate, a number of callers...);
    #: None when there was none to measure (a forgotten caller).
    value: float | None
    threshold: float
    modid: int | None = None
    cmdid: int | None = None
    #: ``"ip:port"`` of the host, for host alarms.
    host: str | None = None
    #: Dotted IPv4 of the caller, for caller alarms.
    caller: str | None = None
    #: Epoch seconds of the last evaluation that saw the alarm.
    updated: float = 0.0
    #: The state last sent to the webhooks (None: never sent), and when.
    notified_firing: bool | None = None
    notified_at: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        """``(rule, subject)``, the row's primary key."""
        return (self.rule, self.subject)

    def as_json(self) -> dict[str, Any]:
        """The state as ``lars alarms --json`` and the console's API show it."""
        return {
            **_alarm_json(self),
            "since": self.since,
            "notified": None
            if self.notified_firing is None
            else ("firing" if self.notified_firing else "resolved"),
            "notified_at": self.notified_at or None,
        }


@attrs.frozen
class AlarmEvent:
    """One ``AlarmEvent`` row: a transition of one alarm (the history)."""

    #: 0 on an event not yet written.
    id: int
    ts: float
    rule: str
    subject: str
    kind: str
    firing: bool
    value: float | None
    threshold: float
    modid: int | None = None
    cmdid: int | None = None
    host: str | None = None
    caller: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The event as ``lars alarms --history --json`` and the console's API show it."""
        return {"id": self.id, "ts": self.ts, **_alarm_json(self)}


def _alarm_json(alarm: AlarmState | AlarmEvent) -> dict[str, Any]:
    """What a state and an event show alike: the alarm, its subject, the state, the value
    against the threshold, and what it is about."""
    module = None if alarm.modid is None or alarm.cmdid is None else f"{alarm.modid}/{alarm.cmdid}"
    return {
        "alarm": alarm.rule,
        "subject": alarm.subject,
        "kind": alarm.kind,
        "state": "firing" if alarm.firing else "resolved",
        "value": alarm.value,
        "threshold": alarm.threshold,
        "module": module,
        "host": alarm.host,
        "caller": alarm.caller,
    }


@attrs.frozen
class AlarmDecision:
    """What one evaluation round writes, in the transaction that holds the lease: the
    states to insert or replace, the states to delete, and the events to append."""

    states: tuple[AlarmState, ...] = ()
    deleted: tuple[tuple[str, str], ...] = ()
    events: tuple[AlarmEvent, ...] = ()


@attrs.frozen
class Lease:
    """The ``AlarmLease`` row: who evaluates the alarms, until when (the store's clock)."""

    holder: str
    expires: float


# --- self-registration (DESIGN §14) ------------------------------------------------------------

#: ``RouteData`` rows one :meth:`RouteStore.expire_leases` call removes at most (call again
#: while it reports ``more``).
EXPIRE_BATCH = 500


@attrs.frozen
class LeaseGrant:
    """A self-registered host's lease as the DNS writes it: register (:meth:`RouteStore.
    register_leases`) or renew (:meth:`RouteStore.renew_leases`).

    ``expires`` is unix milliseconds (``RouteData.lease_expires``). ``weight`` and ``zone``
    None: not given (a new row takes DEFAULT_WEIGHT and no zone; an existing one keeps its
    own, save that a drained row, weight 0, takes DEFAULT_WEIGHT back).
    """

    module: ModuleKey
    host: HostKey
    expires: int
    weight: int | None = None
    zone: str | None = None

    @property
    def key(self) -> tuple[ModuleKey, HostKey]:
        """``(module, host)``: one RouteData row."""
        return self.module, self.host


@attrs.frozen
class LeaseDrop:
    """A deregistration: drain the host (weight 0) and let it expire ``drain_ms`` from now
    (0: remove it at once)."""

    module: ModuleKey
    host: HostKey
    drain_ms: int = 0

    @property
    def key(self) -> tuple[ModuleKey, HostKey]:
        """``(module, host)``: one RouteData row."""
        return self.module, self.host


@attrs.frozen
class LeaseBatch:
    """One agent's registrations and deregistrations, audited as its (``actor``)."""

    actor: Actor
    grants: Sequence[LeaseGrant] = ()
    drops: Sequence[LeaseDrop] = ()


@attrs.frozen
class LeaseRenewal:
    """What :meth:`RouteStore.renew_leases` did: rows whose expiry it extended, and the
    leases whose row was gone (swept, or removed by an operator) and were registered anew,
    with the route write that made."""

    renewed: int
    reinserted: int = 0
    write: RouteWrite = RouteWrite(None)


@attrs.frozen
class LeaseExpiry:
    """What :meth:`RouteStore.expire_leases` did: the route write (modules changed, hosts
    removed), the hosts removed per module, and whether more expired rows wait (the batch
    limit was reached)."""

    write: RouteWrite
    hosts: Mapping[ModuleKey, tuple[HostKey, ...]] = attrs.field(factory=dict)
    more: bool = False


class RouteStore(abc.ABC):
    """Where routes and call statistics live. Every method may raise :class:`StoreError`."""

    #: ``"sqlite"`` or ``"mysql"``
    kind: str
    #: The URL with any password hidden, for logs and messages.
    display_url: str

    @abc.abstractmethod
    async def init_schema(self) -> list[str]:
        """Create missing tables and columns, never dropping anything. Returns what it did."""

    async def missing_schema(self, required: Mapping[str, Collection[str]]) -> list[str]:
        """What the store lacks of the ``required`` tables and columns (table -> columns), as
        ``"table X"`` and ``"column X.c"``; empty when nothing is missing (or the store has
        no schema to check)."""
        return []

    async def plan_upgrade(self) -> UpgradePlan:
        """What ``lars db upgrade`` would change (reads only)."""
        raise StoreError(f"the store {self.display_url} cannot be upgraded")

    async def apply_upgrade(self, step: UpgradeStep) -> None:
        """Apply one step of :meth:`plan_upgrade`'s plan."""
        raise StoreError(f"the store {self.display_url} cannot be upgraded")

    async def call_status_limits(self) -> ColumnLimits | None:
        """The values ``ServerCallStatus``'s integer columns hold as the database declares
        them, so that the reporter drops a row that does not fit before writing its batch;
        None when unknown (nothing to check)."""
        return None

    @abc.abstractmethod
    async def route_version(self) -> int:
        """The current ``RouteVersion.version`` (0 if the row is missing)."""

    @abc.abstractmethod
    async def load_routes(self, changes_since: int | None = None) -> RouteSnapshot:
        """Read the version, every route and (optionally) the modules changed since a version."""

    @abc.abstractmethod
    async def load_changes(self, since: int) -> RouteDelta:
        """Read the version and the routes of the modules changed after version ``since``."""

    @abc.abstractmethod
    async def change_routes(
        self,
        add: Mapping[ModuleKey, Collection[HostKey]] | None = None,
        remove: Mapping[ModuleKey, Collection[HostKey] | None] | None = None,
        *,
        meta: Mapping[ModuleKey, Mapping[HostKey, HostMeta]] | None = None,
        actor: Actor | None = None,
        force: bool = True,
        policies: Mapping[ModuleKey, PolicySpec | None] | None = None,
    ) -> RouteWrite:
        """Add and remove hosts, set weights and zones and modules' ``policies`` (None:
        remove the module's own), in one transaction.

        ``remove[module] = None`` removes every host of the module; a host both removed and
        added stays. ``meta`` gives hosts added or kept their weight and zone (a host in
        neither is :class:`InvalidValue`; hosts added without take HostMeta()). If anything
        changes, the version is raised once and one ``RouteChange`` row is written per
        module changed, and with an ``actor`` one ``RouteAudit`` row per module changed, in
        the same transaction; a write that changes nothing writes nothing. A module id,
        host, weight or zone out of range is :class:`InvalidValue`. Without ``force``, a
        write that removes more than half of a module's hosts, or all of them, is
        :class:`~lars.errors.ShrinkRefused` and writes nothing (the command line, the
        console and its API ask for it; library callers default to forcing). A host added
        that registered itself (a dynamic row, DESIGN §14) becomes static: it stays until
        removed, as every host an operator writes.
        """

    async def add_hosts(
        self,
        module: ModuleKey,
        hosts: Collection[HostKey],
        *,
        meta: Mapping[HostKey, HostMeta] | None = None,
        actor: Actor | None = None,
    ) -> RouteWrite:
        """Add hosts to a module's route (hosts already there are left alone, but take the
        weight and zone ``meta`` gives them)."""
        return await self.change_routes(
            add={module: hosts}, meta=None if meta is None else {module: meta}, actor=actor
        )

    async def remove_hosts(
        self,
        module: ModuleKey,
        hosts: Collection[HostKey] | None,
        *,
        actor: Actor | None = None,
        force: bool = True,
    ) -> RouteWrite:
        """Remove hosts from a module's route; ``None`` removes them all."""
        return await self.change_routes(remove={module: hosts}, actor=actor, force=force)

    async def replace_routes(
        self,
        routes: Mapping[ModuleKey, Collection[HostKey]],
        *,
        meta: Mapping[ModuleKey, Mapping[HostKey, HostMeta]] | None = None,
        actor: Actor | None = None,
        force: bool = True,
        policies: Mapping[ModuleKey, PolicySpec] | None = None,
    ) -> RouteWrite:
        """Make the routes exactly ``routes`` in one transaction: modules absent from it (or
        given no hosts) lose every host. With ``meta``, weights and zones become exactly its
        (hosts it omits take HostMeta()); without, they stay. With ``policies``, the modules'
        own policies become exactly its; without, they stay. Version, ``RouteChange``,
        ``RouteAudit`` rows, ``force`` and self-registered hosts (they become static) as
        :meth:`change_routes`."""
        raise self._unsupported("replace routes")

    # --- weights, zones and policies (DESIGN §13) --------------------------------------------

    async def set_host_meta(
        self,
        module: ModuleKey,
        host: HostKey,
        *,
        weight: int | None = None,
        zone: str | None = None,
        actor: Actor | None = None,
    ) -> RouteWrite:
        """Set the weight and/or the zone of a host of a module's route (one of them at
        least; :class:`InvalidValue` when the host is not in the route). A change is a route
        change: version, ``RouteChange`` and ``RouteAudit`` rows as :meth:`change_routes`."""
        raise self._unsupported("keep weights and zones")

    async def list_route_meta(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> dict[ModuleKey, dict[HostKey, HostMeta]]:
        """As :meth:`list_routes`, with every host's weight and zone."""
        routes = await self.list_routes(modid, cmdid)
        return {module: dict.fromkeys(hosts, HostMeta()) for module, hosts in routes.items()}

    async def list_policies(self) -> dict[ModuleKey, PolicySpec]:
        """Every module's own policy (``RoutePolicy``)."""
        return {}

    async def get_policy(self, module: ModuleKey) -> PolicySpec | None:
        """The module's own policy, or None (the agents' ``[agent.loadbalance]`` applies)."""
        return None

    async def set_policy(
        self, module: ModuleKey, spec: PolicySpec | None, *, actor: Actor | None = None
    ) -> RouteWrite:
        """Give a module its own policy, or remove it (``None``). A change raises the
        version and writes ``RouteChange`` and (with an actor) ``RouteAudit`` rows, so DNS
        pushes it to agents like a route; setting the policy it has writes nothing."""
        raise self._unsupported("keep policies")

    # --- self-registration and the fleet view (DESIGN §14) -----------------------------------

    async def write_leases(
        self,
        grants: Sequence[LeaseGrant],
        drops: Sequence[LeaseDrop] = (),
        *,
        now_ms: int,
        actor: Actor,
    ) -> RouteWrite:
        """Register ``grants`` and deregister ``drops`` in one transaction.

        A registration inserts a missing row, dynamic (``lease_expires`` = its ``expires``),
        with its weight (or DEFAULT_WEIGHT) and zone (or none). On an existing dynamic row
        it sets the expiry and the weight and zone given (a drained row, weight 0, given no
        weight takes DEFAULT_WEIGHT back: the host registered again wants traffic). A static
        row (``lease_expires`` NULL: written by the CLI, the console, an import) is left as
        it is: static wins and never expires. A deregistration of a dynamic row sets its
        weight to 0 (no new calls go there) and its expiry to ``now_ms + drain_ms``, or
        deletes it when ``drain_ms`` is 0; static rows and missing ones are left alone. A key
        both registered and dropped is dropped.

        New rows, changed weights or zones and deleted rows are route changes: the version is
        raised once, a ``RouteChange`` row and an ``actor`` ``RouteAudit`` row (``changes``
        saying ``"lease": "register"`` or ``"drop"``) are written per module changed. An
        expiry alone is no route change. :class:`~lars.errors.SchemaMissing` when RouteData
        has no ``lease_expires`` column (``lars db upgrade`` adds it); :class:`InvalidValue`
        for an id, host, weight, zone or drain out of range (nothing is written).
        """
        return await self.write_lease_batches([LeaseBatch(actor, grants, drops)], now_ms=now_ms)

    async def write_lease_batches(
        self, batches: Sequence[LeaseBatch], *, now_ms: int
    ) -> RouteWrite:
        """:meth:`write_leases` of several agents' batches, in order, in one transaction
        (one commit for many agents: a DNS taking over a thousand sessions at once). Each
        batch that changes routes raises the version and is audited as its actor's; the
        write returned is their sum (the last version, every module changed)."""
        raise self._unsupported("keep leases")

    async def register_leases(
        self, grants: Sequence[LeaseGrant], *, actor: Actor, now_ms: int = 0
    ) -> RouteWrite:
        """:meth:`write_leases` of registrations alone."""
        return await self.write_leases(grants, (), now_ms=now_ms, actor=actor)

    async def drop_leases(
        self, drops: Sequence[LeaseDrop], *, now_ms: int, actor: Actor
    ) -> RouteWrite:
        """:meth:`write_leases` of deregistrations alone."""
        return await self.write_leases((), drops, now_ms=now_ms, actor=actor)

    async def renew_leases(self, grants: Sequence[LeaseGrant], *, actor: Actor) -> LeaseRenewal:
        """Extend the expiry of dynamic rows to the grants' (never shortening one: a later
        expiry written by another DNS stays), in one batched UPDATE per
        :data:`~lars.store.sql.INSERT_CHUNK` grants; a heartbeat is no route change. A grant
        whose row is gone (swept, removed by an operator) is registered again
        (:meth:`write_leases`, a route change). Static rows are left alone."""
        raise self._unsupported("keep leases")

    async def expire_leases(
        self, now_ms: int, *, actor: Actor, limit: int = EXPIRE_BATCH
    ) -> LeaseExpiry:
        """Delete at most ``limit`` dynamic rows whose expiry is before ``now_ms``, in one
        transaction that raises the version and writes a ``RouteChange`` and a ``RouteAudit``
        row (``"lease": "expire"``) per module changed.

        Safe with several DNS instances on one database: the transaction takes the
        RouteVersion row's lock first (as every route write does, so it never deadlocks with
        one) and selects the expired rows ``FOR UPDATE SKIP LOCKED`` (MySQL 8, MariaDB 10.6;
        SQLite: its writer lock), so no row is removed twice and a sweeper that dies in the
        middle loses nothing (rolled back: the next sweep takes the rows). Nothing expired:
        one indexed read, no transaction. A database without the column expires nothing.
        """
        return LeaseExpiry(RouteWrite(None))

    async def demoted_hosts(
        self, since: int, *, callers: int, share: float
    ) -> dict[ModuleKey, frozenset[HostKey]]:
        """The fleet view (DESIGN §14): per module, the hosts that at least ``callers`` of
        the callers reporting on them at ``since`` or later (``ServerCallStatus.ts``, epoch
        seconds), and at least ``share`` of those callers, flag overloaded."""
        return {}

    async def lease_expiries(self, module: ModuleKey) -> dict[HostKey, int]:
        """The dynamic hosts of a module's route and their expiry (unix ms); static hosts
        are absent."""
        return {}

    # --- the console's reads and the names (issue 9) -----------------------------------------

    async def list_audit(
        self,
        *,
        module: ModuleKey | None = None,
        actor: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        """``RouteAudit`` rows, newest first, optionally of one module or one actor name;
        ``before_id`` pages (the rows older than that id)."""
        raise self._unsupported("keep an audit log")

    async def recent_changes(self, limit: int = 50) -> list[tuple[int, int, int]]:
        """``RouteChange`` rows newest first, as ``(modid, cmdid, version)``."""
        raise self._unsupported("list route changes")

    async def module_overview(
        self, *, search: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[ModuleSummary]]:
        """``(modules matching, one page of them ordered by modid, cmdid)``.

        ``search``: ``"12"`` matches modid 12 or cmdid 12, ``"12/3"`` the module 12/3,
        any other text a case-insensitive substring of the module's mod or cmd name.
        """
        raise self._unsupported("summarise modules")

    async def module_detail(self, modid: int, cmdid: int) -> list[HostStatus] | None:
        """Every host of the module's route (sorted) with its status rows, or None when the
        module has no hosts."""
        raise self._unsupported("describe modules")

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
    ) -> tuple[int, list[CallStatus]]:
        """``(rows matching, one page of ServerCallStatus rows)``, filtered and sorted by
        one of :data:`CALL_STATUS_SORTS` (ties broken by the row's key); another sort key
        is :class:`InvalidValue`."""
        raise self._unsupported("page call status")

    async def list_names(self, kind: str) -> dict[int, str]:
        """The names of modids (``kind="mod"``, ModIDConfig) or cmdids (``"cmd"``,
        CmdIDConfig)."""
        raise self._unsupported("keep names")

    async def set_name(self, kind: str, ident: int, content: str) -> None:
        """Name a modid or cmdid (insert or update: one row per id)."""
        raise self._unsupported("keep names")

    async def delete_name(self, kind: str, ident: int) -> bool:
        """Remove the name of a modid or cmdid; False if it had none."""
        raise self._unsupported("keep names")

    # --- call history and alarms (issue 10) ---------------------------------------------------

    async def call_history(
        self, module: ModuleKey, since: int, until: int, step: int = HISTORY_STEP
    ) -> dict[HostKey, list[CallPoint]]:
        """``CallHistory`` of a module's hosts from ``since`` (inclusive) to ``until``
        (exclusive), epoch seconds, summed over callers into steps of ``step`` seconds (a
        multiple of 60; points start at multiples of ``step``). Only steps with calls appear,
        in time order; a host with none is absent."""
        raise self._unsupported("keep call history")

    async def module_sparklines(
        self, modules: Collection[ModuleKey], since: int, step: int = HISTORY_STEP
    ) -> dict[ModuleKey, list[CallPoint]]:
        """For each of ``modules`` (at most :data:`PAGE_MAX`), its calls summed over hosts and
        callers in steps of ``step`` seconds from ``since`` on; modules without calls absent."""
        raise self._unsupported("keep call history")

    async def window_calls(self, since: int) -> list[HostCalls]:
        """Every host's calls in ``CallHistory`` buckets from ``since`` on (epoch seconds),
        summed over callers, for the error-rate alarms."""
        raise self._unsupported("keep call history")

    async def purge_history(self, older_than: int, limit: int = 10_000) -> int:
        """Delete at most ``limit`` ``CallHistory`` rows of minutes before ``older_than``
        (epoch seconds); returns how many went. Call again while it returns ``limit``."""
        raise self._unsupported("keep call history")

    async def overloaded_status(self, since: int) -> list[CallStatus]:
        """``ServerCallStatus`` rows flagged overloaded and reported at ``since`` or later."""
        raise self._unsupported("read overloaded hosts")

    async def caller_last_reports(self) -> dict[int, int]:
        """Each caller's newest ``ServerCallStatus.ts``."""
        raise self._unsupported("read callers")

    async def list_alarm_rules(self) -> list[StoredRule]:
        """The ``AlarmRule`` rows, by name."""
        raise self._unsupported("keep alarm rules")

    async def put_alarm_rule(self, name: str, definition: Mapping[str, Any], actor: Actor) -> None:
        """Insert or replace the rule ``name``."""
        raise self._unsupported("keep alarm rules")

    async def delete_alarm_rule(self, name: str) -> bool:
        """Delete the rule ``name``; False if there was none. Its states stay: the alarm
        engine's next round resolves the firing ones (telling the webhooks) and deletes
        them."""
        raise self._unsupported("keep alarm rules")

    async def alarm_round(
        self,
        holder: str,
        ttl: float,
        decide: Callable[[list[AlarmState]], AlarmDecision],
    ) -> AlarmDecision | None:
        """One evaluation round under the lease, in one write transaction: take or renew the
        ``AlarmLease`` for ``holder`` until ``ttl`` seconds from now (the store's clock);
        if another holder's lease is still valid, return None and write nothing; else call
        ``decide`` with every ``AlarmState`` row, write what it returns and return it."""
        raise self._unsupported("evaluate alarms")

    async def release_lease(self, holder: str) -> None:
        """Give the lease up if ``holder`` has it (at shutdown), so another instance takes
        over at once."""
        raise self._unsupported("evaluate alarms")

    async def alarm_lease(self) -> Lease | None:
        """The current lease row, or None."""
        raise self._unsupported("evaluate alarms")

    async def list_alarm_states(self, *, firing: bool | None = None) -> list[AlarmState]:
        """``AlarmState`` rows by rule and subject, optionally only firing or resolved ones."""
        raise self._unsupported("keep alarm states")

    async def list_alarm_events(
        self, *, rule: str | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[AlarmEvent]:
        """``AlarmEvent`` rows newest first, optionally of one rule; ``before_id`` pages."""
        raise self._unsupported("keep alarm history")

    async def purge_alarms(self, older_than: float) -> int:
        """Delete events and resolved states older than ``older_than`` (epoch seconds)."""
        raise self._unsupported("keep alarm history")

    def _unsupported(self, what: str) -> StoreError:
        return StoreError(f"the store {self.display_url} cannot {what}")

    @abc.abstractmethod
    async def list_routes(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> dict[ModuleKey, list[HostKey]]:
        """Routes sorted by module and host, optionally only one modid or one module."""

    @abc.abstractmethod
    async def purge_changes(self, older_than: float) -> int:
        """Delete ``RouteChange`` rows written more than ``older_than`` seconds ago."""

    @abc.abstractmethod
    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        """Store call statistics: latest counts replace, totals accumulate, one transaction."""

    async def record_calls(
        self,
        rows: Sequence[CallStatus],
        history: Sequence[HistoryRow],
        token: bytes | None = None,
    ) -> bool:
        """:meth:`upsert_call_status` and, in the same transaction, add ``history`` to the
        ``CallHistory`` buckets (counts add up). A store that keeps no call history writes
        the statistics alone.

        ``token`` (16 random bytes, the same for every run of one batch) makes the write
        happen once: a run that finds the token stored writes nothing and returns False.
        """
        await self.upsert_call_status(rows)
        return True

    async def batch_recorded(self, token: bytes) -> bool:
        """True if a :meth:`record_calls` with ``token`` is stored."""
        raise self._unsupported("remember report batches")

    async def purge_batches(self, older_than: int, limit: int = 10_000) -> int:
        """Delete at most ``limit`` batch tokens stored before ``older_than`` (epoch
        seconds); returns how many went. Call again while it returns ``limit``."""
        raise self._unsupported("remember report batches")

    @abc.abstractmethod
    async def read_call_status(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> list[CallStatus]:
        """Read ``ServerCallStatus`` rows, sorted by key."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and threads."""

    async def __aenter__(self) -> RouteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
