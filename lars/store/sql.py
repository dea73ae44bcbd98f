"""Store logic shared by the SQL drivers, written once as sans-IO generators.

Each operation is a generator that yields ``(sql, args)`` queries and receives a
:class:`Result` for each; its return value is the operation's result. The SQLite driver runs
it synchronously in a worker thread, the MySQL driver with awaits on trio-mysql; neither
contains any route logic. SQL is written with ``?`` placeholders; :class:`Dialect` holds the
few statements that differ between the two databases.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from lars.core.model import (
    DEFAULT_WEIGHT,
    DRAIN_MAX_MS,
    PORT_MAX,
    UINT32_MAX,
    WEIGHT_MAX,
    HostKey,
    HostMeta,
    ModuleKey,
    PolicySpec,
    check_id,
    format_host,
    host_key,
    ip_to_int,
    parse_module,
)
from lars.errors import InvalidValue, SchemaMissing, ShrinkRefused
from lars.store.base import (
    ALARM_NAME_MAX,
    ALARM_RULE_MAX_BYTES,
    ALARM_SUBJECT_MAX,
    CALL_STATUS_SORTS,
    HISTORY_STEP,
    NAME_KINDS,
    NAME_MAX,
    PAGE_MAX,
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
    LeaseDrop,
    LeaseExpiry,
    LeaseGrant,
    MetaMap,
    ModuleSummary,
    PolicyMap,
    RouteDelta,
    RouteMap,
    RouteSnapshot,
    RouteWrite,
    StoredRule,
)

log = logging.getLogger("lars.store")

Query = tuple[str, tuple[Any, ...]]
T = TypeVar("T")


@attrs.frozen
class Result:
    """What a query returned: its rows (empty for DML) and the affected row count."""

    rows: list[tuple[Any, ...]]
    rowcount: int = 0
    #: The id an INSERT into a table with an auto-increment key gave its (first) row.
    lastrowid: int | None = None


#: An operation: yields queries, receives results, returns T.
Op = Generator[Query, Result, T]

#: Rows per multi-row INSERT (SQLite allows 32766 variables; MySQL statements stay small).
INSERT_CHUNK = 500
#: Largest value of a signed INT column (ServerCallStatus.succ_cnt/err_cnt).
INT_MAX = 2**31 - 1
#: What a SQLite integer holds, whatever its declared type.
INT64_RANGE = (-(2**63), 2**63 - 1)

#: The statistics table, and its columns in the order of :func:`status_values`.
STATUS_TABLE = "ServerCallStatus"
STATUS_COLUMNS = (
    "modid",
    "cmdid",
    "ip",
    "port",
    "caller",
    "succ_cnt",
    "err_cnt",
    "ts",
    "overload",
    "succ_total",
    "err_total",
)
_STATUS_COLUMNS = ", ".join(STATUS_COLUMNS)

#: Bytes of each MySQL integer type.
_INTEGER_BYTES = {"tinyint": 1, "smallint": 2, "mediumint": 3, "int": 4, "integer": 4, "bigint": 8}
_INTEGER_TYPE = re.compile(
    r"(tinyint|smallint|mediumint|integer|int|bigint)\b(?:\s*\(\s*\d+\s*\))?(\s+unsigned)?",
    re.IGNORECASE,
)


def integer_range(declared: str, *, sized: bool = True) -> tuple[int, int] | None:
    """The values a column of an integer type holds, from its declared type (``int(11)``,
    ``int(10) unsigned NOT NULL``, ``BIGINT``); None for a type that is not an integer.

    Without ``sized`` (SQLite), every type with "INT" in its name holds a signed 64-bit
    integer, whatever width it declares.
    """
    if not sized:
        return INT64_RANGE if "INT" in declared.upper() else None
    match = _INTEGER_TYPE.match(declared.strip())
    if match is None:
        return None
    bits = 8 * _INTEGER_BYTES[match.group(1).lower()]
    if match.group(2):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def type_name(definition: str) -> str:
    """The type part of a column definition: ``int(10) unsigned`` of ``int(10) unsigned NOT
    NULL``."""
    match = _INTEGER_TYPE.match(definition.strip())
    return match.group(0) if match else definition.split()[0]


@attrs.frozen
class Dialect:
    """The statements that differ between SQLite and MySQL."""

    name: str
    schema: str
    lock_version: str
    list_tables: str
    #: Rows ``(name, declared type)`` of a table's columns, in table order.
    list_columns: str
    #: Rows ``(index name, non-unique, column)`` of a table's indexes, columns in key order.
    list_indexes: str
    #: Adds a key: formatted with ``table``, ``name``, ``unique`` and ``columns``.
    add_key: str
    upsert_status_suffix: str
    purge_changes: str
    #: Makes a multi-row INSERT into CallHistory add its counts to the rows already there.
    upsert_history_suffix: str
    #: Deletes at most ``?`` (the second argument) CallHistory rows of minutes before ``?``.
    purge_history: str
    #: Inserts the ReportBatch row ``(token, written)`` unless the token is there already.
    claim_batch: str
    #: Deletes at most ``?`` (the second argument) ReportBatch rows written before ``?``.
    purge_batches: str
    #: Reads the database's clock: one row, epoch seconds with a fraction.
    clock: str
    #: Creates the ``AlarmLease`` row named ``?`` if missing, and locks it either way.
    lock_lease: str
    #: Appended to a SELECT that reads rows the transaction then writes (``FOR UPDATE``).
    for_update: str
    #: The aggregate that sums counts without failing past 64 bits (SQLite's SUM does).
    total: str
    #: False when integer columns hold 64 bits whatever their declared width (SQLite).
    sized_integers: bool = True
    #: Makes this session refuse (not clamp) values a column cannot hold.
    strict_session: str | None = None
    #: Write the integers of a ServerCallStatus batch into the statement: what the MySQL
    #: driver would send anyway, without its escaping of every value in Python (SQLite binds
    #: parameters natively, and checks that they fit 64 bits).
    inline_integers: bool = False
    #: Appended to the SELECT of expired leases: lock them, skipping rows another
    #: transaction holds (a renewal in flight). SQLite: nothing (its writer lock).
    skip_locked: str = ""
    #: The larger of two values (``GREATEST``; SQLite's two-argument ``MAX``).
    greatest: str = "GREATEST"

    def integer_range(self, declared: str) -> tuple[int, int] | None:
        """:func:`integer_range` of a declared type in this database."""
        return integer_range(declared, sized=self.sized_integers)


@attrs.frozen
class KeyDef:
    """A key (an index) of a schema's table."""

    name: str
    columns: tuple[str, ...]
    unique: bool
    #: Declared inside the ``CREATE TABLE`` (MySQL), rather than by ``CREATE INDEX``.
    inline: bool


@attrs.frozen
class TableDef:
    """A ``CREATE TABLE`` statement of a schema, the definition of each of its columns and its
    keys (besides the primary key)."""

    name: str
    create: str
    columns: tuple[tuple[str, str], ...]
    keys: tuple[KeyDef, ...] = ()


_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS [`\"]?(\w+)[`\"]?", re.IGNORECASE)
_CREATE_INDEX = re.compile(
    r"CREATE (UNIQUE )?INDEX IF NOT EXISTS [`\"]?(\w+)[`\"]? ON [`\"]?(\w+)[`\"]?\s*\(([^)]*)\)",
    re.IGNORECASE,
)
_COLUMN = re.compile(r"^\s*[`\"]?(\w+)[`\"]?\s+(\w.*?),?\s*$")
_KEY = re.compile(r"^\s*(UNIQUE\s+)?(?:KEY|INDEX)\s+[`\"]?(\w+)[`\"]?\s*\(([^)]*)\)", re.IGNORECASE)
_NOT_COLUMN = ("PRIMARY", "KEY", "UNIQUE", "INDEX", "CONSTRAINT", "FOREIGN")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip().strip('`"') for name in text.split(","))


def split_statements(schema: str) -> list[str]:
    """Split a schema script into statements, dropping ``--`` comments."""
    lines = [line for line in schema.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def parse_tables(schema: str) -> list[TableDef]:
    """The tables of a schema script, with their column definitions and keys, in script
    order."""
    tables: dict[str, TableDef] = {}
    for stmt in split_statements(schema):
        index = _CREATE_INDEX.match(stmt)
        if index and index.group(3) in tables:
            unique, name, table, columns = index.groups()
            key = KeyDef(name, _names(columns), unique=bool(unique), inline=False)
            tables[table] = attrs.evolve(tables[table], keys=(*tables[table].keys, key))
            continue
        match = _CREATE_TABLE.match(stmt)
        if not match:
            continue
        body = stmt[stmt.index("(") + 1 : stmt.rindex(")")]
        cols = []
        keys = []
        for line in body.splitlines():
            if key_match := _KEY.match(line):
                unique, name, columns = key_match.groups()
                keys.append(KeyDef(name, _names(columns), unique=bool(unique), inline=True))
                continue
            col = _COLUMN.match(line)
            if col and col.group(1).upper() not in _NOT_COLUMN:
                cols.append((col.group(1), col.group(2)))
        tables[match.group(1)] = TableDef(match.group(1), stmt, tuple(cols), tuple(keys))
    return list(tables.values())


def other_statements(schema: str) -> list[str]:
    """The statements of a schema script that are not ``CREATE TABLE`` or ``INSERT``."""
    return [
        s
        for s in split_statements(schema)
        if not _CREATE_TABLE.match(s) and not s.upper().startswith("INSERT")
    ]


def _chunks(items: Sequence[T], size: int = INSERT_CHUNK) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _values_sql(ncols: int, nrows: int) -> str:
    row = "(" + ", ".join("?" * ncols) + ")"
    return ", ".join([row] * nrows)


# --- operations ------------------------------------------------------------------------------


def init_schema(dialect: Dialect) -> Op[list[str]]:
    """Create missing tables, append missing columns (with the plain keys on them alone,
    such as RouteData's ``idx_lease``), ensure the RouteVersion row. Other keys of existing
    tables are ``lars db upgrade``'s."""
    done: list[str] = []
    existing = {row[0] for row in (yield (dialect.list_tables, ())).rows}
    for table in parse_tables(dialect.schema):
        if table.name not in existing:
            yield (table.create, ())
            done.append(f"created table {table.name}")
            continue
        have = {row[0] for row in (yield (dialect.list_columns, (table.name,))).rows}
        appended = set()
        for column, definition in table.columns:
            if column not in have:
                yield (f"ALTER TABLE {table.name} ADD COLUMN {column} {definition}", ())
                done.append(f"added column {table.name}.{column}")
                appended.add(column)
        for key in table.keys:
            if key.inline and not key.unique and appended.issuperset(key.columns):
                columns = ", ".join(key.columns)
                yield (
                    dialect.add_key.format(
                        table=table.name, name=key.name, unique="", columns=columns
                    ),
                    (),
                )
                done.append(f"added key {table.name}.{key.name} ({columns})")
    for stmt in other_statements(dialect.schema):
        yield (stmt, ())
    if not (yield ("SELECT COUNT(*) FROM RouteVersion", ())).rows[0][0]:
        yield ("INSERT INTO RouteVersion (id, version) VALUES (1, 0)", ())
        done.append("created the RouteVersion row")
    return done


def route_version() -> Op[int]:
    """Read ``RouteVersion.version`` (0 when the row is missing)."""
    rows = (yield ("SELECT version FROM RouteVersion WHERE id = 1", ())).rows
    return int(rows[0][0]) if rows else 0


@attrs.frozen
class RouteFeatures:
    """What of DESIGN §13 a database holds: RouteData's ``weight`` and ``zone`` columns, the
    RoutePolicy table (an original database, or one not upgraded, has neither: its routes
    load with the defaults)."""

    meta: bool
    policy: bool
    #: RouteData's ``lease_expires`` column (DESIGN §14): self-registered hosts.
    leases: bool = False


#: RouteData's columns of the original schema, and with weight and zone.
_ROUTE_SELECT = "SELECT modid, cmdid, serverip, serverport FROM RouteData"
_META_SELECT = "SELECT modid, cmdid, serverip, serverport, weight, zone FROM RouteData"
#: RoutePolicy's columns besides the module, in PolicySpec's order.
POLICY_COLUMNS = ("policy", "zone_affinity", "zone_failover", "panic_threshold", "slow_start")
_POLICY_SELECT = f"SELECT modid, cmdid, {', '.join(POLICY_COLUMNS)} FROM RoutePolicy"


def route_features(dialect: Dialect) -> Op[RouteFeatures]:
    """Read which of the weight and zone columns and the RoutePolicy table exist."""
    tables = {str(_text(row[0])).lower() for row in (yield (dialect.list_tables, ())).rows}
    columns = {
        str(_text(row[0])).lower() for row in (yield (dialect.list_columns, ("RouteData",))).rows
    }
    return RouteFeatures(
        {"weight", "zone"} <= columns, "routepolicy" in tables, "lease_expires" in columns
    )


def _route_rows(rows: list[tuple[Any, ...]]) -> tuple[RouteMap, MetaMap]:
    """Routes from RouteData rows (``modid, cmdid, serverip, serverport`` and optionally
    ``weight, zone``), and the hosts whose weight or zone is not the default."""
    routes: dict[ModuleKey, set[HostKey]] = {}
    meta: MetaMap = {}
    skipped = 0
    for row in rows:
        modid, cmdid, ip, port = row[:4]
        if not (0 <= ip <= UINT32_MAX and 1 <= port <= PORT_MAX):
            skipped += 1
            continue
        routes.setdefault((modid, cmdid), set()).add((ip, port))
        if len(row) > 4:
            weight, zone = min(int(row[4]), WEIGHT_MAX), _text(row[5])
            if weight != DEFAULT_WEIGHT or zone:
                meta.setdefault((modid, cmdid), {})[ip, port] = HostMeta(weight, zone)
    if skipped:
        log.warning("skipped %d RouteData rows with an invalid ip or port", skipped)
    return {module: frozenset(hosts) for module, hosts in routes.items()}, meta


def policy_from_row(row: Sequence[Any]) -> PolicySpec:
    """A PolicySpec from RoutePolicy's POLICY_COLUMNS values (InvalidValue if out of range)."""
    policy, affinity, failover, panic, slow = row
    return PolicySpec(
        _text(policy), bool(int(affinity)), float(failover), float(panic), float(slow)
    ).check()


def _policy_rows(rows: list[tuple[Any, ...]]) -> PolicyMap:
    policies: PolicyMap = {}
    for modid, cmdid, *values in rows:
        try:
            policies[int(modid), int(cmdid)] = policy_from_row(values)
        except (InvalidValue, ValueError, TypeError) as exc:
            log.warning("RoutePolicy of %s/%s ignored (the default applies): %s", modid, cmdid, exc)
    return policies


def load_routes(
    dialect: Dialect, changes_since: int | None
) -> Op[tuple[RouteSnapshot, RouteFeatures]]:
    """Read the version, every route with its weights, zones and policies, and the modules
    changed after ``changes_since``; and what of DESIGN §13 the database holds."""
    features = yield from route_features(dialect)
    version = yield from route_version()
    rows = (yield (_META_SELECT if features.meta else _ROUTE_SELECT, ())).rows
    routes, meta = _route_rows(rows)
    policies = _policy_rows((yield (_POLICY_SELECT, ())).rows) if features.policy else {}
    changed: frozenset[ModuleKey] = frozenset()
    if changes_since is not None:
        result = yield (
            "SELECT DISTINCT modid, cmdid FROM RouteChange WHERE version > ?",
            (changes_since,),
        )
        changed = frozenset((int(m), int(c)) for m, c in result.rows)
    return RouteSnapshot(version, routes, changed, meta, policies), features


def _modules_clause(chunk: Sequence[ModuleKey]) -> tuple[str, tuple[int, ...]]:
    where = " OR ".join(["(modid = ? AND cmdid = ?)"] * len(chunk))
    return where, tuple(v for module in chunk for v in module)


def load_changes(since: int, features: RouteFeatures) -> Op[RouteDelta]:
    """Read the version, the modules changed after ``since`` and those modules' routes,
    weights, zones and policies."""
    version = yield from route_version()
    result = yield ("SELECT DISTINCT modid, cmdid FROM RouteChange WHERE version > ?", (since,))
    changed = sorted((int(m), int(c)) for m, c in result.rows)
    rows: list[tuple[Any, ...]] = []
    policy_rows: list[tuple[Any, ...]] = []
    select = _META_SELECT if features.meta else _ROUTE_SELECT
    for chunk in _chunks(changed):
        where, flat = _modules_clause(chunk)
        rows += (yield (f"{select} WHERE {where}", flat)).rows
        if features.policy:
            policy_rows += (yield (f"{_POLICY_SELECT} WHERE {where}", flat)).rows
    routes, meta = _route_rows(rows)
    return RouteDelta(version, frozenset(changed), routes, meta, _policy_rows(policy_rows))


#: Modules above which a write reads every route in one scan rather than module by module.
_SCAN_ABOVE = 50
#: RouteAudit's columns, in the order of the rows :func:`change_routes` writes.
AUDIT_COLUMNS = ("ts", "actor", "source", "modid", "cmdid", "added", "removed", "version")
#: Audit rows per INSERT: each holds two host lists, which may be long.
_AUDIT_CHUNK = 100


def _as_module(value: object) -> ModuleKey:
    if not (isinstance(value, tuple) and len(value) == 2):
        raise InvalidValue(f"a module must be a (modid, cmdid) pair, got {value!r}")
    return parse_module(*value)


def _as_host(module: ModuleKey, value: object) -> HostKey:
    if not (isinstance(value, tuple) and len(value) == 2):
        raise InvalidValue(
            f"module {module[0]}/{module[1]}: a host must be an (ip, port) pair, got {value!r}"
        )
    try:
        return host_key(*value)
    except InvalidValue as exc:
        raise InvalidValue(f"module {module[0]}/{module[1]}: {exc}") from None


def check_host(module: ModuleKey, host: object) -> HostKey:
    """A host of ``module``, validated (:class:`InvalidValue` naming the module)."""
    return _as_host(module, host)


def check_routes(
    add: Mapping[ModuleKey, Collection[HostKey]],
    remove: Mapping[ModuleKey, Collection[HostKey] | None] | None = None,
) -> None:
    """Raise :class:`InvalidValue` naming the first module id or host out of range (before
    a write, so that a bad value writes nothing)."""
    for mapping in (add, remove or {}):
        for module, hosts in mapping.items():
            key = _as_module(module)
            for host in hosts or ():
                _as_host(key, host)


def _lock_version(dialect: Dialect) -> Op[int]:
    """Lock the RouteVersion row (creating it if missing) and return its version."""
    rows = (yield (dialect.lock_version, ())).rows
    if rows:
        return int(rows[0][0])
    yield ("INSERT INTO RouteVersion (id, version) VALUES (1, 0)", ())
    return 0


def _all_hosts() -> Op[dict[ModuleKey, set[HostKey]]]:
    current: dict[ModuleKey, set[HostKey]] = {}
    rows = (yield ("SELECT modid, cmdid, serverip, serverport FROM RouteData", ())).rows
    for modid, cmdid, ip, port in rows:
        current.setdefault((int(modid), int(cmdid)), set()).add((int(ip), int(port)))
    return current


def _hosts_of(modules: Sequence[ModuleKey]) -> Op[dict[ModuleKey, set[HostKey]]]:
    if len(modules) > _SCAN_ABOVE:  # one scan beats thousands of lookups
        everything = yield from _all_hosts()
        return {module: everything.get(module, set()) for module in modules}
    current = {}
    for module in modules:
        rows = (
            yield (
                "SELECT serverip, serverport FROM RouteData WHERE modid = ? AND cmdid = ?",
                module,
            )
        ).rows
        current[module] = {(int(ip), int(port)) for ip, port in rows}
    return current


@attrs.frozen
class _ModuleChange:
    """What a write does to one module: the hosts it had, those it adds (with their weight
    and zone) and removes, and the kept hosts whose weight or zone changes."""

    had: frozenset[HostKey]
    added: frozenset[HostKey]
    removed: frozenset[HostKey]
    #: Weight and zone of the added hosts that do not take the defaults.
    added_meta: Mapping[HostKey, HostMeta] = attrs.field(factory=dict)
    #: ``host -> (old, new)`` of kept hosts whose weight or zone changes.
    updated: Mapping[HostKey, tuple[HostMeta, HostMeta]] = attrs.field(factory=dict)
    #: ``(old, new)`` when the module's own policy changes (None: it has none).
    policy: tuple[PolicySpec | None, PolicySpec | None] | None = None

    @property
    def changes(self) -> bool:
        return bool(self.added or self.removed or self.updated or self.policy)


#: Per module, the weight and zone a write gives some of its hosts.
MetaWrite = Mapping[ModuleKey, Mapping[HostKey, HostMeta]]
#: Per module, the policy a write gives it (None: remove its own).
PolicyWrite = Mapping[ModuleKey, PolicySpec | None]


def check_policies(policies: object) -> dict[ModuleKey, PolicySpec | None]:
    """``policies`` checked: :class:`InvalidValue` naming the first bad module or value."""
    if not isinstance(policies, Mapping):
        raise InvalidValue(f"policies must map modules to PolicySpec, got {policies!r:.80}")
    checked: dict[ModuleKey, PolicySpec | None] = {}
    for module, spec in policies.items():
        key = _as_module(module)
        checked[key] = None if spec is None else check_policy(spec, key)
    return checked


def check_policy(spec: object, module: ModuleKey | None = None) -> PolicySpec:
    """A valid PolicySpec with float parameters (:class:`InvalidValue` otherwise)."""
    where = f"module {module[0]}/{module[1]}: " if module else ""
    if not isinstance(spec, PolicySpec):
        raise InvalidValue(f"{where}a policy must be a PolicySpec, got {spec!r:.80}")
    try:
        spec = PolicySpec(*spec).check()
    except InvalidValue as exc:
        raise InvalidValue(f"{where}{exc}") from None
    return spec._replace(
        zone_failover=float(spec.zone_failover),
        panic_threshold=float(spec.panic_threshold),
        slow_start=float(spec.slow_start),
    )


def check_meta(meta: object) -> dict[ModuleKey, dict[HostKey, HostMeta]]:
    """``meta`` checked (module ids, hosts, weights and zones): :class:`InvalidValue` naming
    the first bad value."""
    from lars.core.model import check_weight, check_zone

    if not isinstance(meta, Mapping):
        raise InvalidValue(f"meta must map modules to hosts, got {meta!r:.80}")
    checked: dict[ModuleKey, dict[HostKey, HostMeta]] = {}
    for module, hosts in meta.items():
        key = _as_module(module)
        if not isinstance(hosts, Mapping):
            raise InvalidValue(f"module {key[0]}/{key[1]}: meta must map hosts to HostMeta")
        for host, value in hosts.items():
            host_ = _as_host(key, host)
            if not isinstance(value, HostMeta):
                raise InvalidValue(f"module {key[0]}/{key[1]}: {value!r:.80} is not a HostMeta")
            try:
                value = HostMeta(check_weight(value.weight), check_zone(value.zone))
            except InvalidValue as exc:
                raise InvalidValue(
                    f"module {key[0]}/{key[1]} host {format_host(host_)}: {exc}"
                ) from None
            checked.setdefault(key, {})[host_] = value
    return checked


def _meta_of(modules: Sequence[ModuleKey]) -> Op[dict[ModuleKey, dict[HostKey, HostMeta]]]:
    """The weight and zone of every host of ``modules``."""
    current: dict[ModuleKey, dict[HostKey, HostMeta]] = {}
    for module in modules:
        rows = (
            yield (
                "SELECT serverip, serverport, weight, zone FROM RouteData"
                " WHERE modid = ? AND cmdid = ?",
                module,
            )
        ).rows
        current[module] = {
            (int(ip), int(port)): HostMeta(int(weight), _text(zone))
            for ip, port, weight, zone in rows
        }
    return current


def _module_change(
    module: ModuleKey,
    had: set[HostKey],
    adding: set[HostKey],
    gone: set[HostKey],
    meta: Mapping[HostKey, HostMeta] | None,
    old_meta: Mapping[HostKey, HostMeta],
    *,
    strict: bool = True,
) -> _ModuleChange:
    """One module's change; ``meta`` gives hosts added or kept their weight and zone (a host
    neither there nor added is :class:`InvalidValue` when ``strict``)."""
    added = adding - had
    removed = gone - adding
    kept = had - removed
    added_meta: dict[HostKey, HostMeta] = {}
    updated: dict[HostKey, tuple[HostMeta, HostMeta]] = {}
    for host, value in (meta or {}).items():
        if host in added:
            if value != HostMeta():
                added_meta[host] = value
        elif host in kept:
            old = old_meta.get(host, HostMeta())
            if old != value:
                updated[host] = (old, value)
        elif strict:
            raise InvalidValue(
                f"module {module[0]}/{module[1]}: {format_host(host)} is not in its route"
            )
    return _ModuleChange(frozenset(had), frozenset(added), frozenset(removed), added_meta, updated)


def change_routes(
    dialect: Dialect,
    add: Mapping[ModuleKey, Collection[HostKey]],
    remove: Mapping[ModuleKey, Collection[HostKey] | None],
    now: float,
    actor: Actor | None = None,
    meta: MetaWrite | None = None,
    force: bool = True,
    policies: PolicyWrite | None = None,
) -> Op[RouteWrite]:
    """Apply adds and removes (a host both removed and added stays), the weights and zones
    of ``meta`` (hosts added or kept) and the modules' ``policies``; on any change raise the
    version once and log RouteChange rows, and RouteAudit rows when an ``actor`` is given.
    Without ``force``, a write removing more than half of a module's hosts is
    :class:`ShrinkRefused`.

    The first statement locks the RouteVersion row, which serialises every route writer:
    versions rise in commit order and two writers never both insert the same host.
    """
    old_version = yield from _lock_version(dialect)
    meta = meta or {}
    policies = policies or {}
    modules = sorted(set(add) | set(remove) | set(meta) | set(policies))
    current = yield from _hosts_of(modules)
    yield from _pin_static(dialect, add, current)
    old_meta = yield from _meta_of([m for m in modules if meta.get(m)])
    old_policies = (yield from get_policies(sorted(policies))) if policies else {}
    changes = {}
    for module in modules:
        had = current[module]
        gone: set[HostKey] = set()
        if module in remove:
            wanted = remove[module]
            gone = set(had) if wanted is None else had & set(wanted)
        change = _module_change(
            module, had, set(add.get(module, ())), gone, meta.get(module), old_meta.get(module, {})
        )
        if module in policies and old_policies.get(module) != policies[module]:
            change = attrs.evolve(change, policy=(old_policies.get(module), policies[module]))
        changes[module] = change
    return (yield from _write_changes(changes, old_version, now, actor, force))


def replace_routes(
    dialect: Dialect,
    routes: Mapping[ModuleKey, Collection[HostKey]],
    now: float,
    actor: Actor | None = None,
    meta: MetaWrite | None = None,
    force: bool = True,
    policies: PolicyWrite | None = None,
) -> Op[RouteWrite]:
    """Make RouteData exactly ``routes`` (other modules lose every host), logged as
    :func:`change_routes` logs its writes. With ``meta``, the weights and zones become
    exactly its (a host it omits takes the defaults); without, they stay as they are. With
    ``policies``, the modules' own policies become exactly its; without, they stay."""
    old_version = yield from _lock_version(dialect)
    current = yield from _all_hosts()
    yield from _pin_static(dialect, routes, current)
    old_policies: PolicyMap = {}
    if policies is not None:
        old_policies = yield from get_policies(None)
    modules = sorted(set(routes) | set(current) | set(old_policies) | set(policies or {}))
    old_meta: dict[ModuleKey, dict[HostKey, HostMeta]] = {}
    if meta is not None:
        old_meta = yield from _meta_of([m for m in modules if m in routes and m in current])
    changes = {}
    for module in modules:
        had = current.get(module, set())
        wanted = set(routes.get(module, ()))
        exact = None
        if meta is not None:
            given = meta.get(module, {})
            exact = {host: given.get(host, HostMeta()) for host in wanted}
        change = _module_change(
            module, had, wanted, had - wanted, exact, old_meta.get(module, {}), strict=False
        )
        if policies is not None:
            old, new = old_policies.get(module), policies.get(module)
            if old != new:
                change = attrs.evolve(change, policy=(old, new))
        changes[module] = change
    return (yield from _write_changes(changes, old_version, now, actor, force))


def set_host_meta(
    dialect: Dialect,
    module: ModuleKey,
    host: HostKey,
    weight: int | None,
    zone: str | None,
    now: float,
    actor: Actor | None,
) -> Op[RouteWrite]:
    """Set the weight and/or zone of one host of a module's route (:class:`InvalidValue`
    if it is not there)."""
    old_version = yield from _lock_version(dialect)
    current = (yield from _meta_of([module]))[module]
    if host not in current:
        raise InvalidValue(
            f"module {module[0]}/{module[1]}: {format_host(host)} is not in its route"
        )
    old = current[host]
    new = HostMeta(old.weight if weight is None else weight, old.zone if zone is None else zone)
    change = _module_change(module, set(current), set(), set(), {host: new}, current)
    return (yield from _write_changes({module: change}, old_version, now, actor, True))


def _host_list(hosts: Collection[HostKey]) -> str:
    """A JSON list of ``"ip:port"`` texts, sorted (RouteAudit.added and .removed)."""
    return json.dumps([format_host(host) for host in sorted(hosts)], separators=(",", ":"))


def _meta_json(meta: HostMeta) -> dict[str, Any]:
    return {"weight": meta.weight, "zone": meta.zone}


def _changes_json(change: _ModuleChange, lease: str | None = None) -> str | None:
    """RouteAudit.changes of a module's change: the weights and zones set (on hosts kept,
    and on hosts added when not the defaults), and for a lease write what it did
    (``"lease": "register"``, ``"drop"``, ``"register+drop"``, ``"expire"``), or None."""
    hosts: dict[str, dict[str, list[Any]]] = {}
    for host, value in sorted(change.added_meta.items()):
        hosts[format_host(host)] = {
            k: [None, v] for k, v in _meta_json(value).items() if v != getattr(HostMeta(), k)
        }
    for host, (old, new) in sorted(change.updated.items()):
        hosts[format_host(host)] = {
            k: [getattr(old, k), getattr(new, k)]
            for k in HostMeta._fields
            if getattr(old, k) != getattr(new, k)
        }
    detail: dict[str, Any] = {"hosts": hosts} if hosts else {}
    if change.policy is not None:
        detail["policy"] = [_policy_json(change.policy[0]), _policy_json(change.policy[1])]
    if lease is not None:
        detail["lease"] = lease
    if not detail:
        return None
    return json.dumps(detail, separators=(",", ":"), sort_keys=True)


def check_shrink(changes: Mapping[ModuleKey, _ModuleChange]) -> None:
    """:class:`ShrinkRefused` if a write removes more than half of a module's hosts (or
    all of them) (DESIGN §13)."""
    shrinks = tuple(
        (module, len(c.had), len(c.removed))
        for module, c in sorted(changes.items())
        if c.had and 2 * len(c.removed) > len(c.had)
    )
    if not shrinks:
        return
    parts = [
        f"{m[0]}/{m[1]} would lose {'all' if lost == had else lost} of its {had} host(s)"
        for m, had, lost in shrinks[:5]
    ]
    more = f" and {len(shrinks) - 5} more module(s)" if len(shrinks) > 5 else ""
    raise ShrinkRefused(
        f"refused: module {'; '.join(parts)}{more} (more than half); nothing was written",
        shrinks,
    )


def _write_changes(
    changes: Mapping[ModuleKey, _ModuleChange],
    old_version: int,
    now: float,
    actor: Actor | None,
    force: bool = True,
) -> Op[RouteWrite]:
    """Delete, insert and update RouteData rows, then raise the version and write the
    RouteAudit and RouteChange rows of the modules that change."""
    changed = sorted(module for module, c in changes.items() if c.changes)
    if not changed:
        return RouteWrite(None)
    if not force:
        check_shrink({m: changes[m] for m in changed})
    inserts: list[tuple[Any, ...]] = []
    meta_inserts: list[tuple[Any, ...]] = []
    for module in changed:
        change = changes[module]
        if change.removed and change.removed == change.had:
            yield ("DELETE FROM RouteData WHERE modid = ? AND cmdid = ?", module)
        else:
            for chunk in _chunks(sorted(change.removed)):
                hosts = " OR ".join(["(serverip = ? AND serverport = ?)"] * len(chunk))
                yield (
                    f"DELETE FROM RouteData WHERE modid = ? AND cmdid = ? AND ({hosts})",
                    (*module, *(v for host in chunk for v in host)),
                )
        for host in sorted(change.added):
            value = change.added_meta.get(host)
            if value is None:  # the original's columns only: fits a database not upgraded
                inserts.append((*module, *host))
            else:
                meta_inserts.append((*module, *host, value.weight, value.zone))
        for host, (_, new) in sorted(change.updated.items()):
            yield (
                "UPDATE RouteData SET weight = ?, zone = ?"
                " WHERE modid = ? AND cmdid = ? AND serverip = ? AND serverport = ?",
                (new.weight, new.zone, *module, *host),
            )
        if change.policy is not None:
            yield ("DELETE FROM RoutePolicy WHERE modid = ? AND cmdid = ?", module)
            spec = change.policy[1]
            if spec is not None:
                yield from _insert(
                    "RoutePolicy",
                    ("modid", "cmdid", *POLICY_COLUMNS),
                    [(*module, spec.policy, int(spec.zone_affinity), *spec[2:])],
                )
    yield from _insert("RouteData", ("modid", "cmdid", "serverip", "serverport"), inserts)
    yield from _insert(
        "RouteData", ("modid", "cmdid", "serverip", "serverport", "weight", "zone"), meta_inserts
    )
    audit = []
    if actor is not None:
        audit = [
            (
                *module,
                _host_list(changes[module].added),
                _host_list(changes[module].removed),
                _changes_json(changes[module]),
            )
            for module in changed
        ]
    write = yield from _finish_write(changed, old_version, now, actor, audit)
    return attrs.evolve(
        write,
        added=sum(len(changes[m].added) for m in changed),
        removed=sum(len(changes[m].removed) for m in changed),
        updated=sum(len(changes[m].updated) for m in changed),
    )


def _finish_write(
    changed: Sequence[ModuleKey],
    old_version: int,
    now: float,
    actor: Actor | None,
    audit: Sequence[tuple[int, int, str, str, str | None]],
) -> Op[RouteWrite]:
    """Raise the version, write the RouteAudit rows (``modid, cmdid, added, removed,
    changes``: the column ``changes`` only in rows that have some, so that a database
    without it takes the others) and a RouteChange row per module."""
    new_version = max(old_version + 1, int(now))
    yield ("UPDATE RouteVersion SET version = ? WHERE id = 1", (new_version,))
    if actor is not None:
        plain = []
        detailed = []
        for modid, cmdid, added, removed, detail in audit:
            row = (now, actor.name, actor.source, modid, cmdid, added, removed, new_version)
            if detail is None:
                plain.append(row)
            else:
                detailed.append((*row, detail))
        yield from _insert("RouteAudit", AUDIT_COLUMNS, plain, _AUDIT_CHUNK)
        yield from _insert("RouteAudit", (*AUDIT_COLUMNS, "changes"), detailed, _AUDIT_CHUNK)
    yield from _insert(
        "RouteChange", ("modid", "cmdid", "version"), [(*m, new_version) for m in changed]
    )
    return RouteWrite(new_version, frozenset(changed))


# --- policies (DESIGN §13) -------------------------------------------------------------------


def _policy_json(spec: PolicySpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec._asdict()


def get_policies(modules: Sequence[ModuleKey] | None) -> Op[PolicyMap]:
    """The RoutePolicy rows of ``modules`` (None: every module)."""
    if modules is None:
        return _policy_rows((yield (_POLICY_SELECT, ())).rows)
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(modules):
        where, flat = _modules_clause(chunk)
        rows += (yield (f"{_POLICY_SELECT} WHERE {where}", flat)).rows
    return _policy_rows(rows)


def read_policies(dialect: Dialect, modules: Sequence[ModuleKey] | None) -> Op[PolicyMap]:
    """:func:`get_policies`, or none on a database without the RoutePolicy table."""
    features = yield from route_features(dialect)
    if not features.policy:
        return {}
    return (yield from get_policies(modules))


def set_policy(
    dialect: Dialect,
    module: ModuleKey,
    spec: PolicySpec | None,
    now: float,
    actor: Actor | None,
) -> Op[RouteWrite]:
    """Give a module its own policy (``None``: remove it, the agents' default applies); a
    change raises the version and writes RouteChange (DNS pushes it) and RouteAudit rows."""
    return (yield from change_routes(dialect, {}, {}, now, actor, policies={module: spec}))


def _insert(
    table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]], chunk: int = INSERT_CHUNK
) -> Op[None]:
    """Multi-row INSERTs of ``rows``, ``chunk`` rows each."""
    for part in _chunks(rows, chunk):
        yield (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            + _values_sql(len(columns), len(part)),
            tuple(v for row in part for v in row),
        )


def list_routes(modid: int | None, cmdid: int | None) -> Op[dict[ModuleKey, list[HostKey]]]:
    """Routes sorted by module and host, filtered by modid and cmdid when given."""
    routes, _ = yield from _list_routes(_ROUTE_SELECT, modid, cmdid)
    return {module: sorted(routes[module]) for module in sorted(routes)}


def _list_routes(sql: str, modid: int | None, cmdid: int | None) -> Op[tuple[RouteMap, MetaMap]]:
    args: tuple[int, ...] = ()
    if modid is not None:
        sql += " WHERE modid = ?"
        args = (modid,)
        if cmdid is not None:
            sql += " AND cmdid = ?"
            args = (modid, cmdid)
    return _route_rows((yield (sql, args)).rows)


def list_route_meta(
    dialect: Dialect, modid: int | None, cmdid: int | None
) -> Op[dict[ModuleKey, dict[HostKey, HostMeta]]]:
    """Routes sorted by module and host with every host's weight and zone (the defaults
    on a database without the columns)."""
    features = yield from route_features(dialect)
    routes, meta = yield from _list_routes(
        _META_SELECT if features.meta else _ROUTE_SELECT, modid, cmdid
    )
    return {
        module: {
            host: meta.get(module, {}).get(host, HostMeta()) for host in sorted(routes[module])
        }
        for module in sorted(routes)
    }


# --- self-registration: leases and the fleet view (DESIGN §14) -------------------------------

#: One row of a unique key (RouteData's, or ServerCallStatus's host columns).
_KEY_TERM = "modid = ? AND cmdid = ? AND {ip} = ? AND {port} = ?"
#: RouteData's columns of a row a registration inserts.
_LEASE_INSERT = ("modid", "cmdid", "serverip", "serverport", "weight", "zone", "lease_expires")
#: The largest expiry (unix ms) a BIGINT holds.
EXPIRES_MAX = 2**63 - 1

#: ``(module, host)``: one RouteData row.
RowKey = tuple[ModuleKey, HostKey]


def _keys_where(
    keys: Sequence[RowKey], ip: str = "serverip", port: str = "serverport"
) -> tuple[str, tuple[int, ...]]:
    """``(modid = ? AND cmdid = ? AND ip = ? AND port = ?) OR ...`` (balanced, see
    :func:`_balanced_or`): a unique key's ranges, one per row."""
    term = "(" + _KEY_TERM.format(ip=ip, port=port) + ")"
    return _balanced_or([term] * len(keys)), tuple(
        v for module, host in keys for v in (*module, *host)
    )


def _row_key(modid: Any, cmdid: Any, ip: Any, port: Any) -> RowKey:
    return (int(modid), int(cmdid)), (int(ip), int(port))


def check_grants(grants: object) -> list[LeaseGrant]:
    """Leases checked (module ids, hosts, expiry, weight, zone): :class:`InvalidValue`
    naming the first bad one."""
    from lars.core.model import check_weight, check_zone

    if isinstance(grants, str | bytes) or not isinstance(grants, Sequence):
        raise InvalidValue(f"leases must be a sequence of LeaseGrant, got {grants!r:.80}")
    checked = []
    for grant in grants:
        if not isinstance(grant, LeaseGrant):
            raise InvalidValue(f"{grant!r:.80} is not a LeaseGrant")
        module = _as_module(grant.module)
        host = _as_host(module, grant.host)
        where = f"module {module[0]}/{module[1]} host {format_host(host)}"
        if type(grant.expires) is not int or not 0 <= grant.expires <= EXPIRES_MAX:
            raise InvalidValue(f"{where}: expires must be unix milliseconds, got {grant.expires!r}")
        try:
            weight = None if grant.weight is None else check_weight(grant.weight)
            zone = None if grant.zone is None else check_zone(grant.zone)
        except InvalidValue as exc:
            raise InvalidValue(f"{where}: {exc}") from None
        checked.append(LeaseGrant(module, host, grant.expires, weight, zone))
    return checked


def check_drops(drops: object) -> list[LeaseDrop]:
    """Deregistrations checked (module ids, hosts, drain): :class:`InvalidValue` naming the
    first bad one."""
    if isinstance(drops, str | bytes) or not isinstance(drops, Sequence):
        raise InvalidValue(f"drops must be a sequence of LeaseDrop, got {drops!r:.80}")
    checked = []
    for drop in drops:
        if not isinstance(drop, LeaseDrop):
            raise InvalidValue(f"{drop!r:.80} is not a LeaseDrop")
        module = _as_module(drop.module)
        host = _as_host(module, drop.host)
        if type(drop.drain_ms) is not int or not 0 <= drop.drain_ms <= DRAIN_MAX_MS:
            raise InvalidValue(
                f"module {module[0]}/{module[1]} host {format_host(host)}: drain_ms must be"
                f" 0 to {DRAIN_MAX_MS}, got {drop.drain_ms!r}"
            )
        checked.append(LeaseDrop(module, host, drop.drain_ms))
    return checked


def require_leases(features: RouteFeatures, display_url: str) -> None:
    """:class:`SchemaMissing` unless RouteData has the weight, zone and lease_expires
    columns a lease write needs."""
    if not (features.leases and features.meta):
        raise SchemaMissing(
            f"the store {display_url} has no RouteData.lease_expires column for"
            " self-registered hosts: run `lars db upgrade`"
        )


@attrs.frozen
class _LeaseRow:
    """What a lease write reads of an existing RouteData row."""

    meta: HostMeta
    #: ``lease_expires`` (None: a static row).
    expires: int | None


def _lease_rows(keys: Sequence[RowKey]) -> Op[dict[RowKey, _LeaseRow]]:
    """The rows of ``keys`` that exist (of rows repeating one key, which only a database
    without the unique key holds, a static one wins)."""
    found: dict[RowKey, _LeaseRow] = {}
    for chunk in _chunks(keys):
        where, args = _keys_where(chunk)
        rows = (
            yield (
                "SELECT modid, cmdid, serverip, serverport, weight, zone, lease_expires"
                f" FROM RouteData WHERE {where}",
                args,
            )
        ).rows
        for modid, cmdid, ip, port, weight, zone, expires in rows:
            key = _row_key(modid, cmdid, ip, port)
            row = _LeaseRow(
                HostMeta(min(int(weight), WEIGHT_MAX), _text(zone)),
                None if expires is None else int(expires),
            )
            if key not in found or row.expires is None:
                found[key] = row
    return found


def _expiry_update(
    dialect: Dialect,
    items: Sequence[tuple[RowKey, int]],
    *,
    drain: bool = False,
    monotonic: bool = False,
) -> Query:
    """One UPDATE giving each dynamic row of ``items`` its expiry (``monotonic``: never an
    earlier one than it has; ``drain``: and weight 0). Static rows are left alone."""
    term = _KEY_TERM.format(ip="serverip", port="serverport")
    value = f"{dialect.greatest}(lease_expires, ?)" if monotonic else "?"
    whens = " ".join([f"WHEN {term} THEN {value}"] * len(items))
    where, key_args = _keys_where([key for key, _ in items])
    case_args = tuple(v for (module, host), expires in items for v in (*module, *host, expires))
    weight = "weight = 0, " if drain else ""
    return (
        f"UPDATE RouteData SET {weight}lease_expires = CASE {whens} ELSE lease_expires END"
        f" WHERE lease_expires IS NOT NULL AND ({where})",
        case_args + key_args,
    )


def _lease_audit(
    changed: Sequence[ModuleKey],
    added: Mapping[ModuleKey, Mapping[HostKey, HostMeta]],
    removed: Mapping[ModuleKey, set[HostKey]],
    updated: Mapping[ModuleKey, Mapping[HostKey, tuple[HostMeta, HostMeta]]],
    actions: Mapping[ModuleKey, Collection[str]],
) -> list[tuple[int, int, str, str, str | None]]:
    """The RouteAudit rows of a lease write, one per module changed."""
    audit = []
    for module in changed:
        new = added.get(module, {})
        change = _ModuleChange(
            frozenset(),
            frozenset(new),
            frozenset(removed.get(module, ())),
            {host: meta for host, meta in new.items() if meta != HostMeta()},
            updated.get(module, {}),
        )
        action = "+".join(a for a in LEASE_ACTIONS if a in actions.get(module, ()))
        audit.append(
            (
                *module,
                _host_list(change.added),
                _host_list(change.removed),
                _changes_json(change, action),
            )
        )
    return audit


#: What ``RouteAudit.changes["lease"]`` names, in the order it names them.
LEASE_ACTIONS = ("register", "drop", "expire")


def write_leases(
    dialect: Dialect,
    grants: Sequence[LeaseGrant],
    drops: Sequence[LeaseDrop],
    now_ms: int,
    now: float,
    actor: Actor,
) -> Op[RouteWrite]:
    """Register ``grants`` and deregister ``drops`` (a key in both is dropped): see
    :meth:`lars.store.RouteStore.write_leases`. The RouteVersion row is locked first, as
    by every route write, so writers never insert one row twice."""
    old_version = yield from _lock_version(dialect)
    dropped = {drop.key: drop for drop in drops}
    wanted = {grant.key: grant for grant in grants if grant.key not in dropped}
    rows = yield from _lease_rows(sorted(set(wanted) | set(dropped)))
    inserts: list[tuple[Any, ...]] = []
    expiries: list[tuple[RowKey, int]] = []
    drains: list[tuple[RowKey, int]] = []
    metas: list[tuple[RowKey, HostMeta, int]] = []
    deletes: list[RowKey] = []
    added: dict[ModuleKey, dict[HostKey, HostMeta]] = {}
    removed: dict[ModuleKey, set[HostKey]] = {}
    updated: dict[ModuleKey, dict[HostKey, tuple[HostMeta, HostMeta]]] = {}
    actions: dict[ModuleKey, set[str]] = {}
    for key, grant in sorted(wanted.items()):
        module, host = key
        row = rows.get(key)
        if row is None:
            meta = HostMeta(
                DEFAULT_WEIGHT if grant.weight is None else grant.weight, grant.zone or ""
            )
            inserts.append((*module, *host, meta.weight, meta.zone, grant.expires))
            added.setdefault(module, {})[host] = meta
        elif row.expires is None:
            continue  # a static row: static wins, and never expires
        else:
            old = row.meta
            if grant.weight is not None:
                weight = grant.weight
            else:  # a drained row registered again wants traffic again
                weight = DEFAULT_WEIGHT if old.weight == 0 else old.weight
            new = HostMeta(weight, old.zone if grant.zone is None else grant.zone)
            if new == old:
                expiries.append((key, grant.expires))
                continue
            metas.append((key, new, grant.expires))
            updated.setdefault(module, {})[host] = (old, new)
        actions.setdefault(module, set()).add("register")
    for key, drop in sorted(dropped.items()):
        module, host = key
        row = rows.get(key)
        if row is None or row.expires is None:
            continue  # gone already, or static: nothing to do
        if drop.drain_ms == 0:
            deletes.append(key)
            removed.setdefault(module, set()).add(host)
        else:
            ends = now_ms + drop.drain_ms
            if row.meta.weight == 0:  # drained already (a drop sent again): never later
                drains.append((key, min(ends, row.expires)))
                continue
            drains.append((key, ends))
            updated.setdefault(module, {})[host] = (row.meta, row.meta._replace(weight=0))
        actions.setdefault(module, set()).add("drop")
    for chunk in _chunks(deletes):
        where, args = _keys_where(chunk)
        yield (f"DELETE FROM RouteData WHERE lease_expires IS NOT NULL AND ({where})", args)
    yield from _insert("RouteData", _LEASE_INSERT, inserts)
    for (module, host), meta, expires in metas:
        yield (
            "UPDATE RouteData SET weight = ?, zone = ?, lease_expires = ?"
            " WHERE modid = ? AND cmdid = ? AND serverip = ? AND serverport = ?"
            " AND lease_expires IS NOT NULL",
            (meta.weight, meta.zone, expires, *module, *host),
        )
    for part in _chunks(expiries):
        yield _expiry_update(dialect, part)
    for part in _chunks(drains):
        yield _expiry_update(dialect, part, drain=True)
    changed = sorted(set(added) | set(removed) | set(updated))
    if not changed:
        return RouteWrite(None)
    audit = _lease_audit(changed, added, removed, updated, actions)
    write = yield from _finish_write(changed, old_version, now, actor, audit)
    return attrs.evolve(
        write,
        added=sum(map(len, added.values())),
        removed=sum(map(len, removed.values())),
        updated=sum(map(len, updated.values())),
    )


def write_lease_batches(
    dialect: Dialect, batches: Sequence[LeaseBatch], now_ms: int, now: float
) -> Op[RouteWrite]:
    """:func:`write_leases` of each batch in turn (one transaction: the caller's); the sum
    of their writes."""
    total = RouteWrite(None)
    for batch in batches:
        write = yield from write_leases(
            dialect, batch.grants, batch.drops, now_ms, now, batch.actor
        )
        if write.changed:
            total = RouteWrite(
                write.version,
                total.modules | write.modules,
                total.added + write.added,
                total.removed + write.removed,
                total.updated + write.updated,
            )
    return total


def renew_leases(dialect: Dialect, grants: Sequence[LeaseGrant]) -> Op[list[LeaseGrant]]:
    """Extend the expiry of the grants' dynamic rows (never to an earlier one), one UPDATE
    per chunk; returns the grants whose row is gone (to register again). A chunk whose
    UPDATE touched every row needs no second look (MySQL counts changed rows, SQLite
    matched ones: fewer means a row is missing, or already had that expiry)."""
    latest: dict[RowKey, LeaseGrant] = {}
    for grant in grants:
        if grant.key not in latest or grant.expires > latest[grant.key].expires:
            latest[grant.key] = grant
    missing: list[LeaseGrant] = []
    for chunk in _chunks(sorted(latest.values(), key=lambda g: g.key)):
        query = _expiry_update(dialect, [(g.key, g.expires) for g in chunk], monotonic=True)
        if (yield query).rowcount >= len(chunk):
            continue
        where, args = _keys_where([g.key for g in chunk])
        rows = (
            yield (f"SELECT modid, cmdid, serverip, serverport FROM RouteData WHERE {where}", args)
        ).rows
        present = {_row_key(*row) for row in rows}
        missing += [g for g in chunk if g.key not in present]
    return missing


def lease_due(now_ms: int) -> Op[bool]:
    """True if some dynamic row has expired (one read of the ``lease_expires`` key)."""
    rows = (yield ("SELECT 1 FROM RouteData WHERE lease_expires < ? LIMIT 1", (now_ms,))).rows
    return bool(rows)


def expire_leases(
    dialect: Dialect, now_ms: int, limit: int, now: float, actor: Actor, lock: str
) -> Op[LeaseExpiry]:
    """Delete at most ``limit`` rows expired before ``now_ms``: lock the RouteVersion row
    (so this never deadlocks with a route write: every one locks it first), select the rows
    with ``lock`` (:attr:`Dialect.skip_locked`: rows a renewal holds are skipped, not waited
    for), delete them, raise the version, write RouteChange and RouteAudit rows."""
    old_version = yield from _lock_version(dialect)
    rows = (
        yield (
            "SELECT id, modid, cmdid, serverip, serverport FROM RouteData"
            f" WHERE lease_expires < ? ORDER BY lease_expires LIMIT ?{lock}",
            (now_ms, limit),
        )
    ).rows
    if not rows:
        return LeaseExpiry(RouteWrite(None))
    ids = [int(row[0]) for row in rows]
    for chunk in _chunks(ids):
        yield (f"DELETE FROM RouteData WHERE id IN ({', '.join('?' * len(chunk))})", tuple(chunk))
    hosts: dict[ModuleKey, set[HostKey]] = {}
    for _, modid, cmdid, ip, port in rows:
        module, host = _row_key(modid, cmdid, ip, port)
        hosts.setdefault(module, set()).add(host)
    changed = sorted(hosts)
    audit = _lease_audit(changed, {}, hosts, {}, dict.fromkeys(changed, ("expire",)))
    write = yield from _finish_write(changed, old_version, now, actor, audit)
    return LeaseExpiry(
        attrs.evolve(write, removed=sum(map(len, hosts.values()))),
        {module: tuple(sorted(hosts[module])) for module in changed},
        more=len(rows) >= limit,
    )


def lease_expiries(module: ModuleKey) -> Op[dict[HostKey, int]]:
    """The dynamic hosts of a module and their expiry."""
    rows = (
        yield (
            "SELECT serverip, serverport, lease_expires FROM RouteData"
            " WHERE modid = ? AND cmdid = ? AND lease_expires IS NOT NULL",
            module,
        )
    ).rows
    return {(int(ip), int(port)): int(expires) for ip, port, expires in rows}


def demoted_hosts(
    since: int, callers: int, share: float
) -> Op[dict[ModuleKey, frozenset[HostKey]]]:
    """The fleet view: hosts flagged overloaded by at least ``callers`` callers reporting at
    ``since`` or later, and by at least ``share`` of those reporting on them. The overloaded
    rows come first (the ``overload`` key; few), the callers of those hosts alone then (the
    primary key's prefix): never a scan of every row."""
    rows = (
        yield (
            "SELECT modid, cmdid, ip, port, COUNT(*) FROM ServerCallStatus"
            f" WHERE {_OVERLOADED} AND ts >= ? GROUP BY modid, cmdid, ip, port"
            " HAVING COUNT(*) >= ?",
            (since, callers),
        )
    ).rows
    overloaded = {_row_key(*row[:4]): int(row[4]) for row in rows}
    reporting: dict[RowKey, int] = {}
    for chunk in _chunks(sorted(overloaded)):
        where, args = _keys_where(chunk, "ip", "port")
        rows = (
            yield (
                "SELECT modid, cmdid, ip, port, COUNT(*) FROM ServerCallStatus"
                f" WHERE ts >= ? AND ({where}) GROUP BY modid, cmdid, ip, port",
                (since, *args),
            )
        ).rows
        reporting.update((_row_key(*row[:4]), int(row[4])) for row in rows)
    demoted: dict[ModuleKey, set[HostKey]] = {}
    for (module, host), count in overloaded.items():
        if count >= share * reporting.get((module, host), count) - 1e-9:
            demoted.setdefault(module, set()).add(host)
    return {module: frozenset(hosts) for module, hosts in sorted(demoted.items())}


def _pin_static(
    dialect: Dialect,
    written: Mapping[ModuleKey, Collection[HostKey]],
    current: Mapping[ModuleKey, set[HostKey]],
) -> Op[None]:
    """Make static the self-registered rows of hosts an operator writes again (add, import):
    static routes never expire (DESIGN §14). One read of the few dynamic rows, and only
    when such a host is written at all."""
    if not any(current.get(module, set()).intersection(hosts) for module, hosts in written.items()):
        return
    features = yield from route_features(dialect)
    if not features.leases:
        return
    rows = (
        yield (
            "SELECT modid, cmdid, serverip, serverport FROM RouteData"
            " WHERE lease_expires IS NOT NULL",
            (),
        )
    ).rows
    wanted = {module: set(hosts) for module, hosts in written.items()}
    pins = sorted(
        {key for key in map(lambda row: _row_key(*row), rows) if key[1] in wanted.get(key[0], ())}
    )
    for chunk in _chunks(pins):
        where, args = _keys_where(chunk)
        yield (f"UPDATE RouteData SET lease_expires = NULL WHERE {where}", args)


def purge_changes(dialect: Dialect, older_than: float) -> Op[int]:
    """Delete RouteChange rows older than ``older_than`` seconds."""
    return (yield (dialect.purge_changes, (int(older_than),))).rowcount


def status_values(r: CallStatus) -> tuple[int | str, ...]:
    """A row's ServerCallStatus values in STATUS_COLUMNS order: the counts of the latest
    report clamped to a signed INT, and what the totals add (the counts, or the row's
    ``add_succ``/``add_err``) exact."""
    return (
        r.modid,
        r.cmdid,
        r.ip,
        r.port,
        r.caller,
        min(r.succ, INT_MAX),
        min(r.err, INT_MAX),
        r.ts,
        "1" if r.overload else "0",
        r.succ if r.add_succ is None else r.add_succ,
        r.err if r.add_err is None else r.add_err,
    )


#: One ServerCallStatus row of an INSERT with :attr:`Dialect.inline_integers`: ``%d`` takes
#: only numbers, and the one text, the overload flag, is "1" or "0" (:func:`status_values`).
_STATUS_VALUES = "(%d,%d,%d,%d,%d,%d,%d,%d,'%s',%d,%d)"


#: Bytes of a reporter batch's token (ReportBatch.token).
BATCH_TOKEN_SIZE = 16


def check_token(token: object) -> bytes:
    if not isinstance(token, bytes) or len(token) != BATCH_TOKEN_SIZE:
        raise InvalidValue(f"a batch token is {BATCH_TOKEN_SIZE} bytes, got {token!r}")
    return token


def upsert_call_status(
    dialect: Dialect,
    rows: Sequence[CallStatus],
    history: Sequence[HistoryRow] = (),
    token: bytes | None = None,
    written: int = 0,
) -> Op[bool]:
    """Upsert statistics: the latest counts replace the row's, the totals add up; then add
    ``history`` to its CallHistory buckets (in the same transaction, the caller's).

    With a ``token``, first claim it in ReportBatch: if a run of this batch already stored
    it (its COMMIT went through though its answer was lost), write nothing and return False.
    Two runs in flight at once conflict on the token's key (a lock wait, or a Galera
    certification failure), and the one re-run after that finds the token.
    """
    if token is not None and not (yield (dialect.claim_batch, (token, written))).rowcount:
        return False
    for chunk in _chunks(rows):
        if dialect.inline_integers:
            yield (
                f"INSERT INTO ServerCallStatus ({_STATUS_COLUMNS}) VALUES "
                + ",".join([_STATUS_VALUES % status_values(r) for r in chunk])
                + dialect.upsert_status_suffix,
                (),
            )
            continue
        flat: list[Any] = []
        for r in chunk:
            flat += status_values(r)
        yield (
            f"INSERT INTO ServerCallStatus ({_STATUS_COLUMNS}) VALUES "
            + _values_sql(11, len(chunk))
            + dialect.upsert_status_suffix,
            tuple(flat),
        )
    for part in _chunks(history, HISTORY_CHUNK):
        yield (
            f"INSERT INTO {HISTORY_TABLE} ({_HISTORY_COLUMNS}) VALUES "
            + ",".join([_HISTORY_VALUES % row for row in part])
            + dialect.upsert_history_suffix,
            (),
        )
    return True


def batch_recorded(token: bytes) -> Op[bool]:
    """True if the batch with ``token`` is stored."""
    rows = (yield ("SELECT 1 FROM ReportBatch WHERE token = ?", (token,))).rows
    return bool(rows)


def purge_batches(dialect: Dialect, older_than: int, limit: int) -> Op[int]:
    """Delete at most ``limit`` ReportBatch tokens written before ``older_than``."""
    return (yield (dialect.purge_batches, (older_than, limit))).rowcount


def read_call_status(modid: int | None, cmdid: int | None) -> Op[list[CallStatus]]:
    """Read ServerCallStatus rows, optionally of one modid or module, sorted by key."""
    sql = f"SELECT {_STATUS_COLUMNS} FROM ServerCallStatus"
    args: tuple[int, ...] = ()
    if modid is not None:
        sql += " WHERE modid = ?"
        args = (modid,)
        if cmdid is not None:
            sql += " AND cmdid = ?"
            args = (modid, cmdid)
    sql += " ORDER BY modid, cmdid, ip, port, caller"
    return [_status_row(row) for row in (yield (sql, args)).rows]


def _status_row(row: Sequence[Any]) -> CallStatus:
    """A CallStatus from a row of STATUS_COLUMNS."""
    m, c, ip, port, caller, s, e, ts, overload, st, et = row
    return CallStatus(
        int(m),
        int(c),
        int(ip),
        int(port),
        int(caller),
        int(s),
        int(e),
        int(ts),
        is_overloaded(overload),
        int(st),
        int(et),
    )


# --- the console's reads and the names (issue 9) -----------------------------------------------

#: ServerCallStatus.overload values that mean "overloaded" (Lars writes "1" and "0").
OVERLOAD_TRUE = ("1", "Y", "T")
#: The same rule in SQL (both cases: SQLite compares text case-sensitively).
_OVERLOAD_VALUES = "({})".format(
    ", ".join(f"'{v}'" for c in OVERLOAD_TRUE for v in dict.fromkeys((c, c.lower())))
)
_OVERLOADED = f"overload IN {_OVERLOAD_VALUES}"
#: The key of ServerCallStatus, which breaks ties in every sort.
_STATUS_KEY = ("modid", "cmdid", "ip", "port", "caller")
#: Sort key of :func:`call_status` -> the columns it orders by.
STATUS_SORTS: dict[str, tuple[str, ...]] = {
    "module": _STATUS_KEY,
    "host": ("ip", "port", "modid", "cmdid", "caller"),
    "caller": ("caller", "modid", "cmdid", "ip", "port"),
    "succ": ("succ_cnt", *_STATUS_KEY),
    "err": ("err_cnt", *_STATUS_KEY),
    "ts": ("ts", *_STATUS_KEY),
}
assert tuple(STATUS_SORTS) == CALL_STATUS_SORTS
#: Name kind -> (table, id column).
NAME_TABLES = {"mod": ("ModIDConfig", "modid"), "cmd": ("CmdIDConfig", "cmdid")}
assert tuple(NAME_TABLES) == NAME_KINDS

_ID_SEARCH = re.compile(r"[0-9]{1,10}")
_MODULE_SEARCH = re.compile(r"([0-9]{1,10})\s*/\s*([0-9]{1,10})")
_AUDIT_SELECT = "SELECT id, " + ", ".join(AUDIT_COLUMNS) + " FROM RouteAudit"


def is_overloaded(value: object) -> bool:
    """True if a ServerCallStatus.overload value means "overloaded"."""
    return str(value).upper() in OVERLOAD_TRUE


def check_page(offset: object, limit: object) -> None:
    """Raise :class:`InvalidValue` unless ``offset`` is 0 or more and ``limit`` from 1 to
    :data:`PAGE_MAX`."""
    if type(offset) is not int or offset < 0:
        raise InvalidValue(f"offset must be an integer of 0 or more, got {offset!r}")
    check_limit(limit)


def check_limit(limit: object) -> None:
    """Raise :class:`InvalidValue` unless ``limit`` is from 1 to :data:`PAGE_MAX`."""
    if type(limit) is not int or not 1 <= limit <= PAGE_MAX:
        raise InvalidValue(f"limit must be an integer from 1 to {PAGE_MAX}, got {limit!r}")


def check_module(module: object) -> ModuleKey:
    """A module key, validated."""
    return _as_module(module)


def check_sort(sort: object) -> None:
    """Raise :class:`InvalidValue` unless ``sort`` is one of :data:`CALL_STATUS_SORTS`."""
    if not isinstance(sort, str) or sort not in STATUS_SORTS:
        raise InvalidValue(f"sort must be one of {', '.join(CALL_STATUS_SORTS)}, got {sort!r}")


def check_name_kind(kind: object) -> tuple[str, str]:
    """The (table, id column) of a name kind; :class:`InvalidValue` for another kind."""
    if not isinstance(kind, str) or kind not in NAME_TABLES:
        raise InvalidValue(f"name kind must be one of {', '.join(NAME_KINDS)}, got {kind!r}")
    return NAME_TABLES[kind]


def check_name(content: object) -> str:
    """A name, stripped: 1 to :data:`NAME_MAX` characters of the Basic Multilingual Plane
    (the original schema's utf8 columns hold no others)."""
    if type(content) is not str:
        raise InvalidValue(f"a name must be text, got {content!r}")
    text = content.strip()
    if not text or len(text) > NAME_MAX:
        raise InvalidValue(f"a name must be 1 to {NAME_MAX} characters, got {len(text)}")
    if any(ord(ch) > 0xFFFF or ord(ch) < 0x20 for ch in text):
        raise InvalidValue(
            f"a name must not hold control characters or characters beyond U+FFFF: {text!r}"
        )
    return text


def _parse_host_list(text: object) -> tuple[HostKey, ...]:
    """The hosts of a RouteAudit host list (the lenient inverse of :func:`_host_list`)."""
    try:
        hosts = []
        for item in json.loads(str(text)):
            ip, _, port = str(item).rpartition(":")
            hosts.append((ip_to_int(ip), int(port)))
        return tuple(hosts)
    except (ValueError, TypeError):
        log.warning("unreadable host list in RouteAudit: %.80r", text)
        return ()


def _newest_first(
    select: str,
    filters: Sequence[tuple[str, tuple[Any, ...]]],
    before_id: int | None,
    limit: int,
) -> Query:
    """``select`` (of a table with an ``id``) newest first: the rows matching every filter
    (SQL, its arguments) and older than ``before_id``, at most ``limit`` of them."""
    where = [condition for condition, _ in filters]
    args = [value for _, values in filters for value in values]
    if before_id is not None:
        where.append("id < ?")
        args.append(before_id)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"{select}{clause} ORDER BY id DESC LIMIT ?", (*args, limit)


def list_audit(
    dialect: Dialect,
    module: ModuleKey | None,
    actor: str | None,
    limit: int,
    before_id: int | None,
) -> Op[list[AuditEntry]]:
    """RouteAudit rows, newest first, filtered by module, actor name and ``id < before_id``."""
    filters: list[tuple[str, tuple[Any, ...]]] = []
    if module is not None:
        filters.append(("modid = ? AND cmdid = ?", module))
    if actor is not None:
        filters.append(("actor = ?", (actor,)))
    columns = {
        str(_text(row[0])).lower() for row in (yield (dialect.list_columns, ("RouteAudit",))).rows
    }
    select = _AUDIT_SELECT
    if "changes" in columns:
        select = select.replace(" FROM RouteAudit", ", changes FROM RouteAudit")
    rows = (yield _newest_first(select, filters, before_id, limit)).rows
    return [
        AuditEntry(
            int(id_),
            float(ts),
            str(name),
            str(source),
            int(modid),
            int(cmdid),
            _parse_host_list(added),
            _parse_host_list(removed),
            int(version),
            _parse_changes(detail[0] if detail else None),
        )
        for id_, ts, name, source, modid, cmdid, added, removed, version, *detail in rows
    ]


def _parse_changes(text: object) -> dict[str, Any]:
    """RouteAudit.changes as a map ({} for NULL or unreadable)."""
    if text is None:
        return {}
    try:
        value = json.loads(_text(text))
    except ValueError:
        log.warning("unreadable changes in RouteAudit: %.80r", text)
        return {}
    return value if isinstance(value, dict) else {}


def recent_changes(limit: int) -> Op[list[tuple[int, int, int]]]:
    """RouteChange rows newest first, as ``(modid, cmdid, version)``."""
    rows = (
        yield ("SELECT modid, cmdid, version FROM RouteChange ORDER BY id DESC LIMIT ?", (limit,))
    ).rows
    return [(int(m), int(c), int(v)) for m, c, v in rows]


def module_filter(search: str | None) -> tuple[str, tuple[Any, ...]]:
    """The ``WHERE`` clause on RouteData, and its arguments, of an overview search:
    ``"12"`` is modid or cmdid 12, ``"12/3"`` the module 12/3, other text a
    case-insensitive substring of the module's mod or cmd name (``""`` for no search)."""
    if search is not None and type(search) is not str:
        raise InvalidValue(f"search must be text, got {search!r}")
    text = (search or "").strip()
    if not text:
        return "", ()
    if _ID_SEARCH.fullmatch(text) and int(text) <= UINT32_MAX:
        return " WHERE modid = ? OR cmdid = ?", (int(text), int(text))
    match = _MODULE_SEARCH.fullmatch(text)
    if match and max(int(match[1]), int(match[2])) <= UINT32_MAX:
        return " WHERE modid = ? AND cmdid = ?", (int(match[1]), int(match[2]))
    pattern = "%" + re.sub(r"[!%_]", r"!\g<0>", text.lower()) + "%"
    return (
        " WHERE modid IN (SELECT modid FROM ModIDConfig WHERE LOWER(content) LIKE ? ESCAPE '!')"
        " OR cmdid IN (SELECT cmdid FROM CmdIDConfig WHERE LOWER(content) LIKE ? ESCAPE '!')",
        (pattern, pattern),
    )


def _modules_where(modules: Sequence[ModuleKey]) -> tuple[str, tuple[int, ...]]:
    """``(modid = ? AND cmdid = ?) OR ...``: ranges of the (modid, cmdid) key prefixes.

    The ORs nest as a balanced tree: SQLite parses a flat chain as one level per term and
    refuses an expression deeper than 1000, fewer than a page of :data:`PAGE_MAX` modules.
    """
    return (
        _balanced_or(["(modid = ? AND cmdid = ?)"] * len(modules)),
        tuple(v for module in modules for v in module),
    )


def _balanced_or(terms: Sequence[str]) -> str:
    if len(terms) <= 2:
        return " OR ".join(terms)
    middle = len(terms) // 2
    return f"({_balanced_or(terms[:middle])}) OR ({_balanced_or(terms[middle:])})"


@attrs.frozen
class ModuleCount:
    """How many modules RouteData held at a route version."""

    version: int
    total: int


def module_overview(
    search: str | None, offset: int, limit: int, counted: ModuleCount | None = None
) -> Op[tuple[int, list[ModuleSummary], ModuleCount | None]]:
    """The modules matching ``search``, counted, and one page of their summaries.

    The page is chosen on RouteData alone (its (modid, cmdid, ...) key gives the order);
    only then are the page's status rows, versions and names read, each by the modules'
    key prefixes, so the cost follows the page, not the size of ServerCallStatus.

    Counting every module reads the whole RouteData key, the largest part of a first
    page's cost. Without a search the count is returned with the route version it was
    read at, and a ``counted`` of the current version is used instead of counting again:
    RouteData changes only with the version (DESIGN §3).
    """
    where, args = module_filter(search)
    remember = not where
    version = (yield from route_version()) if remember else 0
    if remember and counted is not None and counted.version == version:
        total = counted.total
    else:
        total = int(
            (
                yield (
                    "SELECT COUNT(*) FROM"
                    f" (SELECT DISTINCT modid, cmdid FROM RouteData{where}) AS m",
                    args,
                )
            ).rows[0][0]
        )
    count = ModuleCount(version, total) if remember else None
    if offset >= total:
        return total, [], count
    rows = (
        yield (
            f"SELECT DISTINCT modid, cmdid FROM RouteData{where}"
            " ORDER BY modid, cmdid LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
    ).rows
    page = [(int(m), int(c)) for m, c in rows]
    return total, (yield from _summaries(page)), count


def _summaries(page: Sequence[ModuleKey]) -> Op[list[ModuleSummary]]:
    which, flat = _modules_where(page)
    hosts: dict[ModuleKey, set[HostKey]] = {module: set() for module in page}
    rows = (
        yield (f"SELECT modid, cmdid, serverip, serverport FROM RouteData WHERE {which}", flat)
    ).rows
    for modid, cmdid, ip, port in rows:
        hosts[(int(modid), int(cmdid))].add((int(ip), int(port)))
    # succ, err, overloaded hosts
    sums = {module: [0, 0, 0] for module in page}
    rows = (
        yield (
            "SELECT modid, cmdid, ip, port, SUM(succ_cnt), SUM(err_cnt),"
            f" SUM(CASE WHEN {_OVERLOADED} THEN 1 ELSE 0 END)"
            f" FROM ServerCallStatus WHERE {which} GROUP BY modid, cmdid, ip, port",
            flat,
        )
    ).rows
    for modid, cmdid, ip, port, succ, err, overloaded in rows:
        module = (int(modid), int(cmdid))
        if (int(ip), int(port)) in hosts[module]:
            total = sums[module]
            total[0] += int(succ)
            total[1] += int(err)
            total[2] += int(overloaded) > 0
    rows = (
        yield (
            f"SELECT modid, cmdid, MAX(version) FROM RouteChange WHERE {which}"
            " GROUP BY modid, cmdid",
            flat,
        )
    ).rows
    versions = {(int(m), int(c)): int(v) for m, c, v in rows}
    mod_names = yield from _id_names("mod", sorted({modid for modid, _ in page}))
    cmd_names = yield from _id_names("cmd", sorted({cmdid for _, cmdid in page}))
    return [
        ModuleSummary(
            modid,
            cmdid,
            mod_names.get(modid, ""),
            cmd_names.get(cmdid, ""),
            hosts=len(hosts[(modid, cmdid)]),
            overloaded_hosts=sums[(modid, cmdid)][2],
            succ=sums[(modid, cmdid)][0],
            err=sums[(modid, cmdid)][1],
            last_version=versions.get((modid, cmdid)),
        )
        for modid, cmdid in page
    ]


def module_detail(modid: int, cmdid: int) -> Op[list[HostStatus] | None]:
    """Every host of a module's route, sorted, with its status rows; None without hosts."""
    rows = (
        yield (
            "SELECT serverip, serverport FROM RouteData WHERE modid = ? AND cmdid = ?",
            (modid, cmdid),
        )
    ).rows
    if not rows:
        return None
    callers: dict[HostKey, list[CallStatus]] = {(int(ip), int(port)): [] for ip, port in rows}
    for status in (yield from read_call_status(modid, cmdid)):
        if (status.ip, status.port) in callers:
            callers[(status.ip, status.port)].append(status)
    return [HostStatus(host, tuple(callers[host])) for host in sorted(callers)]


def call_status(
    module: ModuleKey | None,
    caller: int | None,
    overloaded: bool | None,
    sort: str,
    descending: bool,
    offset: int,
    limit: int,
) -> Op[tuple[int, list[CallStatus]]]:
    """ServerCallStatus rows matching the filters, counted, and one page of them sorted."""
    where: list[str] = []
    args: list[Any] = []
    if module is not None:
        where.append("modid = ? AND cmdid = ?")
        args += module
    if caller is not None:
        where.append("caller = ?")
        args.append(caller)
    if overloaded is not None:
        where.append(_OVERLOADED if overloaded else f"overload NOT IN {_OVERLOAD_VALUES}")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = int((yield (f"SELECT COUNT(*) FROM ServerCallStatus{clause}", tuple(args))).rows[0][0])
    if offset >= total:
        return total, []
    order = ", ".join(f"{c} DESC" if descending else c for c in STATUS_SORTS[sort])
    rows = (
        yield (
            f"SELECT {_STATUS_COLUMNS} FROM ServerCallStatus{clause} ORDER BY {order}"
            " LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
    ).rows
    return total, [_status_row(row) for row in rows]


def _id_names(kind: str, ids: Sequence[int] | None = None) -> Op[dict[int, str]]:
    """The names of a kind, all or of some ids; of several rows for one id (an original
    database may hold them) the newest wins."""
    table, column = NAME_TABLES[kind]
    sql = f"SELECT {column}, content FROM {table}"
    args: tuple[int, ...] = ()
    if ids is not None:
        if not ids:
            return {}
        sql += f" WHERE {column} IN ({', '.join('?' * len(ids))})"
        args = tuple(ids)
    rows = (yield (sql + " ORDER BY id", args)).rows
    return {int(ident): _text(content).rstrip() for ident, content in rows}


def list_names(kind: str) -> Op[dict[int, str]]:
    """Every name of a kind, by id."""
    names = yield from _id_names(kind)
    return dict(sorted(names.items()))


def set_name(dialect: Dialect, kind: str, ident: int, content: str) -> Op[None]:
    """Name an id: update its rows, or insert one.

    Takes the RouteVersion row's lock first, as route writes do: without it two writers
    naming one new id would both insert (locking the missing row itself takes only a gap
    lock in InnoDB, which both would hold, and the inserts would deadlock).
    """
    table, column = NAME_TABLES[kind]
    yield (dialect.lock_version, ())
    rows = (yield (f"SELECT id FROM {table} WHERE {column} = ?", (ident,))).rows
    if rows:
        yield (f"UPDATE {table} SET content = ? WHERE {column} = ?", (content, ident))
    else:
        yield (f"INSERT INTO {table} ({column}, content) VALUES (?, ?)", (ident, content))


def delete_name(kind: str, ident: int) -> Op[bool]:
    """Delete every row naming an id; False if there was none."""
    table, column = NAME_TABLES[kind]
    return (yield (f"DELETE FROM {table} WHERE {column} = ?", (ident,))).rowcount > 0


# --- call history and alarms (issue 10) --------------------------------------------------------

#: The per-minute call buckets, and their columns in the order of the rows written.
HISTORY_TABLE = "CallHistory"
HISTORY_COLUMNS = ("modid", "cmdid", "ip", "port", "minute", "succ", "err")
_HISTORY_COLUMNS = ", ".join(HISTORY_COLUMNS)
#: Where a CallHistory count stops growing: the largest integer both databases hold.
HISTORY_COUNT_MAX = 2**63 - 1
#: CallHistory rows per INSERT (a reporter batch's, usually).
HISTORY_CHUNK = 2000
#: One CallHistory row of an INSERT, written into the statement rather than passed as
#: parameters: the MySQL driver escapes parameters one by one in Python, which for the
#: reporter's thousands of values a batch costs more than the write. ``%d`` takes nothing
#: but a number, so no text ever gets into the statement this way.
_HISTORY_VALUES = "(%d,%d,%d,%d,%d,%d,%d)"
#: The name of the lease row of the alarm evaluation.
ALARM_LEASE = "alarms"
#: Longest AlarmLease.holder, AlarmState.kind, and AlarmState.host / .caller.
LEASE_HOLDER_MAX = 128
ALARM_KIND_MAX = 32
ALARM_ADDRESS_MAX = 64
#: AlarmState's and AlarmEvent's columns, in the order of :func:`_state_values` and
#: :func:`_event_values`.
ALARM_STATE_COLUMNS = (
    "rule",
    "subject",
    "kind",
    "firing",
    "since",
    "value",
    "threshold",
    "modid",
    "cmdid",
    "host",
    "caller",
    "updated",
    "notified_firing",
    "notified_at",
)
ALARM_EVENT_COLUMNS = (
    "ts",
    "rule",
    "subject",
    "kind",
    "firing",
    "value",
    "threshold",
    "modid",
    "cmdid",
    "host",
    "caller",
)
_STATE_SELECT = f"SELECT {', '.join(ALARM_STATE_COLUMNS)} FROM AlarmState"
_EVENT_SELECT = f"SELECT id, {', '.join(ALARM_EVENT_COLUMNS)} FROM AlarmEvent"
_RULE_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


def check_epoch(value: object, name: str) -> int:
    """An epoch second (an integer of 0 or more), else :class:`InvalidValue`."""
    if type(value) is not int or value < 0:
        raise InvalidValue(f"{name} must be epoch seconds, an integer of 0 or more, got {value!r}")
    return value


def check_step(step: object) -> int:
    """A history step: a positive multiple of :data:`HISTORY_STEP` seconds."""
    if type(step) is not int or step <= 0 or step % HISTORY_STEP:
        raise InvalidValue(
            f"step must be a positive multiple of {HISTORY_STEP} seconds, got {step!r}"
        )
    return step


def check_span(since: object, until: object) -> tuple[int, int]:
    """``(since, until)``: epoch seconds, ``since`` not after ``until``."""
    start, end = check_epoch(since, "since"), check_epoch(until, "until")
    if start > end:
        raise InvalidValue(f"since ({start}) must not be after until ({end})")
    return start, end


def check_modules(modules: object) -> list[ModuleKey]:
    """Up to :data:`PAGE_MAX` distinct modules, validated, sorted."""
    if isinstance(modules, str | bytes) or not isinstance(modules, Collection):
        raise InvalidValue(f"modules must be a collection of (modid, cmdid), got {modules!r}")
    keys = sorted({_as_module(module) for module in modules})
    if len(keys) > PAGE_MAX:
        raise InvalidValue(f"at most {PAGE_MAX} modules at a time, got {len(keys)}")
    return keys


def check_rule_name(name: object) -> str:
    """An alarm rule's name: 1 to :data:`ALARM_NAME_MAX` characters of ``A-Z a-z 0-9 _ . -``."""
    if type(name) is not str or len(name) > ALARM_NAME_MAX or not _RULE_NAME.fullmatch(name):
        raise InvalidValue(
            f"an alarm rule name must be 1 to {ALARM_NAME_MAX} characters of letters, digits,"
            f" '_', '.' and '-', got {name!r}"
        )
    return name


def rule_json(definition: object) -> str:
    """A rule definition as the compact JSON text AlarmRule keeps: a JSON object of at most
    :data:`ALARM_RULE_MAX_BYTES` bytes, else :class:`InvalidValue`."""
    if not isinstance(definition, Mapping):
        raise InvalidValue(
            f"an alarm rule definition must be a JSON object, got {definition!r:.80}"
        )
    try:
        text = json.dumps(dict(definition), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"an alarm rule definition must be JSON data: {exc}") from None
    if len(text) > ALARM_RULE_MAX_BYTES:  # ASCII: json.dumps escapes everything else
        raise InvalidValue(
            f"an alarm rule definition must take at most {ALARM_RULE_MAX_BYTES} bytes of JSON,"
            f" got {len(text)}"
        )
    return text


def check_holder(holder: object) -> str:
    """A lease holder's name: 1 to :data:`LEASE_HOLDER_MAX` characters."""
    if type(holder) is not str or not holder or len(holder) > LEASE_HOLDER_MAX:
        raise InvalidValue(
            f"a lease holder must be text of 1 to {LEASE_HOLDER_MAX} characters, got {holder!r}"
        )
    return holder


def _check_text(value: object, name: str, most: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str or not value or len(value) > most:
        raise InvalidValue(f"{name} must be text of 1 to {most} characters, got {value!r}")


def _check_number(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValue(f"{name} must be a finite number, got {value!r}")


def _check_flag(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not bool:
        raise InvalidValue(f"{name} must be true or false, got {value!r}")


def _check_alarm(alarm: AlarmState | AlarmEvent) -> None:
    """Raise :class:`InvalidValue` for a state or event the alarm tables cannot hold."""
    what = f"alarm {alarm.rule!r} {alarm.subject!r}"
    check_rule_name(alarm.rule)
    _check_text(alarm.subject, f"{what}: subject", ALARM_SUBJECT_MAX)
    _check_text(alarm.kind, f"{what}: kind", ALARM_KIND_MAX)
    _check_flag(alarm.firing, f"{what}: firing")
    _check_number(alarm.value, f"{what}: value", optional=True)
    _check_number(alarm.threshold, f"{what}: threshold")
    for name, ident in (("modid", alarm.modid), ("cmdid", alarm.cmdid)):
        if ident is not None:
            check_id(ident, f"{what}: {name}")
    _check_text(alarm.host, f"{what}: host", ALARM_ADDRESS_MAX, optional=True)
    _check_text(alarm.caller, f"{what}: caller", ALARM_ADDRESS_MAX, optional=True)
    if isinstance(alarm, AlarmState):
        for name, value in (
            ("since", alarm.since),
            ("updated", alarm.updated),
            ("notified_at", alarm.notified_at),
        ):
            _check_number(value, f"{what}: {name}")
        _check_flag(alarm.notified_firing, f"{what}: notified_firing", optional=True)
    else:
        _check_number(alarm.ts, f"{what}: ts")


def check_decision(decision: object) -> AlarmDecision:
    """An :class:`AlarmDecision` whose every state, key and event the alarm tables hold,
    else :class:`InvalidValue` (raised inside the round's transaction: nothing is written)."""
    if not isinstance(decision, AlarmDecision):
        raise InvalidValue(f"decide must return an AlarmDecision, got {decision!r:.80}")
    for state in decision.states:
        if not isinstance(state, AlarmState):
            raise InvalidValue(f"decision states must be AlarmState, got {state!r:.80}")
        _check_alarm(state)
    for event in decision.events:
        if not isinstance(event, AlarmEvent):
            raise InvalidValue(f"decision events must be AlarmEvent, got {event!r:.80}")
        _check_alarm(event)
    for key in decision.deleted:
        if not (isinstance(key, tuple) and len(key) == 2 and all(type(k) is str for k in key)):
            raise InvalidValue(f"deleted keys must be (rule, subject) texts, got {key!r:.80}")
    return decision


def _sums(rows: list[tuple[Any, ...]]) -> Generator[tuple[Any, ...], None, None]:
    """The rows of a grouped query whose last two columns (calls) are not both 0, those
    two as ints (SQLite's TOTAL gives floats, MySQL's SUM decimals)."""
    for *key, succ, err in rows:
        if succ or err:
            yield (*key, int(succ), int(err))


def _bucket(step: int) -> str:
    """The start of a row's ``step``-second bucket (``step`` is a checked integer)."""
    return f"minute - minute % {int(step)}"


def call_history(
    dialect: Dialect, module: ModuleKey, since: int, until: int, step: int
) -> Op[dict[HostKey, list[CallPoint]]]:
    """One module's calls per host in ``step``-second buckets of ``[since, until)``, summed
    over callers: a range of the table's key per host."""
    rows = (
        yield (
            f"SELECT ip, port, {_bucket(step)} AS t, {dialect.total}(succ), {dialect.total}(err)"
            f" FROM {HISTORY_TABLE} WHERE modid = ? AND cmdid = ? AND minute >= ? AND minute < ?"
            " GROUP BY ip, port, t ORDER BY ip, port, t",
            (*module, since, until),
        )
    ).rows
    series: dict[HostKey, list[CallPoint]] = {}
    for ip, port, t, succ, err in _sums(rows):
        series.setdefault((int(ip), int(port)), []).append(CallPoint(int(t), succ, err))
    return series


def module_sparklines(
    dialect: Dialect, modules: Sequence[ModuleKey], since: int, step: int
) -> Op[dict[ModuleKey, list[CallPoint]]]:
    """Each module's calls summed over hosts and callers in ``step``-second buckets from
    ``since`` on, in one query."""
    if not modules:
        return {}
    which, flat = _modules_where(modules)
    rows = (
        yield (
            f"SELECT modid, cmdid, {_bucket(step)} AS t,"
            f" {dialect.total}(succ), {dialect.total}(err) FROM {HISTORY_TABLE}"
            f" WHERE minute >= ? AND ({which}) GROUP BY modid, cmdid, t ORDER BY modid, cmdid, t",
            (since, *flat),
        )
    ).rows
    lines: dict[ModuleKey, list[CallPoint]] = {}
    for modid, cmdid, t, succ, err in _sums(rows):
        lines.setdefault((int(modid), int(cmdid)), []).append(CallPoint(int(t), succ, err))
    return lines


def window_calls(dialect: Dialect, since: int) -> Op[list[HostCalls]]:
    """Every host's calls from ``since`` on, summed over callers and minutes."""
    rows = (
        yield (
            f"SELECT modid, cmdid, ip, port, {dialect.total}(succ), {dialect.total}(err)"
            f" FROM {HISTORY_TABLE} WHERE minute >= ? GROUP BY modid, cmdid, ip, port",
            (since,),
        )
    ).rows
    return [
        HostCalls(int(modid), int(cmdid), int(ip), int(port), succ, err)
        for modid, cmdid, ip, port, succ, err in _sums(rows)
    ]


def purge_history(dialect: Dialect, older_than: int, limit: int) -> Op[int]:
    """Delete at most ``limit`` CallHistory rows of minutes before ``older_than``."""
    return (yield (dialect.purge_history, (older_than, limit))).rowcount


def overloaded_status(since: int) -> Op[list[CallStatus]]:
    """ServerCallStatus rows flagged overloaded and reported at ``since`` or later."""
    rows = (
        yield (
            f"SELECT {_STATUS_COLUMNS} FROM ServerCallStatus WHERE {_OVERLOADED} AND ts >= ?"
            " ORDER BY modid, cmdid, ip, port, caller",
            (since,),
        )
    ).rows
    return [_status_row(row) for row in rows]


def caller_last_reports() -> Op[dict[int, int]]:
    """Each caller's newest ServerCallStatus.ts."""
    rows = (yield ("SELECT caller, MAX(ts) FROM ServerCallStatus GROUP BY caller", ())).rows
    return {int(caller): int(ts) for caller, ts in rows}


def list_alarm_rules() -> Op[list[StoredRule]]:
    """The AlarmRule rows by name; a definition that is not a JSON object reads as ``{}``
    (logged)."""
    rows = (yield ("SELECT name, definition, updated, actor FROM AlarmRule ORDER BY name", ())).rows
    rules = []
    for name, text, updated, actor in rows:
        try:
            definition = json.loads(_text(text))
        except ValueError:
            definition = None
        if not isinstance(definition, dict):
            log.warning("alarm rule %s: its definition is not a JSON object: %.80r", name, text)
            definition = {}
        rules.append(StoredRule(_text(name), definition, float(updated), _text(actor)))
    return rules


def put_alarm_rule(name: str, definition: str, now: float, actor: str) -> Op[None]:
    """Insert or replace a rule (``definition``: its JSON text)."""
    yield (
        "REPLACE INTO AlarmRule (name, definition, updated, actor) VALUES (?, ?, ?, ?)",
        (name, definition, now, actor),
    )


def delete_alarm_rule(name: str) -> Op[bool]:
    """Delete a rule (not its states: the alarm engine's next round resolves the firing ones,
    telling the webhooks, and deletes them); False if there was no such rule."""
    return (yield ("DELETE FROM AlarmRule WHERE name = ?", (name,))).rowcount > 0


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(int(value))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _str(value: Any) -> str | None:
    return None if value is None else _text(value)


def _state_values(s: AlarmState) -> tuple[Any, ...]:
    """A state's values in ALARM_STATE_COLUMNS order (flags as 0/1)."""
    notified = None if s.notified_firing is None else int(s.notified_firing)
    return (
        s.rule,
        s.subject,
        s.kind,
        int(s.firing),
        s.since,
        s.value,
        s.threshold,
        s.modid,
        s.cmdid,
        s.host,
        s.caller,
        s.updated,
        notified,
        s.notified_at,
    )


def _event_values(e: AlarmEvent) -> tuple[Any, ...]:
    """An event's values in ALARM_EVENT_COLUMNS order."""
    return (
        e.ts,
        e.rule,
        e.subject,
        e.kind,
        int(e.firing),
        e.value,
        e.threshold,
        e.modid,
        e.cmdid,
        e.host,
        e.caller,
    )


def _state_row(row: Sequence[Any]) -> AlarmState:
    (
        rule,
        subject,
        kind,
        firing,
        since,
        value,
        threshold,
        modid,
        cmdid,
        host,
        caller,
        updated,
        notified_firing,
        notified_at,
    ) = row
    return AlarmState(
        _text(rule),
        _text(subject),
        _text(kind),
        bool(int(firing)),
        float(since),
        _float(value),
        float(threshold),
        _int(modid),
        _int(cmdid),
        _str(host),
        _str(caller),
        float(updated),
        _flag(notified_firing),
        float(notified_at),
    )


def _event_row(row: Sequence[Any]) -> AlarmEvent:
    id_, ts, rule, subject, kind, firing, value, threshold, modid, cmdid, host, caller = row
    return AlarmEvent(
        int(id_),
        float(ts),
        _text(rule),
        _text(subject),
        _text(kind),
        bool(int(firing)),
        _float(value),
        float(threshold),
        _int(modid),
        _int(cmdid),
        _str(host),
        _str(caller),
    )


def list_alarm_states(firing: bool | None, lock: str = "") -> Op[list[AlarmState]]:
    """AlarmState rows by rule and subject, all or only the firing or resolved ones
    (``lock``: :attr:`Dialect.for_update` to read them for a write)."""
    where, args = ("", ()) if firing is None else (" WHERE firing = ?", (int(firing),))
    rows = (yield (f"{_STATE_SELECT}{where} ORDER BY rule, subject{lock}", args)).rows
    return [_state_row(row) for row in rows]


def list_alarm_events(rule: str | None, limit: int, before_id: int | None) -> Op[list[AlarmEvent]]:
    """AlarmEvent rows newest first, of one rule or all, older than ``before_id``."""
    filters = [("rule = ?", (rule,))] if rule is not None else []
    rows = (yield _newest_first(_EVENT_SELECT, filters, before_id, limit)).rows
    return [_event_row(row) for row in rows]


def alarm_lease() -> Op[Lease | None]:
    """The alarms' lease row, or None."""
    rows = (yield ("SELECT holder, expires FROM AlarmLease WHERE name = ?", (ALARM_LEASE,))).rows
    return Lease(_text(rows[0][0]), float(rows[0][1])) if rows else None


def release_lease(holder: str) -> Op[None]:
    """End ``holder``'s lease now, if it holds it."""
    yield (
        "UPDATE AlarmLease SET expires = 0 WHERE name = ? AND holder = ?",
        (ALARM_LEASE, holder),
    )


def alarm_round(
    dialect: Dialect,
    holder: str,
    ttl: float,
    decide: Callable[[list[AlarmState]], AlarmDecision],
) -> Op[AlarmDecision | None]:
    """Take or renew the lease, then let ``decide`` turn every state into what to write.

    The lease row is created if missing and locked before anything is read, so rounds of
    all holders run one after the other; the clock is the database's, read once the lock
    is held, so the holders' own clocks never matter. Another holder's unexpired lease
    ends the round with nothing written. The events get their ids from the database, in
    order; the decision is returned with them.
    """
    yield (dialect.lock_lease, (ALARM_LEASE,))
    rows = (
        yield (
            f"SELECT holder, expires FROM AlarmLease WHERE name = ?{dialect.for_update}",
            (ALARM_LEASE,),
        )
    ).rows
    now = float((yield (dialect.clock, ())).rows[0][0])
    current, expires = _text(rows[0][0]), float(rows[0][1])
    if current != holder and expires > now:
        return None
    yield (
        "UPDATE AlarmLease SET holder = ?, expires = ? WHERE name = ?",
        (holder, now + ttl, ALARM_LEASE),
    )
    states = yield from list_alarm_states(None, dialect.for_update)
    decision = check_decision(decide(states))
    for key in decision.deleted:
        yield ("DELETE FROM AlarmState WHERE rule = ? AND subject = ?", key)
    for part in _chunks(decision.states):
        yield (
            f"REPLACE INTO AlarmState ({', '.join(ALARM_STATE_COLUMNS)}) VALUES "
            + _values_sql(len(ALARM_STATE_COLUMNS), len(part)),
            tuple(v for state in part for v in _state_values(state)),
        )
    events = []
    insert_event = (
        f"INSERT INTO AlarmEvent ({', '.join(ALARM_EVENT_COLUMNS)}) VALUES "
        + _values_sql(len(ALARM_EVENT_COLUMNS), 1)
    )
    for event in decision.events:  # one by one: each gets its id
        result = yield (insert_event, _event_values(event))
        assert result.lastrowid is not None
        events.append(attrs.evolve(event, id=int(result.lastrowid)))
    return attrs.evolve(decision, events=tuple(events))


def purge_alarms(older_than: float) -> Op[int]:
    """Delete the states resolved before ``older_than`` and the events older than it (in
    the order :func:`alarm_round` writes the tables, so the two never wait on each other)."""
    states = (
        yield ("DELETE FROM AlarmState WHERE firing = 0 AND since < ?", (older_than,))
    ).rowcount
    events = (yield ("DELETE FROM AlarmEvent WHERE ts < ?", (older_than,))).rowcount
    return states + events


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def drive_sync(op: Op[T], execute: Any) -> T:
    """Run an operation synchronously; ``execute(sql, args)`` returns a :class:`Result`."""
    try:
        query = next(op)
        while True:
            query = op.send(execute(*query))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
