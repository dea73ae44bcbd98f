"""How long the agent's statistics send holds the module-table lock (the API threads wait
meanwhile), with many modules of which few had calls since the last send.

Builds an agent's module table with ``--modules`` routes, reports calls on ``--active`` of
them, then takes the statistics the way the agent does (one O(1) take of the due modules,
then chunks of ``STATS_CHUNK`` modules per lock hold) and prints the longest hold. For
comparison it also times one walk over every module, which is what a send did before the
table tracked which modules had calls.

Usage: python benchmarks/stats_hold.py [--modules N] [--active N] [--rounds N]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lars.core.balancer import BalancerParams
from lars.core.table import ModuleTable
from lars.roles.agent import STATS_CHUNK

HOSTS = [(167772161 + i, 7000 + i) for i in range(3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", type=int, default=200_000)
    parser.add_argument("--active", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    table = ModuleTable(BalancerParams(), route_wait=0.5, max_modules=args.modules)
    for modid in range(args.modules):
        table.apply_route((modid, 1), HOSTS, 0.0)
    step = max(1, args.modules // max(1, args.active))
    active = [(modid, 1) for modid in range(0, args.modules, step)][: args.active]

    # Python's full garbage collections pause every thread for hundreds of milliseconds
    # with this many objects, lock or no lock: measured apart, below.
    gc.freeze()
    gc.disable()
    holds: list[float] = []
    for _ in range(args.rounds):
        for key in active:
            table.report(key, HOSTS[0], True, 0.0)
            table.report(key, HOSTS[1], False, 0.0)
        started = time.perf_counter()
        due = table.take_due()
        holds.append(time.perf_counter() - started)
        while chunk := list(itertools.islice(due, STATS_CHUNK)):  # outside the lock
            started = time.perf_counter()
            taken = table.collect_stats(chunk)
            holds.append(time.perf_counter() - started)
            for key, lb, _ in taken:
                table.stats_done(key, lb, stored=True)

    gc.enable()
    started = time.perf_counter()
    gc.collect()
    full_gc = time.perf_counter() - started
    gc.unfreeze()
    started = time.perf_counter()
    gc.collect()
    full_gc_unfrozen = time.perf_counter() - started
    started = time.perf_counter()
    walked = sum(1 for lb in table.modules.values() if lb.has_unsent_stats)
    walk = time.perf_counter() - started
    print(f"modules {args.modules:,}, with calls per send {len(active):,}, rounds {args.rounds}")
    holds.sort()
    p50, p99 = holds[len(holds) // 2], holds[int(len(holds) * 0.99)]
    print(
        f"lock holds (chunks of {STATS_CHUNK}): p50 {p50 * 1e6:,.0f} us, p99 {p99 * 1e6:,.0f} us,"
        f" longest {holds[-1] * 1e6:,.0f} us (a busy machine preempts some)"
    )
    print(f"one walk over every module, for comparison: {walk * 1e3:,.1f} ms ({walked} found)")
    print(
        f"a full garbage collection: {full_gc_unfrozen * 1e3:,.0f} ms"
        f" ({full_gc * 1e3:,.1f} ms with the table frozen by gc.freeze())"
    )


if __name__ == "__main__":
    main()
