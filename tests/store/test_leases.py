"""Self-registered hosts in the store (DESIGN §14): leases registered, renewed, dropped and
expired, on SQLite and a real MySQL/MariaDB database; several sweepers on one MariaDB."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Generator
from typing import Any

import attrs
import pytest
import trio

from lars.core.model import HostMeta
from lars.errors import InvalidValue, SchemaMissing
from lars.store import (
    Actor,
    CallStatus,
    LeaseDrop,
    LeaseExpiry,
    LeaseGrant,
    RouteStore,
    open_store,
    sql,
)
from tests import mysql_admin
from tests.store_helpers import change_rows, fetch

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)
C = (167772163, 7003)
M1 = (1, 1)
M2 = (1, 2)
AGENT = Actor("lease:10.9.9.9", "10.9.9.9")
SWEEPER = Actor("lease:expired", "dns")
OPERATOR = Actor("tester", "127.0.0.1")
#: A unix millisecond in the middle of the tests' time.
NOW = 1_800_000_000_000


async def expiries(store: RouteStore) -> dict[tuple[tuple[int, int], tuple[int, int]], Any]:
    """``(module, host) -> lease_expires`` of every RouteData row (None: static)."""
    rows = await fetch(
        store, "SELECT modid, cmdid, serverip, serverport, lease_expires FROM RouteData"
    )
    return {
        ((int(m), int(c)), (int(ip), int(port))): None if e is None else int(e)
        for m, c, ip, port, e in rows
    }


async def test_a_registration_is_a_dynamic_row_and_a_route_change(store: RouteStore) -> None:
    write = await store.register_leases(
        [LeaseGrant(M1, A, NOW + 10_000), LeaseGrant(M1, B, NOW + 5_000, weight=7, zone="z1")],
        actor=AGENT,
    )
    assert write.changed and write.modules == {M1} and write.added == 2
    assert await expiries(store) == {(M1, A): NOW + 10_000, (M1, B): NOW + 5_000}
    snapshot = await store.load_routes()
    assert snapshot.routes == {M1: {A, B}}
    assert snapshot.meta == {M1: {B: HostMeta(7, "z1")}}
    assert await change_rows(store) == [(1, 1, write.version)]
    (audit,) = await store.list_audit(module=M1)
    assert (audit.actor, audit.source, audit.added) == (AGENT.name, AGENT.source, (A, B))
    assert audit.changes == {
        "lease": "register",
        "hosts": {"10.0.0.2:7002": {"weight": [None, 7], "zone": [None, "z1"]}},
    }
    assert await store.lease_expiries(M1) == {A: NOW + 10_000, B: NOW + 5_000}


async def test_registering_again_sets_the_expiry_without_a_route_change(
    store: RouteStore,
) -> None:
    first = await store.register_leases([LeaseGrant(M1, A, NOW + 10_000)], actor=AGENT)
    again = await store.register_leases([LeaseGrant(M1, A, NOW + 3_000)], actor=AGENT)
    assert not again.changed
    assert await expiries(store) == {(M1, A): NOW + 3_000}  # set, as the registration says
    assert await store.route_version() == first.version
    # A weight or zone given and different is a route change.
    changed = await store.register_leases([LeaseGrant(M1, A, NOW, weight=5)], actor=AGENT)
    assert changed.changed and changed.updated == 1
    assert (await store.list_route_meta())[M1][A] == HostMeta(5, "")
    assert (await store.list_audit(module=M1))[0].changes == {
        "lease": "register",
        "hosts": {"10.0.0.1:7001": {"weight": [100, 5]}},
    }


async def test_a_registration_on_a_static_row_leaves_it_static(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A]}, meta={M1: {A: HostMeta(40, "z")}}, actor=OPERATOR)
    version = await store.route_version()
    write = await store.register_leases(
        [LeaseGrant(M1, A, NOW + 1_000, weight=1, zone="other")], actor=AGENT
    )
    assert not write.changed
    assert await expiries(store) == {(M1, A): None}
    assert (await store.list_route_meta())[M1][A] == HostMeta(40, "z")
    renewal = await store.renew_leases([LeaseGrant(M1, A, NOW + 9_000)], actor=AGENT)
    assert (renewal.reinserted, renewal.write.changed) == (0, False)
    dropped = await store.drop_leases([LeaseDrop(M1, A, 0)], now_ms=NOW, actor=AGENT)
    assert not dropped.changed
    expired = await store.expire_leases(NOW + 10**9, actor=SWEEPER)
    assert not expired.write.changed
    assert await expiries(store) == {(M1, A): None}
    assert await store.route_version() == version
    assert await store.lease_expiries(M1) == {}


async def test_an_operator_writing_a_registered_host_makes_it_static(store: RouteStore) -> None:
    await store.register_leases([LeaseGrant(M1, A, NOW), LeaseGrant(M2, B, NOW)], actor=AGENT)
    await store.add_hosts(M1, [A, C], actor=OPERATOR)
    assert await expiries(store) == {(M1, A): None, (M1, C): None, (M2, B): NOW}
    await store.replace_routes({M1: [A, C], M2: [B]}, actor=OPERATOR)
    assert await expiries(store) == {(M1, A): None, (M1, C): None, (M2, B): None}


async def test_renewals_extend_expiries_in_one_statement_and_never_shorten_them(
    store: RouteStore,
) -> None:
    await store.register_leases(
        [LeaseGrant(M1, A, NOW + 1_000), LeaseGrant(M1, B, NOW + 1_000)], actor=AGENT
    )
    version = await store.route_version()
    seen: list[str] = []
    original = sql.renew_leases

    def counting(*args: Any) -> Generator[sql.Query, sql.Result, Any]:
        op = original(*args)
        query = next(op)
        try:
            while True:
                seen.append(query[0])
                query = op.send((yield query))
        except StopIteration as stop:
            return stop.value

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sql, "renew_leases", counting)
        renewal = await store.renew_leases(
            [LeaseGrant(M1, A, NOW + 9_000), LeaseGrant(M1, B, NOW + 500)], actor=AGENT
        )
    assert (renewal.renewed, renewal.reinserted, renewal.write.changed) == (2, 0, False)
    assert [q.split()[0] for q in seen] in (["UPDATE"], ["UPDATE", "SELECT"])
    assert await expiries(store) == {(M1, A): NOW + 9_000, (M1, B): NOW + 1_000}
    assert await store.route_version() == version  # a heartbeat is no route change


async def test_a_renewal_whose_row_is_gone_registers_it_again(store: RouteStore) -> None:
    await store.register_leases([LeaseGrant(M1, A, NOW), LeaseGrant(M1, B, NOW)], actor=AGENT)
    await store.remove_hosts(M1, [A], actor=OPERATOR)  # an operator removes it
    renewal = await store.renew_leases(
        [LeaseGrant(M1, A, NOW + 5_000, weight=3), LeaseGrant(M1, B, NOW + 5_000)], actor=AGENT
    )
    assert (renewal.renewed, renewal.reinserted) == (1, 1)
    assert renewal.write.changed and renewal.write.added == 1
    assert await expiries(store) == {(M1, A): NOW + 5_000, (M1, B): NOW + 5_000}
    assert (await store.list_route_meta())[M1][A] == HostMeta(3, "")
    assert (await store.list_audit(module=M1))[0].added == (A,)


async def test_a_drop_drains_the_host_then_it_expires(store: RouteStore) -> None:
    await store.register_leases(
        [LeaseGrant(M1, A, NOW + 60_000, zone="z"), LeaseGrant(M1, B, NOW + 60_000)],
        actor=AGENT,
    )
    write = await store.drop_leases(
        [LeaseDrop(M1, A, 5_000), LeaseDrop(M1, B, 0), LeaseDrop(M2, C, 0)],
        now_ms=NOW,
        actor=AGENT,
    )
    assert write.changed and (write.updated, write.removed) == (1, 1)
    assert await expiries(store) == {(M1, A): NOW + 5_000}
    assert (await store.list_route_meta())[M1][A] == HostMeta(0, "z")
    (audit, _) = await store.list_audit(module=M1)
    assert audit.removed == (B,)
    assert audit.changes == {"lease": "drop", "hosts": {"10.0.0.1:7001": {"weight": [100, 0]}}}
    # The same drop sent again (after a lost reply) never drains longer.
    again = await store.drop_leases([LeaseDrop(M1, A, 5_000)], now_ms=NOW + 1_000, actor=AGENT)
    assert not again.changed and await expiries(store) == {(M1, A): NOW + 5_000}
    assert not (await store.expire_leases(NOW + 4_999, actor=SWEEPER)).write.changed
    gone = await store.expire_leases(NOW + 5_001, actor=SWEEPER)
    assert gone.write.changed and gone.hosts == {M1: (A,)}
    assert await expiries(store) == {}


async def test_a_drained_row_registered_again_takes_traffic_again(store: RouteStore) -> None:
    await store.register_leases([LeaseGrant(M1, A, NOW + 60_000)], actor=AGENT)
    await store.drop_leases([LeaseDrop(M1, A, 5_000)], now_ms=NOW, actor=AGENT)
    write = await store.register_leases([LeaseGrant(M1, A, NOW + 10_000)], actor=AGENT)
    assert write.changed and write.updated == 1
    assert (await store.list_route_meta())[M1][A] == HostMeta()
    assert await expiries(store) == {(M1, A): NOW + 10_000}


async def test_a_key_both_registered_and_dropped_is_dropped(store: RouteStore) -> None:
    await store.register_leases([LeaseGrant(M1, A, NOW + 60_000)], actor=AGENT)
    await store.write_leases(
        [LeaseGrant(M1, A, NOW + 60_000), LeaseGrant(M1, B, NOW + 60_000)],
        [LeaseDrop(M1, A, 0)],
        now_ms=NOW,
        actor=AGENT,
    )
    assert await expiries(store) == {(M1, B): NOW + 60_000}
    (audit, _) = await store.list_audit(module=M1)
    assert audit.changes == {"lease": "register+drop"}
    assert (audit.added, audit.removed) == ((B,), (A,))


async def test_expiry_removes_only_expired_dynamic_rows_and_is_a_route_change(
    store: RouteStore,
) -> None:
    await store.change_routes(add={M2: [C]}, actor=OPERATOR)
    await store.register_leases(
        [LeaseGrant(M1, A, NOW - 1), LeaseGrant(M1, B, NOW + 1), LeaseGrant(M2, A, NOW - 5)],
        actor=AGENT,
    )
    before = await store.route_version()
    result = await store.expire_leases(NOW, actor=SWEEPER)
    assert result.write.changed and result.write.modules == {M1, M2}
    assert result.write.removed == 2 and not result.more
    assert result.hosts == {M1: (A,), M2: (A,)}
    assert await expiries(store) == {(M1, B): NOW + 1, (M2, C): None}
    version = result.write.version
    assert version is not None and version > before
    assert [row for row in await change_rows(store) if row[2] == version] == [
        (1, 1, version),
        (1, 2, version),
    ]
    audit = await store.list_audit(actor=SWEEPER.name)
    assert {(a.modid, a.cmdid, a.removed) for a in audit} == {(1, 1, (A,)), (1, 2, (A,))}
    assert all(a.changes == {"lease": "expire"} for a in audit)
    assert not (await store.expire_leases(NOW, actor=SWEEPER)).write.changed


async def test_expiry_goes_in_batches(store: RouteStore) -> None:
    grants = [LeaseGrant((5, m), (167772161 + i, 80), NOW - 1) for m in range(3) for i in range(4)]
    await store.register_leases(grants, actor=AGENT)
    first = await store.expire_leases(NOW, actor=SWEEPER, limit=5)
    assert (first.write.removed, first.more) == (5, True)
    second = await store.expire_leases(NOW, actor=SWEEPER, limit=5)
    third = await store.expire_leases(NOW, actor=SWEEPER, limit=5)
    assert (second.write.removed, third.write.removed, third.more) == (5, 2, False)
    assert await expiries(store) == {}


async def test_bad_leases_change_nothing(store: RouteStore) -> None:
    version = await store.route_version()
    bad: list[Any] = [
        [LeaseGrant((2**32, 1), A, NOW)],
        [LeaseGrant(M1, (0, 0), NOW)],
        [LeaseGrant(M1, A, -1)],
        [LeaseGrant(M1, A, NOW, weight=-1)],
        [LeaseGrant(M1, A, NOW, zone=" bad")],
        [LeaseGrant(M1, A, NOW), "not a grant"],
    ]
    for grants in bad:
        with pytest.raises(InvalidValue):
            await store.register_leases(grants, actor=AGENT)
    with pytest.raises(InvalidValue):
        await store.drop_leases([LeaseDrop(M1, A, -5)], now_ms=NOW, actor=AGENT)
    with pytest.raises(InvalidValue):
        await store.expire_leases(-1, actor=SWEEPER)
    assert await store.route_version() == version
    assert await expiries(store) == {}


async def test_fleet_view_demotes_hosts_enough_callers_see_overloaded(store: RouteStore) -> None:
    ts = 1_800_000_000

    def row(host: tuple[int, int], caller: int, overload: bool, age: int = 0) -> CallStatus:
        return CallStatus(*M1, *host, caller, 10, 5, ts - age, overload)

    rows = [row(A, caller, True) for caller in (1, 2, 3)]  # 3 of 3 callers
    rows += [row(B, caller, True) for caller in (1, 2)] + [row(B, 3, False)]  # only 2
    rows += [row(C, caller, True) for caller in (1, 2, 3)]  # 3 of 7: below half
    rows += [row(C, caller, False) for caller in (4, 5, 6, 7)]
    rows += [CallStatus(*M2, *A, caller, 1, 1, ts - 100, True) for caller in (1, 2, 3)]  # old
    await store.upsert_call_status(rows)
    assert await store.demoted_hosts(ts - 30, callers=3, share=0.5) == {M1: frozenset({A})}
    assert await store.demoted_hosts(ts - 30, callers=2, share=0.5) == {M1: frozenset({A, B})}
    assert await store.demoted_hosts(ts - 30, callers=3, share=0.4) == {M1: frozenset({A, C})}
    assert await store.demoted_hosts(ts - 200, callers=3, share=0.5) == {
        M1: frozenset({A}),
        M2: frozenset({A}),
    }
    assert await store.demoted_hosts(ts + 1, callers=1, share=0.0) == {}


def test_an_old_sqlite_store_has_no_leases_until_upgraded(tmp_path: Any) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE RouteData (id INTEGER PRIMARY KEY AUTOINCREMENT, modid INTEGER NOT"
            " NULL, cmdid INTEGER NOT NULL, serverip INTEGER NOT NULL, serverport INTEGER NOT"
            " NULL, weight INTEGER NOT NULL DEFAULT 100, zone TEXT NOT NULL DEFAULT '')"
        )
        conn.execute("CREATE TABLE RouteVersion (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO RouteData (modid, cmdid, serverip, serverport) VALUES (1,1,5,80)")
    conn.close()

    async def use() -> None:
        async with open_store(f"sqlite:///{path}") as store:
            # Served as it is; lease writes say what to do; nothing expires.
            assert (await store.load_routes()).routes == {M1: {(5, 80)}}
            with pytest.raises(SchemaMissing, match="lars db upgrade"):
                await store.register_leases([LeaseGrant(M1, A, NOW)], actor=AGENT)
            assert not (await store.expire_leases(NOW, actor=SWEEPER)).write.changed
            assert await store.lease_expiries(M1) == {}
            plan = await store.plan_upgrade()
            text = [s for step in plan.steps for s in step.statements]
            assert "ALTER TABLE RouteData ADD COLUMN lease_expires INTEGER DEFAULT NULL" in text
            assert any("RouteData_lease" in s for s in text)
            for step in plan.steps:
                await store.apply_upgrade(step)
            # The same store learns the column without a restart.
            await store.register_leases([LeaseGrant(M1, A, NOW)], actor=AGENT)
            assert await store.lease_expiries(M1) == {A: NOW}

    trio.run(use)


@pytest.mark.mysql
async def test_db_init_adds_the_lease_column_and_its_key_to_an_older_mysql_store(
    db_url: str,
) -> None:
    await mysql_admin.execute(
        db_url,
        "ALTER TABLE RouteData DROP KEY idx_lease",
        "ALTER TABLE RouteData DROP lease_expires",
    )
    async with open_store(db_url) as store:
        with pytest.raises(SchemaMissing):
            await store.register_leases([LeaseGrant(M1, A, NOW)], actor=AGENT)
        done = await store.init_schema()
        assert done == [
            "added column RouteData.lease_expires",
            "added key RouteData.idx_lease (lease_expires)",
        ]
        assert (await store.plan_upgrade()).steps == ()
        await store.register_leases([LeaseGrant(M1, A, NOW)], actor=AGENT)
        keys = await fetch(
            store,
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'RouteData'",
        )
        assert ("idx_lease", "lease_expires") in [(str(k), str(c)) for k, c in keys]


# --- several sweepers on one MariaDB ----------------------------------------------------------

MODULES = [(7, m) for m in range(10)]
#: 300 expired rows over 10 modules.
EXPIRED = [
    LeaseGrant(module, (167772161 + i, 9000), NOW - 1) for module in MODULES for i in range(30)
]


def check_sweeps(results: list[LeaseExpiry], changes: list[tuple[int, int, int]]) -> None:
    """Every expired row was removed exactly once, by one effective sweep each, and each
    effective sweep wrote one RouteChange row per module it changed."""
    removed = Counter(
        (module, host)
        for result in results
        for module, hosts in result.hosts.items()
        for host in hosts
    )
    assert removed == Counter(grant.key for grant in EXPIRED)
    effective = [r for r in results if r.write.changed]
    versions = [r.write.version for r in effective]
    assert len(set(versions)) == len(versions)  # one version per sweep
    for result in effective:
        rows = sorted((m, c) for m, c, v in changes if v == result.write.version)
        assert rows == sorted(result.write.modules) == sorted(result.hosts)


@pytest.mark.mysql
async def test_concurrent_sweepers_remove_every_expired_row_exactly_once(db_url: str) -> None:
    async with open_store(db_url) as writer:
        await writer.register_leases(EXPIRED, actor=AGENT)
        await writer.register_leases([LeaseGrant(M1, A, NOW + 10**9)], actor=AGENT)
    results: list[LeaseExpiry] = []
    stores = [open_store(db_url) for _ in range(3)]

    async def sweep(store: RouteStore) -> None:
        while True:
            result = await store.expire_leases(NOW, actor=SWEEPER, limit=40)
            results.append(result)
            if not result.write.changed:
                return

    try:
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(sweep, store)
        check_sweeps(results, await change_rows(stores[0]))
        assert await expiries(stores[0]) == {(M1, A): NOW + 10**9}
        audit = await stores[0].list_audit(actor=SWEEPER.name, limit=1000)
        assert sum(len(a.removed) for a in audit) == len(EXPIRED)
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.mysql
async def test_a_sweeper_cancelled_mid_transaction_loses_nothing(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweeper is cancelled after deleting its rows, before it commits (it sleeps in the
    database while holding the RouteVersion lock): the others wait for it, then remove
    every row, each once; the cancelled sweep leaves no trace."""
    async with open_store(db_url) as writer:
        await writer.register_leases(EXPIRED, actor=AGENT)
    deleted = trio.Event()
    original = sql.expire_leases
    victim_calls = 0

    def stalling(*args: Any) -> Generator[sql.Query, sql.Result, Any]:
        nonlocal victim_calls
        op = original(*args)
        stall = victim_calls == 0
        victim_calls += 1
        query = next(op)
        try:
            while True:
                result = yield query
                if stall and query[0].startswith("DELETE FROM RouteData"):
                    deleted.set()
                    stall = False
                    yield ("SELECT SLEEP(2)", ())
                query = op.send(result)
        except StopIteration as stop:
            return stop.value

    monkeypatch.setattr(sql, "expire_leases", stalling)
    results: list[LeaseExpiry] = []
    victim = open_store(db_url)
    stores = [open_store(db_url) for _ in range(3)]

    async def sweep(store: RouteStore) -> None:
        while True:
            result = await store.expire_leases(NOW, actor=SWEEPER, limit=70)
            results.append(result)
            if not result.write.changed:
                return

    try:
        async with trio.open_nursery() as nursery:
            cancel = trio.CancelScope()

            async def doomed() -> None:
                with cancel:
                    await victim.expire_leases(NOW, actor=SWEEPER, limit=70)
                    pytest.fail("the stalled sweep finished")

            nursery.start_soon(doomed)
            await deleted.wait()
            for store in stores:
                nursery.start_soon(sweep, store)
            await trio.sleep(0.3)  # the others are waiting for the RouteVersion lock
            assert results == []
            cancel.cancel()
        check_sweeps(results, await change_rows(stores[0]))
        assert await expiries(stores[0]) == {}
    finally:
        for store in (victim, *stores):
            await store.aclose()


@pytest.mark.mysql
async def test_a_server_without_skip_locked_sweeps_with_plain_row_locks(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(db_url) as store:
        await store.register_leases([LeaseGrant(M1, A, NOW - 1)], actor=AGENT)
        # As an older server would: the lock clause is a syntax error there.
        store.dialect = attrs.evolve(store.dialect, skip_locked=" SKIP LOCKED")  # type: ignore[attr-defined]
        result = await store.expire_leases(NOW, actor=SWEEPER)
        assert result.hosts == {M1: (A,)}
        assert store._expiry_lock == " FOR UPDATE"  # type: ignore[attr-defined]
        assert "SKIP LOCKED" in caplog.text
