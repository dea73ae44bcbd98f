"""The store's alarm tables (issue 10): rules, the evaluation lease, states and events. Run
against SQLite and a real MySQL/MariaDB database; the lease also across two stores."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs
import pytest
import trio

from lars.errors import InvalidValue
from lars.store import (
    ALARM_NAME_MAX,
    ALARM_RULE_MAX_BYTES,
    ALARM_SUBJECT_MAX,
    PAGE_MAX,
    Actor,
    AlarmDecision,
    AlarmEvent,
    AlarmState,
    Lease,
    RouteStore,
    open_store,
)
from tests.store_helpers import fetch

ALICE = Actor("alice", "192.0.2.7")
RULE = {"kind": "error_rate", "threshold": 0.5, "window": 300, "min_calls": 10, "note": "é"}
NOTHING = AlarmDecision()


def state(
    rule: str = "errors", subject: str = "1/1", *, firing: bool = True, since: float = 100.0
) -> AlarmState:
    return AlarmState(
        rule,
        subject,
        "error_rate",
        firing,
        since,
        0.75,
        0.5,
        modid=1,
        cmdid=1,
        updated=since,
    )


def event(
    rule: str = "errors", subject: str = "1/1", *, firing: bool = True, ts: float = 100.0
) -> AlarmEvent:
    return AlarmEvent(0, ts, rule, subject, "error_rate", firing, 0.75, 0.5, modid=1, cmdid=1)


def writes(decision: AlarmDecision) -> Callable[[list[AlarmState]], AlarmDecision]:
    """A ``decide`` that returns ``decision`` whatever the states."""
    return lambda states: decision


# --- rules -------------------------------------------------------------------------------------


async def test_rules_are_written_replaced_listed_and_deleted(store: RouteStore) -> None:
    start = time.time()
    await store.put_alarm_rule("errors", RULE, ALICE)
    await store.put_alarm_rule("Errors.2-b_c", {"kind": "no_healthy_host"}, Actor("bob", "cli"))
    rules = await store.list_alarm_rules()
    assert [(r.name, r.definition, r.actor) for r in rules] == [
        ("Errors.2-b_c", {"kind": "no_healthy_host"}, "bob"),  # by name: upper case first
        ("errors", RULE, "alice"),
    ]
    assert all(start - 1 <= r.updated <= time.time() + 1 for r in rules)
    # Names are case-sensitive in both stores, and a put replaces.
    await store.put_alarm_rule("errors", {"kind": "caller_silent"}, Actor("carol", "cli"))
    rules = await store.list_alarm_rules()
    assert [(r.name, r.definition, r.actor) for r in rules][1] == (
        "errors",
        {"kind": "caller_silent"},
        "carol",
    )
    assert await store.delete_alarm_rule("errors")
    assert not await store.delete_alarm_rule("errors")
    assert [r.name for r in await store.list_alarm_rules()] == ["Errors.2-b_c"]


async def test_a_definition_is_stored_as_compact_json(store: RouteStore) -> None:
    await store.put_alarm_rule("r", {"b": [1, 2.5, None, True], "a": {"x": "y"}}, ALICE)
    ((text,),) = await fetch(store, "SELECT definition FROM AlarmRule")
    assert text == '{"b":[1,2.5,null,true],"a":{"x":"y"}}'


async def test_an_unreadable_definition_reads_as_an_empty_rule(
    store: RouteStore, caplog: pytest.LogCaptureFixture
) -> None:
    await store.put_alarm_rule("broken", RULE, ALICE)
    await fetch(store, "UPDATE AlarmRule SET definition = '[1, 2'")
    ((rule,),) = [await store.list_alarm_rules()]
    assert rule.definition == {}
    assert any("not a JSON object" in r.getMessage() for r in caplog.records)


async def test_deleting_a_rule_keeps_its_states_and_events(store: RouteStore) -> None:
    """The engine resolves the states of a deleted rule (and tells the webhooks)."""
    await store.put_alarm_rule("errors", RULE, ALICE)
    await store.put_alarm_rule("other", RULE, ALICE)
    decision = AlarmDecision(
        states=(state("errors", "1/1"), state("errors", "1/2"), state("other", "1/1")),
        events=(event("errors"),),
    )
    await store.alarm_round("web-1", 30, writes(decision))
    assert await store.delete_alarm_rule("errors")
    assert [r.name for r in await store.list_alarm_rules()] == ["other"]
    assert len(await store.list_alarm_states()) == 3
    assert [e.rule for e in await store.list_alarm_events()] == ["errors"]


async def test_bad_rules_are_refused_before_anything_is_written(store: RouteStore) -> None:
    for name in ("", "a" * (ALARM_NAME_MAX + 1), "bad name", "é", "a/b", 5, None):
        with pytest.raises(InvalidValue, match="alarm rule name"):
            await store.put_alarm_rule(name, RULE, ALICE)  # type: ignore[arg-type]
        with pytest.raises(InvalidValue, match="alarm rule name"):
            await store.delete_alarm_rule(name)  # type: ignore[arg-type]
    for definition, why in (
        ([1, 2], "JSON object"),
        ("{}", "JSON object"),
        (None, "JSON object"),
        ({"x": {1, 2}}, "JSON data"),
        ({"x": math.nan}, "JSON data"),
        ({"x": "y" * ALARM_RULE_MAX_BYTES}, f"at most {ALARM_RULE_MAX_BYTES} bytes"),
    ):
        with pytest.raises(InvalidValue, match=why):
            await store.put_alarm_rule("r", definition, ALICE)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="actor"):
        await store.put_alarm_rule("r", RULE, None)  # type: ignore[arg-type]
    assert await store.list_alarm_rules() == []
    name = "a" * ALARM_NAME_MAX  # the longest name fits
    await store.put_alarm_rule(name, RULE, ALICE)
    assert [r.name for r in await store.list_alarm_rules()] == [name]


# --- the lease and the rounds ------------------------------------------------------------------


async def test_one_holder_has_the_lease_until_it_releases_it(store: RouteStore) -> None:
    assert await store.alarm_lease() is None
    seen: list[list[AlarmState]] = []

    def decide(states: list[AlarmState]) -> AlarmDecision:
        seen.append(states)
        return NOTHING

    assert await store.alarm_round("web-1", 30, decide) == NOTHING
    lease = await store.alarm_lease()
    assert lease is not None and lease.holder == "web-1"
    assert time.time() + 25 < lease.expires < time.time() + 35  # the database's clock
    assert await store.alarm_round("web-2", 30, decide) is None
    assert len(seen) == 1  # the other holder's round decides nothing
    assert await store.alarm_lease() == lease  # and writes nothing
    # A renewal moves the expiry on.
    assert await store.alarm_round("web-1", 60, decide) == NOTHING
    renewed = await store.alarm_lease()
    assert renewed is not None and renewed.expires > lease.expires + 20
    # Only the holder may release it; then another takes it at once.
    await store.release_lease("web-2")
    assert await store.alarm_round("web-2", 30, decide) is None
    await store.release_lease("web-1")
    assert await store.alarm_lease() == Lease("web-1", 0.0)
    assert await store.alarm_round("web-2", 30, decide) == NOTHING
    assert await store.alarm_round("web-1", 30, decide) is None


async def test_an_expired_lease_goes_to_the_next_holder(store: RouteStore) -> None:
    assert await store.alarm_round("web-1", 0.3, writes(NOTHING)) is not None
    assert await store.alarm_round("web-2", 0.3, writes(NOTHING)) is None
    await trio.sleep(0.4)  # the lease runs on the database's clock: real time
    assert await store.alarm_round("web-2", 30, writes(NOTHING)) is not None
    assert await store.alarm_round("web-1", 30, writes(NOTHING)) is None


async def test_a_round_writes_what_decide_returns(store: RouteStore) -> None:
    first = AlarmDecision(
        states=(
            state("errors", "1/1"),
            state("errors", "1/2", firing=False),
            attrs.evolve(
                state("overload", "1/1 10.0.0.1:80"),
                kind="host_overloaded",
                value=None,
                host="10.0.0.1:80",
                notified_firing=True,
                notified_at=101.5,
            ),
            AlarmState(
                "silent",
                "caller 10.0.0.9",
                "caller_silent",
                True,
                99.0,
                None,
                300.0,
                caller="10.0.0.9",
            ),
        ),
        events=(event("errors", "1/1"), event("silent", "caller 10.0.0.9")),
    )
    done = await store.alarm_round("web-1", 30, writes(first))
    assert done is not None
    assert done.states == first.states
    ids = [e.id for e in done.events]
    assert 0 < ids[0] < ids[1]
    assert [attrs.evolve(e, id=0) for e in done.events] == list(first.events)
    states = await store.list_alarm_states()
    assert states == sorted(first.states, key=lambda s: s.key)
    assert [s.key for s in await store.list_alarm_states(firing=False)] == [("errors", "1/2")]
    assert len(await store.list_alarm_states(firing=True)) == 3

    # The next round sees those states, replaces one, deletes another, adds an event.
    seen: list[list[AlarmState]] = []
    resolved = attrs.evolve(state("errors", "1/1"), firing=False, since=200.0, value=0.1)

    def decide(current: list[AlarmState]) -> AlarmDecision:
        seen.append(current)
        return AlarmDecision(
            states=(resolved,),
            deleted=(("errors", "1/2"), ("nothing", "there")),
            events=(event("errors", "1/1", firing=False, ts=200.0),),
        )

    second = await store.alarm_round("web-1", 30, decide)
    assert seen == [states]
    assert second is not None and second.events[0].id > ids[1]
    assert resolved in await store.list_alarm_states()
    assert ("errors", "1/2") not in [s.key for s in await store.list_alarm_states()]
    events = await store.list_alarm_events()
    assert [(e.rule, e.firing) for e in events] == [
        ("errors", False),
        ("silent", True),
        ("errors", True),
    ]
    assert events[2] == done.events[0]


async def test_events_page_newest_first(store: RouteStore) -> None:
    decision = AlarmDecision(
        events=tuple(event("errors" if i % 2 else "other", f"1/{i}") for i in range(7))
    )
    await store.alarm_round("web-1", 30, writes(decision))
    everything = await store.list_alarm_events()
    assert [e.subject for e in everything] == [f"1/{i}" for i in reversed(range(7))]
    page = await store.list_alarm_events(limit=3)
    assert page == everything[:3]
    assert await store.list_alarm_events(limit=3, before_id=page[-1].id) == everything[3:6]
    assert [e.subject for e in await store.list_alarm_events(rule="errors")] == [
        "1/5",
        "1/3",
        "1/1",
    ]
    assert await store.list_alarm_events(rule="nothing") == []


async def test_a_bad_decision_writes_nothing_not_even_the_lease(store: RouteStore) -> None:
    good = state()
    for bad in (
        attrs.evolve(good, subject="x" * (ALARM_SUBJECT_MAX + 1)),
        attrs.evolve(good, subject=""),
        attrs.evolve(good, rule="bad name"),
        attrs.evolve(good, kind="k" * 33),
        attrs.evolve(good, since=math.inf),
        attrs.evolve(good, value=math.nan),
        attrs.evolve(good, firing=1),  # type: ignore[arg-type]
        attrs.evolve(good, modid=2**32),
        attrs.evolve(good, host="h" * 65),
    ):
        decision = AlarmDecision(states=(good, bad), events=(event(),))
        with pytest.raises(InvalidValue):
            await store.alarm_round("web-1", 30, writes(decision))
    with pytest.raises(InvalidValue, match="AlarmDecision"):
        await store.alarm_round("web-1", 30, lambda states: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidValue, match="deleted"):
        await store.alarm_round("web-1", 30, writes(AlarmDecision(deleted=(("a",),))))  # type: ignore[arg-type]
    assert await store.list_alarm_states() == []
    assert await store.list_alarm_events() == []
    lease = await store.alarm_lease()
    assert lease is None or lease.expires == 0.0


async def test_bad_round_arguments_are_refused(store: RouteStore) -> None:
    for holder in ("", "h" * 129, None, 7):
        with pytest.raises(InvalidValue, match="holder"):
            await store.alarm_round(holder, 30, writes(NOTHING))  # type: ignore[arg-type]
        with pytest.raises(InvalidValue, match="holder"):
            await store.release_lease(holder)  # type: ignore[arg-type]
    for ttl in (0, -1, math.inf, math.nan, "30", True):
        with pytest.raises(InvalidValue, match="ttl"):
            await store.alarm_round("web-1", ttl, writes(NOTHING))  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="decide"):
        await store.alarm_round("web-1", 30, NOTHING)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="firing"):
        await store.list_alarm_states(firing=1)  # type: ignore[arg-type]
    for limit in (0, PAGE_MAX + 1, 1.5):
        with pytest.raises(InvalidValue, match="limit"):
            await store.list_alarm_events(limit=limit)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="before_id"):
        await store.list_alarm_events(before_id=-1)
    with pytest.raises(InvalidValue, match="alarm rule name"):
        await store.list_alarm_events(rule="bad name")
    for older_than in (math.nan, None, "1"):
        with pytest.raises(InvalidValue, match="older_than"):
            await store.purge_alarms(older_than)  # type: ignore[arg-type]
    assert await store.alarm_lease() is None


async def test_two_stores_racing_for_the_lease_never_both_get_it(
    store: RouteStore, store_url: str
) -> None:
    """Two instances (two stores: separate connections, or for SQLite separate files
    handles) start rounds at once, again and again: exactly one holder gets decisions."""
    async with open_store(store_url) as other:
        got: dict[str, list[bool]] = {"web-1": [], "web-2": []}

        async def rounds(instance: RouteStore, holder: str) -> None:
            for _ in range(5):
                decision = AlarmDecision(events=(event(subject=holder),))
                got[holder].append(
                    await instance.alarm_round(holder, 30, writes(decision)) is not None
                )

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # several rounds of each in flight at once
                nursery.start_soon(rounds, store, "web-1")
                nursery.start_soon(rounds, other, "web-2")
        winners = [holder for holder, results in got.items() if any(results)]
        assert len(winners) == 1, got
        (winner,) = winners
        assert all(got[winner])  # its renewals always succeed
        loser = "web-2" if winner == "web-1" else "web-1"
        assert not any(got[loser])
        events = await store.list_alarm_events()
        assert {e.subject for e in events} == {winner} and len(events) == 15
        # Released, the lease goes to the other at once.
        await (store if winner == "web-1" else other).release_lease(winner)
        assert await (other if winner == "web-1" else store).alarm_round(loser, 30, writes(NOTHING))


# --- purging -----------------------------------------------------------------------------------


async def test_purge_deletes_old_events_and_old_resolved_states(store: RouteStore) -> None:
    decision = AlarmDecision(
        states=(
            state("errors", "old resolved", firing=False, since=100.0),
            state("errors", "old firing", firing=True, since=100.0),
            state("errors", "new resolved", firing=False, since=300.0),
        ),
        events=(event(ts=100.0), event(ts=199.0), event(ts=200.0), event(ts=300.0)),
    )
    await store.alarm_round("web-1", 30, writes(decision))
    assert await store.purge_alarms(200.0) == 3  # two events, one state
    assert [e.ts for e in await store.list_alarm_events()] == [300.0, 200.0]
    assert [s.subject for s in await store.list_alarm_states()] == ["new resolved", "old firing"]
    assert await store.purge_alarms(200.0) == 0
