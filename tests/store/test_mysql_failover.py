"""The MySQL store with several hosts, conflicts and unavailable nodes (issue 18).

URL parsing is pure; the rest runs against the test MariaDB, with a dead port and a
cuttable proxy in front of it standing for the other nodes. The real Galera cluster is in
``tests/e2e/test_galera.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio_mysql

from lars.errors import ConfigError, StoreConflict, StoreError, StoreUnavailable
from lars.store import CallStatus, open_store, parse_store_hosts
from lars.store.mysql import MysqlStore, conflict_backoff
from tests.e2e.procs import Proxy
from tests.netutil import free_tcp_port

A = (167772161, 7001)
B = (167772162, 7002)


def test_several_hosts_in_order_with_default_ports() -> None:
    store = open_store("mysql://lars:pw@db1:3307,db2,[::1]:3308/lars_dns?retries=3")
    assert isinstance(store, MysqlStore)
    assert store.hosts == [("db1", 3307), ("db2", 3306), ("::1", 3308)]
    assert store.display_url == "mysql://lars@db1:3307,db2:3306,[::1]:3308/lars_dns"
    assert (store.host, store.port) == ("db1", 3307)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:pw@db1:3306,db2:x/d", "bad port 'x' for host 2 of 2 (db2)"),
        ("mysql://u:pw@db1:0/d", "bad port '0' for the host (db1)"),
        ("mysql://u:pw@db1:3306,,db3/d", "host 2 of 3 is empty"),
        ("mysql://u:pw@db1:3306,:3307/d", "host 2 of 2 ':3307' has no host name"),
        ("mysql://u:pw@db1:,db2/d", "host 1 of 2 'db1:' has an empty port"),
        ("mysql://u:pw@db1,db1:3306/d", "host 2 of 2 db1:3306 is listed twice"),
        ("mysql://u:pw@::1:3306/d", "write an IPv6 address as [addr]:port"),
        ("mysql://u:pw@[::1/d", "[ipv6]:port"),
        ("mysql://u:pw@db1/d?retries=-1", "retries must be positive"),
        ("mysql://u:pw@db1/d?pool_size=0", "pool_size must be positive"),
        ("mysql://u:pw@db1,db2", "must name a database"),
    ],
)
def test_a_malformed_multi_host_url_names_the_fault(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert message in str(caught.value)
    assert "pw" not in str(caught.value)  # the password is masked


def test_too_many_hosts_is_refused() -> None:
    hosts = ",".join(f"db{i}" for i in range(17))
    with pytest.raises(ConfigError, match="at most 16"):
        parse_store_hosts(hosts, f"mysql://u@{hosts}/d")


def test_conflict_backoff_is_jittered_and_capped() -> None:
    waits = [conflict_backoff(n) for n in range(1, 30) for _ in range(20)]
    assert all(0 <= w <= 0.5 for w in waits)
    assert len(set(waits)) > 100  # jittered, not a fixed schedule
    assert max(conflict_backoff(1) for _ in range(100)) <= 0.01


def _node(db_url: str) -> tuple[str, str, int, str]:
    """(user part, host, port, database) of the conftest's single-host URL."""
    server, _, database = db_url.rpartition("/")
    userinfo, _, hostport = server.partition("://")[2].rpartition("@")
    host, _, port = hostport.partition(":")
    return userinfo, host, int(port or 3306), database


@pytest.mark.mysql
async def test_a_dead_first_host_fails_over_to_the_next(db_url: str) -> None:
    user, host, port, database = _node(db_url)
    dead = free_tcp_port()
    url = f"mysql://{user}@127.0.0.1:{dead},{host}:{port}/{database}?connect_timeout=1"
    async with open_store(url) as store:
        assert isinstance(store, MysqlStore)
        await store.add_hosts((1, 1), [A])
        assert await store.list_routes() == {(1, 1): [A]}
        assert (store.host, store.port) == (host, port)  # preferred from now on
        assert store.failovers == 1


@pytest.mark.mysql
async def test_a_node_cut_mid_use_fails_over_and_nothing_is_lost(db_url: str) -> None:
    user, host, port, database = _node(db_url)
    first, second = Proxy((host, port)), Proxy((host, port))
    async with trio.open_nursery() as nursery:
        p1 = await nursery.start(first.serve)
        p2 = await nursery.start(second.serve)
        url = f"mysql://{user}@127.0.0.1:{p1},127.0.0.1:{p2}/{database}?connect_timeout=1"
        async with open_store(url) as store:
            assert isinstance(store, MysqlStore)
            await store.add_hosts((1, 1), [A])  # pooled connections to the first
            first.disable()  # the first node goes away, its connections cut
            await store.add_hosts((1, 1), [B])  # on the second, at once
            assert store.port == p2
            assert await store.list_routes() == {(1, 1): [A, B]}
            second.disable()  # nothing left: unavailable (hold and retry), not bad
            with pytest.raises(StoreUnavailable):
                await store.add_hosts((1, 2), [A])
        nursery.cancel_scope.cancel()


def _error(code: int, text: str) -> trio_mysql.MySQLError:
    return trio_mysql.OperationalError(code, text)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1047, StoreUnavailable),  # WSREP has not yet prepared node for application use
        (1180, StoreUnavailable),  # Not connected to Primary Component (at COMMIT)
        (1290, StoreUnavailable),  # --read-only
        (1836, StoreUnavailable),  # read-only mode
        (2013, StoreUnavailable),  # lost connection
        (1213, StoreConflict),  # a deadlock still there after the re-runs
        (1205, StoreConflict),
        (1366, StoreError),  # a value the column cannot take: bad, not unavailable
    ],
)
def test_errors_are_classified(code: int, kind: type[StoreError]) -> None:
    store = open_store("mysql://u@db1,db2/d")
    assert isinstance(store, MysqlStore)
    error = store._translate(_error(code, "text"), 1)
    assert type(error) is kind
    assert "db2:3306" in str(error)  # names the node


def _failing_op(fail: int, code: int, attempts: list[int]) -> Any:
    """An operation that inserts a RouteData row, then fails with ``code`` on its first
    ``fail`` runs (as Galera fails a write at COMMIT), and counts its runs."""

    def make() -> Any:
        def op() -> Any:
            attempts[0] += 1
            yield (
                "INSERT INTO RouteData (modid, cmdid, serverip, serverport) VALUES (9, 9, 1, 1)",
                (),
            )
            if attempts[0] <= fail:
                yield (
                    f"SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = {code}, MESSAGE_TEXT = 'test'",
                    (),
                )
            return attempts[0]

        return op()

    return make


@pytest.mark.mysql
@pytest.mark.parametrize("code", [1213, 1205])
async def test_a_conflicting_transaction_is_rerun_whole(db_url: str, code: int) -> None:
    attempts = [0]
    async with open_store(db_url + "?retries=5") as store:
        assert isinstance(store, MysqlStore)
        assert await store._run(_failing_op(3, code, attempts), "write") == 4
        assert store.conflict_retries == 3
        # The failed runs were rolled back whole: one row, not four.
        assert await store.list_routes(9, 9) == {(9, 9): [(1, 1)]}


@pytest.mark.mysql
async def test_a_transaction_still_conflicting_after_its_reruns_is_unavailable(
    db_url: str,
) -> None:
    attempts = [0]
    async with open_store(db_url + "?retries=2") as store:
        assert isinstance(store, MysqlStore)
        with pytest.raises(StoreConflict, match="after 2 re-runs"):
            await store._run(_failing_op(100, 1213, attempts), "write")
        assert attempts[0] == 3
        assert await store.list_routes(9, 9) == {}
        assert isinstance(StoreConflict("x"), StoreUnavailable)  # the reporter holds on it


@pytest.mark.mysql
async def test_a_node_not_ready_is_failed_over_at_once(db_url: str) -> None:
    """1047 (a Galera node out of its cluster) on the first host: the operation moves to
    the next host; with no other host it is "unavailable", never a bad request."""
    attempts = [0]
    async with open_store(db_url) as store:
        assert isinstance(store, MysqlStore)
        with pytest.raises(StoreUnavailable, match="error 1047"):
            await store._run(_failing_op(1, 1047, attempts), "write")
        assert attempts[0] == 1  # not re-run on the same node


class _CommitAnswerLost:
    """A TCP forwarder to ``target`` that passes the first COMMIT to the server, then cuts
    the connection when the server's answer comes, without passing it on: the transaction
    is stored, and the client cannot know (a node dying with a COMMIT in flight)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.armed = True
        self.commits_lost = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        committing = False

        async def up(upstream: trio.SocketStream) -> None:
            nonlocal committing
            while data := await client.receive_some(65536):
                # COM_QUERY (0x03) "COMMIT": whatever the server says next is its answer.
                if self.armed and b"\x03COMMIT" in data:
                    self.armed, committing = False, True
                await upstream.send_all(data)

        async def down(upstream: trio.SocketStream) -> None:
            while data := await upstream.receive_some(65536):
                if committing:
                    self.commits_lost += 1
                    return
                await client.send_all(data)

        async def pump(
            direction: Any, upstream: trio.SocketStream, scope: trio.CancelScope
        ) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await direction(upstream)
            scope.cancel()

        upstream = await trio.open_tcp_stream(*self.target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, up, upstream, nursery.cancel_scope)
            nursery.start_soon(pump, down, upstream, nursery.cancel_scope)


@pytest.mark.mysql
@pytest.mark.parametrize("tokened", [True, False])
async def test_a_commit_lost_with_its_node_is_not_counted_twice(db_url: str, tokened: bool) -> None:
    """The first node stores a batch and dies before answering its COMMIT: the store runs it
    again on the next node. With the batch's token that run writes nothing; without one
    (what the reporter did before) the calls were counted twice."""
    user, host, port, database = _node(db_url)
    proxy = _CommitAnswerLost((host, port))
    row = CallStatus(1, 1, *A, 3232235777, succ=5, err=1, ts=1, overload=False)
    async with trio.open_nursery() as nursery:
        front = await nursery.start(proxy.serve)
        url = f"mysql://{user}@127.0.0.1:{front},{host}:{port}/{database}?connect_timeout=1"
        async with open_store(url) as store:
            assert isinstance(store, MysqlStore)
            token = b"\x07" * 16 if tokened else None
            stored = await store.record_calls([row], [], token)
            assert proxy.commits_lost == 1 and store.failovers == 1
            [status] = await store.read_call_status()
        nursery.cancel_scope.cancel()
    if tokened:
        assert stored is False  # the re-run found the first run's token
        assert (status.succ_total, status.err_total) == (5, 1)
    else:
        assert (status.succ_total, status.err_total) == (10, 2)
