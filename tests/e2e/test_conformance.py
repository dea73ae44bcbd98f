"""One conformance scenario, three clients: Python, C++ and Java against one real agent.

``clients/conformance/scenario.json`` is run by each language's runner (the Python one is
``tests/conformance_runner.py``) against ``lars run --role dns --role agent`` on a fresh
MariaDB database. Each runner gets its own module offset, so the three never share a load
balancer. The C++ and Java clients are built by ``clients/build.sh``: into ``$LARS_CLIENTS_BUILD``
when CI has built them already, else into a cache under the temp directory keyed by a hash
of ``clients/``. A missing toolchain fails the test; ``LARS_TEST_CLIENTS=off`` skips it on
purpose (never in CI).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from lars.core.model import Host, ip_to_int
from lars.store import open_store
from tests import mysql_admin, wire_fixtures
from tests.e2e.procs import lars_process
from tests.netutil import free_tcp_port, free_udp_base

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"
SCENARIO = CLIENTS / "conformance" / "scenario.json"
PYTHON_RUNNER = ROOT / "tests" / "conformance_runner.py"
BUILD_ENV = "LARS_CLIENTS_BUILD"
SWITCH_ENV = "LARS_TEST_CLIENTS"
#: Each runner's modules: the scenario's modid plus its offset.
OFFSETS = {"python": 0, "cpp": 1000, "java": 2000}
RUN_TIMEOUT = 60.0
#: The bench comparison: rounds of each client, seconds each.
BENCH_ROUNDS = 3
BENCH_SECONDS = 2.0
BUILD_TIMEOUT = 600.0


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CLIENTS.rglob("*")):
        relative = path.relative_to(CLIENTS)
        if path.is_file() and "build" not in relative.parts[:-1]:
            digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _runner_commands(build: Path) -> dict[str, list[str]]:
    return {
        "python": [sys.executable, str(PYTHON_RUNNER)],
        "cpp": [str(build / "cpp" / "conformance_runner")],
        "java": [str(build / "java" / "conformance_runner")],
    }


def _built(build: Path) -> bool:
    return all(Path(cmd[0]).is_file() for cmd in _runner_commands(build).values())


@pytest.fixture(scope="module")
def client_build() -> Path:
    """The directory of the built C++ and Java clients (built here if need be)."""
    if os.environ.get(SWITCH_ENV, "").lower() == "off":
        pytest.skip(f"client conformance turned off ({SWITCH_ENV}=off)")
    given = os.environ.get(BUILD_ENV)
    if given:
        build = Path(given)
        if not _built(build):
            pytest.fail(f"{BUILD_ENV}={given} holds no built clients (clients/build.sh)")
        return build
    build = Path(tempfile.gettempdir()) / "lars-clients" / _source_hash()
    if _built(build):
        return build
    partial = build.with_name(f"{build.name}.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        result = subprocess.run(
            ["bash", str(CLIENTS / "build.sh"), str(partial), "--runners"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                "clients/build.sh failed (install the toolchains: see clients/README.md, "
                f"or set {SWITCH_ENV}=off to skip on purpose):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
                pytrace=False,
            )
        if not _built(build):  # else a concurrent run finished first: keep its build
            shutil.rmtree(build, ignore_errors=True)
            partial.rename(build)  # whole or absent: no run ever sees half a build
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return build


def test_wire_fixtures_are_generated_from_the_python_codec() -> None:
    path = CLIENTS / "conformance" / "wire_fixtures.json"
    assert path.read_text() == wire_fixtures.render(), (
        "clients/conformance/wire_fixtures.json is stale: "
        "python -m tests.wire_fixtures > clients/conformance/wire_fixtures.json"
    )


@asynccontextmanager
async def agent(tmp_path: Path, scenario: dict[str, Any]) -> AsyncIterator[int]:
    """``lars run --role dns --role agent`` on a fresh MariaDB database holding the scenario's
    routes for every runner's offset; yields the agent's base port."""
    async with mysql_admin.fresh_database(init=True) as url:
        async with open_store(url) as store:
            for offset in OFFSETS.values():
                for route in scenario["routes"]:
                    modid, cmdid = route["module"]
                    hosts = [Host.parse(h) for h in route["hosts"]]
                    await store.add_hosts(
                        (modid + offset, cmdid), [(ip_to_int(h.ip), h.port) for h in hosts]
                    )
        dns_port, base = free_tcp_port(), free_udp_base(scenario["client"]["ports"])
        config = {
            "store": url,
            "dns": {"listen": f"127.0.0.1:{dns_port}"},
            "agent": {
                "base_port": base,
                "ports": scenario["client"]["ports"],
                "dns": [f"127.0.0.1:{dns_port}"],
                "reporter": f"127.0.0.1:{free_tcp_port()}",  # nothing there: never a default
                "retry_max": 0.5,
            },
        }
        async with lars_process(tmp_path, "lars", ["dns", "agent"], config):
            yield base


async def run_scenario(
    command: list[str], scenario_path: Path, base: int, dead_base: int, offset: int
) -> tuple[int, list[dict[str, Any]], str]:
    """Run one runner; ``(exit status, its JSON lines, its stderr)``."""
    argv = [
        *command,
        "--scenario",
        str(scenario_path),
        "--base-port",
        str(base),
        "--dead-base-port",
        str(dead_base),
        "--module-offset",
        str(offset),
    ]
    with trio.fail_after(RUN_TIMEOUT):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    lines = [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]
    return result.returncode, lines, result.stderr.decode()


def _report(language: str, status: int, lines: list[dict[str, Any]], stderr: str) -> str:
    failed = [line for line in lines if line.get("ok") is False]
    shown = "\n".join(json.dumps(line) for line in failed) or "\n".join(map(json.dumps, lines))
    return f"{language} runner exited {status}:\n{shown}\n{stderr[-2000:]}"


def _broken(scenario: dict[str, Any]) -> tuple[dict[str, Any], list[bool]]:
    """A short scenario whose expectations are wrong on purpose, one kind of check each (and
    one right step): every runner must fail exactly the wrong ones."""
    steps = {step["name"]: step for step in scenario["steps"]}
    rr = steps["round robin 10/10/10 over three hosts"]
    a, b, c = rr["expect"]["counts"]

    def variant(step: dict[str, Any], **expect: Any) -> dict[str, Any]:
        out = copy.deepcopy(step)
        out["expect"] = expect
        return out

    wrong = [
        variant(steps["port rule: no 32-bit overflow"], port_index=2),
        variant(rr, counts={a: 11, b: 9, c: 10}),
        variant(rr, period=2),
        variant(rr, spacing={a: 4}),
        variant(rr, one_of=[a, b]),
        variant(steps["get_route: every host of the module"], hosts=["10.0.3.1:7301"]),
        variant(steps["no route: get_host of an unknown module"], error="Overloaded"),
        variant(steps["no agent: report is best effort, at once"], elapsed={"min": 5}),
    ]
    right = steps["port rule: small ids"]
    broken = {**scenario, "steps": [*wrong, right]}
    return broken, [False] * len(wrong) + [True]


@pytest.mark.e2e
@pytest.mark.mysql
async def test_every_client_passes_the_scenario_against_a_real_agent(
    tmp_path: Path, client_build: Path
) -> None:
    """Each runner passes every step of the scenario, and fails exactly the wrong steps of a
    scenario with broken expectations."""
    scenario = json.loads(SCENARIO.read_text())
    broken, broken_ok = _broken(scenario)
    broken_path = tmp_path / "broken.json"
    broken_path.write_text(json.dumps(broken))
    commands = _runner_commands(client_build)
    async with agent(tmp_path, scenario) as base:
        # Nothing listens there: chosen while the agent holds its own ports.
        dead_base = free_udp_base(scenario["client"]["ports"])
        for language, command in commands.items():
            began = time.monotonic()
            status, lines, stderr = await run_scenario(
                command, SCENARIO, base, dead_base, OFFSETS[language]
            )
            took = time.monotonic() - began
            assert status == 0, _report(language, status, lines, stderr)
            steps = [line for line in lines if "step" in line]
            assert [s["name"] for s in steps] == [s["name"] for s in scenario["steps"]]
            assert all(s["ok"] for s in steps)
            assert lines[-1] == {"passed": len(scenario["steps"]), "failed": 0}
            print(f"{language}: {len(steps)} steps passed in {took:.1f}s")

            # The runner's own checks catch wrong expectations of every kind.
            status, lines, stderr = await run_scenario(
                command, broken_path, base, dead_base, OFFSETS[language]
            )
            assert status == 1, _report(language, status, lines, stderr)
            assert [line["ok"] for line in lines if "step" in line] == broken_ok, lines
            assert lines[-1] == {"passed": 1, "failed": len(broken_ok) - 1}


@pytest.mark.e2e
@pytest.mark.mysql
async def test_cpp_bench_loops_at_least_as_fast_as_python(
    tmp_path: Path, client_build: Path
) -> None:
    """The get_host + report loop against one agent: ``lars bench`` (the Python client, one
    worker) and the C++ ``bench``, alternated, BENCH_SECONDS each."""
    scenario = json.loads(SCENARIO.read_text())
    async with agent(tmp_path, scenario) as base:
        config = tmp_path / "bench.toml"
        config.write_text(f"[agent]\nbase_port = {base}\n")
        common = ["--modid", "1", "--cmdid", "1", "--duration", str(BENCH_SECONDS), "--json"]
        commands = {
            "python": [
                sys.executable,
                "-m",
                "lars",
                "bench",
                "--workers",
                "1",
                "--config",
                str(config),
            ],
            "cpp": [str(client_build / "cpp" / "bench"), "--base-port", str(base)],
        }
        figures: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(BENCH_ROUNDS):
            for name, command in commands.items():
                with trio.fail_after(RUN_TIMEOUT):
                    result = await trio.run_process(
                        [*command, *common], capture_stdout=True, capture_stderr=True
                    )
                figures[name].append(json.loads(result.stdout)["loops_per_s"])
    print(f"loops/s over {BENCH_ROUNDS} x {BENCH_SECONDS}s: {figures}")
    assert max(figures["cpp"]) >= max(figures["python"]), figures
