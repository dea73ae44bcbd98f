"""The agent's API loop compiled (lars/_udploop.c) against the same loop in Python.

Starts a DNS (routes in a fresh MariaDB database) and a discarding reporter once, then per
round one agent with each loop (``LARS_PURE_API_LOOP=1`` for the Python one), alternating
which goes first, and drives it with

* ``poll_drive`` (benchmarks/c/poll_drive.c, built with cc): 1 client, the original's
  protocol, polling for answers like Lars's clients;
* ``lars bench --workers 2``: two Python client processes, Lars's own protocol.

Prints per round and the medians: loops/s and the agent's CPU seconds per 10,000 loops.

Usage: python benchmarks/api_loop.py [--rounds 5] [--duration 3] [--mysql URL]
Needs a source checkout with the test dependencies (it uses tests/e2e's helpers), the
compiled loop built (``pip install -e .``), a C compiler and MariaDB.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from original_bench import cpu_seconds, sink
from reporter_bench import fresh_database
from vs_original import (
    BENCH_MODULES,
    HOSTS,
    build_poll_drive,
    machine_header,
    parse_bench,
    parse_qps,
    per_10k,
)

from lars.roles.agent import COMPILED_LOOP
from lars.store import open_store
from tests.e2e.procs import LARS, lars_process, write_config
from tests.netutil import free_udp_base

LOOPS = ("compiled", "python")


async def drive(
    kind: str, driver: Path, config: Path, base: int, duration: float
) -> tuple[float, int]:
    """One measured run: its loops/s and loops (checked: no errors)."""
    if kind == "poll_drive":
        result = await trio.run_process(
            [str(driver), "1", str(duration), "100", "1:1"],
            env={**os.environ, "POLL_DRIVE_BASE_PORT": str(base)},
            capture_stdout=True,
        )
        figures = parse_qps(result.stdout.decode())
        return float(figures["loops_per_s"]), int(figures["loops"])
    argv = [*LARS, "bench", "--workers", "2", "--duration", str(duration), "--json"]
    result = await trio.run_process([*argv, "--config", str(config)], capture_stdout=True)
    bench = parse_bench(result.stdout.decode())
    if bench.errors:
        raise RuntimeError(f"lars bench had {bench.errors} errors")
    return bench.loops_per_s, bench.loops


async def run(args: argparse.Namespace) -> None:
    if not COMPILED_LOOP:
        raise SystemExit("lars._udploop is not built: pip install -e . with a C compiler")
    now = datetime.datetime.now().astimezone()
    print("\n".join(machine_header(["python", *sys.argv], now)), flush=True)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        driver = await build_poll_drive(work)
        async with fresh_database(args.mysql, init=True) as url:
            async with open_store(url) as store:
                await store.change_routes(add={module: HOSTS for module in BENCH_MODULES})
            dns_config = {"store": url, "dns": {"listen": "127.0.0.1:0"}}
            async with (
                lars_process(work, "dns", ["dns"], dns_config) as dns_proc,
                sink() as discard,
            ):
                dns = dns_proc.addresses["dns"]
                for n in range(args.rounds):
                    order = LOOPS if n % 2 == 0 else LOOPS[::-1]
                    for loop in order:
                        await one_agent(args, work, n, loop, dns, discard, driver, results)
    print()
    print(f"{'':<34}{'compiled':>22}{'python':>22}{'compiled/python':>18}")
    for kind in ("poll_drive", "lars bench --workers 2"):
        rates = {loop: [r for r, _ in results[kind, loop]] for loop in LOOPS}
        cpus = {loop: [c for _, c in results[kind, loop]] for loop in LOOPS}
        rate = {loop: statistics.median(rates[loop]) for loop in LOOPS}
        cpu = {loop: statistics.median(cpus[loop]) for loop in LOOPS}
        print(
            f"{kind + ', loops/s':<34}{rate['compiled']:>22,.0f}{rate['python']:>22,.0f}"
            f"{rate['compiled'] / rate['python']:>18.2f}"
        )
        print(
            f"{'  agent CPU s per 10k loops':<34}{cpu['compiled']:>22.3f}{cpu['python']:>22.3f}"
            f"{cpu['compiled'] / cpu['python']:>18.2f}"
        )
    print(f"medians of {args.rounds} rounds x {args.duration:g} s, loops alternating")


async def one_agent(
    args: argparse.Namespace,
    work: Path,
    n: int,
    loop: str,
    dns: str,
    discard: str,
    driver: Path,
    results: dict[tuple[str, str], list[tuple[float, float]]],
) -> None:
    base = free_udp_base(3)
    agent = {"base_port": base, "ports": 3, "dns": [dns], "reporter": discard}
    client = write_config(
        work / f"client-{n}-{loop}.toml",
        {"agent": {"base_port": base, "ports": 3}, "client": {"timeout": 0.5}},
    )
    env = {"LARS_PURE_API_LOOP": "1"} if loop == "python" else {}
    saved = os.environ.copy()
    os.environ.pop("LARS_PURE_API_LOOP", None)
    os.environ.update(env)
    try:
        async with lars_process(work, f"agent-{n}-{loop}", ["agent"], {"agent": agent}) as proc:
            assert proc.process is not None
            pid = proc.process.pid
            want = "compiled loop" if loop == "compiled" else "Python loop"
            assert want in proc.log, proc.log[-1000:]
            await drive("poll_drive", driver, client, base, 0.5)  # the route is fetched
            for kind in ("poll_drive", "lars bench --workers 2"):
                before = cpu_seconds(pid)
                rate, loops = await drive(kind, driver, client, base, args.duration)
                cpu = per_10k(cpu_seconds(pid) - before, loops)
                results.setdefault((kind, loop), []).append((rate, cpu))
                print(
                    f"round {n + 1}, {loop} loop, {kind}: {rate:,.0f} loops/s,"
                    f" agent CPU {cpu:.3f} s/10k loops",
                    flush=True,
                )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(run, parse_args())
