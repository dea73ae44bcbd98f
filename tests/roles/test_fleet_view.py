"""The fleet view in the DNS role (DESIGN §14): hosts that enough callers report overloaded
(ServerCallStatus) are sent demoted with their module's route, in answers and pushes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from lars import wire
from lars.store import CallStatus
from tests.fakes import memory_store
from tests.roles.test_dns import ask, connect
from tests.roles.test_dns_leases import LeaseStore, running, wall

A = (167772161, 7001)
B = (167772162, 7002)
C = (167772163, 7003)
D = (167772164, 7004)
M1 = (1, 1)
M2 = (1, 2)
FLEET = {"fleet_view": True, "demote_callers": 3, "demote_share": 0.5, "demote_window": 30.0}


@pytest.fixture
async def store() -> AsyncIterator[LeaseStore]:
    inner = memory_store()
    await inner.init_schema()
    flaky = LeaseStore(inner)
    await inner.change_routes(add={M1: [A, B, C], M2: [A]})
    yield flaky
    await flaky.aclose()


async def report(
    store: LeaseStore, host: tuple[int, int], callers: range, overload: bool, module: Any = M1
) -> None:
    """Callers' latest statistics on ``host``, reported now."""
    ts = int(wall())
    await store.inner.upsert_call_status(
        [
            CallStatus(module[0], module[1], host[0], host[1], caller, 10, 3, ts, overload)
            for caller in callers
        ]
    )


async def test_three_callers_overloaded_demote_a_host_two_do_not(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    await report(store, A, range(1, 4), True)  # 3 of 3 callers: demoted
    await report(store, B, range(1, 3), True)  # control: only 2 callers
    await report(store, B, range(3, 4), False)
    await report(store, C, range(1, 4), True)  # 3 callers, but of 7: below the share
    await report(store, C, range(4, 8), False)
    async with running(store, **FLEET) as (server, nursery):
        await trio.sleep(0.1)
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        route = await client.route()
        assert route.hosts == (A, B, C) and route.demoted == (A,)
        assert server.demoted == {M1: frozenset({A})}
        # M2 has A too, but nobody reported it overloaded there.
        await client.send(wire.GetRouteRequest(*M2))
        assert (await client.route()).demoted == ()
        assert server.metrics.gauges["demoted_hosts"] == 1


async def test_a_change_of_the_demoted_hosts_is_pushed(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    await report(store, A, range(1, 4), True)
    async with running(store, fleet_interval=2.0, **FLEET) as (server, nursery):
        await trio.sleep(0.1)
        client = connect(server, nursery)
        assert await ask(client, M1) == {A, B, C}
        # A third caller sees B overloaded: pushed within fleet_interval.
        await report(store, B, range(1, 4), True)
        started = trio.current_time()
        pushed = await client.route()
        assert pushed.demoted == (A, B)
        assert trio.current_time() - started <= 2.0 + 0.1
        # A route change carries the demoted hosts too.
        await store.inner.add_hosts(M1, [D])
        pushed = await client.route()
        assert pushed.hosts == (A, B, C, D) and pushed.demoted == (A, B)
        # The callers recover (their next reports say so): pushed without demoted hosts.
        await report(store, A, range(1, 4), False)
        await report(store, B, range(1, 4), False)
        pushed = await client.route()
        assert pushed.demoted == () and pushed.hosts == (A, B, C, D)


async def test_reports_older_than_the_window_do_not_count(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    await report(store, A, range(1, 4), True)
    async with running(store, fleet_interval=1.0, **FLEET) as (server, nursery):
        await trio.sleep(0.1)
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        assert (await client.route()).demoted == (A,)
        # The callers stop reporting; 30 s later their rows are too old.
        pushed = await client.route()
        assert pushed.demoted == ()
        assert 30.0 - 1.0 <= trio.current_time() <= 30.0 + 1.0 + 0.2


async def test_the_fleet_view_is_off_by_default(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    await report(store, A, range(1, 10), True)
    async with running(store) as (server, nursery):
        await trio.sleep(10)
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        route = await client.route()
        assert route.demoted == () and server.demoted == {}


async def test_a_store_error_keeps_the_last_demoted_hosts(
    store: LeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    await report(store, A, range(1, 4), True)
    async with running(store, fleet_interval=1.0, **FLEET) as (server, nursery):
        await trio.sleep(0.1)
        assert server.demoted == {M1: frozenset({A})}
        store.down = True
        await trio.sleep(5)
        assert server.demoted == {M1: frozenset({A})}
        assert server.metrics.counters["fleet_view_errors"] >= 4
        client = connect(server, nursery)
        await client.send(wire.GetRouteRequest(*M1))
        assert (await client.route()).demoted == (A,)
