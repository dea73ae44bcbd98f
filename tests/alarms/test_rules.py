"""Alarm rules: parsing, checking, writing back, describing."""

from __future__ import annotations

import math
import re
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lars.alarms.rules import (
    KINDS,
    CallerSilentRule,
    ErrorRateRule,
    HostOverloadedRule,
    NoHealthyHostRule,
    parse_rule,
    rules_by_name,
)
from lars.core.model import ip_to_int
from lars.errors import InvalidValue


def error_rate(**keys: Any) -> dict[str, Any]:
    return {"name": "api-errors", "kind": "error_rate", "threshold": 0.2, **keys}


def caller_silent(**keys: Any) -> dict[str, Any]:
    return {"name": "quiet", "kind": "caller_silent", "silent": 10, **keys}


# --- reading --------------------------------------------------------------------------------


def test_each_kind_parses_with_its_defaults() -> None:
    assert parse_rule(error_rate()) == ErrorRateRule(
        name="api-errors",
        enabled=True,
        module=None,
        threshold=0.2,
        window=5,
        min_calls=100,
        per="module",
    )
    assert parse_rule({"name": "hot", "kind": "host_overloaded"}) == HostOverloadedRule(
        name="hot", module=None, callers=1, window=5
    )
    assert parse_rule({"name": "dead", "kind": "no_healthy_host"}) == NoHealthyHostRule(
        name="dead", module=None, window=5
    )
    assert parse_rule(caller_silent()) == CallerSilentRule(
        name="quiet", caller=None, silent=10, forget=1440
    )


def test_every_key_is_read() -> None:
    rule = parse_rule(error_rate(enabled=False, module="12/3", window=15, min_calls=7, per="host"))
    assert rule == ErrorRateRule(
        name="api-errors",
        enabled=False,
        module=(12, 3),
        threshold=0.2,
        window=15,
        min_calls=7,
        per="host",
    )
    rule = parse_rule(caller_silent(caller="10.0.0.9", forget=60))
    assert rule == CallerSilentRule(
        name="quiet", caller=ip_to_int("10.0.0.9"), silent=10, forget=60
    )


def test_an_integer_threshold_is_a_float() -> None:
    rule = parse_rule(error_rate(threshold=0))
    assert isinstance(rule, ErrorRateRule)
    assert rule.threshold == 0.0 and type(rule.threshold) is float


def test_the_error_names_the_rule_and_the_key() -> None:
    with pytest.raises(InvalidValue) as info:
        parse_rule(error_rate(threshold=1.5))
    assert str(info.value) == (
        "rule 'api-errors': threshold must be a number from 0 up to (not including) 1, got 1.5"
    )


def test_where_names_the_place() -> None:
    with pytest.raises(InvalidValue, match=r"^\[\[alarms.rules\]\] 'api-errors': window"):
        parse_rule(error_rate(window=0), "[[alarms.rules]]")


@pytest.mark.parametrize("threshold", [0, 0.0, 0.5, 0.999999])
def test_thresholds_from_0_up_to_1(threshold: float) -> None:
    assert parse_rule(error_rate(threshold=threshold)).definition()["threshold"] == threshold


@pytest.mark.parametrize(
    "threshold",
    [1, 1.0, 1.5, -0.1, -1, 10**400, math.nan, math.inf, -math.inf, True, False, "0.2", None],
)
def test_thresholds_refused(threshold: object) -> None:
    with pytest.raises(InvalidValue, match="threshold must be a number from 0 up to"):
        parse_rule(error_rate(threshold=threshold))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"window": 0}, "window must be a whole number of minutes from 1 to 1440, got 0"),
        ({"window": 1441}, "window must be a whole number of minutes from 1 to 1440, got 1441"),
        ({"window": 5.0}, "window must be a whole number of minutes from 1 to 1440, got 5.0"),
        ({"window": True}, "window must be a whole number of minutes from 1 to 1440, got True"),
        ({"min_calls": 0}, "min_calls must be a whole number from 1 up, got 0"),
        ({"min_calls": 1.5}, "min_calls must be a whole number from 1 up, got 1.5"),
        ({"per": "caller"}, 'per must be "module" or "host", got \'caller\''),
        ({"enabled": "yes"}, "enabled must be true or false, got 'yes'"),
        ({"enabled": 1}, "enabled must be true or false, got 1"),
        ({"module": "12"}, 'module must be "" \\(every module\\) or "MODID/CMDID"'),
        ({"module": "a/b"}, 'module must be "" \\(every module\\) or "MODID/CMDID"'),
        ({"module": "4294967296/0"}, "with ids from 0 to 4294967295, got '4294967296/0'"),
        ({"module": "-1/2"}, "got '-1/2'"),
        ({"module": 12}, "got 12"),
        ({"module": None}, "got None"),
    ],
)
def test_error_rate_values_refused(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_rule(error_rate(**keys))
    assert str(info.value).startswith("rule 'api-errors': ")
    assert re.search(message, str(info.value))


def test_windows_at_their_bounds() -> None:
    assert parse_rule(error_rate(window=1)).definition()["window"] == 1
    assert parse_rule(error_rate(window=1440)).definition()["window"] == 1440
    assert parse_rule(error_rate(module="4294967295/0")).definition()["module"] == ("4294967295/0")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"callers": 0}, "callers must be a whole number from 1 up, got 0"),
        ({"callers": True}, "callers must be a whole number from 1 up, got True"),
        ({"window": 0}, "window must be a whole number of minutes from 1 to 1440"),
    ],
)
def test_host_overloaded_values_refused(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidValue, match=f"^rule 'hot': {message}"):
        parse_rule({"name": "hot", "kind": "host_overloaded", **keys})


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"silent": 0}, "silent must be a whole number of minutes from 1 to 10080, got 0"),
        ({"silent": 10081}, "silent must be a whole number of minutes from 1 to 10080"),
        ({"forget": 10}, r"forget must be more minutes than silent \(10\), got 10"),
        ({"forget": 9}, r"forget must be more minutes than silent \(10\), got 9"),
        ({"silent": 1440}, r"forget must be more .* \(1440\), and its default is 1440: set"),
        ({"silent": 1440, "forget": 1440}, r"forget must be .* silent \(1440\), got 1440"),
        ({"forget": 10.5}, "forget must be a whole number of minutes"),
        ({"caller": "10.0.0.256"}, 'caller must be "" \\(every caller\\) or an IPv4 address'),
        ({"caller": "host.example"}, "or an IPv4 address, got 'host.example'"),
        ({"caller": 167772161}, "or an IPv4 address, got 167772161"),
    ],
)
def test_caller_silent_values_refused(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_rule(caller_silent(**keys))
    assert str(info.value).startswith("rule 'quiet': ")
    assert re.search(message, str(info.value))


def test_silent_and_forget_at_their_bounds() -> None:
    rule = parse_rule(caller_silent(silent=1, forget=2))
    assert (rule.definition()["silent"], rule.definition()["forget"]) == (1, 2)
    rule = parse_rule(caller_silent(silent=10080, forget=10081))
    assert rule.definition()["silent"] == 10080


def test_an_unknown_key_is_an_error() -> None:
    with pytest.raises(
        InvalidValue,
        match=r"^rule 'api-errors': unknown key 'treshold' \(keys of error_rate rules: name, "
        r"kind, enabled, module, threshold, window, min_calls, per\)",
    ):
        parse_rule(error_rate(treshold=0.2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (error_rate(caller=""), "'caller' is a key of caller_silent rules, not of error_rate"),
        (error_rate(callers=2), "'callers' is a key of host_overloaded rules, not of error_rate"),
        (caller_silent(module=""), "'module' is a key of error_rate and host_overloaded and "),
        (caller_silent(window=5), "'window' is a key of error_rate and host_overloaded and "),
        (
            {"name": "dead", "kind": "no_healthy_host", "threshold": 0.1},
            "'threshold' is a key of error_rate rules, not of no_healthy_host rules",
        ),
    ],
)
def test_a_key_of_another_kind_is_an_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        parse_rule(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"name": "x", "kind": "latency"},
            "^rule 'x': kind must be one of error_rate, "
            "host_overloaded, no_healthy_host, caller_silent, got 'latency'$",
        ),
        ({"name": "x", "kind": ["error_rate"]}, "^rule 'x': kind must be one of"),
        ({"name": "x"}, r"^rule 'x': kind is missing \(one of error_rate, host_overloaded, "),
        ({"kind": "error_rate"}, "^rule: name is missing$"),
        ({"name": "a b", "kind": "error_rate"}, "^rule: name must be 1 to 64 characters of "),
        ({"name": "", "kind": "error_rate"}, "^rule: name must be 1 to 64"),
        ({"name": "x" * 65, "kind": "error_rate"}, "^rule: name must be 1 to 64"),
        ({"name": 7, "kind": "error_rate"}, "^rule: name must be .*, got 7$"),
        ({"name": "x", "kind": "error_rate"}, "^rule 'x': threshold is missing$"),
        ({"name": "x", "kind": "caller_silent"}, "^rule 'x': silent is missing$"),
    ],
)
def test_kind_and_name(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        parse_rule(data)


def test_names_of_64_allowed_characters() -> None:
    name = ("Az09_.-" * 10)[:64]
    assert parse_rule(error_rate(name=name)).name == name


def test_a_rule_must_be_a_table() -> None:
    with pytest.raises(InvalidValue, match=r"^rule must be a table of keys, got"):
        parse_rule(["error_rate"])  # type: ignore[arg-type]


def test_the_classes_check_their_values_too() -> None:
    with pytest.raises(InvalidValue, match="threshold must be"):
        ErrorRateRule(name="x", threshold=2.0)
    with pytest.raises(InvalidValue, match="module must be None"):
        NoHealthyHostRule(name="x", module=(1, -1))
    with pytest.raises(InvalidValue, match="caller must be None"):
        CallerSilentRule(name="x", silent=1, caller=-5)
    with pytest.raises(InvalidValue, match="name must be"):
        HostOverloadedRule(name="x/y")


# --- writing back ---------------------------------------------------------------------------


def test_definition_writes_every_key() -> None:
    rule = parse_rule(error_rate(module="12/3", per="host"))
    assert rule.definition() == {
        "name": "api-errors",
        "kind": "error_rate",
        "enabled": True,
        "module": "12/3",
        "threshold": 0.2,
        "window": 5,
        "min_calls": 100,
        "per": "host",
    }
    assert parse_rule(caller_silent(caller="10.0.0.9")).definition() == {
        "name": "quiet",
        "kind": "caller_silent",
        "enabled": True,
        "caller": "10.0.0.9",
        "silent": 10,
        "forget": 1440,
    }
    assert parse_rule(caller_silent()).definition()["caller"] == ""


names = st.text("abcXYZ019_.-", min_size=1, max_size=64)
modules = st.one_of(
    st.just(""),
    st.builds("{}/{}".format, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
windows = st.integers(1, 1440)
common = {"name": names, "enabled": st.booleans()}
definitions = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("error_rate"), "threshold": st.floats(0, 1, exclude_max=True)},
        optional={
            **common,
            "module": modules,
            "window": windows,
            "min_calls": st.integers(1, 10**9),
            "per": st.sampled_from(["module", "host"]),
        },
    ),
    st.fixed_dictionaries(
        {"kind": st.just("host_overloaded")},
        optional={**common, "module": modules, "window": windows, "callers": st.integers(1)},
    ),
    st.fixed_dictionaries(
        {"kind": st.just("no_healthy_host")},
        optional={**common, "module": modules, "window": windows},
    ),
    st.integers(1, 10080).flatmap(
        lambda silent: st.fixed_dictionaries(
            {"kind": st.just("caller_silent"), "silent": st.just(silent)}
            | ({"forget": st.integers(silent + 1, 525600)} if silent >= 1440 else {}),
            optional={
                **common,
                "caller": st.one_of(st.just(""), st.ip_addresses(v=4).map(str)),
            }
            | ({} if silent >= 1440 else {"forget": st.integers(silent + 1, 525600)}),
        )
    ),
).map(lambda data: {"name": "r", **data})


@given(definitions)
def test_definitions_round_trip(data: dict[str, Any]) -> None:
    rule = parse_rule(data)
    definition = rule.definition()
    # What was written is kept as written; what was not is written as its default.
    assert {key: definition[key] for key in data} == data
    assert set(definition) == {"kind"} | {f.name for f in attrs.fields(KINDS[data["kind"]])}
    assert parse_rule(definition) == rule
    assert parse_rule(definition).definition() == definition
    assert type(rule) is KINDS[data["kind"]]


# --- describing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (
            error_rate(per="host"),
            "error rate > 20% over 5 min with >= 100 calls, per host, every module",
        ),
        (
            error_rate(threshold=0.055, module="12/3", min_calls=1000, window=15),
            "error rate > 5.5% over 15 min with >= 1,000 calls, per module, module 12/3",
        ),
        (error_rate(threshold=0.00012), "error rate > 0.012% over 5 min"),
        (
            {"name": "hot", "kind": "host_overloaded", "callers": 3, "module": "7/1"},
            "host flagged overloaded by >= 3 callers within 5 min, module 7/1",
        ),
        (
            {"name": "hot", "kind": "host_overloaded"},
            "host flagged overloaded by >= 1 caller within 5 min, every module",
        ),
        (
            {"name": "dead", "kind": "no_healthy_host", "window": 2},
            "no healthy host (each flagged overloaded by a caller within 2 min), every module",
        ),
        (
            caller_silent(caller="10.0.0.9"),
            "caller silent for >= 10 min (no longer watched after 1440 min), caller 10.0.0.9",
        ),
        (caller_silent(enabled=False), "every caller (disabled)"),
    ],
)
def test_describe(data: dict[str, Any], text: str) -> None:
    assert text in parse_rule(data).describe()


def test_describe_is_one_line_starting_as_shown() -> None:
    assert parse_rule(error_rate()).describe().startswith("error rate > 20% over 5 min")
    assert "\n" not in parse_rule(caller_silent()).describe()


def test_rules_by_name_refuses_two_of_one_name() -> None:
    a = parse_rule(error_rate())
    b = parse_rule(caller_silent(name="api-errors"))
    assert rules_by_name([a]) == {"api-errors": a}
    with pytest.raises(InvalidValue, match="two alarm rules are named 'api-errors'"):
        rules_by_name([a, b])
