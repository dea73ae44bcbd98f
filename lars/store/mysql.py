"""The MySQL store (MySQL, MariaDB, Galera clusters and replicas) on trio-mysql.

A small pool of connections to one of the URL's hosts (``mysql://u@h1:3306,h2:3306/db``).

* **Failover.** A new connection goes to the preferred host, else the next that answers, in
  the URL's order. On a Galera node it first asks ``wsrep_local_state`` and
  ``wsrep_ready``: a node that is not Synced and ready is skipped. An operation failing
  because its node is unavailable (connection lost, 1047 "WSREP has not yet prepared node",
  1180 "Not connected to Primary Component", a read-only server) moves the preference to
  the next host, drops the pooled connections to the failed one, and runs again on another
  host while one is left untried. ``FAILBACK_AFTER`` seconds after a failover, new
  connections try the first hosts again.
* **Conflicts.** A transaction failing with a deadlock or a lock-wait timeout (1213, 1205;
  Galera reports a certification failure at COMMIT as 1213) is re-run whole, up to
  ``retries`` times with jittered exponential backoff; then it fails as
  :class:`~lars.errors.StoreConflict`, a kind of "store unavailable". A duplicate key (1062)
  in a write means a concurrent writer inserted the row first: the re-run sees it.
* A pooled connection that turns out to be dead (the server restarted, a proxy dropped it)
  is discarded and the operation retried on a fresh one.

After that, errors surface as :class:`StoreUnavailable` (hold and retry: the DNS keeps its
last good map, the reporter its queue) or :class:`StoreError` (the operation can never
succeed as it is).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import trio
import trio_mysql
import trio_mysql.connections
import trio_mysql.cursors
from trio_mysql.constants import CR, ER

from lars.errors import SchemaMissing, StoreConflict, StoreError, StoreUnavailable
from lars.store import sql
from lars.store.sqlstore import SqlStore, Txn

T = TypeVar("T")

DEFAULT_POOL_SIZE = 4
#: Seconds one operation may take before the store counts as unavailable.
DEFAULT_QUERY_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Times a transaction failing with a deadlock or lock-wait timeout is re-run.
DEFAULT_RETRIES = 20
#: First and longest backoff between re-runs of a conflicting transaction, seconds.
CONFLICT_BACKOFF_INITIAL = 0.005
CONFLICT_BACKOFF_MAX = 0.5
#: Seconds after a failover before new connections try the first hosts again.
FAILBACK_AFTER = 30.0
#: Galera's wsrep_local_state of a node that is in step with its cluster.
GALERA_SYNCED = "4"


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
    claim_batch="INSERT IGNORE INTO ReportBatch (token, written) VALUES (?, ?)",
    purge_batches="DELETE FROM ReportBatch WHERE written < ? LIMIT ?",
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
    # MySQL 8.0, MariaDB 10.6 (older servers: see SqlStore.expire_leases).
    skip_locked=" FOR UPDATE SKIP LOCKED",
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
#: The server answers but cannot serve now: Galera not ready or not primary, read-only,
#: network errors on its side. The node is failed over like a lost one.
_NODE_UNAVAILABLE = {
    ER.UNKNOWN_COM_ERROR,  # 1047: WSREP has not yet prepared node for application use
    ER.ERROR_DURING_COMMIT,  # 1180: Not connected to Primary Component (Galera)
    ER.OPTION_PREVENTS_STATEMENT,  # 1290: --read-only
    1792,  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    1836,  # ER_READ_ONLY_MODE
    ER.NET_READ_ERROR,
    ER.NET_READ_INTERRUPTED,
    ER.NET_ERROR_ON_WRITE,
    ER.NET_WRITE_INTERRUPTED,
    4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MariaDB): the server closed an idle connection
}
#: The transaction lost to another; running it again whole may succeed.
_CONFLICT = {ER.LOCK_DEADLOCK, ER.LOCK_WAIT_TIMEOUT}
_SCHEMA = {ER.NO_SUCH_TABLE, ER.BAD_FIELD_ERROR}


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number of a trio-mysql error (None for anything else)."""
    if isinstance(exc, trio_mysql.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def conflict_backoff(attempt: int) -> float:
    """Seconds to wait before re-run ``attempt`` (1, 2, ...) of a conflicting transaction:
    exponential, capped, and fully jittered so that the writers that collided spread out."""
    return random.uniform(0, min(CONFLICT_BACKOFF_MAX, CONFLICT_BACKOFF_INITIAL * 2**attempt))


class _Connection(trio_mysql.connections.Connection):  # type: ignore[misc]
    """trio-mysql's connection with a force-close that really closes the socket.

    The library's version calls a ``close()`` that trio streams do not have and swallows the
    error, leaking the socket until garbage collection.
    """

    _sock: Any
    #: The index in MysqlStore.hosts of the server this connection is to.
    lars_host = 0

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


class _NotSynced(Exception):
    """A Galera node that is not Synced and ready: skipped when connecting."""


def _sql(query: str) -> str:
    return query.replace("%", "%%").replace("?", "%s")


class MysqlStore(SqlStore):
    """Routes in a MySQL-protocol database (``mysql://user:password@h1:3306[,h2:3306...]/db``)."""

    kind = "mysql"
    dialect = DIALECT

    def __init__(
        self,
        *,
        hosts: Sequence[tuple[str, int]],
        user: str,
        password: str,
        database: str,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if not hosts:
            raise ValueError("a MySQL store needs at least one host")
        self.hosts = list(hosts)
        self.user, self.database = user, database
        self._password = password
        where = ",".join(_host_text(host, port) for host, port in self.hosts)
        self.display_url = f"mysql://{user}@{where}/{database}"
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._retries = retries
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(pool_size)
        self._closed = False
        #: The host new connections go to first, and since when (None: never failed over).
        self._preferred = 0
        self._failed_over_at: float | None = None
        #: Counters: re-runs after a conflict, failovers (read by tests and benchmarks).
        self.conflict_retries = 0
        self.failovers = 0

    @property
    def host(self) -> str:
        """The host new connections go to first."""
        return self.hosts[self._preferred][0]

    @property
    def port(self) -> int:
        """The port of :attr:`host`."""
        return self.hosts[self._preferred][1]

    def _where(self, index: int | None = None) -> str:
        if index is None or len(self.hosts) == 1:
            return self.display_url
        return f"{self.display_url} (node {_host_text(*self.hosts[index])})"

    # --- connections -------------------------------------------------------------------------

    def _translate(self, exc: BaseException, index: int | None = None) -> StoreError:
        where = self._where(index)
        code = error_code(exc)
        if code is not None:
            text = exc.args[1] if len(exc.args) > 1 else ""
            if code in _SCHEMA:
                return SchemaMissing(
                    f"the store {where} is not initialised ({text}); run `lars db init`"
                )
            if code in _LOST:
                return StoreUnavailable(f"MySQL store {where} unreachable: {text}")
            if code in _NODE_UNAVAILABLE:
                return StoreUnavailable(f"MySQL store {where} unavailable: error {code}: {text}")
            if code in _CONFLICT:
                return StoreConflict(
                    f"MySQL store {where}: error {code}: {text}"
                    f" (still conflicting after {self._retries} re-runs)"
                )
            if code in (ER.ACCESS_DENIED_ERROR, 1698):
                return StoreError(f"MySQL store {where}: access denied ({text})")
            if code == ER.BAD_DB_ERROR:
                return StoreError(f"MySQL store {where}: database {self.database!r} does not exist")
            return StoreError(f"MySQL store {where}: error {code}: {text}")
        if isinstance(exc, _NotSynced):
            return StoreUnavailable(f"MySQL store {where}: {exc}")
        if isinstance(exc, trio_mysql.InterfaceError):
            return StoreUnavailable(f"MySQL store {where}: connection closed")
        if isinstance(exc, trio.TooSlowError):
            return StoreUnavailable(f"MySQL store {where}: timed out")
        return StoreUnavailable(f"MySQL store {where} unreachable: {exc}")

    async def _connect_to(self, index: int) -> _Connection:
        host, port = self.hosts[index]
        conn = _Connection(
            host=host,
            port=port,
            user=self.user,
            password=self._password,
            database=self.database,
            autocommit=True,
            charset="utf8mb4",
            use_unicode=True,
            connect_timeout=self._connect_timeout,
        )
        conn.lars_host = index
        try:
            with trio.fail_after(self._connect_timeout):
                await conn.connect()
                await self._check_synced(conn)
        except BaseException:
            conn._force_close()  # trio-mysql leaves the socket open when the handshake fails
            raise
        return conn

    async def _check_synced(self, conn: _Connection) -> None:
        """Raise _NotSynced if ``conn`` is to a Galera node that is not Synced and ready (a
        server without Galera has no wsrep status and passes)."""
        cursor = conn.cursor(_QuietCursor)
        await cursor.execute(
            "SHOW GLOBAL STATUS WHERE Variable_name"
            " IN ('wsrep_provider_name', 'wsrep_local_state', 'wsrep_ready')"
        )
        status = {str(name).lower(): str(value) for name, value in await cursor.fetchall()}
        if not status.get("wsrep_provider_name"):
            return  # not a Galera node (MySQL, or MariaDB without a wsrep provider)
        state = status.get("wsrep_local_state", "")
        ready = status.get("wsrep_ready", "")
        if state != GALERA_SYNCED or ready != "ON":
            raise _NotSynced(
                f"Galera node not synced (wsrep_local_state {state}, wsrep_ready {ready})"
            )

    def _order(self) -> list[int]:
        """Host indexes in the order new connections try them: the preferred one first,
        or the URL's order again FAILBACK_AFTER seconds after a failover."""
        if self._failed_over_at is not None and (
            trio.current_time() - self._failed_over_at >= FAILBACK_AFTER
        ):
            self._preferred, self._failed_over_at = 0, None
        n = len(self.hosts)
        return [(self._preferred + i) % n for i in range(n)]

    async def _connect(self, skip: set[int]) -> _Connection:
        """A new connection to the first host (in :meth:`_order`) that answers and is
        synced, skipping ``skip``; the last error if none does."""
        error: BaseException | None = None
        failed: int | None = None
        for index in self._order():
            if index in skip:
                continue
            try:
                conn = await self._connect_to(index)
            except (OSError, trio.TooSlowError, trio_mysql.MySQLError, _NotSynced) as exc:
                code = error_code(exc)
                if code is not None and code not in _LOST and code not in _NODE_UNAVAILABLE:
                    raise  # refused credentials, no such database: the same everywhere
                error, failed = exc, index
                skip.add(index)
                continue
            if index != self._preferred:
                self._fail_over(self._preferred, index)
            return conn
        if error is None:
            raise _NotSynced("no host left to try")
        raise _HostFailed(failed, error)

    def _fail_over(self, failed: int, to: int | None = None) -> None:
        """Prefer another host than ``failed`` (the next one, or ``to``) and drop the idle
        connections to ``failed``."""
        if len(self.hosts) == 1:
            return
        stale = [conn for conn in self._idle if conn.lars_host == failed]
        self._idle = [conn for conn in self._idle if conn.lars_host != failed]
        for conn in stale:
            conn._force_close()
        if self._preferred == failed or to is not None:
            self._preferred = (failed + 1) % len(self.hosts) if to is None else to
            self._failed_over_at = trio.current_time()
            self.failovers += 1

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
                    try:
                        await conn.rollback()
                    except Exception:  # the original error tells what happened
                        conn._force_close()
            raise

    async def _attempt(self, make_op: Callable[[], sql.Op[T]], txn: Txn, skip: set[int]) -> T:
        """Run the operation once, on a pooled connection or a new one (again on a new one if
        the pooled one was dead before anything reached the server). Raises _HostFailed when
        its host is unavailable, else the trio-mysql error as it came."""
        for attempt in range(2):
            pooled = attempt == 0 and bool(self._idle)
            conn: _Connection | None = None
            try:
                with trio.fail_after(self._query_timeout):
                    conn = self._idle.pop() if pooled else await self._connect(skip)
                    result = await self._on(conn, make_op, txn)
            except _Lost as lost:
                assert conn is not None
                conn._force_close()
                if pooled:
                    continue  # a stale pooled connection: try once on a fresh one
                raise _HostFailed(conn.lars_host, lost.__cause__ or lost) from lost.__cause__
            except trio_mysql.MySQLError as exc:
                code = error_code(exc) or 2000
                # A server-side error (code below 2000) leaves the connection usable.
                if conn is not None and conn.open and code < 2000 and code not in _NODE_UNAVAILABLE:
                    self._idle.append(conn)
                elif conn is not None:
                    conn._force_close()
                if conn is not None and (code >= 2000 or code in _LOST | _NODE_UNAVAILABLE):
                    raise _HostFailed(conn.lars_host, exc) from exc
                raise
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                if conn is not None:
                    conn._force_close()
                    raise _HostFailed(conn.lars_host, exc) from exc
                raise _HostFailed(None, exc) from exc
            except BaseException:
                if conn is not None:
                    conn._force_close()
                raise
            self._idle.append(conn)
            return result
        raise AssertionError("unreachable")

    async def _run(self, make_op: Callable[[], sql.Op[T]], txn: Txn = None) -> T:
        if self._closed:
            raise StoreUnavailable(f"MySQL store {self.display_url} is closed")
        async with self._slots:
            skip: set[int] = set()
            conflicts = 0
            while True:
                try:
                    return await self._attempt(make_op, txn, skip)
                except _HostFailed as failed:
                    if failed.index is not None:
                        skip.add(failed.index)
                        self._fail_over(failed.index)
                    if len(skip) < len(self.hosts) and failed.index is not None:
                        continue  # another host may serve it
                    raise self._translate(failed.error, failed.index) from failed.error
                except trio_mysql.MySQLError as exc:
                    code = error_code(exc)
                    retry = code in _CONFLICT or (code == ER.DUP_ENTRY and txn == "write")
                    if not retry or conflicts >= self._retries:
                        raise self._translate(exc) from exc
                    conflicts += 1
                    self.conflict_retries += 1
                    await trio.sleep(conflict_backoff(conflicts))

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            for conn in idle:
                await conn.aclose()
        for conn in idle:
            conn._force_close()


class _HostFailed(Exception):
    """The host at ``index`` (None: not known) could not serve an operation."""

    def __init__(self, index: int | None, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _host_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
