"""``lars simulate --scenario`` (lars.scenarios) and the people's form of ``lars query
--explain``: short runs through a real agent in this process."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from lars import scenarios
from lars.cli import _explain_module, cli
from lars.core.balancer import BalancerParams
from lars.core.model import HostMeta
from lars.core.table import ModuleTable


def test_zone_outage_through_a_real_agent_keeps_errors_low_and_traffic_home() -> None:
    sc = scenarios.scenario("zone-outage", 1.5)
    result = scenarios.run(sc, "rr")
    assert result.calls > 500
    assert result.error_rate < 0.05
    assert result.eject_s is not None and result.eject_s < 0.5
    home = sum(v for k, v in result.shares.items() if k.startswith("a"))
    nozone = scenarios.run(sc, "rr", params=scenarios.sim_params("rr", sc, zone_affinity=False))
    spread = sum(v for k, v in nozone.shares.items() if k.startswith("a"))
    # before the outage all in zone a against half of it (the rest depends on how fast
    # this machine makes the calls that probe zone a back)
    assert home > spread + 0.08


def test_slow_host_p2c_avoids_the_slow_host() -> None:
    sc = scenarios.scenario("slow-host", 1.5)
    p2c = scenarios.run(sc, "p2c")
    assert p2c.shares["h1"] < 0.15
    assert p2c.percentile(0.99) < 0.015


def test_simulate_scenario_command_prints_json_per_policy() -> None:
    result = CliRunner().invoke(
        cli,
        [
            "simulate",
            "--scenario",
            "error-burst",
            "--policy",
            "weighted",
            "--duration",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["scenario"] == "error-burst" and line["policy"] == "weighted"
    assert set(line) >= {"error_rate", "p50_ms", "p99_ms", "eject_s", "recover_s", "shares"}


def test_simulate_without_a_module_or_scenario_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["simulate"])
    assert result.exit_code == 2
    assert "MODID CMDID, or --scenario" in result.output


def test_explain_for_people() -> None:
    table = ModuleTable(BalancerParams(policy="weighted", zone_affinity=True), 0.0)
    table.zone = "a"
    hosts = [(167772161, 80), (167772162, 80)]
    meta = {hosts[0]: HostMeta(300, "a"), hosts[1]: HostMeta(100, "b")}
    now = time.monotonic()
    table.apply_route((1, 1), hosts, now, meta=meta)
    table.describe((1, 1), now, time.time(), explain=True)
    table.get_host((1, 1), now)
    state = table.describe((1, 1), now, time.time(), explain=True)
    assert state is not None
    text = _explain_module(state, state["hosts"])
    assert "policy weighted: zone affinity on" in text
    assert "10.0.0.1:80" in text and "100.0%" in text  # zone a holds all of it
    assert "weighted" in text.splitlines()[-1]
