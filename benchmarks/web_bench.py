"""The console over HTTP at scale: 100,000 routes and 1,000,000 ServerCallStatus rows.

Fills a fresh MariaDB database with ``web_store_bench.fill`` (``--modules`` modules x
``--hosts`` hosts, each host seen by ``--callers`` callers, names, RouteChange rows), starts
a real ``lars run --role web`` process on it (a user and an API token configured, as in
production), logs in, and times requests over HTTP with one keep-alive client: the overview
page (first page of 50 modules, HTML), one module's API GET (JSON), and for reference the
other pages. Prints p50/p99/max in milliseconds over ``--runs`` requests of each.

Targets (issue 9): overview first page p99 < 300 ms; one module's API GET p99 < 50 ms.

Usage: python benchmarks/web_bench.py [--modules N] [--hosts N] [--callers N] [--runs N]
MariaDB: ``--mysql mysql://root@127.0.0.1:3306`` (a fresh database is created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reporter_bench import fresh_database
from web_store_bench import fill, modules

from lars.web.auth import hash_password, hash_token
from tests.e2e.procs import lars_process

USER, PASSWORD = "bench", "bench password"
TOKEN = "bench-token-0123456789abcdef"
#: The targets: (case, p99 limit in ms).
TARGETS = {"overview first page (HTML)": 300.0, "one module, API GET": 50.0}


def timed(runs: int, call: Callable[[], httpx.Response]) -> dict[str, float]:
    """p50, p99 and max of ``runs`` requests in milliseconds, after two warm-ups; every
    answer must be a 200."""
    for _ in range(2):
        call().raise_for_status()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        response = call()
        samples.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))], 2),
        "max_ms": round(samples[-1], 2),
    }


def measure(url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Log in, then time each case (runs in a thread: a plain blocking client)."""
    mods = modules(args.modules)
    m, c = mods[len(mods) // 2]
    middle_page = len(mods) // 100 + 1  # 50 modules a page
    api = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        page = http.get("/login").text
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, page
        login = http.post(
            "/login", data={"csrf": match.group(1), "name": USER, "password": PASSWORD}
        )
        assert login.status_code == 303, login.text
        overview = http.get("/")
        assert overview.status_code == 200, overview.text
        assert f'class="count">{args.modules}<' in overview.text  # every module counted
        cases: dict[str, Callable[[], httpx.Response]] = {
            "overview first page (HTML)": lambda: http.get("/"),
            "one module, API GET": lambda: http.get(f"/api/v1/modules/{m}/{c}", headers=api),
            "overview first page, API": lambda: http.get("/api/v1/modules", headers=api),
            "overview search by name (HTML)": lambda: http.get("/?q=gateway"),
            "overview middle page (HTML)": lambda: http.get(f"/?page={middle_page}"),
            "module page (HTML)": lambda: http.get(f"/modules/{m}/{c}"),
            "call status first page (HTML)": lambda: http.get("/status"),
            "call status overloaded (HTML)": lambda: http.get("/status?overloaded=1"),
            "changes (HTML)": lambda: http.get("/changes"),
        }
        results = {}
        for name, call in cases.items():
            results[name] = timed(args.runs, call)
            r = results[name]
            print(
                f"{name:<36} p50 {r['p50_ms']:>8.2f} ms   p99 {r['p99_ms']:>8.2f} ms"
                f"   max {r['max_ms']:>8.2f} ms",
                flush=True,
            )
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with fresh_database(args.mysql, init=True) as url:
        start = time.perf_counter()
        took = await fill(url, args)
        routes = args.modules * args.hosts
        print(
            f"filled {routes:,} routes ({args.modules:,} modules x {args.hosts} hosts) and"
            f" {routes * args.callers:,} ServerCallStatus rows in"
            f" {time.perf_counter() - start:.0f}s {took}",
            flush=True,
        )
        config = {
            "store": url,
            "web": {
                "users": [
                    {"name": USER, "role": "viewer", "password_hash": hash_password(PASSWORD)}
                ],
                "tokens": [{"name": "bench", "role": "viewer", "token_hash": hash_token(TOKEN)}],
            },
        }
        with tempfile.TemporaryDirectory() as workdir:
            async with lars_process(Path(workdir), "web", ["web"], config) as web:
                console = web.addresses["web"].rstrip("/")
                results = await trio.to_thread.run_sync(measure, console, args)
    verdicts = {
        name: "ok" if results[name]["p99_ms"] < limit else f"OVER {limit:.0f} ms"
        for name, limit in TARGETS.items()
    }
    for name, verdict in verdicts.items():
        print(f"target {name}: p99 {results[name]['p99_ms']} ms: {verdict}")
    return {
        "routes": routes,
        "status_rows": routes * args.callers,
        "runs": args.runs,
        "results": results,
        "targets": verdicts,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    parser.add_argument("--modules", type=int, default=25_000)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--callers", type=int, default=10)
    parser.add_argument("--runs", type=int, default=200)
    print(json.dumps(trio.run(run, parser.parse_args())))
