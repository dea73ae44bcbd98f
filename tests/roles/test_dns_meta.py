"""The DNS carries weights, zones and policies to agents, and holds reloads that remove too
many hosts at once (DESIGN §13). In process, under trio's MockClock."""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client import generate_latest

from lars import wire
from lars.core.model import HostMeta, PolicySpec
from tests.fakes import FlakyStore, FramedClient
from tests.roles.test_dns import M1, M2, connect, connect_original, running
from tests.roles.test_dns import store as store  # the fixture

A = (167772161, 7001)
B = (167772162, 7002)
C = (167772163, 7003)


async def route(client: FramedClient) -> wire.GetRouteResponse:
    msg = await client.receive()
    while isinstance(msg, wire.DnsState):
        msg = await client.receive()
    assert isinstance(msg, wire.GetRouteResponse), msg
    return msg


async def test_routes_carry_weight_zone_and_policy_and_their_changes_are_pushed(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.change_routes(add={M1: [A, B]}, meta={M1: {B: HostMeta(30, "z2")}})
    await store.inner.add_hosts(M2, [C])
    async with running(store, check_interval=1.0) as (server, nursery):
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        first = await route(client)
        assert first.hosts == (A, B)
        assert first.meta == (HostMeta(), HostMeta(30, "z2")) and first.policy is None
        await client.send(wire.GetRouteRequest(*M2))
        plain = await route(client)
        assert (plain.hosts, plain.meta, plain.policy) == ((C,), (), None)
        # A weight change alone is pushed.
        await store.inner.set_host_meta(M1, A, weight=0)
        pushed = await route(client)
        assert pushed.meta == (HostMeta(0, ""), HostMeta(30, "z2"))
        # So is a policy, and its removal.
        spec = PolicySpec("weighted", True, 0.6, 0.0, 10.0)
        await store.inner.set_policy(M1, spec)
        assert (await route(client)).policy == spec
        await store.inner.set_policy(M1, None)
        assert (await route(client)).policy is None
        assert server.policies == {}
        # A zone change too.
        await store.inner.set_host_meta(M1, B, zone="z3")
        assert (await route(client)).meta[1] == HostMeta(30, "z3")


async def test_an_original_agent_gets_the_hosts_alone(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.change_routes(add={M1: [A, B]}, meta={M1: {B: HostMeta(30, "z2")}})
    await store.inner.set_policy(M1, PolicySpec("hash"))
    async with running(store) as (server, nursery):
        agent = connect_original(server, nursery)
        await agent.ask(M1)
        assert await agent.route() == wire.GetRouteResponse(*M1, (A, B))


def _hosts(n: int, port: int = 80) -> list[tuple[int, int]]:
    return [(167772160 + i, port) for i in range(1, n + 1)]


async def test_a_reload_losing_most_hosts_is_held_then_served_after_shrink_hold(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    hosts = _hosts(20)
    await store.inner.change_routes(add={M1: hosts[:10], M2: hosts[10:]})
    async with running(store, check_interval=1.0, shrink_hold=30.0) as (server, nursery):
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        assert len((await route(client)).hosts) == 10
        before = server.version
        # A truncated table: 15 of 20 hosts go at once.
        await store.inner.replace_routes({M2: hosts[15:]})
        await trio.sleep(5)
        assert server.version == before and len(server.routes[M1]) == 10  # type: ignore[index]
        assert server.held is not None and server.held.lost == 15
        assert server.metrics.counters["shrinks_held"] == 1
        assert server.metrics.gauges["shrink_held"] == 1
        scraped = generate_latest(server.registry).decode()
        assert "lars_dns_shrinks_held_total 1.0" in scraped
        assert "lars_dns_shrink_held 1.0" in scraped
        start = trio.current_time()
        gone = await route(client)  # served once the loss persisted shrink_hold
        assert gone.hosts == () and trio.current_time() - start <= 30.0
        assert server.held is None and server.version > before
        assert server.metrics.counters["shrinks_released"] == 1


async def test_a_held_reload_is_served_at_once_when_an_admin_confirms(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    hosts = _hosts(12)
    await store.inner.add_hosts(M1, hosts)
    async with running(store, check_interval=1.0, shrink_hold=3600.0) as (server, nursery):
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        assert len((await route(client)).hosts) == 12
        await store.inner.remove_hosts(M1, None)
        await trio.sleep(3)
        assert server.held is not None
        admin = connect(server, nursery)
        await admin.send(wire.ShrinkConfirm(7, server.held.version + 1))  # not the held one
        reply = await admin.receive()
        assert isinstance(reply, wire.StatsResponse) and reply.counters["shrink_held"] == 1
        await admin.send(wire.ShrinkConfirm(8, 0))
        reply = await admin.receive()
        assert isinstance(reply, wire.StatsResponse) and reply.seq == 8
        assert reply.counters["shrink_held"] == 0 and reply.counters["shrinks_confirmed"] == 1
        assert (await route(client)).hosts == ()


async def test_a_held_reload_that_recovers_is_dropped_and_small_losses_pass(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    hosts = _hosts(12)
    await store.inner.add_hosts(M1, hosts)
    await store.inner.add_hosts(M2, [A])
    async with running(store, check_interval=1.0, shrink_hold=3600.0) as (server, _):
        await trio.sleep(2)
        await store.inner.remove_hosts(M1, hosts[:11])
        await trio.sleep(3)
        assert server.held is not None
        await store.inner.add_hosts(M1, hosts[:11])  # the table is back
        await trio.sleep(3)
        assert server.held is None and server.routes is not None
        assert len(server.routes[M1]) == 12
        # Fewer than shrink_min_hosts: a routine removal, served at once.
        await store.inner.remove_hosts(M2, None)
        await trio.sleep(3)
        assert M2 not in (server.routes or {}) and server.held is None


async def test_shrink_guard_one_turns_it_off(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    hosts = _hosts(12)
    await store.inner.add_hosts(M1, hosts)
    async with running(store, check_interval=1.0, shrink_guard=1.0) as (server, _):
        await trio.sleep(2)
        await store.inner.remove_hosts(M1, None)
        await trio.sleep(3)
        assert server.held is None and server.routes == {}
