"""Self-registration in the DNS role (DESIGN §14): agents' LeaseUpdates written as leases,
pushed at once, renewed lazily in batches, dropped with a drain, expired by the sweeper.

In process, on memory streams and an inline SQLite store under trio's MockClock (the DNS's
wall clock follows it), plus one test over real TCP and real time for the 100 ms promise.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from lars import wire
from lars.config import DnsConfig
from lars.core.model import HostKey, HostMeta, ModuleKey
from lars.roles.common import permitted
from lars.roles.dns import DnsServer
from lars.roles.dns_leases import LeaseBook
from lars.store import (
    Actor,
    LeaseBatch,
    LeaseExpiry,
    LeaseGrant,
    LeaseRenewal,
    RouteStore,
    RouteWrite,
    open_store,
)
from tests.fakes import FlakyStore, FramedClient, memory_store
from tests.roles.test_dns import VIRTUAL_DEADLINE, ask, connect
from tests.store_helpers import fetch

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)
C = (167772163, 7003)
M1 = (1, 1)
M2 = (1, 2)
#: The wall clock's epoch second at virtual time 0.
EPOCH = 1_800_000_000.0


def wall() -> float:
    """The DNS's wall clock in these tests: it moves with trio's (virtual) clock."""
    return EPOCH + trio.current_time()


def now_ms() -> int:
    return int(wall() * 1000)


class LeaseStore(FlakyStore):
    """A FlakyStore that also takes lease writes (off while ``down``) and counts them."""

    def __init__(self, inner: RouteStore) -> None:
        super().__init__(inner)
        self.writes: Counter[str] = Counter()

    async def write_lease_batches(
        self, batches: Sequence[LeaseBatch], *, now_ms: int
    ) -> RouteWrite:
        self._check()
        self.writes["register"] += 1
        return await self.inner.write_lease_batches(batches, now_ms=now_ms)

    async def renew_leases(self, grants: Sequence[LeaseGrant], *, actor: Actor) -> LeaseRenewal:
        self._check()
        self.writes["renew"] += 1
        return await self.inner.renew_leases(grants, actor=actor)

    async def expire_leases(self, now_ms: int, *, actor: Actor, limit: int = 500) -> LeaseExpiry:
        self._check()
        result = await self.inner.expire_leases(now_ms, actor=actor, limit=limit)
        if result.write.changed:
            self.writes["expire"] += 1
        return result

    async def demoted_hosts(
        self, since: int, *, callers: int, share: float
    ) -> dict[ModuleKey, frozenset[HostKey]]:
        self._check()
        return await self.inner.demoted_hosts(since, callers=callers, share=share)


@pytest.fixture
async def store() -> AsyncIterator[LeaseStore]:
    inner = memory_store()
    await inner.init_schema()
    flaky = LeaseStore(inner)
    yield flaky
    await flaky.aclose()


@asynccontextmanager
async def running(
    store: RouteStore, **config: Any
) -> AsyncIterator[tuple[DnsServer, trio.Nursery]]:
    """A DNS on ``store`` (its wall clock: :func:`wall`), cancelled on exit."""
    server = DnsServer(DnsConfig(listen="127.0.0.1:0", **config), store, wall_clock=wall)
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.track_changes)
            yield server, nursery
            nursery.cancel_scope.cancel()


def lease(
    module: ModuleKey = M1,
    host: HostKey = A,
    *,
    ttl: int = 10,
    age_ms: int = 0,
    weight: int = -1,
    zone: str | None = None,
) -> wire.Lease:
    return wire.Lease(*module, *host, weight, zone, ttl, age_ms)


class Agent:
    """An agent's DNS session as the DNS sees it: LeaseUpdates out, replies in."""

    def __init__(self, client: FramedClient) -> None:
        self.client = client
        self.replies: dict[int, wire.Message] = {}
        self._seq = itertools.count(1)
        self._arrived = trio.Event()

    async def read(self) -> None:
        while True:
            try:
                msg = await self.client.receive()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if isinstance(msg, wire.LeaseReply | wire.ErrorReply):
                self.replies[msg.seq] = msg
                self._arrived.set()
                self._arrived = trio.Event()

    async def reply(self, seq: int) -> wire.Message:
        while seq not in self.replies:
            await self._arrived.wait()
        return self.replies.pop(seq)

    async def update(
        self, leases: Iterable[wire.Lease] = (), drops: Iterable[wire.Drop] = ()
    ) -> wire.LeaseReply:
        seq = next(self._seq)
        await self.client.send(wire.LeaseUpdate(seq, tuple(leases), tuple(drops)))
        reply = await self.reply(seq)
        assert isinstance(reply, wire.LeaseReply), reply
        return reply

    async def heartbeat(self, leases: Sequence[wire.Lease], every: float) -> None:
        """Send ``leases`` every ``every`` seconds, as an agent relaying its clients' renewals."""
        while True:
            await self.update(leases)
            await trio.sleep(every)


def agent_of(server: DnsServer, nursery: trio.Nursery) -> Agent:
    agent = Agent(connect(server, nursery))
    nursery.start_soon(agent.read)
    return agent


async def rows(store: LeaseStore) -> dict[tuple[ModuleKey, HostKey], tuple[int, int | None]]:
    """``(module, host) -> (weight, lease_expires)`` of every RouteData row."""
    found = await fetch(
        store.inner,
        "SELECT modid, cmdid, serverip, serverport, weight, lease_expires FROM RouteData",
    )
    return {((m, c), (ip, port)): (weight, expires) for m, c, ip, port, weight, expires in found}


SUCC = wire.RetCode.SUCC


async def test_a_registration_reaches_subscribers_within_100_ms(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, check_interval=30.0, reload_interval=600.0) as (server, nursery):
        subscriber = connect(server, nursery)
        assert await ask(subscriber, M1) == frozenset()
        agent = agent_of(server, nursery)
        started = trio.current_time()
        reply = await agent.update([lease(ttl=10, age_ms=300)])
        assert (reply.retcode, reply.errors) == (SUCC, ())
        pushed = await subscriber.route()
        assert pushed.hosts == (A,)
        assert trio.current_time() - started <= 0.1  # not the 30 s check_interval
        registered = int((EPOCH + started) * 1000) - 300 + 10_000
        assert await rows(store) == {(M1, A): (100, registered)}
        assert server.leases.held == 1
        assert server.metrics.counters["lease_registrations"] == 1
        (audit,) = await store.inner.list_audit(module=M1)
        assert audit.actor.startswith("lease:") and audit.changes == {"lease": "register"}


async def test_a_registration_over_tcp_reaches_a_subscriber_within_100_ms(tmp_path: Path) -> None:
    """Real sockets, a real SQLite file, real time: the promise as an agent sees it."""
    url = f"sqlite:///{tmp_path}/lars.db"
    async with open_store(url, create=True) as store:
        await store.init_schema()
        server = DnsServer(
            DnsConfig(listen="127.0.0.1:0", check_interval=30.0, reload_interval=600.0), store
        )
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve)
            subscriber = FramedClient(await trio.open_tcp_stream(host, port))
            await subscriber.send(wire.GetRouteRequest(*M1))
            assert (await subscriber.route()).hosts == ()
            agent = FramedClient(await trio.open_tcp_stream(host, port))
            for module, host_ in ((M1, A), (M1, B)):
                started = time.perf_counter()
                await agent.send(wire.LeaseUpdate(1, (lease(module, host_),), ()))
                while host_ not in (await subscriber.route()).hosts:
                    pass
                assert time.perf_counter() - started < 0.1
                reply = await agent.receive()
                assert isinstance(reply, wire.LeaseReply) and reply.retcode == SUCC
            await subscriber.stream.aclose()
            await agent.stream.aclose()
            nursery.cancel_scope.cancel()


async def test_heartbeats_are_renewed_in_batches_not_written_one_by_one(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    ttl = 9
    async with running(store, lease_sweep=0.25) as (server, nursery):
        agents = [agent_of(server, nursery) for _ in range(2)]
        leases = [
            [lease((5, i), (167772161 + n, 80), ttl=ttl) for i in range(10)] for n in range(2)
        ]
        for agent, mine in zip(agents, leases, strict=True):
            nursery.start_soon(agent.heartbeat, mine, ttl / 3)
        await trio.sleep(60)
        # Each agent's first update registers (both in one transaction when they meet).
        assert 1 <= store.writes["register"] <= 2
        # Renewals: a lease is written when half its ttl is left, up to last heard + ttl,
        # so every ttl/6 to ttl/2; all the leases due at one flush in one write, never one
        # write per heartbeat (40 updates of 10 leases each came meanwhile).
        assert 60 / (ttl / 2) - 2 <= store.writes["renew"] <= 60 / (ttl / 3) + 2
        assert server.metrics.counters["lease_updates"] >= 2 * 60 / (ttl / 3) - 2
        assert server.metrics.counters["lease_renewals"] >= 20 * (store.writes["renew"] - 1)
        assert store.writes["expire"] == 0  # nothing lapsed meanwhile
        stored = await rows(store)
        assert len(stored) == 20
        assert all(expires is not None and expires > now_ms() for _, expires in stored.values())


async def test_a_lease_whose_heartbeats_stop_leaves_within_ttl_plus_one_second(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    ttl = 3
    async with running(store, check_interval=30.0, reload_interval=600.0) as (server, nursery):
        subscriber = connect(server, nursery)
        assert await ask(subscriber, M1) == frozenset()
        agent = agent_of(server, nursery)
        with trio.move_on_after(20):  # the client renews for 20 s ...
            await agent.heartbeat([lease(M1, A, ttl=ttl), lease(M1, B, ttl=ttl)], ttl / 3)
        stopped = trio.current_time()
        await agent.update([lease(M1, B, ttl=ttl)])  # ... then only B's client does
        while A in (await subscriber.route()).hosts:
            pass
        assert trio.current_time() - stopped <= ttl + 1
        assert set(await rows(store)) == {(M1, B)}
        assert server.metrics.counters["leases_expired"] == 1
        # The agent's session closing forgets its leases: B leaves too.
        await agent.client.stream.aclose()
        closed = trio.current_time()
        assert (await subscriber.route()).hosts == ()
        assert trio.current_time() - closed <= ttl + 1
        assert server.leases.held == 0


async def test_a_drop_drains_at_once_then_removes_the_host(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, check_interval=30.0, reload_interval=600.0) as (server, nursery):
        subscriber = connect(server, nursery)
        assert await ask(subscriber, M1) == frozenset()
        agent = agent_of(server, nursery)
        await agent.update([lease(M1, A, ttl=60), lease(M1, B, ttl=60)])
        assert set((await subscriber.route()).hosts) == {A, B}
        started = trio.current_time()
        reply = await agent.update(drops=[wire.Drop(*M1, *A, 2000)])
        assert reply == wire.LeaseReply(2, SUCC, ())
        drained = await subscriber.route()
        assert trio.current_time() - started <= 0.1
        assert dict(zip(drained.hosts, drained.meta, strict=True))[A] == HostMeta(0, "")
        gone = await subscriber.route()
        assert gone.hosts == (B,)
        assert 2.0 <= trio.current_time() - started <= 2.0 + 0.5
        # No drain: gone at once.
        started = trio.current_time()
        await agent.update(drops=[wire.Drop(*M1, *B, 0)])
        assert (await subscriber.route()).hosts == ()
        assert trio.current_time() - started <= 0.1
        assert await rows(store) == {}
        assert server.leases.held == 0 and server.metrics.counters["lease_drops"] == 2


async def test_a_registration_on_a_static_row_keeps_it_static(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.change_routes(add={M1: [A]}, meta={M1: {A: HostMeta(30, "z")}})
    async with running(store) as (server, nursery):
        agent = agent_of(server, nursery)
        version = await store.inner.route_version()
        reply = await agent.update([lease(M1, A, ttl=2, weight=5, zone="other")])
        assert (reply.retcode, reply.errors) == (SUCC, ())
        await agent.client.stream.aclose()  # no more heartbeats
        await trio.sleep(10)
        assert await rows(store) == {(M1, A): (30, None)}
        assert await store.inner.route_version() == version


async def test_bad_items_get_errors_and_change_nothing(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store, max_leases_per_session=2) as (server, nursery):
        agent = agent_of(server, nursery)
        await trio.sleep(1)
        version = await store.inner.route_version()
        reply = await agent.update(
            [
                lease(host=(0, 80)),  # address 0: the agent must name it
                lease(host=(0xE0000001, 80)),  # multicast
                lease(host=(0xFFFFFFFF, 80)),  # broadcast
                lease(zone="eu west\x01"),  # not printable
                lease(ttl=2, age_ms=2000),  # lapsed: not renewed within its ttl
            ],
            [wire.Drop(*M1, 0xE0000002, 80, 0)],
        )
        assert reply.retcode == SUCC
        assert [index for index, _ in reply.errors] == [0, 1, 2, 3, 4, 5]
        reasons = dict(reply.errors)
        assert "0.0.0.0/8" in reasons[0] and "multicast" in reasons[1]
        assert "255.255.255.255" in reasons[2] and "zone" in reasons[3]
        assert "lapsed" in reasons[4] and "multicast" in reasons[5]
        # The per-session cap: the third registration is refused, the others stored.
        reply = await agent.update([lease(M1, A), lease(M1, B), lease(M1, C)])
        assert reply.errors == ((2, "more than 2 registrations on this session"),)
        assert set(await rows(store)) == {(M1, A), (M1, B)}
        # A renewal of a lease the session holds is no new registration.
        reply = await agent.update([lease(M1, A), lease(M1, B)])
        assert (reply.retcode, reply.errors) == (SUCC, ())
        # A value out of range is a decode error: the whole update is refused.
        body = msgpack.packb([25, 9, [[1, 1, 167772164, 80, -1, None, 0, 0]], []])
        await agent.client.send_raw(struct.pack("!I", len(body)) + body)
        refused = await agent.reply(9)
        assert isinstance(refused, wire.ErrorReply) and refused.code == wire.RetCode.BAD_REQUEST
        assert "ttl" in refused.reason
        assert set(await rows(store)) == {(M1, A), (M1, B)}
        assert server.metrics.counters["lease_errors"] == 7
        assert (await store.inner.list_routes()).keys() == {M1}
        assert await store.inner.route_version() > version  # the two stored, once


async def test_store_down_answers_system_error_and_loses_nothing(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    ttl = 10
    async with running(store, check_interval=30.0, reload_interval=600.0) as (server, nursery):
        subscriber = connect(server, nursery)
        assert await ask(subscriber, M1) == frozenset()
        agent = agent_of(server, nursery)
        await agent.update([lease(M1, A, ttl=ttl)])
        assert (await subscriber.route()).hosts == (A,)
        store.down = True
        reply = await agent.update([lease(M1, A, ttl=ttl), lease(M1, B, ttl=ttl)])
        assert reply.retcode == wire.RetCode.SYSTEM_ERROR  # B was not stored
        assert set(await rows(store)) == {(M1, A)}
        # Heartbeats go on through an outage of 2 s: A's renewals wait, then are written.
        with trio.move_on_after(2):
            await agent.heartbeat([lease(M1, A, ttl=ttl)], ttl / 3)
        assert server.metrics.counters["lease_store_errors"] >= 2
        store.down = False
        reply = await agent.update([lease(M1, A, ttl=ttl), lease(M1, B, ttl=ttl)])  # sent again
        assert (reply.retcode, reply.errors) == (SUCC, ())
        assert set((await subscriber.route()).hosts) == {A, B}
        with trio.move_on_after(3 * ttl):
            await agent.heartbeat([lease(M1, A, ttl=ttl), lease(M1, B, ttl=ttl)], ttl / 3)
        assert set(await rows(store)) == {(M1, A), (M1, B)}  # nothing expired meanwhile
        assert store.writes["expire"] == 0


async def test_a_renewal_whose_row_an_operator_removed_brings_it_back(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    ttl = 4
    async with running(store) as (server, nursery):
        agent = agent_of(server, nursery)
        nursery.start_soon(agent.heartbeat, [lease(M1, A, ttl=ttl)], ttl / 3)
        await trio.sleep(1)
        await store.inner.remove_hosts(M1, [A])
        await trio.sleep(ttl)
        assert set(await rows(store)) == {(M1, A)}
        assert server.metrics.counters["lease_reinserts"] == 1


async def test_another_dns_sees_a_registration_at_its_check_interval(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running(store, check_interval=0.05) as (first, n1),
        running(store, check_interval=0.05) as (second, n2),
    ):
        elsewhere = connect(second, n2)
        assert await ask(elsewhere, M1) == frozenset()
        agent = agent_of(first, n1)
        started = trio.current_time()
        await agent.update([lease(M1, A)])
        assert (await elsewhere.route()).hosts == (A,)
        assert trio.current_time() - started <= 0.1


async def test_lease_counters_in_stats_and_metrics(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(store) as (server, nursery):
        agent = agent_of(server, nursery)
        await agent.update([lease(M1, A, ttl=2), lease(host=(0, 1))])
        await agent.update(drops=[wire.Drop(*M1, *A, 0)])
        admin = connect(server, nursery)
        await admin.send(wire.StatsRequest(7))
        stats = await admin.receive()
        assert isinstance(stats, wire.StatsResponse)
        counters = stats.counters
        assert counters["lease_updates"] == 2 and counters["lease_registrations"] == 1
        assert counters["lease_drops"] == 1 and counters["lease_errors"] == 1
        assert counters["leases"] == 0 and counters["demoted_hosts"] == 0
        text = generate_latest(server.registry).decode()
        for line in (
            "lars_dns_leases 0.0",
            "lars_dns_lease_registrations_total 1.0",
            "lars_dns_lease_drops_total 1.0",
            "lars_dns_lease_errors_total 1.0",
            "lars_dns_lease_renewals_total 0.0",
            "lars_dns_leases_expired_total 0.0",
            "lars_dns_demoted_hosts 0.0",
        ):
            assert line in text


def test_only_agents_may_send_lease_updates_under_tls() -> None:
    update = wire.LeaseUpdate(1, (), ())
    assert permitted("dns", "agent", update)
    assert not permitted("dns", "admin", update)
    assert not permitted("dns", "reporter", update)


# --- the lease book, without I/O -----------------------------------------------------------------


def update(*leases: wire.Lease, drops: Sequence[wire.Drop] = (), seq: int = 1) -> wire.LeaseUpdate:
    return wire.LeaseUpdate(seq, leases, tuple(drops))


def test_the_book_writes_a_registration_once_and_renews_when_half_the_ttl_is_left() -> None:
    book = LeaseBook(10)
    plan = book.take_update("s", update(lease(ttl=10, age_ms=1000)), 100_000)
    assert [(g.key, g.expires) for g in plan.grants] == [((M1, A), 109_000)]
    book.commit(plan)
    assert book.held == 1
    # Heartbeats: in memory only.
    for t in range(101_000, 104_000, 1000):
        assert not book.take_update("s", update(lease(ttl=10)), t).writes
        assert book.due(t) == []
    assert book.next_due() == 104_000  # 109_000 - 5_000
    (renewal,) = book.due(104_000)
    assert renewal.grant.expires == 103_000 + 10_000
    book.renewed([renewal])
    assert book.next_due() == 113_000 - 5_000
    # Its client stops: nothing more is written, and it is forgotten once lapsed.
    assert book.due(108_000) == []
    assert book.due(113_000) == [] and book.held == 0


def test_the_book_keeps_pending_registrations_and_drops_them_with_a_failed_write() -> None:
    book = LeaseBook(2)
    first = book.take_update("s", update(lease(M1, A), lease(M1, B)), 0)
    # While the write is pending: a heartbeat writes nothing more, the cap counts pending.
    again = book.take_update("s", update(lease(M1, A), lease(M1, C)), 10)
    assert not again.grants and again.errors == [(1, "more than 2 registrations on this session")]
    book.abandon(first)
    retry = book.take_update("s", update(lease(M1, A), lease(M1, C)), 20)
    assert {g.key for g in retry.grants} == {(M1, A), (M1, C)}
    book.commit(retry)
    assert set(book.holds("s")) == {(M1, A), (M1, C)}
    drop = book.take_update("s", update(drops=[wire.Drop(*M1, *A, 0)]), 30)
    assert [d.key for d in drop.drops] == [(M1, A)]
    book.commit(drop)
    assert set(book.holds("s")) == {(M1, C)}
    assert book.close("s") == 1 and book.held == 0
    assert book.due(10**9) == []


def test_a_changed_weight_zone_or_ttl_is_a_new_registration() -> None:
    book = LeaseBook(5)
    book.commit(book.take_update("s", update(lease(ttl=10)), 0))
    for changed in (lease(ttl=20), lease(ttl=10, weight=3), lease(ttl=10, zone="z")):
        plan = book.take_update("s", update(changed), 1000)
        assert len(plan.grants) == 1
        book.commit(plan)
    assert book.held == 1
