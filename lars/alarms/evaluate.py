"""Alarm evaluation and the alarm state machine. Pure: no I/O, the clock is passed in.

One round of the web role, with the lease (DESIGN.md §11):

1. :func:`needs` says what to read from the store for the enabled rules;
2. the role reads it into an :class:`AlarmData`;
3. :func:`evaluate` turns rules and data into :class:`Observation` s: every subject that
   breaches a rule, and the present value of every alarm that is firing (``watch``), so a
   resolution carries the value that ended it. Subjects that breach nothing are never
   materialised: there may be 200,000 modules and nearly all of them are fine;
4. in the store's lease transaction, :func:`decide` compares the observations with the
   stored :class:`~lars.store.base.AlarmState` rows and returns what to write and the
   webhook notifications to send.

An alarm is one rule applied to one subject, keyed by ``(rule name, subject)``. Subjects
are written ``"12/3"`` (a module), ``"12/3 10.0.0.1:80"`` (a host of a module) and
``"caller 10.0.0.9"``.

The state machine (:func:`decide`), one alarm at a time; "obs" is the round's observation
of the alarm (absent when :func:`evaluate` did not produce one). Each row is tested by
name in ``tests/alarms/test_decide.py``::

    stored state  obs                     new stored state        event
    ------------  ----------------------  ----------------------  ------------------------
    none          breaching               firing since now        firing
    none          absent / not breaching  none (nothing written)  -
    resolved      breaching               firing since now        firing
    resolved      absent / not breaching  unchanged               -
    firing        breaching               unchanged               -
    firing        absent / not breaching  resolved since now      resolved
    any           (its rule is removed,   deleted                 resolved, if it was
                  disabled, or now of                             firing
                  another kind)

A transition records the observation's value and threshold (a resolution without an
observation records value None). "Unchanged" really means unchanged: a firing alarm's row
is not rewritten each round with its latest value, so a quiet round writes nothing.

Notifications, after the transitions, for each alarm still stored:

* ``firing != notified_firing`` and ``now - notified_at >= resend_interval`` -> notify
  the present state; the row records ``notified_firing = firing, notified_at = now``.
* never notified (``notified_firing`` None): a firing alarm is notified at once; a
  resolved one sends nothing (nobody heard it fire).
* a deleted alarm whose last notification said firing -> notify "resolved" at once, with
  value None (the receiver must not be left with an alarm nobody will ever resolve).

This is the flap damping. The webhook hears of an alarm at most once per
``resend_interval``, whatever the alarm does in between, and always ends up with the
present state: a change held back is sent once the interval has passed, if it still holds
then. So the first firing goes out at once; a resolution shortly after is held until
``resend_interval`` after that send; a fire, resolve and fire again within the interval
sends nothing more (the receiver already believes it firing, which is true). Hysteresis
on the thresholds would do this per rule and need a second number on every rule; damping
the notifications needs one setting and cannot lose the final state. The history
(``AlarmEvent``) is not damped: every transition is written.

Only rows that change are written: a transition, or the notification bookkeeping.

A rule redefined with another kind under the same name loses its old alarms in one round;
a new alarm of the same key starts in the next (a key is never both deleted and written by
one decision).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs

from lars.alarms.rules import (
    CallerSilentRule,
    ErrorRateRule,
    HostOverloadedRule,
    ModuleRule,
    NoHealthyHostRule,
    Rule,
    format_module,
    rules_by_name,
)
from lars.core.model import HostKey, ModuleKey, format_host, int_to_ip, ip_to_int
from lars.errors import InvalidValue
from lars.store.base import AlarmDecision, AlarmEvent, AlarmState, CallStatus, HostCalls

#: Seconds in a minute: the width of a ``CallHistory`` bucket, and the unit of windows.
MINUTE = 60


# --- time windows ---------------------------------------------------------------------------


def window_start(now: float, minutes: int) -> int:
    """The first ``CallHistory`` minute (epoch seconds) of a window of ``minutes`` ending
    at ``now``: the current, partial minute and the ``minutes - 1`` whole ones before it.

    Counting the partial minute keeps an alarm as fresh as the last report; the price is a
    window that is up to one minute short of ``minutes`` early in each minute.
    """
    current = math.floor(now / MINUTE) * MINUTE
    return current - (minutes - 1) * MINUTE


def fresh_since(now: float, minutes: int) -> int:
    """The oldest ``ServerCallStatus.ts`` (whole seconds) that is at most ``minutes`` old
    at ``now``: a row counts when ``ts >= now - minutes * 60``."""
    return math.ceil(now - minutes * MINUTE)


@attrs.frozen
class DataNeeds:
    """What one round must read from the store for the enabled rules."""

    #: For the error-rate rules: the window starts to read ``window_calls`` from.
    window_starts: frozenset[int] = frozenset()
    #: For the overload rules: read the rows flagged overloaded with ``ts`` at or after
    #: this (the oldest any rule needs); None when no rule needs them.
    overloaded_since: int | None = None
    #: The routes (the overload rules only count hosts in a module's route).
    routes: bool = False
    #: Each caller's newest report (the caller rules).
    callers: bool = False


def needs(rules: Iterable[Rule], now: float) -> DataNeeds:
    """What to read for ``rules`` at ``now``; disabled rules need nothing."""
    starts: set[int] = set()
    since: int | None = None
    routes = callers = False
    for rule in rules:
        if not rule.enabled:
            continue
        if isinstance(rule, ErrorRateRule):
            starts.add(window_start(now, rule.window))
        elif isinstance(rule, HostOverloadedRule | NoHealthyHostRule):
            oldest = fresh_since(now, rule.window)
            since = oldest if since is None else min(since, oldest)
            routes = True
        elif isinstance(rule, CallerSilentRule):
            callers = True
    return DataNeeds(frozenset(starts), since, routes, callers)


@attrs.frozen
class AlarmData:
    """What the store said, for one round at ``now`` (epoch seconds)."""

    now: float
    #: Window start (:func:`window_start`) -> every host's calls from then on, summed
    #: over callers (``RouteStore.window_calls``).
    window_calls: Mapping[int, Sequence[HostCalls]] = attrs.field(factory=dict)
    #: Rows flagged overloaded, reported at ``DataNeeds.overloaded_since`` or later
    #: (``RouteStore.overloaded_status``); each rule keeps the ones fresh for it.
    overloaded: Sequence[CallStatus] = ()
    #: Each module's hosts. Sets make the "is it in the route" test cheap.
    routes: Mapping[ModuleKey, Collection[HostKey]] = attrs.field(factory=dict)
    #: Caller (IPv4 as an integer) -> its newest report's ``ts``.
    caller_last: Mapping[int, int] = attrs.field(factory=dict)


# --- subjects -------------------------------------------------------------------------------


def module_subject(module: ModuleKey) -> str:
    """``"12/3"``."""
    return format_module(module)


def host_subject(module: ModuleKey, host: HostKey) -> str:
    """``"12/3 10.0.0.1:80"``."""
    return f"{format_module(module)} {format_host(host)}"


def caller_subject(caller: int) -> str:
    """``"caller 10.0.0.9"``."""
    return f"caller {int_to_ip(caller)}"


_MODULE_SUBJECT = re.compile(r"([0-9]{1,10})/([0-9]{1,10})")
_HOST_SUBJECT = re.compile(r"([0-9]{1,10})/([0-9]{1,10}) ([0-9.]{7,15}):([0-9]{1,5})")


def _module_of(subject: str) -> ModuleKey | None:
    match = _MODULE_SUBJECT.fullmatch(subject)
    return (int(match[1]), int(match[2])) if match else None


def _host_of(subject: str) -> tuple[ModuleKey, HostKey] | None:
    match = _HOST_SUBJECT.fullmatch(subject)
    if match is None:
        return None
    try:
        ip = ip_to_int(match[3])
    except InvalidValue:
        return None
    return (int(match[1]), int(match[2])), (ip, int(match[4]))


def _caller_of(subject: str) -> int | None:
    prefix, _, address = subject.partition(" ")
    if prefix != "caller":
        return None
    try:
        return ip_to_int(address)
    except InvalidValue:
        return None


# --- observations ---------------------------------------------------------------------------


@attrs.frozen
class Observation:
    """What one rule saw of one subject this round."""

    #: The rule's name.
    rule: str
    subject: str
    kind: str
    breaching: bool
    #: The measure the rule compares (an error rate, a number of callers, healthy hosts,
    #: minutes of silence); None when there is nothing to measure.
    value: float | None
    threshold: float
    #: One line for people (the notification's ``summary``).
    summary: str
    modid: int | None = None
    cmdid: int | None = None
    #: ``"ip:port"`` of a host subject.
    host: str | None = None
    #: Dotted IPv4 of a caller subject.
    caller: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """``(rule, subject)``: the alarm's key."""
        return (self.rule, self.subject)


def _observe(
    rule: Rule,
    subject: str,
    breaching: bool,
    value: float | None,
    threshold: float,
    summary: str,
    *,
    module: ModuleKey | None = None,
    host: HostKey | None = None,
    caller: int | None = None,
) -> Observation:
    return Observation(
        rule=rule.name,
        subject=subject,
        kind=rule.kind,
        breaching=breaching,
        value=value,
        threshold=threshold,
        summary=summary,
        modid=None if module is None else module[0],
        cmdid=None if module is None else module[1],
        host=None if host is None else format_host(host),
        caller=None if caller is None else int_to_ip(caller),
    )


def _in_scope(rule: ModuleRule, module: ModuleKey) -> bool:
    return rule.module is None or rule.module == module


def _percent(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _minutes(seconds: float) -> str:
    return f"{seconds / MINUTE:,.1f} min"


def evaluate(
    rules: Iterable[Rule], data: AlarmData, watch: Collection[tuple[str, str]] = ()
) -> dict[tuple[str, str], Observation]:
    """Every breaching subject of every enabled rule, and an observation of each alarm in
    ``watch`` (the firing ones) that is not breaching, with its present value when it can
    be measured (else None). Keyed by ``(rule name, subject)``.

    ``data`` must hold what :func:`needs` asked for at ``data.now``: an error-rate rule
    whose window start is missing from ``data.window_calls`` is a ``KeyError``, not a
    window without calls (that would resolve every error-rate alarm).
    """
    watched: dict[str, list[str]] = defaultdict(list)
    for name, subject in watch:
        watched[name].append(subject)
    found: dict[tuple[str, str], Observation] = {}
    for rule in rules:
        if not rule.enabled:
            continue
        if isinstance(rule, ErrorRateRule):
            observations = _error_rate(rule, data, watched.get(rule.name, ()))
        elif isinstance(rule, HostOverloadedRule):
            observations = _host_overloaded(rule, data, watched.get(rule.name, ()))
        elif isinstance(rule, NoHealthyHostRule):
            observations = _no_healthy_host(rule, data, watched.get(rule.name, ()))
        elif isinstance(rule, CallerSilentRule):
            observations = _caller_silent(rule, data, watched.get(rule.name, ()))
        else:
            raise TypeError(f"not an alarm rule: {rule!r}")
        for observation in observations:
            found[observation.key] = observation
    return found


#: What an error rate is measured on: a module, with a host for per-host rules.
_Target = tuple[ModuleKey, HostKey | None]


def _not_watched(rule: Rule, subject: str, threshold: float) -> Observation:
    """A watched alarm whose subject the rule no longer covers (its scope changed, the
    subject does not parse): not breaching, nothing to measure."""
    return _observe(
        rule, subject, False, None, threshold, f"{subject} is no longer watched by {rule.name!r}"
    )


def _error_rate(rule: ErrorRateRule, data: AlarmData, watched: Sequence[str]) -> list[Observation]:
    per_host = rule.per == "host"
    sums: dict[_Target, list[int]] = {}
    for row in data.window_calls[window_start(data.now, rule.window)]:
        module = (row.modid, row.cmdid)
        if not _in_scope(rule, module):
            continue
        target = (module, (row.ip, row.port) if per_host else None)
        total = sums.get(target)
        if total is None:
            sums[target] = [row.succ, row.err]
        else:
            total[0] += row.succ
            total[1] += row.err

    def subject_of(target: _Target) -> str:
        module, host = target
        return module_subject(module) if host is None else host_subject(module, host)

    def observe(target: _Target, subject: str, succ: int, err: int) -> Observation:
        calls = succ + err
        rate = err / calls if calls else None
        breaching = rate is not None and calls >= rule.min_calls and rate > rule.threshold
        over = f"over {rule.window} min"
        if rate is None:
            summary = f"no calls {over} on {subject}"
        elif calls < rule.min_calls:
            summary = (
                f"error rate {_percent(rate)} {over} on only {_plural(calls, 'call')} "
                f"(< {rule.min_calls:,}) on {subject}"
            )
        else:
            compare = ">" if breaching else "<="
            summary = (
                f"error rate {_percent(rate)} {compare} {_percent(rule.threshold)} {over} "
                f"({_plural(calls, 'call')}) on {subject}"
            )
        module, host = target
        return _observe(
            rule, subject, breaching, rate, rule.threshold, summary, module=module, host=host
        )

    found = []
    breaching = set()
    for target, (succ, err) in sums.items():
        calls = succ + err
        if calls >= rule.min_calls and err / calls > rule.threshold:
            subject = subject_of(target)
            breaching.add(subject)
            found.append(observe(target, subject, succ, err))
    for subject in watched:
        if subject in breaching:
            continue
        parsed: _Target | None
        if per_host:
            parsed = _host_of(subject)
        else:
            whole = _module_of(subject)
            parsed = None if whole is None else (whole, None)
        if parsed is None or not _in_scope(rule, parsed[0]):
            found.append(_not_watched(rule, subject, rule.threshold))
        else:
            succ, err = sums.get(parsed, (0, 0))
            found.append(observe(parsed, subject, succ, err))
    return found


def _fresh_flags(
    rule: HostOverloadedRule | NoHealthyHostRule, data: AlarmData
) -> dict[tuple[ModuleKey, HostKey], set[int]]:
    """The hosts in their module's route (and the rule's scope) flagged overloaded in a
    report fresh for the rule, each with the callers that flag it."""
    since = data.now - rule.window * MINUTE
    flags: dict[tuple[ModuleKey, HostKey], set[int]] = defaultdict(set)
    for row in data.overloaded:
        if not row.overload or row.ts < since:
            continue
        module = (row.modid, row.cmdid)
        host = (row.ip, row.port)
        if _in_scope(rule, module) and host in data.routes.get(module, ()):
            flags[module, host].add(row.caller)
    return flags


def _host_overloaded(
    rule: HostOverloadedRule, data: AlarmData, watched: Sequence[str]
) -> list[Observation]:
    flags = _fresh_flags(rule, data)
    within = f"within {rule.window} min"

    def observe(module: ModuleKey, host: HostKey, subject: str, count: int) -> Observation:
        breaching = count >= rule.callers
        compare = ">=" if breaching else "<"
        summary = (
            f"{subject} flagged overloaded by {_plural(count, 'caller')} "
            f"({compare} {rule.callers:,}) {within}"
        )
        return _observe(
            rule, subject, breaching, count, rule.callers, summary, module=module, host=host
        )

    found = []
    breaching = set()
    for (module, host), callers in flags.items():
        if len(callers) >= rule.callers:
            subject = host_subject(module, host)
            breaching.add(subject)
            found.append(observe(module, host, subject, len(callers)))
    for subject in watched:
        if subject in breaching:
            continue
        parsed = _host_of(subject)
        if parsed is None or not _in_scope(rule, parsed[0]):
            found.append(_not_watched(rule, subject, rule.callers))
            continue
        module, host = parsed
        if host not in data.routes.get(module, ()):
            summary = f"{subject} is no longer in the route"
            found.append(
                _observe(
                    rule, subject, False, None, rule.callers, summary, module=module, host=host
                )
            )
        else:
            found.append(observe(module, host, subject, len(flags.get(parsed, ()))))
    return found


def _no_healthy_host(
    rule: NoHealthyHostRule, data: AlarmData, watched: Sequence[str]
) -> list[Observation]:
    # Only a module with a flagged host can have no healthy host: count those alone.
    unhealthy: dict[ModuleKey, int] = defaultdict(int)
    for module, _host in _fresh_flags(rule, data):
        unhealthy[module] += 1
    within = f"within {rule.window} min"

    def observe(module: ModuleKey, subject: str) -> Observation:
        hosts = len(data.routes.get(module, ()))
        if not hosts:
            summary = f"{subject} has no host in its route"
            return _observe(rule, subject, False, None, 0, summary, module=module)
        healthy = hosts - unhealthy.get(module, 0)
        if healthy:
            summary = f"{healthy:,} of {_plural(hosts, 'host')} healthy in the route of {subject}"
        else:
            summary = (
                f"no healthy host among {hosts:,} in the route of {subject} "
                f"(each flagged overloaded {within})"
            )
        return _observe(rule, subject, healthy == 0, healthy, 0, summary, module=module)

    found = []
    breaching = set()
    for module, count in unhealthy.items():
        if count >= len(data.routes.get(module, ())):  # flagged hosts are in the route
            subject = module_subject(module)
            breaching.add(subject)
            found.append(observe(module, subject))
    for subject in watched:
        if subject in breaching:
            continue
        parsed = _module_of(subject)
        if parsed is None or not _in_scope(rule, parsed):
            found.append(_not_watched(rule, subject, 0))
        else:
            found.append(observe(parsed, subject))
    return found


def _caller_silent(
    rule: CallerSilentRule, data: AlarmData, watched: Sequence[str]
) -> list[Observation]:
    def observe(caller: int, subject: str) -> Observation:
        last = data.caller_last.get(caller)
        if last is None:
            summary = f"{subject} has no report"
            return _observe(rule, subject, False, None, rule.silent, summary, caller=caller)
        silent = max(0.0, data.now - last)
        if silent > rule.forget * MINUTE:
            summary = (
                f"{subject} silent for {_minutes(silent)} (> {rule.forget:,} min): "
                f"no longer watched"
            )
            return _observe(rule, subject, False, None, rule.silent, summary, caller=caller)
        breaching = silent >= rule.silent * MINUTE
        if breaching:
            summary = f"{subject} silent for {_minutes(silent)} (>= {rule.silent:,} min)"
        else:
            summary = f"{subject} reported {_minutes(silent)} ago (< {rule.silent:,} min)"
        value = silent / MINUTE
        return _observe(rule, subject, breaching, value, rule.silent, summary, caller=caller)

    found = []
    breaching = set()
    callers = data.caller_last if rule.caller is None else (rule.caller,)
    for caller in callers:
        last = data.caller_last.get(caller)
        if last is None:
            continue
        silent = data.now - last
        if rule.silent * MINUTE <= silent <= rule.forget * MINUTE:
            subject = caller_subject(caller)
            breaching.add(subject)
            found.append(observe(caller, subject))
    for subject in watched:
        if subject in breaching:
            continue
        parsed = _caller_of(subject)
        if parsed is None or (rule.caller is not None and parsed != rule.caller):
            found.append(_not_watched(rule, subject, rule.silent))
        else:
            found.append(observe(parsed, subject))
    return found


# --- the state machine ----------------------------------------------------------------------


def decide(
    rules: Iterable[Rule],
    states: Sequence[AlarmState],
    observations: Mapping[tuple[str, str], Observation],
    now: float,
    resend_interval: float,
) -> tuple[AlarmDecision, list[dict[str, Any]]]:
    """The round's writes and webhook notifications, from the stored ``states`` (every
    ``AlarmState`` row) and :func:`evaluate`'s ``observations``, by the table in this
    module's docstring. Written states carry ``updated = now``.

    Called in the store's lease transaction: it does no I/O, and the notifications are
    sent only once that transaction has committed, so an alarm is notified once however
    many web instances run.
    """
    by_name = rules_by_name(rules)
    writes: list[AlarmState] = []
    deleted: list[tuple[str, str]] = []
    events: list[AlarmEvent] = []
    notes: list[dict[str, Any]] = []
    stored: set[tuple[str, str]] = set()

    for state in states:
        stored.add(state.key)
        rule = by_name.get(state.rule)
        gone = _why_gone(state, rule)
        if gone is not None:
            deleted.append(state.key)
            if state.firing:
                events.append(_event(state, now, firing=False, value=None))
            if state.notified_firing:
                summary = f"{state.subject}: no longer watched, {gone}"
                notes.append(_notification(state, now, False, None, now, summary))
            continue
        observation = observations.get(state.key)
        new = state
        if observation is not None and observation.breaching:
            if not state.firing:
                new = _transition(state, observation, now)
                events.append(_event(new, now, firing=True, value=new.value))
        elif state.firing:
            new = attrs.evolve(
                state,
                firing=False,
                since=now,
                value=None if observation is None else observation.value,
                threshold=state.threshold if observation is None else observation.threshold,
            )
            events.append(_event(new, now, firing=False, value=new.value))
        new = _notify(new, observation, now, resend_interval, notes)
        if new != state:
            writes.append(attrs.evolve(new, updated=now))

    for key, observation in observations.items():
        if key in stored or not observation.breaching:
            continue
        rule = by_name.get(observation.rule)
        if rule is None or not rule.enabled or rule.kind != observation.kind:
            continue
        new = _transition(None, observation, now)
        events.append(_event(new, now, firing=True, value=new.value))
        writes.append(_notify(new, observation, now, resend_interval, notes))

    decision = AlarmDecision(tuple(writes), tuple(deleted), tuple(events))
    return decision, notes


def _why_gone(state: AlarmState, rule: Rule | None) -> str | None:
    """Why a stored alarm's rule no longer applies to it, or None if it does."""
    if rule is None:
        return f"the rule {state.rule!r} was removed"
    if not rule.enabled:
        return f"the rule {state.rule!r} was disabled"
    if rule.kind != state.kind:
        return f"the rule {state.rule!r} is now of kind {rule.kind}"
    return None


def _transition(state: AlarmState | None, observation: Observation, now: float) -> AlarmState:
    """The alarm firing since ``now`` (a new one, or ``state`` firing again)."""
    fields: dict[str, Any] = {
        "firing": True,
        "since": now,
        "value": observation.value,
        "threshold": observation.threshold,
        "modid": observation.modid,
        "cmdid": observation.cmdid,
        "host": observation.host,
        "caller": observation.caller,
        "updated": now,
    }
    if state is not None:
        return attrs.evolve(state, **fields)
    return AlarmState(
        rule=observation.rule, subject=observation.subject, kind=observation.kind, **fields
    )


def _event(state: AlarmState, now: float, *, firing: bool, value: float | None) -> AlarmEvent:
    return AlarmEvent(
        id=0,
        ts=now,
        rule=state.rule,
        subject=state.subject,
        kind=state.kind,
        firing=firing,
        value=value,
        threshold=state.threshold,
        modid=state.modid,
        cmdid=state.cmdid,
        host=state.host,
        caller=state.caller,
    )


def _notify(
    state: AlarmState,
    observation: Observation | None,
    now: float,
    resend_interval: float,
    notes: list[dict[str, Any]],
) -> AlarmState:
    """Append the notification ``state`` is due, if any, and return the state with its
    bookkeeping (see the module docstring)."""
    if state.notified_firing is None:
        if not state.firing:
            return state  # resolved before anyone heard it fire
    elif state.notified_firing == state.firing or now - state.notified_at < resend_interval:
        return state
    if observation is not None and observation.breaching == state.firing:
        value, summary = observation.value, observation.summary
    else:  # resolved without a present measure
        value = state.value
        summary = f"{state.subject}: no longer breaching {state.rule!r}"
    notes.append(_notification(state, now, state.firing, value, state.since, summary))
    return attrs.evolve(state, notified_firing=state.firing, notified_at=now)


def _notification(
    state: AlarmState,
    now: float,
    firing: bool,
    value: float | None,
    since: float,
    summary: str,
) -> dict[str, Any]:
    """The JSON a webhook receives."""
    module = None if state.modid is None or state.cmdid is None else f"{state.modid}/{state.cmdid}"
    return {
        "source": "lars",
        "alarm": state.rule,
        "kind": state.kind,
        "state": "firing" if firing else "resolved",
        "subject": state.subject,
        "module": module,
        "modid": state.modid,
        "cmdid": state.cmdid,
        "host": state.host,
        "caller": state.caller,
        "value": value,
        "threshold": state.threshold,
        "since": since,
        "ts": now,
        "summary": summary,
    }
