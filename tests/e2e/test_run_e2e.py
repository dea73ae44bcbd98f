"""``lars run`` with no role (the quickstart), and the bench and simulate tools against it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from lars import wire
from lars.client import LarsClient
from lars.core.model import Host, format_host
from lars.roles.common import ask
from lars.store import open_store
from tests import mysql_admin
from tests.e2e.procs import (
    LARS,
    STARTUP_TIMEOUT,
    LarsProcess,
    Proxy,
    lars_cli,
    lars_process,
    write_config,
)
from tests.netutil import free_tcp_port, free_udp_base
from tests.store.test_legacy_schema import FILL, ORIGINAL_TABLES

pytestmark = pytest.mark.e2e

H1, H2, H3 = (Host(f"10.0.0.{i}", 7000 + i) for i in (1, 2, 3))


class Quickstart:
    """``lars run`` in an empty directory: default store (./lars.db), ports of our choosing."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.base = free_udp_base(3)
        dns, reporter = free_tcp_port(), free_tcp_port()
        # No store key: the default sqlite:///lars.db, relative to the working directory.
        config = {
            "dns": {"listen": f"127.0.0.1:{dns}"},
            "reporter": {"listen": f"127.0.0.1:{reporter}"},
            "agent": {
                "base_port": self.base,
                "dns": [f"127.0.0.1:{dns}"],
                "reporter": f"127.0.0.1:{reporter}",
            },
        }
        self.process = LarsProcess(workdir, "lars", [], config)
        self.config = str(self.process.config_path)

    async def lars(self, *argv: str) -> str:
        return await lars_cli(*argv, "--config", self.config, cwd=self.workdir)


@pytest.fixture
async def quickstart(tmp_path: Path) -> AsyncIterator[Quickstart]:
    q = Quickstart(tmp_path)
    await q.process.start()
    try:
        yield q
    finally:
        q.process.kill()
        assert q.process.process is not None
        await q.process.process.wait()


async def test_lars_run_starts_all_roles_on_a_new_sqlite_store(quickstart: Quickstart) -> None:
    assert set(quickstart.process.addresses) == {"dns", "reporter", "agent", "web", "http"}
    assert (quickstart.workdir / "lars.db").exists()  # created with its tables
    log = quickstart.process.log
    assert "dns listening on" in log and "reporter listening on" in log
    assert "agent API on udp" in log
    await quickstart.lars("route", "add", "1", "1", str(H1), str(H2))
    with LarsClient(base_port=quickstart.base) as client:
        assert {client.get_host(1, 1) for _ in range(4)} == {H1, H2}


async def test_ctrl_c_stops_cleanly_and_flushes_the_last_statistics(
    quickstart: Quickstart,
) -> None:
    await quickstart.lars("route", "add", "1", "1", str(H1))
    with LarsClient(base_port=quickstart.base) as client:
        client.get_host(1, 1)
        for _ in range(9):
            client.report(1, 1, H1, ok=True)
    await trio.sleep(0.1)
    started = time.monotonic()
    status = await quickstart.process.stop(signal.SIGINT)
    assert status == 0
    assert time.monotonic() - started < 5.0 + 1.0  # within the grace deadline
    assert "SIGINT received" in quickstart.process.log
    async with open_store(f"sqlite:///{quickstart.workdir}/lars.db") as store:
        (row,) = await store.read_call_status(1, 1)
    assert row.succ_total == 9  # sent and stored before the process exited


async def test_bench_reports_rates_and_latencies(quickstart: Quickstart) -> None:
    await quickstart.lars("route", "add", "1", "1", str(H1), str(H2))
    await quickstart.lars("route", "add", "1", "2", str(H3))
    out = await quickstart.lars("bench", "--workers", "2", "--duration", "1", "--json")
    result = json.loads(out)
    assert set(result) == {"workers", "duration", "loops_per_s", "per_worker", "p50_us", "p99_us"}
    assert result["workers"] == 2 and result["duration"] == 1.0
    workers = result["per_worker"]
    assert [(w["modid"], w["cmdid"]) for w in workers] == [(1, 1), (1, 2)]
    assert all(w["loops"] > 100 and w["errors"] == 0 for w in workers)
    assert result["loops_per_s"] == pytest.approx(sum(w["loops_per_s"] for w in workers), 0.01)
    assert 0 < result["p50_us"] <= result["p99_us"]
    text = await quickstart.lars("bench", "--duration", "0.5")
    assert "loops/s" in text and "p99" in text


async def test_bench_without_a_route_is_a_clear_error(quickstart: Quickstart) -> None:
    result = await trio.run_process(
        [*LARS, "bench", "--modid", "77", "--duration", "0.5", "--config", quickstart.config],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=quickstart.workdir,
    )
    assert result.returncode == 1
    assert b"no route for module 77/1" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_simulate_shows_the_failing_host_avoided(quickstart: Quickstart) -> None:
    await quickstart.lars("route", "add", "1", "1", str(H1), str(H2), str(H3))
    out = await quickstart.lars(
        "simulate", "1", "1", "--err-rate", "0.5", "--count", "3000", "--seed", "7", "--json"
    )
    result = json.loads(out)
    hosts = {h["host"]: h for h in result["hosts"]}
    assert hosts[str(H1)]["failing"] and not hosts[str(H2)]["failing"]
    assert hosts[str(H2)]["err"] == hosts[str(H3)]["err"] == 0
    assert hosts[str(H1)]["err"] > 0
    calls = sum(h["calls"] for h in hosts.values()) + result["overloaded"]
    assert calls == 3000
    share = hosts[str(H1)]["calls"] / 3000
    assert share < 0.25  # well under the even third it would get without the balancer
    text = await quickstart.lars("simulate", "1", "1", "--count", "500", "--fail", str(H2))
    assert "failing hosts got" in text and str(H2) in text


async def test_stats_shows_each_roles_counters(quickstart: Quickstart) -> None:
    dns = json.loads(
        await quickstart.lars("stats", "--dns", quickstart.process.addresses["dns"], "--json")
    )
    assert dns["store_ok"] == 1 and dns["connections"] >= 1  # the agent's connection
    reporter_address = quickstart.process.addresses["reporter"]
    reporter = json.loads(await quickstart.lars("stats", "--reporter", reporter_address, "--json"))
    assert reporter["connections_accepted"] >= 1
    # Garbage sent to the agent is dropped and counted, and the count is visible.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"\xc1garbage", ("127.0.0.1", quickstart.base))
    await trio.sleep(0.2)
    agent = json.loads(await quickstart.lars("stats", "--agent", "--json"))
    assert agent["malformed_datagrams"] == 3
    assert agent["dns_connected"] == 1
    text = await quickstart.lars("stats", "--agent")
    assert "malformed_datagrams" in text


async def test_stats_needs_exactly_one_role(quickstart: Quickstart) -> None:
    result = await trio.run_process(
        [*LARS, "stats", "--config", quickstart.config], capture_stderr=True, check=False
    )
    assert result.returncode == 2 and b"exactly one of" in result.stderr


# --- a store that can never work stops a daemon at start-up ------------------------------------


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return f"mysql://{parts.username or 'root'}:{password}@{parts.hostname}:{parts.port or 3306}"


async def run_to_exit(tmp_path: Path, role: str, store: str) -> subprocess.CompletedProcess[bytes]:
    """``lars run --role ROLE --store STORE`` on free ports; its result once it exits."""
    config = write_config(
        tmp_path / "fails.toml",
        {
            "dns": {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
            "reporter": {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
        },
    )
    argv = [*LARS, "run", "--role", role, "--store", store, "--config", str(config)]
    with trio.fail_after(STARTUP_TIMEOUT):  # today's behaviour: retrying forever
        return await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path
        )


@pytest.mark.mysql
@pytest.mark.parametrize(
    ("role", "database", "needle"),
    [
        ("dns", "unknown", "database 'lars_no_such_database' does not exist"),
        ("reporter", "unknown", "database 'lars_no_such_database' does not exist"),
        ("dns", "empty", "not initialised (missing table RouteData, table RouteVersion"),
        (
            "reporter",
            "empty",
            "(missing table ServerCallStatus, table CallHistory, table ReportBatch)",
        ),
        ("reporter", "original", "(missing column ServerCallStatus.succ_total, column"),
        ("dns", "wrong password", "access denied"),
        ("reporter", "wrong password", "access denied"),
    ],
)
async def test_a_store_that_can_never_work_stops_the_daemon_with_one_line(
    role: str, database: str, needle: str, tmp_path: Path
) -> None:
    server = mysql_admin.server_url()
    if database == "unknown":
        result = await run_to_exit(tmp_path, role, f"{server}/lars_no_such_database")
    elif database == "wrong password":
        url = f"{_with_password(server, 'not-the-password')}/lars_no_such_database"
        result = await run_to_exit(tmp_path, role, url)
    else:
        async with mysql_admin.fresh_database() as url:
            if database == "original":
                await mysql_admin.execute(url, *ORIGINAL_TABLES)
            result = await run_to_exit(tmp_path, role, url)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    (line,) = err.strip().splitlines()
    assert needle in line and line.startswith("Error: ")
    if "not initialised" in needle or "missing column" in needle:
        assert "run `lars db init`" in line


@pytest.mark.mysql
async def test_the_dns_serves_an_original_database_that_lars_db_init_never_touched(
    tmp_path: Path,
) -> None:
    async with mysql_admin.fresh_database() as url:
        await mysql_admin.execute(url, *ORIGINAL_TABLES, *FILL)
        config = {"store": url, "dns": {"listen": "127.0.0.1:0"}}
        async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
            reply = await ask(dns.addresses["dns"], wire.GetRouteRequest(1, 1))
            assert isinstance(reply, wire.GetRouteResponse)
            assert [format_host(h) for h in reply.hosts] == ["192.168.1.177:7777"]


@pytest.mark.mysql
async def test_an_unreachable_store_at_start_up_is_waited_for(tmp_path: Path) -> None:
    async with mysql_admin.fresh_database(init=True) as url, trio.open_nursery() as nursery:
        parts = urlsplit(url)
        proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 3306))
        proxy.disable()  # accepts and hangs up: the server is not up yet
        port = await nursery.start(proxy.serve)
        via_proxy = f"mysql://{parts.username}@127.0.0.1:{port}{parts.path}?connect_timeout=1"
        process = LarsProcess(
            tmp_path,
            "reporter",
            ["reporter"],
            {"store": via_proxy, "reporter": {"listen": "127.0.0.1:0"}},
        )
        async with trio.open_nursery() as starting:
            starting.start_soon(process.start)
            with trio.fail_after(STARTUP_TIMEOUT):
                while "unreachable at start-up" not in process.log:
                    await trio.sleep(0.05)
            await trio.sleep(1.0)
            assert process.process is not None and process.process.poll() is None
            assert "running:" not in process.log
            proxy.enable()  # the server is up: the reporter starts
        try:
            assert "reporter" in process.addresses
            assert process.log.count("unreachable at start-up") == 1  # logged once, not per try
            assert "Traceback" not in process.log
        finally:
            assert await process.stop() == 0
        nursery.cancel_scope.cancel()
