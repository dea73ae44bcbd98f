"""What the scheduling policies cost the hot path (issue 14): ``lars bench`` per policy.

Starts a DNS + reporter process and an agent process on an SQLite store with four modules
of the same three hosts: 1/1 without a policy row (rr, the plain §6 path), 1/2 weighted,
1/3 p2c and 1/4 hash. Then, in rounds whose order rotates, runs ``lars bench --workers 1``
on each: p2c with ``--latency`` (each report carries a latency) and hash with ``--keys``
(each get_host carries a key), as their callers would. With ``--baseline DIR`` (a checkout
of an earlier commit, e.g. one made with ``git worktree add /tmp/base e4acfd8^``) every
round also runs rr on a second stack whose processes and client import Lars from DIR.

Prints every round, the medians and each one's ratio to rr (and rr's to the baseline).

Usage: python benchmarks/policy_hotpath.py [--duration S] [--rounds N] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
BASELINE = "rr (baseline)"


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
            lars_process(workdir, "agent", ["agent"], agent),
        ):
            yield cli


async def bench(cli: Path, tree: Path | None, cmdid: int, options: list[str], s: float) -> float:
    argv = [*LARS, "bench", "--cmdid", str(cmdid), "--duration", str(s), "--json", *options]
    with importing_from(tree):
        out = await trio.run_process([*argv, "--config", str(cli)], capture_stdout=True)
    result = json.loads(out.stdout)
    assert result["per_worker"][0]["errors"] == 0, result
    return float(result["loops_per_s"])


async def run(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {name: [] for name in RUNS}
    if args.baseline:
        rates[BASELINE] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with stack(Path(tmp) / "head", None, True) as cli:
            baseline = (
                stack(Path(tmp) / "base", args.baseline, False) if args.baseline else _nothing()
            )
            async with baseline as base_cli:
                names = list(rates)
                for n in range(args.rounds):
                    order = names[n % len(names) :] + names[: n % len(names)]
                    for name in order:
                        if name == BASELINE:
                            assert base_cli is not None
                            rate = await bench(base_cli, args.baseline, 1, [], args.duration)
                        else:
                            cmdid, _, options = RUNS[name]
                            rate = await bench(cli, None, cmdid, options, args.duration)
                        rates[name].append(rate)
                        print(f"round {n + 1}: {name:14} {rate:9,.0f} loops/s", flush=True)
    rr = statistics.median(rates["rr"])
    print(f"\nmedians of {args.rounds} rounds of {args.duration:g} s, lars bench --workers 1:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:14} {median:9,.0f} loops/s  {100 * (median - rr) / rr:+6.1f}% vs rr")


@asynccontextmanager
async def _nothing() -> AsyncIterator[Path | None]:
    yield None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout to run rr from, as well")
    trio.run(run, parser.parse_args())
