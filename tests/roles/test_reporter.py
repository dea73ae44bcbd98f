"""The reporter role in process: batching, acknowledgements, outages, backpressure."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import attrs
import msgpack
import pytest
import trio
import trio.testing

from lars import wire, wire_original
from lars.config import ReporterConfig
from lars.errors import StoreConflict, StoreError, StoreUnavailable
from lars.roles import reporter as reporter_module
from lars.roles.reporter import (
    HISTORY_FUTURE_SLACK,
    HISTORY_PURGE_INTERVAL,
    MAX_QUEUED_REPLY_BYTES,
    ORIGINAL_FLUSH_INTERVAL,
    OriginalStatsLedger,
    Reporter,
    history_of,
)
from lars.store import CallPoint, CallStatus, HistoryRow, RouteStore
from lars.store.sql import HISTORY_COUNT_MAX
from lars.store.sqlite import SqliteStore
from tests.fakes import FlakyStore, FramedClient, memory_store
from tests.store_helpers import fetch

CALLER = 2130706433  # 127.0.0.1
VIRTUAL_DEADLINE = 3600


class PickyStore(FlakyStore):
    """Refuses (with a non-retryable error) any batch holding a row of module 13/13."""

    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        if any(r.modid == 13 for r in rows):
            raise StoreError("test: value out of range for column modid")
        await super().upsert_call_status(rows)


@pytest.fixture
async def store() -> AsyncIterator[PickyStore]:
    inner = memory_store()
    await inner.init_schema()
    picky = PickyStore(inner)
    yield picky
    await picky.aclose()


def report(seq: int, modid: int = 1, *results: tuple[int, int, int, int, bool]) -> wire.Message:
    hosts = results or ((167772161, 80, 3, 1, False),)
    return wire.ReportStatusRequest(
        modid, 1, CALLER, tuple(wire.HostResult(*r) for r in hosts), 1_800_000_000 + seq, seq
    )


@asynccontextmanager
async def running(
    store: RouteStore, *, clock: Callable[[], float] = time.time, **config: float
) -> AsyncIterator[tuple[Reporter, trio.Nursery]]:
    reporter = Reporter(ReporterConfig(listen="127.0.0.1:0", **config), store, clock=clock)  # type: ignore[arg-type]
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(reporter.config.writers):
                nursery.start_soon(reporter._writer)
            yield reporter, nursery
            nursery.cancel_scope.cancel()


def connect(reporter: Reporter, nursery: trio.Nursery) -> FramedClient:
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(reporter.handle_connection, served)
    return FramedClient(client)


async def acks(client: FramedClient, count: int) -> list[int]:
    seqs = []
    for _ in range(count):
        msg = await client.receive()
        assert isinstance(msg, wire.ReportStatusAck), msg
        seqs.append(msg.seq)
    return sorted(seqs)


async def test_reports_are_stored_then_acknowledged(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(report(1), report(2, 2, (167772162, 81, 5, 0, True)))
        assert await acks(client, 2) == [1, 2]
        rows = await store.inner.read_call_status()
        assert [(r.modid, r.ip, r.port, r.caller, r.succ, r.err, r.overload) for r in rows] == [
            (1, 167772161, 80, CALLER, 3, 1, False),
            (2, 167772162, 81, CALLER, 5, 0, True),
        ]
        await client.send(report(3))
        assert await acks(client, 1) == [3]
        (row,) = await store.inner.read_call_status(1, 1)
        assert (row.succ, row.succ_total, row.err_total, row.ts) == (3, 6, 2, 1_800_000_003)
        assert reporter.metrics.counters["results_written"] == 3


async def test_an_unreachable_store_holds_reports_until_it_returns(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, retry_max=2) as (reporter, nursery):
        client = connect(reporter, nursery)
        store.down = True
        await client.send(report(1), report(2))
        with trio.move_on_after(60):
            await client.receive()
            pytest.fail("acknowledged while the store was down")
        assert reporter.store_ok is False
        assert reporter.metrics.gauges["store_ok"] == 0
        store.down = False
        assert await acks(client, 2) == [1, 2]
        (row,) = await store.inner.read_call_status()
        assert (row.succ_total, row.err_total) == (6, 2)
        assert reporter.metrics.counters.get("reports_dropped", 0) == 0


async def test_refused_reports_are_dropped_counted_and_acknowledged_others_stored(
    store: PickyStore, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(store, writers=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(report(1), report(2, 13), report(3, 3))
        assert await acks(client, 3) == [1, 2, 3]
        stored = {(r.modid, r.succ_total) for r in await store.inner.read_call_status()}
        assert stored == {(1, 3), (3, 3)}
        assert reporter.metrics.counters["reports_dropped"] == 1
        assert reporter.metrics.counters["results_dropped"] == 1
        assert any("dropped the report of module 13/1" in r.getMessage() for r in caplog.records)


async def test_a_full_queue_stops_reading_so_memory_stays_bounded(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, queue_size=4, writers=1) as (reporter, nursery):
        store.down = True  # nothing drains the queue
        client, served = trio.testing.lockstep_stream_pair()  # no buffering in between
        nursery.start_soon(reporter.handle_connection, served)
        frame = wire.encode_frame(report(1))
        sent = 0
        with trio.move_on_after(30):
            while True:
                await client.send_all(frame)
                sent += 1
        # The queue, the batch a writer holds, and the reports in hand: no more.
        assert reporter._receive.statistics().current_buffer_used == 4
        assert sent <= 4 + 1 + 2
        assert reporter.metrics.counters["reports_received"] <= 4 + 1 + 1
        store.down = False
        await client.aclose()


async def test_bad_frames_close_the_connection_invalid_values_get_an_error(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        client = connect(reporter, nursery)
        bad_port = wire.encode_frame(report(1))  # then poke an invalid port into a copy
        body = msgpack.packb([3, 1, 1, CALLER, [[1, 0, 1, 0, False]], 5, 9])
        await client.send_raw(struct.pack("!I", len(body)) + body)
        reply = await client.receive()
        assert isinstance(reply, wire.ErrorReply) and reply.code == wire.RetCode.BAD_REQUEST
        await client.send_raw(bad_port)
        assert await acks(client, 1) == [1]
        await client.send_raw(struct.pack("!I", 4) + b"\xc1\xc1\xc1\xc1")
        assert await client.closed_by_peer()
        assert reporter.metrics.counters["malformed_frames"] == 1
        assert reporter.metrics.counters["invalid_requests"] == 1


async def test_drain_waits_for_the_queue_to_empty(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, retry_max=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        store.down = True
        await client.send(report(1), report(2))
        await trio.sleep(5)
        with trio.move_on_after(10) as waited:
            await reporter.drain()
        assert waited.cancelled_caught  # cannot drain while the store is down
        store.down = False
        with trio.fail_after(10):
            await reporter.drain()
        assert len(await store.inner.read_call_status()) == 1


class OnceFailingStore(FlakyStore):
    """Fails the first upsert with a generic (not "unreachable") error, then works."""

    failures = 1

    def __init__(self, inner: RouteStore) -> None:
        super().__init__(inner)
        self.attempts: list[list[CallStatus]] = []

    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        self.attempts.append(list(rows))
        if self.failures:
            self.failures -= 1
            raise StoreError("test: deadlock found when trying to get lock")
        await super().upsert_call_status(rows)


async def test_a_transient_store_error_is_retried_as_a_whole_batch(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    inner = memory_store()
    await inner.init_schema()
    store = OnceFailingStore(inner)
    async with running(store, writers=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(report(1), report(2, 2))
        assert await acks(client, 2) == [1, 2]
    assert len(await inner.read_call_status()) == 2
    assert store.attempts[1] == store.attempts[0]  # the failed batch was retried whole ...
    assert not any("one by one" in r.getMessage() for r in caplog.records)  # ... not split
    assert reporter.metrics.counters.get("reports_dropped", 0) == 0
    await inner.aclose()


class CommitThenLostStore(FlakyStore):
    """Stores the first batch, then raises StoreUnavailable as if the answer to its COMMIT
    had been lost with the node; works after that."""

    lost = 1

    def __init__(self, inner: RouteStore) -> None:
        super().__init__(inner)
        self.tokens: list[bytes | None] = []

    async def record_calls(
        self,
        rows: Sequence[CallStatus],
        history: Sequence[HistoryRow],
        token: bytes | None = None,
    ) -> bool:
        self.tokens.append(token)
        stored = await self.inner.record_calls(rows, history, token)
        if self.lost:
            self.lost -= 1
            raise StoreUnavailable("test: lost connection to MySQL server during query")
        return stored

    async def batch_recorded(self, token: bytes) -> bool:
        return await self.inner.batch_recorded(token)


async def test_a_batch_stored_before_its_commit_was_lost_is_not_counted_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = memory_store()
    await inner.init_schema()
    store = CommitThenLostStore(inner)
    async with running(store, writers=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(report(1))
        assert await acks(client, 1) == [1]
        await client.send(report(2, 2))
        assert await acks(client, 1) == [2]
    first, again, other = store.tokens
    assert first is not None and again == first and other not in (first, None)
    totals = {row.modid: row.succ_total for row in await inner.read_call_status()}
    assert totals == {1: 3, 2: 3}, totals
    assert reporter.metrics.counters["batches_repeated"] == 1
    await inner.aclose()


async def test_a_peer_that_never_reads_its_replies_is_disconnected(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        client, served = trio.testing.lockstep_stream_pair()  # what is not read stays queued
        nursery.start_soon(reporter.handle_connection, served)
        burst = wire.encode_frame(wire.StatsRequest(1)) * 1000
        most_queued = sent = 0
        with pytest.raises(trio.BrokenResourceError):
            while sent < 200 * MAX_QUEUED_REPLY_BYTES:  # far more replies than may be queued
                await client.send_all(burst)
                sent += len(burst)
                queued = [conn.queued_bytes for conn in reporter.connections]
                most_queued = max(most_queued, *queued, 0)
        assert 0 < most_queued <= MAX_QUEUED_REPLY_BYTES
        assert reporter.metrics.counters["reply_overflows"] == 1
        await trio.testing.wait_all_tasks_blocked()
        assert not reporter.connections
        # The reporter still serves everyone else.
        other = connect(reporter, nursery)
        await other.send(report(1))
        assert await acks(other, 1) == [1]


async def test_acknowledgements_a_peer_never_reads_are_bounded_too(
    store: PickyStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 4096  # about 400 acknowledgements, to keep the test quick
    monkeypatch.setattr(reporter_module, "MAX_QUEUED_REPLY_BYTES", bound)
    async with running(store) as (reporter, nursery):
        client, served = trio.testing.lockstep_stream_pair()
        nursery.start_soon(reporter.handle_connection, served)
        burst = b"".join(wire.encode_frame(report(seq)) for seq in range(1, 101))
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # 10,000 reports, never reading an acknowledgement
                await client.send_all(burst)
                queued = [conn.queued_bytes for conn in reporter.connections]
                assert max(queued, default=0) <= bound
        assert reporter.metrics.counters["reply_overflows"] == 1
        # What was stored stays stored; the agent sends the unacknowledged reports again.
        assert reporter.metrics.counters["results_written"] > bound // 16


async def test_counts_beyond_64_bits_are_dropped_on_sqlite_not_fatal(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sqlite = memory_store()  # the real store, which knows its columns
    await sqlite.init_schema()
    async with running(sqlite, writers=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        huge = (167772161, 80, 2**63, 0, False)  # a signed 64-bit SQLite integer cannot hold it
        await client.send(report(1), report(2, 2, huge, (167772162, 80, 1, 0, False)), report(3, 3))
        assert await acks(client, 3) == [1, 2, 3]
        stored = {(r.modid, r.ip) for r in await sqlite.read_call_status()}
        assert stored == {(1, 167772161), (2, 167772162), (3, 167772161)}
        assert reporter.metrics.counters["results_dropped"] == 1
        assert reporter.metrics.counters.get("store_errors", 0) == 0
        assert any(
            "does not fit ServerCallStatus.succ_total" in r.getMessage() for r in caplog.records
        )
    await sqlite.aclose()


async def test_an_error_reply_to_a_64_bit_seq_still_decodes(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(wire.ReportStatusAck(2**32 + 5), wire.ReportStatusAck(7))
        first, second = await client.receive(), await client.receive()
        assert isinstance(first, wire.ErrorReply) and first.seq == 0  # no 32-bit seq to echo
        assert isinstance(second, wire.ErrorReply) and second.seq == 7
        assert first.code == wire.RetCode.BAD_REQUEST


# --- original Lars agents -----------------------------------------------------------------------

IP1, IP2 = 167772161, 167772162


def original(modid: int, *results: tuple[int, int, int, int, bool], ts: int = 1) -> bytes:
    """An original agent's report (it sends one per call, with its running counts)."""
    msg = wire.ReportStatusRequest(
        modid, 1, CALLER, tuple(wire.HostResult(*r) for r in results), ts
    )
    return wire_original.encode(msg)


def ledger_rows(
    ledger: OriginalStatsLedger, window: bool = False
) -> list[tuple[int, int, int, int, bool]]:
    """What a take writes per host: the calls added to the totals (or, with ``window``, the
    latest window counts stored as succ_cnt/err_cnt), and the overload flag."""
    rows = []
    for report_ in ledger.take():
        assert report_.seq == 0 and report_.caller == CALLER
        for r, (succ, err) in zip(report_.results, report_.added, strict=True):
            counts = (r.succ, r.err) if window else (succ, err)
            rows.append((report_.modid, r.ip, *counts, r.overload))
    return sorted(rows)


def feed(ledger: OriginalStatsLedger, *results: tuple[int, int, int, int, bool]) -> None:
    msg = wire.ReportStatusRequest(1, 1, CALLER, tuple(wire.HostResult(*r) for r in results), 7)
    assert ledger.feed(msg)


def test_the_ledger_turns_running_counts_into_the_calls_of_each_interval() -> None:
    ledger = OriginalStatsLedger()
    feed(ledger, (IP1, 80, 4, 0, False), (IP2, 80, 0, 0, False))  # the base: not counted
    assert ledger_rows(ledger) == [(1, IP1, 0, 0, False), (1, IP2, 0, 0, False)]
    feed(ledger, (IP1, 80, 5, 0, False), (IP2, 80, 0, 0, False))
    feed(ledger, (IP1, 80, 5, 1, False), (IP2, 80, 0, 0, False))
    assert ledger_rows(ledger) == [(1, IP1, 1, 1, False)]
    feed(ledger, (IP1, 80, 5, 1, False), (IP2, 80, 0, 0, False))  # nothing new
    assert ledger_rows(ledger) == []
    feed(ledger, (IP1, 80, 8, 1, False), (IP2, 80, 0, 0, False))
    feed(ledger, (IP1, 80, 0, 1, False), (IP2, 80, 0, 0, False))  # a new window: 0 + 1
    feed(ledger, (IP1, 80, 0, 3, False), (IP2, 80, 0, 0, False))
    assert ledger_rows(ledger) == [(1, IP1, 3, 3, False)]
    feed(ledger, (IP1, 80, 0, 0, True), (IP2, 80, 0, 0, False))  # overloaded: a row, no calls
    assert ledger_rows(ledger) == [(1, IP1, 0, 0, True)]


def test_the_ledger_stores_the_latest_window_counts_as_the_original_did() -> None:
    ledger = OriginalStatsLedger()
    feed(ledger, (IP1, 80, 4, 0, False))
    assert ledger_rows(ledger, window=True) == [(1, IP1, 4, 0, False)]
    feed(ledger, (IP1, 80, 5, 0, False))
    feed(ledger, (IP1, 80, 6, 2, False))
    assert ledger_rows(ledger, window=True) == [(1, IP1, 6, 2, False)]


def test_the_ledger_lets_go_of_hosts_no_report_names_any_more() -> None:
    ledger = OriginalStatsLedger(keep=2)
    feed(ledger, (IP1, 80, 1, 0, False))
    ledger.take()
    ledger.take()
    assert len(ledger) == 1
    ledger.take()
    assert len(ledger) == 0
    feed(ledger, (IP1, 80, 9, 0, False))  # back: a new base, never counted twice
    assert ledger_rows(ledger) == [(1, IP1, 0, 0, False)]


def test_the_ledger_is_bounded() -> None:
    ledger = OriginalStatsLedger(capacity=2)
    feed(ledger, (IP1, 80, 1, 0, False), (IP2, 80, 1, 0, False))
    msg = wire.ReportStatusRequest(2, 1, CALLER, (wire.HostResult(IP1, 80, 1, 0, False),), 7)
    assert not ledger.feed(msg)  # no room while the others wait to be taken
    assert len(ledger_rows(ledger)) == 2
    assert ledger.feed(msg)  # room made by letting the least recently reported go
    assert len(ledger) == 2
    too_many = tuple(wire.HostResult(IP1, p, 1, 0, False) for p in range(1, 4))
    assert not ledger.feed(wire.ReportStatusRequest(3, 1, CALLER, too_many, 7))
    ledger.take()
    assert not ledger.feed(wire.ReportStatusRequest(3, 1, CALLER, too_many, 7))


async def test_an_original_agents_reports_are_stored_as_the_original_did_without_acks(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        nursery.start_soon(reporter._original_flusher)
        client = connect(reporter, nursery)
        # The agent's first report sets the base; then three calls to IP1, one failing, each
        # followed by the agent's full report.
        await client.send_raw(
            original(1, (IP1, 80, 0, 0, False), (IP2, 80, 0, 0, False), ts=9)
            + original(1, (IP1, 80, 1, 0, False), (IP2, 80, 0, 0, False), ts=10)
            + original(1, (IP1, 80, 2, 0, False), (IP2, 80, 0, 0, False), ts=11)
            + original(1, (IP1, 80, 2, 1, False), (IP2, 80, 0, 0, False), ts=12)
        )
        await trio.sleep(ORIGINAL_FLUSH_INTERVAL * 1.5)
        rows = {r.ip: r for r in await store.inner.read_call_status(1, 1)}
        assert (rows[IP1].succ, rows[IP1].err, rows[IP1].ts) == (2, 1, 12)
        assert (rows[IP2].succ, rows[IP2].err) == (0, 0)
        # Two more calls, and a new window: the totals count every call once.
        await client.send_raw(
            original(1, (IP1, 80, 3, 1, False), (IP2, 80, 0, 0, False), ts=13)
            + original(1, (IP1, 80, 1, 0, False), (IP2, 80, 0, 0, False), ts=14)
        )
        await trio.sleep(ORIGINAL_FLUSH_INTERVAL * 1.5)
        rows = {r.ip: r for r in await store.inner.read_call_status(1, 1)}
        assert (rows[IP1].succ, rows[IP1].err) == (1, 0)  # the latest report's, as stored
        assert (rows[IP1].succ_total, rows[IP1].err_total) == (4, 1)  # every call once
        with trio.move_on_after(5):
            await client.receive()
            pytest.fail("an original agent got a reply: its protocol has none")
        assert reporter.metrics.counters["original_reports_received"] == 6
        assert reporter.metrics.counters["reports_received"] == 6
        assert [c.original for c in reporter.connections] == [True]


async def test_the_original_counts_are_written_at_shutdown(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send_raw(original(4, (IP1, 80, 5, 0, False)))
        await client.send_raw(original(4, (IP1, 80, 7, 0, False)))
        await trio.testing.wait_all_tasks_blocked()
        await reporter.drain()
        (row,) = await store.inner.read_call_status(4, 1)
        assert (row.succ, row.succ_total) == (7, 2)


async def test_a_bad_frame_from_an_original_agent_costs_that_frame_alone(
    store: PickyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send_raw(
            struct.pack("<ii", 3, 2)
            + b"\x08\x80"  # truncated
            + struct.pack("<ii", 1, 0)  # a GetRouteRequest: not the reporter's
            + original(5, (IP1, 0, 1, 0, False))  # port 0
            + original(5, (IP1, 80, 1, 0, False))
            + original(5, (IP1, 80, 2, 0, False))
        )
        await trio.testing.wait_all_tasks_blocked()
        await reporter.drain()
        assert [(r.succ, r.succ_total) for r in await store.inner.read_call_status(5, 1)] == [
            (2, 1)
        ]
        assert reporter.metrics.counters["malformed_frames"] == 3
        await client.send_raw(struct.pack("<ii", 3, -5))  # a broken framing closes
        assert await client.closed_by_peer()


# --- call history (issue 10) ----------------------------------------------------------------------

#: A minute: the wall clock of the history tests at virtual time 0.
BASE = 1_800_000_000 - 1_800_000_000 % 60
RETENTION = ReporterConfig().history_retention
CALLER2 = 2130706434
M = (1, 1)


def wall() -> float:
    """The reporter's wall clock in the history tests: BASE plus the virtual time."""
    return BASE + trio.current_time()


def status_row(
    caller: int, succ: int, err: int, ts: int, ip: int = IP1, add: tuple[int, int] | None = None
) -> CallStatus:
    row = CallStatus(*M, ip, 80, caller, succ, err, ts, False)
    return row if add is None else attrs.evolve(row, add_succ=add[0], add_err=add[1])


def test_history_sums_each_host_and_minute_over_callers_in_key_order() -> None:
    rows = [
        status_row(CALLER, 3, 1, BASE + 5),
        status_row(CALLER, 2, 0, BASE + 10, ip=IP2),
        status_row(CALLER2, 4, 0, BASE + 59),
        status_row(CALLER, 1, 1, BASE + 60),
        status_row(CALLER2, 0, 0, BASE + 61),  # no calls: nothing
    ]
    # In CallHistory's key order (modid, cmdid, minute, ip, port): the lock order.
    assert history_of(rows, BASE + 100, RETENTION) == [
        HistoryRow(*M, IP1, 80, BASE, 7, 1),
        HistoryRow(*M, IP2, 80, BASE, 2, 0),
        HistoryRow(*M, IP1, 80, BASE + 60, 1, 1),
    ]
    assert history_of([], BASE, RETENTION) == []


def test_history_counts_what_the_totals_count() -> None:
    """An original agent's row holds its window counts; its calls are the increments."""
    rows = [
        status_row(CALLER, 50, 9, BASE, add=(2, 1)),
        status_row(CALLER2, 7, 7, BASE, add=(0, 0)),
    ]
    assert history_of(rows, BASE, RETENTION) == [HistoryRow(*M, IP1, 80, BASE, 2, 1)]


def test_history_minutes_of_reports_from_the_future_and_the_past() -> None:
    now = BASE + 30
    minutes = {
        ts: [h.minute for h in history_of([status_row(CALLER, 1, 0, ts)], now, RETENTION)]
        for ts in (
            now + HISTORY_FUTURE_SLACK,  # a clock a little ahead: its own minute
            now + HISTORY_FUTURE_SLACK + 1,  # further: the reporter's minute
            2**63 - 1,
            BASE - 60,
            int(now - RETENTION),  # its minute is before the retention: purged at once
            int(now - RETENTION) + 30,  # its minute is the oldest kept
            -1,
        )
    }
    assert minutes == {
        now + HISTORY_FUTURE_SLACK: [BASE + 60],
        now + HISTORY_FUTURE_SLACK + 1: [BASE],
        2**63 - 1: [BASE],
        BASE - 60: [BASE - 60],
        int(now - RETENTION): [],
        int(now - RETENTION) + 30: [int(now - RETENTION) + 30],
        -1: [],
    }


def test_history_sums_stop_at_the_largest_count() -> None:
    rows = [status_row(CALLER, HISTORY_COUNT_MAX, 2**64 - 1, BASE)] * 2
    assert history_of(rows, BASE, RETENTION) == [
        HistoryRow(*M, IP1, 80, BASE, HISTORY_COUNT_MAX, HISTORY_COUNT_MAX)
    ]


@pytest.fixture
async def sqlite() -> AsyncIterator[SqliteStore]:
    """A real (in-memory) store: the history is in it."""
    inner = memory_store()
    await inner.init_schema()
    yield inner
    await inner.aclose()


def calls_report(
    seq: int, caller: int, *results: tuple[int, int, int, int, bool], ts: int, modid: int = 1
) -> wire.ReportStatusRequest:
    return wire.ReportStatusRequest(
        modid, 1, caller, tuple(wire.HostResult(*r) for r in results), ts, seq
    )


async def test_each_batch_adds_its_calls_to_the_history(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(sqlite, clock=wall) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(calls_report(1, CALLER, (IP1, 80, 3, 1, False), ts=BASE + 1))
        assert await acks(client, 1) == [1]
        await client.send(
            calls_report(2, CALLER2, (IP1, 80, 4, 0, False), (IP2, 80, 1, 1, True), ts=BASE + 2)
        )
        assert await acks(client, 1) == [2]
        await trio.sleep(60)
        await client.send(calls_report(3, CALLER, (IP1, 80, 2, 2, False), ts=BASE + 61))
        assert await acks(client, 1) == [3]
    assert await sqlite.call_history(M, BASE, BASE + 120) == {
        (IP1, 80): [CallPoint(BASE, 7, 1), CallPoint(BASE + 60, 2, 2)],
        (IP2, 80): [CallPoint(BASE, 1, 1)],
    }
    assert reporter.metrics.counters["history_rows_written"] == 4
    assert reporter.registry.get_sample_value("lars_reporter_history_rows_written_total") == 4


async def test_nothing_is_stored_or_acknowledged_until_the_history_is_too(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock
) -> None:
    """The statistics and the history go in one transaction: an acknowledgement means both."""
    await fetch(sqlite, "ALTER TABLE CallHistory RENAME TO CallHistoryGone")
    async with running(sqlite, clock=wall, retry_max=2) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(calls_report(1, CALLER, (IP1, 80, 3, 1, False), ts=BASE))
        with trio.move_on_after(60):
            await client.receive()
            pytest.fail("acknowledged while the history could not be written")
        assert reporter.store_ok is False
        assert await sqlite.read_call_status() == []
        await fetch(sqlite, "ALTER TABLE CallHistoryGone RENAME TO CallHistory")
        assert await acks(client, 1) == [1]
    (row,) = await sqlite.read_call_status()
    assert (row.succ_total, row.err_total) == (3, 1)
    assert await sqlite.call_history(M, BASE, BASE + 60) == {(IP1, 80): [CallPoint(BASE, 3, 1)]}


async def test_a_report_whose_history_is_refused_is_dropped_whole(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock
) -> None:
    await fetch(
        sqlite,
        "CREATE TRIGGER refuse_13 BEFORE INSERT ON CallHistory WHEN NEW.modid = 13"
        " BEGIN SELECT RAISE(ABORT, 'test: module 13 refused'); END",
    )
    async with running(sqlite, clock=wall, writers=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(
            calls_report(1, CALLER, (IP1, 80, 1, 0, False), ts=BASE),
            calls_report(2, CALLER, (IP1, 80, 5, 0, False), ts=BASE, modid=13),
            calls_report(3, CALLER, (IP2, 80, 2, 0, False), ts=BASE),
        )
        assert await acks(client, 3) == [1, 2, 3]
    assert [(r.modid, r.ip) for r in await sqlite.read_call_status()] == [(1, IP1), (1, IP2)]
    assert await sqlite.call_history(M, BASE, BASE + 60) == {
        (IP1, 80): [CallPoint(BASE, 1, 0)],
        (IP2, 80): [CallPoint(BASE, 2, 0)],
    }
    assert await sqlite.call_history((13, 1), BASE, BASE + 60) == {}
    assert reporter.metrics.counters["reports_dropped"] == 1


async def test_reports_from_the_future_count_now_and_expired_ones_not_at_all(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(sqlite, clock=wall, history_retention=3600) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(
            calls_report(1, CALLER, (IP1, 80, 1, 0, False), ts=BASE + 86400),
            calls_report(2, CALLER2, (IP1, 80, 0, 1, False), ts=BASE - 3660),
        )
        assert await acks(client, 2) == [1, 2]
    assert len(await sqlite.read_call_status()) == 2  # the statistics take both
    assert await sqlite.call_history(M, 0, BASE + 100_000) == {(IP1, 80): [CallPoint(BASE, 1, 0)]}


async def test_an_original_agents_calls_go_to_the_history_once(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(sqlite, clock=wall) as (reporter, nursery):
        nursery.start_soon(reporter._original_flusher)
        client = connect(reporter, nursery)
        await client.send_raw(
            original(1, (IP1, 80, 0, 0, False), (IP2, 80, 0, 0, False), ts=BASE)
            + original(1, (IP1, 80, 1, 0, False), (IP2, 80, 0, 0, False), ts=BASE + 1)
            + original(1, (IP1, 80, 2, 0, False), (IP2, 80, 0, 0, False), ts=BASE + 2)
            + original(1, (IP1, 80, 2, 1, False), (IP2, 80, 0, 0, False), ts=BASE + 3)
        )
        await trio.sleep(ORIGINAL_FLUSH_INTERVAL * 1.5)
        await client.send_raw(
            original(1, (IP1, 80, 3, 1, False), (IP2, 80, 0, 0, False), ts=BASE + 4)
            + original(1, (IP1, 80, 1, 0, False), (IP2, 80, 0, 0, False), ts=BASE + 5)
        )
        await trio.sleep(ORIGINAL_FLUSH_INTERVAL * 1.5)
    # Every call once: not the running counts each report repeats.
    assert await sqlite.call_history(M, BASE, BASE + 60) == {(IP1, 80): [CallPoint(BASE, 4, 1)]}


class PurgeFlakyStore(FlakyStore):
    """A FlakyStore whose history purge goes to the real store (or fails while down)."""

    async def purge_history(self, older_than: int, limit: int = 10_000) -> int:
        self._check()
        return await self.inner.purge_history(older_than, limit)


async def test_the_purge_task_deletes_minutes_past_the_retention_a_chunk_at_a_time(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporter_module, "HISTORY_PURGE_CHUNK", 2)
    old = [HistoryRow(*M, IP1, port, BASE - 660 - 60 * (port % 2), 1, 0) for port in range(1, 6)]
    kept = [HistoryRow(*M, IP1, 80, BASE - 600, 1, 0), HistoryRow(*M, IP2, 80, BASE - 60, 1, 0)]
    await sqlite.record_calls([], old + kept)
    minutes = "SELECT minute FROM CallHistory ORDER BY minute"
    async with running(sqlite, clock=wall, history_retention=600) as (reporter, nursery):
        nursery.start_soon(reporter._history_purger)
        await trio.testing.wait_all_tasks_blocked()
        assert await fetch(sqlite, minutes) == [(BASE - 600,), (BASE - 60,)]
        assert reporter.metrics.counters["history_rows_purged"] == 5
        # Every HISTORY_PURGE_INTERVAL, what has grown too old since goes.
        await trio.sleep(HISTORY_PURGE_INTERVAL * 1.5)
        assert await fetch(sqlite, minutes) == [(BASE - 60,)]
        await trio.sleep(HISTORY_PURGE_INTERVAL * 8)
        assert await fetch(sqlite, minutes) == [(BASE - 60,)]
        await trio.sleep(HISTORY_PURGE_INTERVAL)
        assert await fetch(sqlite, minutes) == []
        assert reporter.metrics.counters["history_rows_purged"] == 7
        assert reporter.registry.get_sample_value("lars_reporter_history_rows_purged_total") == 7


async def test_a_failing_purge_is_logged_and_tried_again_next_time(
    sqlite: SqliteStore, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    await sqlite.record_calls([], [HistoryRow(*M, IP1, 80, BASE - int(RETENTION) - 60, 1, 0)])
    store = PurgeFlakyStore(sqlite)
    store.down = True
    async with running(store, clock=wall) as (reporter, nursery):
        nursery.start_soon(reporter._history_purger)
        await trio.sleep(HISTORY_PURGE_INTERVAL * 2.5)
        assert await fetch(sqlite, "SELECT COUNT(*) FROM CallHistory") == [(1,)]
        assert sum("purging old CallHistory rows failed" in r.getMessage() for r in caplog.records)
        assert reporter.metrics.counters["store_errors"] == 3
        store.down = False
        await trio.sleep(HISTORY_PURGE_INTERVAL)
        assert await fetch(sqlite, "SELECT COUNT(*) FROM CallHistory") == [(0,)]
        assert reporter.metrics.counters["history_rows_purged"] == 1


class SplitThenDownStore(FlakyStore):
    """Refuses every batch of more than one row with a generic error (so the reporter falls
    back to writing report by report); while ``outage`` names an error class, single-row
    writes fail with it (a Galera node cut off from its cluster: StoreUnavailable, or
    StoreConflict after the store's own re-runs)."""

    outage: type[StoreError] | None = None

    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        if len(rows) > 1:
            raise StoreError("test: batch refused")
        if self.outage is not None:
            raise self.outage("test: error 1047 WSREP has not yet prepared node")
        await self.inner.upsert_call_status(rows)


@pytest.mark.parametrize("outage", [StoreUnavailable, StoreConflict])
async def test_an_outage_while_writing_one_by_one_holds_the_reports(
    autojump_clock: trio.testing.MockClock, outage: type[StoreError]
) -> None:
    """A store that goes away while the reporter writes a refused batch report by report:
    the reports meeting the outage are held (never acknowledged, never dropped) until it is
    back, then stored and acknowledged."""
    inner = memory_store()
    await inner.init_schema()
    store = SplitThenDownStore(inner)
    async with running(store, writers=1, retry_max=1) as (reporter, nursery):
        client = connect(reporter, nursery)
        await client.send(report(1), report(2, 2))
        assert await acks(client, 2) == [1, 2]  # written one by one
        store.outage = outage
        await client.send(report(3, 3), report(4, 4))
        with trio.move_on_after(60) as waited:
            await client.receive()
        assert waited.cancelled_caught  # nothing acknowledged while it lasts
        assert reporter.metrics.counters.get("reports_dropped", 0) == 0
        assert reporter.store_ok is False
        store.outage = None
        assert await acks(client, 2) == [3, 4]
    assert {row.modid for row in await inner.read_call_status()} == {1, 2, 3, 4}
    assert reporter.metrics.counters.get("reports_dropped", 0) == 0
    await inner.aclose()
