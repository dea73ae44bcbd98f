"""Scaling out the store: route writes/s and reporter ingest on one server vs a Galera cluster.

Starts, one after the other so that they do not share the CPU, (1) one plain mariadbd and
(2) a 3-node MariaDB Galera cluster on loopback (``tests/galera.py``: same settings, the
cluster with Debian's galera-4), and on each measures:

* route writes/s: ``--writers`` writers doing ``add_hosts`` (one RouteData row, the version,
  a RouteChange row, one transaction each) for ``--duration`` seconds. On the cluster twice:
  every writer on the first node, then each writer on its own node (Galera fails colliding
  commits with 1213; the store re-runs them: the re-runs are counted);
* reporter ingest: ``lars run --role reporter`` flooded as by ``reporter_bench.py`` (host
  results acknowledged = committed, per second), on the cluster with the reporter on the
  first node, then with two reporters on two nodes (the flood split between them).

Needs root, mariadb-server, galera-4 and rsync (as the tests). Usage:
``python benchmarks/galera_bench.py [--duration S] [--writers N] [--connections N]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reporter_bench import flood

from lars.store import RouteStore, open_store
from lars.store.mysql import MysqlStore
from tests.e2e.procs import lars_process
from tests.galera import GaleraCluster


async def route_writes(urls: list[str], duration: float) -> dict[str, Any]:
    """Writers (one per URL) adding one host per write for ``duration`` seconds."""
    stores: list[RouteStore] = [open_store(url) for url in urls]
    done = [0] * len(urls)
    failed = [0] * len(urls)
    deadline = trio.current_time() + duration

    async def writer(w: int) -> None:
        k = 0
        while trio.current_time() < deadline:
            k += 1
            host = (0x0A000000 + (w << 20) + k, 7000 + w)
            try:
                await stores[w].add_hosts((1 + w, k % 10), [host])
            except Exception:
                failed[w] += 1
            else:
                done[w] += 1

    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            for w in range(len(urls)):
                nursery.start_soon(writer, w)
    finally:
        retries = sum(s.conflict_retries for s in stores if isinstance(s, MysqlStore))
        for store in stores:
            await store.aclose()
    elapsed = trio.current_time() - started
    return {
        "writes_per_s": round(sum(done) / elapsed, 1),
        "writes": sum(done),
        "failed": sum(failed),
        "conflict_reruns": retries,
    }


async def reporter_ingest(urls: list[str], duration: float, connections: int) -> dict[str, Any]:
    """Reporters (one per URL) flooded by ``connections`` connections in all."""
    acked = [0]
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as outer:
            procs = []
            for i, url in enumerate(urls):
                config = {"store": url, "reporter": {"listen": "127.0.0.1:0"}}
                proc = lars_process(Path(tmp), f"reporter{i}", ["reporter"], config)
                procs.append(await outer_enter(outer, proc))
            start = trio.current_time()
            deadline = start + duration
            async with trio.open_nursery() as nursery:
                for conn in range(connections):
                    address = procs[conn % len(procs)].addresses["reporter"]
                    nursery.start_soon(flood, address, conn, 100, deadline, acked)
            elapsed = trio.current_time() - start
            outer.cancel_scope.cancel()
    return {"results_per_s": round(acked[0] / elapsed), "reporters": len(urls)}


async def outer_enter(nursery: trio.Nursery, manager: Any) -> Any:
    """Enter an async context manager in a task of ``nursery``; it is left when the
    nursery is cancelled."""

    async def hold(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with manager as value:
            task_status.started(value)
            await trio.sleep_forever()

    return await nursery.start(hold)


def database_on(cluster: GaleraCluster) -> str:
    name = f"lars_bench_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    return name


async def init(url: str) -> None:
    async with open_store(url) as store:
        await store.init_schema()


async def measure(cluster: GaleraCluster, args: argparse.Namespace) -> dict[str, Any]:
    galera = cluster.wsrep
    out: dict[str, Any] = {}

    async def fresh() -> str:
        name = await trio.to_thread.run_sync(database_on, cluster)
        await init(f"{cluster.server_url(0)}/{name}")
        return name

    db = await fresh()
    first = [f"{cluster.server_url(0)}/{db}"] * args.writers
    out["route_writes_one_node" if galera else "route_writes"] = await route_writes(
        first, args.duration
    )
    if galera:
        db = await fresh()
        spread = [f"{cluster.server_url(i % 3)}/{db}" for i in range(args.writers)]
        out["route_writes_every_node"] = await route_writes(spread, args.duration)
    db = await fresh()
    one = [f"{cluster.server_url(0)}/{db}"]
    key = "reporter_one_node" if galera else "reporter"
    out[key] = await reporter_ingest(one, args.duration, args.connections)
    if galera:
        db = await fresh()
        two = [f"{cluster.server_url(i)}/{db}" for i in range(2)]
        out["reporter_two_nodes"] = await reporter_ingest(two, args.duration, args.connections)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with GaleraCluster(1, wsrep=False) as single:
        result["one_server"] = trio.run(measure, single, args)
    with GaleraCluster(3) as cluster:
        result["galera_3_nodes"] = trio.run(measure, cluster, args)
    one, three = result["one_server"], result["galera_3_nodes"]
    w = args.writers
    print(f"route writes/s, {w} writers ({args.duration:.0f} s each, add_hosts = 1 transaction):")
    print(f"  one server:                 {one['route_writes']['writes_per_s']:>9,.0f}")
    for key, what in (
        ("route_writes_one_node", "Galera, all on one node:"),
        ("route_writes_every_node", "Galera, one node each:"),
    ):
        r = three[key]
        print(
            f"  {what:<27} {r['writes_per_s']:>9,.0f}  ({r['failed']} failed,"
            f" {r['conflict_reruns']} re-runs after 1213/1205)"
        )
    print(f"reporter ingest, host results/s ({args.connections} connections flooding):")
    print(f"  one server:                 {one['reporter']['results_per_s']:>9,}")
    print(f"  Galera, one reporter:       {three['reporter_one_node']['results_per_s']:>9,}")
    print(f"  Galera, two reporters/nodes:{three['reporter_two_nodes']['results_per_s']:>9,}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
