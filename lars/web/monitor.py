"""What the console shows of call history and alarms, without HTTP: the charts' series, the
alarm states, rules and history, and the rule writes.

Rules written here live in the store (``AlarmRule``); the rules of ``[alarms] rules`` are
shown beside them and cannot be changed here (a rule of the same name cannot be written).
The alarm engine (:mod:`lars.alarms.engine`) of whichever web instance holds the lease
picks a change up at its next round.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs

from lars.alarms.engine import AlarmEngine, RuleSet, load_rules
from lars.alarms.notify import WebhookStatus
from lars.alarms.rules import Rule, parse_rule
from lars.config import AlarmsConfig
from lars.core.model import HostKey, ModuleKey
from lars.errors import InvalidValue
from lars.store import Actor, RouteStore
from lars.store.base import AlarmEvent, AlarmState, CallPoint, Lease
from lars.web.charts import fill
from lars.web.service import BadInput, Conflict, NotFound

#: The periods a module's history is shown for: name -> (seconds, step in seconds).
HISTORY_PERIODS: dict[str, tuple[int, int]] = {"hour": (3600, 60), "day": (86400, 600)}
#: The overview's sparklines: the last hour, minute by minute.
SPARKLINE_SPAN = 3600
SPARKLINE_STEP = 60
#: Alarm events on the alarms page, and resolved alarms (every firing one is shown).
EVENTS_SHOWN = 50
RESOLVED_SHOWN = 200
#: A rule's form fields that hold whole numbers, and those that hold decimals.
_INT_FIELDS = ("window", "min_calls", "callers", "silent", "forget")
_FLOAT_FIELDS = ("threshold",)
_TEXT_FIELDS = ("name", "kind", "module", "per", "caller")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def period_bounds(period: str, now: float) -> tuple[int, int, int]:
    """``(start, end, step)`` of a history period ending with the step that holds ``now``."""
    span, step = HISTORY_PERIODS[period]
    end = (int(now) // step + 1) * step
    return end - span, end, step


@attrs.frozen
class HistoryView:
    """A module's calls over a period: summed over its hosts (every step, zeros included),
    and per host (the steps with calls)."""

    period: str
    start: int
    end: int
    step: int
    module: list[CallPoint]
    hosts: dict[HostKey, list[CallPoint]]


@attrs.frozen
class AlarmsView:
    """The alarms page: states (firing first), rules, webhooks, the lease, recent events."""

    states: list[AlarmState]
    #: Resolved alarms older than those shown.
    resolved_hidden: int
    rules: RuleSet
    webhooks: list[WebhookStatus]
    lease: Lease | None
    events: list[AlarmEvent]
    #: True when this instance evaluates the rules.
    leader: bool
    interval: float

    @property
    def firing(self) -> list[AlarmState]:
        """The alarms firing now."""
        return [s for s in self.states if s.firing]


def rule_from_form(form: Mapping[str, Any]) -> Rule:
    """A rule from the console's form: empty fields are left out (the kind's defaults),
    numbers typed as text become numbers, a checkbox ``enabled``."""
    data: dict[str, Any] = {}
    for field in (*_TEXT_FIELDS, *_INT_FIELDS, *_FLOAT_FIELDS):
        value = form.get(field)
        if not isinstance(value, str) or not value.strip():
            continue
        text = value.strip()
        if field in _INT_FIELDS:
            if not _INTEGER.fullmatch(text):
                raise BadInput(field, f"must be a whole number, got {text!r}")
            data[field] = int(text)
        elif field in _FLOAT_FIELDS:
            try:
                number = float(text)
            except ValueError:
                raise BadInput(field, f"must be a number, got {text!r}") from None
            if not math.isfinite(number):
                raise BadInput(field, f"must be a finite number, got {text!r}")
            data[field] = number
        else:
            data[field] = text
    data["enabled"] = form.get("enabled") in ("1", "on", "true", "yes")
    return checked_rule(data)


def checked_rule(data: object) -> Rule:
    """A rule from JSON data; a bad one is :class:`BadInput` naming the key."""
    if not isinstance(data, Mapping):
        raise BadInput("rule", "must be a JSON object")
    try:
        return parse_rule(data, "rule")
    except InvalidValue as exc:
        raise BadInput(_blamed_key(str(exc), data), str(exc)) from None


def _blamed_key(message: str, data: Mapping[str, Any]) -> str:
    """The key an error of :func:`parse_rule` blames (its message reads ``rule 'x': KEY
    ...`` or ``rule 'x': 'KEY' is ...``), for the form to mark; ``rule`` if none."""
    _, _, rest = message.partition(": ")
    word = re.match(r"'?([a-z_]+)", rest)
    known = {*_TEXT_FIELDS, *_INT_FIELDS, *_FLOAT_FIELDS, "enabled", *map(str, data)}
    return word.group(1) if word and word.group(1) in known else "rule"


class MonitorService:
    """The console's history and alarm functions over ``store``; ``engine`` (the web role's)
    tells whether this instance evaluates and how its webhooks fare."""

    def __init__(
        self,
        store: RouteStore,
        config: AlarmsConfig,
        engine: AlarmEngine | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.engine = engine
        self.clock = clock

    # call history

    async def history(self, module: ModuleKey, period: str) -> HistoryView:
        """A module's calls and errors per step over ``period`` (``hour`` or ``day``)."""
        if period not in HISTORY_PERIODS:
            raise BadInput("period", f"must be one of {', '.join(HISTORY_PERIODS)}, got {period!r}")
        start, end, step = period_bounds(period, self.clock())
        hosts = await self.store.call_history(module, start, end, step)
        # fill() adds up the points of one step: here, the hosts'.
        summed = fill([p for series in hosts.values() for p in series], start, end, step)
        return HistoryView(period, start, end, step, summed, hosts)

    async def sparklines(
        self, modules: Collection[ModuleKey]
    ) -> tuple[int, int, dict[ModuleKey, list[CallPoint]]]:
        """``(start, end, series)``: each module's calls in the last hour, minute by minute."""
        end = (int(self.clock()) // SPARKLINE_STEP + 1) * SPARKLINE_STEP
        start = end - SPARKLINE_SPAN
        if not modules:
            return start, end, {}
        series = await self.store.module_sparklines(modules, start, SPARKLINE_STEP)
        return start, end, series

    # alarms

    async def rules(self) -> RuleSet:
        """The rules in force and the stored ones that cannot be used."""
        return await load_rules(self.config, self.store)

    async def alarms(
        self, *, events: int = EVENTS_SHOWN, resolved: int = RESOLVED_SHOWN
    ) -> AlarmsView:
        """Everything the alarms page shows: every firing alarm, the ``resolved`` latest
        resolved ones, the ``events`` latest transitions."""
        firing = await self.store.list_alarm_states(firing=True)
        settled = await self.store.list_alarm_states(firing=False)
        firing.sort(key=lambda s: (-s.since, s.rule, s.subject))
        settled.sort(key=lambda s: (-s.since, s.rule, s.subject))
        engine = self.engine
        return AlarmsView(
            states=firing + settled[:resolved],
            resolved_hidden=max(0, len(settled) - resolved),
            rules=await self.rules(),
            webhooks=engine.notifier.status() if engine else [],
            lease=await self.store.alarm_lease(),
            events=await self.store.list_alarm_events(limit=events) if events else [],
            leader=bool(engine and engine.leader),
            interval=self.config.interval,
        )

    async def events(self, rule: str | None, limit: int, before_id: int | None) -> list[AlarmEvent]:
        """Alarm transitions newest first, optionally of one rule."""
        return await self.store.list_alarm_events(rule=rule, limit=limit, before_id=before_id)

    async def put_rule(self, actor: Actor, rule: Rule) -> bool:
        """Write a rule to the store (a new one, or a new version of a stored one); True if
        it is new. Conflict if a configured rule has its name."""
        if any(r.name == rule.name for r in self.config.rules):
            raise Conflict(
                f"rule {rule.name!r} is set in the config file ([[alarms.rules]]); change it there"
            )
        existing = {r.name for r in await self.store.list_alarm_rules()}
        await self.store.put_alarm_rule(rule.name, rule.definition(), actor)
        return rule.name not in existing

    async def delete_rule(self, name: str) -> None:
        """Delete a stored rule and its alarm states; NotFound if there is none."""
        if any(r.name == name for r in self.config.rules):
            raise Conflict(f"rule {name!r} is set in the config file; remove it there")
        if not await self.store.delete_alarm_rule(name):
            raise NotFound(f"no stored alarm rule {name!r}")
