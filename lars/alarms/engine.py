"""The alarm engine: the web role's task that evaluates the rules and sends notifications.

Every ``[alarms] interval`` seconds each web instance tries to take the store's alarm lease
(``AlarmLease``, on the store's clock, three intervals long). Only the holder reads the
data its rules need (:func:`lars.alarms.evaluate.needs`), evaluates them, and then, in one
transaction that checks it still holds the lease, compares the result with the stored
states and writes the transitions and their events (:func:`lars.alarms.evaluate.decide`).
Only what that transaction wrote is handed to the webhooks, so with several instances every
transition is sent once. An instance that stops gives the lease up; one that dies loses it
after three intervals, and another takes over with the states in the store.

Every instance, leader or not, reads the firing alarms each round for its metrics and the
console, so that any instance shows the same thing.

Rules come from ``[alarms] rules`` and from the store (written in the console). A stored rule
that no longer parses (written by a newer Lars, or by hand) is skipped and shown as an error;
a stored rule named like a configured one is shadowed by it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import attrs
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lars.alarms.evaluate import AlarmData, decide, evaluate, needs
from lars.alarms.notify import WebhookNotifier
from lars.alarms.rules import Rule, parse_rule
from lars.config import AlarmsConfig
from lars.errors import InvalidValue, StoreError
from lars.roles.common import RateLimitedLog
from lars.store import RouteStore
from lars.store.base import AlarmDecision, AlarmState

log = logging.getLogger("lars.alarms")

#: The lease lasts this many evaluation intervals.
LEASE_INTERVALS = 3
#: Seconds between two purges of the alarm history.
PURGE_INTERVAL = 3600.0


@attrs.frozen
class RuleSet:
    """The rules in force: from the config and from the store, and the stored rules that
    could not be used (name -> why)."""

    configured: tuple[Rule, ...]
    stored: tuple[Rule, ...]
    broken: dict[str, str] = attrs.field(factory=dict)

    @property
    def rules(self) -> list[Rule]:
        """Every rule in force (configured ones first)."""
        return [*self.configured, *self.stored]


async def load_rules(config: AlarmsConfig, store: RouteStore) -> RuleSet:
    """The configured rules and the store's, parsed; a stored rule that does not parse, or
    that a configured rule shadows, is left out and named in ``broken``."""
    configured = {rule.name for rule in config.rules}
    stored: list[Rule] = []
    broken: dict[str, str] = {}
    for row in await store.list_alarm_rules():
        if row.name in configured:
            broken[row.name] = "a rule of the same name in the config takes precedence"
            continue
        try:
            rule = parse_rule(row.definition, f"stored rule {row.name!r}")
        except InvalidValue as exc:
            broken[row.name] = str(exc)
            continue
        if rule.name != row.name:
            broken[row.name] = f"its definition is named {rule.name!r}"
            continue
        stored.append(rule)
    return RuleSet(tuple(config.rules), tuple(stored), broken)


async def load_data(store: RouteStore, rules: Sequence[Rule], now: float) -> AlarmData:
    """What ``rules`` need from the store at ``now``."""
    wanted = needs(rules, now)
    window_calls = {start: await store.window_calls(start) for start in wanted.window_starts}
    overloaded = (
        await store.overloaded_status(wanted.overloaded_since)
        if wanted.overloaded_since is not None
        else []
    )
    routes: dict[Any, frozenset[Any]] = {}
    if wanted.routes:
        routes = {module: frozenset(hosts) for module, hosts in (await store.list_routes()).items()}
    caller_last = await store.caller_last_reports() if wanted.callers else {}
    return AlarmData(
        now=now,
        window_calls=window_calls,
        overloaded=overloaded,
        routes=routes,
        caller_last=caller_last,
    )


def instance_name() -> str:
    """This instance's lease holder name: host, process and a random part."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"


class AlarmEngine:
    """Evaluates the alarm rules over ``store`` and tells ``notifier`` of each transition."""

    def __init__(
        self,
        config: AlarmsConfig,
        store: RouteStore,
        notifier: WebhookNotifier,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.notifier = notifier
        self.holder = holder or instance_name()
        self.clock = clock
        #: True while this instance holds the lease (as of its last round).
        self.leader = False
        #: The rules of the last round, and the firing alarms it read.
        self.rules = RuleSet((), ())
        self.firing: list[AlarmState] = []
        self.rounds = 0
        self.errors = 0
        self.notifications = 0
        self.last_round: float | None = None
        self.last_error: str | None = None
        self._last_purge: float | None = None
        self._error_log = RateLimitedLog(log)
        #: Seconds the last round took to read its data and evaluate (lengthens the lease).
        self._last_work = 0.0
        #: Alarms whose last notification a webhook gave up: sent again at the next round.
        self._undelivered: set[tuple[str, str]] = set()
        notifier.on_give_up = self._gave_up

    @property
    def lease_ttl(self) -> float:
        """Seconds the lease lasts: three evaluation intervals, and twice what the last round
        took on top, so that a slow round (a big store) still ends inside its lease rather
        than two instances taking it from each other forever."""
        return LEASE_INTERVALS * self.config.interval + 2 * self._last_work

    def _gave_up(self, event: dict[str, Any]) -> None:
        """A webhook gave a notification up: the alarm's state goes out again next round."""
        alarm, subject = event.get("alarm"), event.get("subject")
        if isinstance(alarm, str) and isinstance(subject, str):
            self._undelivered.add((alarm, subject))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Evaluate every interval until cancelled; give the lease up on the way out."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.notifier.run)
            task_status.started()
            try:
                while True:
                    await self.round_safely()
                    await trio.sleep(self.config.interval)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self._release()

    async def round_safely(self) -> None:
        """One :meth:`round`; a failure is logged and counted, never raised: the console
        beside the engine stays up, and the next round tries again."""
        try:
            await self.round()
        except StoreError as exc:
            self.errors += 1
            self.last_error = str(exc)
            self._error_log.warning("alarm evaluation failed: %s", exc)
        except Exception as exc:  # a bug: seen in the log with its traceback, counted
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("alarm evaluation failed")

    async def round(self) -> list[dict[str, Any]]:
        """Evaluate once if this instance holds (or takes) the lease; returns the
        notifications handed to the webhooks."""
        self.rules = await load_rules(self.config, self.store)
        rules = self.rules.rules
        self.leader = (
            await self.store.alarm_round(self.holder, self.lease_ttl, _unchanged) is not None
        )
        notes: list[dict[str, Any]] = []
        if self.leader:
            now = self.clock()
            started = trio.current_time()
            data = await load_data(self.store, rules, now)
            watch = [s.key for s in await self.store.list_alarm_states(firing=True)]
            # Pure and CPU-bound on a big fleet: off the event loop, so the console answers.
            observations = await trio.to_thread.run_sync(evaluate, rules, data, watch)
            self._last_work = trio.current_time() - started
            made: list[list[dict[str, Any]]] = []
            resend = set(self._undelivered)

            def decide_now(states: list[AlarmState]) -> AlarmDecision:
                # An alarm whose notification a webhook gave up is sent again: as if the
                # other state had been sent, long enough ago.
                states = [
                    attrs.evolve(s, notified_firing=not s.firing, notified_at=0.0)
                    if s.key in resend and s.notified_firing is not None
                    else s
                    for s in states
                ]
                decision, out = decide(
                    rules, states, observations, now, self.config.resend_interval
                )
                made[:] = [out]
                return decision

            written = await self.store.alarm_round(self.holder, self.lease_ttl, decide_now)
            if written is None:
                self.leader = False  # the lease went elsewhere between the two steps
            elif made:
                self._undelivered -= resend
                notes = made[0]
                for note in notes:
                    # The same transition sent again carries the same id: receivers that get
                    # it twice (a retry after a slow answer, a resend) can tell.
                    note["id"] = (
                        f"{note['alarm']}|{note['subject']}|{note['state']}|{note['since']}"
                    )
                    self.notifier.submit(note)
                self.notifications += len(notes)
                for event in written.events:
                    log.warning(
                        "alarm %s %s: %s (value %s, threshold %s)",
                        event.rule,
                        "FIRING" if event.firing else "resolved",
                        event.subject,
                        event.value,
                        event.threshold,
                    )
            await self._purge(now)
        self.firing = await self.store.list_alarm_states(firing=True)
        self.rounds += 1
        self.last_round = self.clock()
        self.last_error = None
        return notes

    async def _purge(self, now: float) -> None:
        if self._last_purge is not None and now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        purged = await self.store.purge_alarms(now - self.config.history_retention)
        if purged:
            log.info("purged %d alarm history rows", purged)

    async def _release(self) -> None:
        if not self.leader:
            return
        try:
            await self.store.release_lease(self.holder)
        except StoreError as exc:
            log.warning("could not give the alarm lease up: %s", exc)
        self.leader = False


def _unchanged(states: list[AlarmState]) -> AlarmDecision:
    """A round that only takes or renews the lease."""
    return AlarmDecision()


def firing_by_rule(states: Collection[AlarmState]) -> dict[str, int]:
    """How many alarms of each rule fire."""
    counts: dict[str, int] = {}
    for state in states:
        if state.firing:
            counts[state.rule] = counts.get(state.rule, 0) + 1
    return counts


class AlarmCollector(Collector):
    """The engine's metrics, read at scrape time."""

    def __init__(self, engine: AlarmEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        firing = GaugeMetricFamily(
            "lars_alarms_firing",
            "Alarms firing, by rule (as the store holds them).",
            labels=["rule"],
        )
        counts = firing_by_rule(engine.firing)
        for rule in engine.rules.rules:
            counts.setdefault(rule.name, 0)
        for name, count in sorted(counts.items()):
            firing.add_metric([name], count)
        yield firing
        yield GaugeMetricFamily(
            "lars_alarms_leader",
            "1 while this web instance holds the alarm lease and evaluates the rules.",
            value=int(engine.leader),
        )
        yield GaugeMetricFamily(
            "lars_alarms_rules", "Alarm rules in force.", value=len(engine.rules.rules)
        )
        yield GaugeMetricFamily(
            "lars_alarms_broken_rules",
            "Stored alarm rules that cannot be used (see the console's alarms page).",
            value=len(engine.rules.broken),
        )
        rounds = CounterMetricFamily("lars_alarms_rounds", "Evaluation rounds run.")
        rounds.add_metric([], engine.rounds)
        yield rounds
        errors = CounterMetricFamily(
            "lars_alarms_errors", "Evaluation rounds that failed on a store error."
        )
        errors.add_metric([], engine.errors)
        yield errors
        sent = CounterMetricFamily(
            "lars_alarms_webhook_posts",
            "Notifications POSTed, by webhook and outcome (sent, failed, dropped).",
            labels=["url", "outcome"],
        )
        queued = GaugeMetricFamily(
            "lars_alarms_webhook_queued", "Notifications waiting, by webhook.", labels=["url"]
        )
        for status in engine.notifier.status():
            sent.add_metric([status.url, "sent"], status.sent)
            sent.add_metric([status.url, "failed"], status.failed)
            sent.add_metric([status.url, "dropped"], status.dropped)
            queued.add_metric([status.url], status.queued)
        yield sent
        yield queued
