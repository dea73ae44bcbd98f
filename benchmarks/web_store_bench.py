"""The console's store reads at scale: 100,000 routes and 1,000,000 ServerCallStatus rows.

Fills a fresh MariaDB database (``--modules`` modules x ``--hosts`` hosts each, every host
seen by ``--callers`` callers, one RouteChange row per module, names for every modid and
cmdid, 1 % of the status rows overloaded) with multi-row INSERTs, then times the reads the
console makes, through the store as the web role calls it: ``module_overview`` (first page,
a middle page, searches), ``module_detail``, ``call_status`` (first page, filtered, sorted),
``list_audit``. Prints p50/p99 in milliseconds over ``--runs`` runs of each.

The console's targets (issue 9): overview first page p99 < 300 ms and one module < 50 ms,
end to end through HTTP; the store's share should be well under that.

Usage: python benchmarks/web_store_bench.py [--modules N] [--hosts N] [--callers N] [--runs N]
MariaDB: ``--mysql mysql://root@127.0.0.1:3306`` (a fresh database is created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reporter_bench import fresh_database

from lars.store import Actor, RouteStore, open_store
from lars.store.mysql import _Connection

#: cmdids per modid: modules are (modid, cmdid) for modid 1.., cmdid 1..CMDS.
CMDS = 10
#: Rows per INSERT statement while filling.
FILL_CHUNK = 5000
BASE_IP = 0x0A000000  # 10.0.0.0
CALLER_IP = 0xC0A80000  # 192.168.0.0
NOW = 1_800_000_000


def modules(count: int) -> list[tuple[int, int]]:
    return [(1 + i // CMDS, 1 + i % CMDS) for i in range(count)]


def host_of(index: int, h: int) -> tuple[int, int]:
    """The h-th host of the index-th module: hosts are shared by a few modules, as real
    servers serve several commands."""
    return BASE_IP + (index * 4 + h) // 3, 7000 + h


async def fill(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Fill the database with plain multi-row INSERTs on one connection."""
    parts = urlsplit(url)
    conn = _Connection(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/"),
        autocommit=False,
    )
    await conn.connect()
    took: dict[str, float] = {}

    async def insert(table: str, columns: str, rows: list[str]) -> None:
        start = time.perf_counter()
        async with conn.cursor() as cursor:
            for i in range(0, len(rows), FILL_CHUNK):
                await cursor.execute(
                    f"INSERT INTO {table} ({columns}) VALUES " + ",".join(rows[i : i + FILL_CHUNK])
                )
        await conn.commit()
        took[table] = round(time.perf_counter() - start, 1)

    mods = modules(args.modules)
    try:
        route_rows = []
        status_rows = []
        for index, (m, c) in enumerate(mods):
            for h in range(args.hosts):
                ip, port = host_of(index, h)
                route_rows.append(f"({m},{c},{ip},{port})")
                for k in range(args.callers):
                    overload = "1" if (index * 7 + h * 3 + k) % 100 == 0 else "0"
                    succ, err = (index + k) % 500, (index + h + k) % 7
                    status_rows.append(
                        f"({m},{c},{ip},{port},{CALLER_IP + k},{succ},{err},{NOW + k},"
                        f"'{overload}',{succ * 100},{err * 100})"
                    )
        await insert("RouteData", "modid, cmdid, serverip, serverport", route_rows)
        await insert(
            "ServerCallStatus",
            "modid, cmdid, ip, port, caller, succ_cnt, err_cnt, ts, overload,"
            " succ_total, err_total",
            status_rows,
        )
        await insert(
            "RouteChange",
            "modid, cmdid, version",
            [f"({m},{c},{NOW + i})" for i, (m, c) in enumerate(mods)],
        )
        modids = sorted({m for m, _ in mods})
        await insert(
            "ModIDConfig",
            "modid, content",
            [f"({m},'{'gateway' if m % 50 == 0 else 'service'} {m}')" for m in modids],
        )
        await insert(
            "CmdIDConfig", "cmdid, content", [f"({c},'command {c}')" for c in range(1, CMDS + 1)]
        )
        async with conn.cursor() as cursor:
            await cursor.execute(f"UPDATE RouteVersion SET version = {NOW + len(mods)}")
            for table in ("RouteData", "ServerCallStatus", "RouteChange", "ModIDConfig"):
                await cursor.execute(f"ANALYZE TABLE {table}")
                await cursor.fetchall()
        await conn.commit()
    finally:
        await conn.aclose()
    return took


async def timed(
    runs: int,
    call: Callable[[], Awaitable[Any]],
    before: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, float]:
    """p50 and p99 (and the slowest) of ``runs`` calls in milliseconds, after one warm-up;
    ``before`` runs, untimed, before each call."""
    await call()
    samples = []
    for _ in range(runs):
        if before is not None:
            await before()
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))], 2),
        "max_ms": round(samples[-1], 2),
    }


def cases(store: RouteStore, args: argparse.Namespace) -> dict[str, Callable[[], Awaitable[Any]]]:
    mods = modules(args.modules)
    middle = mods[len(mods) // 2]
    return {
        "overview first page (50)": lambda: store.module_overview(limit=50),
        "overview middle page (50)": lambda: store.module_overview(offset=len(mods) // 2, limit=50),
        "overview last page (50)": lambda: store.module_overview(offset=len(mods) - 50, limit=50),
        "overview search id '7' (modid or cmdid)": lambda: store.module_overview(search="7"),
        "overview search module '1250/5'": lambda: store.module_overview(search="1250/5"),
        "overview search name 'gateway'": lambda: store.module_overview(search="gateway"),
        "module_detail (4 hosts x callers)": lambda: store.module_detail(*middle),
        "call_status first page (100)": lambda: store.call_status(limit=100),
        "call_status middle page (100)": lambda: store.call_status(
            offset=args.modules * args.hosts * args.callers // 2, limit=100
        ),
        "call_status module filter": lambda: store.call_status(module=middle),
        "call_status caller filter": lambda: store.call_status(caller=CALLER_IP + 3),
        "call_status overloaded": lambda: store.call_status(overloaded=True),
        "call_status module+overloaded": lambda: store.call_status(module=middle, overloaded=True),
        "call_status sort err desc": lambda: store.call_status(sort="err", descending=True),
        "list_audit first page": lambda: store.list_audit(limit=100),
        "list_names mod": lambda: store.list_names("mod"),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with fresh_database(args.mysql, init=True) as url:
        start = time.perf_counter()
        took = await fill(url, args)
        fill_s = time.perf_counter() - start
        routes = args.modules * args.hosts
        print(
            f"filled {routes:,} routes ({args.modules:,} modules x {args.hosts} hosts) and"
            f" {routes * args.callers:,} ServerCallStatus rows in {fill_s:.0f}s {took}",
            flush=True,
        )
        results: dict[str, Any] = {}
        async with open_store(url) as store:
            actor = Actor("bench", "127.0.0.1")
            extra = (10**6, 1)

            async def add_and_remove() -> None:
                await store.add_hosts(extra, [(BASE_IP, 1)], actor=actor)
                await store.remove_hosts(extra, None, actor=actor)

            # Audited writes (so the audit page has rows), timed as two writes' cost.
            results["add_hosts + remove_hosts, audited"] = await timed(10, add_and_remove)
            await store.add_hosts(extra, [(BASE_IP, 1)], actor=actor)
            # The count of all modules is remembered until the route version moves: the
            # first view after a route write (any writer) counts again.
            flip = [1]

            async def write() -> None:
                flip[0] = 3 - flip[0]
                await store.change_routes(
                    add={extra: [(BASE_IP, flip[0])]}, remove={extra: [(BASE_IP, 3 - flip[0])]}
                )

            name = "overview first page (50), after a route write"
            results[name] = await timed(
                args.runs, lambda: store.module_overview(limit=50), before=write
            )
            print(
                f"{name:<48} p50 {results[name]['p50_ms']:>8.2f} ms   p99"
                f" {results[name]['p99_ms']:>8.2f} ms"
            )
            for name, call in cases(store, args).items():
                results[name] = await timed(args.runs, call)
                r = results[name]
                print(f"{name:<48} p50 {r['p50_ms']:>8.2f} ms   p99 {r['p99_ms']:>8.2f} ms")
            total, _ = await store.module_overview()
            status_total, _ = await store.call_status(limit=1)
        assert total == args.modules + 1, total
        assert status_total == routes * args.callers, status_total
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} on {os.cpu_count()} CPUs (figures are noisy above 1)")
        return {
            "load_average": round(load, 1),
            "routes": routes,
            "modules": args.modules,
            "status_rows": status_total,
            "runs": args.runs,
            "fill_s": round(fill_s, 1),
            "results": results,
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    parser.add_argument("--modules", type=int, default=25_000)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--callers", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    print(json.dumps(trio.run(run, parser.parse_args())))
