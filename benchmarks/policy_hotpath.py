"""What the scheduling policies cost the hot path (issue 14), side by side.

Starts a DNS + reporter process and an agent process on an SQLite store with four modules
of the same three hosts: 1/1 without a policy row (rr, the plain §6 path), 1/2 weighted,
1/3 p2c and 1/4 hash. One client (lars.client, in this process) then loops get_host +
report through them in interleaved segments of ``--segment`` loops, the order rotating,
for ``--duration`` seconds per policy: p2c's reports carry the call's latency and hash's
get_host a key, as their callers' would. Interleaving at this grain puts every policy
through the same machine: separate ``lars bench`` runs on a shared VM differ by 10-20%
from one run to the next, which would drown differences of a few percent.

With ``--baseline DIR`` (a checkout of an earlier commit, e.g. one made with ``git worktree
add /tmp/base e4acfd8^``) it then also runs ``lars bench`` on rr in ``--rounds`` alternating
rounds against this checkout and against a second stack whose processes import Lars from
DIR (two codebases cannot share one client process), and prints the median of the rounds'
ratios.

Usage: python benchmarks/policy_hotpath.py [--duration S] [--segment N] [--pin]
                                           [--baseline DIR [--rounds N]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lars.client import LarsClient
from tests.e2e.procs import LARS, lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base

HOSTS = ("10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003")
#: name -> (cmdid, the policy set on it (None: no row), lars bench options)
RUNS = {
    "rr": (1, None, []),
    "weighted": (2, "weighted", []),
    "p2c": (3, "p2c", ["--latency"]),
    "hash": (4, "hash", ["--keys"]),
}


@contextmanager
def importing_from(tree: Path | None) -> Iterator[None]:
    """Processes started inside import Lars from ``tree`` (None: this checkout)."""
    old = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@asynccontextmanager
async def stack(workdir: Path, tree: Path | None, policies: bool) -> AsyncIterator[Path]:
    """DNS + reporter and an agent with the modules above; yields the client config."""
    workdir.mkdir()  # noqa: ASYNC240 (before anything runs)
    db = f"sqlite:///{workdir / 'lars.db'}"
    dns, reporter, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    cli = workdir / "client.toml"
    cli.write_text(
        f'store = "{db}"\n[agent]\nbase_port = {base}\ndns = ["127.0.0.1:{dns}"]\n'
        "[client]\ntimeout = 0.5\n"
    )
    with importing_from(tree):
        await lars_cli("db", "init", "--config", str(cli))
        for name, (cmdid, policy, _) in RUNS.items():
            if policies or name == "rr":
                await lars_cli("route", "add", "1", str(cmdid), *HOSTS, "--config", str(cli))
            if policies and policy is not None:
                await lars_cli(
                    "policy", "set", "1", str(cmdid), "--policy", policy, "--config", str(cli)
                )
        servers = {
            "store": db,
            "dns": {"listen": f"127.0.0.1:{dns}"},
            "reporter": {"listen": f"127.0.0.1:{reporter}"},
        }
        agent = {
            "store": db,
            "agent": {
                "base_port": base,
                "dns": [f"127.0.0.1:{dns}"],
                "reporter": f"127.0.0.1:{reporter}",
            },
        }
        async with (
            lars_process(workdir, "servers", ["dns", "reporter"], servers),
            lars_process(workdir, "agent", ["agent"], agent) as agent_process,
        ):
            if PIN:
                assert agent_process.process is not None
                pin(agent_process.process.pid, AGENT_CPU)
            yield cli


#: With --pin: the agent (every thread) on one CPU, the bench client on another.
PIN = False
AGENT_CPU, CLIENT_CPU = 1, 0


def pin(pid: int, cpu: int) -> None:
    """Every thread of process ``pid`` on ``cpu`` only."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


async def bench(cli: Path, tree: Path | None, cmdid: int, options: list[str], s: float) -> float:
    argv = [*LARS, "bench", "--cmdid", str(cmdid), "--duration", str(s), "--json", *options]
    if PIN:
        argv = ["taskset", "-c", str(CLIENT_CPU), *argv]
    with importing_from(tree):
        out = await trio.run_process([*argv, "--config", str(cli)], capture_stdout=True)
    result = json.loads(out.stdout)
    assert result["per_worker"][0]["errors"] == 0, result
    return float(result["loops_per_s"])


def interleaved(config: Path, duration: float, segment: int) -> dict[str, float]:
    """loops/s per policy, from segments interleaved in one client (see the docstring)."""
    base = int(config.read_text().split("base_port = ")[1].split()[0])
    if PIN:
        os.sched_setaffinity(0, {CLIENT_CPU})
    keys = [b"user-%d" % i for i in range(1024)]
    spent = dict.fromkeys(RUNS, 0.0)
    loops = dict.fromkeys(RUNS, 0)
    perf = time.perf_counter
    with LarsClient(base_port=base, timeout=0.5, retries=2) as client:
        get_host, report = client.get_host, client.report
        for cmdid, _, _ in RUNS.values():
            client.get_host(1, cmdid)  # routes loaded, api level known
        names = list(RUNS)
        end = perf() + duration * len(names)
        turn = 0
        while perf() < end:
            turn += 1
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                cmdid, _, options = RUNS[name]
                began = now = perf()
                if "--keys" in options:
                    for i in range(segment):
                        host = get_host(1, cmdid, keys[i & 1023])
                        report(1, cmdid, host, ok=True)
                elif "--latency" in options:
                    for _ in range(segment):
                        host = get_host(1, cmdid)
                        done = perf()
                        report(1, cmdid, host, ok=True, latency=done - now)
                        now = done
                else:
                    for _ in range(segment):
                        host = get_host(1, cmdid)
                        report(1, cmdid, host, ok=True)
                spent[name] += perf() - began
                loops[name] += segment
    return {name: loops[name] / spent[name] for name in RUNS}


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with stack(Path(tmp) / "head", None, True) as cli:
            rates = await trio.to_thread.run_sync(interleaved, cli, args.duration, args.segment)
            rr = rates["rr"]
            print(
                f"one client, segments of {args.segment} loops interleaved,"
                f" {args.duration:g} s per policy:"
            )
            for name, rate in rates.items():
                print(f"  {name:9} {rate:9,.0f} loops/s  {100 * (rate / rr - 1):+6.1f}% vs rr")
            if not args.baseline:
                return
            async with stack(Path(tmp) / "base", args.baseline, False) as base_cli:
                head: list[float] = []
                base: list[float] = []
                for n in range(args.rounds):
                    sides = [(head, cli, None), (base, base_cli, args.baseline)]
                    for values, config, tree in sides if n % 2 == 0 else sides[::-1]:
                        values.append(await bench(config, tree, 1, [], args.bench_duration))
                    print(f"round {n + 1}: rr {head[-1]:9,.0f}  baseline {base[-1]:9,.0f} loops/s")
    ratio = statistics.median(h / b for h, b in zip(head, base, strict=True))
    print(
        f"lars bench, rr, {args.rounds} alternating rounds of {args.bench_duration:g} s:"
        f" this checkout {statistics.median(head):,.0f}, baseline {statistics.median(base):,.0f}"
        f" loops/s; median ratio {100 * (ratio - 1):+.1f}%"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per policy")
    parser.add_argument("--segment", type=int, default=500, help="loops per segment")
    parser.add_argument("--rounds", type=int, default=15, help="baseline rounds")
    parser.add_argument("--bench-duration", type=float, default=2.0, help="per baseline run")
    parser.add_argument("--baseline", type=Path, help="a checkout to run rr from, as well")
    parser.add_argument(
        "--pin", action="store_true", help="agent on CPU 1, client on CPU 0 (less noise)"
    )
    arguments = parser.parse_args()
    PIN = arguments.pin
    trio.run(run, arguments)
