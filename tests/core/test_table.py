"""The agent's module table: route lifecycle rules, with an explicit clock."""

from __future__ import annotations

from lars.core.balancer import NOEXIST, OVERLOAD, SUCC, BalancerParams
from lars.core.table import MAX_PENDING, MAX_WAITERS, ModuleTable

A = (167772161, 7001)
B = (167772162, 7002)
C = (167772163, 7003)
M = (1, 1)
PARAMS = BalancerParams(update_timeout=15.0)


def table(route_wait: float = 0.5, **kw: int) -> ModuleTable:
    return ModuleTable(PARAMS, route_wait, **kw)


def who(seq: int) -> tuple[int, tuple[str, int]]:
    """The (seq, address) of a request that may wait."""
    return seq, ("127.0.0.1", 40000 + seq)


def test_first_request_waits_and_asks_dns() -> None:
    t = table()
    assert t.get_host(M, 0.0, *who(1)) == (-1, None)
    assert t.want == {M}
    assert M in t.pending and M not in t.modules
    assert t.known() == [M]


def test_route_arrival_answers_every_waiter_round_robin() -> None:
    t = table()
    t.get_host(M, 0.0, *who(1))
    t.get_host(M, 0.0, *who(2))
    t.get_route(M, 0.0, *who(3))
    answers = t.apply_route(M, [A, B], 0.1)
    assert [(key, w.seq, code) for key, w, code, _ in answers] == [
        (M, 1, SUCC),
        (M, 2, SUCC),
        (M, 3, SUCC),
    ]
    assert {answers[0][3], answers[1][3]} == {A, B}  # two waiters, two different hosts
    assert sorted(answers[2][3]) == [A, B]
    assert M not in t.pending
    assert t.get_host(M, 0.2)[0] == SUCC


def test_wait_runs_out_with_noexist_and_later_requests_do_not_wait() -> None:
    t = table(route_wait=0.5)
    t.get_host(M, 0.0, *who(1))
    t.get_route(M, 0.1, *who(2))
    assert t.next_deadline() == 0.5
    assert t.expire_waits(0.4) == []
    answers = t.expire_waits(0.5)
    assert [(w.seq, code, payload) for _, w, code, payload in answers] == [
        (1, NOEXIST, None),
        (2, NOEXIST, ()),
    ]
    assert t.next_deadline() == 15.0  # when DNS's answer is given up on
    assert t.get_host(M, 0.6, *who(3)) == (NOEXIST, None)  # no second wait
    assert t.pending[M].waiters == []
    # The route still arrives later and is served.
    t.apply_route(M, [A], 2.0)
    assert t.get_host(M, 2.0) == (SUCC, A)


def test_route_wait_zero_answers_noexist_at_once_but_still_asks_dns() -> None:
    t = table(route_wait=0.0)
    assert t.get_host(M, 0.0, *who(1)) == (NOEXIST, None)
    assert t.want == {M}


def test_waiters_are_bounded() -> None:
    t = table()
    for seq in range(MAX_WAITERS):
        assert t.get_host(M, 0.0, *who(seq))[0] == -1
    assert t.get_host(M, 0.0, *who(MAX_WAITERS)) == (NOEXIST, None)


def test_empty_route_drops_the_module_and_remembers_it_absent() -> None:
    t = table()
    t.get_host(M, 0.0, *who(1))
    answers = t.apply_route(M, [], 0.1)
    assert [(w.seq, code) for _, w, code, _ in answers] == [(1, NOEXIST)]
    assert M not in t.modules and M not in t.pending
    t.want.clear()
    assert t.get_host(M, 1.0, *who(2)) == (NOEXIST, None)  # negative cache: no wait ...
    assert t.want == set()  # ... and no DNS request
    assert t.known() == []
    # After update_timeout the module is asked for again.
    assert t.get_host(M, 0.1 + 15.0, *who(3)) == (-1, None)
    assert t.want == {M}


def test_a_push_with_hosts_brings_a_dropped_module_back() -> None:
    t = table()
    t.apply_route(M, [A], 0.0)
    t.apply_route(M, [], 1.0)
    assert t.get_host(M, 2.0) == (NOEXIST, None)
    t.apply_route(M, [B], 3.0)
    assert t.get_host(M, 3.0) == (SUCC, B)
    assert M not in t.negative


def test_route_update_keeps_host_state_and_removes_vanished_hosts() -> None:
    t = table()
    t.apply_route(M, [A, B], 0.0)
    for _ in range(15):
        t.report(M, B, False, 1.0)
    lb = t.modules[M]
    assert lb.hosts[B].overloaded
    t.apply_route(M, [B, C], 2.0)
    assert set(lb.hosts) == {B, C}
    assert lb.hosts[B].overloaded  # kept its state
    assert A not in lb.idle and A not in lb.overloaded
    assert sorted(t.get_route(M, 2.0)[1]) == [B, C]


def test_stale_route_is_refreshed_on_use_and_served_meanwhile() -> None:
    t = table()
    t.apply_route(M, [A], 0.0)
    t.want.clear()
    assert t.get_host(M, 14.9) == (SUCC, A)
    assert t.want == set()
    assert t.get_host(M, 15.0) == (SUCC, A)  # served from the cache ...
    assert t.want == {M}  # ... and asked for again
    t.want.clear()
    t.get_host(M, 15.5)
    assert t.want == set()  # one refresh in flight, not one per request
    t.apply_route(M, [A], 16.0)
    assert t.get_host(M, 30.9) == (SUCC, A)
    assert t.want == set()
    t.get_route(M, 31.0)
    assert t.want == {M}


def test_lost_dns_forgets_refreshes_in_flight() -> None:
    t = table()
    t.apply_route(M, [A], 0.0)
    t.get_host(M, 20.0)
    t.want.clear()
    t.dns_unavailable()
    t.get_host(M, 21.0)
    assert t.want == {M}


def test_reports_for_unknown_modules_and_hosts_are_ignored() -> None:
    t = table()
    t.report(M, A, False, 0.0)  # unknown module
    t.apply_route(M, [A], 0.0)
    t.report(M, C, False, 0.0)  # unknown host
    assert t.modules[M].hosts[A].verr == 0
    assert C not in t.modules[M].hosts


def test_all_hosts_overloaded_answers_overload() -> None:
    t = table()
    t.apply_route(M, [A], 0.0)
    for _ in range(15):
        t.report(M, A, False, 0.0)
    assert t.get_host(M, 0.0) == (OVERLOAD, None)


def test_dropped_module_keeps_its_unsent_statistics_until_sent() -> None:
    t = table()
    t.apply_route(M, [A], 0.0)
    t.report(M, A, True, 0.0)
    lb = t.modules[M]
    t.apply_route(M, [], 1.0)
    due = list(t.take_due())
    assert due == [(M, lb)]
    assert t.collect_stats(due) == [(M, lb, [(A, 1, 0, False)])]
    t.stats_done(M, lb, stored=True)
    t.forget_drained()
    assert list(t.take_due()) == []
    assert t.stats_settled()


def test_module_limit_answers_noexist() -> None:
    t = table(max_modules=2)
    t.get_host((1, 1), 0.0, *who(1))
    t.get_host((1, 2), 0.0, *who(2))
    assert t.get_host((1, 3), 0.0, *who(3)) == (NOEXIST, None)
    assert (1, 3) not in t.want


def test_describe_reports_state_with_wall_clock_times() -> None:
    t = table()
    assert t.describe(M, 0.0, 1000.0) is None
    t.get_host(M, 0.0, *who(1))
    assert t.describe(M, 0.0, 1000.0) == {
        "status": "pending",
        "last_update": None,
        "host_count": 0,
        "hosts": [],
    }
    t.apply_route(M, [A, B], 10.0)
    for _ in range(15):
        t.report(M, B, False, 12.0)
    state = t.describe(M, 20.0, 1000.0)
    assert state is not None
    assert state["status"] == "ready" and state["last_update"] == 990.0
    hosts = {h["host"]: h for h in state["hosts"]}
    assert hosts["10.0.0.1:7001"]["state"] == "idle"
    assert hosts["10.0.0.1:7001"]["since"] == 990.0
    assert hosts["10.0.0.1:7001"]["vsucc"] == 180
    bad = hosts["10.0.0.2:7002"]
    assert (bad["state"], bad["since"], bad["verr"], bad["contin_err"]) == ("overload", 992.0, 5, 0)
    assert set(bad) == {
        "host",
        "state",
        "since",
        "vsucc",
        "verr",
        "rsucc",
        "rerr",
        "contin_succ",
        "contin_err",
        "demoted",
    }


def test_describe_pages_hosts_in_address_order() -> None:
    t = table()
    t.apply_route(M, [C, A, B], 0.0)
    t.get_host(M, 0.0)  # rotation must not reorder the pages
    first = t.describe(M, 0.0, 0.0, offset=0, limit=2)
    rest = t.describe(M, 0.0, 0.0, offset=2, limit=2)
    assert first is not None and rest is not None
    assert first["host_count"] == rest["host_count"] == 3
    pages = [h["host"] for h in first["hosts"] + rest["hosts"]]
    assert pages == ["10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.3:7003"]


def test_pending_module_dns_never_answers_is_given_up_after_update_timeout() -> None:
    t = table(route_wait=0.5)
    t.get_host(M, 0.0, *who(1))
    t.want.clear()  # sent to DNS
    t.expire_waits(0.5)
    assert M in t.pending and t.known() == [M]
    assert t.expire_waits(14.9) == [] and M in t.pending
    t.expire_waits(15.0)
    assert M not in t.pending and t.known() == []
    assert t.next_deadline() is None
    # Its next use asks DNS again.
    assert t.get_host(M, 16.0, *who(2)) == (-1, None)
    assert t.want == {M}


def test_pending_modules_are_bounded_and_expire_in_constant_time_each() -> None:
    t = table(route_wait=0.5)
    for modid in range(MAX_PENDING):
        t.get_host((modid, 1), modid * 1e-6, *who(modid))
    assert len(t.pending) == MAX_PENDING
    # One more is refused without asking DNS or queueing a waiter.
    assert t.get_host((MAX_PENDING, 1), 0.1, *who(1)) == (NOEXIST, None)
    assert (MAX_PENDING, 1) not in t.want
    # The waits run out oldest first, each answered once.
    answers = t.expire_waits(0.5 + 5000e-6)
    assert len(answers) == 5001
    assert t.next_deadline() == 0.5 + 5001e-6
    assert len(t.expire_waits(100.0)) == MAX_PENDING - 5001
    assert not t.pending and not t.want and t.next_deadline() is None


def test_only_modules_with_reports_are_due_for_statistics() -> None:
    t = table()
    for modid in range(1000):
        t.apply_route((modid, 1), [A], 0.0)
    t.report((7, 1), A, True, 0.0)
    t.report((7, 1), A, False, 0.0)
    t.report((9, 1), A, True, 0.0)
    due = list(t.take_due())
    assert [key for key, _ in due] == [(7, 1), (9, 1)]
    assert list(t.take_due()) == []  # taken: nothing is due twice
    taken = t.collect_stats(due)
    assert [(key, lines) for key, _, lines in taken] == [
        ((7, 1), [(A, 1, 1, False)]),
        ((9, 1), [(A, 1, 0, False)]),
    ]
    # A report while a send is in flight makes the module due again once it is done.
    t.report((7, 1), A, True, 1.0)
    assert t.collect_stats(t.take_due()) == []  # still in flight: nothing taken
    lb7, lb9 = taken[0][1], taken[1][1]
    t.stats_done((7, 1), lb7, stored=True)
    t.stats_done((9, 1), lb9, stored=False)  # lost: sent again
    assert sorted(key for key, _ in t.take_due()) == [(7, 1), (9, 1)]


def test_requeue_makes_untaken_modules_due_again() -> None:
    t = table()
    t.apply_route(M, [A], 0.0)
    t.report(M, A, True, 0.0)
    due = list(t.take_due())
    t.requeue(due)
    assert list(t.take_due()) == due
