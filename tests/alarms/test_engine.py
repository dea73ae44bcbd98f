"""The alarm engine over a real store: the lease decides who evaluates and sends, states and
events land in the store, a stored rule joins the configured ones, a broken one is shown."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from lars.alarms.engine import AlarmEngine, firing_by_rule, load_rules
from lars.alarms.notify import WebhookNotifier
from lars.alarms.rules import parse_rule
from lars.config import AlarmsConfig
from lars.store import Actor, CallStatus, RouteStore
from lars.store.base import AlarmDecision

H1 = (167772161, 7001)  # 10.0.0.1:7001
H2 = (167772162, 7002)
CALLER = 3232235777  # 192.168.1.1
OVERLOADED = parse_rule({"name": "overloaded", "kind": "host_overloaded", "callers": 1})
ADMIN = Actor("alice", "192.0.2.7")


class Recorder(WebhookNotifier):
    """A notifier without webhooks that keeps what it is handed."""

    def __init__(self) -> None:
        super().__init__([])
        self.sent: list[dict[str, Any]] = []

    def submit(self, event: Mapping[str, Any]) -> None:
        self.sent.append(dict(event))


def engine(store: RouteStore, name: str, **config: Any) -> AlarmEngine:
    settings = {"interval": 1.0, "resend_interval": 0.0, "rules": [OVERLOADED], **config}
    return AlarmEngine(AlarmsConfig(**settings), store, Recorder(), holder=name)


def sent(e: AlarmEngine) -> list[dict[str, Any]]:
    assert isinstance(e.notifier, Recorder)
    return e.notifier.sent


async def report(store: RouteStore, host: tuple[int, int], *, overload: bool) -> None:
    ts = int(time.time())
    await store.upsert_call_status(
        [CallStatus(1, 1, host[0], host[1], CALLER, 5, 5 if overload else 0, ts, overload)]
    )


async def test_only_the_lease_holder_evaluates_and_each_transition_is_sent_once(
    store: RouteStore,
) -> None:
    await store.add_hosts((1, 1), [H1, H2])
    a, b = engine(store, "a"), engine(store, "b")
    await report(store, H1, overload=True)

    notes = await a.round()
    assert a.leader and len(notes) == 1
    assert notes[0]["state"] == "firing" and notes[0]["host"] == "10.0.0.1:7001"
    assert notes[0]["alarm"] == "overloaded" and notes[0]["value"] == 1
    assert await b.round() == [] and not b.leader
    # Both see the firing alarm, whoever evaluates.
    assert firing_by_rule(a.firing) == firing_by_rule(b.firing) == {"overloaded": 1}
    assert await a.round() == []  # still firing: nothing new

    # a stops: b takes over at its next round and does not send the firing again.
    await a.store.release_lease("a")
    a.leader = False
    assert await b.round() == [] and b.leader
    await report(store, H1, overload=False)
    notes = await b.round()
    assert [(n["alarm"], n["state"]) for n in notes] == [("overloaded", "resolved")]
    assert await a.round() == [] and not a.leader
    events = await store.list_alarm_events()
    assert [(e.rule, e.firing) for e in events] == [("overloaded", False), ("overloaded", True)]
    assert sent(a) == [sent(a)[0]] and len(sent(b)) == 1


async def test_stored_rules_join_the_configured_ones_and_a_broken_one_is_named(
    store: RouteStore,
) -> None:
    config = AlarmsConfig(rules=[OVERLOADED])
    errors = {"name": "errors", "kind": "error_rate", "threshold": 0.2}
    await store.put_alarm_rule("errors", errors, ADMIN)
    await store.put_alarm_rule(
        "overloaded", {"name": "overloaded", "kind": "no_healthy_host"}, ADMIN
    )
    await store.put_alarm_rule("odd", {"name": "odd", "kind": "cpu_high"}, ADMIN)
    await store.put_alarm_rule("alias", {**errors, "name": "other"}, ADMIN)
    rules = await load_rules(config, store)
    assert [r.name for r in rules.rules] == ["overloaded", "errors"]
    assert rules.rules[0].kind == "host_overloaded"  # the config's wins
    assert set(rules.broken) == {"overloaded", "odd", "alias"}
    assert "kind must be one of" in rules.broken["odd"]
    assert "other" in rules.broken["alias"]


async def test_a_removed_rule_resolves_its_firing_alarms(store: RouteStore) -> None:
    await store.add_hosts((1, 1), [H1])
    await report(store, H1, overload=True)
    definition = {"name": "stored", "kind": "host_overloaded"}
    await store.put_alarm_rule("stored", definition, ADMIN)
    e = engine(store, "a", rules=[])
    assert [n["state"] for n in await e.round()] == ["firing"]
    assert await store.delete_alarm_rule("stored")
    notes = await e.round()
    assert [(n["alarm"], n["state"]) for n in notes] == [("stored", "resolved")]
    assert await store.list_alarm_states() == []


async def test_a_store_error_is_counted_and_the_next_round_goes_on(store: RouteStore) -> None:
    e = engine(store, "a")
    broken = True
    real = store.alarm_round

    async def flaky(holder: str, ttl: float, decide: Any) -> AlarmDecision | None:
        if broken:
            from lars.errors import StoreUnavailable

            raise StoreUnavailable("the database went away")
        return await real(holder, ttl, decide)

    store.alarm_round = flaky  # type: ignore[method-assign]
    await e.round_safely()
    assert e.errors == 1 and e.last_error == "the database went away"
    broken = False
    await e.round_safely()
    assert e.errors == 1 and e.leader and e.last_error is None


@pytest.mark.parametrize("interval", [0.5, 10.0])
async def test_the_lease_lasts_three_intervals(store: RouteStore, interval: float) -> None:
    assert engine(store, "a", interval=interval).lease_ttl == 3 * interval


async def test_a_notification_a_webhook_gave_up_is_sent_again_next_round(
    store: RouteStore,
) -> None:
    await store.add_hosts((1, 1), [H1])
    await report(store, H1, overload=True)
    e = engine(store, "a")
    (first,) = await e.round()
    assert first["id"] == f"overloaded|{first['subject']}|firing|{first['since']}"
    assert await e.round() == []
    assert e.notifier.on_give_up is not None
    e.notifier.on_give_up(first)  # what a webhook does after its last retry
    (again,) = await e.round()
    assert again["state"] == "firing" and again["id"] == first["id"]
    assert await e.round() == []  # once
