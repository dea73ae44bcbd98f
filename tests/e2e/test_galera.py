"""Lars on a real 3-node MariaDB Galera cluster on loopback (issue 18).

One cluster for the module (``tests/galera.py``: three mariadbd as the ``mysql`` user, their
own datadirs and ports, ``--skip-name-resolve``), a fresh database per test. Select these
tests with ``-m galera``. A machine without ``galera-4``, ``rsync`` or root fails them: CI
installs what they need (``.ci/run``).

The faults are real: ``gmcast.isolate=1`` cuts a node off from the other two (it turns
non-primary and answers 1047/1180), and a node is killed with SIGKILL.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lars.client import LarsClient
from lars.core.model import Host
from lars.store import RouteStore, open_store
from lars.store.mysql import MysqlStore
from tests.e2e.procs import LarsProcess, lars_cli, lars_process
from tests.galera import GaleraCluster, describe
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = [pytest.mark.galera, pytest.mark.mysql, pytest.mark.e2e]

H1, H2, H3 = (Host(f"10.0.0.{i}", 7000 + i) for i in (1, 2, 3))


@pytest.fixture(scope="module")
def cluster() -> Iterator[GaleraCluster]:
    """Three synced nodes; every mariadbd killed at the end of the module."""
    with GaleraCluster(3) as started:
        yield started


@pytest.fixture
async def database(cluster: GaleraCluster) -> AsyncIterator[str]:
    """A fresh database with Lars's tables on the cluster (its name)."""
    for node in cluster.nodes:  # a test before may have left a node out or down
        if not node.alive():
            await trio.to_thread.run_sync(cluster.restart, node.index)
    name = f"lars_galera_{uuid.uuid4().hex[:8]}"
    await trio.to_thread.run_sync(cluster.create_database, name)
    async with open_store(f"{cluster.server_url(0)}/{name}") as store:
        await store.init_schema()
    try:
        yield name
    finally:
        await trio.to_thread.run_sync(cluster.drop_database, name)


def url(cluster: GaleraCluster, database: str, *nodes: int, options: str = "") -> str:
    return f"{cluster.server_url(*nodes)}/{database}{options}"


async def on_every_node(cluster: GaleraCluster, database: str, query: str) -> list[Any]:
    """The rows of ``query`` on each live node, read after the node applied everything
    committed before (wsrep_sync_wait)."""
    statement = f"SET SESSION wsrep_sync_wait = 1; {query}"
    return await trio.to_thread.run_sync(cluster.query_all, database, statement)


# --- 1. route writes on three nodes at once ------------------------------------------------


async def test_three_writers_on_three_nodes_all_succeed(
    cluster: GaleraCluster, database: str
) -> None:
    """600 route writes, 200 from each of three writers on three different nodes at once:
    Galera fails the losers of each collision at COMMIT (1213); the store re-runs them, so
    none fails. Every node then holds the same rows, and versions only ever rose."""
    writes_each = 200
    versions: dict[int, list[int]] = {}
    stores: list[RouteStore] = [open_store(url(cluster, database, i)) for i in range(3)]
    try:

        async def writer(w: int) -> None:
            mine = versions.setdefault(w, [])
            for k in range(writes_each):
                module = (1, k % 5)
                host = (0x0A000000 + (w << 16) + k + 1, 7000 + w)
                write = await stores[w].add_hosts(module, [host])
                assert write.version is not None
                mine.append(write.version)

        async with trio.open_nursery() as nursery:
            for w in range(3):
                nursery.start_soon(writer, w)
        retried = sum(s.conflict_retries for s in stores if isinstance(s, MysqlStore))
    finally:
        for store in stores:
            await store.aclose()
    # Each writer saw its versions rise; all 600 versions are distinct.
    for mine in versions.values():
        assert mine == sorted(mine) and len(set(mine)) == writes_each
    every = [v for mine in versions.values() for v in mine]
    assert len(set(every)) == 3 * writes_each
    # The collisions were real, and retried.
    assert retried > 0
    # Identical rows on every node.
    routes = await on_every_node(
        cluster,
        database,
        "SELECT modid, cmdid, serverip, serverport FROM RouteData"
        " ORDER BY modid, cmdid, serverip, serverport",
    )
    assert len(routes) == 3 and routes[0] == routes[1] == routes[2]
    assert len(routes[0]) == 3 * writes_each
    changes = await on_every_node(
        cluster, database, "SELECT modid, cmdid, version FROM RouteChange ORDER BY version"
    )
    assert changes[0] == changes[1] == changes[2]
    assert sorted(int(row[2]) for row in changes[0]) == sorted(every)
    versions_now = await on_every_node(
        cluster, database, "SELECT version FROM RouteVersion WHERE id = 1"
    )
    assert versions_now == [[[str(max(every))]]] * 3

    # The CLI too: 3 x 10 `lars route add` on three nodes at once, none fails.
    async def cli_writer(w: int) -> None:
        for k in range(10):
            await lars_cli(
                "route", "add", "2", str(w), f"10.9.{w}.{k + 1}:80",
                "--store", url(cluster, database, w), "--no-notify",
            )  # fmt: skip

    async with trio.open_nursery() as nursery:
        for w in range(3):
            nursery.start_soon(cli_writer, w)
    counts = await on_every_node(
        cluster, database, "SELECT cmdid, COUNT(*) FROM RouteData WHERE modid = 2 GROUP BY cmdid"
    )
    assert counts[0] == counts[1] == counts[2] == [["0", "10"], ["1", "10"], ["2", "10"]]


# --- processes -----------------------------------------------------------------------------


async def add_route(store_url: str) -> None:
    async with open_store(store_url) as store:
        await store.add_hosts((1, 1), [h.key for h in (H1, H2, H3)])


async def stored_calls(cluster: GaleraCluster, database: str) -> int:
    """succ_total + err_total of module 1/1 over every host and caller (read on a node
    that is synced)."""
    for node in cluster.nodes:
        if node.alive() and node.status().get("wsrep_ready") == "ON":
            rows = await trio.to_thread.run_sync(
                node.sql,
                f"USE `{database}`; SET SESSION wsrep_sync_wait = 1;"
                " SELECT COALESCE(SUM(succ_total + err_total), 0) FROM ServerCallStatus"
                " WHERE modid = 1 AND cmdid = 1",
            )
            return int(rows[0][0])
    raise AssertionError(f"no synced node to read from: {describe(cluster)}")


async def run_bench(agent: LarsProcess, seconds: float, out: dict[str, Any]) -> None:
    text = await lars_cli(
        "bench", "--duration", str(seconds), "--json", "--config", str(agent.config_path)
    )
    out.update(json.loads(text))


async def stored_becomes(cluster: GaleraCluster, database: str, loops: int) -> int:
    """Wait (up to 60 s) until the stored calls reach ``loops``; then a little longer, so
    that a count stored twice would show. Returns the final count."""
    with trio.move_on_after(60):
        while await stored_calls(cluster, database) < loops:
            await trio.sleep(0.5)
    await trio.sleep(1.5)
    return await stored_calls(cluster, database)


def agent_config(base: int, dns: list[str], reporter: str) -> dict[str, Any]:
    return {
        "agent": {
            "base_port": base,
            "dns": dns,
            "reporter": reporter,
            "report_interval": 0.2,
            "retry_max": 0.3,
        }
    }


def loops_of(result: dict[str, Any]) -> int:
    assert all(w["errors"] == 0 for w in result["per_worker"]), result
    return sum(int(w["loops"]) for w in result["per_worker"])


# --- 2. a reporter whose node is cut off ---------------------------------------------------


async def test_reporter_holds_statistics_while_its_node_is_cut_off(
    tmp_path: Path, cluster: GaleraCluster, database: str
) -> None:
    """`lars bench` load while the reporter's only node is cut off from the cluster for
    10 s: the reporter holds (1047/1180 mean "unavailable"), the agent keeps its counts, and
    in the end the stored calls equal the loops, exactly."""
    await add_route(url(cluster, database, 0))
    dns, reporter, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    cut = 2
    async with (
        lars_process(
            tmp_path,
            "dns",
            ["dns"],
            {"store": url(cluster, database, 0), "dns": {"listen": f"127.0.0.1:{dns}"}},
        ),
        lars_process(
            tmp_path,
            "reporter",
            ["reporter"],
            {
                "store": url(cluster, database, cut, options="?connect_timeout=1"),
                "reporter": {"listen": f"127.0.0.1:{reporter}", "retry_max": 0.5},
            },
        ) as reporter_process,
        lars_process(
            tmp_path,
            "agent",
            ["agent"],
            agent_config(base, [f"127.0.0.1:{dns}"], f"127.0.0.1:{reporter}"),
        ) as agent,
    ):
        with LarsClient(base_port=base, timeout=0.5) as client:
            client.get_host(1, 1)  # the agent has the route before the bench starts
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_bench, agent, 16.0, result)
            await trio.sleep(3)
            await trio.to_thread.run_sync(cluster.isolate, cut)
            await trio.to_thread.run_sync(cluster.wait_primary_without, cut)
            cut_at = time.monotonic()
            before = await stored_calls(cluster, database)
            await trio.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))
            during = await stored_calls(cluster, database)
            await trio.to_thread.run_sync(cluster.rejoin, cut)
        loops = loops_of(result)
        stored = await stored_becomes(cluster, database, loops)
        log = reporter_process.log
    assert before == during, "the cut-off reporter stored nothing meanwhile"
    assert stored == loops, (stored, loops, log[-3000:])
    assert "holding reports" in log
    assert re.search(r"error 10(47|180)|not synced|1180", log), log[-3000:]
    assert "dropped" not in log


# --- 3. a DNS whose node is cut off --------------------------------------------------------


async def test_agents_leave_a_dns_whose_node_is_cut_off(
    tmp_path: Path, cluster: GaleraCluster, database: str
) -> None:
    """Two DNS instances, each on its own node; the agent uses the first. When that node
    is cut off, its DNS tells the agent it is stale after `stale_after`, and the agent moves
    to the other DNS within stale_after + 1 s, where it gets a change written meanwhile."""
    await add_route(url(cluster, database, 0))
    stale_after = 2.0
    cut = 2
    ports = {"stale": free_tcp_port(), "fresh": free_tcp_port()}
    base = free_udp_base(3)

    def dns_config(node: int, port: int) -> dict[str, Any]:
        return {
            "store": url(cluster, database, node, options="?connect_timeout=1"),
            "dns": {
                "listen": f"127.0.0.1:{port}",
                "check_interval": 0.2,
                "stale_after": stale_after,
                "retry_max": 1.0,
            },
        }

    addresses = [f"127.0.0.1:{ports['stale']}", f"127.0.0.1:{ports['fresh']}"]
    async with (
        lars_process(tmp_path, "dns-stale", ["dns"], dns_config(cut, ports["stale"])) as stale,
        lars_process(tmp_path, "dns-fresh", ["dns"], dns_config(0, ports["fresh"])),
        lars_process(
            tmp_path, "agent", ["agent"], agent_config(base, addresses, "127.0.0.1:1")
        ) as agent,
    ):
        with LarsClient(base_port=base, timeout=0.5) as client:
            client.get_host(1, 1)
            assert f"connected to dns {addresses[0]}" in agent.log
            await trio.to_thread.run_sync(cluster.isolate, cut)
            # The store of the first DNS is gone from when its node says it is not primary.
            with trio.fail_after(30):
                while cluster.nodes[cut].status().get("wsrep_cluster_status") == "Primary":
                    await trio.sleep(0.05)
            cut_at = time.monotonic()
            moved = f"connected to dns {addresses[1]}"
            with trio.fail_after(stale_after + 10):
                while moved not in agent.log:
                    await trio.sleep(0.05)
            took = time.monotonic() - cut_at
            # A change made on a live node reaches the agent through the fresh DNS.
            await lars_cli(
                "route", "add", "1", "1", "10.0.0.9:7009",
                "--store", url(cluster, database, 1), "--no-notify",
            )  # fmt: skip
            with trio.fail_after(10):
                while Host("10.0.0.9", 7009) not in client.get_route(1, 1):
                    await trio.sleep(0.1)
        await trio.to_thread.run_sync(cluster.rejoin, cut)
        assert "telling agents this DNS is stale" in stale.log
        assert "is stale" in agent.log
    assert took <= stale_after + 1.0, (took, agent.log[-2000:])


# --- 4. a store URL with three hosts, and the first one killed ----------------------------


async def test_killing_the_first_node_of_a_three_host_url_loses_nothing(
    tmp_path: Path, cluster: GaleraCluster, database: str
) -> None:
    """DNS and reporter on `mysql://...@n1,n2,n3/db`; under `lars bench` load the first
    node is killed (SIGKILL). They fail over to the next node: the stored calls equal the
    loops, and route writes and pushes go on."""
    three = url(cluster, database, 0, 1, 2, options="?connect_timeout=1")
    await add_route(three)
    dns, reporter, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    config = {
        "store": three,
        "dns": {"listen": f"127.0.0.1:{dns}", "check_interval": 0.2, "retry_max": 0.5},
        "reporter": {"listen": f"127.0.0.1:{reporter}", "retry_max": 0.5},
    }
    async with (
        lars_process(tmp_path, "server", ["dns", "reporter"], config) as server,
        lars_process(
            tmp_path,
            "agent",
            ["agent"],
            agent_config(base, [f"127.0.0.1:{dns}"], f"127.0.0.1:{reporter}"),
        ) as agent,
    ):
        with LarsClient(base_port=base, timeout=0.5) as client:
            client.get_host(1, 1)
            result: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_bench, agent, 10.0, result)
                await trio.sleep(3)
                await trio.to_thread.run_sync(cluster.kill, 0)
                # A route write through the same three-host URL succeeds, and is pushed.
                await lars_cli(
                    "route", "add", "1", "1", "10.0.0.8:7008", "--store", three, "--no-notify"
                )  # fmt: skip
                with trio.fail_after(10):
                    while Host("10.0.0.8", 7008) not in client.get_route(1, 1):
                        await trio.sleep(0.1)
            loops = loops_of(result)
            stored = await stored_becomes(cluster, database, loops)
        log = server.log
    assert stored == loops, (stored, loops, log[-3000:])
    assert "dropped" not in log
