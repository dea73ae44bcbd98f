"""The scheduling policies side by side (issue 14, DESIGN §13): every scenario of
``lars simulate --scenario`` run once per policy through a real agent (see lars.scenarios),
plus the zone outage without zone affinity (plain §6 round robin spread over both zones).

Prints one table (and ``--json``: one object per run). Per run: calls made, the error rate
callers saw, p50/p99 call latency, seconds from the fault until the agent overloaded every
faulty host (eject) and from its end until all serve again (recover), and the share of
calls each host got.

Usage: python benchmarks/policy_bench.py [--duration S] [--scenario NAME]... [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lars import scenarios

POLICIES = ("rr", "weighted", "p2c", "hash")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument(
        "--scenario", action="append", choices=scenarios.SCENARIOS, help="default: all"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for name in args.scenario or scenarios.SCENARIOS:
        sc = scenarios.scenario(name, args.duration)
        runs: list[tuple[str, dict[str, bool]]] = [(p, {}) for p in POLICIES]
        if sc.zone_affinity:
            runs.insert(0, ("rr", {"zone_affinity": False}))
        for policy, changes in runs:
            params = scenarios.sim_params(policy, sc, **changes)
            result = scenarios.run(sc, policy, args.seed, params)
            if changes:
                result.policy = "rr/nozone"
            results.append(result)
            if args.json:
                print(json.dumps(result.as_json()), flush=True)
            else:
                print(f"  {name} {result.policy}: done", file=sys.stderr, flush=True)
    if not args.json:
        print(scenarios.format_results(results))


if __name__ == "__main__":
    main()
