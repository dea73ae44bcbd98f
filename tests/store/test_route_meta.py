"""Weights, zones, per-module policies and route protection in the store (DESIGN §13), on
SQLite and a real MySQL/MariaDB database."""

from __future__ import annotations

from typing import Any

import pytest

from lars.core.model import HostMeta, PolicySpec
from lars.errors import InvalidValue, ShrinkRefused
from lars.store import Actor, RouteStore
from tests.store_helpers import change_rows

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)
C = (167772163, 7003)
D = (167772164, 7004)
M1 = (1, 1)
M2 = (1, 2)
ME = Actor("tester", "127.0.0.1")


async def test_hosts_carry_weight_and_zone_to_loads(store: RouteStore) -> None:
    await store.change_routes(
        add={M1: [A, B, C]}, meta={M1: {A: HostMeta(50, "z1"), B: HostMeta(100, "")}}
    )
    snapshot = await store.load_routes()
    assert snapshot.routes[M1] == {A, B, C}
    assert snapshot.meta == {M1: {A: HostMeta(50, "z1")}}  # defaults are left out
    assert snapshot.policies == {}
    listed = await store.list_route_meta()
    assert listed == {M1: {A: HostMeta(50, "z1"), B: HostMeta(), C: HostMeta()}}


async def test_a_weight_or_zone_change_is_a_route_change_and_is_audited(
    store: RouteStore,
) -> None:
    first = await store.add_hosts(M1, [A, B], actor=ME)
    assert first.version is not None
    write = await store.set_host_meta(M1, A, weight=0, actor=ME)
    assert write.changed and write.updated == 1 and write.modules == {M1}
    assert write.version is not None and write.version > first.version
    assert (1, 1, write.version) in await change_rows(store)
    write = await store.set_host_meta(M1, A, zone="eu-1", actor=ME)
    assert (await store.list_route_meta(1, 1))[M1][A] == HostMeta(0, "eu-1")
    again = await store.set_host_meta(M1, A, zone="eu-1", actor=ME)
    assert not again.changed  # nothing to change: nothing written
    delta = await store.load_changes(first.version)
    assert delta.changed == {M1} and delta.meta == {M1: {A: HostMeta(0, "eu-1")}}
    audit = await store.list_audit(module=M1)
    assert audit[0].changes == {"hosts": {"10.0.0.1:7001": {"zone": ["", "eu-1"]}}}
    assert audit[1].changes == {"hosts": {"10.0.0.1:7001": {"weight": [100, 0]}}}
    assert audit[2].changes == {} and audit[2].added == (A, B)


async def test_bad_weight_zone_or_host_changes_nothing(store: RouteStore) -> None:
    await store.add_hosts(M1, [A])
    version = await store.route_version()
    bad: list[dict[str, Any]] = [
        {"weight": -1},
        {"weight": 10**7},
        {"zone": "a\tb"},
        {"zone": "x" * 65},
        {},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidValue):
            await store.set_host_meta(M1, A, **kwargs)
    with pytest.raises(InvalidValue, match="not in its route"):
        await store.set_host_meta(M1, B, weight=5)
    with pytest.raises(InvalidValue):
        await store.change_routes(add={M1: [B]}, meta={M1: {B: HostMeta(-3, "")}})
    with pytest.raises(InvalidValue, match="not in its route"):
        await store.change_routes(add={M1: [B]}, meta={M1: {C: HostMeta(3, "")}})
    assert await store.route_version() == version
    assert await store.list_routes() == {M1: [A]}


async def test_replace_with_meta_is_exact_and_without_keeps_it(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A, B]}, meta={M1: {A: HostMeta(7, "z")}})
    await store.replace_routes({M1: [A, B, C]})
    assert (await store.list_route_meta())[M1][A] == HostMeta(7, "z")
    await store.replace_routes({M1: [A, B, C]}, meta={M1: {B: HostMeta(3, "")}})
    assert await store.list_route_meta() == {M1: {A: HostMeta(), B: HostMeta(3, ""), C: HostMeta()}}


async def test_policy_set_get_delete_raise_the_version_and_reach_loads(
    store: RouteStore,
) -> None:
    await store.add_hosts(M1, [A, B])
    before = await store.route_version()
    spec = PolicySpec("weighted", True, 0.5, 0.2, 30.0)
    write = await store.set_policy(M1, spec, actor=ME)
    assert write.changed and write.modules == {M1}
    assert await store.get_policy(M1) == spec
    assert await store.get_policy(M2) is None
    assert await store.list_policies() == {M1: spec}
    assert not (await store.set_policy(M1, spec, actor=ME)).changed
    delta = await store.load_changes(before)
    assert delta.changed == {M1} and delta.policies == {M1: spec}
    assert (await store.load_routes()).policies == {M1: spec}
    audit = (await store.list_audit(module=M1))[0]
    assert audit.changes["policy"][0] is None and audit.changes["policy"][1]["policy"] == "weighted"
    gone = await store.set_policy(M1, None, actor=ME)
    assert gone.changed and await store.get_policy(M1) is None
    delta = await store.load_changes(write.version or 0)
    assert delta.changed == {M1} and delta.policies == {}


async def test_a_bad_policy_is_refused_and_changes_nothing(store: RouteStore) -> None:
    version = await store.route_version()
    for spec in (
        PolicySpec("fastest"),
        PolicySpec(zone_failover=1.5),
        PolicySpec(panic_threshold=-0.1),
        PolicySpec(slow_start=4000.0),
        PolicySpec(zone_affinity=1),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidValue):
            await store.set_policy(M1, spec)
    assert await store.route_version() == version
    assert await store.list_policies() == {}


async def test_writes_removing_more_than_half_need_force(store: RouteStore) -> None:
    await store.change_routes(add={M1: [A, B, C, D], M2: [A]})
    version = await store.route_version()
    with pytest.raises(ShrinkRefused) as refused:
        await store.remove_hosts(M1, [A, B, C], force=False)
    assert refused.value.shrinks == ((M1, 4, 3),)
    with pytest.raises(ShrinkRefused, match="1/2 would lose all"):
        await store.remove_hosts(M2, None, force=False)
    with pytest.raises(ShrinkRefused):
        await store.replace_routes({M1: [A, B, C, D]}, force=False)  # M2 would go
    assert await store.route_version() == version
    assert await store.list_routes() == {M1: [A, B, C, D], M2: [A]}
    # Half is allowed; more needs force.
    assert (await store.remove_hosts(M1, [A, B], force=False)).removed == 2
    assert (await store.remove_hosts(M1, [C], force=True)).removed == 1
    assert (await store.remove_hosts(M2, None)).removed == 1  # library default: forced
