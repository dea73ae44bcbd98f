"""The store contract, run against SQLite and a real MySQL/MariaDB database."""

from __future__ import annotations

import pytest
import trio

from lars.errors import SchemaMissing, StoreError, StoreUnavailable
from lars.store import CallStatus, RouteStore, open_store
from tests import mysql_admin
from tests.store_helpers import change_rows, fetch

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)
C = (167772163, 7003)
M1 = (1, 1)
M2 = (1, 2)


async def test_fresh_store_is_empty_at_version_zero(store: RouteStore) -> None:
    assert await store.route_version() == 0
    assert await store.list_routes() == {}
    snapshot = await store.load_routes(changes_since=0)
    assert (snapshot.version, snapshot.routes, snapshot.changed) == (0, {}, frozenset())


async def test_add_raises_version_once_and_logs_one_change_per_module(store: RouteStore) -> None:
    result = await store.change_routes(add={M1: [A, B], M2: [C]})
    assert result.changed and result.added == 3
    assert result.modules == {M1, M2}
    version = await store.route_version()
    assert version == result.version
    assert sorted(await change_rows(store)) == [(1, 1, version), (1, 2, version)]
    assert await store.list_routes() == {M1: [A, B], M2: [C]}


async def test_write_that_changes_nothing_raises_nothing(store: RouteStore) -> None:
    first = await store.add_hosts(M1, [A, B])
    again = await store.add_hosts(M1, [B, A, A])
    assert not again.changed and again.version is None and again.added == 0
    gone = await store.remove_hosts(M1, [C])
    assert not gone.changed
    assert not (await store.remove_hosts(M2, None)).changed
    assert await store.route_version() == first.version
    assert len(await change_rows(store)) == 1


async def test_adding_a_present_host_adds_only_the_new_ones(store: RouteStore) -> None:
    await store.add_hosts(M1, [A])
    result = await store.add_hosts(M1, [A, B, B])
    assert result.added == 1
    assert await store.list_routes() == {M1: [A, B]}


async def test_versions_strictly_increase(store: RouteStore) -> None:
    versions: list[int] = []
    for host in (A, B, C):
        versions.append((await store.add_hosts(M1, [host])).version or 0)
    versions.append((await store.remove_hosts(M1, [A])).version or 0)
    assert versions == sorted(versions)
    assert len(set(versions)) == 4


async def test_remove_some_and_remove_all(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A, B, C], M2: [A]})
    result = await store.remove_hosts(M1, [A, C])
    assert result.removed == 2 and result.modules == {M1}
    assert await store.list_routes() == {M1: [B], M2: [A]}
    result = await store.remove_hosts(M1, None)
    assert result.removed == 1
    assert await store.list_routes() == {M2: [A]}
    assert [row[:2] for row in await change_rows(store)] == [(1, 1), (1, 2), (1, 1), (1, 1)]


async def test_load_routes_reports_modules_changed_since_a_version(store: RouteStore) -> None:
    v1 = (await store.add_hosts(M1, [A])).version
    assert v1 is not None
    await store.add_hosts(M2, [B])
    snapshot = await store.load_routes(changes_since=v1)
    assert snapshot.changed == {M2}
    assert snapshot.routes == {M1: frozenset([A]), M2: frozenset([B])}
    assert (await store.load_routes()).changed == frozenset()


async def test_list_routes_filters_by_modid_and_module(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A], M2: [B], (2, 1): [C]})
    assert await store.list_routes(1) == {M1: [A], M2: [B]}
    assert await store.list_routes(1, 2) == {M2: [B]}
    assert await store.list_routes(3) == {}


async def test_extreme_values_round_trip(store: RouteStore) -> None:
    top = 2**32 - 1
    await store.add_hosts((top, top), [(top, 65535), (0, 1)])
    assert await store.list_routes(top, top) == {(top, top): [(0, 1), (top, 65535)]}


async def test_many_modules_in_one_write(store: RouteStore) -> None:
    add = {(1, cmd): [(167772161 + cmd, 80)] for cmd in range(300)}
    result = await store.change_routes(add=add)
    assert result.added == 300 and len(result.modules) == 300
    assert len(await store.list_routes()) == 300
    assert len(await change_rows(store)) == 300
    result = await store.change_routes(add=add)
    assert not result.changed


async def test_concurrent_writers_never_duplicate_a_host(store: RouteStore, store_url: str) -> None:
    async with open_store(store_url) as other, trio.open_nursery() as nursery:
        for s in (store, other, store, other):
            nursery.start_soon(s.add_hosts, M1, [A, B])
    assert await store.list_routes() == {M1: [A, B]}
    assert len(await change_rows(store)) == 1


async def test_call_status_latest_counts_replace_and_totals_add(store: RouteStore) -> None:
    row = CallStatus(1, 1, A[0], A[1], 2130706433, succ=10, err=2, ts=100, overload=False)
    await store.upsert_call_status([row])
    later = CallStatus(1, 1, A[0], A[1], 2130706433, succ=3, err=1, ts=101, overload=True)
    other = CallStatus(1, 1, B[0], B[1], 2130706433, succ=1, err=0, ts=101, overload=False)
    await store.upsert_call_status([later, other])
    rows = await store.read_call_status(1, 1)
    assert rows == [
        CallStatus(1, 1, A[0], A[1], 2130706433, 3, 1, 101, True, succ_total=13, err_total=3),
        CallStatus(1, 1, B[0], B[1], 2130706433, 1, 0, 101, False, succ_total=1, err_total=0),
    ]
    assert await store.read_call_status(2) == []


async def test_duplicate_keys_in_one_batch_accumulate(store: RouteStore) -> None:
    rows = [CallStatus(1, 1, 1, 1, 1, succ=i, err=1, ts=i, overload=False) for i in (1, 2, 3)]
    await store.upsert_call_status(rows)
    (stored,) = await store.read_call_status()
    assert (stored.succ, stored.ts, stored.succ_total, stored.err_total) == (3, 3, 6, 3)


async def test_huge_interval_counts_are_clamped_but_totals_exact(store: RouteStore) -> None:
    big = 3 * 2**31
    await store.upsert_call_status([CallStatus(1, 1, 1, 1, 1, big, 0, 1, False)])
    (stored,) = await store.read_call_status()
    assert stored.succ == 2**31 - 1
    assert stored.succ_total == big


async def test_purge_changes_keeps_recent_rows(store: RouteStore) -> None:
    await store.add_hosts(M1, [A])
    assert await store.purge_changes(3600) == 0
    assert len(await change_rows(store)) == 1


async def test_init_schema_is_idempotent_and_keeps_data(store: RouteStore) -> None:
    await store.add_hosts(M1, [A])
    assert await store.init_schema() == []
    assert await store.list_routes() == {M1: [A]}


async def test_missing_tables_are_reported_as_schema_missing(
    store_url: str, tmp_path: object
) -> None:
    if store_url.startswith("sqlite"):
        url = store_url.replace("lars.db", "empty.db")
        async with open_store(url, create=True) as empty:
            with pytest.raises(SchemaMissing, match="lars db init"):
                await empty.list_routes()
        return
    async with mysql_admin.fresh_database() as url, open_store(url) as empty:
        with pytest.raises(SchemaMissing, match="lars db init"):
            await empty.route_version()


async def test_missing_sqlite_file_is_an_error_not_a_new_database(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/missing.db"
    async with open_store(url) as store:
        with pytest.raises(StoreUnavailable, match="lars db init"):
            await store.list_routes()


@pytest.mark.mysql
async def test_unreachable_mysql_is_store_unavailable() -> None:
    async with open_store("mysql://root@127.0.0.1:1/lars?connect_timeout=2") as store:
        with pytest.raises(StoreUnavailable):
            await store.route_version()


@pytest.mark.mysql
async def test_unknown_mysql_database_is_a_clear_error() -> None:
    async with open_store(f"{mysql_admin.server_url()}/no_such_lars_db") as store:
        with pytest.raises(StoreError, match="does not exist"):
            await store.route_version()


@pytest.mark.mysql
async def test_mysql_reconnects_after_the_server_drops_the_connection(db_url: str) -> None:
    async with open_store(db_url) as store:
        await store.add_hosts(M1, [A])
        # Kill every pooled connection server-side, as a server restart would.
        async with open_store(db_url) as killer:
            rows = await fetch(
                killer,
                "SELECT ID FROM information_schema.PROCESSLIST"
                " WHERE DB = ? AND ID <> CONNECTION_ID()",
                (db_url.rpartition("/")[2],),
            )
        assert rows  # the store's pooled connection is there to be killed
        for (thread_id,) in rows:
            await mysql_admin.execute(db_url, f"KILL {thread_id}")
        assert await store.list_routes() == {M1: [A]}
        assert (await store.add_hosts(M1, [B])).added == 1


def test_store_urls_are_validated() -> None:
    from lars.errors import ConfigError

    for url in (
        "lars.db",
        "postgres://x/y",
        "mysql://root@host",
        "mysql://h/db?pool=3",
        "sqlite://",
    ):
        with pytest.raises(ConfigError):
            open_store(url)
    assert open_store("sqlite:///rel.db").display_url == "sqlite:///rel.db"
    store = open_store("mysql://u:secret@db.example:3307/lars?pool_size=2")
    assert store.display_url == "mysql://u@db.example:3307/lars"
    assert "secret" not in store.display_url


async def test_load_changes_reads_only_the_changed_modules(store: RouteStore) -> None:
    v0 = (await store.change_routes(add={M1: [A], M2: [B], (9, 9): [C]})).version
    assert v0 is not None
    await store.add_hosts(M1, [C])
    await store.remove_hosts(M2, None)
    delta = await store.load_changes(v0)
    assert delta.version == await store.route_version()
    assert delta.changed == {M1, M2}
    assert delta.routes == {M1: frozenset([A, C])}  # M2 has no hosts any more
    nothing = await store.load_changes(delta.version)
    assert nothing.changed == frozenset() and nothing.routes == {}


async def test_purge_changes_deletes_only_rows_older_than_the_retention(store: RouteStore) -> None:
    await store.add_hosts(M1, [A])
    await store.add_hosts(M2, [B])
    old = "'2001-01-01 00:00:00'" if store.kind == "mysql" else "978307200"
    await fetch(store, f"UPDATE RouteChange SET created = {old} WHERE modid = 1 AND cmdid = 1")
    assert await store.purge_changes(3600) == 1
    assert [row[:2] for row in await change_rows(store)] == [(1, 2)]
    assert await store.list_routes() == {M1: [A], M2: [B]}  # routes are untouched
