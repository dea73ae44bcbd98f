"""The fleet view end to end (issue 15, DESIGN §14): three agents (three callers, each its
own loopback address) see one host overloaded; a DNS with ``fleet_view`` on reads that
from the reporter's ServerCallStatus and demotes the host for a fourth agent that never
called it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from lars.client import LarsClient
from lars.core.model import Host
from tests.e2e.procs import lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

GOOD = Host("10.8.0.1", 9001)
BAD = Host("10.8.0.2", 9002)


def host_state(client: LarsClient, host: Host) -> dict[str, Any]:
    state = client.agent_state(1, 1)
    assert state is not None
    return next(h for h in state["hosts"] if h["host"] == str(host))


async def test_three_callers_seeing_a_host_overloaded_demote_it_for_a_fourth(
    tmp_path: Path, db_url: str
) -> None:
    await lars_cli("route", "add", "1", "1", str(GOOD), str(BAD), "--store", db_url, "--no-notify")
    dns, reporter = f"127.0.0.1:{free_tcp_port()}", f"127.0.0.1:{free_tcp_port()}"
    servers = {
        "store": db_url,
        "dns": {
            "listen": dns,
            "fleet_view": True,
            "demote_callers": 3,
            "demote_share": 0.5,
            "fleet_interval": 0.5,
        },
        "reporter": {"listen": reporter},
    }
    bases = [free_udp_base(3) for _ in range(4)]

    def agent(i: int) -> dict[str, Any]:
        return {
            "agent": {
                "base_port": bases[i],
                "dns": [dns],
                "reporter": reporter,
                "ip": f"127.0.0.{i + 1}",  # the caller id the reporter stores
                "report_interval": 0.2,
            }
        }

    async with (
        lars_process(tmp_path, "servers", ["dns", "reporter"], servers),
        lars_process(tmp_path, "agent0", ["agent"], agent(0)),
        lars_process(tmp_path, "agent1", ["agent"], agent(1)),
        lars_process(tmp_path, "agent2", ["agent"], agent(2)),
        lars_process(tmp_path, "agent3", ["agent"], agent(3)),
    ):
        clients = [LarsClient(base_port=b, timeout=0.5, retries=2) for b in bases]
        # the fourth agent knows the route, and both hosts are idle in its view
        assert {str(h) for h in clients[3].get_route(1, 1)} == {str(GOOD), str(BAD)}
        assert host_state(clients[3], BAD)["state"] == "idle"
        # two callers failing on BAD are not enough (demote_callers = 3) ...
        for client in clients[:2]:
            for _ in range(40):
                host = client.get_host(1, 1)
                client.report(1, 1, host, ok=host != BAD)
            client.flush()
            assert host_state(client, BAD)["state"] == "overload"
        await trio.sleep(2.0)  # several report and fleet rounds
        assert host_state(clients[3], BAD)["state"] == "idle"
        assert not host_state(clients[3], BAD)["demoted"]
        # ... the third is
        for _ in range(40):
            host = clients[2].get_host(1, 1)
            clients[2].report(1, 1, host, ok=host != BAD)
        clients[2].flush()
        with trio.fail_after(10):
            while not host_state(clients[3], BAD)["demoted"]:
                await trio.sleep(0.1)
        line = host_state(clients[3], BAD)
        assert line["state"] == "overload"  # never called by agent 3: it starts overloaded
        assert not host_state(clients[3], GOOD)["demoted"]
        # so agent 3's callers go to GOOD, except for the §6 probes of BAD
        picks = [clients[3].get_host(1, 1) for _ in range(100)]
        assert picks.count(BAD) <= 100 // 10 + 1
        out = await lars_cli("query", "1", "1", "--config", str(_client_config(tmp_path, bases[3])))
        lines = out.splitlines()
        assert lines[1].split()[-1] == "DEMOTED"
        assert next(x for x in lines if x.startswith(str(BAD))).split()[-1] == "yes"
        assert next(x for x in lines if x.startswith(str(GOOD))).split()[-1] != "yes"
        for client in clients:
            client.close()


def _client_config(tmp_path: Path, base: int) -> Path:
    path = tmp_path / "query.toml"
    path.write_text(f"[agent]\nbase_port = {base}\n")
    return path
