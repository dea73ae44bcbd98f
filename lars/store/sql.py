"""Store logic shared by the SQL drivers, written once as sans-IO generators.

Each operation is a generator that yields ``(sql, args)`` queries and receives a
:class:`Result` for each; its return value is the operation's result. The SQLite driver runs
it synchronously in a worker thread, the MySQL driver with awaits on trio-mysql; neither
contains any route logic. SQL is written with ``?`` placeholders; :class:`Dialect` holds the
few statements that differ between the two databases.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection, Generator, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from lars.core.model import PORT_MAX, UINT32_MAX, HostKey, ModuleKey
from lars.store.base import CallStatus, RouteDelta, RouteMap, RouteSnapshot, RouteWrite

log = logging.getLogger("lars.store")

Query = tuple[str, tuple[Any, ...]]
T = TypeVar("T")


@attrs.frozen
class Result:
    """What a query returned: its rows (empty for DML) and the affected row count."""

    rows: list[tuple[Any, ...]]
    rowcount: int = 0


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
    #: False when integer columns hold 64 bits whatever their declared width (SQLite).
    sized_integers: bool = True
    #: Makes this session refuse (not clamp) values a column cannot hold.
    strict_session: str | None = None

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
    """Create missing tables, append missing columns, ensure the RouteVersion row."""
    done: list[str] = []
    existing = {row[0] for row in (yield (dialect.list_tables, ())).rows}
    for table in parse_tables(dialect.schema):
        if table.name not in existing:
            yield (table.create, ())
            done.append(f"created table {table.name}")
            continue
        have = {row[0] for row in (yield (dialect.list_columns, (table.name,))).rows}
        for column, definition in table.columns:
            if column not in have:
                yield (f"ALTER TABLE {table.name} ADD COLUMN {column} {definition}", ())
                done.append(f"added column {table.name}.{column}")
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


def _route_rows(rows: list[tuple[Any, ...]]) -> RouteMap:
    routes: dict[ModuleKey, set[HostKey]] = {}
    skipped = 0
    for modid, cmdid, ip, port in rows:
        if not (0 <= ip <= UINT32_MAX and 1 <= port <= PORT_MAX):
            skipped += 1
            continue
        routes.setdefault((modid, cmdid), set()).add((ip, port))
    if skipped:
        log.warning("skipped %d RouteData rows with an invalid ip or port", skipped)
    return {module: frozenset(hosts) for module, hosts in routes.items()}


def load_routes(changes_since: int | None) -> Op[RouteSnapshot]:
    """Read the version, every route and the modules changed after ``changes_since``."""
    version = yield from route_version()
    rows = (yield ("SELECT modid, cmdid, serverip, serverport FROM RouteData", ())).rows
    changed: frozenset[ModuleKey] = frozenset()
    if changes_since is not None:
        result = yield (
            "SELECT DISTINCT modid, cmdid FROM RouteChange WHERE version > ?",
            (changes_since,),
        )
        changed = frozenset((int(m), int(c)) for m, c in result.rows)
    return RouteSnapshot(version, _route_rows(rows), changed)


def load_changes(since: int) -> Op[RouteDelta]:
    """Read the version, the modules changed after ``since`` and those modules' routes."""
    version = yield from route_version()
    result = yield ("SELECT DISTINCT modid, cmdid FROM RouteChange WHERE version > ?", (since,))
    changed = sorted((int(m), int(c)) for m, c in result.rows)
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(changed):
        where = " OR ".join(["(modid = ? AND cmdid = ?)"] * len(chunk))
        flat = tuple(v for module in chunk for v in module)
        rows += (
            yield (f"SELECT modid, cmdid, serverip, serverport FROM RouteData WHERE {where}", flat)
        ).rows
    return RouteDelta(version, frozenset(changed), _route_rows(rows))


def change_routes(
    dialect: Dialect,
    add: Mapping[ModuleKey, Collection[HostKey]],
    remove: Mapping[ModuleKey, Collection[HostKey] | None],
    now: int,
) -> Op[RouteWrite]:
    """Apply adds and removes; on any change raise the version once and log RouteChange rows.

    The first statement locks the RouteVersion row, which serialises every route writer:
    versions rise in commit order and two writers never both insert the same host.
    """
    rows = (yield (dialect.lock_version, ())).rows
    if rows:
        old_version = int(rows[0][0])
    else:
        yield ("INSERT INTO RouteVersion (id, version) VALUES (1, 0)", ())
        old_version = 0
    modules = sorted(set(add) | set(remove))
    current: dict[ModuleKey, set[HostKey]] = {m: set() for m in modules}
    if len(modules) > 50:  # one scan beats thousands of lookups
        for modid, cmdid, ip, port in (
            yield ("SELECT modid, cmdid, serverip, serverport FROM RouteData", ())
        ).rows:
            if (modid, cmdid) in current:
                current[(modid, cmdid)].add((ip, port))
    else:
        for module in modules:
            current[module] = {
                (ip, port)
                for ip, port in (
                    yield (
                        "SELECT serverip, serverport FROM RouteData WHERE modid = ? AND cmdid = ?",
                        module,
                    )
                ).rows
            }
    changed: set[ModuleKey] = set()
    removed = 0
    inserts: list[tuple[int, int, int, int]] = []
    for module in modules:
        hosts = current[module]
        if module in remove:
            wanted = remove[module]
            gone = set(hosts) if wanted is None else hosts & set(wanted)
            if gone and gone == hosts:
                yield ("DELETE FROM RouteData WHERE modid = ? AND cmdid = ?", module)
            else:
                for ip, port in gone:
                    yield (
                        "DELETE FROM RouteData WHERE modid = ? AND cmdid = ? "
                        "AND serverip = ? AND serverport = ?",
                        (*module, ip, port),
                    )
            if gone:
                changed.add(module)
                removed += len(gone)
                hosts -= gone
        for host in dict.fromkeys(add.get(module, ())):
            if host not in hosts:
                inserts.append((*module, *host))
                hosts.add(host)
                changed.add(module)
    for chunk in _chunks(inserts):
        flat = tuple(v for row in chunk for v in row)
        yield (
            "INSERT INTO RouteData (modid, cmdid, serverip, serverport) VALUES "
            + _values_sql(4, len(chunk)),
            flat,
        )
    if not changed:
        return RouteWrite(None)
    new_version = max(old_version + 1, now)
    yield ("UPDATE RouteVersion SET version = ? WHERE id = 1", (new_version,))
    changes = sorted(changed)
    for modules_chunk in _chunks(changes):
        flat = tuple(v for module in modules_chunk for v in (*module, new_version))
        yield (
            "INSERT INTO RouteChange (modid, cmdid, version) VALUES "
            + _values_sql(3, len(modules_chunk)),
            flat,
        )
    return RouteWrite(new_version, frozenset(changed), added=len(inserts), removed=removed)


def list_routes(modid: int | None, cmdid: int | None) -> Op[dict[ModuleKey, list[HostKey]]]:
    """Routes sorted by module and host, filtered by modid and cmdid when given."""
    sql = "SELECT modid, cmdid, serverip, serverport FROM RouteData"
    args: tuple[int, ...] = ()
    if modid is not None:
        sql += " WHERE modid = ?"
        args = (modid,)
        if cmdid is not None:
            sql += " AND cmdid = ?"
            args = (modid, cmdid)
    routes = _route_rows((yield (sql, args)).rows)
    return {module: sorted(routes[module]) for module in sorted(routes)}


def purge_changes(dialect: Dialect, older_than: float) -> Op[int]:
    """Delete RouteChange rows older than ``older_than`` seconds."""
    return (yield (dialect.purge_changes, (int(older_than),))).rowcount


def status_values(r: CallStatus) -> tuple[int | str, ...]:
    """A row's ServerCallStatus values in STATUS_COLUMNS order: the counts of the latest
    report clamped to a signed INT, the totals exact."""
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
        r.succ,
        r.err,
    )


def upsert_call_status(dialect: Dialect, rows: Sequence[CallStatus]) -> Op[None]:
    """Upsert statistics: the latest counts replace the row's, the totals add up."""
    for chunk in _chunks(rows):
        flat: list[Any] = []
        for r in chunk:
            flat += status_values(r)
        yield (
            f"INSERT INTO ServerCallStatus ({_STATUS_COLUMNS}) VALUES "
            + _values_sql(11, len(chunk))
            + dialect.upsert_status_suffix,
            tuple(flat),
        )


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
    rows = (yield (sql, args)).rows
    return [
        CallStatus(
            int(m),
            int(c),
            int(ip),
            int(port),
            int(caller),
            int(s),
            int(e),
            int(ts),
            str(ovl).upper() in ("1", "Y", "T"),
            int(st),
            int(et),
        )
        for m, c, ip, port, caller, s, e, ts, ovl, st, et in rows
    ]


def now_seconds() -> int:
    """Wall-clock seconds, as stored in versions and timestamps."""
    return int(time.time())


def drive_sync(op: Op[T], execute: Any) -> T:
    """Run an operation synchronously; ``execute(sql, args)`` returns a :class:`Result`."""
    try:
        query = next(op)
        while True:
            query = op.send(execute(*query))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
