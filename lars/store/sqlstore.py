"""The store operations both SQL drivers share: each checks its arguments, then has the
driver run the matching :mod:`lars.store.sql` operation in a transaction of the right kind.

A driver (SQLite, MySQL) supplies only :meth:`SqlStore._run` and its
:class:`~lars.store.sql.Dialect`. Arguments are checked before anything reaches the
database, so a bad one costs no connection and writes nothing.
"""

from __future__ import annotations

import abc
import functools
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar

from lars.core.model import (
    DRAIN_MAX_MS,
    HostKey,
    HostMeta,
    ModuleKey,
    PolicySpec,
    check_id,
    check_weight,
    check_zone,
)
from lars.errors import InvalidValue, StoreError, StoreUnavailable
from lars.store import schema, sql
from lars.store.base import (
    EXPIRE_BATCH,
    HISTORY_STEP,
    Actor,
    AlarmDecision,
    AlarmEvent,
    AlarmState,
    AuditEntry,
    CallPoint,
    CallStatus,
    HistoryRow,
    HostCalls,
    HostStatus,
    Lease,
    LeaseBatch,
    LeaseExpiry,
    LeaseGrant,
    LeaseRenewal,
    ModuleSummary,
    RouteDelta,
    RouteSnapshot,
    RouteStore,
    RouteWrite,
    StoredRule,
)

T = TypeVar("T")
log = logging.getLogger("lars.store")
#: The transaction an operation runs in: none (autocommit), a consistent read, or a write.
Txn = Literal["read", "write"] | None


class SqlStore(RouteStore):
    """A route store driven by the sans-IO operations of :mod:`lars.store.sql`."""

    dialect: sql.Dialect
    #: The number of modules at a route version, from the last overview without a search.
    _module_count: sql.ModuleCount | None = None
    #: Whether the database has the weight and zone columns, the RoutePolicy table and the
    #: lease column.
    _features: sql.RouteFeatures | None = None
    #: How :meth:`expire_leases` locks expired rows, once a server refused SKIP LOCKED
    #: (None: the dialect's :attr:`~lars.store.sql.Dialect.skip_locked`).
    _expiry_lock: str | None = None

    @abc.abstractmethod
    async def _run(self, make_op: Callable[[], sql.Op[T]], txn: Txn = None) -> T:
        """Run the operation ``make_op()`` makes (it may make it twice, to retry on a
        fresh connection) and return its result."""

    # --- schema ------------------------------------------------------------------------------

    async def init_schema(self) -> list[str]:
        return await self._run(functools.partial(sql.init_schema, self.dialect))

    async def missing_schema(self, required: Mapping[str, Collection[str]]) -> list[str]:
        return await self._run(functools.partial(schema.missing_schema, self.dialect, required))

    async def plan_upgrade(self) -> schema.UpgradePlan:
        return await self._run(functools.partial(schema.plan_upgrade, self.dialect))

    async def apply_upgrade(self, step: schema.UpgradeStep) -> None:
        await self._run(functools.partial(schema.apply_upgrade, self.dialect, step))

    async def call_status_limits(self) -> schema.ColumnLimits | None:
        return await self._run(functools.partial(schema.status_limits, self.dialect))

    # --- routes ------------------------------------------------------------------------------

    async def route_version(self) -> int:
        return await self._run(sql.route_version)

    async def load_routes(self, changes_since: int | None = None) -> RouteSnapshot:
        op = functools.partial(sql.load_routes, self.dialect, changes_since)
        snapshot, self._features = await self._run(op, "read")
        return snapshot

    async def load_changes(self, since: int) -> RouteDelta:
        if self._features is None:  # learnt by every full load (a DNS starts with one)
            self._features = await self._run(functools.partial(sql.route_features, self.dialect))
        return await self._run(functools.partial(sql.load_changes, since, self._features), "read")

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
        add, remove = add or {}, remove or {}
        sql.check_routes(add, remove)
        checked = sql.check_meta(meta) if meta is not None else None
        specs = sql.check_policies(policies) if policies is not None else None
        _check_actor(actor)
        op = functools.partial(
            sql.change_routes, self.dialect, add, remove, time.time(), actor, checked, force, specs
        )
        return await self._run(op, "write")

    async def replace_routes(
        self,
        routes: Mapping[ModuleKey, Collection[HostKey]],
        *,
        meta: Mapping[ModuleKey, Mapping[HostKey, HostMeta]] | None = None,
        actor: Actor | None = None,
        force: bool = True,
        policies: Mapping[ModuleKey, PolicySpec | None] | None = None,
    ) -> RouteWrite:
        sql.check_routes(routes)
        checked = sql.check_meta(meta) if meta is not None else None
        specs = sql.check_policies(policies) if policies is not None else None
        _check_actor(actor)
        op = functools.partial(
            sql.replace_routes, self.dialect, routes, time.time(), actor, checked, force, specs
        )
        return await self._run(op, "write")

    async def set_host_meta(
        self,
        module: ModuleKey,
        host: HostKey,
        *,
        weight: int | None = None,
        zone: str | None = None,
        actor: Actor | None = None,
    ) -> RouteWrite:
        key = sql.check_module(module)
        sql.check_routes({key: [host]})
        if weight is None and zone is None:
            raise InvalidValue("give a weight or a zone to set")
        if weight is not None:
            check_weight(weight)
        if zone is not None:
            check_zone(zone)
        _check_actor(actor)
        op = functools.partial(
            sql.set_host_meta,
            self.dialect,
            key,
            sql.check_host(key, host),
            weight,
            zone,
            time.time(),
            actor,
        )
        return await self._run(op, "write")

    async def list_route_meta(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> dict[ModuleKey, dict[HostKey, HostMeta]]:
        return await self._run(functools.partial(sql.list_route_meta, self.dialect, modid, cmdid))

    async def list_policies(self) -> dict[ModuleKey, PolicySpec]:
        return await self._run(functools.partial(sql.read_policies, self.dialect, None))

    async def get_policy(self, module: ModuleKey) -> PolicySpec | None:
        key = sql.check_module(module)
        return (await self._run(functools.partial(sql.read_policies, self.dialect, [key]))).get(key)

    async def set_policy(
        self, module: ModuleKey, spec: PolicySpec | None, *, actor: Actor | None = None
    ) -> RouteWrite:
        key = sql.check_module(module)
        if spec is not None:
            spec = sql.check_policy(spec)
        _check_actor(actor)
        op = functools.partial(sql.set_policy, self.dialect, key, spec, time.time(), actor)
        return await self._run(op, "write")

    async def list_routes(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> dict[ModuleKey, list[HostKey]]:
        return await self._run(functools.partial(sql.list_routes, modid, cmdid))

    async def purge_changes(self, older_than: float) -> int:
        return await self._run(
            functools.partial(sql.purge_changes, self.dialect, older_than), "write"
        )

    # --- self-registration and the fleet view (DESIGN §14) -----------------------------------

    async def _route_features(self, *, fresh: bool = False) -> sql.RouteFeatures:
        """What of DESIGN §13-14 the database holds (read once, then known: only ``lars db
        upgrade`` changes it; ``fresh`` reads it again)."""
        if self._features is None or fresh:
            self._features = await self._run(functools.partial(sql.route_features, self.dialect))
        return self._features

    async def _lease_features(self) -> sql.RouteFeatures:
        """The features, read again while they lack the lease column (the database may have
        been upgraded since); SchemaMissing when it still does."""
        features = await self._route_features()
        if not features.leases:
            features = await self._route_features(fresh=True)
        sql.require_leases(features, self.display_url)
        return features

    async def write_lease_batches(
        self, batches: Sequence[LeaseBatch], *, now_ms: int
    ) -> RouteWrite:
        if type(now_ms) is not int or not 0 <= now_ms <= sql.EXPIRES_MAX - DRAIN_MAX_MS:
            raise InvalidValue(f"now_ms must be unix milliseconds, got {now_ms!r}")
        checked = []
        for batch in batches:
            if not isinstance(batch, LeaseBatch):
                raise InvalidValue(f"{batch!r:.80} is not a LeaseBatch")
            if not isinstance(batch.actor, Actor):
                raise InvalidValue(f"actor must be an Actor, got {batch.actor!r}")
            grants, drops = sql.check_grants(batch.grants), sql.check_drops(batch.drops)
            if grants or drops:
                checked.append(LeaseBatch(batch.actor, grants, drops))
        if not checked:
            return RouteWrite(None)
        await self._lease_features()
        op = functools.partial(sql.write_lease_batches, self.dialect, checked, now_ms, time.time())
        return await self._run(op, "write")

    async def renew_leases(self, grants: Sequence[LeaseGrant], *, actor: Actor) -> LeaseRenewal:
        checked = sql.check_grants(grants)
        _check_actor(actor)
        if not checked:
            return LeaseRenewal(0)
        await self._lease_features()
        missing = await self._run(
            functools.partial(sql.renew_leases, self.dialect, checked), "write"
        )
        write = RouteWrite(None)
        if missing:
            op = functools.partial(
                sql.write_leases, self.dialect, missing, (), 0, time.time(), actor
            )
            write = await self._run(op, "write")
        return LeaseRenewal(len({g.key for g in checked}) - len(missing), len(missing), write)

    async def expire_leases(
        self, now_ms: int, *, actor: Actor, limit: int = EXPIRE_BATCH
    ) -> LeaseExpiry:
        if type(now_ms) is not int or now_ms < 0:
            raise InvalidValue(f"now_ms must be unix milliseconds, got {now_ms!r}")
        if type(limit) is not int or not 1 <= limit <= sql.INSERT_CHUNK * 10:
            raise InvalidValue(f"limit must be 1 to {sql.INSERT_CHUNK * 10}, got {limit!r}")
        _check_actor(actor)
        if not (await self._route_features()).leases:
            return LeaseExpiry(RouteWrite(None))
        if not await self._run(functools.partial(sql.lease_due, now_ms)):
            return LeaseExpiry(RouteWrite(None))
        lock = self.dialect.skip_locked if self._expiry_lock is None else self._expiry_lock
        op = functools.partial(
            sql.expire_leases, self.dialect, now_ms, limit, time.time(), actor, lock
        )
        try:
            return await self._run(op, "write")
        except StoreError as exc:
            if not lock or isinstance(exc, StoreUnavailable) or "SKIP" not in str(exc).upper():
                raise
        # A server without SKIP LOCKED (MariaDB before 10.6, MySQL 5.7): plain row locks,
        # which only wait for a renewal in flight (the RouteVersion lock orders sweepers).
        log.warning("%s has no SKIP LOCKED: expired leases are locked FOR UPDATE", self.display_url)
        self._expiry_lock = self.dialect.for_update
        op = functools.partial(
            sql.expire_leases, self.dialect, now_ms, limit, time.time(), actor, self._expiry_lock
        )
        return await self._run(op, "write")

    async def demoted_hosts(
        self, since: int, *, callers: int, share: float
    ) -> dict[ModuleKey, frozenset[HostKey]]:
        start = sql.check_epoch(since, "since")
        if type(callers) is not int or callers < 1:
            raise InvalidValue(f"callers must be a positive integer, got {callers!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise InvalidValue(f"share must be a number from 0 to 1, got {share!r}")
        op = functools.partial(sql.demoted_hosts, start, callers, float(share))
        return await self._run(op, "read")

    async def lease_expiries(self, module: ModuleKey) -> dict[HostKey, int]:
        key = sql.check_module(module)
        if not (await self._route_features()).leases:
            return {}
        return await self._run(functools.partial(sql.lease_expiries, key))

    # --- call statistics ---------------------------------------------------------------------

    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        if rows:
            await self._run(functools.partial(sql.upsert_call_status, self.dialect, rows), "write")

    async def record_calls(
        self,
        rows: Sequence[CallStatus],
        history: Sequence[HistoryRow],
        token: bytes | None = None,
    ) -> bool:
        if token is not None:
            sql.check_token(token)
        elif not (rows or history):
            return True
        op = functools.partial(
            sql.upsert_call_status, self.dialect, rows, history, token, int(time.time())
        )
        return await self._run(op, "write")

    async def batch_recorded(self, token: bytes) -> bool:
        return await self._run(functools.partial(sql.batch_recorded, sql.check_token(token)))

    async def purge_batches(self, older_than: int, limit: int = 10_000) -> int:
        before = sql.check_epoch(older_than, "older_than")
        if type(limit) is not int or limit < 1:
            raise InvalidValue(f"limit must be a positive integer, got {limit!r}")
        return await self._run(
            functools.partial(sql.purge_batches, self.dialect, before, limit), "write"
        )

    async def read_call_status(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> list[CallStatus]:
        return await self._run(functools.partial(sql.read_call_status, modid, cmdid))

    # --- the console -------------------------------------------------------------------------

    async def list_audit(
        self,
        *,
        module: ModuleKey | None = None,
        actor: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        if module is not None:
            module = sql.check_module(module)
        if actor is not None and type(actor) is not str:
            raise InvalidValue(f"actor must be text, got {actor!r}")
        sql.check_limit(limit)
        if before_id is not None and (type(before_id) is not int or before_id < 0):
            raise InvalidValue(f"before_id must be an integer of 0 or more, got {before_id!r}")
        op = functools.partial(sql.list_audit, self.dialect, module, actor, limit, before_id)
        return await self._run(op)

    async def recent_changes(self, limit: int = 50) -> list[tuple[int, int, int]]:
        sql.check_limit(limit)
        return await self._run(functools.partial(sql.recent_changes, limit))

    async def module_overview(
        self, *, search: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[ModuleSummary]]:
        sql.module_filter(search)  # checks it
        sql.check_page(offset, limit)
        op = functools.partial(sql.module_overview, search, offset, limit, self._module_count)
        total, page, counted = await self._run(op, "read")
        if counted is not None:
            self._module_count = counted
        return total, page

    async def module_detail(self, modid: int, cmdid: int) -> list[HostStatus] | None:
        module = sql.check_module((modid, cmdid))
        return await self._run(functools.partial(sql.module_detail, *module), "read")

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
        if module is not None:
            module = sql.check_module(module)
        if caller is not None:
            check_id(caller, "caller")
        for name, flag in (("overloaded", overloaded), ("descending", descending)):
            if flag is not None and type(flag) is not bool:
                raise InvalidValue(f"{name} must be true or false, got {flag!r}")
        sql.check_sort(sort)
        sql.check_page(offset, limit)
        op = functools.partial(
            sql.call_status, module, caller, overloaded, sort, descending, offset, limit
        )
        return await self._run(op, "read")

    async def list_names(self, kind: str) -> dict[int, str]:
        sql.check_name_kind(kind)
        return await self._run(functools.partial(sql.list_names, kind))

    async def set_name(self, kind: str, ident: int, content: str) -> None:
        sql.check_name_kind(kind)
        check_id(ident, f"{kind}id")
        text = sql.check_name(content)
        await self._run(functools.partial(sql.set_name, self.dialect, kind, ident, text), "write")

    async def delete_name(self, kind: str, ident: int) -> bool:
        sql.check_name_kind(kind)
        check_id(ident, f"{kind}id")
        return await self._run(functools.partial(sql.delete_name, kind, ident), "write")

    # --- call history and alarms -------------------------------------------------------------

    async def call_history(
        self, module: ModuleKey, since: int, until: int, step: int = HISTORY_STEP
    ) -> dict[HostKey, list[CallPoint]]:
        key = sql.check_module(module)
        start, end = sql.check_span(since, until)
        every = sql.check_step(step)
        op = functools.partial(sql.call_history, self.dialect, key, start, end, every)
        return await self._run(op)

    async def module_sparklines(
        self, modules: Collection[ModuleKey], since: int, step: int = HISTORY_STEP
    ) -> dict[ModuleKey, list[CallPoint]]:
        keys = sql.check_modules(modules)
        start = sql.check_epoch(since, "since")
        op = functools.partial(
            sql.module_sparklines, self.dialect, keys, start, sql.check_step(step)
        )
        return await self._run(op)

    async def window_calls(self, since: int) -> list[HostCalls]:
        start = sql.check_epoch(since, "since")
        return await self._run(functools.partial(sql.window_calls, self.dialect, start))

    async def purge_history(self, older_than: int, limit: int = 10_000) -> int:
        before = sql.check_epoch(older_than, "older_than")
        if type(limit) is not int or limit < 1:
            raise InvalidValue(f"limit must be a positive integer, got {limit!r}")
        op = functools.partial(sql.purge_history, self.dialect, before, limit)
        return await self._run(op, "write")

    async def overloaded_status(self, since: int) -> list[CallStatus]:
        start = sql.check_epoch(since, "since")
        return await self._run(functools.partial(sql.overloaded_status, start))

    async def caller_last_reports(self) -> dict[int, int]:
        return await self._run(sql.caller_last_reports)

    async def list_alarm_rules(self) -> list[StoredRule]:
        return await self._run(sql.list_alarm_rules)

    async def put_alarm_rule(self, name: str, definition: Mapping[str, Any], actor: Actor) -> None:
        sql.check_rule_name(name)
        text = sql.rule_json(definition)
        if not isinstance(actor, Actor):
            raise InvalidValue(f"actor must be an Actor, got {actor!r}")
        op = functools.partial(sql.put_alarm_rule, name, text, time.time(), actor.name)
        await self._run(op, "write")

    async def delete_alarm_rule(self, name: str) -> bool:
        sql.check_rule_name(name)
        return await self._run(functools.partial(sql.delete_alarm_rule, name), "write")

    async def alarm_round(
        self,
        holder: str,
        ttl: float,
        decide: Callable[[list[AlarmState]], AlarmDecision],
    ) -> AlarmDecision | None:
        sql.check_holder(holder)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
            raise InvalidValue(f"ttl must be a positive number of seconds, got {ttl!r}")
        if not callable(decide):
            raise InvalidValue(f"decide must be a function, got {decide!r}")
        op = functools.partial(sql.alarm_round, self.dialect, holder, float(ttl), decide)
        return await self._run(op, "write")

    async def release_lease(self, holder: str) -> None:
        sql.check_holder(holder)
        await self._run(functools.partial(sql.release_lease, holder), "write")

    async def alarm_lease(self) -> Lease | None:
        return await self._run(sql.alarm_lease)

    async def list_alarm_states(self, *, firing: bool | None = None) -> list[AlarmState]:
        if firing is not None and type(firing) is not bool:
            raise InvalidValue(f"firing must be true, false or None, got {firing!r}")
        return await self._run(functools.partial(sql.list_alarm_states, firing))

    async def list_alarm_events(
        self, *, rule: str | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[AlarmEvent]:
        if rule is not None:
            sql.check_rule_name(rule)
        sql.check_limit(limit)
        if before_id is not None and (type(before_id) is not int or before_id < 0):
            raise InvalidValue(f"before_id must be an integer of 0 or more, got {before_id!r}")
        return await self._run(functools.partial(sql.list_alarm_events, rule, limit, before_id))

    async def purge_alarms(self, older_than: float) -> int:
        if (
            isinstance(older_than, bool)
            or not isinstance(older_than, int | float)
            or not math.isfinite(older_than)
        ):
            raise InvalidValue(f"older_than must be epoch seconds, got {older_than!r}")
        return await self._run(functools.partial(sql.purge_alarms, float(older_than)), "write")


def _check_actor(actor: object) -> None:
    if actor is not None and not isinstance(actor, Actor):
        raise InvalidValue(f"actor must be an Actor, got {actor!r}")
