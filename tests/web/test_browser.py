"""The console in a real browser: Playwright driving Debian's Chromium against a real stack
(``lars run`` processes for dns, reporter, agent and web) on MariaDB.

An operator logs in, adds a module with three hosts, sees it in the overview and the push
reach the agent (``lars query``), removes a host, finds the change in the audit log under
their name, names the module, imports routes, drives failing traffic (``lars simulate``
with a reporter running) and sees the call status mark the failing host overloaded. A
viewer sees everything and can change nothing. Every page is saved as a screenshot in the
test's tmp dir; with ``LARS_CONSOLE_SCREENSHOT=PATH`` the overview is also copied there
(that is how docs/console.png is made).

Chromium is not optional: without ``/usr/bin/chromium`` the test fails, saying how to
install it (``.ci/run`` does), unless ``LARS_TEST_BROWSER=off`` skips it on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from lars.client import LarsClient
from lars.core.model import Host
from lars.store import Actor, open_store
from tests import mysql_admin
from tests.e2e.procs import LARS, lars_process
from tests.netutil import free_tcp_port, free_udp_base
from tests.web.conftest import PASSWORDS, USERS

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BROWSER_ENV = "LARS_TEST_BROWSER"
SCREENSHOT_ENV = "LARS_CONSOLE_SCREENSHOT"
#: Seconds to wait for something that happens in the background (a push, a report).
DEADLINE = 20.0

#: The fleet already registered when the operator arrives (by the CLI's deploy job).
NAMES = {
    "mod": {
        101: "user-profile",
        102: "order",
        103: "payment",
        104: "search",
        105: "inventory",
        106: "recommend",
    },
    "cmd": {1: "get", 2: "update", 3: "list"},
}
FLEET = {
    (101, 1): ["10.0.1.11:7001", "10.0.1.12:7001", "10.0.1.13:7001", "10.0.1.14:7001"],
    (101, 2): ["10.0.1.11:7002", "10.0.1.12:7002"],
    (102, 1): ["10.0.2.21:7101", "10.0.2.22:7101", "10.0.2.23:7101"],
    (102, 3): ["10.0.2.21:7103", "10.0.2.22:7103"],
    (103, 1): ["10.0.3.31:7201", "10.0.3.32:7201"],
    (104, 1): ["10.0.4.41:7301", "10.0.4.42:7301", "10.0.4.43:7301"],
    (105, 2): ["10.0.5.51:7401", "10.0.5.52:7401"],
    (106, 1): ["10.0.6.61:7501", "10.0.6.62:7501", "10.0.6.63:7501"],
}
#: Background traffic: (module, calls, error rate of the route's first host).
TRAFFIC = [((101, 1), 3000, 0.02), ((102, 1), 2000, 0.04), ((104, 1), 1500, 0.0)]
#: The module the operator adds through the console, and the host that will fail.
MODULE = (501, 1)
HOSTS = ["10.0.9.1:7601", "10.0.9.2:7601", "10.0.9.3:7601"]
FAILING = HOSTS[0]
#: The alarm rule the operator writes in the console.
ALARM = "checkout-host-errors"


def chromium() -> str:
    """Debian's Chromium, or fail (skip only when turned off on purpose)."""
    if os.environ.get(BROWSER_ENV, "").lower() == "off":
        pytest.skip(f"browser tests turned off ({BROWSER_ENV}=off)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install -y "
            f"chromium (.ci/run does), or set {BROWSER_ENV}=off to skip them on purpose",
            pytrace=False,
        )
    return CHROMIUM


@attrs.define
class Stack:
    """A running stack: where the console is, the agent's config, the screenshots."""

    url: str
    agent_config: Path
    shots: Path
    store: str
    taken: list[str] = attrs.Factory(list)

    def lars(self, *argv: str) -> str:
        """Run a ``lars`` command (from the browser's thread); returns its stdout."""
        result = subprocess.run(
            [*LARS, *argv, "--config", str(self.agent_config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"lars {' '.join(argv)}: {result.stderr}"
        return result.stdout

    def agent_hosts(self, module: tuple[int, int]) -> list[str]:
        """The hosts the local agent has for a module (``lars query --json``)."""
        state = json.loads(self.lars("query", *map(str, module), "--json"))
        return sorted(h["host"] for h in state["hosts"])

    def client_route(self, module: tuple[int, int]) -> list[str]:
        """The hosts a business client gets for a module (the agent asks DNS the first
        time, and from then on gets its pushes)."""
        with LarsClient.from_config(self.agent_config) as client:
            return sorted(str(h) for h in client.reg_init(*module))

    def shot(self, page: Any, name: str) -> None:
        """Save a full-page screenshot of what the browser shows."""
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)
        self.taken.append(name)


def eventually(check: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Wait (in the browser's thread) until ``check()`` is true."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline:.0f}s: {what}")
        time.sleep(0.2)


@pytest.fixture
async def db() -> AsyncIterator[str]:
    async with mysql_admin.fresh_database(init=True) as url:
        yield url


async def seed(url: str) -> None:
    """The fleet a deploy job registered before: routes and names."""
    async with open_store(url) as store:
        deploy = Actor("cli:deploy@build-7", "cli")
        for module, hosts in FLEET.items():
            await store.add_hosts(module, [_key(h) for h in hosts], actor=deploy)
        for kind, names in NAMES.items():
            for ident, name in names.items():
                await store.set_name(kind, ident, name)


def _key(text: str) -> tuple[int, int]:
    return Host.parse(text).key


async def test_an_operator_and_a_viewer_in_a_real_browser(db: str, tmp_path: Path) -> None:
    browser = chromium()
    await seed(db)
    dns_port, reporter_port = free_tcp_port(), free_tcp_port()
    dns, reporter = f"127.0.0.1:{dns_port}", f"127.0.0.1:{reporter_port}"
    agent_section = {
        "base_port": free_udp_base(3),
        "dns": [dns],
        "reporter": reporter,
        "report_interval": 0.5,
    }
    users = [attrs.asdict(u) for u in USERS]
    async with (
        lars_process(
            tmp_path, "dns", ["dns"], {"store": db, "dns": {"listen": dns, "check_interval": 0.5}}
        ),
        lars_process(
            tmp_path, "reporter", ["reporter"], {"store": db, "reporter": {"listen": reporter}}
        ),
        lars_process(tmp_path, "agent", ["agent"], {"agent": agent_section}) as agent,
        lars_process(
            tmp_path,
            "web",
            ["web"],
            {
                "store": db,
                "agent": {"dns": [dns]},
                "web": {"users": users},
                "alarms": {"interval": 1.0, "resend_interval": 0.0},
            },
        ) as web,
    ):
        shots = tmp_path / "screenshots"
        shots.mkdir()
        stack = Stack(web.addresses["web"].rstrip("/"), agent.config_path, shots, db)
        await trio.to_thread.run_sync(operator_and_viewer, stack, browser)
        assert "Traceback" not in web.log, web.log
    assert set(stack.taken) >= {
        "login",
        "overview",
        "module",
        "status",
        "changes",
        "names",
        "import",
        "delete",
        "viewer-module",
        "alarm-rule",
        "alarms-firing",
        "alarms-resolved",
    }
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        shutil.copyfile(shots / "overview.png", target)


def operator_and_viewer(stack: Stack, executable: str) -> None:
    """The scenario, in the browser's thread (Playwright's sync API)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            admin = browser.new_context(viewport={"width": 1360, "height": 900})
            page = admin.new_page()
            page.set_default_timeout(DEADLINE * 1000)
            expect.set_options(timeout=DEADLINE * 1000)
            operator(stack, page, expect)
            viewer = browser.new_context(viewport={"width": 1360, "height": 900})
            viewer_page = viewer.new_page()
            viewer_page.set_default_timeout(DEADLINE * 1000)
            read_only(stack, viewer_page, expect)
        finally:
            browser.close()


def log_in(stack: Stack, page: Any, name: str, shot: str | None = None) -> None:
    page.goto(stack.url + "/")
    assert "/login" in page.url  # nobody is let in without logging in
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(PASSWORDS[name])
    if shot:
        stack.shot(page, shot)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(stack.url + "/")


def operator(stack: Stack, page: Any, expect: Any) -> None:
    modid, cmdid = MODULE
    route = f"{modid}/{cmdid}"
    log_in(stack, page, "alice", shot="login")
    expect(page.locator("header .user")).to_have_text("alice")

    # Add a module with three hosts.
    form = page.locator("form[action='/modules']")
    form.get_by_label("modid").fill(str(modid))
    form.get_by_label("cmdid").fill(str(cmdid))
    form.get_by_label("Hosts").fill("\n".join(HOSTS))
    form.get_by_role("button", name="Add module").click()
    page.wait_for_url(f"{stack.url}/modules/{modid}/{cmdid}")
    expect(page.locator(".flash-ok")).to_contain_text(f"module {route}: added 3 host(s)")
    expect(page.locator("#hosts code")).to_have_text(HOSTS)

    # It is in the overview, and the push reaches the agent.
    page.goto(stack.url + f"/?q={route}")
    expect(page.locator("#modules a.module")).to_have_text([route])
    assert stack.client_route(MODULE) == sorted(HOSTS)
    assert stack.agent_hosts(MODULE) == sorted(HOSTS)

    # Remove a host.
    page.goto(f"{stack.url}/modules/{modid}/{cmdid}")
    page.get_by_label(f"select {HOSTS[2]}").check()
    page.get_by_role("button", name="Remove selected hosts").click()
    expect(page.locator(".flash-ok")).to_contain_text("removed 1 host(s)")
    expect(page.locator("#hosts code")).to_have_text(HOSTS[:2])
    # The agent has the module now: DNS pushes the change to it.
    eventually(lambda: stack.agent_hosts(MODULE) == sorted(HOSTS[:2]), "the push of the removal")

    # The change is in the audit log, under the operator's name.
    page.goto(stack.url + "/changes?actor=alice")
    first = page.locator("table.grid").first.locator("tbody tr").first
    expect(first.locator("td.actor")).to_have_text("alice")
    expect(first.locator("td.removed")).to_contain_text(HOSTS[2])
    expect(first).to_contain_text(route)
    page.goto(stack.url + "/changes")
    stack.shot(page, "changes")

    # Name it.
    page.goto(stack.url + "/names")
    add = page.locator("form.grid-form")
    add.get_by_label("Id", exact=True).fill(str(modid))
    add.get_by_label("Name", exact=True).fill("checkout")
    add.get_by_role("button", name="Save name").click()
    expect(page.locator(".flash-ok")).to_contain_text("is now named 'checkout'")
    stack.shot(page, "names")

    # Import: a file adding a host to another module, previewed, then applied.
    routes = stack.shots.parent / "more-routes.csv"
    routes.write_text("modid,cmdid,ip,port\n103,1,10.0.3.33,7201\n")
    page.goto(stack.url + "/import")
    page.locator("input[type=file]").set_input_files(str(routes))
    page.get_by_role("button", name="Preview changes").click()
    expect(page.locator("#preview")).to_contain_text("1 host(s) added")
    stack.shot(page, "import")
    page.get_by_role("button", name="Apply import").click()
    page.wait_for_url(stack.url + "/changes")
    expect(page.locator(".flash-ok")).to_contain_text("import: added 1 host(s)")

    # A bad host is explained, and nothing is written.
    page.goto(f"{stack.url}/modules/{modid}/{cmdid}")
    page.locator("form[action$='/hosts']").get_by_label("Hosts").fill("10.0.9.4:99999")
    page.get_by_role("button", name="Add hosts").click()
    expect(page.locator(".flash-error")).to_contain_text("hosts: port must be an integer")
    expect(page.locator("#hosts code")).to_have_text(HOSTS[:2])

    # An alarm rule, written in the console: a host of the module failing half its calls.
    page.goto(stack.url + "/alarms")
    rule = page.locator("#rule-form form")
    rule.get_by_label("Name", exact=True).fill(ALARM)
    rule.locator("select[name=kind]").select_option("error_rate")
    rule.get_by_label("Module", exact=True).fill(route)
    rule.get_by_label("Threshold", exact=True).fill("0.5")
    rule.get_by_label("Window (min)", exact=True).fill("2")
    rule.get_by_label("Min. calls", exact=True).fill("5")
    rule.locator("select[name=per]").select_option("host")
    stack.shot(page, "alarm-rule")
    rule.get_by_role("button", name="Save rule").click()
    expect(page.locator(".flash-ok")).to_contain_text(f"rule '{ALARM}' added")
    expect(page.locator(f"#alarm-rules tr[data-rule='{ALARM}']")).to_contain_text("console")

    # Failing traffic, with the reporter writing call statistics: the failing host is
    # marked overloaded on the call status page.
    for module, count, err_rate in TRAFFIC:
        stack.lars(
            "simulate",
            *map(str, module),
            "--count",
            str(count),
            "--err-rate",
            str(err_rate),
            "--seed",
            "1",
        )
    stack.lars(
        "simulate",
        str(modid),
        str(cmdid),
        "--fail",
        FAILING,
        "--err-rate",
        "1.0",
        "--count",
        "600",
        "--seed",
        "1",
    )

    def overloaded_shown() -> bool:
        page.goto(f"{stack.url}/status?modid={modid}&cmdid={cmdid}&overloaded=1")
        return bool(page.locator("#status tbody tr.warn").count() == 1)

    eventually(overloaded_shown, f"the call status marks {FAILING} overloaded")
    row = page.locator("#status tbody tr.warn")
    expect(row).to_contain_text(FAILING)
    expect(row.locator(".badge")).to_have_text("overloaded")
    page.goto(stack.url + "/status?sort=err&desc=1")
    stack.shot(page, "status")

    page.goto(f"{stack.url}/modules/{modid}/{cmdid}")
    expect(page.locator(".subtitle")).to_contain_text("checkout")
    expect(page.locator("#hosts tr.warn")).to_contain_text(FAILING)
    # The chart shows the burst of failures, on the module and on the failing host.
    chart = page.locator("#module-chart svg")
    assert int(chart.get_attribute("data-total-err") or 0) > 0
    assert page.locator("#module-chart g.err rect[data-err]").count() >= 1
    failing_chart = page.locator(f".host-chart[data-host='{FAILING}'] svg")
    assert failing_chart.get_attribute("data-total-err") == chart.get_attribute("data-total-err")
    stack.shot(page, "module")

    page.goto(stack.url + "/")
    expect(
        page.locator(f"#modules tr:has(a[href='/modules/{modid}/{cmdid}']) .badge")
    ).to_have_text("1")
    spark = page.locator(f"#modules tr:has(a[href='/modules/{modid}/{cmdid}']) td.spark svg")
    assert int(spark.get_attribute("data-total-err") or 0) > 0
    stack.shot(page, "overview")

    # The alarm fires, with the host and the error rate that made it.
    def alarm_in(state: str) -> bool:
        page.goto(stack.url + "/alarms")
        row = page.locator(f"#alarm-states tr[data-alarm='{ALARM}']")
        return bool(row.count() == 1 and row.get_attribute("data-state") == state)

    eventually(lambda: alarm_in("firing"), f"the alarm {ALARM} fires")
    row = page.locator(f"#alarm-states tr[data-alarm='{ALARM}']")
    expect(row).to_contain_text(FAILING)
    expect(page.locator("#firing-count")).to_have_text("1 firing")
    stack.shot(page, "alarms-firing")

    # The host recovers: the alarm resolves, and the history shows both transitions.
    stack.lars(
        "simulate", str(modid), str(cmdid), "--fail", FAILING, "--err-rate", "0",
        "--count", "3000", "--seed", "2",
    )  # fmt: skip
    eventually(lambda: alarm_in("resolved"), f"the alarm {ALARM} resolves")
    expect(page.locator("#firing-count")).to_have_text("0 firing")
    events = page.locator(f"#alarm-events tr[data-alarm='{ALARM}']")
    expect(events).to_have_count(2)
    assert [events.nth(i).get_attribute("data-state") for i in range(2)] == [
        "resolved",
        "firing",
    ]
    stack.shot(page, "alarms-resolved")

    # Removing a module asks first; cancelling keeps it.
    page.goto(f"{stack.url}/modules/{modid}/{cmdid}")
    page.get_by_role("link", name="Remove module…").click()
    expect(page.locator("h1")).to_have_text(f"Remove module {route}?")
    stack.shot(page, "delete")
    page.get_by_role("link", name="Cancel").click()
    expect(page.locator("#hosts code")).to_have_text(HOSTS[:2])

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/login")


def read_only(stack: Stack, page: Any, expect: Any) -> None:
    """A viewer sees every page and can change nothing."""
    modid, cmdid = MODULE
    log_in(stack, page, "victor")
    expect(page.locator("header .role")).to_have_text("viewer")
    for path, name in (("/", "viewer-overview"), (f"/modules/{modid}/{cmdid}", "viewer-module")):
        page.goto(stack.url + path)
        expect(page.locator("textarea")).to_have_count(0)
        expect(page.locator("input[type=checkbox]")).to_have_count(0)
        stack.shot(page, name)
    # Even a hand-made POST with the page's own CSRF token is refused.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    for path, form in (
        (f"/modules/{modid}/{cmdid}/delete", {}),
        (f"/modules/{modid}/{cmdid}/hosts", {"hosts": "10.0.9.9:7601"}),
        ("/names", {"kind": "mod", "id": str(modid), "name": "mine"}),
    ):
        answer = page.request.post(stack.url + path, form={"csrf": csrf or "", **form})
        assert answer.status == 403, (path, answer.status)
    assert stack.agent_hosts(MODULE) == sorted(HOSTS[:2])
    page.goto(f"{stack.url}/modules/{modid}/{cmdid}")
    expect(page.locator("#hosts code")).to_have_text(HOSTS[:2])
    expect(page.locator(".subtitle")).to_contain_text("checkout")
