"""The files under ``deploy/``: alert rules, their unit tests, the example Prometheus config,
the Grafana dashboard and the systemd units, checked with ``promtool`` and ``systemd-analyze``.

``promtool`` comes with Debian's ``prometheus`` package, which ``.ci/run`` installs: without it
these tests fail rather than skip, so that CI cannot pass without checking the rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lars.roles.run import GRACE_SECONDS

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "lars.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "lars.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "lars.json"
UNITS = {
    role: DEPLOY / "systemd" / f"lars-{role}.service"
    for role in ("dns", "reporter", "agent", "web")
}

#: Every metric the roles serve (the metrics spec of issue 11), with its type. Counters are
#: named as exposed, with ``_total``; a histogram ``h`` is exposed as ``h_bucket``, ``h_sum``
#: and ``h_count``.
SPEC_METRICS: dict[str, str] = {
    "lars_build_info": "gauge",
    # agent
    "lars_agent_requests_total": "counter",
    "lars_agent_invalid_requests_total": "counter",
    "lars_agent_malformed_datagrams_total": "counter",
    "lars_agent_internal_errors_total": "counter",
    "lars_agent_replies_dropped_total": "counter",
    "lars_agent_host_transitions_total": "counter",
    "lars_agent_probes_total": "counter",
    "lars_agent_hosts": "gauge",
    "lars_agent_modules": "gauge",
    "lars_agent_pending_modules": "gauge",
    "lars_agent_route_updates_total": "counter",
    "lars_agent_dns_stale_notices_total": "counter",
    "lars_agent_dns_up": "gauge",
    "lars_agent_dns_connects_total": "counter",
    "lars_agent_dns_connect_failures_total": "counter",
    "lars_agent_reporter_up": "gauge",
    "lars_agent_reporter_connects_total": "counter",
    "lars_agent_reporter_connect_failures_total": "counter",
    "lars_agent_stats_reports_sent_total": "counter",
    "lars_agent_stats_reports_acknowledged_total": "counter",
    "lars_agent_stats_reports_in_flight": "gauge",
    "lars_agent_stats_modules_due": "gauge",
    "lars_agent_module_hosts": "gauge",
    "lars_agent_module_reports_total": "counter",
    # dns
    "lars_dns_routes_loaded": "gauge",
    "lars_dns_modules": "gauge",
    "lars_dns_hosts": "gauge",
    "lars_dns_route_version": "gauge",
    "lars_dns_connections": "gauge",
    "lars_dns_subscribed_modules": "gauge",
    "lars_dns_route_requests_total": "counter",
    "lars_dns_pushes_total": "counter",
    "lars_dns_push_fanout_seconds": "histogram",
    "lars_dns_store_loads_total": "counter",
    "lars_dns_store_load_seconds": "histogram",
    "lars_dns_store_errors_total": "counter",
    "lars_dns_store_up": "gauge",
    "lars_dns_change_notices_total": "counter",
    "lars_dns_malformed_frames_total": "counter",
    "lars_dns_invalid_requests_total": "counter",
    "lars_dns_subscriptions_lapsed_total": "counter",
    # reporter
    "lars_reporter_reports_received_total": "counter",
    "lars_reporter_results_received_total": "counter",
    "lars_reporter_results_written_total": "counter",
    "lars_reporter_batches_written_total": "counter",
    "lars_reporter_batch_results": "histogram",
    "lars_reporter_write_seconds": "histogram",
    "lars_reporter_queue_depth": "gauge",
    "lars_reporter_queue_capacity": "gauge",
    "lars_reporter_reports_dropped_total": "counter",
    "lars_reporter_results_dropped_total": "counter",
    "lars_reporter_store_errors_total": "counter",
    "lars_reporter_reply_overflows_total": "counter",
    "lars_reporter_store_up": "gauge",
    "lars_reporter_connections": "gauge",
    "lars_reporter_malformed_frames_total": "counter",
    "lars_reporter_invalid_requests_total": "counter",
}
#: The series names a query may use: gauges and counters as they are, histograms' parts.
SPEC_SERIES = frozenset(
    series
    for name, kind in SPEC_METRICS.items()
    for series in (
        [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name]
    )
)
METRIC_NAME = re.compile(r"lars_[a-z_]+")
#: The alerts that the rules' unit tests must see fire, at least.
TESTED_ALERTS = ("LarsModuleErrorRate", "LarsModuleNoHealthyHost", "LarsAgentWithoutDns")
#: What the dashboard must chart (DESIGN §12, issue 11).
DASHBOARD_SERIES = (
    "lars_agent_requests_total",
    "lars_agent_hosts",
    "lars_agent_host_transitions_total",
    "lars_agent_dns_up",
    "lars_agent_reporter_up",
    "lars_dns_pushes_total",
    "lars_dns_push_fanout_seconds_bucket",
    "lars_dns_store_load_seconds_bucket",
    "lars_reporter_results_written_total",
    "lars_reporter_queue_depth",
    "lars_reporter_write_seconds_bucket",
)
#: Values for the dashboard's variables when its queries are checked outside Grafana.
DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$job_dns": "lars-dns",
    "$job_reporter": "lars-reporter",
    "$job_agent": "lars-agent",
    "$agent": ".*",
}


def tool(name: str) -> str:
    """The path of a Prometheus binary; fails (never skips) the test when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: `apt-get install prometheus` provides prometheus and"
            " promtool (.ci/run installs it)",
            pytrace=False,
        )
    return path


def run(*argv: str) -> str:
    """Run a command (bounded in time); fail the test with its output unless it exits 0."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{output}", pytrace=False)
    return output


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, expression)`` for every query of the dashboard: panel targets (rows
    included) and query variables."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']}",
                query["query"] if isinstance(query, dict) else query,
            )


def promql(expression: str) -> str:
    """A dashboard expression as plain PromQL: its Grafana variables replaced, and of
    ``label_values(SELECTOR, LABEL)`` (Grafana's own) the selector."""
    if expression.startswith("label_values("):
        expression = expression.removeprefix("label_values(").rpartition(",")[0]
    for variable, value in sorted(DASHBOARD_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expression = expression.replace(variable, value)
    assert "$" not in expression, f"unknown variable in {expression!r}"
    return expression


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def unknown_metrics(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text)) - SPEC_SERIES


def test_spec_series_are_named_by_the_prometheus_conventions() -> None:
    for name, kind in SPEC_METRICS.items():
        assert name.startswith("lars_")
        assert name.endswith("_total") == (kind == "counter"), name


def test_alert_rules_pass_promtool_check_rules() -> None:
    output = run(tool("promtool"), "check", "rules", str(RULES))
    assert "SUCCESS" in output


def test_alert_rules_unit_tests_pass() -> None:
    """lars.rules.test.yml feeds series and expects the alerts (and their annotations)."""
    text = RULES_TEST.read_text()
    for alert in TESTED_ALERTS:
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels:", text), alert
    output = run(tool("promtool"), "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in output


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    blocks = re.split(r"\n\s+- alert: ", RULES.read_text())[1:]
    names = [block.split("\n", 1)[0] for block in blocks]
    assert set(TESTED_ALERTS) <= set(names)
    assert len(names) == len(set(names)), names
    for name, block in zip(names, blocks, strict=True):
        assert re.search(r"\n\s+severity: (critical|warning)\n", block), name
        assert re.search(r"\n\s+summary: \S", block), name
        assert re.search(r"\n\s+description: \S", block), name


def test_example_prometheus_config_passes_promtool_check_config() -> None:
    """Also checks the rule file it names, resolved next to it."""
    output = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS: 1 rule files found" in output
    for job in ("lars-dns", "lars-reporter", "lars-agent"):
        assert f"job_name: {job}\n" in PROMETHEUS_CONFIG.read_text()


def test_rules_and_their_tests_name_only_metrics_of_the_spec() -> None:
    assert METRIC_NAME.findall(RULES.read_text())
    assert unknown_metrics(RULES.read_text()) == set()
    assert unknown_metrics(RULES_TEST.read_text()) == set()


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_queries_name_only_metrics_of_the_spec() -> None:
    named: set[str] = set()
    for where, expression in dashboard_expressions(load_dashboard()):
        names = set(METRIC_NAME.findall(expression))
        assert names or expression.startswith("sum by (job) (up{"), f"{where}: {expression}"
        assert names <= SPEC_SERIES, f"{where}: not in the spec: {names - SPEC_SERIES}"
        named |= names
    missing = set(DASHBOARD_SERIES) - named
    assert not missing, f"the dashboard charts none of {sorted(missing)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with its variables filled in, as a recording rule for promtool to parse."""
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (_where, expression) in enumerate(dashboard_expressions(load_dashboard())):
        rules += [
            f"      - record: dashboard_query_{n}",
            f"        expr: {json.dumps(promql(expression))}",
        ]
    (tmp_path / "dashboard.rules.yml").write_text("\n".join(rules) + "\n")
    run(tool("promtool"), "check", "rules", str(tmp_path / "dashboard.rules.yml"))


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as ``{section: [(key, value), ...]}`` (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|ms|min)?", value)
    assert match, value
    return float(match[1]) * {"s": 1, None: 1, "ms": 0.001, "min": 60}[match[2]]


@pytest.mark.parametrize("role", UNITS)
def test_systemd_unit_runs_the_role_restarts_it_and_stops_it_cleanly(role: str) -> None:
    sections = unit_file(UNITS[role])
    assert set(sections) == {"Unit", "Service", "Install"}
    service = dict(sections["Service"])
    assert (
        service["ExecStart"]
        == f"/usr/local/bin/lars run --role {role} --config /etc/lars/lars.toml"
    )
    assert service["Restart"] == "on-failure"
    assert service["User"] == "lars"
    assert service["KillSignal"] == "SIGTERM"
    assert GRACE_SECONDS < seconds(service["TimeoutStopSec"]) <= GRACE_SECONDS + 10
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == value, key
    if role in ("dns", "reporter"):
        assert int(service["LimitNOFILE"]) >= 65536
        assert service["StateDirectory"] == "lars"  # writable under ProtectSystem=strict
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"
    assert dict(sections["Unit"])["Description"]


@pytest.mark.parametrize("role", UNITS)
def test_systemd_analyze_verifies_the_unit(role: str, tmp_path: Path) -> None:
    """systemd's own parser: no unknown key or bad value, and an exposure level of at most 2
    (of 10) in ``systemd-analyze security``. ExecStart points at a stand-in for
    /usr/local/bin/lars, which verify requires to exist."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit parse test still ran)")
    stand_in = tmp_path / "lars"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / UNITS[role].name
    unit.write_text(UNITS[role].read_text().replace("/usr/local/bin/lars", str(stand_in)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
