"""Observability end to end: dns, reporter and agent as separate ``lars run`` processes on a
fresh SQLite store, each serving ``/metrics``, ``/healthz`` and ``/readyz`` on its own
``http_listen``, scraped by a real Prometheus (Debian's ``prometheus`` package, which
``.ci/run`` installs; without it this test fails rather than skips).

Everything listens on free loopback ports; Prometheus gets its own data directory. The
expositions are also checked directly: ``promtool check metrics``, the spec's metric names, and
exact counter deltas.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from lars import AgentUnavailable, Host, NoRoute
from lars.client import LarsClient
from tests.e2e.procs import lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base
from tests.test_deploy import (
    RULES,
    SPEC_METRICS,
    dashboard_expressions,
    load_dashboard,
    promql,
    tool,
)

pytestmark = pytest.mark.e2e

ROLES = ("dns", "reporter", "agent")
MODULE = (1, 1)
HOST = Host("127.0.0.1", 7001)  # never called: the agent only hands it out
CALLS = 100
#: How long any one thing may take to happen (a scrape, a readiness change), seconds.
DEADLINE = 8.0
SCRAPE_INTERVAL = "1s"
GET_HOST_SUCC = {"kind": "get_host", "result": "succ"}

# Requests go straight to 127.0.0.1, whatever *_proxy variables the environment sets.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


async def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; status 0 when nothing answers (yet)."""

    def fetch() -> tuple[int, str]:
        try:
            with _opener.open(url, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except (urllib.error.URLError, OSError) as error:
            return 0, str(error)

    return await trio.to_thread.run_sync(fetch)


async def status_becomes(url: str, status: int, what: str) -> str:
    """Poll ``url`` until it answers ``status``; returns the body."""
    last: tuple[int, str] = (0, "")
    with trio.move_on_after(DEADLINE):
        while True:
            last = await http_get(url)
            if last[0] == status:
                return last[1]
            await trio.sleep(0.1)
    raise AssertionError(f"{what}: {url} never answered {status}; last {last}")


def sample_sum(exposition: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
                found = True
    assert found, f"no sample {name}{labels} in:\n{exposition}"
    return total


def families(exposition: str) -> dict[str, str]:
    """``{exposed name: type}``; counters by their ``_total`` name, as Prometheus stores them."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        found[name] = "gauge" if family.type == "info" else family.type
    return found


def role_of(metric: str) -> str | None:
    """The role that serves a spec metric (None: every role)."""
    return next((r for r in ROLES if metric.startswith(f"lars_{r}_")), None)


async def promtool_check_metrics(exposition: str) -> str:
    result = await trio.run_process(
        [tool("promtool"), "check", "metrics"],
        stdin=exposition.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, f"promtool check metrics: {output}"
    return output


class Prometheus:
    """A real Prometheus scraping ``targets`` (job -> host:port) every second, with the
    deploy/ alert rules loaded."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.config = workdir / "prometheus.yml"
        scrape_configs = [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in targets.items()
        ]
        config = {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "evaluation_interval": SCRAPE_INTERVAL,
            },
            "rule_files": [str(RULES)],
            "scrape_configs": scrape_configs,
        }
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.process: trio.Process | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def start(self) -> None:
        argv = [
            tool("prometheus"),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self.log_path, "ab") as log:
            self.process = await trio.lowlevel.open_process(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        with trio.move_on_after(DEADLINE):
            while (await http_get(f"{self.url}/-/ready"))[0] != 200:
                if self.process.poll() is not None:
                    raise RuntimeError(f"prometheus exited early:\n{self.log}")
                await trio.sleep(0.1)
            return
        raise RuntimeError(f"prometheus not ready within {DEADLINE}s:\n{self.log}")

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await self.process.wait()
            return
        self.process.kill()
        await self.process.wait()

    async def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer."""
        query = urllib.parse.urlencode(params)
        status, body = await http_get(f"{self.url}/api/v1/{path}?{query}")
        assert status == 200, f"{path} {params}: {status} {body}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    async def query(self, expr: str) -> dict[str, float]:
        """An instant query: ``{job: value}`` of each series of the result."""
        data = await self.api("query", query=expr)
        return {r["metric"].get("job", ""): float(r["value"][1]) for r in data["result"]}

    async def query_becomes(self, expr: str, expected: dict[str, float]) -> None:
        got: dict[str, float] = {}
        with trio.move_on_after(DEADLINE):
            while True:
                got = await self.query(expr)
                if got == expected:
                    return
                await trio.sleep(0.2)
        raise AssertionError(f"Prometheus: {expr} is {got}, never became {expected}")


@asynccontextmanager
async def prometheus(workdir: Path, targets: dict[str, str]) -> AsyncIterator[Prometheus]:
    server = Prometheus(workdir, targets)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


def distinct_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_tcp_port())
    return list(ports)


def configs(store: str, tcp: dict[str, int], http: dict[str, int], base: int) -> dict[str, Any]:
    agent = {
        "base_port": base,
        "dns": [f"127.0.0.1:{tcp['dns']}"],
        "reporter": f"127.0.0.1:{tcp['reporter']}",
        "report_interval": 0.2,
        "retry_max": 0.3,
        "http_listen": f"127.0.0.1:{http['agent']}",
    }
    return {
        "dns": {
            "store": store,
            "dns": {"listen": f"127.0.0.1:{tcp['dns']}", "http_listen": f"127.0.0.1:{http['dns']}"},
        },
        "reporter": {
            "store": store,
            "reporter": {
                "listen": f"127.0.0.1:{tcp['reporter']}",
                "http_listen": f"127.0.0.1:{http['reporter']}",
            },
        },
        "agent": {"agent": agent},
    }


def get_hosts(client: LarsClient, count: int) -> list[Host]:
    return [client.get_host(*MODULE) for _ in range(count)]


async def first_host(client: LarsClient) -> Host:
    """get_host until the agent has the route (it may still be on its way from the DNS)."""
    with trio.move_on_after(DEADLINE):
        while True:
            try:
                return await trio.to_thread.run_sync(client.get_host, *MODULE)
            except (NoRoute, AgentUnavailable):  # while the route is on its way
                await trio.sleep(0.1)
    raise AssertionError(f"the agent did not serve module {MODULE} within {DEADLINE}s")


async def alert_states(server: Prometheus, alertname: str) -> set[str]:
    data = await server.api("alerts")
    return {a["state"] for a in data["alerts"] if a["labels"]["alertname"] == alertname}


async def check_rules_evaluate(server: Prometheus) -> None:
    """Every deploy/ rule loaded, and evaluated without error on the real series."""
    expected = {
        line.split(":", 1)[1].strip()
        for line in RULES.read_text().splitlines()
        if line.strip().startswith("- alert:")
    }
    rules: list[dict[str, Any]] = []
    with trio.move_on_after(DEADLINE):
        while True:
            data = await server.api("rules")
            rules = [rule for group in data["groups"] for rule in group["rules"]]
            if rules and all(rule["health"] == "ok" for rule in rules):
                break
            await trio.sleep(0.2)
    assert {rule["name"] for rule in rules} == expected
    assert all(rule["health"] == "ok" for rule in rules), [
        (rule["name"], rule["health"], rule.get("lastError")) for rule in rules
    ]


async def check_dashboard_queries(server: Prometheus, expressions: Iterable[str]) -> None:
    """Every dashboard query evaluates on the real series without error."""
    for expression in expressions:
        await server.api("query", query=promql(expression))


async def test_prometheus_scrapes_every_role_and_sees_the_traffic(tmp_path: Path) -> None:
    for binary in ("prometheus", "promtool"):
        tool(binary)  # missing: fail now, saying how to install it
    store = f"sqlite:///{tmp_path / 'lars.db'}"
    tcp = dict(zip(("dns", "reporter"), distinct_ports(2), strict=True))
    http = dict(zip(ROLES, distinct_ports(3), strict=True))
    base = free_udp_base(3)
    url = {role: f"http://127.0.0.1:{port}" for role, port in http.items()}
    c = configs(store, tcp, http, base)
    # Prometheus first: it takes a few seconds to apply its targets, the roles meanwhile start.
    async with (
        prometheus(tmp_path, {f"lars-{r}": f"127.0.0.1:{http[r]}" for r in ROLES}) as server,
        lars_process(tmp_path, "dns", ["dns"], c["dns"]) as dns,
        lars_process(tmp_path, "reporter", ["reporter"], c["reporter"]),
        lars_process(tmp_path, "agent", ["agent"], c["agent"]),
    ):
        for role in ROLES:
            assert await status_becomes(f"{url[role]}/healthz", 200, role)
        await status_becomes(f"{url['dns']}/readyz", 200, "dns: routes loaded")

        writer = tmp_path / "writer.toml"
        writer.write_text(f'[agent]\ndns = ["127.0.0.1:{tcp["dns"]}"]\n')
        await lars_cli(
            "route", "add", *map(str, MODULE), str(HOST), "--store", store, "--config", str(writer)
        )
        await status_becomes(f"{url['agent']}/readyz", 200, "agent: DNS session up")
        await status_becomes(f"{url['reporter']}/readyz", 200, "reporter: store reachable")

        with LarsClient(base_port=base, timeout=2.0, retries=0) as client:
            assert await first_host(client) == HOST
            await server.query_becomes("up", {f"lars-{r}": 1.0 for r in ROLES})

            # Before: read directly, and wait until Prometheus has scraped the same value.
            _, before = await http_get(f"{url['agent']}/metrics")
            succ_before = sample_sum(before, "lars_agent_requests_total", GET_HOST_SUCC)
            total_before = sample_sum(before, "lars_agent_requests_total", {"kind": "get_host"})
            query = 'sum(lars_agent_requests_total{job="lars-agent", kind="get_host"})'
            await server.query_becomes(query, {"": total_before})

            # retries=0: a lost datagram fails the test instead of being counted twice.
            hosts = await trio.to_thread.run_sync(get_hosts, client, CALLS)
            assert hosts == [HOST] * CALLS

            _, after = await http_get(f"{url['agent']}/metrics")
            succ_after = sample_sum(after, "lars_agent_requests_total", GET_HOST_SUCC)
            assert succ_after - succ_before == CALLS
            total = sample_sum(after, "lars_agent_requests_total", {"kind": "get_host"})
            assert total - total_before == CALLS
            await server.query_becomes(query, {"": total_before + CALLS})

            # A report of each kind, so that every per-module series exists.
            await trio.to_thread.run_sync(lambda: client.report(*MODULE, HOST, ok=True))
            await trio.to_thread.run_sync(lambda: client.report(*MODULE, HOST, ok=False))

        # Each role's exposition: valid by promtool, and every metric of the spec in it.
        await trio.sleep(0.5)  # a report interval or two: the reports reach the reporter
        for role in ROLES:
            status, exposition = await http_get(f"{url[role]}/metrics")
            assert status == 200, (role, exposition)
            await promtool_check_metrics(exposition)
            served = families(exposition)
            for metric, kind in SPEC_METRICS.items():
                if role_of(metric) in (None, role):
                    assert served.get(metric) == kind, f"{role} /metrics: {metric} ({kind})"
            assert sample_sum(exposition, "lars_build_info", {}) == 1

        await check_rules_evaluate(server)
        expressions = [e for _, e in dashboard_expressions(load_dashboard())]
        await check_dashboard_queries(server, expressions)

        # The DNS goes away: the agent is no longer ready, Prometheus sees both.
        dns.kill()
        body = await status_becomes(f"{url['agent']}/readyz", 503, "agent without DNS")
        assert body.strip(), "a 503 from /readyz names what is not ready"
        await server.query_becomes('up{job="lars-dns"}', {"lars-dns": 0.0})
        await server.query_becomes('lars_agent_dns_up{job="lars-agent"}', {"lars-agent": 0.0})
        with trio.fail_after(DEADLINE):
            while await alert_states(server, "LarsAgentWithoutDns") != {"pending"}:
                await trio.sleep(0.2)
