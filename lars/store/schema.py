"""A database compared with Lars's schema: what a role needs and lacks, what the statistics
columns hold, and the plan that ``lars db upgrade`` runs.

Sans-IO generators like :mod:`lars.store.sql`, run by both drivers. Nothing here drops data:
an upgrade appends columns, widens integer columns, adds keys, and removes only rows that
repeat another row exactly; data a wider type cannot hold stops it before any change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import attrs

from lars.store.base import CallStatus
from lars.store.sql import (
    STATUS_COLUMNS,
    STATUS_TABLE,
    Dialect,
    KeyDef,
    Op,
    TableDef,
    parse_tables,
    status_values,
    type_name,
)


def missing_schema(dialect: Dialect, required: Mapping[str, Collection[str]]) -> Op[list[str]]:
    """What the database lacks of the ``required`` tables and columns (table -> columns):
    ``"table X"`` and ``"column X.c"`` entries, empty when nothing is missing."""
    existing = {str(row[0]).lower() for row in (yield (dialect.list_tables, ())).rows}
    missing = []
    for table, columns in required.items():
        if table.lower() not in existing:
            missing.append(f"table {table}")
            continue
        have = {str(row[0]) for row in (yield (dialect.list_columns, (table,))).rows}
        missing += [f"column {table}.{c}" for c in columns if c not in have]
    return missing


@attrs.frozen
class UpgradeStep:
    """One change of ``lars db upgrade``: what it does, in words, and its statements."""

    description: str
    statements: tuple[str, ...]


@attrs.frozen
class UpgradePlan:
    """What ``lars db upgrade`` would change, and what stops it from changing anything."""

    steps: tuple[UpgradeStep, ...]
    #: Data the upgrade cannot keep as it is (values out of the new type's range, ...).
    blockers: tuple[str, ...] = ()


#: Index name -> (unique, columns).
IndexMap = dict[str, tuple[bool, tuple[str, ...]]]


def _indexes(dialect: Dialect, table: str) -> Op[IndexMap]:
    indexes: dict[str, tuple[bool, list[str]]] = {}
    for name, non_unique, column in (yield (dialect.list_indexes, (table,))).rows:
        indexes.setdefault(str(name), (not int(non_unique), []))[1].append(str(column))
    return {name: (unique, tuple(columns)) for name, (unique, columns) in indexes.items()}


def _has_key(indexes: IndexMap, key: KeyDef) -> bool:
    """True if an index serves as ``key``: a unique one on its columns, or (for a plain key)
    any index that starts with them."""
    n = len(key.columns)
    return any(
        columns == key.columns if key.unique else columns[:n] == key.columns
        for unique, columns in indexes.values()
        if unique or not key.unique
    )


def _range_text(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]} to {bounds[1]}"


def plan_upgrade(dialect: Dialect) -> Op[UpgradePlan]:
    """Compare the database with the schema and plan what brings it there, never dropping
    data: missing tables, appended columns (with their defaults), integer columns narrower
    than the schema's widened, missing keys added (a unique key after removing the rows that
    repeat another row exactly), the RouteVersion row. Reads only; see :func:`apply_upgrade`.
    """
    steps: list[UpgradeStep] = []
    blockers: list[str] = []
    existing = {str(row[0]).lower() for row in (yield (dialect.list_tables, ())).rows}
    for table in parse_tables(dialect.schema):
        name = table.name
        if name.lower() not in existing:
            steps.append(UpgradeStep(f"create table {name}", (table.create,)))
            declared = dict(table.columns)
            indexes: IndexMap = {k.name: (k.unique, k.columns) for k in table.keys if k.inline}
        else:
            rows = (yield (dialect.list_columns, (name,))).rows
            declared = {str(column): _text(kind) for column, kind in rows}
            indexes = yield from _indexes(dialect, name)
            for column, definition in table.columns:
                if column not in declared:
                    statement = f"ALTER TABLE {name} ADD COLUMN {column} {definition}"
                    steps.append(UpgradeStep(f"append column {name}.{column}", (statement,)))
            widen = yield from _plan_widening(dialect, table, declared, blockers)
            if widen:
                steps.append(widen)
        for key in table.keys:
            if _has_key(indexes, key):
                continue
            if key.name in indexes:
                blockers.append(
                    f"{name} has an index named {key.name} on other columns"
                    f" ({', '.join(indexes[key.name][1])}); rename it"
                )
                continue
            if key.unique:
                steps += yield from _plan_dedup(table, key, declared, indexes, blockers)
            columns = ", ".join(key.columns)
            unique = "UNIQUE " if key.unique else ""
            statement = dialect.add_key.format(
                table=name, name=key.name, unique=unique, columns=columns
            )
            what = f"add a {unique.lower()}key {key.name} on {name} ({columns})"
            steps.append(UpgradeStep(what, (statement,)))
    if (
        "routeversion" not in existing
        or not ((yield ("SELECT COUNT(*) FROM RouteVersion", ())).rows[0][0])
    ):
        statement = "INSERT INTO RouteVersion (id, version) VALUES (1, 0)"
        steps.append(UpgradeStep("create the RouteVersion row", (statement,)))
    return UpgradePlan(tuple(steps), tuple(blockers))


def _plan_widening(
    dialect: Dialect, table: TableDef, declared: Mapping[str, str], blockers: list[str]
) -> Op[UpgradeStep | None]:
    """One ALTER for every integer column that holds less than the schema's type (one
    rebuild of the table); a column holding values the schema's type cannot is a blocker."""
    changes = []
    for column, definition in table.columns:
        have = dialect.integer_range(declared.get(column, ""))
        want = dialect.integer_range(definition)
        if have is None or want is None or (have[0] <= want[0] and want[1] <= have[1]):
            continue
        if not (want[0] <= have[0] and have[1] <= want[1]):
            outside = (
                yield (
                    f"SELECT COUNT(*) FROM {table.name} WHERE {column} < ? OR {column} > ?",
                    want,
                )
            ).rows[0][0]
            if outside:
                blockers.append(
                    f"{table.name}.{column}: {outside} rows hold values outside"
                    f" {type_name(definition)} ({_range_text(want)}); fix or delete them"
                )
                continue
        changes.append((column, declared[column], definition))
    if not changes:
        return None
    what = ", ".join(f"{c} from {kind} to {type_name(d)}" for c, kind, d in changes)
    clauses = ", ".join(f"MODIFY COLUMN {c} {d}" for c, _, d in changes)
    return UpgradeStep(
        f"widen {table.name} columns: {what}", (f"ALTER TABLE {table.name} {clauses}",)
    )


def _plan_dedup(
    table: TableDef,
    key: KeyDef,
    declared: Mapping[str, str],
    indexes: IndexMap,
    blockers: list[str],
) -> Op[list[UpgradeStep]]:
    """Steps that remove the rows repeating another row on ``key``'s columns, keeping the
    first: done only when the rows are identical apart from their primary key (then keeping
    one loses nothing), else a blocker."""
    columns = ", ".join(key.columns)
    primary = indexes.get("PRIMARY", (False, ()))[1]
    pk = primary[0] if len(primary) == 1 else None
    others = sorted(set(declared) - set(key.columns) - set(primary))
    # How many values each other column takes within a group: 1 everywhere = identical rows.
    distinct = "".join(f", COUNT(DISTINCT {c})" for c in others)
    groups = (
        yield (
            f"SELECT {columns}, COUNT(*), {f'MIN({pk})' if pk else 'NULL'}{distinct}"
            f" FROM {table.name} GROUP BY {columns} HAVING COUNT(*) > 1",
            (),
        )
    ).rows
    if not groups:
        return []
    differ = sum(1 for g in groups if any(int(n) > 1 for n in g[len(key.columns) + 2 :]))
    groups = [tuple(g[: len(key.columns) + 2]) for g in groups]
    if pk is None or differ or not all(type(v) is int for g in groups for v in g):
        blockers.append(
            f"{table.name}: {differ or len(groups)} sets of rows repeat ({columns}) and may differ"
            f" otherwise; remove the repeated rows by hand before the unique key {key.name}"
        )
        return []
    steps = []
    for *values, count, first in groups:
        pairs = list(zip(key.columns, values, strict=True))
        where = " AND ".join(f"{c} = {v}" for c, v in pairs)
        text = ", ".join(f"{c}={v}" for c, v in pairs)
        steps.append(
            UpgradeStep(
                f"remove {count - 1} duplicate(s) of {table.name} row {pk}={first} ({text})",
                (f"DELETE FROM {table.name} WHERE {where} AND {pk} > {first}",),
            )
        )
    return steps


def apply_upgrade(dialect: Dialect, step: UpgradeStep) -> Op[None]:
    """Run one step of a :func:`plan_upgrade` plan (a value a column cannot hold is an error,
    never clamped)."""
    if dialect.strict_session:
        yield (dialect.strict_session, ())
    for statement in step.statements:
        yield (statement, ())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


@attrs.frozen
class ColumnLimits:
    """The values the integer columns of a database's ServerCallStatus hold, read from its
    declared types, so that a row that cannot be stored is found before it is written."""

    #: Column -> (lowest, highest).
    ranges: Mapping[str, tuple[int, int]]
    #: Column -> its declared type, for messages.
    types: Mapping[str, str]
    #: ``"column type"`` of each column narrower than Lars's schema (`lars db upgrade`).
    narrower: tuple[str, ...] = ()
    #: (position in :func:`status_values`, column, lowest, highest) of each bounded column:
    #: the reporter checks every row it writes.
    _checks: tuple[tuple[int, str, int, int], ...] = attrs.field(init=False)

    @_checks.default
    def _bounded_columns(self) -> tuple[tuple[int, str, int, int], ...]:
        return tuple(
            (i, column, *self.ranges[column])
            for i, column in enumerate(STATUS_COLUMNS)
            if column in self.ranges
        )

    def refusal(self, row: CallStatus) -> str | None:
        """Why ``row`` cannot be stored (its first value out of its column's range), or
        None when it fits."""
        values = status_values(row)
        for i, column, lowest, highest in self._checks:
            value = values[i]
            if type(value) is int and not lowest <= value <= highest:
                return f"{column} {value} does not fit {STATUS_TABLE}.{column} {self.types[column]}"
        return None


def status_limits(dialect: Dialect) -> Op[ColumnLimits | None]:
    """The :class:`ColumnLimits` of ServerCallStatus (None if the table is missing)."""
    rows = (yield (dialect.list_columns, (STATUS_TABLE,))).rows
    declared = {str(column): _text(kind) for column, kind in rows}
    if not declared:
        return None
    (ours,) = [t for t in parse_tables(dialect.schema) if t.name == STATUS_TABLE]
    wanted = dict(ours.columns)
    ranges = {}
    narrower = []
    for column in STATUS_COLUMNS:
        have = dialect.integer_range(declared.get(column, ""))
        if have is None:
            continue
        ranges[column] = have
        want = dialect.integer_range(wanted.get(column, ""))
        if want is not None and not (have[0] <= want[0] and want[1] <= have[1]):
            narrower.append(f"{column} {declared[column]}")
    return ColumnLimits(ranges, {c: declared[c] for c in ranges}, tuple(narrower))
