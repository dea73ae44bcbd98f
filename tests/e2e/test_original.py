"""The original Lars's own binaries against Lars (issue 17).

* Its API examples (``get_route``, ``get_host``, ``report``, ``example``, each calling
  ``reg_init`` first) and its qps loop (``qps_timed``) give the same results against a Lars
  agent as against its own agent: the route, round robin, a failing host only probed,
  NOEXIST for an unknown module.
* Its agent (``lars_lb_agent``) gets its routes and pushes from a Lars DNS, a change within
  100 ms, and its statistics land in ``ServerCallStatus`` through a Lars reporter.
* A Lars agent and an original agent on the same module see the same changes.

The binaries are built by ``../shared/anchor/build.sh`` (``$LARS_ANCHOR`` to find it
elsewhere) into ``$ANCHOR_BUILD`` (default ``/tmp/lars-anchor``): about 30 s the first time,
nothing when up to date. Where it cannot build (no anchor, no apt) the tests skip, saying
why, except in CI (``CI=true``), where they fail: ``.ci/run`` builds it first.

The original API talks to UDP ports 8888-8890, hard-coded, and its agent listens there: the
tests that use them hold a lock file, so that test runs on this machine take turns, and wait
for the ports to be free. The DNS, the reporter and the Lars agent of the mixed test are on
free ports; the stores are SQLite files of the test's own.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio

from lars import wire
from lars.client import AsyncLarsClient
from lars.core.model import HostKey, ModuleKey, format_host, int_to_ip
from lars.errors import NoRoute
from lars.roles.common import notify_dns
from lars.store import open_store
from tests.e2e.procs import LarsProcess, lars_process
from tests.netutil import free_tcp_port, free_udp_base
from tests.roles.test_agent_original import OriginalApi

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ANCHOR = Path(os.environ.get("LARS_ANCHOR", REPO.parent / "shared" / "anchor"))
BUILD = Path(os.environ.get("ANCHOR_BUILD", Path(tempfile.gettempdir()) / "lars-anchor"))
IN_CI = os.environ.get("CI") == "true"
#: The original API's agent ports (lars_api.cpp and agent_udp_server.cpp hard-code them).
FIXED_PORTS = (8888, 8889, 8890)
#: Held by whoever uses FIXED_PORTS in a test (or benchmarks/original_bench.py).
PORTS_LOCK = Path(tempfile.gettempdir()) / "lars-original-api-ports.lock"
#: Seconds to wait for the fixed ports, held by something else, to come free.
PORTS_PATIENCE = 60.0
#: Seconds one run of an example binary may take (its client waits for ever otherwise).
EXAMPLE_TIMEOUT = 20.0

R1: ModuleKey = (1, 1)  # round robin, the route, qps
R2: ModuleKey = (1, 2)  # a failing host
HOSTS_1 = [(0x0A000001 + i, 7001 + i) for i in range(3)]  # 10.0.0.1:7001 ...
HOSTS_2 = [(0x0A000101 + i, 7101 + i) for i in range(3)]
FAILING = HOSTS_2[1]

#: The original agent's conf: the shipped [loadbalance] section (Lars's defaults are the same).
AGENT_CONF = """[reporter]
ip = 127.0.0.1
port = {reporter}

[dnsserver]
ip = 127.0.0.1
port = {dns}

[loadbalance]
probe_num=10
init_succ_cnt=180
init_err_cnt=5
err_rate=0.1
succ_rate=0.5
contin_err_limit=15
contin_succ_limit=15
window_err_rate=0.7
idle_timeout=15
overload_timeout=15
update_timeout=15
"""


# --- the original's binaries ------------------------------------------------------------------


def _unavailable(why: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{why}; in CI the original's binaries must be built (.ci/run builds them)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def build() -> Path:
    """The build directory of the original's binaries, built (or found up to date)."""
    script = ANCHOR / "build.sh"
    if not script.is_file():
        _unavailable(f"no {script} (set LARS_ANCHOR to the anchor kit)")
    result = subprocess.run(
        [str(script)],
        env={**os.environ, "ANCHOR_BUILD": str(BUILD)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        _unavailable(f"{script} failed: {(result.stderr or result.stdout)[-2000:]}")
    return BUILD


def example(build: Path, name: str) -> Path:
    return build / "src" / "api" / "cpp" / "example" / name


async def run_binary(path: Path, *args: object) -> str:
    """Run one of the original's binaries to completion; its stdout."""
    with trio.fail_after(EXAMPLE_TIMEOUT):
        result = await trio.run_process(
            [str(path), *map(str, args)], capture_stdout=True, capture_stderr=True, check=False
        )
    out: str = result.stdout.decode()
    assert result.returncode == 0, f"{path.name} {args}: {result.returncode}\n{out}"
    return out


_HOST_IS = re.compile(r"^host is ([\d.]+):(\d+)$", re.MULTILINE)
_ROUTE_LINE = re.compile(r"^ip = ([\d.]+), port = (\d+)$", re.MULTILINE)


def hosts_in(out: str, pattern: re.Pattern[str]) -> list[str]:
    return [f"{ip}:{port}" for ip, port in pattern.findall(out)]


# --- the fixed ports --------------------------------------------------------------------------


def _ports_free() -> bool:
    for port in FIXED_PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                raise
    return True


@pytest.fixture
def fixed_ports() -> Iterator[None]:
    """Hold the lock of FIXED_PORTS and wait until nothing listens on them."""
    with PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            deadline = time.monotonic() + PORTS_PATIENCE
            while not _ports_free():
                if time.monotonic() > deadline:
                    busy = subprocess.run(
                        ["ss", "-Hlunp", "( sport = :8888 or sport = :8889 or sport = :8890 )"],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout
                    pytest.fail(f"UDP 8888-8890 stayed busy for {PORTS_PATIENCE:.0f}s:\n{busy}")
                time.sleep(0.2)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OriginalAgent:
    """A lars_lb_agent process pointed at a DNS and a reporter (it reads ./conf from its
    working directory, and listens on FIXED_PORTS)."""

    def __init__(self, build: Path, workdir: Path, dns: str, reporter: str) -> None:
        self.binary = build / "src" / "lars_loadbalance_agent" / "bin" / "lars_lb_agent"
        self.workdir = workdir
        (workdir / "conf").mkdir(parents=True, exist_ok=True)
        conf = AGENT_CONF.format(dns=_port(dns), reporter=_port(reporter))
        (workdir / "conf" / "lars_lb_agent.conf").write_text(conf)
        self.log_path = workdir / "agent.log"
        self.process: trio.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [str(self.binary)], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        with trio.fail_after(10):
            while _ports_free():
                assert self.process.poll() is None, f"the original agent exited:\n{self.log}"
                await trio.sleep(0.02)
        await trio.sleep(0.2)  # its DNS and reporter clients connect

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.poll() is None:
                self.process.kill()
                await self.process.wait()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@asynccontextmanager
async def original_agent(
    build: Path, workdir: Path, dns: str, reporter: str
) -> AsyncIterator[OriginalAgent]:
    agent = OriginalAgent(build, workdir, dns, reporter)
    try:
        await agent.start()
        yield agent
    finally:
        with trio.CancelScope(shield=True):
            await agent.stop()


# --- Lars -------------------------------------------------------------------------------------


async def seed_store(path: Path, routes: dict[ModuleKey, list[HostKey]]) -> str:
    url = f"sqlite:///{path}"
    async with open_store(url, create=True) as store:
        await store.init_schema()
        await store.change_routes(add=routes)
    return url


@asynccontextmanager
async def lars_dns_and_reporter(tmp_path: Path, url: str) -> AsyncIterator[LarsProcess]:
    """A Lars DNS and reporter (one process) on free ports, on the store ``url``. (Below
    32768: the original agent reads its conf's ports into a C ``short``.)"""
    config = {
        "store": url,
        "dns": {"listen": f"127.0.0.1:{free_tcp_port()}", "check_interval": 0.5},
        "reporter": {"listen": f"127.0.0.1:{free_tcp_port()}"},
    }
    async with lars_process(tmp_path, "central", ["dns", "reporter"], config) as proc:
        yield proc


def lars_agent_config(base: int, central: LarsProcess) -> dict[str, Any]:
    return {
        "agent": {
            "base_port": base,
            "ports": 3,
            "dns": [central.addresses["dns"]],
            "reporter": central.addresses["reporter"],
            "route_wait": 1.0,
            "retry_max": 0.5,
        }
    }


# --- the API examples against either agent ---------------------------------------------------


async def api_results(build: Path) -> dict[str, Any]:
    """What the original's API examples and qps tool see, run one after another against the
    agent on FIXED_PORTS."""
    get_route, get_host, report = (example(build, n) for n in ("get_route", "get_host", "report"))
    results: dict[str, Any] = {}
    route = hosts_in(await run_binary(get_route, *R1), _ROUTE_LINE)
    results["route"] = sorted(route)
    chosen = [hosts_in(await run_binary(get_host, *R1), _HOST_IS)[0] for _ in range(6)]
    # Round robin: each host once per turn, in the same order every turn (which order is
    # each agent's own: the original's follows the DNS's answer, Lars's its balancer's).
    results["round_robin"] = (sorted(chosen[:3]), chosen[3:] == chosen[:3])

    # 15 failures in a row (contin_err_limit) overload a host: then it is only probed, once
    # every probe_num (10) + 1 requests.
    failing = format_host(FAILING)
    for _ in range(15):
        out = await run_binary(report, *R2, int_to_ip(FAILING[0]), FAILING[1], 1)
        assert f"{failing} OVERLOAD" in out
    chosen = [hosts_in(await run_binary(get_host, *R2), _HOST_IS)[0] for _ in range(33)]
    probes = [i for i, host in enumerate(chosen) if host == failing]
    results["probes"] = len(probes)
    results["probe_gaps"] = sorted({b - a for a, b in itertools.pairwise(probes)})
    results["others"] = sorted({h for h in chosen if h != failing})

    results["unknown_get_host"] = await run_binary(get_host, 99, 99)
    results["unknown_get_route"] = await run_binary(get_route, 99, 98)

    out = await run_binary(example(build, "example"), *R1)
    results["example"] = (
        "get route succ!" in out,
        sorted(hosts_in(out, _ROUTE_LINE)),
        len(hosts_in(out, _HOST_IS)),
        "report modid = 1, cmdid = 1 |" in out,
    )
    qps = json.loads(await run_binary(build / "bin" / "qps_timed", 1, 0.5, "1:1"))
    results["qps"] = (qps["loops"] > 0, qps["ok"] == qps["loops"], qps["noexist"], qps["errors"])
    return results


async def test_the_original_api_gets_the_same_results_from_a_lars_agent(
    build: Path, fixed_ports: None, tmp_path: Path
) -> None:
    url = await seed_store(tmp_path / "routes.db", {R1: HOSTS_1, R2: HOSTS_2})
    async with lars_dns_and_reporter(tmp_path, url) as central:
        dns, reporter = central.addresses["dns"], central.addresses["reporter"]
        async with original_agent(build, tmp_path / "original", dns, reporter):
            theirs = await api_results(build)
        config = lars_agent_config(FIXED_PORTS[0], central)
        async with lars_process(tmp_path, "agent", ["agent"], config):
            ours = await api_results(build)
    assert ours == theirs
    # ... and what they agree on is right:
    assert ours["route"] == sorted(map(format_host, HOSTS_1))
    assert ours["round_robin"] == (ours["route"], True)
    assert (ours["probes"], ours["probe_gaps"]) == (3, [11])
    assert ours["others"] == sorted(format_host(h) for h in HOSTS_2 if h != FAILING)
    noexist = "still not exist host, after register, ret = 3"
    assert noexist in ours["unknown_get_host"] and "host is" not in ours["unknown_get_host"]
    assert noexist in ours["unknown_get_route"] and "ip = " not in ours["unknown_get_route"]
    assert ours["example"] == (True, ours["route"], 1, True)
    assert ours["qps"] == (True, True, 0, 0)


# --- an original agent on a Lars DNS and reporter --------------------------------------------


async def route_of(api: OriginalApi, module: ModuleKey) -> frozenset[HostKey]:
    """The route the original agent serves, through its API (an API GetRouteRequest)."""
    await api.send(wire.ApiGetRouteRequest(0, *module))
    reply = await api.receive(*module)
    assert isinstance(reply, wire.ApiGetRouteResponse)
    return frozenset(reply.hosts)


async def registered(api: OriginalApi, module: ModuleKey) -> frozenset[HostKey]:
    """The route, once the original agent has it: its first answer for a module is always
    empty (it asks its DNS then), so ask until it is not, as its reg_init does."""
    with trio.fail_after(5):
        while not (route := await route_of(api, module)):
            await trio.sleep(0.05)
    return route


#: Route changes of the push tests: hosts added, and the module deleted and back. (Not a
#: host removed: the original agent keeps a removed host's freed entry in its map, a defect
#: the anchor's README lists, so its API would still show it.)
ADDED = [(0x0A0000FE, 7999), (0x0A0000FD, 7998)]
CHANGES: list[tuple[list[HostKey], list[HostKey] | None]] = [
    (ADDED[:1], []),
    (ADDED[1:], []),
    ([], None),  # the module deleted
    (HOSTS_1, []),  # and back
]


async def test_an_original_agent_gets_routes_and_pushes_from_a_lars_dns(
    build: Path, fixed_ports: None, tmp_path: Path
) -> None:
    url = await seed_store(tmp_path / "routes.db", {R1: HOSTS_1})
    async with (
        lars_dns_and_reporter(tmp_path, url) as central,
        original_agent(
            build, tmp_path / "original", central.addresses["dns"], central.addresses["reporter"]
        ),
        open_store(url) as store,
    ):
        route = await run_binary(example(build, "get_route"), *R1)
        assert sorted(hosts_in(route, _ROUTE_LINE)) == sorted(map(format_host, HOSTS_1))
        api = OriginalApi(FIXED_PORTS[0])
        try:
            current = await registered(api, R1)
            latencies = []
            for add, remove in CHANGES:
                current = frozenset() if remove is None else current | set(add)
                result = await store.change_routes(add={R1: add}, remove={R1: remove})
                assert result.version is not None
                changed = time.monotonic()
                assert await notify_dns([central.addresses["dns"]], result.version) == []
                with trio.fail_after(5):
                    while await route_of(api, R1) != current:
                        await trio.sleep(0.002)
                latencies.append(time.monotonic() - changed)
            # ... and the original's own get_route shows the last one.
            route = await run_binary(example(build, "get_route"), *R1)
            assert sorted(hosts_in(route, _ROUTE_LINE)) == sorted(map(format_host, current))
        finally:
            api.close()
    assert max(latencies) < 0.1, f"route changes reached the original agent in {latencies}"


async def test_an_original_agents_statistics_land_through_a_lars_reporter(
    build: Path, fixed_ports: None, tmp_path: Path
) -> None:
    url = await seed_store(tmp_path / "routes.db", {R1: HOSTS_1})
    async with (
        lars_dns_and_reporter(tmp_path, url) as central,
        original_agent(
            build, tmp_path / "original", central.addresses["dns"], central.addresses["reporter"]
        ),
        open_store(url) as store,
    ):
        report = example(build, "report")
        # One call to each host first: the original agent does not count it (its idle_since
        # is not initialised, so that call resets the host's window), and the reporter takes
        # the first report of a host as the base to count from.
        for ip, port in HOSTS_1:
            await run_binary(report, *R1, int_to_ip(ip), port, 0)
        before = await totals(store, R1, HOSTS_1, want_rows=3)
        qps = json.loads(await run_binary(build / "bin" / "qps_timed", 1, 0.5, "1:1"))
        assert qps["ok"] > 0 and qps["errors"] == 0
        with trio.fail_after(30):  # the reporter reads one report per call
            while (after := await totals(store, R1, HOSTS_1)) != (before[0] + qps["ok"], 0):
                await trio.sleep(0.2)
        rows = await store.read_call_status(*R1)
    assert {(r.ip, r.port) for r in rows} == set(HOSTS_1)
    assert len({r.caller for r in rows}) == 1  # the original agent's host
    assert after == (before[0] + qps["ok"], 0)


async def totals(
    store: Any, module: ModuleKey, hosts: list[HostKey], want_rows: int = 0
) -> tuple[int, int]:
    """``(successes, failures)`` in ServerCallStatus's totals for ``hosts`` of ``module``;
    waits for ``want_rows`` rows first."""
    with trio.fail_after(10):
        while True:
            rows = [r for r in await store.read_call_status(*module) if (r.ip, r.port) in hosts]
            if len(rows) >= want_rows:
                return sum(r.succ_total for r in rows), sum(r.err_total for r in rows)
            await trio.sleep(0.1)


# --- both kinds of agent on one module --------------------------------------------------------


async def test_a_lars_agent_and_an_original_agent_see_the_same_changes(
    build: Path, fixed_ports: None, tmp_path: Path
) -> None:
    url = await seed_store(tmp_path / "routes.db", {R1: HOSTS_1})
    base = free_udp_base(3)
    async with lars_dns_and_reporter(tmp_path, url) as central:
        dns, reporter = central.addresses["dns"], central.addresses["reporter"]
        async with (
            original_agent(build, tmp_path / "original", dns, reporter),
            lars_process(tmp_path, "agent", ["agent"], lars_agent_config(base, central)),
            open_store(url) as store,
        ):
            api = OriginalApi(FIXED_PORTS[0])
            client = AsyncLarsClient(base_port=base, timeout=1.0, retries=2)
            try:

                async def lars_route() -> frozenset[HostKey]:
                    try:
                        return frozenset(h.key for h in await client.get_route(*R1))
                    except NoRoute:
                        return frozenset()

                assert await lars_route() == await registered(api, R1) == set(HOSTS_1)
                current = frozenset(HOSTS_1)
                for add, remove in CHANGES:
                    current = frozenset() if remove is None else current | set(add)
                    result = await store.change_routes(add={R1: add}, remove={R1: remove})
                    assert result.version is not None
                    await notify_dns([dns], result.version)
                    with trio.fail_after(5):
                        while (await lars_route(), await route_of(api, R1)) != (current, current):
                            await trio.sleep(0.01)
            finally:
                api.close()
                client.close()
