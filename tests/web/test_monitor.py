"""The console's charts and alarms over HTTP: history as JSON and SVG, sparklines, the
alarms page and API, rules written in the console."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from lars.alarms.rules import parse_rule
from lars.config import AlarmsConfig
from lars.roles.reporter import history_of
from lars.store import Actor, CallStatus, RouteStore
from lars.store.base import AlarmDecision, AlarmEvent, AlarmState
from lars.web.monitor import MonitorService, period_bounds, rule_from_form
from lars.web.service import BadInput, Conflict
from tests.web.conftest import Console, bearer, csrf_of, login

H1 = (167772161, 7001)  # 10.0.0.1:7001
H2 = (167772162, 7002)
CALLER = 3232235777


async def calls(store: RouteStore, ts: int, host: tuple[int, int], succ: int, err: int) -> None:
    """A reporter's write: the status row and its minute of history."""
    rows = [CallStatus(1, 1, *host, CALLER, succ, err, ts, False)]
    await store.record_calls(rows, history_of(rows, time.time(), 86400))


async def test_history_as_json_per_module_and_host(open_console: Console) -> None:
    store = open_console.store
    await store.add_hosts((1, 1), [H1, H2])
    now = int(time.time())
    await calls(store, now, H1, 10, 5)
    await calls(store, now, H2, 20, 0)
    await calls(store, now - 120, H1, 7, 0)
    async with open_console.client() as http:
        body = (await http.get("/api/v1/modules/1/1/history")).json()
        assert (body["period"], body["step"]) == ("hour", 60)
        start, end, _ = period_bounds("hour", time.time())
        assert (body["start"], body["end"]) == (start, end)
        assert len(body["points"]) == 60  # every minute, zeros included
        by_ts = {p["ts"]: (p["succ"], p["err"]) for p in body["points"]}
        assert by_ts[now - now % 60] == (30, 5)
        assert by_ts[(now - 120) - (now - 120) % 60] == (7, 0)
        hosts = {h["host"]: sum(p["err"] for p in h["points"]) for h in body["hosts"]}
        assert hosts == {"10.0.0.1:7001": 5, "10.0.0.2:7002": 0}
        day = (await http.get("/api/v1/modules/1/1/history?period=day")).json()
        assert day["step"] == 600 and len(day["points"]) == 144
        assert sum(p["succ"] for p in day["points"]) == 37
        bad = await http.get("/api/v1/modules/1/1/history?period=week")
        assert bad.status_code == 400 and bad.json()["field"] == "period"


async def test_the_module_page_charts_the_failures_and_the_overview_has_sparklines(
    open_console: Console,
) -> None:
    store = open_console.store
    await store.add_hosts((1, 1), [H1, H2])
    now = int(time.time())
    await calls(store, now, H1, 10, 4)
    async with open_console.client() as http:
        page = (await http.get("/modules/1/1")).text
        assert 'id="module-chart"' in page
        svg = page[page.index("<svg", page.index('id="module-chart"')) :]
        root = ET.fromstring(svg[: svg.index("</svg>") + 6])
        assert root.get("data-total-err") == "4" and root.get("data-total-succ") == "10"
        assert 'data-host="10.0.0.2:7002"' in page  # a host without calls has its chart too
        overview = (await http.get("/")).text
        assert 'class="spark"' in overview and 'data-total-err="4"' in overview
        assert (await http.get("/modules/1/1?period=day")).status_code == 200
        assert (await http.get("/modules/1/1?period=year")).status_code == 400


async def test_rules_are_written_read_and_deleted_through_the_api(open_console: Console) -> None:
    async with open_console.client() as http:
        rule = {"kind": "error_rate", "threshold": 0.25, "module": "1/1", "per": "host"}
        created = await http.put("/api/v1/alarms/rules/api-errors", json=rule)
        assert created.status_code == 201, created.text
        assert created.json()["source"] == "store" and created.json()["threshold"] == 0.25
        again = await http.put("/api/v1/alarms/rules/api-errors", json={**rule, "window": 10})
        assert again.status_code == 200 and again.json()["window"] == 10
        listed = (await http.get("/api/v1/alarms")).json()
        assert [(r["name"], r["source"]) for r in listed["rules"]] == [("api-errors", "store")]
        assert listed["alarms"] == [] and listed["firing"] == 0

        for body, field in (
            ({"kind": "cpu_high"}, "kind"),
            ({"kind": "error_rate", "threshold": 1.5}, "threshold"),
            ({"kind": "error_rate", "threshold": 0.1, "silent": 5}, "silent"),
            ({"kind": "error_rate", "threshold": 0.1, "name": "other"}, "name"),
        ):
            refused = await http.put("/api/v1/alarms/rules/x", json=body)
            assert refused.status_code == 400, (body, refused.text)
            assert refused.json()["field"] == field, (body, refused.json())
        bad_name = await http.put("/api/v1/alarms/rules/a%20b", json={"kind": "no_healthy_host"})
        assert bad_name.status_code == 400

        assert (await http.delete("/api/v1/alarms/rules/api-errors")).status_code == 200
        assert (await http.delete("/api/v1/alarms/rules/api-errors")).status_code == 404
    assert await open_console.store.list_alarm_rules() == []


async def test_a_configured_rule_cannot_be_changed_in_the_console(sqlite_store: RouteStore) -> None:
    config = AlarmsConfig(rules=[parse_rule({"name": "cfg", "kind": "no_healthy_host"})])
    monitor = MonitorService(sqlite_store, config)
    rule = parse_rule({"name": "cfg", "kind": "no_healthy_host", "window": 3})
    with pytest.raises(Conflict, match="config file"):
        await monitor.put_rule(Actor("alice", "cli"), rule)
    with pytest.raises(Conflict, match="config file"):
        await monitor.delete_rule("cfg")
    assert await sqlite_store.list_alarm_rules() == []


async def test_viewers_read_alarms_but_cannot_write_rules(secured_console: Console) -> None:
    async with secured_console.client() as http:
        assert (await http.get("/api/v1/alarms", headers=bearer("dashboard"))).status_code == 200
        refused = await http.put(
            "/api/v1/alarms/rules/r", json={"kind": "no_healthy_host"}, headers=bearer("dashboard")
        )
        assert refused.status_code == 403
        written = await http.put(
            "/api/v1/alarms/rules/r", json={"kind": "no_healthy_host"}, headers=bearer("deployer")
        )
        assert written.status_code == 201
        assert (await http.get("/api/v1/alarms")).status_code == 401


def firing_state(now: float) -> AlarmState:
    return AlarmState(
        rule="api-errors",
        subject="1/1 10.0.0.1:7001",
        kind="error_rate",
        firing=True,
        since=now,
        value=0.75,
        threshold=0.5,
        modid=1,
        cmdid=1,
        host="10.0.0.1:7001",
        updated=now,
        notified_firing=True,
        notified_at=now,
    )


async def test_the_alarms_page_and_api_show_states_and_history(open_console: Console) -> None:
    now = time.time()
    state = firing_state(now)
    event = AlarmEvent(
        0, now, state.rule, state.subject, state.kind, True, 0.75, 0.5, 1, 1, state.host
    )
    written = await open_console.store.alarm_round(
        "web-1", 30.0, lambda states: AlarmDecision(states=(state,), events=(event,))
    )
    assert written is not None
    async with open_console.client() as http:
        page = (await http.get("/alarms")).text
        assert 'id="firing-count"' in page and "1 firing" in page
        assert (
            'data-alarm="api-errors" data-subject="1/1 10.0.0.1:7001" data-state="firing"' in page
        )
        assert "<code>web-1</code>" in page  # who evaluates
        body = (await http.get("/api/v1/alarms?firing=true")).json()
        assert body["firing"] == 1 and body["evaluator"] == "web-1"
        (alarm,) = body["alarms"]
        assert alarm["module"] == "1/1" and alarm["host"] == "10.0.0.1:7001"
        assert (alarm["state"], alarm["value"], alarm["threshold"]) == ("firing", 0.75, 0.5)
        events = (await http.get("/api/v1/alarms/events")).json()["events"]
        assert [(e["alarm"], e["state"]) for e in events] == [("api-errors", "firing")]
        none = (await http.get("/api/v1/alarms?firing=false")).json()
        assert none["alarms"] == []


async def test_a_rule_is_written_with_the_form_and_a_bad_one_is_shown_back(
    secured_console: Console,
) -> None:
    async with secured_console.client() as http:
        csrf = await login(http, "alice")
        form = {
            "csrf": csrf,
            "name": "slow",
            "kind": "caller_silent",
            "silent": "10",
            "enabled": "1",
        }
        saved = await http.post("/alarms/rules", data=form)
        assert saved.status_code == 303
        page = (await http.get("/alarms")).text
        assert 'data-rule="slow"' in page
        bad = await http.post("/alarms/rules", data={**form, "silent": "ten"})
        assert bad.status_code == 400 and "whole number" in bad.text
        assert 'value="ten"' in bad.text  # what was typed stays
        deleted = await http.post(
            "/alarms/rules/delete", data={"csrf": csrf_of(page), "name": "slow"}
        )
        assert deleted.status_code == 303
        assert await secured_console.store.list_alarm_rules() == []


def test_rule_forms_leave_empty_fields_out_and_type_numbers() -> None:
    rule = rule_from_form(
        {
            "name": "e",
            "kind": "error_rate",
            "threshold": "0.3",
            "window": "7",
            "per": "",
            "enabled": "1",
        }
    )
    assert rule.definition()["threshold"] == 0.3 and rule.definition()["window"] == 7
    assert rule.enabled
    disabled = rule_from_form({"name": "n", "kind": "no_healthy_host"})
    assert not disabled.enabled
    for form, field in (
        ({"name": "e", "kind": "error_rate", "threshold": "x"}, "threshold"),
        ({"name": "e", "kind": "error_rate", "threshold": "inf"}, "threshold"),
        ({"name": "e", "kind": "error_rate", "threshold": "0.1", "window": "1.5"}, "window"),
        ({"name": "e", "kind": "caller_silent", "silent": "5", "forget": "3"}, "forget"),
    ):
        try:
            rule_from_form(form)
        except BadInput as exc:
            assert exc.field == field, (form, exc)
        else:
            raise AssertionError(f"{form} was accepted")
