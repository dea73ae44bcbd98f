"""The store's console interface (issue 9): the audit log, the overview, a module's page,
call status, names. Run against SQLite and a real MySQL/MariaDB database."""

from __future__ import annotations

import time

import pytest
import trio

from lars.errors import InvalidValue, StoreError
from lars.store import (
    ACTOR_NAME_MAX,
    PAGE_MAX,
    Actor,
    CallStatus,
    HostStatus,
    ModuleSummary,
    RouteStore,
    open_store,
)
from tests.store_helpers import change_rows, fetch

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)
C = (167772163, 7003)
M1 = (1, 1)
M2 = (1, 2)
M3 = (2, 1)
ALICE = Actor("alice", "192.0.2.7")
CLI = Actor("cli:bob@build-3", "cli")
CALLER1 = 3232235777  # 192.168.1.1
CALLER2 = 3232235778


def status(
    module: tuple[int, int],
    host: tuple[int, int],
    caller: int,
    succ: int = 10,
    err: int = 0,
    overload: bool = False,
    ts: int = 1_800_000_000,
) -> CallStatus:
    """A row as the store returns it after one report: the totals are the first counts."""
    return CallStatus(*module, *host, caller, succ, err, ts, overload, succ, err)


async def audit_count(store: RouteStore) -> int:
    return int((await fetch(store, "SELECT COUNT(*) FROM RouteAudit"))[0][0])


# --- the audit log ---------------------------------------------------------------------------


async def test_route_writes_with_an_actor_write_one_audit_row_per_changed_module(
    store: RouteStore,
) -> None:
    start = time.time()
    first = await store.change_routes(add={M1: [A, B], M2: [C]}, actor=ALICE)
    second = await store.remove_hosts(M1, [A], actor=CLI)
    third = await store.add_hosts(M2, [A], actor=ALICE)
    entries = await store.list_audit()
    assert [(e.actor, e.source, (e.modid, e.cmdid), e.added, e.removed) for e in entries] == [
        ("alice", "192.0.2.7", M2, (A,), ()),
        ("cli:bob@build-3", "cli", M1, (), (A,)),
        ("alice", "192.0.2.7", M2, (C,), ()),
        ("alice", "192.0.2.7", M1, (A, B), ()),
    ]
    assert [e.version for e in entries] == [
        third.version,
        second.version,
        first.version,
        first.version,
    ]
    assert entries[0].id > entries[1].id > entries[2].id > entries[3].id
    assert all(start - 1 <= e.ts <= time.time() + 1 for e in entries)  # epoch seconds


async def test_removing_a_whole_module_audits_every_host_removed(store: RouteStore) -> None:
    await store.add_hosts(M1, [A, B, C], actor=ALICE)
    result = await store.remove_hosts(M1, None, actor=CLI)
    (entry, _) = await store.list_audit()
    assert (entry.actor, entry.added, entry.removed) == ("cli:bob@build-3", (), (A, B, C))
    assert entry.version == result.version


async def test_writes_that_change_nothing_write_no_audit_row(store: RouteStore) -> None:
    await store.add_hosts(M1, [A], actor=ALICE)
    assert not (await store.add_hosts(M1, [A], actor=ALICE)).changed
    assert not (await store.remove_hosts(M1, [B], actor=ALICE)).changed
    assert not (await store.remove_hosts(M2, None, actor=ALICE)).changed
    assert not (await store.replace_routes({M1: [A]}, actor=ALICE)).changed
    # A module of a write that changes another module gets no row either.
    await store.change_routes(add={M1: [A], M2: [B]}, actor=ALICE)
    assert [(e.modid, e.cmdid) for e in await store.list_audit()] == [M2, M1]


async def test_writes_without_an_actor_write_no_audit_row(store: RouteStore) -> None:
    await store.add_hosts(M1, [A])
    await store.replace_routes({M2: [B]})
    assert await audit_count(store) == 0
    assert len(await change_rows(store)) == 3  # M1 added; M1 removed and M2 added


async def test_a_host_removed_and_added_in_one_write_stays(store: RouteStore) -> None:
    await store.add_hosts(M1, [A, B])
    result = await store.change_routes(add={M1: [A]}, remove={M1: None}, actor=ALICE)
    assert result.removed == 1 and result.added == 0
    assert await store.list_routes() == {M1: [A]}
    (entry,) = await store.list_audit()
    assert (entry.added, entry.removed) == ((), (B,))


async def test_a_failing_write_leaves_no_audit_row_and_no_route_change(
    store: RouteStore,
) -> None:
    """The audit row is written before the RouteChange rows; when they fail, the
    transaction takes the audit row, the hosts and the version back with it."""
    before = (await store.add_hosts(M1, [A])).version
    await fetch(store, "ALTER TABLE RouteChange RENAME TO RouteChangeGone")
    try:
        with pytest.raises(StoreError):
            await store.change_routes(add={M1: [B]}, remove={M1: [A]}, actor=ALICE)
        with pytest.raises(StoreError):
            await store.replace_routes({M2: [C]}, actor=ALICE)
    finally:
        await fetch(store, "ALTER TABLE RouteChangeGone RENAME TO RouteChange")
    assert await audit_count(store) == 0
    assert await store.list_routes() == {M1: [A]}
    assert await store.route_version() == before


async def test_bad_values_are_refused_before_anything_is_written(store: RouteStore) -> None:
    for add in (
        {(2**32, 1): [A]},
        {(1, -1): [A]},
        {M1: [(A[0], 0)]},
        {M1: [(2**32, 80)]},
        {M1: [(A[0], 65536)]},
        {M1: ["10.0.0.1:80"]},
    ):
        with pytest.raises(InvalidValue):
            await store.change_routes(add=add, actor=ALICE)  # type: ignore[arg-type]
        with pytest.raises(InvalidValue):
            await store.replace_routes(add, actor=ALICE)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="module 1/1: port"):
        await store.add_hosts(M1, [A, (B[0], 0)])
    with pytest.raises(InvalidValue, match="actor"):
        await store.add_hosts(M1, [A], actor="alice")  # type: ignore[arg-type]
    assert await store.list_routes() == {}
    assert await store.route_version() == 0


def test_an_actor_the_audit_table_cannot_hold_is_invalid() -> None:
    Actor("x" * ACTOR_NAME_MAX, "2001:db8::1")
    for name, source in (("", "cli"), (" ", "cli"), ("x" * 129, "cli"), ("a", "s" * 65)):
        with pytest.raises(InvalidValue):
            Actor(name, source)
    with pytest.raises(InvalidValue):
        Actor(None, "cli")  # type: ignore[arg-type]


async def test_list_audit_filters_by_module_and_actor_and_pages_by_id(
    store: RouteStore,
) -> None:
    for port in range(1, 8):
        await store.add_hosts(M1 if port % 2 else M2, [(A[0], port)], actor=ALICE)
    await store.add_hosts(M3, [A], actor=CLI)
    everything = await store.list_audit()
    assert len(everything) == 8
    m1 = await store.list_audit(module=M1)
    assert [e.added for e in m1] == [((A[0], p),) for p in (7, 5, 3, 1)]
    assert [(e.modid, e.cmdid) for e in await store.list_audit(actor="cli:bob@build-3")] == [M3]
    assert await store.list_audit(actor="nobody") == []
    first = await store.list_audit(limit=3)
    assert first == everything[:3]
    second = await store.list_audit(limit=3, before_id=first[-1].id)
    assert second == everything[3:6]
    page = await store.list_audit(module=M1, limit=2, before_id=m1[1].id)
    assert page == m1[2:4]
    with pytest.raises(InvalidValue):
        await store.list_audit(limit=0)
    with pytest.raises(InvalidValue):
        await store.list_audit(limit=PAGE_MAX + 1)
    with pytest.raises(InvalidValue):
        await store.list_audit(module=(1, 2**32))


async def test_recent_changes_are_newest_first(store: RouteStore) -> None:
    v1 = (await store.change_routes(add={M1: [A], M2: [B]})).version
    v2 = (await store.add_hosts(M3, [C])).version
    changes = await store.recent_changes()
    assert changes[0] == (*M3, v2)
    assert sorted(changes[1:]) == [(*M1, v1), (*M2, v1)]
    assert len(await store.recent_changes(limit=1)) == 1
    with pytest.raises(InvalidValue):
        await store.recent_changes(limit=0)


# --- replace_routes --------------------------------------------------------------------------


async def test_replace_routes_makes_the_routes_exactly_the_mapping(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A, B], M2: [C], M3: [A]})
    result = await store.replace_routes({M1: [B, C], M2: [C], (9, 9): [A]}, actor=ALICE)
    assert await store.list_routes() == {M1: [B, C], M2: [C], (9, 9): [A]}
    assert result.modules == {M1, M3, (9, 9)}
    assert (result.added, result.removed) == (2, 2)
    version = await store.route_version()
    assert result.version == version
    assert sorted(row for row in await change_rows(store) if row[2] == version) == [
        (*M1, version),
        (*M3, version),
        (9, 9, version),
    ]
    audit = {(e.modid, e.cmdid): (e.added, e.removed) for e in await store.list_audit()}
    assert audit == {M1: ((C,), (A,)), M3: ((), (A,)), (9, 9): ((A,), ())}


async def test_replace_routes_with_nothing_removes_every_route(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A], M2: [B]})
    result = await store.replace_routes({M1: []}, actor=CLI)
    assert result.removed == 2 and await store.list_routes() == {}


async def test_replace_routes_handles_many_modules_in_one_transaction(
    store: RouteStore,
) -> None:
    routes = {(m, c): [(A[0] + m, 1000 + c)] for m in range(30) for c in range(40)}
    result = await store.replace_routes(routes, actor=CLI)
    assert result.added == 1200 and len(result.modules) == 1200
    listed = await store.list_routes()
    assert listed == {module: hosts for module, hosts in routes.items()}
    assert await audit_count(store) == 1200
    again = {module: hosts for module, hosts in list(routes.items())[:600]}
    result = await store.replace_routes(again, actor=CLI)
    assert result.removed == 600 and len(await store.list_routes()) == 600


# --- the overview ----------------------------------------------------------------------------


async def test_overview_counts_and_pages_modules_in_order(store: RouteStore) -> None:
    routes = {(m, c): [A, B][: 1 + (m + c) % 2] for m in (3, 1, 2) for c in (2, 1)}
    await store.change_routes(add=routes)
    total, page = await store.module_overview(limit=4)
    assert total == 6
    assert [(s.modid, s.cmdid) for s in page] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [s.hosts for s in page] == [1, 2, 2, 1]
    total, page = await store.module_overview(offset=4, limit=4)
    assert total == 6 and [(s.modid, s.cmdid) for s in page] == [(3, 1), (3, 2)]
    assert await store.module_overview(offset=6) == (6, [])
    for bad in ({"offset": -1}, {"limit": 0}, {"limit": PAGE_MAX + 1}, {"search": 12}):
        with pytest.raises(InvalidValue):
            await store.module_overview(**bad)  # type: ignore[arg-type]


async def test_overview_count_follows_every_route_write(store: RouteStore, store_url: str) -> None:
    """The count of all modules is remembered with the route version it was read at; a
    write from anywhere raises the version, so the next overview counts again."""
    await store.change_routes(add={M1: [A], M2: [A]})
    assert (await store.module_overview())[0] == 2
    async with open_store(store_url) as other:
        await other.add_hosts(M3, [A])
        assert (await store.module_overview())[0] == 3
        await other.remove_hosts(M1, None)
        await other.remove_hosts(M2, None)
    total, page = await store.module_overview()
    assert total == 1 and [(s.modid, s.cmdid) for s in page] == [M3]
    assert (await store.module_overview(search="1"))[0] == 1  # searches count every time


async def test_overview_of_an_empty_store(store: RouteStore) -> None:
    assert await store.module_overview() == (0, [])
    assert await store.module_overview(search="anything") == (0, [])


async def test_overview_summarises_names_status_and_the_last_version(
    store: RouteStore,
) -> None:
    first_version = (await store.add_hosts(M1, [A, B, C])).version
    last = (await store.add_hosts(M2, [A])).version
    await store.set_name("mod", 1, "Live lists")
    await store.set_name("cmd", 1, "fetch batch")
    await store.upsert_call_status(
        [
            status(M1, A, CALLER1, succ=10, err=1),
            status(M1, A, CALLER2, succ=5, err=2, overload=True),
            status(M1, B, CALLER1, succ=7, err=0, overload=True),
            status(M1, B, CALLER2, succ=1, err=1, overload=True),
            status(M1, C, CALLER1, succ=3, err=0),
            # A host no longer in the route: its stale status does not count.
            status(M1, (A[0] + 99, 1), CALLER1, succ=1000, err=1000, overload=True),
            status(M2, A, CALLER1, succ=4, err=4),
        ]
    )
    total, (first, second) = await store.module_overview()
    assert total == 2
    assert first == ModuleSummary(
        1,
        1,
        "Live lists",
        "fetch batch",
        hosts=3,
        overloaded_hosts=2,
        succ=26,
        err=4,
        last_version=first_version,
    )
    assert second == ModuleSummary(1, 2, "Live lists", "", 1, 0, 4, 4, last)


async def test_overview_without_route_change_rows_has_no_last_version(
    store: RouteStore,
) -> None:
    await store.add_hosts(M1, [A])
    await fetch(store, "DELETE FROM RouteChange")
    (_, (summary,)) = await store.module_overview()
    assert summary.last_version is None and summary.hosts == 1


async def test_overview_search_by_id_by_module_and_by_name(store: RouteStore) -> None:
    modules = [(12, 3), (12, 4), (3, 12), (5, 5), (7, 1), (2**32 - 1, 1)]
    await store.change_routes(add={module: [A] for module in modules})
    await store.set_name("mod", 5, "Payment GATEWAY")
    await store.set_name("cmd", 1, "gateway_ping 100%")

    async def found(search: str) -> list[tuple[int, int]]:
        total, page = await store.module_overview(search=search)
        assert total == len(page)
        return [(s.modid, s.cmdid) for s in page]

    assert await found("12") == [(3, 12), (12, 3), (12, 4)]
    assert await found(" 12/3 ") == [(12, 3)]
    assert await found("12 / 4") == [(12, 4)]
    assert await found("12/9") == []
    assert await found("4294967295") == [(2**32 - 1, 1)]
    assert await found("4294967296") == []  # no id that large: searched as a name
    assert await found("gateway") == [(5, 5), (7, 1), (2**32 - 1, 1)]
    assert await found("PAYMENT") == [(5, 5)]
    assert await found("100%") == [(7, 1), (2**32 - 1, 1)]
    assert await found("y_p") == [(7, 1), (2**32 - 1, 1)]
    assert await found("y%p") == []  # % and _ are matched as themselves
    assert await found("ay_") == [(7, 1), (2**32 - 1, 1)]
    assert await found("") == sorted(modules)
    total, page = await store.module_overview(search="gateway", offset=1, limit=1)
    assert total == 3 and [(s.modid, s.cmdid) for s in page] == [(7, 1)]


# --- a module's page -------------------------------------------------------------------------


async def test_module_detail_lists_every_host_with_its_callers(store: RouteStore) -> None:
    await store.add_hosts(M1, [C, A, B])
    rows = [
        status(M1, A, CALLER2, succ=1),
        status(M1, A, CALLER1, succ=2, overload=True),
        status(M1, C, CALLER1, succ=3),
        status(M1, (A[0] + 99, 1), CALLER1),  # not in the route
        status(M2, A, CALLER1),  # another module
    ]
    await store.upsert_call_status(rows)
    detail = await store.module_detail(*M1)
    assert detail == [
        HostStatus(A, (rows[1], rows[0])),
        HostStatus(B, ()),
        HostStatus(C, (rows[2],)),
    ]
    assert await store.module_detail(*M2) is None
    with pytest.raises(InvalidValue):
        await store.module_detail(1, 2**32)


# --- call status -----------------------------------------------------------------------------


@pytest.fixture
async def statuses(store: RouteStore) -> list[CallStatus]:
    rows = [
        status(M1, A, CALLER1, succ=5, err=1, ts=105),
        status(M1, B, CALLER2, succ=9, err=0, ts=101, overload=True),
        status(M2, A, CALLER2, succ=1, err=7, ts=103),
        status(M3, C, CALLER1, succ=3, err=3, ts=104, overload=True),
        status(M3, A, CALLER2, succ=3, err=2, ts=102),
    ]
    await store.upsert_call_status(rows)
    return rows


async def test_call_status_filters(store: RouteStore, statuses: list[CallStatus]) -> None:
    a, b, c, d, e = statuses
    assert await store.call_status() == (5, [a, b, c, e, d])
    assert await store.call_status(module=M3) == (2, [e, d])
    assert await store.call_status(caller=CALLER2) == (3, [b, c, e])
    assert await store.call_status(overloaded=True) == (2, [b, d])
    assert await store.call_status(overloaded=False) == (3, [a, c, e])
    assert await store.call_status(module=M1, caller=CALLER2, overloaded=True) == (1, [b])
    assert await store.call_status(module=(9, 9)) == (0, [])


async def test_call_status_reads_the_original_overload_flags(store: RouteStore) -> None:
    await store.upsert_call_status([status(M1, A, CALLER1), status(M1, B, CALLER1)])
    await fetch(store, "UPDATE ServerCallStatus SET overload = 'Y' WHERE ip = ?", (A[0],))
    total, (row,) = await store.call_status(overloaded=True)
    assert total == 1 and row.ip == A[0] and row.overload
    await store.add_hosts(M1, [A, B])
    (_, [summary]) = await store.module_overview()
    assert summary.overloaded_hosts == 1


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("module", "abced"),
        ("host", "acebd"),  # 10.0.0.1 (a, c, e by module), 10.0.0.2 (b), 10.0.0.3 (d)
        ("caller", "adbce"),
        ("succ", "cedab"),
        ("err", "baedc"),
        ("ts", "becda"),
    ],
)
async def test_call_status_sorts(
    store: RouteStore, statuses: list[CallStatus], sort: str, expected: str
) -> None:
    names = dict(zip("abcde", statuses, strict=True))
    _, rows = await store.call_status(sort=sort)
    assert rows == [names[n] for n in expected]
    _, rows = await store.call_status(sort=sort, descending=True)
    assert rows == [names[n] for n in reversed(expected)]


async def test_call_status_pages(store: RouteStore, statuses: list[CallStatus]) -> None:
    a, b, c, d, e = statuses
    assert await store.call_status(limit=2) == (5, [a, b])
    assert await store.call_status(offset=2, limit=2) == (5, [c, e])
    assert await store.call_status(offset=4, limit=2) == (5, [d])
    assert await store.call_status(offset=5) == (5, [])
    assert await store.call_status(sort="succ", descending=True, limit=1) == (5, [b])


async def test_call_status_refuses_bad_arguments(
    store: RouteStore, statuses: list[CallStatus]
) -> None:
    with pytest.raises(InvalidValue, match="sort must be one of module, host, caller"):
        await store.call_status(sort="succ_cnt; DROP TABLE RouteData")
    for bad in (
        {"caller": -1},
        {"caller": 2**32},
        {"module": (1,)},
        {"overloaded": "yes"},
        {"descending": 1},
        {"offset": -1},
        {"limit": 0},
        {"limit": PAGE_MAX + 1},
    ):
        with pytest.raises(InvalidValue):
            await store.call_status(**bad)
    assert (await store.call_status())[0] == 5


# --- names -----------------------------------------------------------------------------------


async def test_names_are_listed_added_edited_and_deleted(store: RouteStore) -> None:
    assert await store.list_names("mod") == {}
    await store.set_name("mod", 7, "  live streaming lists ")
    await store.set_name("mod", 2, "payments")
    await store.set_name("cmd", 7, "fetch a batch")
    assert await store.list_names("mod") == {2: "payments", 7: "live streaming lists"}
    assert list(await store.list_names("mod")) == [2, 7]
    assert await store.list_names("cmd") == {7: "fetch a batch"}
    await store.set_name("mod", 7, "live lists")
    await store.set_name("mod", 7, "live lists")  # the same again: still one row
    assert await store.list_names("mod") == {2: "payments", 7: "live lists"}
    rows = await fetch(store, "SELECT COUNT(*) FROM ModIDConfig WHERE modid = 7")
    assert rows[0][0] == 1
    assert await store.delete_name("mod", 7) is True
    assert await store.delete_name("mod", 7) is False
    assert await store.list_names("mod") == {2: "payments"}
    await store.set_name("mod", 2**32 - 1, "中文名字")
    assert (await store.list_names("mod"))[2**32 - 1] == "中文名字"


async def test_names_of_an_original_database_with_two_rows_for_one_id(
    store: RouteStore,
) -> None:
    await fetch(store, "INSERT INTO ModIDConfig (modid, content) VALUES (4, 'old'), (4, 'new')")
    assert await store.list_names("mod") == {4: "new"}
    await store.set_name("mod", 4, "renamed")
    assert await store.list_names("mod") == {4: "renamed"}
    assert await store.delete_name("mod", 4)
    assert await fetch(store, "SELECT * FROM ModIDConfig") == []


async def test_names_refuse_bad_arguments(store: RouteStore) -> None:
    for kind, ident, content in (
        ("modid", 1, "x"),
        ("mod", -1, "x"),
        ("cmd", 2**32, "x"),
        ("mod", 1, ""),
        ("mod", 1, "   "),
        ("mod", 1, "x" * 256),
        ("mod", 1, "tab\tinside"),
        ("mod", 1, "emoji \U0001f600"),
        ("mod", 1, None),
    ):
        with pytest.raises(InvalidValue):
            await store.set_name(kind, ident, content)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        await store.list_names("module")
    with pytest.raises(InvalidValue):
        await store.delete_name("cmd", -1)
    await store.set_name("cmd", 1, "x" * 255)
    assert await store.list_names("cmd") == {1: "x" * 255}


async def test_concurrent_namers_of_a_new_id_leave_one_row(
    store: RouteStore, store_url: str
) -> None:
    async with open_store(store_url) as other:
        for ident in range(5):
            async with trio.open_nursery() as nursery:
                for s, name in ((store, "one"), (other, "two"), (store, "three")):
                    nursery.start_soon(s.set_name, "mod", ident, name)
    rows = await fetch(store, "SELECT modid, COUNT(*) FROM ModIDConfig GROUP BY modid")
    assert sorted((int(m), int(n)) for m, n in rows) == [(i, 1) for i in range(5)]
