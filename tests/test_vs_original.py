"""benchmarks/vs_original.py: its parsers and table on sample outputs, and a short run of its
Lars side (the original's side needs the anchor and its fixed ports: never run here)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import vs_original as vs

from lars.config import AgentConfig
from lars.roles.agent import Agent
from tests import mysql_admin
from tests.netutil import free_udp_base

QPS = (
    '{"threads": 2, "duration": 5, "loops": 300000, "loops_per_s": 60000.0, "ok": 300000, '
    '"overload": 0, "noexist": 0, "errors": 0, "per_thread": [{"modid": 1, "cmdid": 1, '
    '"loops": 150000, "ok": 150000, "overload": 0, "noexist": 0, "errors": 0, '
    '"elapsed": 5.000, "loops_per_s": 30000.0}, {"modid": 1, "cmdid": 2, "loops": 150000, '
    '"ok": 150000, "overload": 0, "noexist": 0, "errors": 0, "elapsed": 5.000, '
    '"loops_per_s": 30000.0}]}\n'
)
BENCH = json.dumps(
    {
        "workers": 2,
        "duration": 5.0,
        "loops_per_s": 40000.0,
        "per_worker": [
            {"modid": 1, "cmdid": 1, "loops": 100000, "loops_per_s": 20000.0, "errors": 0},
            {"modid": 1, "cmdid": 2, "loops": 99000, "loops_per_s": 19800.0, "errors": 2},
        ],
        "p50_us": 31.5,
        "p99_us": 150.2,
    }
)
PINGPONG = '{"threads": 1, "duration": 5, "round_trips": 400000, "round_trips_per_s": 80000.0}\n'


def test_qps_timed_output_is_parsed() -> None:
    figures = vs.parse_qps(QPS)
    assert (figures["loops"], figures["loops_per_s"]) == (300000, 60000.0)


@pytest.mark.parametrize("bad", ['"noexist": 0, "errors": 3', '"noexist": 7, "errors": 0'])
def test_qps_timed_with_noexist_or_errors_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="want 0"):
        vs.parse_qps(QPS.replace('"noexist": 0, "errors": 0', bad, 1))


def test_qps_timed_output_without_counts_is_refused() -> None:
    with pytest.raises(ValueError, match="noexist"):
        vs.parse_qps('{"loops": 1, "loops_per_s": 1.0, "errors": 0}')


def test_lars_bench_output_is_summed_over_workers() -> None:
    assert vs.parse_bench(BENCH) == vs.BenchFigures(40000.0, 199000, 2, 31.5, 150.2)


def test_pingpong_output_is_parsed() -> None:
    assert vs.parse_pingpong(PINGPONG) == 80000.0


def test_cpu_per_10k_loops() -> None:
    assert vs.per_10k(1.5, 60000) == pytest.approx(0.25)


def test_cpu_model_is_the_first_model_name() -> None:
    cpuinfo = "processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU @ 2.0GHz\n\nmodel name\t: B\n"
    assert vs.cpu_model(cpuinfo) == "Some CPU @ 2.0GHz"
    assert vs.cpu_model("processor\t: 0\n") == "unknown CPU"


METRIC = {m.key: m for m in vs.METRICS}


def test_ratio_of_rates_is_lars_over_original() -> None:
    assert vs.ratio_text(METRIC["full1_loops"], 60000.0, 30000.0) == "0.50"
    assert vs.ratio_text(METRIC["full1_loops"], 30000.0, 45000.0) == "1.50"


def test_ratio_of_lower_is_better_measures_says_which_way() -> None:
    assert vs.ratio_text(METRIC["route_ms"], 400.0, 10.0) == "0.03 (40.0x better)"
    assert vs.ratio_text(METRIC["cqps_cpu"], 0.12, 0.24) == "2.00 (2.0x worse)"


def test_ratio_needs_both_sides() -> None:
    assert vs.ratio_text(METRIC["full1_p50"], None, 30.0) == "-"
    assert vs.ratio_text(METRIC["full1_loops"], 0.0, 30.0) == "-"


def test_the_table_has_rounds_medians_ratios_and_the_limit() -> None:
    results = vs.new_results()
    for side, values in {"original": [60000.0, 50000.0, 70000.0], "lars": [30000.0] * 3}.items():
        results["full1_loops"][side] = values
    results["route_ms"]["original"] = [500.0]
    results["route_ms"]["lars"] = [10.0]
    results["full1_p50"]["lars"] = [30.0]
    text = vs.render_table(results, [80000.0, 90000.0], ["HEADER"], {"full", "route"})
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    full = next(line for line in lines if line.startswith("full stack, 1 client"))
    assert full.split()[-6:] == ["30,000", "30,000", "30,000", "60,000", "30,000", "0.50"]
    assert "60,000 50,000 70,000" in full
    route = next(line for line in lines if line.startswith("route change"))
    assert route.endswith("0.02 (50.0x better)")
    p50 = next(line for line in lines if "get_host p50 us, 1 client" in line)
    assert p50.split()[-4:] == ["30", "-", "30", "-"]
    assert not any(line.startswith("agent alone") for line in lines)  # not measured
    assert "85,000 round trips/s" in text
    assert "full stack, 1 client, share of it: original 71%, Lars 35%" in text


def test_rows_are_checked() -> None:
    assert vs.parse_args(["--rows", "full,route"]).rows == {"full", "route"}
    with pytest.raises(SystemExit):
        vs.parse_args(["--rows", "full,nope"])


@pytest.mark.mysql
@pytest.mark.e2e
async def test_the_lars_side_runs_and_its_statistics_add_up(tmp_path: Path) -> None:
    bench = vs.Bench(tmp_path, mysql_admin.server_url(), duration=2.0, clients=(1,))
    result = await vs.lars_side(bench, {"full"}, 0)
    assert result.values["full1_loops"] > 0
    assert result.raw["full1"]["loops"] > 0
    assert result.values["full1_cpu"] > 0
    assert result.raw["stats_check"]["ok"], result.raw["stats_check"]
    assert result.checks and result.checks[0].endswith("OK")


@pytest.fixture(scope="module")
def poll_drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("poll_drive")
    return trio.run(vs.build_poll_drive, workdir)


@pytest.mark.parametrize("busy_poll_us", [0, 100])
def test_poll_drive_speaks_the_original_protocol_to_lars_agent(
    poll_drive: Path, busy_poll_us: int
) -> None:
    """The C driver's requests and reports are what Lars's agent takes from the original's
    client: every loop is one get_host answered SUCC and one report, counted by the balancer."""
    agent = Agent(AgentConfig())
    hosts = [(0x0A000001 + i, 8000 + i) for i in range(3)]
    agent.table.apply_route((1, 1), hosts, time.monotonic())
    base = free_udp_base(3)
    socks = []
    for port in range(base, base + 3):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", port))
        socks.append(sock)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            for sock in select.select(socks, [], [], 0.05)[0]:
                data, address = sock.recvfrom(2048)
                reply = agent.handle_datagram(data, address, sock)
                if reply is not None:
                    sock.sendto(reply, address)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [str(poll_drive), "1", "0.5", str(busy_poll_us), "1:1"],
            env={**os.environ, "POLL_DRIVE_BASE_PORT": str(base)},
            capture_output=True,
            timeout=30,
            check=True,
        )
    finally:
        done.set()
        thread.join()
        for sock in socks:
            sock.close()
    figures = vs.parse_qps(result.stdout.decode())
    assert figures["loops"] > 0 and figures["ok"] == figures["loops"]
    # The warm-up's get_host is not reported: one answer more than reports.
    assert agent.table.get_host_answers[0] == figures["loops"] + 1
    assert agent.table.reports == [0, figures["loops"]]


def test_poll_drive_refuses_bad_arguments(poll_drive: Path) -> None:
    for argv in (["0", "1", "100"], ["1", "1", "-5"], ["1", "1", "100", "x"]):
        result = subprocess.run([str(poll_drive), *argv], capture_output=True, timeout=10)
        assert result.returncode == 2, argv
