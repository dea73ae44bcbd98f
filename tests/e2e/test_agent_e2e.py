"""dns and agent as real processes on MariaDB, used through lars.client and lars query."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from lars.client import LarsClient
from lars.core.model import Host
from tests.e2e.procs import LarsProcess, lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

H1, H2, H3 = (Host(f"10.0.0.{i}", 7000 + i) for i in (1, 2, 3))


class Stack:
    """A dns process and an agent process, and what a test needs to use them."""

    def __init__(self, tmp_path: Path, db_url: str, dns_port: int, agent_base: int) -> None:
        self.tmp_path = tmp_path
        self.db_url = db_url
        self.dns_address = f"127.0.0.1:{dns_port}"
        self.agent_base = agent_base
        self.config_path = tmp_path / "cli.toml"
        self.config_path.write_text(
            f'store = "{db_url}"\n[agent]\nbase_port = {agent_base}\ndns = ["{self.dns_address}"]\n'
        )

    def client(self) -> LarsClient:
        return LarsClient(base_port=self.agent_base, timeout=0.5, retries=2)

    async def route(self, *args: str) -> None:
        await lars_cli("route", *args, "--config", str(self.config_path))

    async def query(self, modid: int, cmdid: int) -> dict[str, Any]:
        out = await lars_cli(
            "query", str(modid), str(cmdid), "--json", "--config", str(self.config_path)
        )
        result: dict[str, Any] = json.loads(out)
        return result


def dns_config(db_url: str, port: int) -> dict[str, Any]:
    return {"store": db_url, "dns": {"listen": f"127.0.0.1:{port}", "check_interval": 0.5}}


def agent_config(base: int, dns: list[str], **loadbalance: float) -> dict[str, Any]:
    return {
        "agent": {
            "base_port": base,
            "dns": dns,
            "reporter": f"127.0.0.1:{free_tcp_port()}",  # nothing there: never a default port
            "retry_max": 0.5,
            "route_wait": 2.0,
            "loadbalance": loadbalance,
        },
    }


@asynccontextmanager
async def stack(tmp_path: Path, db_url: str, **loadbalance: float) -> AsyncIterator[Stack]:
    dns_port, base = free_tcp_port(), free_udp_base(3)
    async with (
        lars_process(tmp_path, "dns", ["dns"], dns_config(db_url, dns_port)),
        lars_process(
            tmp_path,
            "agent",
            ["agent"],
            agent_config(base, [f"127.0.0.1:{dns_port}"], **loadbalance),
        ),
    ):
        yield Stack(tmp_path, db_url, dns_port, base)


async def test_round_robin_over_three_hosts(tmp_path: Path, db_url: str) -> None:
    async with stack(tmp_path, db_url) as s:
        await s.route("add", "1", "1", str(H1), str(H2), str(H3))
        with s.client() as client:
            hosts = [client.get_host(1, 1) for _ in range(9)]
        assert set(hosts[:3]) == {H1, H2, H3}
        assert hosts == hosts[:3] * 3


async def test_failing_host_is_probed_then_returns_after_successes(
    tmp_path: Path, db_url: str
) -> None:
    async with stack(tmp_path, db_url) as s:
        await s.route("add", "1", "1", str(H1), str(H2), str(H3))
        with s.client() as client:
            client.get_host(1, 1)
            for _ in range(15):
                client.report(1, 1, H2, ok=False)
            await trio.sleep(0.1)
            state = await s.query(1, 1)
            by_host = {h["host"]: h for h in state["hosts"]}
            assert state["status"] == "ready"
            assert by_host[str(H2)]["state"] == "overload"
            assert by_host[str(H2)]["verr"] == 5  # reset on becoming overloaded
            assert by_host[str(H1)]["state"] == by_host[str(H3)]["state"] == "idle"

            # H2 only comes back as a probe: once every probe_num (10) + 1 requests.
            hosts = [client.get_host(1, 1) for _ in range(33)]
            probes = [i for i, h in enumerate(hosts) if h == H2]
            assert len(probes) == 3
            assert probes[1] - probes[0] == probes[2] - probes[1] == 11

            # Successful probes bring it back: vsucc/(vsucc+verr) > 0.5 after 6 successes.
            successes = 0
            while successes < 6:
                host = client.get_host(1, 1)
                if host == H2:
                    client.report(1, 1, host, ok=True)
                    successes += 1
            await trio.sleep(0.1)
            assert {h["host"]: h["state"] for h in (await s.query(1, 1))["hosts"]} == {
                str(H1): "idle",
                str(H2): "idle",
                str(H3): "idle",
            }
            assert {client.get_host(1, 1) for _ in range(3)} == {H1, H2, H3}


async def test_overloaded_host_returns_after_overload_timeout_without_reports(
    tmp_path: Path, db_url: str
) -> None:
    async with stack(tmp_path, db_url, overload_timeout=1.5) as s:
        await s.route("add", "1", "1", str(H1), str(H2))
        with s.client() as client:
            client.get_host(1, 1)
            for _ in range(15):
                client.report(1, 1, H1, ok=False)
            await trio.sleep(0.1)
            assert [client.get_host(1, 1) for _ in range(5)] == [H2] * 5
            await trio.sleep(1.6)
            assert {client.get_host(1, 1) for _ in range(2)} == {H1, H2}


async def test_hosts_added_and_removed_in_the_database_reach_the_agent(
    tmp_path: Path, db_url: str
) -> None:
    async with stack(tmp_path, db_url) as s:
        await s.route("add", "2", "1", str(H1))
        with s.client() as client:
            assert client.get_route(2, 1) == [H1]
            await s.route("add", "2", "1", str(H2))
            await wait_for(lambda: sorted(client.get_route(2, 1)) == [H1, H2])
            await s.route("rm", "2", "1", str(H1))
            await wait_for(lambda: client.get_route(2, 1) == [H2])
            assert {client.get_host(2, 1) for _ in range(4)} == {H2}
            await s.route("rm", "2", "1", "--all", "--force")
            await wait_for(lambda: _no_route(client, 2, 1))
            assert (await s.query(2, 1))["status"] == "unknown"  # dropped from the agent


async def test_dns_killed_agent_serves_from_cache_and_resubscribes(
    tmp_path: Path, db_url: str
) -> None:
    dns_port, base = free_tcp_port(), free_udp_base(3)
    s = Stack(tmp_path, db_url, dns_port, base)
    await s.route("add", "3", "1", str(H1))
    agent_cfg = agent_config(base, [s.dns_address])
    async with lars_process(tmp_path, "agent", ["agent"], agent_cfg) as agent:
        dns = LarsProcess(tmp_path, "dns", ["dns"], dns_config(db_url, dns_port))
        await dns.start()
        with s.client() as client:
            assert client.get_host(3, 1) == H1
            await dns.stop(signal.SIGKILL)
            await trio.sleep(0.3)
            assert [client.get_host(3, 1) for _ in range(3)] == [H1, H1, H1]  # from cache
            await s.route("add", "3", "1", str(H2))  # the DNS notification fails: it is down
            dns2 = LarsProcess(tmp_path, "dns2", ["dns"], dns_config(db_url, dns_port))
            await dns2.start()
            try:
                # The agent reconnects and asks again for the modules it knows.
                await wait_for(lambda: sorted(client.get_route(3, 1)) == [H1, H2], timeout=10)
            finally:
                await dns2.stop()
        assert "lost dns" in agent.log
        assert agent.log.count("connected to dns") >= 2


async def test_two_dns_addresses_with_the_first_down(tmp_path: Path, db_url: str) -> None:
    live, dead, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    s = Stack(tmp_path, db_url, live, base)
    await s.route("add", "4", "1", str(H3))
    dns_list = [f"127.0.0.1:{dead}", f"127.0.0.1:{live}"]
    async with (
        lars_process(tmp_path, "dns", ["dns"], dns_config(db_url, live)),
        lars_process(tmp_path, "agent", ["agent"], agent_config(base, dns_list)) as agent,
    ):
        with s.client() as client:
            assert client.get_host(4, 1) == H3
        assert f"connected to dns 127.0.0.1:{live}" in agent.log


def _no_route(client: LarsClient, modid: int, cmdid: int) -> bool:
    from lars.errors import NoRoute

    try:
        client.get_route(modid, cmdid)
    except NoRoute:
        return True
    return False


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)
