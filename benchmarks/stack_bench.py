"""End-to-end benchmark: dns, reporter and agent as separate processes on MariaDB.

Registers routes, runs ``lars bench`` with 1 and 2 workers (each worker loops get_host +
report on its own module through the agent; the agent reports statistics to the real
reporter, which writes them to MariaDB) and prints loops/s, get_host latency and the agent's
CPU, then checks that the statistics reached the store. The reporter's own ingest rate is
reporter_bench.py's.

Usage: python benchmarks/stack_bench.py [--duration S] [--ports N]
MariaDB: ``--mysql mysql://root@127.0.0.1:3306`` (a fresh database is created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reporter_bench import fresh_database

from lars.store import open_store
from tests.e2e.procs import LARS, lars_process
from tests.netutil import free_tcp_port, free_udp_base


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> None:
    async with fresh_database(args.mysql, init=True) as url:
        async with open_store(url) as store:
            hosts = [(0x0A000001 + i, 8000 + i) for i in range(3)]
            await store.change_routes(add={(1, 1): hosts, (1, 2): hosts})
        with tempfile.TemporaryDirectory() as tmp:
            await bench_stack(Path(tmp), url, args)


async def bench_stack(workdir: Path, url: str, args: argparse.Namespace) -> None:
    dns_port, reporter_port, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    dns = f"127.0.0.1:{dns_port}"
    reporter = f"127.0.0.1:{reporter_port}"
    agent = {
        "base_port": base,
        "ports": args.ports,
        "dns": [dns],
        "reporter": reporter,
    }
    common = {"store": url}
    client_config = workdir / "client.toml"
    client_config.write_text(
        f"[agent]\nbase_port = {base}\nports = {args.ports}\n[client]\ntimeout = 0.5\n"
    )
    async with (
        lars_process(workdir, "dns", ["dns"], {**common, "dns": {"listen": dns}}),
        lars_process(
            workdir, "reporter", ["reporter"], {**common, "reporter": {"listen": reporter}}
        ),
        lars_process(workdir, "agent", ["agent"], {**common, "agent": agent}) as agent_proc,
    ):
        results = []
        for workers in (1, 2):
            assert agent_proc.process is not None
            cpu_before = cpu_seconds(agent_proc.process.pid)
            out = await trio.run_process(
                [
                    *LARS,
                    "bench",
                    "--workers",
                    str(workers),
                    "--duration",
                    str(args.duration),
                    "--json",
                    "--config",
                    str(client_config),
                ],
                capture_stdout=True,
            )
            cpu = cpu_seconds(agent_proc.process.pid) - cpu_before
            result = json.loads(out.stdout)
            result["agent_cpu_percent"] = round(100 * cpu / args.duration)
            results.append(result)
            rate = result["loops_per_s"]
            print(
                f"lars bench --workers {workers}: {rate:,.0f} loops/s; "
                f"per worker {[round(w['loops_per_s']) for w in result['per_worker']]}; "
                f"get_host p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us; "
                f"agent CPU {result['agent_cpu_percent']}%",
                flush=True,
            )
        await trio.sleep(2)  # let the last statistics reach the store
        stored = await trio.run_process(
            [*LARS, "query", "1", "1", "--stats", "--json", "--store", url], capture_stdout=True
        )
        total = sum(row["succ_total"] for row in json.loads(stored.stdout))
        print(
            f"ServerCallStatus holds {total:,} successes for module 1/1 "
            f"(bench loops on 1/1: {sum(r['per_worker'][0]['loops'] for r in results):,})"
        )
        print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--ports", type=int, default=3)
    trio.run(run, parser.parse_args())
