"""The DNS role in process, on memory streams and an inline store, under trio's MockClock."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
import trio.testing

from lars import wire, wire_original
from lars.config import DnsConfig
from lars.roles import dns as dns_role
from lars.roles.dns import ABSENT_SUBSCRIPTION_TTL, DnsServer
from lars.store import RouteStore
from tests.fakes import FlakyStore, FramedClient, memory_store
from tests.store_helpers import fetch

A = (167772161, 7001)
B = (167772162, 7002)
C = (167772163, 7003)
M1 = (1, 1)
M2 = (1, 2)
VIRTUAL_DEADLINE = 3600


class LaggingStore(FlakyStore):
    """A FlakyStore whose version reads stay at ``lagging_version`` while it is set, as a
    replica behind its primary."""

    lagging_version: int | None = None

    async def route_version(self) -> int:
        version = await super().route_version()
        return version if self.lagging_version is None else self.lagging_version


@pytest.fixture
async def store() -> AsyncIterator[LaggingStore]:
    inner = memory_store()
    await inner.init_schema()
    flaky = LaggingStore(inner)
    yield flaky
    await flaky.aclose()


@asynccontextmanager
async def running(
    store: RouteStore, **config: float
) -> AsyncIterator[tuple[DnsServer, trio.Nursery]]:
    server = DnsServer(DnsConfig(listen="127.0.0.1:0", **config), store)  # type: ignore[arg-type]
    # Virtual time under the autojump clock: a wait that never ends fails instead of hanging.
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.track_changes)
            yield server, nursery
            nursery.cancel_scope.cancel()


def connect(server: DnsServer, nursery: trio.Nursery) -> FramedClient:
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, served)
    return FramedClient(client)


async def ask(client: FramedClient, module: tuple[int, int]) -> frozenset[tuple[int, int]]:
    """The route of ``module`` (any DnsState before it is skipped)."""
    await client.send(wire.GetRouteRequest(*module))
    msg = await client.receive()
    while isinstance(msg, wire.DnsState):
        msg = await client.receive()
    assert isinstance(msg, wire.GetRouteResponse), msg
    assert (msg.modid, msg.cmdid) == module
    return frozenset(msg.hosts)


async def test_get_route_answers_the_current_route(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.change_routes(add={M1: [A, B], M2: [C]})
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A, B}
        assert await ask(client, M2) == {C}
        assert await ask(client, (7, 7)) == frozenset()  # unknown module: empty route
        assert server.subscribers.keys() == {M1, M2, (7, 7)}


async def test_add_is_pushed_to_subscribers_within_check_interval(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store, check_interval=1.0) as (server, nursery):
        client = connect(server, nursery)
        other = connect(server, nursery)
        assert await ask(client, M1) == {A}
        assert await ask(other, M2) == frozenset()
        start = trio.current_time()
        await store.inner.add_hosts(M1, [B])
        pushed = await client.route()
        assert frozenset(pushed.hosts) == {A, B}
        assert trio.current_time() - start <= 1.0
        assert server.metrics.counters["partial_reloads"] == 1
        # The connection subscribed to another module gets nothing.
        with trio.move_on_after(5):
            await other.receive()
            pytest.fail("a push reached a connection not subscribed to the module")


async def test_remove_and_delete_are_pushed_deleted_module_as_empty_route(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A, B])
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A, B}
        await store.inner.remove_hosts(M1, [A])
        assert frozenset((await client.route()).hosts) == {B}
        await store.inner.remove_hosts(M1, None)
        gone = await client.route()
        assert (gone.modid, gone.cmdid, gone.hosts) == (1, 1, ())
        assert M1 not in (server.routes or {})


async def test_change_notice_triggers_the_check_at_once(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, check_interval=30.0) as (server, nursery):
        client = connect(server, nursery)
        writer = connect(server, nursery)
        assert await ask(client, M1) == frozenset()
        result = await store.inner.add_hosts(M1, [A])
        assert result.version is not None
        start = trio.current_time()
        await writer.send(wire.RouteChangeNotice(result.version))
        assert frozenset((await client.route()).hosts) == {A}
        assert trio.current_time() - start < 0.01  # no poll interval waited
        assert server.metrics.counters["change_notices"] == 1


async def test_full_reload_catches_changes_made_without_a_version_raise(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store, check_interval=1.0, reload_interval=10.0) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        start = trio.current_time()
        # Someone edits RouteData by hand: no version raise, no RouteChange row.
        await fetch(
            store.inner,
            "INSERT INTO RouteData (modid, cmdid, serverip, serverport) VALUES (1, 1, ?, ?)",
            B,
        )
        assert frozenset((await client.route()).hosts) == {A, B}
        assert 0 < trio.current_time() - start <= 10.0 + 1.0


async def test_version_moved_without_change_rows_reloads_everything(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store, check_interval=1.0, reload_interval=100.0) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        start = trio.current_time()
        await fetch(
            store.inner,
            "INSERT INTO RouteData (modid, cmdid, serverip, serverport) VALUES (1, 1, ?, ?)",
            B,
        )
        await fetch(store.inner, "UPDATE RouteVersion SET version = version + 1 WHERE id = 1")
        assert frozenset((await client.route()).hosts) == {A, B}
        assert trio.current_time() - start <= 1.0
        assert server.metrics.counters["full_reloads"] == 2  # the first load and this one


async def test_closed_connection_drops_its_subscriptions(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        keeper = connect(server, nursery)
        await ask(client, M1)
        await ask(client, M2)
        await ask(keeper, M2)
        assert len(server.connections) == 2
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(server.connections) == 1
        assert server.subscribers.keys() == {M2}
        await store.inner.add_hosts(M1, [A])  # pushing to nobody must not fail
        await store.inner.add_hosts(M2, [B])
        assert frozenset((await keeper.route()).hosts) == {B}


async def test_store_outage_keeps_the_last_good_map_and_recovers(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lars.dns")
    await store.inner.add_hosts(M1, [A])
    async with running(store, check_interval=1.0, reload_interval=5.0, retry_max=4.0) as (
        server,
        nursery,
    ):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        store.down = True
        calls = store.calls
        await trio.sleep(60)  # many failed checks and full-reload deadlines pass
        assert store.calls - calls >= 10  # it kept retrying ...
        assert store.calls - calls <= 60 / 2  # ... with backoff, not every check_interval
        assert server.store_ok is False
        assert server.metrics.gauges["store_ok"] == 0
        # Told stale after stale_after (10 s) and again every 10 s while it lasts.
        states = [await client.receive() for _ in range(5)]
        assert all(isinstance(s, wire.DnsState) and s.stale == 1 for s in states), states
        assert server.stale
        assert await ask(client, M1) == {A}  # still served from the last good map
        newcomer = connect(server, nursery)
        await newcomer.send(wire.GetRouteRequest(*M1))
        got = [await newcomer.receive(), await newcomer.receive()]  # told at once
        assert wire.DnsState(1, 60, server.version) in got or any(
            isinstance(m, wire.DnsState) and m.stale == 1 for m in got
        ), got
        assert [frozenset(m.hosts) for m in got if isinstance(m, wire.GetRouteResponse)] == [{A}]
        down_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down_logs) == 1  # logged on the change of state, not per retry
        # While down, the operator changes the route; the DNS catches up when it is back.
        await store.inner.add_hosts(M1, [B])
        store.down = False
        got = []
        while not any(isinstance(m, wire.GetRouteResponse) for m in got):
            got.append(await client.receive())
        assert frozenset(got[-1].hosts) == {A, B}  # type: ignore[attr-defined]
        # ... and is told the DNS is fresh again (in whatever order with the push).
        while wire.DnsState(0, 0, server.version) not in got:
            got.append(await client.receive())
        assert server.store_ok is True
        assert not server.stale
        assert any("back" in r.getMessage() for r in caplog.records)


async def test_requests_wait_for_the_first_load(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    store.down = True
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        with trio.move_on_after(10):
            await client.receive()
            pytest.fail("answered before any route was loaded")
        assert server.routes is None
        store.down = False
        assert frozenset((await client.route()).hosts) == {A}


async def test_malformed_frame_closes_only_that_connection(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store) as (server, nursery):
        good = connect(server, nursery)
        assert await ask(good, M1) == {A}
        for garbage in (
            struct.pack("!I", 3) + b"\xc1\xc1\xc1",  # not msgpack
            struct.pack("!I", 1) + msgpack.packb(5),  # not an array
            struct.pack("!I", 0),  # empty frame
            struct.pack("!I", 1 << 30),  # oversized: rejected from the header
        ):
            bad = connect(server, nursery)
            await bad.send_raw(garbage)
            assert await bad.closed_by_peer()
        assert server.metrics.counters["malformed_frames"] == 4
        assert await ask(good, M1) == {A}
        await store.inner.add_hosts(M1, [B])
        assert frozenset((await good.route()).hosts) == {A, B}


async def test_invalid_values_get_an_error_reply_and_the_connection_stays(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        body = msgpack.packb([1, 2**32, 1])  # GetRouteRequest with modid out of range
        await client.send_raw(struct.pack("!I", len(body)) + body)
        reply = await client.receive()
        assert isinstance(reply, wire.ErrorReply)
        assert reply.code == wire.RetCode.BAD_REQUEST and "modid" in reply.reason
        await client.send(wire.GetHostRequest(5, 1, 1))  # valid, but not a DNS message
        reply = await client.receive()
        assert isinstance(reply, wire.ErrorReply) and reply.seq == 5
        assert await ask(client, M1) == {A}
        assert server.metrics.counters["invalid_requests"] == 2


async def test_stats_request_reports_counters(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        await ask(client, M1)
        await client.send(wire.StatsRequest(9))
        reply = await client.receive()
        assert isinstance(reply, wire.StatsResponse)
        assert (reply.seq, reply.role) == (9, "dns")
        assert reply.counters["route_requests"] == 1
        assert reply.counters["connections"] == 1
        assert reply.counters["store_ok"] == 1


async def test_two_instances_on_one_store_both_push_every_change(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (first, n1), running(store) as (second, n2):
        c1 = connect(first, n1)
        c2 = connect(second, n2)
        assert await ask(c1, M1) == frozenset()
        assert await ask(c2, M1) == frozenset()
        for hosts in ([A], [B], [C]):
            await store.inner.add_hosts(M1, hosts)
            assert (await c1.route()).hosts == (await c2.route()).hosts
        rows = await fetch(store.inner, "SELECT COUNT(*) FROM RouteChange")
        assert rows[0][0] == 3  # nobody consumed the change rows


async def test_slow_subscriber_costs_one_pending_frame_per_module(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (server, nursery):
        # A stream whose reader never reads: the writer blocks on its first send.
        client, served = trio.testing.lockstep_stream_pair()
        nursery.start_soon(server.handle_connection, served)
        await client.send_all(wire.encode_frame(wire.GetRouteRequest(*M1)))
        await trio.sleep(2)
        for i in range(50):
            await store.inner.add_hosts(M1, [(167772161 + i, 80)])
            await trio.sleep(1.5)
        (sub,) = server.connections
        assert len(sub.pending) <= 1  # coalesced: only the newest route waits


async def test_subscriptions_to_absent_modules_lapse(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.change_routes(add={M1: [A]})
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        made_up = [(modid, 1) for modid in range(100, 1100)]
        await client.send(*(wire.GetRouteRequest(*m) for m in made_up))
        for _ in made_up:
            assert (await client.route()).hosts == ()
        assert len(server.subscribers) == 1 + len(made_up)
        # One absent module appears in time: it is pushed and stays subscribed.
        await trio.sleep(ABSENT_SUBSCRIPTION_TTL / 2)
        await store.inner.change_routes(add={(100, 1): [B]})
        server.poke()
        assert await client.route() == wire.GetRouteResponse(100, 1, (B,))
        await trio.sleep(ABSENT_SUBSCRIPTION_TTL / 2 + 2)
        assert server.subscribers.keys() == {M1, (100, 1)}
        assert server.metrics.counters["subscriptions_lapsed"] == len(made_up) - 1
        # A module deleted later lapses the same way, after it was pushed empty.
        await store.inner.remove_hosts(M1, None)
        server.poke()
        assert (await client.route()).hosts == ()
        await trio.sleep(ABSENT_SUBSCRIPTION_TTL + 2)
        assert server.subscribers.keys() == {(100, 1)}


async def test_absent_subscriptions_per_connection_are_capped(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns_role, "MAX_ABSENT_SUBSCRIPTIONS", 10)
    await store.inner.change_routes(add={M1: [A]})
    async with running(store) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        for modid in range(100, 120):  # every one is answered, ten are subscribed
            assert await ask(client, (modid, 1)) == frozenset()
        assert len(server.subscribers) == 1 + 10


async def test_an_agent_that_does_not_read_is_not_read_either(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns_role, "MAX_BACKLOG", 1000)
    async with running(store) as (server, nursery):
        await trio.sleep(1)  # routes loaded
        client_stream, served = trio.testing.lockstep_stream_pair()
        nursery.start_soon(server.handle_connection, served)
        client = FramedClient(client_stream)
        requests = [wire.GetRouteRequest(modid, 1) for modid in range(1, 2001)]
        with trio.move_on_after(5):  # the DNS stops reading: the send cannot finish
            await client.send(*requests)
        (sub,) = server.connections
        assert sub.pending_bytes <= 1000 + 64  # the backlog, plus the frame that crossed it
        assert len(sub.modules) < len(requests)
        # Once the agent reads, everything is answered.
        async with trio.open_nursery() as sending:
            sending.start_soon(client.send, *requests)
            answered = {(m.modid, m.cmdid) for m in [await client.route() for _ in requests]}
        assert len(answered) == len(requests)


# --- original Lars agents on the same port ------------------------------------------------------


class OriginalAgentStream:
    """A test peer speaking the original Lars protocol, as lars_lb_agent does."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = wire_original.FrameDecoder(1 << 30)
        self._ready: list[wire.Message] = []

    async def ask(self, module: tuple[int, int]) -> None:
        await self.stream.send_all(wire_original.encode(wire.GetRouteRequest(*module)))

    async def route(self) -> wire.GetRouteResponse:
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("peer closed the stream")
            self.decoder.feed(data)
            self._ready.extend(self.decoder)
        msg = self._ready.pop(0)
        assert isinstance(msg, wire.GetRouteResponse), msg
        return msg


def connect_original(server: DnsServer, nursery: trio.Nursery) -> OriginalAgentStream:
    client, served = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, served)
    return OriginalAgentStream(client)


async def test_an_original_agent_gets_its_routes_and_pushes_in_its_format(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A, B])
    async with running(store) as (server, nursery):
        agent = connect_original(server, nursery)
        await agent.ask(M1)
        assert await agent.route() == wire.GetRouteResponse(*M1, (A, B))
        await agent.ask((7, 7))  # unknown: the original's answer, an empty route
        assert await agent.route() == wire.GetRouteResponse(7, 7, ())
        assert server.subscribers.keys() == {M1, (7, 7)}
        await store.inner.remove_hosts(M1, [A])
        assert await agent.route() == wire.GetRouteResponse(*M1, (B,))
        await store.inner.add_hosts((7, 7), [C])
        assert await agent.route() == wire.GetRouteResponse(7, 7, (C,))
        assert [c.original for c in server.connections] == [True]
        assert server.metrics.counters["original_connections_accepted"] == 1


async def test_a_lars_agent_and_an_original_one_see_the_same_changes(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (server, nursery):
        lars_agent = connect(server, nursery)
        original = connect_original(server, nursery)
        assert await ask(lars_agent, M1) == frozenset()
        await original.ask(M1)
        assert (await original.route()).hosts == ()
        for hosts in ([A], [B], [C]):
            await store.inner.add_hosts(M1, hosts)
            assert (await original.route()).hosts == (await lars_agent.route()).hosts
        await store.inner.remove_hosts(M1, None)
        assert (await original.route()).hosts == (await lars_agent.route()).hosts == ()


async def test_a_bad_frame_from_an_original_agent_costs_that_frame_alone(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store) as (server, nursery):
        agent = connect_original(server, nursery)
        await agent.ask(M1)
        await agent.route()
        for bad in (
            struct.pack("<ii", 1, 2) + b"\x08\x80",  # a truncated varint
            struct.pack("<ii", 1, 1) + b"\x0f",  # wire type 7
            struct.pack("<ii", 3, 0),  # a ReportStatusRequest: not the DNS's
            struct.pack("<ii", 99, 3) + b"abc",  # no such message
        ):
            await agent.stream.send_all(bad)
        await agent.ask(M1)
        assert await agent.route() == wire.GetRouteResponse(*M1, (A,))
        assert server.metrics.counters["malformed_frames"] == 4
        assert len(server.connections) == 1


@pytest.mark.parametrize(
    "header",
    [struct.pack("<ii", 1, -1), struct.pack("<ii", 1, 1 << 21)],
    ids=["negative-msglen", "msglen-over-max-frame"],
)
async def test_a_broken_original_framing_closes_the_connection(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, header: bytes
) -> None:
    async with running(store, max_frame=1 << 20) as (server, nursery):
        agent = connect_original(server, nursery)
        await agent.stream.send_all(header)
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await agent.route()
        assert server.metrics.counters["malformed_frames"] == 1


async def test_a_route_too_large_for_an_original_frame_is_not_sent(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [(167772161 + i, 80) for i in range(20)])
    await store.inner.add_hosts(M2, [A])
    async with running(store, max_frame=100) as (server, nursery):
        agent = connect_original(server, nursery)
        await agent.ask(M1)  # 20 hosts: over 100 bytes; the agent keeps what it has
        await agent.ask(M2)
        assert await agent.route() == wire.GetRouteResponse(*M2, (A,))


async def test_a_short_outage_is_not_stale(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store, stale_after=10.0, retry_max=1.0) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        store.down = True
        await trio.sleep(8)
        store.down = False
        await trio.sleep(30)
        assert not server.stale
        assert server.metrics.gauges.get("stale", 0) == 0
        assert await ask(client, M1) == {A}  # no DnsState came before the answer


async def test_a_dns_that_reads_rarely_is_not_stale_between_good_reads(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    config = {"check_interval": 600.0, "reload_interval": 600.0, "stale_after": 10.0}
    async with running(store, **config) as (server, nursery):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        await trio.sleep(120)  # twelve stale_after without a read: none was due
        assert not server.stale
        newcomer = connect(server, nursery)
        assert await ask(newcomer, M1) == {A}  # no DnsState came before the answer
        store.down = True
        await trio.sleep(600)  # the next read fails ...
        await trio.sleep(11)  # ... and the store stays unreachable for stale_after
        assert server.stale


async def test_a_notice_of_a_version_not_read_yet_rereads_until_seen(
    store: LaggingStore, autojump_clock: trio.testing.MockClock
) -> None:
    """A DNS reading from a store behind the writer (a replica, a Galera node) re-reads
    every CATCH_UP_INTERVAL after a notice naming a newer version, not once a check_interval."""
    await store.inner.add_hosts(M1, [A])
    async with running(store, check_interval=30.0, reload_interval=3600.0) as (
        server,
        nursery,
    ):
        client = connect(server, nursery)
        assert await ask(client, M1) == {A}
        await server.checked.wait()
        # The notice arrives before the write shows in the store read (the replica lags).
        store.lagging_version = server.version
        write = await store.inner.add_hosts(M1, [B])
        assert write.version is not None
        admin = connect(server, nursery)
        await admin.send(wire.RouteChangeNotice(write.version))
        await trio.sleep(1.0)
        assert server.metrics.counters["catch_up_rereads"] >= 10
        store.lagging_version = None  # the replica catches up 1 s later
        started = trio.current_time()
        msg = await client.route()
        assert frozenset(msg.hosts) == {A, B}
        assert trio.current_time() - started <= 0.2  # not the 30 s check_interval
        assert server.version == write.version


async def test_a_notice_for_a_version_never_seen_gives_up_after_catch_up(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with running(store, check_interval=30.0, reload_interval=3600.0, catch_up=2.0) as (
        server,
        nursery,
    ):
        await server.checked.wait()
        admin = connect(server, nursery)
        calls = store.calls
        await admin.send(wire.RouteChangeNotice(server.version + 1000))
        await trio.sleep(10)
        rereads = store.calls - calls
        # About catch_up / CATCH_UP_INTERVAL re-reads, then the usual interval again.
        assert (
            2.0 / dns_role.CATCH_UP_INTERVAL * 0.8
            <= rereads
            <= 2.0 / dns_role.CATCH_UP_INTERVAL + 5
        )
        assert any("behind" in r.getMessage() for r in caplog.records)
