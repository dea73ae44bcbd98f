"""What serving metrics costs the agent's hot path: ``lars bench`` with metrics on and off.

Starts a DNS and a reporter on MariaDB once, then, in alternating rounds, an agent with its
HTTP listener off (``http_listen = ""``) and one with it on and scraped every second (four
times as often as Prometheus's usual 15 s would, on purpose), and runs ``lars bench
--workers 1`` against each. Prints every round, the medians and the difference.

Usage: python benchmarks/metrics_overhead.py [--duration S] [--rounds N] [--mysql URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reporter_bench import fresh_database

from lars.store import open_store
from tests.e2e.procs import LARS, lars_process
from tests.netutil import free_tcp_port, free_udp_base

SCRAPE_INTERVAL = 1.0


async def scrape_forever(address: str) -> None:
    """GET /metrics every SCRAPE_INTERVAL, reading the whole answer, like Prometheus."""
    host, port = address.rsplit(":", 1)
    while True:
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            while await stream.receive_some(65536):
                pass
        await trio.sleep(SCRAPE_INTERVAL)


async def one_round(
    workdir: Path, url: str, dns: str, reporter: str, metrics: bool, duration: float, n: int
) -> float:
    base = free_udp_base(3)
    http = f"127.0.0.1:{free_tcp_port()}" if metrics else ""
    agent = {"base_port": base, "dns": [dns], "reporter": reporter, "http_listen": http}
    client_config = workdir / "client.toml"
    client_config.write_text(f"[agent]\nbase_port = {base}\n[client]\ntimeout = 0.5\n")
    name = f"agent-{'on' if metrics else 'off'}-{n}"  # its own log: started is started
    async with (
        lars_process(workdir, name, ["agent"], {"store": url, "agent": agent}),
        trio.open_nursery() as nursery,
    ):
        if metrics:
            nursery.start_soon(scrape_forever, http)
        argv = [*LARS, "bench", "--workers", "1", "--duration", str(duration)]
        out = await trio.run_process(
            [*argv, "--json", "--config", str(client_config)], capture_stdout=True
        )
        nursery.cancel_scope.cancel()
    return float(json.loads(out.stdout)["loops_per_s"])


async def run(args: argparse.Namespace) -> None:
    async with fresh_database(args.mysql, init=True) as url:
        async with open_store(url) as store:
            hosts = [(0x0A000001 + i, 8000 + i) for i in range(3)]
            await store.change_routes(add={(1, 1): hosts})
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            dns, reporter = f"127.0.0.1:{free_tcp_port()}", f"127.0.0.1:{free_tcp_port()}"
            common = {"store": url}
            async with (
                lars_process(workdir, "dns", ["dns"], {**common, "dns": {"listen": dns}}),
                lars_process(
                    workdir, "reporter", ["reporter"], {**common, "reporter": {"listen": reporter}}
                ),
            ):
                rates: dict[bool, list[float]] = {False: [], True: []}
                for n in range(args.rounds):
                    order = (False, True) if n % 2 == 0 else (True, False)
                    for metrics in order:
                        rate = await one_round(
                            workdir, url, dns, reporter, metrics, args.duration, n
                        )
                        rates[metrics].append(rate)
                        label = "on, scraped every 1 s" if metrics else "off"
                        print(f"round {n + 1}: metrics {label}: {rate:,.0f} loops/s", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median, metrics off: {off:,.0f} loops/s")
    print(f"median, metrics on:  {on:,.0f} loops/s ({100 * (on - off) / off:+.1f}%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    trio.run(run, parser.parse_args())
