"""The MySQL store (MySQL, MariaDB and MySQL-protocol servers) on trio-mysql.

A small pool of connections. A pooled connection that turns out to be dead (the server
restarted, a proxy dropped it) is discarded and the operation retried once on a fresh one,
but only when nothing of the operation reached the server; after that, errors surface as
:class:`StoreUnavailable` and the caller decides (the DNS keeps its last good map, the
reporter retries its batch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import trio
import trio_mysql
import trio_mysql.connections
import trio_mysql.cursors
from trio_mysql.constants import CR, ER

from lars.errors import SchemaMissing, StoreError, StoreUnavailable
from lars.store import sql
from lars.store.sqlstore import SqlStore, Txn

T = TypeVar("T")

DEFAULT_POOL_SIZE = 4
#: Seconds one operation may take before the store counts as unavailable.
DEFAULT_QUERY_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0


def _schema() -> str:
    return resources.files("lars.store").joinpath("mysql_schema.sql").read_text("utf-8")


#: Largest BIGINT UNSIGNED (ServerCallStatus.succ_total/err_total).
BIGINT_UNSIGNED_MAX = 2**64 - 1


def _saturating_sum(column: str, most: int = BIGINT_UNSIGNED_MAX) -> str:
    """``column + VALUES(column)``, or ``most`` (the type's limit) where the sum would pass
    it."""
    return f"IF(VALUES({column}) > {most} - {column}, {most}, {column} + VALUES({column}))"


DIALECT = sql.Dialect(
    name="mysql",
    schema=_schema(),
    lock_version="SELECT version FROM RouteVersion WHERE id = 1 FOR UPDATE",
    list_tables="SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
    list_columns=(
        "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"
    ),
    list_indexes=(
        "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY INDEX_NAME, SEQ_IN_INDEX"
    ),
    add_key="ALTER TABLE {table} ADD {unique}KEY {name} ({columns})",
    # The totals stop at BIGINT UNSIGNED's limit rather than fail every later batch.
    upsert_status_suffix=(
        " ON DUPLICATE KEY UPDATE succ_cnt = VALUES(succ_cnt), err_cnt = VALUES(err_cnt),"
        " ts = VALUES(ts), overload = VALUES(overload),"
        f" succ_total = {_saturating_sum('succ_total')},"
        f" err_total = {_saturating_sum('err_total')}"
    ),
    purge_changes="DELETE FROM RouteChange WHERE created < NOW() - INTERVAL ? SECOND",
    # The counts stop where SQLite's would (HISTORY_COUNT_MAX), rather than fail the batch.
    upsert_history_suffix=(
        " ON DUPLICATE KEY UPDATE"
        f" succ = {_saturating_sum('succ', sql.HISTORY_COUNT_MAX)},"
        f" err = {_saturating_sum('err', sql.HISTORY_COUNT_MAX)}"
    ),
    purge_history="DELETE FROM CallHistory WHERE minute < ? LIMIT ?",
    # UNIX_TIMESTAMP() is exact whatever the session's time zone (UNIX_TIMESTAMP(NOW(6))
    # is an hour off in a daylight-saving fall-back hour); both read the statement's start.
    clock="SELECT UNIX_TIMESTAMP() + MICROSECOND(NOW(6)) * 0.000001",
    # ON DUPLICATE KEY UPDATE locks an existing row exclusively at once (INSERT IGNORE would
    # take a shared lock, and two rounds upgrading theirs would deadlock).
    lock_lease=(
        "INSERT INTO AlarmLease (name, holder, expires) VALUES (?, '', 0)"
        " ON DUPLICATE KEY UPDATE name = name"
    ),
    for_update=" FOR UPDATE",
    total="SUM",
    inline_integers=True,
    strict_session=(
        "SET SESSION sql_mode ="
        " TRIM(BOTH ',' FROM CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES'))"
    ),
)

_LOST = {
    CR.CR_CONN_HOST_ERROR,
    CR.CR_SERVER_GONE_ERROR,
    CR.CR_SERVER_LOST,
    CR.CR_CONNECTION_ERROR,
    ER.SERVER_SHUTDOWN,
    ER.CON_COUNT_ERROR,
    1927,  # ER_CONNECTION_KILLED (MariaDB)
}
_SCHEMA = {ER.NO_SUCH_TABLE, ER.BAD_FIELD_ERROR}


class _Connection(trio_mysql.connections.Connection):  # type: ignore[misc]
    """trio-mysql's connection with a force-close that really closes the socket.

    The library's version calls a ``close()`` that trio streams do not have and swallows the
    error, leaking the socket until garbage collection.
    """

    _sock: Any

    def _force_close(self) -> None:
        stream, self._sock = self._sock, None
        self._closed = True
        if stream is not None:
            try:
                stream.socket.close()
            except RuntimeError:  # outside trio (garbage collection): close the bare fd
                os.close(stream.socket.detach())

    __del__ = _force_close


class _QuietCursor(trio_mysql.cursors.Cursor):  # type: ignore[misc]
    """A cursor that does not turn server notes into Python warnings (and skips the extra
    ``SHOW WARNINGS`` round trip): strict SQL mode makes real problems errors anyway."""

    _defer_warnings = True


class _Lost(Exception):
    """A connection failed before any statement of the operation reached the server."""


def _sql(query: str) -> str:
    return query.replace("%", "%%").replace("?", "%s")


class MysqlStore(SqlStore):
    """Routes in a MySQL-protocol database (``mysql://user:password@host:port/db``)."""

    kind = "mysql"
    dialect = DIALECT

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.host, self.port, self.user, self.database = host, port, user, database
        self._password = password
        self.display_url = f"mysql://{user}@{host}:{port}/{database}"
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(pool_size)
        self._closed = False

    # --- connections -------------------------------------------------------------------------

    def _translate(self, exc: BaseException) -> StoreError:
        where = self.display_url
        if isinstance(exc, trio_mysql.MySQLError) and exc.args and isinstance(exc.args[0], int):
            code, text = exc.args[0], exc.args[1] if len(exc.args) > 1 else ""
            if code in _SCHEMA:
                return SchemaMissing(
                    f"the store {where} is not initialised ({text}); run `lars db init`"
                )
            if code in _LOST:
                return StoreUnavailable(f"MySQL store {where} unreachable: {text}")
            if code in (ER.ACCESS_DENIED_ERROR, 1698):
                return StoreError(f"MySQL store {where}: access denied ({text})")
            if code == ER.BAD_DB_ERROR:
                return StoreError(f"MySQL store {where}: database {self.database!r} does not exist")
            return StoreError(f"MySQL store {where}: error {code}: {text}")
        if isinstance(exc, trio_mysql.InterfaceError):
            return StoreUnavailable(f"MySQL store {where}: connection closed")
        if isinstance(exc, trio.TooSlowError):
            return StoreUnavailable(f"MySQL store {where}: timed out")
        return StoreUnavailable(f"MySQL store {where} unreachable: {exc}")

    async def _connect(self) -> _Connection:
        conn = _Connection(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self._password,
            database=self.database,
            autocommit=True,
            charset="utf8mb4",
            use_unicode=True,
            connect_timeout=self._connect_timeout,
        )
        try:
            await conn.connect()
        except BaseException:
            conn._force_close()  # trio-mysql leaves the socket open when the handshake fails
            raise
        return conn

    async def _on(self, conn: _Connection, make_op: Callable[[], sql.Op[T]], txn: Txn) -> T:
        """Run one operation on ``conn``; raises _Lost if the very first statement failed."""
        op = make_op()
        cursor = conn.cursor(_QuietCursor)
        sent = False

        async def execute(query: str, args: tuple[Any, ...]) -> sql.Result:
            nonlocal sent
            try:
                await cursor.execute(_sql(query), args)
            except (trio_mysql.OperationalError, trio_mysql.InterfaceError) as exc:
                if not sent and (
                    isinstance(exc, trio_mysql.InterfaceError) or exc.args[0] in _LOST
                ):
                    raise _Lost from exc
                raise
            sent = True
            return sql.Result(list(await cursor.fetchall()), cursor.rowcount, cursor.lastrowid)

        if txn is not None:
            await execute("START TRANSACTION", ())
        try:
            query = next(op)
            while True:
                query = op.send(await execute(*query))
        except StopIteration as stop:
            if txn is not None:
                await execute("COMMIT", ())
            return stop.value  # type: ignore[no-any-return]
        except BaseException:
            if txn is not None and conn.open:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await conn.rollback()
            raise

    async def _run(self, make_op: Callable[[], sql.Op[T]], txn: Txn = None) -> T:
        if self._closed:
            raise StoreUnavailable(f"MySQL store {self.display_url} is closed")
        async with self._slots:
            for attempt in range(2):
                pooled = bool(self._idle)
                conn: _Connection | None = None
                try:
                    with trio.fail_after(self._query_timeout):
                        conn = self._idle.pop() if pooled else await self._connect()
                        result = await self._on(conn, make_op, txn)
                except _Lost as lost:
                    assert conn is not None
                    conn._force_close()
                    if pooled and attempt == 0:
                        continue  # a stale pooled connection: try once on a fresh one
                    raise self._translate(lost.__cause__ or lost) from lost.__cause__
                except trio_mysql.MySQLError as exc:
                    # A server-side error (code below 2000) leaves the connection usable.
                    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 2000
                    if conn is not None and conn.open and code < 2000:
                        self._idle.append(conn)
                    elif conn is not None:
                        conn._force_close()
                    raise self._translate(exc) from exc
                except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                    if conn is not None:
                        conn._force_close()
                    raise self._translate(exc) from exc
                except BaseException:
                    if conn is not None:
                        conn._force_close()
                    raise
                self._idle.append(conn)
                return result
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            for conn in idle:
                await conn.aclose()
        for conn in idle:
            conn._force_close()
