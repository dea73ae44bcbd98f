"""An agent passes the weights, zones and policy its DNS sends to its table (DESIGN §13)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from lars import wire
from lars.core.model import HostKey, HostMeta, ModuleKey, PolicySpec
from lars.roles.agent import Agent
from tests.roles.test_agent import A, B, M, agent, stack


def spy(the_agent: Agent) -> list[tuple[ModuleKey, tuple[HostKey, ...], Any, Any]]:
    """Record every apply_route call of the agent's table (and still make it)."""
    calls: list[tuple[ModuleKey, tuple[HostKey, ...], Any, Any]] = []
    real = the_agent.table.apply_route

    def apply_route(
        key: ModuleKey,
        hosts: Any,
        now: float,
        meta: Mapping[HostKey, HostMeta] | None = None,
        policy: PolicySpec | None = None,
        demoted: Any = (),
    ) -> Any:
        hosts = tuple(hosts)
        calls.append((key, hosts, meta, policy))
        return real(key, hosts, now, meta=meta, policy=policy, demoted=demoted)

    the_agent.table.apply_route = apply_route  # type: ignore[method-assign]
    return calls


def test_a_route_message_gives_the_table_meta_by_host_and_the_policy() -> None:
    the_agent = agent()
    calls = spy(the_agent)
    spec = PolicySpec("weighted", True, 0.5, 0.0, 0.0)
    the_agent._dns_message(wire.GetRouteResponse(*M, (A, B), (HostMeta(5, "z"), HostMeta()), spec))
    assert calls[-1] == (M, (A, B), {A: HostMeta(5, "z"), B: HostMeta()}, spec)
    the_agent._dns_message(wire.GetRouteResponse(*M, (A, B)))
    plain: tuple[Any, ...] = (M, (A, B), None, None)
    assert calls[-1] == plain


def test_a_policy_the_agent_does_not_know_falls_back_to_its_default() -> None:
    the_agent = agent()
    calls = spy(the_agent)
    the_agent._dns_message(wire.GetRouteResponse(*M, (A,), (), PolicySpec("fastest")))
    assert calls[-1] == (M, (A,), None, None)
    assert M in the_agent.table.modules  # the route itself is taken


async def test_weights_zones_and_policy_travel_from_the_store_to_the_agent(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, {M: [A, B]}) as (store, dns, the_agent, client):
        calls = spy(the_agent)
        assert (await client.get_host(*M)).key in (A, B)
        await store.set_host_meta(M, A, weight=0, zone="z1")
        await store.set_policy(M, PolicySpec("weighted"))
        dns.poke()
        with trio.fail_after(5):
            while not calls or calls[-1][3] != PolicySpec("weighted"):
                await the_agent.route_received.wait()
        assert calls[-1][2] == {A: HostMeta(0, "z1"), B: HostMeta()}
