"""The per-module load balancer against DESIGN.md §6 (``lars.core.balancer``).

Every test asserts one rule of §6 with exact counter values. The clock is explicit: each call
takes ``now`` in seconds. Hosts are ``(ip as uint32, port)`` keys (``lars.core.model``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lars.core.balancer import (
    NOEXIST,
    OVERLOAD,
    SUCC,
    BalancerParams,
    HostState,
    LoadBalancer,
    StatLine,
)
from lars.core.model import HostKey, PolicySpec, ip_to_int


def key(n: int, port: int = 7000) -> HostKey:
    return ip_to_int(f"10.0.0.{n}"), port


A, B, C, D = key(1), key(2), key(3), key(4)

#: Parameters for the tests of one rule: the other rules are kept out of the way.
QUIET = BalancerParams(
    probe_num=100,
    init_succ_cnt=1000,
    init_err_cnt=5,
    err_rate=1.0,
    succ_rate=1.0,
    contin_err_limit=1000,
    contin_succ_limit=1000,
    window_err_rate=1.0,
    idle_timeout=1000.0,
    overload_timeout=1000.0,
)


def params(**changes: Any) -> BalancerParams:
    return attrs.evolve(QUIET, **changes)


def balancer(*hosts: HostKey, p: BalancerParams | None = None, now: float = 0.0) -> LoadBalancer:
    """A balancer whose hosts were added one at a time, so the idle ring is in argument order."""
    lb = LoadBalancer(QUIET if p is None else p)
    for i in range(len(hosts)):
        lb.update_route(hosts[: i + 1], now)
    return lb


def report(lb: LoadBalancer, host: HostKey, pattern: str, now: float) -> None:
    """Report one call per character: ``s`` success, ``f`` failure."""
    for ch in pattern:
        assert ch in "sf"
        lb.report(host, ch == "s", now)


def counters(s: HostState) -> dict[str, int]:
    return {
        "vsucc": s.vsucc,
        "verr": s.verr,
        "rsucc": s.rsucc,
        "rerr": s.rerr,
        "contin_succ": s.contin_succ,
        "contin_err": s.contin_err,
    }


def cnt(vsucc: int, verr: int, rsucc: int, rerr: int, cs: int, ce: int) -> dict[str, int]:
    return {
        "vsucc": vsucc,
        "verr": verr,
        "rsucc": rsucc,
        "rerr": rerr,
        "contin_succ": cs,
        "contin_err": ce,
    }


def fresh_idle(p: BalancerParams) -> dict[str, int]:
    return cnt(p.init_succ_cnt, 0, 0, 0, 0, 0)


def fresh_overload(p: BalancerParams) -> dict[str, int]:
    return cnt(0, p.init_err_cnt, 0, 0, 0, 0)


def assert_idle(lb: LoadBalancer, host: HostKey, since: float) -> None:
    s = lb.hosts[host]
    assert not s.overloaded
    assert host in lb.idle
    assert host not in lb.overloaded
    assert s.idle_since == since


def assert_overloaded(lb: LoadBalancer, host: HostKey, since: float) -> None:
    s = lb.hosts[host]
    assert s.overloaded
    assert host in lb.overloaded
    assert host not in lb.idle
    assert s.overload_since == since


def overload(lb: LoadBalancer, host: HostKey, now: float) -> None:
    """Fail ``host`` until it is overloaded (needs a small ``contin_err_limit``)."""
    for _ in range(lb.params.contin_err_limit + 1):
        if lb.hosts[host].overloaded:
            return
        lb.report(host, False, now)
    assert lb.hosts[host].overloaded


def totals(lines: Iterable[StatLine]) -> dict[HostKey, tuple[int, int]]:
    """Successes and failures per host key over some statistics lines."""
    out: dict[HostKey, tuple[int, int]] = {}
    for s, succ, err in lines:
        old = out.get(s.key, (0, 0))
        out[s.key] = (old[0] + succ, old[1] + err)
    return out


# --- parameters ----------------------------------------------------------------------------------


def test_default_params_are_the_original_shipped_config() -> None:
    p = BalancerParams()
    assert p.probe_num == 10
    assert p.init_succ_cnt == 180
    assert p.init_err_cnt == 5
    assert p.err_rate == 0.1
    assert p.succ_rate == 0.5
    assert p.contin_err_limit == 15
    assert p.contin_succ_limit == 15
    assert p.window_err_rate == 0.7
    assert p.idle_timeout == 15.0
    assert p.overload_timeout == 15.0
    assert p.update_timeout == 15.0


# --- host state ----------------------------------------------------------------------------------


def test_new_host_enters_idle_with_init_succ_cnt() -> None:
    p = params(init_succ_cnt=7)
    lb = balancer(A, p=p, now=3.0)
    s = lb.hosts[A]
    assert counters(s) == cnt(7, 0, 0, 0, 0, 0)
    assert_idle(lb, A, since=3.0)
    assert s.overload_since == 0
    assert (s.stat_succ, s.stat_err, s.flight_succ, s.flight_err) == (0, 0, 0, 0)
    assert lb.idle == [A]
    assert lb.overloaded == []


def test_new_host_with_default_params_has_vsucc_180() -> None:
    lb = LoadBalancer(BalancerParams())
    lb.update_route([A], 1.5)
    assert counters(lb.hosts[A]) == cnt(180, 0, 0, 0, 0, 0)
    assert_idle(lb, A, since=1.5)


def test_report_counts_successes_and_failures() -> None:
    lb = balancer(A, p=params(init_succ_cnt=10))
    report(lb, A, "ff", 1.0)
    assert counters(lb.hosts[A]) == cnt(10, 2, 0, 2, 0, 2)
    report(lb, A, "s", 1.0)
    assert counters(lb.hosts[A]) == cnt(11, 2, 1, 2, 1, 0)
    report(lb, A, "ss", 1.0)
    assert counters(lb.hosts[A]) == cnt(13, 2, 3, 2, 3, 0)
    report(lb, A, "f", 1.0)
    assert counters(lb.hosts[A]) == cnt(13, 3, 3, 3, 0, 1)
    assert_idle(lb, A, since=0.0)


def test_report_counts_on_an_overloaded_host() -> None:
    p = params(contin_err_limit=1, init_err_cnt=4)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "ff", 2.0)
    assert counters(lb.hosts[A]) == cnt(0, 6, 0, 2, 0, 2)
    report(lb, A, "s", 2.0)
    assert counters(lb.hosts[A]) == cnt(1, 6, 1, 2, 1, 0)
    assert_overloaded(lb, A, since=1.0)


def test_becoming_overloaded_resets_every_counter() -> None:
    p = params(contin_err_limit=3, init_succ_cnt=20, init_err_cnt=4)
    lb = balancer(A, p=p)
    report(lb, A, "sssfsff", 2.0)
    assert counters(lb.hosts[A]) == cnt(24, 3, 4, 3, 0, 2)
    report(lb, A, "f", 2.5)
    assert counters(lb.hosts[A]) == cnt(0, 4, 0, 0, 0, 0)
    assert_overloaded(lb, A, since=2.5)
    assert lb.hosts[A].idle_since == 0.0


def test_becoming_idle_resets_every_counter() -> None:
    p = params(contin_err_limit=1, contin_succ_limit=3, init_succ_cnt=20, init_err_cnt=50)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "fsfss", 2.0)
    assert counters(lb.hosts[A]) == cnt(3, 52, 3, 2, 2, 0)
    report(lb, A, "s", 3.0)
    assert counters(lb.hosts[A]) == cnt(20, 0, 0, 0, 0, 0)
    assert_idle(lb, A, since=3.0)
    assert lb.hosts[A].overload_since == 1.0


# --- report, step 2: transitions -----------------------------------------------------------------


def test_idle_host_overloads_when_error_rate_exceeds_err_rate() -> None:
    p = params(init_succ_cnt=8, err_rate=0.1)
    lb = balancer(A, p=p)
    report(lb, A, "sf", 1.0)
    # verr/(vsucc+verr) = 1/10: not above err_rate, the host stays idle.
    assert counters(lb.hosts[A]) == cnt(9, 1, 1, 1, 0, 1)
    assert_idle(lb, A, since=0.0)
    report(lb, A, "sf", 2.0)
    # 2/12 > 0.1 (the streak is only 1).
    assert counters(lb.hosts[A]) == fresh_overload(p)
    assert_overloaded(lb, A, since=2.0)


def test_idle_host_overloads_after_contin_err_limit_failures() -> None:
    p = params(contin_err_limit=3)
    lb = balancer(A, p=p)
    report(lb, A, "ffsff", 1.0)
    assert counters(lb.hosts[A]) == cnt(1001, 4, 1, 4, 0, 2)
    assert_idle(lb, A, since=0.0)
    report(lb, A, "f", 2.0)
    assert counters(lb.hosts[A]) == fresh_overload(p)
    assert_overloaded(lb, A, since=2.0)


def test_success_never_overloads_an_idle_host() -> None:
    # err_rate 0: the first failure would overload; successes never check the error rate.
    p = params(err_rate=0.0, init_succ_cnt=0)
    lb = balancer(A, p=p)
    report(lb, A, "s" * 30, 1.0)
    assert counters(lb.hosts[A]) == cnt(30, 0, 30, 0, 30, 0)
    assert_idle(lb, A, since=0.0)


def test_failure_never_returns_an_overloaded_host_to_idle() -> None:
    # succ_rate 0 and contin_succ_limit 0: any success would return it; failures never do.
    p = params(contin_err_limit=1, succ_rate=0.0, contin_succ_limit=0, init_err_cnt=0)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "f" * 20, 2.0)
    assert counters(lb.hosts[A]) == cnt(0, 20, 0, 20, 0, 20)
    assert_overloaded(lb, A, since=1.0)
    report(lb, A, "s", 3.0)
    assert_idle(lb, A, since=3.0)


def test_overloaded_host_returns_idle_when_success_rate_exceeds_succ_rate() -> None:
    p = params(contin_err_limit=1, init_err_cnt=2, succ_rate=0.5, init_succ_cnt=9)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "ssfs", 2.0)
    # vsucc/(vsucc+verr) = 3/6: not above succ_rate.
    assert counters(lb.hosts[A]) == cnt(3, 3, 3, 1, 1, 0)
    assert_overloaded(lb, A, since=1.0)
    report(lb, A, "s", 4.0)
    # 4/7 > 0.5 (the streak is only 2).
    assert counters(lb.hosts[A]) == fresh_idle(p)
    assert_idle(lb, A, since=4.0)


def test_overloaded_host_returns_idle_after_contin_succ_limit() -> None:
    p = params(contin_err_limit=1, init_err_cnt=100, contin_succ_limit=3, init_succ_cnt=9)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "ssfss", 2.0)
    assert counters(lb.hosts[A]) == cnt(4, 101, 4, 1, 2, 0)
    assert_overloaded(lb, A, since=1.0)
    report(lb, A, "s", 3.0)
    assert counters(lb.hosts[A]) == fresh_idle(p)
    assert_idle(lb, A, since=3.0)


def test_defaults_fifteen_consecutive_failures_overload_a_host() -> None:
    p = BalancerParams()
    lb = balancer(A, p=p)
    report(lb, A, "f" * 14, 1.0)
    assert counters(lb.hosts[A]) == cnt(180, 14, 0, 14, 0, 14)
    assert_idle(lb, A, since=0.0)
    report(lb, A, "f", 1.0)
    assert counters(lb.hosts[A]) == cnt(0, 5, 0, 0, 0, 0)
    assert_overloaded(lb, A, since=1.0)


def test_defaults_error_rate_overloads_at_the_twenty_first_failure() -> None:
    lb = balancer(A, p=BalancerParams())
    report(lb, A, "f" * 14 + "s" + "f" * 6, 1.0)
    # 20/201 <= 0.1
    assert counters(lb.hosts[A]) == cnt(181, 20, 1, 20, 0, 6)
    assert_idle(lb, A, since=0.0)
    report(lb, A, "f", 1.0)
    # 21/202 > 0.1 with a streak of only 7.
    assert counters(lb.hosts[A]) == cnt(0, 5, 0, 0, 0, 0)
    assert_overloaded(lb, A, since=1.0)


def test_defaults_overloaded_host_needs_six_successes() -> None:
    lb = balancer(A, p=BalancerParams())
    report(lb, A, "f" * 15, 1.0)
    report(lb, A, "sssss", 2.0)
    # 5/10 is not above 0.5.
    assert counters(lb.hosts[A]) == cnt(5, 5, 5, 0, 5, 0)
    assert_overloaded(lb, A, since=1.0)
    report(lb, A, "s", 3.0)
    assert counters(lb.hosts[A]) == cnt(180, 0, 0, 0, 0, 0)
    assert_idle(lb, A, since=3.0)


def test_transition_ends_the_call() -> None:
    # The idle window has expired and its error rate is low, so the window rule alone would make
    # the host idle afresh; the step-2 transition to overload wins and nothing runs after it.
    p = params(contin_err_limit=3, idle_timeout=10.0, window_err_rate=0.9)
    lb = balancer(A, p=p)
    report(lb, A, "ssssssssff", 1.0)
    assert counters(lb.hosts[A]) == cnt(1008, 2, 8, 2, 0, 2)
    report(lb, A, "f", 10.0)
    assert counters(lb.hosts[A]) == fresh_overload(p)
    assert_overloaded(lb, A, since=10.0)
    # The same for the way back: the host that just returned to idle is not counted again.
    p2 = params(contin_err_limit=1, contin_succ_limit=2, overload_timeout=5.0)
    lb2 = balancer(A, p=p2)
    overload(lb2, A, 0.0)
    report(lb2, A, "s", 1.0)
    report(lb2, A, "s", 5.0)
    assert counters(lb2.hosts[A]) == fresh_idle(p2)
    assert_idle(lb2, A, since=5.0)


# --- report, step 3: windows ---------------------------------------------------------------------


def test_idle_window_expiry_overloads_when_window_error_rate_high() -> None:
    p = params(idle_timeout=10.0, window_err_rate=0.7)
    lb = balancer(A, p=p)
    report(lb, A, "sss", 1.0)
    report(lb, A, "ffffff", 2.0)
    assert counters(lb.hosts[A]) == cnt(1003, 6, 3, 6, 0, 6)
    # At exactly idle_timeout: rerr/(rsucc+rerr) = 7/10 >= 0.7.
    report(lb, A, "f", 10.0)
    assert counters(lb.hosts[A]) == fresh_overload(p)
    assert_overloaded(lb, A, since=10.0)


def test_idle_window_expiry_applies_on_a_success_report() -> None:
    p = params(idle_timeout=10.0, window_err_rate=0.7)
    lb = balancer(A, p=p)
    report(lb, A, "ssfffffff", 1.0)
    report(lb, A, "s", 12.0)  # 7/10 >= 0.7
    assert counters(lb.hosts[A]) == fresh_overload(p)
    assert_overloaded(lb, A, since=12.0)


def test_idle_window_not_applied_before_idle_timeout() -> None:
    p = params(idle_timeout=10.0, window_err_rate=0.5)
    lb = balancer(A, p=p, now=2.0)
    report(lb, A, "ffff", 11.5)
    assert counters(lb.hosts[A]) == cnt(1000, 4, 0, 4, 0, 4)
    assert_idle(lb, A, since=2.0)


def test_idle_window_expiry_resets_window_otherwise() -> None:
    p = params(idle_timeout=10.0, window_err_rate=0.7)
    lb = balancer(A, p=p)
    report(lb, A, "ssssfff", 1.0)
    report(lb, A, "f", 10.0)  # 4/8 < 0.7: idle afresh
    assert counters(lb.hosts[A]) == fresh_idle(p)
    assert_idle(lb, A, since=10.0)
    # The next window runs from the new idle_since.
    report(lb, A, "fffffff", 19.0)
    assert counters(lb.hosts[A]) == cnt(1000, 7, 0, 7, 0, 7)
    assert_idle(lb, A, since=10.0)
    report(lb, A, "f", 20.0)
    assert counters(lb.hosts[A]) == fresh_overload(p)
    assert_overloaded(lb, A, since=20.0)


def test_overload_timeout_on_report() -> None:
    p = params(contin_err_limit=1, overload_timeout=5.0)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "f", 5.9)
    assert counters(lb.hosts[A]) == cnt(0, 6, 0, 1, 0, 1)
    assert_overloaded(lb, A, since=1.0)
    # A failure at exactly overload_timeout still returns the host.
    report(lb, A, "f", 6.0)
    assert counters(lb.hosts[A]) == fresh_idle(p)
    assert_idle(lb, A, since=6.0)


def test_overload_timeout_on_a_success_report() -> None:
    p = params(contin_err_limit=1, overload_timeout=5.0)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    report(lb, A, "s", 7.0)
    assert counters(lb.hosts[A]) == fresh_idle(p)
    assert_idle(lb, A, since=7.0)


def test_overload_timeout_honoured_without_reports() -> None:
    p = params(contin_err_limit=1, overload_timeout=5.0)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    assert lb.get_host(5.9) == (OVERLOAD, None)
    assert lb.access_cnt == 1
    assert_overloaded(lb, A, since=1.0)
    # Before choosing, the expired host returns to idle, and is then served.
    assert lb.get_host(6.0) == (SUCC, A)
    assert counters(lb.hosts[A]) == fresh_idle(p)
    assert_idle(lb, A, since=6.0)
    assert lb.overloaded == []


def test_overload_expiry_uses_each_hosts_latest_overload_since() -> None:
    p = params(contin_err_limit=1, contin_succ_limit=1, overload_timeout=5.0)
    lb = balancer(A, B, C, p=p)
    overload(lb, A, 0.0)
    report(lb, A, "s", 1.0)  # back to idle
    overload(lb, B, 2.0)
    overload(lb, A, 3.0)  # A's first overload (at 0) no longer counts
    lb.get_host(6.9)
    assert_overloaded(lb, A, since=3.0)
    assert_overloaded(lb, B, since=2.0)
    lb.get_host(7.0)
    assert_overloaded(lb, A, since=3.0)
    assert_idle(lb, B, since=7.0)
    lb.get_host(7.9)
    assert_overloaded(lb, A, since=3.0)
    lb.get_host(8.0)
    assert_idle(lb, A, since=8.0)
    assert lb.overloaded == []


# --- get_host ------------------------------------------------------------------------------------


def test_get_host_noexist_without_hosts() -> None:
    lb = LoadBalancer(BalancerParams())
    assert lb.get_host(0.0) == (NOEXIST, None)
    lb.update_route([], 1.0)
    assert lb.get_host(1.0) == (NOEXIST, None)
    lb.update_route([A], 2.0)
    assert lb.get_host(2.0) == (SUCC, A)
    lb.update_route([], 3.0)
    assert lb.get_host(3.0) == (NOEXIST, None)
    assert lb.access_cnt == 0


def test_round_robin_over_idle_hosts() -> None:
    lb = balancer(A, B, C, p=BalancerParams())
    got = [lb.get_host(1.0) for _ in range(9)]
    assert all(code == SUCC for code, _ in got)
    hosts = [h for _, h in got]
    assert set(hosts[:3]) == {A, B, C}
    assert hosts == hosts[:3] * 3
    assert lb.access_cnt == 0
    # Serving does not touch the counters.
    for h in (A, B, C):
        assert counters(lb.hosts[h]) == fresh_idle(BalancerParams())


def test_round_robin_over_overloaded_hosts_when_probing() -> None:
    p = params(probe_num=0, contin_err_limit=1)
    lb = balancer(A, B, C, p=p)
    for h in (A, B, C):
        overload(lb, h, 1.0)
    got = [lb.get_host(2.0) for _ in range(6)]
    assert all(code == SUCC for code, _ in got)
    hosts = [h for _, h in got]
    assert set(hosts[:3]) == {A, B, C}
    assert hosts == hosts[:3] * 2
    for h in (A, B, C):
        assert counters(lb.hosts[h]) == fresh_overload(p)


def test_probe_every_probe_num_when_both_lists_nonempty() -> None:
    p = params(probe_num=3, contin_err_limit=1)
    lb = balancer(A, B, p=p)
    overload(lb, B, 1.0)
    got = []
    access = []
    for _ in range(8):
        got.append(lb.get_host(2.0))
        access.append(lb.access_cnt)
    # access_cnt counts the idle answers; at probe_num it is reset and B is probed.
    assert got == [(SUCC, A)] * 3 + [(SUCC, B)] + [(SUCC, A)] * 3 + [(SUCC, B)]
    assert access == [1, 2, 3, 0, 1, 2, 3, 0]
    assert counters(lb.hosts[B]) == fresh_overload(p)
    assert_overloaded(lb, B, since=1.0)


def test_probe_cadence_with_default_probe_num() -> None:
    p = attrs.evolve(BalancerParams(), overload_timeout=1000.0)
    lb = balancer(A, B, p=p)
    overload(lb, B, 1.0)
    hosts = [lb.get_host(2.0)[1] for _ in range(22)]
    assert hosts == ([A] * 10 + [B]) * 2


def test_probes_rotate_over_overloaded_hosts() -> None:
    p = params(probe_num=1, contin_err_limit=1)
    lb = balancer(A, B, C, p=p)
    overload(lb, B, 1.0)
    overload(lb, C, 1.0)
    hosts = [lb.get_host(2.0)[1] for _ in range(6)]
    assert hosts[0::2] == [A, A, A]
    probes = hosts[1::2]
    assert set(probes[:2]) == {B, C}
    assert probes[2] == probes[0]


def test_probe_num_zero_always_probes() -> None:
    p = params(probe_num=0, contin_err_limit=1)
    lb = balancer(A, B, p=p)
    overload(lb, B, 1.0)
    assert [lb.get_host(2.0) for _ in range(4)] == [(SUCC, B)] * 4
    assert lb.access_cnt == 0


def test_all_overloaded_answers_overload_then_probes() -> None:
    p = params(probe_num=2, contin_err_limit=1)
    lb = balancer(A, B, p=p)
    overload(lb, A, 1.0)
    overload(lb, B, 1.0)
    got = []
    access = []
    for _ in range(6):
        got.append(lb.get_host(2.0))
        access.append(lb.access_cnt)
    assert [code for code, _ in got] == [OVERLOAD, OVERLOAD, SUCC] * 2
    assert got[0][1] is None and got[1][1] is None
    assert {got[2][1], got[5][1]} == {A, B}
    assert access == [1, 2, 0, 1, 2, 0]


def test_access_cnt_only_counts_while_some_host_is_overloaded() -> None:
    p = params(probe_num=3, contin_err_limit=1, overload_timeout=5.0)
    lb = balancer(A, B, p=p)
    overload(lb, B, 0.0)
    assert [lb.get_host(1.0)[1] for _ in range(2)] == [A, A]
    assert lb.access_cnt == 2
    lb.get_host(5.0)  # B expires: idle list only, access_cnt untouched
    assert lb.overloaded == []
    for _ in range(5):
        lb.get_host(5.0)
    assert lb.access_cnt == 2
    overload(lb, B, 6.0)
    assert lb.get_host(6.0) == (SUCC, A)
    assert lb.access_cnt == 3
    assert lb.get_host(6.0) == (SUCC, B)
    assert lb.access_cnt == 0


def test_access_cnt_is_per_balancer() -> None:
    p = params(probe_num=2, contin_err_limit=1)
    one, two = balancer(A, p=p), balancer(A, p=p)
    overload(one, A, 0.0)
    overload(two, A, 0.0)
    one.get_host(1.0)
    one.get_host(1.0)
    assert (one.access_cnt, two.access_cnt) == (2, 0)
    assert two.get_host(1.0) == (OVERLOAD, None)
    assert one.get_host(1.0) == (SUCC, A)


# --- unknown hosts -------------------------------------------------------------------------------


def test_unknown_host_report_ignored() -> None:
    p = params(contin_err_limit=1)
    lb = balancer(A, B, p=p)
    overload(lb, B, 0.0)
    lb.take_stats()
    lb.stats_sent()
    before = {h: counters(s) for h, s in lb.hosts.items()}
    report(lb, D, "ffffsssf" * 5, 1.0)
    report(lb, D, "s", 5000.0)
    assert {h: counters(s) for h, s in lb.hosts.items()} == before
    assert set(lb.hosts) == {A, B}
    assert (lb.idle, lb.overloaded) == ([A], [B])
    assert not lb.has_unsent_stats
    assert lb.is_drained
    assert lb.take_stats() == []


def test_report_for_a_removed_host_is_ignored() -> None:
    lb = balancer(A, B)
    lb.update_route([A], 1.0)
    report(lb, B, "sf", 2.0)
    assert B not in lb.hosts
    assert lb.is_drained
    assert lb.take_stats() == []


# --- route updates -------------------------------------------------------------------------------


def test_route_update_adds_new_hosts_idle() -> None:
    p = params(init_succ_cnt=12, contin_err_limit=1)
    lb = balancer(A, p=p)
    overload(lb, A, 1.0)
    lb.update_route([A, B, C], 4.0)
    assert set(lb.hosts) == {A, B, C}
    for h in (B, C):
        assert counters(lb.hosts[h]) == cnt(12, 0, 0, 0, 0, 0)
        assert_idle(lb, h, since=4.0)
    assert_overloaded(lb, A, since=1.0)
    assert sorted(lb.route()) == sorted([A, B, C])


def test_route_update_keeps_state_of_remaining_hosts() -> None:
    p = params(contin_err_limit=2, overload_timeout=10.0, idle_timeout=10.0, window_err_rate=0.5)
    lb = balancer(A, B, p=p)
    report(lb, A, "ssf", 1.0)
    overload(lb, B, 2.0)
    report(lb, B, "fs", 3.0)
    a_before, b_before = counters(lb.hosts[A]), counters(lb.hosts[B])
    assert a_before == cnt(1002, 1, 2, 1, 0, 1)
    assert b_before == cnt(1, 6, 1, 1, 1, 0)
    lb.update_route([C, B, A], 4.0)
    assert counters(lb.hosts[A]) == a_before
    assert counters(lb.hosts[B]) == b_before
    assert_idle(lb, A, since=0.0)
    assert_overloaded(lb, B, since=2.0)
    assert (lb.hosts[A].stat_succ, lb.hosts[A].stat_err) == (2, 1)
    assert (lb.hosts[B].stat_succ, lb.hosts[B].stat_err) == (1, 3)
    # The timers kept running: B still expires at 2 + 10, A's window still ends at 0 + 10.
    lb.get_host(11.9)
    assert_overloaded(lb, B, since=2.0)
    lb.get_host(12.0)
    assert_idle(lb, B, since=12.0)
    report(lb, A, "f", 10.0)  # window 2/4 >= 0.5
    assert_overloaded(lb, A, since=10.0)


def test_route_update_removes_vanished_hosts_from_every_structure() -> None:
    p = params(contin_err_limit=1, overload_timeout=5.0, probe_num=0)
    lb = balancer(A, B, C, p=p)
    overload(lb, B, 0.0)
    lb.update_route([C], 1.0)
    assert set(lb.hosts) == {C}
    assert lb.route() == [C]
    assert lb.idle == [C]
    assert lb.overloaded == []
    assert [s.key for s in lb.states()] == [C]
    # B's overload expiry must not bring it back, and nothing else may serve A or B.
    for t in (1.0, 5.0, 6.0, 100.0):
        assert [lb.get_host(t) for _ in range(4)] == [(SUCC, C)] * 4
    assert set(lb.hosts) == {C}
    assert lb.idle == [C]
    assert lb.overloaded == []


def test_route_update_removes_an_overloaded_host_while_others_stay_overloaded() -> None:
    p = params(contin_err_limit=1, overload_timeout=5.0, probe_num=0)
    lb = balancer(A, B, C, p=p)
    overload(lb, A, 0.0)
    overload(lb, B, 1.0)
    lb.update_route([B, C], 2.0)
    assert lb.overloaded == [B]
    assert [lb.get_host(3.0)[1] for _ in range(3)] == [B, B, B]
    lb.get_host(6.0)
    assert_idle(lb, B, since=6.0)
    assert lb.overloaded == []
    assert sorted(lb.idle) == sorted([B, C])


def test_route_update_readded_host_starts_fresh() -> None:
    p = params(contin_err_limit=1, init_succ_cnt=3)
    lb = balancer(A, B, p=p)
    overload(lb, A, 1.0)
    lb.update_route([B], 2.0)
    lb.update_route([A, B], 9.0)
    assert counters(lb.hosts[A]) == cnt(3, 0, 0, 0, 0, 0)
    assert_idle(lb, A, since=9.0)


def test_route_update_with_repeated_keys() -> None:
    lb = LoadBalancer(QUIET)
    lb.update_route([A, B, A, B, A], 0.0)
    assert sorted(lb.route()) == sorted([A, B])
    assert sorted(lb.idle) == sorted([A, B])


def test_route_update_sets_last_update_for_needs_update() -> None:
    lb = LoadBalancer(BalancerParams())
    assert lb.last_update is None
    assert lb.needs_update(0.0)
    lb.update_route([A], 10.0)
    assert lb.last_update == 10.0
    assert not lb.needs_update(24.9)
    assert lb.needs_update(25.0)
    lb.update_route([], 30.0)  # an empty answer is an answer too
    assert not lb.needs_update(31.0)


# --- statistics for the reporter -----------------------------------------------------------------


def test_take_stats_empty_when_nothing_reported() -> None:
    lb = balancer(A)
    assert lb.is_drained
    assert not lb.has_unsent_stats
    assert lb.take_stats() == []
    assert not lb.stats_in_flight
    assert lb.is_drained


def test_take_stats_returns_counts_since_last_send() -> None:
    p = params(contin_err_limit=1)
    lb = balancer(A, B, C, p=p)
    report(lb, A, "ssf", 1.0)  # A ends overloaded: the counts survive the transition
    report(lb, B, "sss", 1.0)
    assert lb.has_unsent_stats
    assert not lb.is_drained
    lines = lb.take_stats()
    assert len(lines) == 2
    assert totals(lines) == {A: (2, 1), B: (3, 0)}
    for s, _, _ in lines:
        assert s is lb.hosts[s.key]
    assert {s.key: s.overloaded for s, _, _ in lines} == {A: True, B: False}
    assert lb.stats_in_flight
    assert not lb.has_unsent_stats
    assert not lb.is_drained
    lb.stats_sent()
    assert not lb.stats_in_flight
    assert lb.is_drained
    assert lb.take_stats() == []


def test_only_one_send_in_flight() -> None:
    lb = balancer(A, B)
    report(lb, A, "sf", 1.0)
    first = lb.take_stats()
    assert totals(first) == {A: (1, 1)}
    report(lb, A, "ss", 1.0)
    report(lb, B, "f", 1.0)
    assert lb.has_unsent_stats
    assert lb.take_stats() == []
    assert lb.stats_in_flight
    assert totals(first) == {A: (1, 1)}  # the in-flight lines did not change
    lb.stats_sent()
    assert lb.has_unsent_stats
    assert totals(lb.take_stats()) == {A: (2, 0), B: (0, 1)}
    lb.stats_sent()
    assert lb.is_drained


def test_stats_sent_does_not_double_count() -> None:
    lb = balancer(A)
    acked: Counter[str] = Counter()
    for pattern in ("ssf", "f", "ssss"):
        report(lb, A, pattern, 1.0)
        lines = lb.take_stats()
        lb.stats_sent()
        acked["s"] += sum(x for _, x, _ in lines)
        acked["f"] += sum(x for _, _, x in lines)
        assert totals(lines) == {A: (pattern.count("s"), pattern.count("f"))}
    assert acked == Counter(s=6, f=2)
    assert lb.take_stats() == []


def test_stats_failed_loses_nothing() -> None:
    lb = balancer(A, B)
    report(lb, A, "sssf", 1.0)
    assert totals(lb.take_stats()) == {A: (3, 1)}
    report(lb, A, "s", 1.0)
    report(lb, B, "f", 1.0)
    lb.stats_failed()
    assert not lb.stats_in_flight
    assert lb.has_unsent_stats
    assert totals(lb.take_stats()) == {A: (4, 1), B: (0, 1)}
    lb.stats_failed()
    report(lb, B, "s", 1.0)
    assert totals(lb.take_stats()) == {A: (4, 1), B: (1, 1)}
    lb.stats_sent()
    assert lb.is_drained
    assert lb.take_stats() == []


def test_stats_failed_after_nothing_was_taken_is_harmless() -> None:
    lb = balancer(A)
    report(lb, A, "sf", 1.0)
    lb.stats_failed()
    lb.stats_sent()
    assert totals(lb.take_stats()) == {A: (1, 1)}


def test_retired_host_unsent_counts_are_still_sent() -> None:
    lb = balancer(A, B)
    report(lb, A, "ssf", 1.0)
    lb.update_route([B], 2.0)
    assert A not in lb.hosts
    assert lb.has_unsent_stats
    assert not lb.is_drained
    lines = lb.take_stats()
    assert totals(lines) == {A: (2, 1)}
    assert not lb.has_unsent_stats
    lb.stats_sent()
    assert lb.is_drained
    assert lb.take_stats() == []


def test_retired_host_in_flight_counts_restored_on_failure() -> None:
    lb = balancer(A, B)
    report(lb, A, "sf", 1.0)
    assert totals(lb.take_stats()) == {A: (1, 1)}
    lb.update_route([B], 2.0)
    assert not lb.is_drained
    lb.stats_failed()
    assert lb.has_unsent_stats
    assert totals(lb.take_stats()) == {A: (1, 1)}
    lb.stats_sent()
    assert lb.is_drained
    assert lb.take_stats() == []


def test_retired_host_in_flight_counts_forgotten_on_ack() -> None:
    lb = balancer(A, B)
    report(lb, A, "sf", 1.0)
    lb.take_stats()
    lb.update_route([B], 2.0)
    lb.stats_sent()
    assert lb.is_drained
    assert lb.take_stats() == []
    lb.stats_failed()
    assert lb.is_drained


def test_retired_host_keeps_counts_reported_while_a_send_was_in_flight() -> None:
    lb = balancer(A, B)
    report(lb, A, "s", 1.0)
    assert totals(lb.take_stats()) == {A: (1, 0)}
    report(lb, A, "ff", 1.0)  # after the take: not in the in-flight send
    lb.update_route([B], 2.0)
    lb.stats_sent()
    assert lb.has_unsent_stats
    assert not lb.is_drained
    assert totals(lb.take_stats()) == {A: (0, 2)}
    lb.stats_sent()
    assert lb.is_drained


def test_readded_host_counts_are_all_sent() -> None:
    lb = balancer(A, B)
    report(lb, A, "ss", 1.0)
    lb.update_route([B], 2.0)
    lb.update_route([A, B], 3.0)
    report(lb, A, "f", 4.0)
    lines = lb.take_stats()
    assert totals(lines) == {A: (2, 1)}
    lb.stats_sent()
    assert lb.is_drained


def test_stats_lines_have_one_line_per_host() -> None:
    # DESIGN §6: a send carries "each host's success and failure counts since the last
    # successful send". A host removed and re-added before its counts were sent must not be
    # split over two lines: the agent sends every line as a HostResult, and ServerCallStatus
    # keeps succ_cnt/err_cnt/overload of the last line for a host (here the stale, removed one).
    lb = balancer(A, B)
    report(lb, A, "ss", 1.0)
    lb.update_route([B], 2.0)
    lb.update_route([A, B], 3.0)
    report(lb, A, "f", 4.0)
    lines = lb.take_stats()
    assert [(s.key, succ, err) for s, succ, err in lines] == [(A, 2, 1)]


# --- a model of §6, run against random operations ------------------------------------------------

POOL = [key(n) for n in range(1, 6)]


@attrs.define
class ModelHost:
    overloaded: bool = False
    vsucc: int = 0
    verr: int = 0
    rsucc: int = 0
    rerr: int = 0
    contin_succ: int = 0
    contin_err: int = 0
    since: float = 0.0

    def counters(self) -> dict[str, int]:
        return cnt(self.vsucc, self.verr, self.rsucc, self.rerr, self.contin_succ, self.contin_err)


class BalancerMachine(RuleBasedStateMachine):
    """Random operations on a balancer and, in parallel, on a literal model of DESIGN §6."""

    def __init__(self) -> None:
        super().__init__()
        self.lb = LoadBalancer(BalancerParams())
        self.now = 0.0
        self.route_keys: set[HostKey] = set()
        self.model: dict[HostKey, ModelHost] = {}
        self.access_cnt = 0
        # Statistics: calls reported to route hosts, acknowledged counts, every HostState seen.
        self.reported: Counter[tuple[HostKey, bool]] = Counter()
        self.acked: Counter[tuple[HostKey, bool]] = Counter()
        self.unsent: Counter[tuple[HostKey, bool]] = Counter()
        self.in_flight: Counter[tuple[HostKey, bool]] | None = None
        self.seen: dict[int, HostState] = {}

    @initialize(
        probe_num=st.integers(0, 4),
        init_succ_cnt=st.integers(0, 8),
        init_err_cnt=st.integers(0, 4),
        err_rate=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
        succ_rate=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
        contin_err_limit=st.integers(0, 5),
        contin_succ_limit=st.integers(0, 5),
        window_err_rate=st.sampled_from([0.0, 0.5, 0.7, 1.0]),
        idle_timeout=st.integers(1, 6),
        overload_timeout=st.integers(1, 6),
        route=st.lists(st.sampled_from(POOL), min_size=1, max_size=5),
    )
    def setup(
        self,
        probe_num: int,
        init_succ_cnt: int,
        init_err_cnt: int,
        err_rate: float,
        succ_rate: float,
        contin_err_limit: int,
        contin_succ_limit: int,
        window_err_rate: float,
        idle_timeout: int,
        overload_timeout: int,
        route: list[HostKey],
    ) -> None:
        self.p = BalancerParams(
            probe_num=probe_num,
            init_succ_cnt=init_succ_cnt,
            init_err_cnt=init_err_cnt,
            err_rate=err_rate,
            succ_rate=succ_rate,
            contin_err_limit=contin_err_limit,
            contin_succ_limit=contin_succ_limit,
            window_err_rate=window_err_rate,
            idle_timeout=float(idle_timeout),
            overload_timeout=float(overload_timeout),
        )
        self.lb = LoadBalancer(self.p)
        self.update_route(route)

    # model transitions (DESIGN §6, literally)

    def m_idle(self, m: ModelHost) -> None:
        m.overloaded = False
        m.vsucc, m.verr = self.p.init_succ_cnt, 0
        m.rsucc = m.rerr = m.contin_succ = m.contin_err = 0
        m.since = self.now

    def m_overload(self, m: ModelHost) -> None:
        m.overloaded = True
        m.vsucc, m.verr = 0, self.p.init_err_cnt
        m.rsucc = m.rerr = m.contin_succ = m.contin_err = 0
        m.since = self.now

    def remember_states(self) -> None:
        for s in self.lb.hosts.values():
            self.seen[id(s)] = s

    # rules

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(keys=st.lists(st.sampled_from(POOL), max_size=6))
    def set_route(self, keys: list[HostKey]) -> None:
        self.update_route(keys)

    @rule(host=st.sampled_from(POOL))
    def toggle_host(self, host: HostKey) -> None:
        self.update_route(self.route_keys ^ {host})

    def update_route(self, keys: Iterable[HostKey]) -> None:
        self.lb.update_route(keys, self.now)
        new = set(keys)
        for k in self.route_keys - new:
            del self.model[k]
        for k in new - self.route_keys:
            m = ModelHost()
            self.m_idle(m)
            self.model[k] = m
        self.route_keys = new
        self.remember_states()

    @rule(n=st.integers(1, 12))
    def get_hosts(self, n: int) -> None:
        for _ in range(n):
            self.get_host()

    def get_host(self) -> None:
        got = self.lb.get_host(self.now)
        assert got[1] is None or got[1] in self.route_keys
        if not self.model:
            assert got == (NOEXIST, None)
            return
        for m in self.model.values():
            if m.overloaded and self.now - m.since >= self.p.overload_timeout:
                self.m_idle(m)
        idle = {k for k, m in self.model.items() if not m.overloaded}
        over = set(self.model) - idle
        if idle and not over:
            expected = idle
        elif self.access_cnt >= self.p.probe_num:
            self.access_cnt = 0
            expected = over
        else:
            self.access_cnt += 1
            if not idle:
                assert got == (OVERLOAD, None)
                return
            expected = idle
        code, host = got
        assert code == SUCC
        assert host in expected

    def route_host(self, index: int) -> HostKey:
        hosts = sorted(self.route_keys)
        return hosts[index % len(hosts)] if hosts else POOL[index % len(POOL)]

    @rule(index=st.integers(0, 4), success=st.booleans())
    def report_one(self, index: int, success: bool) -> None:
        self.report(self.route_host(index), success)

    @rule(index=st.integers(0, 4), results=st.lists(st.booleans(), min_size=1, max_size=12))
    def report_many(self, index: int, results: list[bool]) -> None:
        for success in results:
            self.report(self.route_host(index), success)

    @rule(host=st.sampled_from(POOL), success=st.booleans())
    def report_any(self, host: HostKey, success: bool) -> None:
        self.report(host, success)

    def report(self, host: HostKey, success: bool) -> None:
        self.lb.report(host, success, self.now)
        m = self.model.get(host)
        if m is None:
            return
        self.reported[host, success] += 1
        self.unsent[host, success] += 1
        p = self.p
        if success:
            m.vsucc += 1
            m.rsucc += 1
            m.contin_succ += 1
            m.contin_err = 0
        else:
            m.verr += 1
            m.rerr += 1
            m.contin_err += 1
            m.contin_succ = 0
        if not m.overloaded:
            if not success and (
                m.verr / (m.vsucc + m.verr) > p.err_rate or m.contin_err >= p.contin_err_limit
            ):
                self.m_overload(m)
            elif self.now - m.since >= p.idle_timeout:
                if m.rerr / (m.rsucc + m.rerr) >= p.window_err_rate:
                    self.m_overload(m)
                else:
                    self.m_idle(m)
        elif (
            success
            and (m.vsucc / (m.vsucc + m.verr) > p.succ_rate or m.contin_succ >= p.contin_succ_limit)
        ) or self.now - m.since >= p.overload_timeout:
            self.m_idle(m)

    @rule()
    def take_stats(self) -> None:
        lines = self.lb.take_stats()
        if self.in_flight is not None:
            assert lines == []
            return
        for _, succ, err in lines:
            assert succ >= 0 and err >= 0 and succ + err > 0
        got: Counter[tuple[HostKey, bool]] = Counter()
        for k, (succ, err) in totals(lines).items():
            got[k, True] += succ
            got[k, False] += err
        assert +got == +self.unsent
        self.unsent = Counter()
        if lines:
            self.in_flight = got
        assert self.lb.stats_in_flight == bool(lines)

    @rule()
    def stats_sent(self) -> None:
        self.lb.stats_sent()
        if self.in_flight is not None:
            self.acked += self.in_flight
            self.in_flight = None

    @rule()
    def stats_failed(self) -> None:
        self.lb.stats_failed()
        if self.in_flight is not None:
            self.unsent += self.in_flight
            self.in_flight = None

    @precondition(lambda self: self.in_flight is None)
    @rule()
    def drain(self) -> None:
        """Send and acknowledge until drained: every reported call arrives exactly once."""
        for _ in range(3):
            if self.lb.is_drained:
                break
            self.take_stats()
            self.stats_sent()
        assert self.lb.is_drained
        assert +self.acked == +self.reported

    # invariants

    @invariant()
    def lists_partition_the_route(self) -> None:
        lb = self.lb
        idle, over = lb.idle, lb.overloaded
        assert len(idle) == len(set(idle))
        assert len(over) == len(set(over))
        assert not set(idle) & set(over)
        assert set(idle) | set(over) == set(lb.hosts)
        assert sorted(lb.route()) == sorted(self.route_keys)
        assert set(lb.hosts) == self.route_keys
        assert [s.key for s in lb.states()] == idle + over
        for k, s in lb.hosts.items():
            assert s.key == k
            assert s.overloaded == (k in over)

    @invariant()
    def vanished_hosts_appear_nowhere(self) -> None:
        gone = set(POOL) - self.route_keys
        lb = self.lb
        assert not gone & (set(lb.hosts) | set(lb.idle) | set(lb.overloaded) | set(lb.route()))

    @invariant()
    def state_matches_the_model(self) -> None:
        assert self.lb.access_cnt == self.access_cnt
        for k, m in self.model.items():
            s = self.lb.hosts[k]
            assert s.overloaded == m.overloaded, (k, s, m)
            assert counters(s) == m.counters(), (k, s, m)
            assert s.since == m.since, (k, s, m)

    @invariant()
    def statistics_are_conserved(self) -> None:
        self.remember_states()
        held: Counter[tuple[HostKey, bool]] = Counter()
        for s in self.seen.values():
            held[s.key, True] += s.stat_succ + s.flight_succ
            held[s.key, False] += s.stat_err + s.flight_err
        assert +(self.acked + held) == +self.reported
        unsent = any(s.stat_succ or s.stat_err for s in self.seen.values())
        flying = any(s.flight_succ or s.flight_err for s in self.seen.values())
        assert self.lb.has_unsent_stats == unsent
        assert self.lb.stats_in_flight == (self.in_flight is not None)
        assert flying == (self.in_flight is not None)
        assert self.lb.is_drained == (not unsent and not flying)


def test_balancer_state_machine() -> None:
    run_state_machine_as_test(
        BalancerMachine,
        settings=settings(
            max_examples=300,
            stateful_step_count=60,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.parametrize("n_hosts", [1, 2, 5])
def test_defaults_round_robin_serves_each_idle_host_equally(n_hosts: int) -> None:
    hosts = POOL[:n_hosts]
    lb = balancer(*hosts, p=BalancerParams())
    served = Counter(lb.get_host(0.0)[1] for _ in range(10 * n_hosts))
    assert served == Counter({h: 10 for h in hosts})


# --- the fleet view (DESIGN §14) -----------------------------------------------------------------


def test_demoted_host_new_to_the_agent_starts_overloaded_and_is_still_probed() -> None:
    lb = LoadBalancer(params(probe_num=2))
    lb.update_route([A, B], 1.0, demoted={B})
    assert_idle(lb, A, since=1.0)
    assert_overloaded(lb, B, since=1.0)
    assert lb.hosts[B].reason == "demoted" and lb.hosts[B].demoted
    assert lb.tally.to_overload["demoted"] == 1
    picks = [lb.get_host(2.0)[1] for _ in range(9)]
    assert B in picks and picks.count(A) > picks.count(B)  # probed every probe_num-th time


def test_demoted_host_recovers_by_the_usual_rules() -> None:
    p = params(contin_succ_limit=3)
    lb = LoadBalancer(p)
    lb.update_route([A, B], 1.0, demoted={B})
    for _ in range(p.contin_succ_limit + 1):
        lb.report(B, True, 2.0)
    assert_idle(lb, B, since=2.0)
    lb.update_route([A, B], 3.0, demoted={B})  # already called: the flag no longer demotes it
    assert_idle(lb, B, since=2.0)
    assert lb.hosts[B].demoted


def test_demotion_spares_a_host_this_agent_has_called() -> None:
    lb = LoadBalancer(params())
    lb.update_route([A, B], 1.0)
    lb.report(B, True, 1.5)
    lb.update_route([A, B], 2.0, demoted={A, B})
    assert_overloaded(lb, A, since=2.0)
    assert_idle(lb, B, since=1.0)
    lb.update_route([A, B], 3.0)
    assert not lb.hosts[A].demoted and not lb.hosts[B].demoted


# --- probe_interval (Lars addition) --------------------------------------------------------------


@pytest.mark.parametrize("layered", [False, True])
def test_probe_interval_probes_each_overloaded_host_at_most_once_per_interval(
    layered: bool,
) -> None:
    p = params(probe_num=2, contin_err_limit=1, probe_interval=1.0)
    lb = LoadBalancer(p)
    lb.update_route([A, B, C], 0.0)
    if layered:  # the layered path (_choose) instead of §6's plain one
        lb.set_policy(PolicySpec("weighted"), None, "")
        assert not lb.plain
    overload(lb, B, 0.0)
    overload(lb, C, 0.0)
    assert lb.hosts[B].probed_at == 0.0
    # within the interval of their overload: no probe at all, however many requests
    assert [lb.get_host(0.5)[1] for _ in range(30)] == [A] * 30
    # once due, each is probed once, then not again until a further interval has passed
    picks = [lb.get_host(1.0)[1] for _ in range(30)]
    assert picks.count(B) == 1 and picks.count(C) == 1
    assert lb.tally.probes == 2
    assert [lb.get_host(1.9)[1] for _ in range(30)] == [A] * 30
    picks = [lb.get_host(2.0)[1] for _ in range(30)]
    assert picks.count(B) == 1 and picks.count(C) == 1


def test_probe_interval_with_every_host_overloaded_answers_overload_between_probes() -> None:
    p = params(probe_num=1, contin_err_limit=1, probe_interval=1.0)
    lb = LoadBalancer(p)
    lb.update_route([A], 0.0)
    overload(lb, A, 0.0)
    assert [lb.get_host(0.5)[0] for _ in range(5)] == [OVERLOAD] * 5
    assert [lb.get_host(1.0) for _ in range(3)] == [
        (SUCC, A),
        (OVERLOAD, None),
        (OVERLOAD, None),
    ]


def test_probe_interval_zero_keeps_the_original_count() -> None:
    assert BalancerParams().probe_interval == 0.0
    lb = LoadBalancer(params(probe_num=2, contin_err_limit=1))
    lb.update_route([A, B], 0.0)
    overload(lb, B, 0.0)
    assert [lb.get_host(0.0)[1] for _ in range(9)].count(B) == 3
