"""The console shows self-registered hosts with their lease's expiry, and the hosts the fleet
view demotes (DESIGN §14): on the module page and in the API's JSON."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from lars.config import Config, DnsConfig, config_from_dict
from lars.core.model import Host
from lars.store import Actor, CallStatus, LeaseGrant, RouteStore
from lars.web.app import make_app
from lars.web.auth import Accounts
from lars.web.role import WebServer
from lars.web.service import ConsoleService, FleetView
from tests.web.conftest import SECRET, Console

A, B, C = (Host(f"10.0.0.{i}", 7000 + i).key for i in (1, 2, 3))
AGENT = Actor("lease:10.9.9.9", "10.9.9.9")


def console_with_fleet_view(store: RouteStore) -> Console:
    async def notify(version: int) -> list[str]:
        return []

    service = ConsoleService(store, notify, FleetView(callers=3, share=0.5, window=30.0))
    return Console(store, make_app(service, Accounts([], []), SECRET), CollectorRegistry())


async def fill(store: RouteStore) -> int:
    """Module 1/2: A static, B registered, C registered and seen overloaded by 3 callers; and
    the lease expiry of B (unix ms)."""
    await store.add_hosts((1, 2), [A])
    expires = int(time.time() * 1000) + 60_000
    await store.register_leases(
        [LeaseGrant((1, 2), B, expires), LeaseGrant((1, 2), C, expires + 1)], actor=AGENT
    )
    now = int(time.time())
    await store.upsert_call_status(
        [CallStatus(1, 2, *C, caller, 5, 9, now, True) for caller in (11, 12, 13)]
        + [CallStatus(1, 2, *A, caller, 5, 9, now, True) for caller in (11, 12)]
    )
    return expires


async def test_the_api_says_which_hosts_registered_themselves_and_which_are_demoted(
    sqlite_store: RouteStore,
) -> None:
    expires = await fill(sqlite_store)
    console = console_with_fleet_view(sqlite_store)
    async with console.client() as http:
        module = (await http.get("/api/v1/modules/1/2")).json()
    hosts = {h["host"]: h for h in module["hosts"]}
    assert [(h["dynamic"], h["lease_expires"], h["demoted"]) for h in hosts.values()] == [
        (False, None, False),  # static; only 2 callers see it overloaded
        (True, expires, False),
        (True, expires + 1, True),
    ]
    assert module["changes"][0]["actor"] == "lease:10.9.9.9"
    assert module["changes"][0]["changes"] == {"lease": "register"}


async def test_the_module_page_marks_registered_and_demoted_hosts(
    sqlite_store: RouteStore,
) -> None:
    await fill(sqlite_store)
    console = console_with_fleet_view(sqlite_store)
    async with console.client() as http:
        page = (await http.get("/modules/1/2")).text
    assert page.count('class="badge lease"') == 2 + 1  # two hosts, and the hint
    assert page.count('class="badge bad demoted"') == 1
    assert "lars register" in page


async def test_without_the_fleet_view_nothing_is_demoted(open_console: Console) -> None:
    await fill(open_console.store)
    async with open_console.client() as http:
        module = (await http.get("/api/v1/modules/1/2")).json()
        page = (await http.get("/modules/1/2")).text
    assert [h["demoted"] for h in module["hosts"]] == [False, False, False]
    assert [h["dynamic"] for h in module["hosts"]] == [False, True, True]
    assert "demoted" not in page


def test_the_web_role_takes_the_fleet_rule_from_the_dns_section() -> None:
    assert FleetView.of(DnsConfig()) is None
    config = config_from_dict({"dns": {"fleet_view": True, "demote_callers": 4}})
    assert FleetView.of(config.dns) == FleetView(4, 0.5, 30.0)
    assert FleetView.of(Config().dns) is None


async def test_the_web_server_passes_the_fleet_rule_to_its_service(
    sqlite_store: RouteStore,
) -> None:
    config = config_from_dict({"dns": {"fleet_view": True}, "web": {"listen": "127.0.0.1:0"}})
    server = WebServer(config, sqlite_store)
    assert server.service.fleet == FleetView(3, 0.5, 30.0)
