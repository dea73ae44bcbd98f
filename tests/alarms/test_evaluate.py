"""Alarm evaluation on hand-made data: each rule at its thresholds and window edges."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import pytest

from lars.alarms.evaluate import (
    AlarmData,
    DataNeeds,
    Observation,
    caller_subject,
    evaluate,
    fresh_since,
    host_subject,
    module_subject,
    needs,
    window_start,
)
from lars.alarms.rules import (
    CallerSilentRule,
    ErrorRateRule,
    HostOverloadedRule,
    NoHealthyHostRule,
    Rule,
)
from lars.core.model import HostKey, ModuleKey, ip_to_int
from lars.store.base import CallStatus, HostCalls

#: The start of a minute, and a moment in the middle of it.
MINUTE0 = 16_666_667 * 60
NOW = MINUTE0 + 30.5
#: A whole second, for the edges of the overload and silence rules.
NOW_INT = float(MINUTE0 + 30)

M = (12, 3)
H1 = (ip_to_int("10.0.0.1"), 80)
H2 = (ip_to_int("10.0.0.2"), 80)
H3 = (ip_to_int("10.0.0.3"), 80)
C1, C2, C3 = (ip_to_int(f"10.0.1.{n}") for n in (1, 2, 3))


def calls(module: ModuleKey, host: HostKey, succ: int, err: int) -> HostCalls:
    return HostCalls(module[0], module[1], host[0], host[1], succ, err)


def flag(
    module: ModuleKey, host: HostKey, caller: int, ts: float, overload: bool = True
) -> CallStatus:
    return CallStatus(module[0], module[1], host[0], host[1], caller, 0, 0, int(ts), overload)


def rate_data(rule: ErrorRateRule, rows: list[HostCalls], now: float = NOW) -> AlarmData:
    return AlarmData(now=now, window_calls={window_start(now, rule.window): rows})


def run(
    rule: Rule, data: AlarmData, watch: Collection[tuple[str, str]] = ()
) -> dict[tuple[str, str], Observation]:
    return evaluate([rule], data, watch)


def breaching(result: Mapping[tuple[str, str], Observation]) -> dict[str, float | None]:
    """Subject -> value of the breaching observations."""
    return {o.subject: o.value for o in result.values() if o.breaching}


def store_window_calls(buckets: Iterable[tuple[int, HostCalls]], since: int) -> list[HostCalls]:
    """What ``RouteStore.window_calls(since)`` answers for per-minute buckets
    ``(minute, calls)``: the buckets from ``since`` on, summed per host."""
    sums: dict[tuple[int, int, int, int], list[int]] = {}
    for minute, row in buckets:
        if minute >= since:
            total = sums.setdefault((row.modid, row.cmdid, row.ip, row.port), [0, 0])
            total[0] += row.succ
            total[1] += row.err
    return [HostCalls(*key, succ, err) for key, (succ, err) in sums.items()]


# --- windows and needs ----------------------------------------------------------------------


def test_window_start_counts_the_current_minute_and_whole_ones_before() -> None:
    assert window_start(NOW, 1) == MINUTE0
    assert window_start(NOW, 5) == MINUTE0 - 4 * 60
    assert window_start(MINUTE0, 5) == MINUTE0 - 4 * 60
    assert window_start(MINUTE0 + 59.999, 5) == MINUTE0 - 4 * 60
    assert window_start(MINUTE0 - 0.001, 5) == MINUTE0 - 5 * 60
    assert window_start(NOW, 1440) == MINUTE0 - 1439 * 60
    assert isinstance(window_start(NOW, 5), int)


def test_fresh_since_is_the_oldest_whole_second_that_counts() -> None:
    assert fresh_since(NOW_INT, 5) == NOW_INT - 300
    assert fresh_since(NOW, 5) == MINUTE0 + 30 - 300 + 1  # ts >= NOW - 300 = ...30.5 - 300


def test_needs_of_no_rules_is_nothing() -> None:
    assert needs([], NOW) == DataNeeds(frozenset(), None, False, False)


def test_needs_one_window_per_distinct_error_rate_window() -> None:
    rules = [
        ErrorRateRule(name="a", threshold=0.1),
        ErrorRateRule(name="b", threshold=0.5, per="host"),
        ErrorRateRule(name="c", threshold=0.1, window=15),
        ErrorRateRule(name="d", threshold=0.1, window=60, enabled=False),
    ]
    assert needs(rules, NOW) == DataNeeds(
        window_starts=frozenset({window_start(NOW, 5), window_start(NOW, 15)})
    )


def test_needs_the_oldest_overload_row_and_the_routes() -> None:
    rules = [
        HostOverloadedRule(name="a", window=5),
        NoHealthyHostRule(name="b", window=10),
        HostOverloadedRule(name="c", window=60, enabled=False),
    ]
    assert needs(rules, NOW) == DataNeeds(overloaded_since=fresh_since(NOW, 10), routes=True)
    assert needs([NoHealthyHostRule(name="b", window=3)], NOW_INT).overloaded_since == (
        NOW_INT - 180
    )


def test_needs_callers_for_the_caller_rules() -> None:
    assert needs([CallerSilentRule(name="a", silent=5)], NOW) == DataNeeds(callers=True)
    assert needs([CallerSilentRule(name="a", silent=5, enabled=False)], NOW) == DataNeeds()


def test_a_missing_window_is_an_error_not_an_empty_window() -> None:
    rule = ErrorRateRule(name="a", threshold=0.1)
    with pytest.raises(KeyError):
        evaluate([rule], AlarmData(now=NOW))


def test_subjects() -> None:
    assert module_subject(M) == "12/3"
    assert host_subject(M, H1) == "12/3 10.0.0.1:80"
    assert caller_subject(C1) == "caller 10.0.1.1"


# --- error_rate -----------------------------------------------------------------------------

RATE = ErrorRateRule(name="api-errors", threshold=0.2, min_calls=100)


def test_error_rate_equal_to_the_threshold_does_not_fire() -> None:
    assert run(RATE, rate_data(RATE, [calls(M, H1, 80, 20)])) == {}


def test_error_rate_just_above_the_threshold_fires() -> None:
    result = run(RATE, rate_data(RATE, [calls(M, H1, 79, 21)]))
    assert result == {
        ("api-errors", "12/3"): Observation(
            rule="api-errors",
            subject="12/3",
            kind="error_rate",
            breaching=True,
            value=0.21,
            threshold=0.2,
            summary="error rate 21.0% > 20.0% over 5 min (100 calls) on 12/3",
            modid=12,
            cmdid=3,
        )
    }


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.7, 0.05])
def test_error_rate_is_compared_exactly(threshold: float) -> None:
    rule = ErrorRateRule(name="r", threshold=threshold, min_calls=1)
    err = round(threshold * 100)
    assert run(rule, rate_data(rule, [calls(M, H1, 100 - err, err)])) == {}
    assert breaching(run(rule, rate_data(rule, [calls(M, H1, 99 - err, err + 1)]))) == {
        "12/3": (err + 1) / 100
    }


def test_error_rate_of_0_fires_on_one_error() -> None:
    rule = ErrorRateRule(name="r", threshold=0, min_calls=10)
    assert run(rule, rate_data(rule, [calls(M, H1, 10, 0)])) == {}
    assert breaching(run(rule, rate_data(rule, [calls(M, H1, 9, 1)]))) == {"12/3": 0.1}


def test_error_rate_needs_min_calls() -> None:
    assert run(RATE, rate_data(RATE, [calls(M, H1, 0, 99)])) == {}
    assert breaching(run(RATE, rate_data(RATE, [calls(M, H1, 0, 100)]))) == {"12/3": 1.0}


def test_error_rate_per_module_sums_the_hosts() -> None:
    rows = [calls(M, H1, 35, 15), calls(M, H2, 35, 15), calls((12, 4), H1, 0, 99)]
    assert breaching(run(RATE, rate_data(RATE, rows))) == {"12/3": 0.3}


def test_error_rate_per_host_counts_each_host_alone() -> None:
    rule = ErrorRateRule(name="r", threshold=0.2, min_calls=50, per="host")
    rows = [calls(M, H1, 35, 15), calls(M, H2, 45, 5), calls(M, H3, 30, 19)]
    result = run(rule, rate_data(rule, rows))
    assert breaching(result) == {"12/3 10.0.0.1:80": 0.3}
    (observation,) = result.values()
    assert (observation.modid, observation.cmdid, observation.host) == (12, 3, "10.0.0.1:80")
    assert observation.summary == (
        "error rate 30.0% > 20.0% over 5 min (50 calls) on 12/3 10.0.0.1:80"
    )


def test_error_rate_summary_counts_with_separators() -> None:
    rule = ErrorRateRule(name="r", threshold=0.2, per="host")
    result = run(rule, rate_data(rule, [calls(M, H1, 592, 642)]))
    (observation,) = result.values()
    assert observation.summary == (
        "error rate 52.0% > 20.0% over 5 min (1,234 calls) on 12/3 10.0.0.1:80"
    )


def test_error_rate_module_filter() -> None:
    rule = ErrorRateRule(name="r", threshold=0.2, min_calls=1, module=(12, 4))
    rows = [calls(M, H1, 0, 10), calls((12, 4), H1, 0, 10), calls((4, 12), H1, 0, 10)]
    assert breaching(run(rule, rate_data(rule, rows))) == {"12/4": 1.0}


def test_error_rate_window_edges() -> None:
    """A bucket at the window's first minute counts; one a minute earlier does not."""
    rule = ErrorRateRule(name="r", threshold=0.5, min_calls=10)
    first = window_start(NOW, rule.window)
    healthy_now = (MINUTE0, calls(M, H1, 10, 0))

    def result_with(minute: int) -> dict[str, float | None]:
        rows = store_window_calls([healthy_now, (minute, calls(M, H1, 0, 30))], first)
        return breaching(run(rule, AlarmData(now=NOW, window_calls={first: rows})))

    assert result_with(first) == {"12/3": 0.75}
    assert result_with(first - 60) == {}


def test_error_rate_of_a_watched_alarm_not_breaching_carries_its_value() -> None:
    rows = [calls(M, H1, 95, 5)]
    watch = [("api-errors", "12/3"), ("api-errors", "12/4"), ("api-errors", "nonsense")]
    result = run(RATE, rate_data(RATE, rows), watch)
    assert {key: (o.breaching, o.value) for key, o in result.items()} == {
        ("api-errors", "12/3"): (False, 0.05),
        ("api-errors", "12/4"): (False, None),
        ("api-errors", "nonsense"): (False, None),
    }
    assert result["api-errors", "12/3"].summary == (
        "error rate 5.0% <= 20.0% over 5 min (100 calls) on 12/3"
    )
    assert result["api-errors", "12/4"].summary == "no calls over 5 min on 12/4"
    assert result["api-errors", "12/4"].modid == 12


def test_error_rate_of_a_watched_alarm_under_min_calls_still_has_a_value() -> None:
    result = run(RATE, rate_data(RATE, [calls(M, H1, 5, 5)]), [("api-errors", "12/3")])
    observation = result["api-errors", "12/3"]
    assert (observation.breaching, observation.value) == (False, 0.5)
    assert observation.summary == "error rate 50.0% over 5 min on only 10 calls (< 100) on 12/3"


def test_error_rate_watched_subject_out_of_scope_has_no_value() -> None:
    per_host = ErrorRateRule(name="r", threshold=0.2, module=(12, 4), per="host")
    rows = [calls(M, H1, 0, 500)]
    watch = [("r", "12/3 10.0.0.1:80"), ("r", "12/4")]
    result = run(per_host, rate_data(per_host, rows), watch)
    assert {k: (o.breaching, o.value) for k, o in result.items()} == {
        ("r", "12/3 10.0.0.1:80"): (False, None),
        ("r", "12/4"): (False, None),
    }


def test_a_breaching_watched_alarm_is_observed_once() -> None:
    result = run(RATE, rate_data(RATE, [calls(M, H1, 0, 100)]), [("api-errors", "12/3")])
    assert list(result) == [("api-errors", "12/3")]
    assert result["api-errors", "12/3"].breaching


def test_healthy_subjects_are_not_materialised() -> None:
    rows = [calls((m, 1), H1, 1000, 1) for m in range(5000)]
    watch = [("other-rule", "12/3")]
    assert run(RATE, rate_data(RATE, rows), watch) == {}


# --- host_overloaded ------------------------------------------------------------------------


def overload_data(
    rows: list[CallStatus],
    routes: Mapping[ModuleKey, Collection[HostKey]] | None = None,
    now: float = NOW_INT,
) -> AlarmData:
    return AlarmData(now=now, overloaded=rows, routes=routes or {M: {H1, H2, H3}})


HOT = HostOverloadedRule(name="hot", callers=2, window=5)


def test_host_overloaded_needs_k_callers() -> None:
    one = [flag(M, H1, C1, NOW_INT)]
    assert run(HOT, overload_data(one)) == {}
    two = [flag(M, H1, C1, NOW_INT), flag(M, H1, C2, NOW_INT - 10)]
    result = run(HOT, overload_data(two))
    assert result == {
        ("hot", "12/3 10.0.0.1:80"): Observation(
            rule="hot",
            subject="12/3 10.0.0.1:80",
            kind="host_overloaded",
            breaching=True,
            value=2,
            threshold=2,
            summary="12/3 10.0.0.1:80 flagged overloaded by 2 callers (>= 2) within 5 min",
            modid=12,
            cmdid=3,
            host="10.0.0.1:80",
        )
    }


def test_host_overloaded_counts_each_host_apart() -> None:
    rows = [flag(M, H1, C1, NOW_INT), flag(M, H2, C2, NOW_INT)]
    assert run(HOT, overload_data(rows)) == {}


def test_host_overloaded_ignores_stale_rows() -> None:
    edge = NOW_INT - 300
    fresh = [flag(M, H1, C1, NOW_INT), flag(M, H1, C2, edge)]
    assert breaching(run(HOT, overload_data(fresh))) == {"12/3 10.0.0.1:80": 2}
    stale = [flag(M, H1, C1, NOW_INT), flag(M, H1, C2, edge - 1)]
    assert run(HOT, overload_data(stale)) == {}


def test_host_overloaded_ignores_hosts_not_in_the_route() -> None:
    rows = [flag(M, H1, c, NOW_INT) for c in (C1, C2, C3)]
    assert run(HOT, overload_data(rows, {M: {H2}})) == {}
    assert run(HOT, overload_data(rows, {(12, 4): {H1}})) == {}


def test_host_overloaded_ignores_rows_not_flagged() -> None:
    rows = [flag(M, H1, C1, NOW_INT), flag(M, H1, C2, NOW_INT, overload=False)]
    assert run(HOT, overload_data(rows)) == {}


def test_host_overloaded_module_filter() -> None:
    rule = HostOverloadedRule(name="hot", module=(12, 4))
    rows = [flag(M, H1, C1, NOW_INT), flag((12, 4), H1, C1, NOW_INT)]
    result = run(rule, overload_data(rows, {M: {H1}, (12, 4): {H1}}))
    assert breaching(result) == {"12/4 10.0.0.1:80": 1}


def test_host_overloaded_watched_alarms_carry_their_value() -> None:
    rows = [flag(M, H1, C1, NOW_INT)]
    watch = [("hot", "12/3 10.0.0.1:80"), ("hot", "12/3 10.0.0.9:80"), ("hot", "12/3")]
    result = run(HOT, overload_data(rows), watch)
    assert {k: (o.breaching, o.value) for k, o in result.items()} == {
        ("hot", "12/3 10.0.0.1:80"): (False, 1),
        ("hot", "12/3 10.0.0.9:80"): (False, None),  # no longer in the route
        ("hot", "12/3"): (False, None),  # not a host subject
    }
    assert result["hot", "12/3 10.0.0.1:80"].summary == (
        "12/3 10.0.0.1:80 flagged overloaded by 1 caller (< 2) within 5 min"
    )
    assert result["hot", "12/3 10.0.0.9:80"].summary == (
        "12/3 10.0.0.9:80 is no longer in the route"
    )


# --- no_healthy_host ------------------------------------------------------------------------

DEAD = NoHealthyHostRule(name="dead", window=5)


def test_no_healthy_host_with_one_healthy_host_left_does_not_fire() -> None:
    rows = [flag(M, H1, C1, NOW_INT), flag(M, H2, C2, NOW_INT)]
    assert run(DEAD, overload_data(rows)) == {}


def test_no_healthy_host_fires_when_none_is_left() -> None:
    rows = [flag(M, H1, C1, NOW_INT), flag(M, H2, C2, NOW_INT), flag(M, H3, C1, NOW_INT)]
    result = run(DEAD, overload_data(rows))
    assert result == {
        ("dead", "12/3"): Observation(
            rule="dead",
            subject="12/3",
            kind="no_healthy_host",
            breaching=True,
            value=0,
            threshold=0,
            summary=(
                "no healthy host among 3 in the route of 12/3 "
                "(each flagged overloaded within 5 min)"
            ),
            modid=12,
            cmdid=3,
        )
    }


def test_no_healthy_host_ignores_stale_rows() -> None:
    edge = NOW_INT - 300
    routes = {M: {H1, H2}}
    fresh = [flag(M, H1, C1, NOW_INT), flag(M, H2, C2, edge)]
    assert breaching(run(DEAD, overload_data(fresh, routes))) == {"12/3": 0}
    stale = [flag(M, H1, C1, NOW_INT), flag(M, H2, C2, edge - 1)]
    assert run(DEAD, overload_data(stale, routes)) == {}


def test_no_healthy_host_counts_only_hosts_in_the_route() -> None:
    rows = [flag(M, H1, C1, NOW_INT), flag(M, H3, C1, NOW_INT)]
    assert run(DEAD, overload_data(rows, {M: {H1, H2}})) == {}


def test_no_healthy_host_needs_a_host_in_the_route() -> None:
    rows = [flag(M, H1, C1, NOW_INT)]
    assert run(DEAD, overload_data(rows, {M: set(), (12, 4): {H1}})) == {}


def test_no_healthy_host_module_filter() -> None:
    rule = NoHealthyHostRule(name="dead", module=(12, 4))
    rows = [flag(M, H1, C1, NOW_INT), flag((12, 4), H1, C1, NOW_INT)]
    result = run(rule, overload_data(rows, {M: {H1}, (12, 4): {H1}}))
    assert breaching(result) == {"12/4": 0}


def test_no_healthy_host_watched_alarms_carry_the_healthy_count() -> None:
    rows = [flag(M, H1, C1, NOW_INT)]
    watch = [("dead", "12/3"), ("dead", "12/4"), ("dead", "12/3 10.0.0.1:80")]
    result = run(DEAD, overload_data(rows, {M: {H1, H2, H3}, (12, 4): set()}), watch)
    assert {k: (o.breaching, o.value) for k, o in result.items()} == {
        ("dead", "12/3"): (False, 2),
        ("dead", "12/4"): (False, None),
        ("dead", "12/3 10.0.0.1:80"): (False, None),
    }
    assert result["dead", "12/3"].summary == "2 of 3 hosts healthy in the route of 12/3"
    assert result["dead", "12/4"].summary == "12/4 has no host in its route"


# --- caller_silent --------------------------------------------------------------------------

QUIET = CallerSilentRule(name="quiet", silent=10, forget=60)


def caller_data(last: Mapping[int, int], now: float = NOW_INT) -> AlarmData:
    return AlarmData(now=now, caller_last=last)


def test_caller_silent_fires_at_exactly_silent() -> None:
    assert run(QUIET, caller_data({C1: int(NOW_INT) - 599})) == {}
    result = run(QUIET, caller_data({C1: int(NOW_INT) - 600}))
    assert result == {
        ("quiet", "caller 10.0.1.1"): Observation(
            rule="quiet",
            subject="caller 10.0.1.1",
            kind="caller_silent",
            breaching=True,
            value=10.0,
            threshold=10,
            summary="caller 10.0.1.1 silent for 10.0 min (>= 10 min)",
            caller="10.0.1.1",
        )
    }


def test_caller_silent_forgets_a_caller_silent_longer_than_forget() -> None:
    at_forget = run(QUIET, caller_data({C1: int(NOW_INT) - 3600}))
    assert breaching(at_forget) == {"caller 10.0.1.1": 60.0}
    assert run(QUIET, caller_data({C1: int(NOW_INT) - 3601})) == {}


def test_caller_silent_resolves_a_forgotten_caller_without_a_value() -> None:
    watch = [("quiet", "caller 10.0.1.1")]
    result = run(QUIET, caller_data({C1: int(NOW_INT) - 3601}), watch)
    observation = result["quiet", "caller 10.0.1.1"]
    assert (observation.breaching, observation.value) == (False, None)
    assert (
        observation.summary == "caller 10.0.1.1 silent for 60.0 min (> 60 min): no longer watched"
    )


def test_caller_silent_of_one_caller() -> None:
    rule = CallerSilentRule(name="quiet", silent=10, caller=C2)
    last = {C1: int(NOW_INT) - 3000, C2: int(NOW_INT) - 900, C3: int(NOW_INT)}
    assert breaching(run(rule, caller_data(last))) == {"caller 10.0.1.2": 15.0}
    assert run(rule, caller_data({C1: 0})) == {}


def test_caller_silent_watched_alarms() -> None:
    last = {C1: int(NOW_INT) - 30}
    watch = [("quiet", "caller 10.0.1.1"), ("quiet", "caller 10.0.1.2"), ("quiet", "12/3")]
    result = run(QUIET, caller_data(last), watch)
    assert {k: (o.breaching, o.value) for k, o in result.items()} == {
        ("quiet", "caller 10.0.1.1"): (False, 0.5),
        ("quiet", "caller 10.0.1.2"): (False, None),
        ("quiet", "12/3"): (False, None),
    }
    assert result["quiet", "caller 10.0.1.1"].summary == (
        "caller 10.0.1.1 reported 0.5 min ago (< 10 min)"
    )
    assert result["quiet", "caller 10.0.1.2"].summary == "caller 10.0.1.2 has no report"


def test_caller_silent_watched_caller_of_another_rule_scope() -> None:
    rule = CallerSilentRule(name="quiet", silent=10, caller=C2)
    result = run(rule, caller_data({C1: 0}), [("quiet", "caller 10.0.1.1")])
    assert result["quiet", "caller 10.0.1.1"].value is None


# --- several rules --------------------------------------------------------------------------


def test_disabled_rules_observe_nothing_even_when_watched() -> None:
    rules: list[Any] = [
        ErrorRateRule(name="a", threshold=0.1, min_calls=1, enabled=False),
        HostOverloadedRule(name="b", enabled=False),
        NoHealthyHostRule(name="c", enabled=False),
        CallerSilentRule(name="d", silent=1, enabled=False),
    ]
    data = AlarmData(
        now=NOW_INT,
        window_calls={},
        overloaded=[flag(M, H1, C1, NOW_INT)],
        routes={M: {H1}},
        caller_last={C1: 0},
    )
    watch = [("a", "12/3"), ("b", "12/3 10.0.0.1:80"), ("c", "12/3"), ("d", "caller 10.0.1.1")]
    assert evaluate(rules, data, watch) == {}


def test_every_rule_in_one_round() -> None:
    rules: list[Rule] = [
        ErrorRateRule(name="errors", threshold=0.1, min_calls=1),
        HostOverloadedRule(name="hot"),
        NoHealthyHostRule(name="dead"),
        CallerSilentRule(name="quiet", silent=1),
    ]
    wanted = needs(rules, NOW_INT)
    assert wanted.overloaded_since is not None
    data = AlarmData(
        now=NOW_INT,
        window_calls={start: [calls(M, H1, 1, 1)] for start in wanted.window_starts},
        overloaded=[flag(M, H1, C1, NOW_INT)],
        routes={M: {H1}},
        caller_last={C1: int(NOW_INT) - 60, C2: int(NOW_INT)},
    )
    assert sorted(evaluate(rules, data)) == [
        ("dead", "12/3"),
        ("errors", "12/3"),
        ("hot", "12/3 10.0.0.1:80"),
        ("quiet", "caller 10.0.1.1"),
    ]
