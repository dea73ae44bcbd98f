"""The store's call history (issue 10): ``CallHistory`` written with the statistics, read
as series per host and per module, summed over windows, purged by age; and the
``ServerCallStatus`` reads of the alarms. Run against SQLite and a real MySQL/MariaDB."""

from __future__ import annotations

import pytest

from lars.errors import InvalidValue, StoreError
from lars.store import (
    PAGE_MAX,
    CallPoint,
    CallStatus,
    HistoryRow,
    HostCalls,
    RouteStore,
)
from lars.store.sql import HISTORY_COUNT_MAX
from tests.store_helpers import fetch

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)
M1 = (1, 1)
M2 = (1, 2)
M3 = (2, 1)
CALLER1 = 3232235777  # 192.168.1.1
CALLER2 = 3232235778
#: A minute (epoch seconds, a multiple of 600 too).
T0 = 1_800_000_000 - 1_800_000_000 % 600


def calls(
    module: tuple[int, int], host: tuple[int, int], minute: int, succ: int, err: int = 0
) -> HistoryRow:
    return HistoryRow(*module, *host, minute, succ, err)


def status(module: tuple[int, int], host: tuple[int, int], caller: int, **kw: object) -> CallStatus:
    fields: dict[str, object] = {"succ": 10, "err": 0, "ts": T0, "overload": False, **kw}
    return CallStatus(*module, *host, caller, **fields)  # type: ignore[arg-type]


async def history_rows(store: RouteStore) -> list[tuple[int, ...]]:
    rows = await fetch(
        store,
        "SELECT modid, cmdid, ip, port, minute, succ, err FROM CallHistory ORDER BY 1,2,3,4,5",
    )
    return [tuple(int(v) for v in row) for row in rows]


# --- writing ---------------------------------------------------------------------------------


async def test_history_is_written_with_the_statistics_and_adds_up(store: RouteStore) -> None:
    rows = [status(M1, A, CALLER1), status(M1, A, CALLER2)]
    await store.record_calls(rows, [calls(M1, A, T0, 20, 1), calls(M1, B, T0, 5)])
    await store.record_calls(rows, [calls(M1, A, T0, 3, 2), calls(M1, A, T0 + 60, 1)])
    assert len(await store.read_call_status()) == 2
    assert await history_rows(store) == [
        (*M1, *A, T0, 23, 3),
        (*M1, *A, T0 + 60, 1, 0),
        (*M1, *B, T0, 5, 0),
    ]
    # The statistics alone, as before.
    await store.upsert_call_status(rows)
    assert len(await history_rows(store)) == 3


async def test_a_failing_history_write_writes_no_statistics_either(store: RouteStore) -> None:
    await fetch(store, "ALTER TABLE CallHistory RENAME TO CallHistoryGone")
    try:
        with pytest.raises(StoreError):
            await store.record_calls([status(M1, A, CALLER1)], [calls(M1, A, T0, 10)])
    finally:
        await fetch(store, "ALTER TABLE CallHistoryGone RENAME TO CallHistory")
    assert await store.read_call_status() == []
    assert await history_rows(store) == []


async def test_history_counts_stop_at_their_limit_instead_of_failing(store: RouteStore) -> None:
    await store.record_calls([], [calls(M1, A, T0, HISTORY_COUNT_MAX - 1, 1)])
    await store.record_calls([], [calls(M1, A, T0, 5, HISTORY_COUNT_MAX)])
    assert await history_rows(store) == [(*M1, *A, T0, HISTORY_COUNT_MAX, HISTORY_COUNT_MAX)]
    # Sums over such rows do not fail either (SQLite's are floats past 2**53).
    await store.record_calls([], [calls(M1, A, T0 + 60, HISTORY_COUNT_MAX)])
    (point,) = (await store.call_history(M1, T0, T0 + 600, 600))[A]
    assert point.succ >= 2 * HISTORY_COUNT_MAX - 2**12


# --- reading -----------------------------------------------------------------------------------


async def test_call_history_per_host_in_steps(store: RouteStore) -> None:
    await store.record_calls(
        [],
        [
            calls(M1, A, T0, 1, 1),
            calls(M1, A, T0 + 60, 2),
            calls(M1, A, T0 + 600, 4, 4),
            calls(M1, B, T0 + 120, 8),
            calls(M2, A, T0, 100),  # another module
        ],
    )
    assert await store.call_history(M1, T0, T0 + 1200) == {
        A: [CallPoint(T0, 1, 1), CallPoint(T0 + 60, 2, 0), CallPoint(T0 + 600, 4, 4)],
        B: [CallPoint(T0 + 120, 8, 0)],
    }
    assert await store.call_history(M1, T0, T0 + 1200, step=600) == {
        A: [CallPoint(T0, 3, 1), CallPoint(T0 + 600, 4, 4)],
        B: [CallPoint(T0, 8, 0)],
    }
    # Steps start at multiples of the step, whatever ``since`` is.
    assert await store.call_history(M1, T0 + 60, T0 + 1200, step=1200) == {
        A: [CallPoint(T0 + 60 - (T0 + 60) % 1200, 6, 4)],
        B: [CallPoint(T0 + 60 - (T0 + 60) % 1200, 8, 0)],
    }
    assert await store.call_history(M3, T0, T0 + 1200) == {}


async def test_call_history_bounds_are_since_inclusive_until_exclusive(store: RouteStore) -> None:
    await store.record_calls([], [calls(M1, A, T0 + 60 * i, i + 1) for i in range(5)])
    got = await store.call_history(M1, T0 + 60, T0 + 240)
    assert [p.ts for p in got[A]] == [T0 + 60, T0 + 120, T0 + 180]
    assert await store.call_history(M1, T0 + 60, T0 + 60) == {}
    got = await store.call_history(M1, T0 + 61, T0 + 241)
    assert [p.ts for p in got[A]] == [T0 + 120, T0 + 180, T0 + 240]


async def test_module_sparklines_sum_hosts_of_each_module(store: RouteStore) -> None:
    await store.record_calls(
        [],
        [
            calls(M1, A, T0 - 60, 1000),  # before since
            calls(M1, A, T0, 1, 1),
            calls(M1, B, T0, 2, 0),
            calls(M1, B, T0 + 660, 5, 5),
            calls(M2, A, T0 + 60, 7),
            calls(M3, A, T0, 9),  # not asked for
        ],
    )
    lines = await store.module_sparklines([M1, M2, (9, 9)], T0)
    assert lines == {
        M1: [CallPoint(T0, 3, 1), CallPoint(T0 + 660, 5, 5)],
        M2: [CallPoint(T0 + 60, 7, 0)],
    }
    lines = await store.module_sparklines([M1], T0, step=600)
    assert lines == {M1: [CallPoint(T0, 3, 1), CallPoint(T0 + 600, 5, 5)]}
    assert await store.module_sparklines([], T0) == {}
    many = [(1, cmdid) for cmdid in range(PAGE_MAX)]
    assert set(await store.module_sparklines(many, T0)) == {M1, M2}


async def test_window_calls_sum_every_host_over_the_window(store: RouteStore) -> None:
    await store.record_calls(
        [],
        [
            calls(M1, A, T0 - 60, 1000, 1000),
            calls(M1, A, T0, 1, 1),
            calls(M1, A, T0 + 60, 2, 3),
            calls(M1, B, T0 + 120, 4),
            calls(M3, A, T0, 0, 6),
        ],
    )
    assert await store.window_calls(T0) == [
        HostCalls(*M1, *A, 3, 4),
        HostCalls(*M1, *B, 4, 0),
        HostCalls(*M3, *A, 0, 6),
    ]
    assert await store.window_calls(T0 + 180) == []


async def test_purge_deletes_only_older_minutes_and_honours_its_limit(store: RouteStore) -> None:
    await store.record_calls(
        [], [calls(M1, host, T0 + 60 * i, 1) for i in range(4) for host in (A, B)]
    )
    assert await store.purge_history(T0 + 120, limit=3) == 3
    assert await store.purge_history(T0 + 120, limit=3) == 1
    assert await store.purge_history(T0 + 120, limit=3) == 0
    assert {row[4] for row in await history_rows(store)} == {T0 + 120, T0 + 180}
    assert await store.purge_history(T0 + 10_000) == 4
    assert await history_rows(store) == []


async def test_bad_history_arguments_are_refused(store: RouteStore) -> None:
    for module in ((2**32, 1), (1, -1), "1/1", None):
        with pytest.raises(InvalidValue, match=r"module|modid|cmdid"):
            await store.call_history(module, T0, T0 + 60)  # type: ignore[arg-type]
    for step in (0, -60, 59, 90, 60.0, "60"):
        with pytest.raises(InvalidValue, match="multiple of 60"):
            await store.call_history(M1, T0, T0 + 60, step)  # type: ignore[arg-type]
        with pytest.raises(InvalidValue, match="multiple of 60"):
            await store.module_sparklines([M1], T0, step)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match=r"since .* must not be after until"):
        await store.call_history(M1, T0 + 60, T0)
    for since in (-1, 1.5, None, True):
        with pytest.raises(InvalidValue, match="since"):
            await store.call_history(M1, since, T0)  # type: ignore[arg-type]
        with pytest.raises(InvalidValue, match="since"):
            await store.window_calls(since)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match=f"at most {PAGE_MAX} modules"):
        await store.module_sparklines([(1, c) for c in range(PAGE_MAX + 1)], T0)
    with pytest.raises(InvalidValue, match="collection"):
        await store.module_sparklines("1/1", T0)  # type: ignore[arg-type]
    for limit in (0, -1, 1.5):
        with pytest.raises(InvalidValue, match="limit"):
            await store.purge_history(T0, limit)  # type: ignore[arg-type]


# --- the status reads of the alarms -----------------------------------------------------------


async def test_overloaded_status_since_a_time(store: RouteStore) -> None:
    await store.upsert_call_status(
        [
            status(M1, A, CALLER1, overload=True, ts=T0),
            status(M1, A, CALLER2, overload=True, ts=T0 - 1),  # too old
            status(M1, B, CALLER1, overload=False, ts=T0 + 5),
            status(M2, B, CALLER2, overload=True, ts=T0 + 5),
        ]
    )
    # An original database's own flag values count too.
    await fetch(store, "UPDATE ServerCallStatus SET overload = 'y' WHERE modid = 1 AND cmdid = 2")
    rows = await store.overloaded_status(T0)
    assert [(r.modid, r.cmdid, r.ip, r.caller, r.overload) for r in rows] == [
        (*M1, A[0], CALLER1, True),
        (*M2, B[0], CALLER2, True),
    ]
    assert await store.overloaded_status(T0 + 6) == []


async def test_caller_last_reports(store: RouteStore) -> None:
    assert await store.caller_last_reports() == {}
    await store.upsert_call_status(
        [
            status(M1, A, CALLER1, ts=T0),
            status(M2, A, CALLER1, ts=T0 + 30),
            status(M1, B, CALLER2, ts=T0 - 5),
        ]
    )
    assert await store.caller_last_reports() == {CALLER1: T0 + 30, CALLER2: T0 - 5}


async def test_a_full_page_of_modules_fits_one_query(store: RouteStore) -> None:
    """A flat chain of PAGE_MAX ORs is deeper than SQLite's expression limit (1000)."""
    modules = [(7, cmdid) for cmdid in range(PAGE_MAX)]
    await store.change_routes(add={module: [A] for module in modules})
    await store.record_calls([], [calls(module, A, T0, 1) for module in modules])
    assert len(await store.module_sparklines(modules, T0)) == PAGE_MAX
    total, page = await store.module_overview(limit=PAGE_MAX)
    assert total == len(page) == PAGE_MAX


NEW_TABLES = ("CallHistory", "AlarmRule", "AlarmState", "AlarmEvent", "AlarmLease")


async def test_an_older_store_gets_the_new_tables_from_db_upgrade(store: RouteStore) -> None:
    for table in NEW_TABLES:
        await fetch(store, f"DROP TABLE {table}")
    assert await store.missing_schema({"CallHistory": ("minute",)}) == ["table CallHistory"]
    plan = await store.plan_upgrade()
    assert [step.description for step in plan.steps if "table" in step.description] == [
        f"create table {table}" for table in NEW_TABLES
    ]
    assert not plan.blockers
    for step in plan.steps:
        await store.apply_upgrade(step)
    assert (await store.plan_upgrade()).steps == ()
    await store.record_calls([status(M1, A, CALLER1)], [calls(M1, A, T0, 10)])
    assert await store.window_calls(T0) == [HostCalls(*M1, *A, 10, 0)]


# --- a batch stored once ---------------------------------------------------------------------


async def test_a_batch_run_again_with_its_token_writes_nothing(store: RouteStore) -> None:
    """The reporter's re-run of a batch whose first run was stored (its COMMIT went through,
    the answer was lost) changes nothing; another batch with the same rows adds up."""
    rows = [status(M1, A, CALLER1, succ=7, err=1)]
    history = [calls(M1, A, T0, 7, 1)]
    token, other = b"\x01" * 16, b"\x02" * 16
    assert not await store.batch_recorded(token)
    assert await store.record_calls(rows, history, token) is True
    assert await store.batch_recorded(token)
    assert await store.record_calls(rows, history, token) is False
    [row] = await store.read_call_status()
    assert (row.add_succ, row.succ_total, row.err_total) == (None, 7, 1)
    assert await history_rows(store) == [(*M1, *A, T0, 7, 1)]
    assert await store.record_calls(rows, history, other) is True
    [row] = await store.read_call_status()
    assert (row.succ_total, row.err_total) == (14, 2)
    assert await history_rows(store) == [(*M1, *A, T0, 14, 2)]
    # A batch with nothing left to write still claims its token.
    assert await store.record_calls([], [], b"\x03" * 16) is True
    assert await store.record_calls([], [], b"\x03" * 16) is False


async def test_batch_tokens_are_purged_by_age(store: RouteStore) -> None:
    await store.record_calls([status(M1, A, CALLER1)], [], b"\x01" * 16)
    await store.record_calls([status(M1, A, CALLER1)], [], b"\x02" * 16)
    assert await store.purge_batches(1_000_000_000) == 0  # both written now
    assert await store.purge_batches(2**40, limit=1) == 1
    assert await store.purge_batches(2**40) == 1
    assert not await store.batch_recorded(b"\x01" * 16)


@pytest.mark.parametrize("token", [b"short", "0123456789abcdef", b"\x00" * 17, 16])
async def test_a_malformed_batch_token_is_refused(store: RouteStore, token: object) -> None:
    with pytest.raises(InvalidValue, match="16 bytes"):
        await store.record_calls([status(M1, A, CALLER1)], [], token)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="16 bytes"):
        await store.batch_recorded(token)  # type: ignore[arg-type]
    assert await store.read_call_status() == []
