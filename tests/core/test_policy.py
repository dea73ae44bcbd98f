"""Scheduling policies and their layers (DESIGN §13; ``lars.core.policy`` and the balancer).

Each rule is one test with the clock passed in; the properties of the issue are hypothesis
tests: weighted shares converge, hash moves few keys, zone affinity stays home while its
zone is healthy enough, and ``rr`` through the layered path reproduces §6 exactly.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lars.core import policy as pol
from lars.core.balancer import OVERLOAD, SUCC, BalancerParams, LoadBalancer
from lars.core.model import HostKey, HostMeta, PolicySpec, ip_to_int
from lars.core.table import ModuleTable
from tests.core import test_balancer

#: test_balancer's parameters that keep the §6 rules out of the way, without probes either.
QUIET = attrs.evolve(test_balancer.QUIET, probe_num=1_000_000)


def key(n: int, port: int = 7000) -> HostKey:
    return ip_to_int(f"10.0.{n // 250}.{n % 250 + 1}"), port


def balancer(
    hosts: list[HostKey],
    spec: PolicySpec,
    meta: dict[HostKey, HostMeta] | None = None,
    zone: str = "",
    params: BalancerParams = QUIET,
    now: float = 0.0,
) -> LoadBalancer:
    lb = LoadBalancer(params)
    lb.update_route(hosts, now)
    lb.set_policy(spec, meta, zone)
    lb.rng = random.Random(7)
    return lb


def overload(lb: LoadBalancer, host: HostKey, now: float) -> None:
    lb._become_overloaded(lb.hosts[host], now, "err_rate")


def picks(lb: LoadBalancer, n: int, now: float = 0.0, **kw: Any) -> Counter[HostKey | None]:
    return Counter(lb.get_host(now, **kw)[1] for _ in range(n))


# --- defaults keep §6 ------------------------------------------------------------------------


def test_default_spec_takes_the_plain_path() -> None:
    lb = balancer([key(1), key(2)], PolicySpec())
    assert lb.plain
    lb.set_policy(PolicySpec(), {key(1): HostMeta(weight=0)}, "")
    assert not lb.plain  # a drained host needs the layered path


ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), st.just(0)),
        st.tuples(st.just("ok"), st.integers(0, 3)),
        st.tuples(st.just("fail"), st.integers(0, 3)),
        st.tuples(st.just("tick"), st.integers(1, 20)),
    ),
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_rr_on_the_layered_path_reproduces_section_6_exactly(steps: list[Any]) -> None:
    params = BalancerParams(probe_num=3, contin_err_limit=3, idle_timeout=15, overload_timeout=9)
    hosts = [key(i) for i in range(4)]
    plain = balancer(hosts, PolicySpec(), params=params)
    layered = balancer(hosts, PolicySpec(), params=params)
    now = 0.0
    layered.explain(now, seconds=1e9)  # records every choice: never the plain path
    for op, arg in steps:
        if op == "get":
            assert plain.get_host(now) == layered.get_host(now)
        elif op == "tick":
            now += arg
        else:
            plain.report(hosts[arg], op == "ok", now)
            layered.report(hosts[arg], op == "ok", now)
        assert plain.idle == layered.idle
        assert plain.overloaded == layered.overloaded
        assert plain.access_cnt == layered.access_cnt
    assert not layered.plain


# --- weighted --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=8))
def test_weighted_shares_converge_to_the_weights(weights: list[int]) -> None:
    hosts = [key(i) for i in range(len(weights))]
    meta = {h: HostMeta(weight=w) for h, w in zip(hosts, weights, strict=True)}
    lb = balancer(hosts, PolicySpec("weighted"), meta)
    counts = picks(lb, 10_000)
    total = sum(weights)
    for h, w in zip(hosts, weights, strict=True):
        assert abs(counts[h] / 10_000 - w / total) <= 0.01


@pytest.mark.parametrize("policy", ["rr", "weighted", "p2c", "hash"])
def test_weight_zero_is_never_chosen(policy: str) -> None:
    hosts = [key(i) for i in range(3)]
    lb = balancer(hosts, PolicySpec(policy), {hosts[0]: HostMeta(weight=0)})
    counts = Counter(lb.get_host(0.0, hkey=str(i).encode())[1] for i in range(600))
    assert counts[hosts[0]] == 0
    assert counts[hosts[1]] > 100 and counts[hosts[2]] > 100


def test_a_drained_overloaded_host_is_not_probed() -> None:
    hosts = [key(1), key(2)]
    lb = balancer(hosts, PolicySpec(), {key(1): HostMeta(weight=0)}, params=QUIET)
    overload(lb, key(1), 0.0)
    lb.params = attrs.evolve(QUIET, probe_num=2)
    assert set(picks(lb, 50)) == {key(2)}


def test_all_drained_is_overload() -> None:
    lb = balancer([key(1)], PolicySpec(), {key(1): HostMeta(weight=0)})
    assert lb.get_host(0.0) == (OVERLOAD, None)


# --- p2c -------------------------------------------------------------------------------------


def test_peak_ewma_takes_peaks_at_once_and_decays_with_tau() -> None:
    e = pol.PeakEwma()
    e.observe(0.010, 0.0)
    e.observe(0.100, 1.0)
    assert e.value == 0.100  # the peak, at once
    e.observe(0.010, 11.0)  # one tau later: weight e^-1 on the old value
    assert e.value == pytest.approx(0.100 * 0.36788 + 0.010 * 0.63212, rel=1e-4)


def test_p2c_sends_less_to_the_slow_host() -> None:
    hosts = [key(i) for i in range(3)]
    lb = balancer(hosts, PolicySpec("p2c"))
    for i, h in enumerate(hosts):
        lb.report(h, True, 0.0, latency=0.100 if i == 0 else 0.010)
    counts = picks(lb, 3000)
    # the slow host wins only when drawn against... never: it is never the cheaper one
    assert counts[hosts[0]] == 0
    assert counts[hosts[1]] + counts[hosts[2]] == 3000


def test_p2c_unknown_latency_is_the_mean_of_the_known() -> None:
    # candidates 0 (unknown), 1 (slow, 0.09 s), 2 and 3 (fast, 0.01 s): mean of the known
    # is 0.03 s, so the unknown host beats the slow one and loses to the fast ones.
    costs = [None, 0.09, 0.01, 0.01]
    weights = [100.0] * 4
    rng = random.Random(1)
    seen = set()
    for _ in range(400):
        chosen, a, b = pol.p2c_pick(costs, weights, rng)
        pair = {a, b}
        seen.add(frozenset(pair))
        if pair == {0, 1}:
            assert chosen == 0
        elif 0 in pair:
            assert chosen == (pair - {0}).pop()
    assert frozenset({0, 1}) in seen and frozenset({0, 2}) in seen
    # nothing known: the higher weight
    assert pol.p2c_pick([None, None], [100.0, 300.0], random.Random(2))[0] == 1


def test_p2c_in_the_balancer_costs_an_unknown_host_the_mean() -> None:
    hosts = [key(i) for i in range(3)]
    lb = balancer(hosts, PolicySpec("p2c"))
    lb.report(hosts[0], True, 0.0, latency=0.100)  # slow
    lb.report(hosts[1], True, 0.0, latency=0.010)  # fast; hosts[2] has no sample: 0.055
    counts = picks(lb, 3000)
    # hosts[2] beats hosts[0] whenever the two are drawn (a tie would split them)
    assert counts[hosts[0]] == 0
    assert counts[hosts[2]] > 800


# --- hash ------------------------------------------------------------------------------------


def test_hash_returns_the_same_host_while_it_stays_healthy() -> None:
    hosts = [key(i) for i in range(5)]
    lb = balancer(hosts, PolicySpec("hash"))
    first = {k: lb.get_host(0.0, hkey=b"user-%d" % k)[1] for k in range(200)}
    for _ in range(3):
        assert {k: lb.get_host(0.0, hkey=b"user-%d" % k)[1] for k in range(200)} == first
    assert len(set(first.values())) == 5


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(0, 11), st.integers(0, 10_000), st.booleans())
def test_hash_moves_at_most_one_nth_plus_5_percent(
    n: int, gone: int, base: int, by_overload: bool
) -> None:
    gone %= n
    hosts = [key(base + i) for i in range(n)]
    lb = balancer(hosts, PolicySpec("hash"))
    keys = [b"k%d" % i for i in range(2000)]
    before = [lb.get_host(0.0, hkey=k)[1] for k in keys]
    if by_overload:
        overload(lb, hosts[gone], 0.0)
    else:
        lb.update_route([h for h in hosts if h != hosts[gone]], 0.0)
    after = [lb.get_host(0.0, hkey=k)[1] for k in keys]
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    assert moved / len(keys) <= 1 / n + 0.05
    # only the keys of the host that left move
    assert all(a == b for a, b in zip(before, after, strict=True) if a != hosts[gone])


def test_hash_without_a_key_still_serves_every_host() -> None:
    hosts = [key(i) for i in range(3)]
    lb = balancer(hosts, PolicySpec("hash"))
    assert set(picks(lb, 30)) == set(hosts)


# --- panic -----------------------------------------------------------------------------------


def test_panic_off_by_default_piles_on_the_idle_host() -> None:
    hosts = [key(i) for i in range(4)]
    lb = balancer(hosts, PolicySpec())
    for h in hosts[1:]:
        overload(lb, h, 0.0)
    assert set(picks(lb, 50)) == {hosts[0]}


def test_panic_below_the_threshold_serves_across_all_hosts() -> None:
    hosts = [key(i) for i in range(4)]
    lb = balancer(hosts, PolicySpec(panic_threshold=0.5))
    for h in hosts[1:]:
        overload(lb, h, 0.0)  # 1/4 idle < 0.5
    counts = picks(lb, 80)
    assert set(counts) == set(hosts)
    assert lb.panic
    lb._become_idle(lb.hosts[hosts[1]], 0.0, "succ_rate")  # 2/4 idle: not below
    assert set(picks(lb, 80)) == set(hosts[:2])
    assert not lb.panic


def test_panic_serves_even_when_no_host_is_idle() -> None:
    hosts = [key(i) for i in range(2)]
    lb = balancer(hosts, PolicySpec(panic_threshold=0.3))
    for h in hosts:
        overload(lb, h, 0.0)
    assert lb.get_host(0.0)[0] == SUCC


# --- zones -----------------------------------------------------------------------------------


def zoned(local: int, remote: int, spec: PolicySpec) -> tuple[LoadBalancer, list[HostKey]]:
    hosts = [key(i) for i in range(local + remote)]
    meta = {h: HostMeta(zone="a" if i < local else "b") for i, h in enumerate(hosts)}
    return balancer(hosts, spec, meta, zone="a"), hosts


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 5),
    st.integers(0, 8),
    st.floats(0.05, 1.0),
    st.sampled_from(["rr", "weighted", "p2c", "hash"]),
)
def test_zone_affinity_never_leaves_while_the_zone_is_healthy_enough(
    local: int, remote: int, failing: int, failover: float, policy: str
) -> None:
    failing = min(failing, local)
    lb, hosts = zoned(local, remote, PolicySpec(policy, zone_affinity=True, zone_failover=failover))
    for h in hosts[:failing]:
        overload(lb, h, 0.0)
    healthy_share = (local - failing) / local
    counts = Counter(lb.get_host(0.0, hkey=b"%d" % i)[1] for i in range(200))
    served_remote = sum(c for k, c in counts.items() if k in hosts[local:])
    if healthy_share >= failover:
        assert served_remote == 0
    elif healthy_share == 0:  # everything elsewhere
        assert served_remote == 200


def test_zone_spills_in_proportion_below_the_threshold() -> None:
    lb, hosts = zoned(4, 4, PolicySpec(zone_affinity=True, zone_failover=0.8))
    overload(lb, hosts[0], 0.0)
    overload(lb, hosts[1], 0.0)  # h = 0.5: stay 0.5 / 0.8 = 62.5%
    counts = picks(lb, 800)
    local = counts[hosts[2]] + counts[hosts[3]]
    assert local == pytest.approx(800 * 0.625, abs=2)
    assert lb.spill == pytest.approx(0.625)


def test_a_zone_without_healthy_hosts_sends_everything_away_at_once_and_comes_back() -> None:
    lb, hosts = zoned(2, 2, PolicySpec(zone_affinity=True))
    assert set(picks(lb, 10)) == set(hosts[:2])
    overload(lb, hosts[0], 1.0)
    overload(lb, hosts[1], 1.0)
    assert lb.get_host(1.0)[1] in hosts[2:]  # the very next get_host
    assert set(picks(lb, 20, 1.0)) <= set(hosts[2:])
    lb._become_idle(lb.hosts[hosts[0]], 2.0, "succ_rate")  # h = 0.5 < 0.7: partly back
    counts = picks(lb, 700, 2.0)
    assert counts[hosts[0]] == pytest.approx(700 * 0.5 / 0.7, abs=2)
    lb._become_idle(lb.hosts[hosts[1]], 3.0, "succ_rate")
    assert set(picks(lb, 20, 3.0)) == set(hosts[:2])


def test_an_agent_without_a_zone_or_a_zone_without_hosts_ignores_affinity() -> None:
    hosts = [key(i) for i in range(4)]
    meta = {h: HostMeta(zone="a" if i < 2 else "b") for i, h in enumerate(hosts)}
    spec = PolicySpec(zone_affinity=True)
    assert set(picks(balancer(hosts, spec, meta, zone=""), 20)) == set(hosts)
    assert set(picks(balancer(hosts, spec, meta, zone="c"), 20)) == set(hosts)


# --- slow start ------------------------------------------------------------------------------


def test_ramp() -> None:
    assert pol.ramp(100, 0.0, 0.0, 10.0) == pytest.approx(10.0)
    assert pol.ramp(100, 0.0, 5.0, 10.0) == pytest.approx(55.0)
    assert pol.ramp(100, 0.0, 10.0, 10.0) == 100
    assert pol.ramp(100, 0.0, 0.0, 0.0) == 100


@pytest.mark.parametrize("policy", ["rr", "weighted"])
def test_slow_start_ramps_a_host_back_from_overload(policy: str) -> None:
    hosts = [key(1), key(2)]
    lb = balancer(hosts, PolicySpec(policy, slow_start=10.0), now=-100.0)
    overload(lb, hosts[0], 0.0)
    lb._become_idle(lb.hosts[hosts[0]], 1.0, "timeout")
    early = picks(lb, 1100, 1.0)
    assert early[hosts[0]] == pytest.approx(1100 * 10 / 110, abs=2)  # 10% of its weight
    late = picks(lb, 1000, 11.0)
    assert late[hosts[0]] == pytest.approx(500, abs=2)
    # an idle window that rolls over does not restart the ramp
    lb._become_idle(lb.hosts[hosts[0]], 12.0)
    assert picks(lb, 1000, 12.0)[hosts[0]] == pytest.approx(500, abs=2)


# --- explain ---------------------------------------------------------------------------------


def test_explain_records_choices_only_while_asked() -> None:
    table = ModuleTable(QUIET, route_wait=0.0)
    table.zone = "a"
    hosts = [key(1), key(2)]
    meta = {hosts[0]: HostMeta(weight=300, zone="a"), hosts[1]: HostMeta(zone="b")}
    table.apply_route((1, 1), hosts, 0.0, meta=meta, policy=PolicySpec("weighted"))
    table.get_host((1, 1), 0.0)
    state = table.describe((1, 1), 0.0, 1000.0, explain=True)
    assert state is not None
    assert state["choices"] == []  # nothing recorded before it was asked
    assert state["policy"]["policy"] == "weighted"
    assert state["agent_zone"] == "a"
    by_host = {h["host"]: h for h in state["hosts"]}
    assert by_host["10.0.0.2:7000"]["share"] == 0.75
    assert by_host["10.0.0.2:7000"]["weight"] == 300
    assert by_host["10.0.0.3:7000"]["zone"] == "b"
    for _ in range(4):
        table.get_host((1, 1), 1.0)
    table.report((1, 1), hosts[1], True, 1.0, latency=0.002)
    overload_rule = table.modules[(1, 1)]
    overload(overload_rule, hosts[1], 1.5)
    state = table.describe((1, 1), 2.0, 1000.0, explain=True)
    assert state is not None
    assert [c["reason"] for c in state["choices"]] == ["weighted"] * 4
    by_host = {h["host"]: h for h in state["hosts"]}
    assert by_host["10.0.0.3:7000"]["latency_ms"] == 2.0
    assert by_host["10.0.0.3:7000"]["overload_rule"] == "err_rate"
    # a minute later, recording stops and the default path is back
    lb = table.modules[(1, 1)]
    lb.set_policy(PolicySpec(), None, "a")
    table.get_host((1, 1), 100.0)
    assert lb.plain


def test_apply_route_defaults() -> None:
    params = attrs.evolve(QUIET, policy="weighted", slow_start=5.0)
    table = ModuleTable(params, route_wait=0.0)
    table.apply_route((1, 1), [key(1)], 0.0)
    lb = table.modules[(1, 1)]
    assert lb.spec == PolicySpec("weighted", slow_start=5.0)
    assert lb.hosts[key(1)].weight == 100 and lb.hosts[key(1)].zone == ""
    table.apply_route((1, 1), [key(1)], 0.0, meta={}, policy=PolicySpec("hash"))
    assert lb.spec.policy == "hash"


def test_p2c_tries_again_a_host_whose_peak_is_old() -> None:
    hosts = [key(1), key(2)]
    lb = balancer(hosts, PolicySpec("p2c"))
    lb.report(hosts[0], True, 0.0, latency=0.050)  # one bad peak long ago
    lb.report(hosts[1], True, 0.0, latency=0.010)
    assert set(picks(lb, 50, 1.0)) == {hosts[1]}
    for t in range(2, 60):  # hosts[1] keeps reporting 10 ms; hosts[0] decays meanwhile
        lb.report(hosts[1], True, float(t), latency=0.010)
    assert hosts[0] in picks(lb, 50, 60.0)
