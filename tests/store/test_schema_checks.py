"""What the store tells about its own schema: integer ranges, missing tables and columns."""

from __future__ import annotations

import pytest

from lars.store import CallStatus, RouteStore, open_store
from lars.store.sql import INT64_RANGE, integer_range
from tests import mysql_admin

U32 = (0, 2**32 - 1)
I32 = (-(2**31), 2**31 - 1)


@pytest.mark.parametrize(
    ("declared", "sized", "expected"),
    [
        ("int(11)", True, I32),
        ("int(10) unsigned NOT NULL", True, U32),
        ("INT UNSIGNED", True, U32),
        ("integer", True, I32),
        ("bigint(20) unsigned", True, (0, 2**64 - 1)),
        ("bigint", True, INT64_RANGE),
        ("tinyint(1)", True, (-128, 127)),
        ("smallint(5) unsigned", True, (0, 65535)),
        ("mediumint", True, (-(2**23), 2**23 - 1)),
        ("char(1)", True, None),
        ("timestamp", True, None),
        ("point", True, None),
        ("INTEGER", False, INT64_RANGE),
        ("int(11)", False, INT64_RANGE),
        ("TEXT", False, None),
    ],
)
def test_integer_ranges_of_declared_types(
    declared: str, sized: bool, expected: tuple[int, int] | None
) -> None:
    assert integer_range(declared, sized=sized) == expected


REQUIRED = {"RouteData": ("modid", "serverip"), "ServerCallStatus": ("succ_total",)}


async def test_an_initialised_store_misses_nothing(store: RouteStore) -> None:
    assert await store.missing_schema(REQUIRED) == []


async def test_missing_tables_and_columns_are_named(store_url: str) -> None:
    if store_url.startswith("sqlite"):
        async with open_store(store_url.replace("lars.db", "empty.db"), create=True) as empty:
            assert await empty.missing_schema(REQUIRED) == [
                "table RouteData",
                "table ServerCallStatus",
            ]
        return
    async with mysql_admin.fresh_database() as url, open_store(url) as empty:
        await mysql_admin.execute(url, "CREATE TABLE ServerCallStatus (modid int(11) NOT NULL)")
        assert await empty.missing_schema(REQUIRED) == [
            "table RouteData",
            "column ServerCallStatus.succ_total",
        ]


async def test_column_limits_follow_the_declared_types(store: RouteStore) -> None:
    limits = await store.call_status_limits()
    assert limits is not None and limits.narrower == ()
    fits = CallStatus(2**32 - 1, 2**32 - 1, 2**32 - 1, 65535, 2**32 - 1, 2**63, 0, 2**40, True)
    if store.kind == "mysql":
        assert limits.ranges["modid"] == limits.ranges["ip"] == U32
        assert limits.ranges["succ_total"] == (0, 2**64 - 1)
        assert limits.refusal(fits) is None
    else:
        assert set(limits.ranges.values()) == {INT64_RANGE}
        assert limits.refusal(fits) == (
            "succ_total 9223372036854775808 does not fit ServerCallStatus.succ_total INTEGER"
        )
    # What the limits let through, the store takes.
    fitting = CallStatus(2**32 - 1, 2**32 - 1, 2**32 - 1, 65535, 2**32 - 1, 2**63 - 1, 0, 1, True)
    assert limits.refusal(fitting) is None
    await store.upsert_call_status([fitting])
    (row,) = await store.read_call_status()
    assert (row.succ_total, row.succ) == (2**63 - 1, 2**31 - 1)


@pytest.mark.mysql
async def test_mysql_totals_stop_at_their_limit_instead_of_failing_every_later_batch(
    db_url: str,
) -> None:
    most = 2**64 - 1  # BIGINT UNSIGNED: what one hostile report may carry
    async with open_store(db_url) as store:
        await store.upsert_call_status([CallStatus(1, 1, 1, 80, 1, most, 0, 1, False)])
        await store.upsert_call_status([CallStatus(1, 1, 1, 80, 1, 5, 7, 2, False)])
        (row,) = await store.read_call_status()
    assert (row.succ_total, row.err_total, row.succ, row.ts) == (most, 7, 5, 2)
