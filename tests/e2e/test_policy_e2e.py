"""Scheduling policies end to end (issue 14): routes with zones written by ``lars route add
--zone``, served by a real DNS process to a real agent process in zone "a", used through
lars.client; ``lars query --explain`` shows it."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from lars.client import LarsClient
from lars.core.model import Host
from lars.errors import Overloaded
from tests.e2e.procs import lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = pytest.mark.e2e

ZONE_A = [Host(f"10.1.0.{i}", 7000 + i) for i in (1, 2, 3)]
ZONE_B = [Host(f"10.2.0.{i}", 7000 + i) for i in (1, 2, 3)]
BUCKET = 0.1


def configs(db: str, dns: int, base: int) -> tuple[dict[str, Any], dict[str, Any]]:
    dns_config = {"store": db, "dns": {"listen": f"127.0.0.1:{dns}", "check_interval": 0.5}}
    agent_config = {
        "agent": {
            "base_port": base,
            "dns": [f"127.0.0.1:{dns}"],
            "reporter": f"127.0.0.1:{free_tcp_port()}",  # nothing there: never a default port
            "retry_max": 0.5,
            "route_wait": 2.0,
            "zone": "a",
            # §6 probes an overloaded host every probe_num-th request (10), whatever the
            # policy: ~9% of calls would keep going to the failed zone. probe_interval
            # paces the probes to one per host per second.
            "loadbalance": {"zone_affinity": True, "probe_interval": 1.0},
        },
    }
    return dns_config, agent_config


async def test_zone_outage_callers_errors_fall_under_1_percent_within_a_second(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'lars.db'}"
    dns_port, base = free_tcp_port(), free_udp_base(3)
    cli = tmp_path / "cli.toml"
    cli.write_text(f'store = "{db}"\n[agent]\nbase_port = {base}\ndns = ["127.0.0.1:{dns_port}"]\n')
    await lars_cli("db", "init", "--config", str(cli))
    await lars_cli("route", "add", "1", "1", *map(str, ZONE_A), "--zone", "a", "--config", str(cli))
    await lars_cli("route", "add", "1", "1", *map(str, ZONE_B), "--zone", "b", "--config", str(cli))
    dns_config, agent_config = configs(db, dns_port, base)
    async with (
        lars_process(tmp_path, "dns", ["dns"], dns_config),
        lars_process(tmp_path, "agent", ["agent"], agent_config),
    ):
        rng = random.Random(3)
        buckets: list[list[int]] = []  # [calls, errors, calls out of zone a]
        with LarsClient(base_port=base, timeout=0.5, retries=2) as client:
            client.reg_init(1, 1)
            began = time.monotonic()
            fail_at = began + 1.0
            end = began + 4.0
            while (now := time.monotonic()) < end:
                index = int((now - began) / BUCKET)
                while len(buckets) <= index:
                    buckets.append([0, 0, 0])
                bucket = buckets[index]
                bucket[0] += 1
                try:
                    with client.call(1, 1) as host:
                        if host in ZONE_B:
                            bucket[2] += 1
                        if now >= fail_at and host in ZONE_A and rng.random() < 0.999:
                            raise ConnectionError  # zone a is down
                except (ConnectionError, Overloaded):
                    bucket[1] += 1
            state = json.loads(
                await lars_cli("query", "1", "1", "--explain", "--json", "--config", str(cli))
            )
    before = buckets[: int(1.0 / BUCKET)]
    assert sum(b[0] for b in before) > 500
    assert sum(b[1] for b in before) == 0
    assert sum(b[2] for b in before) == 0  # all in the agent's own zone
    # From one second after the outage on, callers see under 1% errors: what fails is the
    # paced probes, at most one per failed host per second (two rounds in these 1.9 s).
    after = buckets[int(2.0 / BUCKET) : int(4.0 / BUCKET) - 1]
    calls = sum(b[0] for b in after)
    errors = sum(b[1] for b in after)
    assert all(b[0] > 50 for b in after)
    assert errors / calls < 0.01, buckets
    assert errors <= 2 * len(ZONE_A), buckets
    assert all(b[1] <= len(ZONE_A) for b in after), buckets
    assert all(out >= 0.98 * calls for calls, _, out in after)
    # and --explain says why
    assert state["policy"]["zone_affinity"] is True
    assert state["agent_zone"] == "a"
    assert state["zone_spill"] == 1.0
    by_host = {h["host"]: h for h in state["hosts"]}
    assert {by_host[str(h)]["zone"] for h in ZONE_A} == {"a"}
    assert all(by_host[str(h)]["state"] == "overload" for h in ZONE_A)
    assert all(by_host[str(h)]["share"] == pytest.approx(1 / 3, abs=0.001) for h in ZONE_B)
