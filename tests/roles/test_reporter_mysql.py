"""The reporter on an original Lars database (signed ServerCallStatus.modid/cmdid/ip): a row
that does not fit those columns is dropped before its batch is written, never slowing the
others; after `lars db upgrade` the same rows are stored."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from lars.config import ReporterConfig
from lars.roles import reporter as reporter_module
from lars.roles.reporter import Reporter
from lars.store import CallPoint, RouteStore, open_store
from tests import mysql_admin
from tests.roles.test_reporter import acks, connect, report
from tests.store.test_legacy_schema import FILL
from tests.store.test_upgrade import IP_177, SIGNED_IP_TABLES

pytestmark = pytest.mark.mysql

A = 167772161  # 10.0.0.1
B = 167772162


@pytest.fixture
async def original_store() -> AsyncIterator[RouteStore]:
    """An original Lars database made usable by `lars db init` (which does not widen)."""
    async with mysql_admin.fresh_database() as url:
        await mysql_admin.execute(url, *SIGNED_IP_TABLES, *FILL)
        async with open_store(url) as store:
            await store.init_schema()
            yield store


async def serve(store: RouteStore, nursery: trio.Nursery) -> Reporter:
    reporter = Reporter(ReporterConfig(listen="127.0.0.1:0", writers=1), store)
    nursery.start_soon(reporter._writer)
    return reporter


async def test_rows_an_original_schema_cannot_hold_are_dropped_before_the_batch(
    original_store: RouteStore, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        reporter = await serve(original_store, nursery)
        client = connect(reporter, nursery)
        with trio.fail_after(10):
            await client.send(
                report(1, 1, (A, 80, 3, 1, False)),
                report(2, 2**31, (A, 80, 1, 0, False)),  # modid above a signed INT
                report(3, 5, (IP_177, 80, 1, 0, False), (B, 81, 2, 0, False)),  # one bad ip
            )
            assert await acks(client, 3) == [1, 2, 3]
        stored = {(r.modid, r.ip) for r in await original_store.read_call_status()}
        assert stored == {(1, A), (5, B)}
        counters = reporter.metrics.counters
        assert counters["results_dropped"] == counters["results_out_of_range"] == 2
        assert counters["results_written"] == 2
        assert counters.get("store_errors", 0) == 0  # the batch was written at the first try
        messages = [r.getMessage() for r in caplog.records]
        assert not any("one by one" in m for m in messages)
        assert any(
            "modid 2147483648 does not fit ServerCallStatus.modid int(11)" in m for m in messages
        )
        assert any("lars db upgrade" in m for m in messages)
        nursery.cancel_scope.cancel()


async def test_after_an_upgrade_the_reporter_stores_what_it_dropped(
    original_store: RouteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporter_module, "COLUMN_TYPES_MAX_AGE", 0.0)  # read them every batch
    async with trio.open_nursery() as nursery:
        reporter = await serve(original_store, nursery)
        client = connect(reporter, nursery)
        with trio.fail_after(10):
            await client.send(report(1, 2**31, (IP_177, 80, 1, 0, False)))
            assert await acks(client, 1) == [1]
            assert await original_store.read_call_status() == []
            plan = await original_store.plan_upgrade()
            for step in plan.steps:
                await original_store.apply_upgrade(step)
            await client.send(report(2, 2**31, (IP_177, 80, 1, 0, False)))
            assert await acks(client, 1) == [2]
        (row,) = await original_store.read_call_status()
        assert (row.modid, row.ip, row.succ_total) == (2**31, IP_177, 1)
        assert reporter.metrics.counters["results_dropped"] == 1
        nursery.cancel_scope.cancel()


async def test_the_reporter_adds_each_batch_to_the_call_history(db_url: str) -> None:
    """On MySQL too (whose batches are written with the integers in the statement)."""
    minute = 1_800_000_000  # report(seq) is stamped 1_800_000_000 + seq
    async with open_store(db_url) as store, trio.open_nursery() as nursery:
        config = ReporterConfig(listen="127.0.0.1:0", writers=1)
        reporter = Reporter(config, store, clock=lambda: minute + 30.0)
        nursery.start_soon(reporter._writer)
        client = connect(reporter, nursery)
        with trio.fail_after(10):
            await client.send(report(1, 1, (A, 80, 3, 1, False), (B, 81, 2, 0, True)))
            await client.send(report(2, 1, (A, 80, 4, 2, False)))
            assert await acks(client, 2) == [1, 2]
        assert await store.call_history((1, 1), minute, minute + 60) == {
            (A, 80): [CallPoint(minute, 7, 3)],
            (B, 81): [CallPoint(minute, 2, 0)],
        }
        (row, _) = await store.read_call_status()
        assert (row.ip, row.succ, row.succ_total, row.overload) == (A, 4, 7, False)
        nursery.cancel_scope.cancel()
