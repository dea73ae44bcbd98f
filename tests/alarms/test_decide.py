"""The alarm state machine (:func:`lars.alarms.evaluate.decide`): each row of its table,
the notifications and their damping, rules that go away."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st

from lars.alarms.evaluate import Observation, decide
from lars.alarms.rules import CallerSilentRule, ErrorRateRule, Rule
from lars.store.base import AlarmDecision, AlarmEvent, AlarmState

RULE = ErrorRateRule(name="api-errors", threshold=0.2, per="host")
RULES: list[Rule] = [RULE]
SUBJECT = "12/3 10.0.0.1:80"
KEY = ("api-errors", SUBJECT)
T0 = 1_700_000_000.0
RESEND = 300.0


def observe(breaching: bool, value: float | None = 0.5) -> Observation:
    return Observation(
        rule="api-errors",
        subject=SUBJECT,
        kind="error_rate",
        breaching=breaching,
        value=value,
        threshold=0.2,
        summary=f"summary of {value}",
        modid=12,
        cmdid=3,
        host="10.0.0.1:80",
    )


def state(firing: bool, **fields: Any) -> AlarmState:
    values: dict[str, Any] = {
        "rule": "api-errors",
        "subject": SUBJECT,
        "kind": "error_rate",
        "firing": firing,
        "since": T0 - 1000,
        "value": 0.5 if firing else 0.1,
        "threshold": 0.2,
        "modid": 12,
        "cmdid": 3,
        "host": "10.0.0.1:80",
        "updated": T0 - 1000,
        "notified_firing": firing,
        "notified_at": T0 - 1000,
    }
    values.update(fields)
    return AlarmState(**values)


def run(
    states: Sequence[AlarmState],
    observations: Sequence[Observation] = (),
    now: float = T0,
    rules: Sequence[Rule] = RULES,
) -> tuple[AlarmDecision, list[dict[str, Any]]]:
    return decide(rules, states, {o.key: o for o in observations}, now, RESEND)


def event(firing: bool, value: float | None, ts: float = T0) -> AlarmEvent:
    return AlarmEvent(
        id=0,
        ts=ts,
        rule="api-errors",
        subject=SUBJECT,
        kind="error_rate",
        firing=firing,
        value=value,
        threshold=0.2,
        modid=12,
        cmdid=3,
        host="10.0.0.1:80",
    )


# --- the transitions, row by row ------------------------------------------------------------


def test_none_and_breaching_fires_and_notifies_at_once() -> None:
    decision, notes = run([], [observe(True, 0.52)])
    assert decision == AlarmDecision(
        states=(
            state(
                True,
                since=T0,
                value=0.52,
                updated=T0,
                notified_firing=True,
                notified_at=T0,
            ),
        ),
        events=(event(True, 0.52),),
    )
    assert notes == [
        {
            "source": "lars",
            "alarm": "api-errors",
            "kind": "error_rate",
            "state": "firing",
            "subject": SUBJECT,
            "module": "12/3",
            "modid": 12,
            "cmdid": 3,
            "host": "10.0.0.1:80",
            "caller": None,
            "value": 0.52,
            "threshold": 0.2,
            "since": T0,
            "ts": T0,
            "summary": "summary of 0.52",
        }
    ]


def test_none_and_breaching_notifies_even_at_a_small_clock() -> None:
    # notified_at starts at 0: "never notified" must not wait for resend_interval.
    _decision, notes = run([], [observe(True)], now=10.0)
    assert [n["state"] for n in notes] == ["firing"]


def test_none_and_not_breaching_writes_nothing() -> None:
    assert run([], [observe(False)]) == (AlarmDecision(), [])
    assert run([]) == (AlarmDecision(), [])


def test_resolved_and_breaching_fires_again() -> None:
    decision, notes = run([state(False)], [observe(True, 0.7)])
    new = state(True, since=T0, value=0.7, updated=T0, notified_firing=True, notified_at=T0)
    assert decision == AlarmDecision(states=(new,), events=(event(True, 0.7),))
    assert [(n["state"], n["value"], n["since"]) for n in notes] == [("firing", 0.7, T0)]


def test_resolved_and_not_breaching_is_unchanged() -> None:
    assert run([state(False)], [observe(False)]) == (AlarmDecision(), [])
    assert run([state(False)]) == (AlarmDecision(), [])


def test_firing_and_breaching_is_unchanged() -> None:
    # The value is not refreshed every round: a quiet round writes nothing.
    assert run([state(True)], [observe(True, 0.9)]) == (AlarmDecision(), [])


def test_firing_and_not_breaching_resolves_with_the_value() -> None:
    decision, notes = run([state(True)], [observe(False, 0.05)])
    new = state(False, since=T0, value=0.05, updated=T0, notified_firing=False, notified_at=T0)
    assert decision == AlarmDecision(states=(new,), events=(event(False, 0.05),))
    assert [(n["state"], n["value"], n["summary"]) for n in notes] == [
        ("resolved", 0.05, "summary of 0.05")
    ]


def test_firing_and_absent_resolves_without_a_value() -> None:
    decision, notes = run([state(True)])
    new = state(False, since=T0, value=None, updated=T0, notified_firing=False, notified_at=T0)
    assert decision == AlarmDecision(states=(new,), events=(event(False, None),))
    assert [(n["state"], n["value"]) for n in notes] == [("resolved", None)]
    assert notes[0]["summary"] == f"{SUBJECT}: no longer breaching 'api-errors'"


# --- rules that go away ---------------------------------------------------------------------


def test_a_removed_rule_deletes_a_firing_alarm_and_resolves_it_at_once() -> None:
    # Even within resend_interval of the last notification: nothing would ever resolve it.
    decision, notes = run([state(True, notified_at=T0 - 1)], rules=[])
    assert decision == AlarmDecision(deleted=(KEY,), events=(event(False, None),))
    assert len(notes) == 1
    assert notes[0] | {"summary": ""} == {
        "source": "lars",
        "alarm": "api-errors",
        "kind": "error_rate",
        "state": "resolved",
        "subject": SUBJECT,
        "module": "12/3",
        "modid": 12,
        "cmdid": 3,
        "host": "10.0.0.1:80",
        "caller": None,
        "value": None,
        "threshold": 0.2,
        "since": T0,
        "ts": T0,
        "summary": "",
    }
    assert notes[0]["summary"] == f"{SUBJECT}: no longer watched, the rule 'api-errors' was removed"


def test_a_disabled_rule_deletes_its_alarms() -> None:
    disabled = attrs.evolve(RULE, enabled=False)
    decision, notes = run([state(True)], [observe(True)], rules=[disabled])
    assert decision == AlarmDecision(deleted=(KEY,), events=(event(False, None),))
    assert notes[0]["summary"].endswith("the rule 'api-errors' was disabled")


def test_a_rule_of_another_kind_deletes_the_old_alarms() -> None:
    other = CallerSilentRule(name="api-errors", silent=5)
    decision, notes = run([state(True)], rules=[other])
    assert decision.deleted == (KEY,)
    assert notes[0]["summary"].endswith("the rule 'api-errors' is now of kind caller_silent")


def test_a_key_is_never_deleted_and_written_in_one_decision() -> None:
    # The rule now watches modules; an old host alarm of the same key goes this round, and
    # the new alarm starts in the next.
    per_module = ErrorRateRule(name="api-errors", threshold=0.2)
    old = state(True, kind="host_overloaded")
    decision, _notes = run([old], [observe(True)], rules=[per_module])
    assert decision.deleted == (KEY,)
    assert decision.states == ()
    decision, _notes = run([], [observe(True)], rules=[per_module])
    assert [s.key for s in decision.states] == [KEY]


def test_a_removed_rule_deletes_a_resolved_alarm_quietly() -> None:
    assert run([state(False)], rules=[]) == (AlarmDecision(deleted=(KEY,)), [])


def test_a_removed_rule_resolves_a_held_resolution() -> None:
    # Resolved, but the webhook was last told "firing" (the resolution was held back).
    held = state(False, notified_firing=True, notified_at=T0 - 10)
    decision, notes = run([held], rules=[])
    assert decision == AlarmDecision(deleted=(KEY,))
    assert [n["state"] for n in notes] == ["resolved"]


def test_a_removed_rule_firing_but_never_notified_writes_the_event_only() -> None:
    never = state(True, notified_firing=None, notified_at=0.0)
    assert run([never], rules=[]) == (
        AlarmDecision(deleted=(KEY,), events=(event(False, None),)),
        [],
    )


def test_an_observation_of_an_unknown_or_disabled_rule_is_ignored() -> None:
    assert run([], [observe(True)], rules=[]) == (AlarmDecision(), [])
    disabled = attrs.evolve(RULE, enabled=False)
    assert run([], [observe(True)], rules=[disabled]) == (AlarmDecision(), [])


# --- notifications and their damping -------------------------------------------------------


def test_a_resolution_soon_after_a_send_is_held() -> None:
    fired = state(True, notified_at=T0 - 10)
    decision, notes = run([fired], [observe(False, 0.1)])
    assert notes == []
    (new,) = decision.states
    assert (new.firing, new.notified_firing, new.notified_at) == (False, True, T0 - 10)
    assert decision.events == (event(False, 0.1),)  # the history is not damped


def test_a_held_resolution_goes_out_once_the_interval_has_passed() -> None:
    held = state(False, since=T0 - 5, value=0.1, notified_firing=True, notified_at=T0 - 10)
    assert run([held], [observe(False, 0.1)], now=T0 - 10 + RESEND - 0.001) == (
        AlarmDecision(),
        [],
    )
    later = T0 - 10 + RESEND
    decision, notes = run([held], [observe(False, 0.08)], now=later)
    assert decision == AlarmDecision(
        states=(attrs.evolve(held, notified_firing=False, notified_at=later, updated=later),)
    )
    assert [(n["state"], n["since"], n["value"], n["ts"]) for n in notes] == [
        ("resolved", T0 - 5, 0.08, later)
    ]


def test_a_held_resolution_without_an_observation_carries_the_stored_value() -> None:
    held = state(False, since=T0 - 5, value=0.1, notified_firing=True, notified_at=T0 - RESEND)
    _decision, notes = run([held])
    assert [(n["state"], n["value"]) for n in notes] == [("resolved", 0.1)]


def test_fire_resolve_fire_within_the_interval_sends_nothing_more() -> None:
    fired = state(True, notified_at=T0 - 20)
    decision, notes = run([fired], [observe(False)], now=T0 - 10)
    assert notes == []
    (resolved,) = decision.states
    decision, notes = run([resolved], [observe(True, 0.6)], now=T0)
    assert notes == []
    (again,) = decision.states
    assert (again.firing, again.since, again.notified_firing, again.notified_at) == (
        True,
        T0,
        True,
        T0 - 20,
    )
    assert decision.events == (event(True, 0.6),)
    # ... and once the interval has passed, nothing is due: the webhook knows it fires.
    assert run([again], [observe(True)], now=T0 + RESEND) == (AlarmDecision(), [])


def test_a_firing_after_a_resolve_notification_is_held_then_sent() -> None:
    resolved = state(False, notified_firing=False, notified_at=T0 - 10)
    decision, notes = run([resolved], [observe(True, 0.4)])
    assert notes == []
    (firing,) = decision.states
    assert (firing.firing, firing.notified_firing) == (True, False)
    later = T0 - 10 + RESEND
    decision, notes = run([firing], [observe(True, 0.45)], now=later)
    assert [(n["state"], n["since"], n["value"]) for n in notes] == [("firing", T0, 0.45)]
    assert decision.states == (
        attrs.evolve(firing, notified_firing=True, notified_at=later, updated=later),
    )


def test_a_resolution_never_notified_sends_nothing() -> None:
    never = state(True, notified_firing=None, notified_at=0.0)
    decision, notes = run([never], [observe(False)])
    assert notes == []
    (resolved,) = decision.states
    assert (resolved.firing, resolved.notified_firing) == (False, None)
    assert run([resolved], now=T0 + 10 * RESEND) == (AlarmDecision(), [])


def test_only_changed_states_are_written() -> None:
    quiet = [state(True, subject=f"12/3 10.0.0.{n}:80") for n in range(2, 50)]
    observations = [attrs.evolve(observe(True), subject=s.subject) for s in quiet]
    decision, notes = run([*quiet, state(True)], observations)
    assert [s.subject for s in decision.states] == [SUBJECT]
    assert [n["subject"] for n in notes] == [SUBJECT]


def test_caller_alarm_notification_fields() -> None:
    rule = CallerSilentRule(name="quiet", silent=10)
    observation = Observation(
        rule="quiet",
        subject="caller 10.0.0.9",
        kind="caller_silent",
        breaching=True,
        value=12.5,
        threshold=10,
        summary="caller 10.0.0.9 silent for 12.5 min (>= 10 min)",
        caller="10.0.0.9",
    )
    decision, notes = decide([rule], [], {observation.key: observation}, T0, RESEND)
    (note,) = notes
    assert (note["module"], note["modid"], note["host"], note["caller"]) == (
        None,
        None,
        None,
        "10.0.0.9",
    )
    assert decision.states[0].caller == "10.0.0.9"


# --- a property: the webhook always ends up told the truth, at most once per interval -------


def apply(states: dict[tuple[str, str], AlarmState], decision: AlarmDecision) -> None:
    for key in decision.deleted:
        del states[key]
    for new in decision.states:
        states[new.key] = new


steps = st.lists(
    st.tuples(
        st.floats(0.5, 2 * RESEND),  # seconds since the previous round
        st.sampled_from(["breaching", "not breaching", "absent"]),
    ),
    min_size=1,
    max_size=40,
)


@given(steps)
def test_notifications_alternate_are_damped_and_end_on_the_present_state(
    rounds: list[tuple[float, str]],
) -> None:
    states: dict[tuple[str, str], AlarmState] = {}
    sent: list[dict[str, Any]] = []
    events: list[AlarmEvent] = []
    now = T0
    condition = "absent"
    for wait, condition in rounds:
        now += wait
        observations = [] if condition == "absent" else [observe(condition == "breaching")]
        decision, notes = run(list(states.values()), observations, now=now)
        apply(states, decision)
        sent += notes
        events += decision.events
    # Let the present state hold for one more interval.
    observations = [] if condition == "absent" else [observe(condition == "breaching")]
    decision, notes = run(list(states.values()), observations, now=now + RESEND)
    apply(states, decision)
    sent += notes

    # Notifications alternate, starting with "firing"...
    assert [n["state"] for n in sent] == ["firing", "resolved"] * (len(sent) // 2) + (
        ["firing"] * (len(sent) % 2)
    )
    # ... at most one per resend interval ...
    times = [n["ts"] for n in sent]
    assert all(b - a >= RESEND for a, b in itertools.pairwise(times))
    # ... and once things hold still, the webhook believes what is true.
    firing = condition == "breaching"
    assert (sent[-1]["state"] == "firing" if sent else False) == firing
    # Every transition is in the history, alternating too.
    assert [e.firing for e in events] == [True, False] * (len(events) // 2) + (
        [True] * (len(events) % 2)
    )
    assert bool(states) == bool(events)
