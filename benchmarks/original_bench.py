"""The original's qps loop against a Lars agent and against the original agent (issue 17).

The same client binary, the original's ``qps_timed`` (its ``qps`` example with a fixed
duration, built by ``../shared/anchor/build.sh``), loops get_host + report through the
original API on UDP 8888-8890, against the original's ``lars_lb_agent`` in one round and
against a Lars agent speaking the original protocol in the next: the fairest comparison of
the two agents. For reference, ``lars bench`` (Lars's own msgpack client and protocol) runs
against the same Lars agent. Rounds alternate their order; the figures are medians with
their spread.

Both agents get their routes from one Lars DNS (SQLite) and send their statistics to the
anchor's ``sink`` (reads and discards: the agents alone are measured, not a reporter). The
original API's ports are fixed, so the agents run one at a time, under the same lock file as
``tests/e2e/test_original.py``.

Usage: python benchmarks/original_bench.py [--threads 1,2] [--duration S] [--rounds N]
Needs a source checkout with the test dependencies (it uses tests/e2e's helpers).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.procs import LARS, LarsProcess, lars_process
from tests.e2e.test_original import (
    ANCHOR,
    BUILD,
    FIXED_PORTS,
    HOSTS_1,
    HOSTS_2,
    PORTS_LOCK,
    R1,
    R2,
    OriginalAgent,
    _ports_free,
    seed_store,
)
from tests.netutil import free_tcp_port, free_udp_base


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def modules(threads: int) -> list[str]:
    """qps_timed's modules: thread i on R1, R2, R1, ... (each thread its own client)."""
    return [f"{m[0]}:{m[1]}" for m in (R1, R2) * threads][:threads]


@asynccontextmanager
async def sink() -> AsyncIterator[str]:
    """The anchor's discarding reporter on a free port."""
    port = free_tcp_port()
    process = await trio.lowlevel.open_process([str(BUILD / "bin" / "sink"), str(port)])
    try:
        await trio.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


async def wait_ports(free: bool) -> None:
    with trio.fail_after(10):
        while _ports_free() != free:
            await trio.sleep(0.05)


async def qps(threads: int, duration: float) -> dict[str, Any]:
    result = await trio.run_process(
        [str(BUILD / "bin" / "qps_timed"), str(threads), str(duration), *modules(threads)],
        capture_stdout=True,
        capture_stderr=True,
    )
    figures: dict[str, Any] = json.loads(result.stdout)
    if figures["errors"] or figures["noexist"]:
        stderr = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"qps_timed: errors or NOEXIST: {figures}\n{stderr}")
    return figures


async def run_original(
    workdir: Path, dns: str, reporter: str, threads: int, duration: float, n: int
) -> tuple[float, float]:
    """One round against the original agent: (loops/s, agent CPU s per 10,000 loops)."""
    await wait_ports(free=True)
    agent = OriginalAgent(BUILD, workdir / f"original-{threads}-{n}", dns, reporter)
    await agent.start()
    try:
        assert agent.process is not None
        await qps(threads, 0.5)  # warm-up: the agent learns the routes
        before = cpu_seconds(agent.process.pid)
        figures = await qps(threads, duration)
        cpu = cpu_seconds(agent.process.pid) - before
    finally:
        await agent.stop()
    return figures["loops_per_s"], cpu / figures["loops"] * 10_000


@asynccontextmanager
async def lars_agent(
    workdir: Path, name: str, base: int, dns: str, reporter: str
) -> AsyncIterator[LarsProcess]:
    config = {"agent": {"base_port": base, "ports": 3, "dns": [dns], "reporter": reporter}}
    async with lars_process(workdir, name, ["agent"], config) as proc:
        yield proc


async def run_lars(
    workdir: Path, dns: str, reporter: str, threads: int, duration: float, n: int
) -> tuple[float, float]:
    """One round of the original's qps_timed against a Lars agent on the fixed ports."""
    await wait_ports(free=True)
    # Each run its own log: a process is started once its log says so.
    async with lars_agent(workdir, f"lars-{threads}-{n}", FIXED_PORTS[0], dns, reporter) as proc:
        assert proc.process is not None
        await qps(threads, 0.5)
        before = cpu_seconds(proc.process.pid)
        figures = await qps(threads, duration)
        cpu = cpu_seconds(proc.process.pid) - before
    return figures["loops_per_s"], cpu / figures["loops"] * 10_000


async def run_lars_bench(
    workdir: Path, dns: str, reporter: str, threads: int, duration: float, n: int
) -> tuple[float, float]:
    """One round of ``lars bench`` (msgpack) against a Lars agent on free ports."""
    base = free_udp_base(3)
    client_config = workdir / f"bench-{threads}-{n}.toml"
    client_config.write_text(f"[agent]\nbase_port = {base}\n[client]\ntimeout = 0.5\n")
    async with lars_agent(workdir, f"msgpack-{threads}-{n}", base, dns, reporter) as proc:
        assert proc.process is not None
        before = cpu_seconds(proc.process.pid)
        argv = [*LARS, "bench", "--workers", str(threads), "--duration", str(duration)]
        result = await trio.run_process(
            [*argv, "--modid", "1", "--cmdid", "1", "--json", "--config", str(client_config)],
            capture_stdout=True,
        )
        cpu = cpu_seconds(proc.process.pid) - before
    figures = json.loads(result.stdout)
    loops = sum(w["loops"] for w in figures["per_worker"])
    return figures["loops_per_s"], cpu / max(loops, 1) * 10_000


KINDS = {
    "qps_timed -> original agent": run_original,
    "qps_timed -> Lars agent": run_lars,
    "lars bench -> Lars agent (msgpack)": run_lars_bench,
}


async def main(args: argparse.Namespace) -> None:
    await trio.run_process(
        [str(ANCHOR / "build.sh")], check=True, env={**os.environ, "ANCHOR_BUILD": str(BUILD)}
    )
    with tempfile.TemporaryDirectory() as tmp, PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        workdir = Path(tmp)
        url = await seed_store(workdir / "routes.db", {R1: HOSTS_1, R2: HOSTS_2})
        dns_config = {"store": url, "dns": {"listen": f"127.0.0.1:{free_tcp_port()}"}}
        async with (
            lars_process(workdir, "dns", ["dns"], dns_config) as dns_proc,
            sink() as reporter,
        ):
            dns = dns_proc.addresses["dns"]
            for threads in args.threads:
                results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
                for n in range(args.rounds):
                    order = list(KINDS) if n % 2 == 0 else list(reversed(KINDS))
                    for kind in order:
                        figures = await KINDS[kind](
                            workdir, dns, reporter, threads, args.duration, n
                        )
                        results[kind].append(figures)
                        print(
                            f"  {threads} thread(s) round {n + 1} {kind}: "
                            f"{figures[0]:,.0f} loops/s, {figures[1]:.3f} CPU s/10k loops",
                            flush=True,
                        )
                print(f"\n{threads} thread(s), {args.rounds} x {args.duration:g} s, medians:")
                for kind, runs in results.items():
                    rates = [r for r, _ in runs]
                    cpus = [c for _, c in runs]
                    print(
                        f"  {kind:<38} {statistics.median(rates):>9,.0f} loops/s"
                        f" (runs {min(rates):,.0f}-{max(rates):,.0f}),"
                        f" agent CPU {statistics.median(cpus):.3f} s/10k loops"
                    )
                print(flush=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="client threads per run, e.g. 1,2")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


if __name__ == "__main__":
    trio.run(main, parse())
