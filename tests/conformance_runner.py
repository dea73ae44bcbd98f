"""The Python runner of the client conformance scenario (``clients/conformance/scenario.json``).

The C++ and Java runners (``clients/cpp/conformance/runner.cpp``,
``clients/java/conformance/lars/tools/ConformanceRunner.java``) do exactly what this one
does, with their own client; ``clients/conformance/README.md`` describes the format. Usage::

    python tests/conformance_runner.py --scenario clients/conformance/scenario.json \\
        --base-port 20000 --dead-base-port 21000 [--host 127.0.0.1] [--module-offset 0]

Prints one JSON line per step (``{"step", "name", "ok", "elapsed", "outcomes", "problems"}``)
and a last line ``{"passed": N, "failed": M}``; exits 1 if a step failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lars.client import LarsClient
from lars.core.model import Host
from lars.errors import LarsError

Outcome = Any  # "ip:port", an error's name, a sorted list of "ip:port", "ok" or a port index


def check(expect: dict[str, Any], outcomes: list[Outcome], elapsed: float) -> list[str]:
    """What is wrong with a step's outcomes (empty: the step passed)."""
    problems: list[str] = []
    if "counts" in expect:
        got = Counter(json.dumps(o) if not isinstance(o, str) else o for o in outcomes)
        if got != Counter(expect["counts"]):
            problems.append(f"counts {dict(sorted(got.items()))} != {expect['counts']}")
    if "one_of" in expect:
        allowed = expect["one_of"]
        problems += [f"outcome {o!r} is not one of {allowed}" for o in outcomes if o not in allowed]
    if "period" in expect:
        p = expect["period"]
        bad = [i for i in range(len(outcomes) - p) if outcomes[i] != outcomes[i + p]]
        if bad:
            problems.append(f"not periodic with period {p}: outcome {bad[0]} != {bad[0] + p}")
    for value, gap in expect.get("spacing", {}).items():
        where = [i for i, o in enumerate(outcomes) if o == value]
        gaps = [b - a for a, b in itertools.pairwise(where)]
        if len(where) < 2 or any(g != gap for g in gaps):
            problems.append(f"{value} at {where}: not every {gap}")
    if "hosts" in expect:
        want = sorted(expect["hosts"])
        problems += [f"hosts {o} != {want}" for o in outcomes if o != want]
    if "error" in expect:
        problems += [
            f"{o!r} instead of {expect['error']}" for o in outcomes if o != expect["error"]
        ]
    if "port_index" in expect:
        want_index = expect["port_index"]
        problems += [f"port index {o} != {want_index}" for o in outcomes if o != want_index]
    if "elapsed" in expect:
        low, high = expect["elapsed"].get("min", 0.0), expect["elapsed"].get("max", float("inf"))
        if not low <= elapsed <= high:
            problems.append(f"took {elapsed:.3f}s, not within [{low}, {high}]")
    return problems


def _error_name(exc: LarsError) -> str:
    return type(exc).__name__


def run_step(step: dict[str, Any], clients: dict[str, LarsClient], offset: int) -> dict[str, Any]:
    """Run one step; returns its result line."""
    op = step["op"]
    client = clients[step.get("agent", "live")]
    modid, cmdid = step.get("module", (0, 0))
    if op != "port":
        modid += offset

    def report() -> Outcome:
        client.report(modid, cmdid, Host.parse(step["host"]), retcode=step["retcode"])
        return "ok"

    actions: dict[str, Callable[[], Outcome]] = {
        "get_host": lambda: str(client.get_host(modid, cmdid)),
        "get_route": lambda: sorted(str(h) for h in client.get_route(modid, cmdid)),
        "reg_init": lambda: sorted(str(h) for h in client.reg_init(modid, cmdid)),
        "report": report,
        "port": lambda: client.core.port(modid, cmdid) - client.core.base_port,
    }
    outcomes: list[Outcome] = []
    began = time.monotonic()
    if op not in actions:
        raise SystemExit(f"unknown op {op!r} in step {step['name']!r}")
    for _ in range(step.get("repeat", 1)):
        try:
            outcomes.append(actions[op]())
        except LarsError as exc:
            outcomes.append(_error_name(exc))
    elapsed = time.monotonic() - began
    problems = check(step.get("expect", {}), outcomes, elapsed)
    return {
        "name": step["name"],
        "ok": not problems,
        "elapsed": round(elapsed, 4),
        "outcomes": outcomes,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; 0 if every step passed, 1 if not."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", required=True, type=int)
    parser.add_argument("--dead-base-port", required=True, type=int)
    parser.add_argument("--module-offset", default=0, type=int)
    args = parser.parse_args(argv)
    scenario = json.loads(args.scenario.read_text())
    settings = scenario["client"]
    clients = {
        name: LarsClient(
            args.host,
            base,
            settings["ports"],
            timeout=settings["timeout"],
            retries=settings["retries"],
        )
        for name, base in (("live", args.base_port), ("dead", args.dead_base_port))
    }
    failed = 0
    for number, step in enumerate(scenario["steps"], 1):
        result = run_step(step, clients, args.module_offset)
        failed += not result["ok"]
        print(json.dumps({"step": number, **result}), flush=True)
    for client in clients.values():
        client.close()
    print(json.dumps({"passed": len(scenario["steps"]) - failed, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
