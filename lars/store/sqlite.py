"""The embedded SQLite store: stdlib sqlite3, run in a worker thread off the event loop."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from lars.errors import SchemaMissing, StoreError, StoreUnavailable
from lars.store import sql
from lars.store.sqlstore import SqlStore, Txn

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS RouteData (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    modid INTEGER NOT NULL,
    cmdid INTEGER NOT NULL,
    serverip INTEGER NOT NULL,
    serverport INTEGER NOT NULL,
    weight INTEGER NOT NULL DEFAULT 100,
    zone TEXT NOT NULL DEFAULT '',
    lease_expires INTEGER DEFAULT NULL
);
CREATE INDEX IF NOT EXISTS RouteData_module ON RouteData (modid, cmdid);
-- Self-registered hosts (DESIGN §14): see mysql_schema.sql.
CREATE INDEX IF NOT EXISTS RouteData_lease ON RouteData (lease_expires);
CREATE TABLE IF NOT EXISTS RouteVersion (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS RouteChange (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    modid INTEGER NOT NULL,
    cmdid INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
);
CREATE INDEX IF NOT EXISTS RouteChange_version ON RouteChange (version);
CREATE TABLE IF NOT EXISTS ServerCallStatus (
    modid INTEGER NOT NULL,
    cmdid INTEGER NOT NULL,
    ip INTEGER NOT NULL,
    port INTEGER NOT NULL,
    caller INTEGER NOT NULL,
    succ_cnt INTEGER NOT NULL,
    err_cnt INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    overload TEXT NOT NULL,
    succ_total INTEGER NOT NULL DEFAULT 0,
    err_total INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (modid, cmdid, ip, port, caller)
);
CREATE TABLE IF NOT EXISTS ModIDConfig (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    modid INTEGER NOT NULL,
    content TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS CmdIDConfig (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cmdid INTEGER NOT NULL,
    content TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS RouteAudit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    modid INTEGER NOT NULL,
    cmdid INTEGER NOT NULL,
    added TEXT NOT NULL,
    removed TEXT NOT NULL,
    version INTEGER NOT NULL,
    changes TEXT
);
-- Weights, zones and policies (DESIGN §13): see mysql_schema.sql.
CREATE TABLE IF NOT EXISTS RoutePolicy (
    modid INTEGER NOT NULL,
    cmdid INTEGER NOT NULL,
    policy TEXT NOT NULL DEFAULT 'rr',
    zone_affinity INTEGER NOT NULL DEFAULT 0,
    zone_failover REAL NOT NULL DEFAULT 0.7,
    panic_threshold REAL NOT NULL DEFAULT 0,
    slow_start REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (modid, cmdid)
);
-- The call history and the alarms (issue 10): see mysql_schema.sql for what they hold.
CREATE TABLE IF NOT EXISTS CallHistory (
    modid INTEGER NOT NULL,
    cmdid INTEGER NOT NULL,
    ip INTEGER NOT NULL,
    port INTEGER NOT NULL,
    minute INTEGER NOT NULL,
    succ INTEGER NOT NULL DEFAULT 0,
    err INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (modid, cmdid, minute, ip, port)
);
CREATE TABLE IF NOT EXISTS ReportBatch (
    token BLOB NOT NULL,
    written INTEGER NOT NULL,
    PRIMARY KEY (token)
);
CREATE TABLE IF NOT EXISTS AlarmRule (
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    updated REAL NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (name)
);
CREATE TABLE IF NOT EXISTS AlarmState (
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    firing INTEGER NOT NULL,
    since REAL NOT NULL,
    value REAL,
    threshold REAL NOT NULL,
    modid INTEGER,
    cmdid INTEGER,
    host TEXT,
    caller TEXT,
    updated REAL NOT NULL DEFAULT 0,
    notified_firing INTEGER,
    notified_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (rule, subject)
);
CREATE TABLE IF NOT EXISTS AlarmEvent (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    firing INTEGER NOT NULL,
    value REAL,
    threshold REAL NOT NULL,
    modid INTEGER,
    cmdid INTEGER,
    host TEXT,
    caller TEXT
);
CREATE TABLE IF NOT EXISTS AlarmLease (
    name TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (name)
);
CREATE INDEX IF NOT EXISTS CallHistory_minute ON CallHistory (minute);
CREATE INDEX IF NOT EXISTS ReportBatch_written ON ReportBatch (written);
CREATE INDEX IF NOT EXISTS AlarmEvent_rule ON AlarmEvent (rule, id);
CREATE INDEX IF NOT EXISTS AlarmEvent_ts ON AlarmEvent (ts);
CREATE INDEX IF NOT EXISTS RouteAudit_module ON RouteAudit (modid, cmdid, id);
CREATE INDEX IF NOT EXISTS RouteAudit_ts ON RouteAudit (ts);
CREATE INDEX IF NOT EXISTS RouteChange_module ON RouteChange (modid, cmdid, version);
CREATE INDEX IF NOT EXISTS ServerCallStatus_caller ON ServerCallStatus (caller);
CREATE INDEX IF NOT EXISTS ServerCallStatus_overload ON ServerCallStatus (overload);
CREATE INDEX IF NOT EXISTS ModIDConfig_modid ON ModIDConfig (modid);
CREATE INDEX IF NOT EXISTS CmdIDConfig_cmdid ON CmdIDConfig (cmdid);
"""


def _saturating_sum(column: str) -> str:
    """``column + excluded.column``, or HISTORY_COUNT_MAX where the sum would pass it."""
    most = sql.HISTORY_COUNT_MAX
    return (
        f"CASE WHEN excluded.{column} > {most} - {column} THEN {most}"
        f" ELSE {column} + excluded.{column} END"
    )


DIALECT = sql.Dialect(
    name="sqlite",
    schema=SCHEMA,
    # BEGIN IMMEDIATE already holds the write lock: every writer is serialised.
    lock_version="SELECT version FROM RouteVersion WHERE id = 1",
    list_tables="SELECT name FROM sqlite_master WHERE type = 'table'",
    list_columns="SELECT name, type FROM pragma_table_info(?)",
    list_indexes=(
        'SELECT il.name, NOT il."unique", ii.name FROM pragma_index_list(?) AS il'
        " JOIN pragma_index_info(il.name) AS ii ORDER BY il.name, ii.seqno"
    ),
    add_key="CREATE {unique}INDEX IF NOT EXISTS {name} ON {table} ({columns})",
    upsert_status_suffix=(
        " ON CONFLICT (modid, cmdid, ip, port, caller) DO UPDATE SET"
        " succ_cnt = excluded.succ_cnt, err_cnt = excluded.err_cnt, ts = excluded.ts,"
        " overload = excluded.overload, succ_total = succ_total + excluded.succ_total,"
        " err_total = err_total + excluded.err_total"
    ),
    purge_changes=(
        "DELETE FROM RouteChange WHERE created < CAST(strftime('%s', 'now') AS INTEGER) - ?"
    ),
    # The counts stop at HISTORY_COUNT_MAX rather than overflow.
    upsert_history_suffix=(
        " ON CONFLICT (modid, cmdid, ip, port, minute) DO UPDATE SET"
        f" succ = {_saturating_sum('succ')}, err = {_saturating_sum('err')}"
    ),
    # SQLite's DELETE takes no LIMIT (unless built with an option).
    purge_history=(
        "DELETE FROM CallHistory WHERE rowid IN"
        " (SELECT rowid FROM CallHistory WHERE minute < ? LIMIT ?)"
    ),
    claim_batch="INSERT OR IGNORE INTO ReportBatch (token, written) VALUES (?, ?)",
    purge_batches=(
        "DELETE FROM ReportBatch WHERE rowid IN"
        " (SELECT rowid FROM ReportBatch WHERE written < ? LIMIT ?)"
    ),
    clock="SELECT (julianday('now') - 2440587.5) * 86400.0",
    # BEGIN IMMEDIATE holds the write lock: the row needs no lock of its own.
    lock_lease=(
        "INSERT INTO AlarmLease (name, holder, expires) VALUES (?, '', 0)"
        " ON CONFLICT (name) DO NOTHING"
    ),
    for_update="",
    # SUM fails on an integer overflow; TOTAL gives a float.
    total="TOTAL",
    sized_integers=False,
    # BEGIN IMMEDIATE holds the write lock: expired rows need no lock of their own.
    skip_locked="",
    greatest="MAX",
)


def _translate(exc: sqlite3.Error, path: str) -> StoreError:
    text = str(exc)
    if "no such table" in text or "no such column" in text:
        return SchemaMissing(
            f"the SQLite store {path} is not initialised ({text}); run `lars db init`"
        )
    if isinstance(exc, sqlite3.OperationalError) and (
        "unable to open" in text or "locked" in text or "disk I/O" in text
    ):
        return StoreUnavailable(f"SQLite store {path}: {text}")
    return StoreError(f"SQLite store {path}: {text}")


class SqliteStore(SqlStore):
    """Routes in one SQLite file, accessed from one worker thread at a time.

    With ``create=False`` a missing file is an error rather than a new empty database, so a
    mistyped path does not silently create one. ``inline=True`` runs every query on the
    calling thread, blocking the event loop: only for tests under trio's MockClock, where a
    worker thread would look like idle time and make the clock jump.
    """

    kind = "sqlite"
    dialect = DIALECT

    def __init__(self, path: str, *, create: bool = False, inline: bool = False) -> None:
        self.path = path
        self.display_url = f"sqlite:///{path}"
        self._create = create
        self._inline = inline
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    def _connect(self) -> sqlite3.Connection:
        memory = self.path == ":memory:"
        if not memory and not self._create and not os.path.exists(self.path):
            raise StoreUnavailable(
                f"no SQLite database at {os.path.abspath(self.path)}; run `lars db init`"
            )
        conn = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        if not memory:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _run_sync(self, make_op: Callable[[], sql.Op[T]], txn: Txn) -> T:
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            cursor = conn.cursor()

            def execute(query: str, args: tuple[Any, ...]) -> sql.Result:
                cursor.execute(query, args)
                return sql.Result(cursor.fetchall(), cursor.rowcount, cursor.lastrowid)

            if txn is not None:
                cursor.execute("BEGIN IMMEDIATE" if txn == "write" else "BEGIN")
            try:
                result = sql.drive_sync(make_op(), execute)
                if txn is not None:
                    cursor.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            return result
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        except OverflowError as exc:  # an integer beyond SQLite's 64 bits
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    async def _run(self, make_op: Callable[[], sql.Op[T]], txn: Txn = None) -> T:
        if self._inline:
            await trio.lowlevel.checkpoint()
            return self._run_sync(make_op, txn)
        return await trio.to_thread.run_sync(self._run_sync, make_op, txn, limiter=self._limiter)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._inline:
            conn.close()
        elif conn is not None:
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
