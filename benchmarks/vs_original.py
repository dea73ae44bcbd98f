"""Lars against the original C++ Lars, side by side in one run (issue 12).

Builds (or finds) the original with ``../shared/anchor/build.sh``, then runs rounds that
alternate the two sides (the original first in even rounds, Lars first in odd ones) and
prints, for every measure, each round's value for both sides, the medians and the ratio
Lars/original, with the physical limit of the machine (a C UDP ping-pong).

Each side with its own client; the stores on the same MariaDB server:

* **full stack**, 1 and 2 clients, loops/s (a loop is get_host + report). The original:
  ``run.sh full`` (lars_dns, lars_reporter, lars_lb_agent) driven by its ``qps_timed``
  (``1:1``, then ``1:1 1:2``; NOEXIST and errors must be 0). Lars: ``lars run --role dns``,
  ``--role reporter`` (a fresh MariaDB database) and ``--role agent`` processes, driven by
  ``lars bench`` (Lars's Python client). Modules 1/1, 1/2 and 2/1 have the anchor's three
  hosts (``sql/routes.sql``). The agent's CPU (from ``/proc/PID/stat``) per 10,000 loops for
  both sides, get_host p50/p99 for Lars (its bench measures them). After the Lars runs, the
  successes in ServerCallStatus must equal the loops of every ``lars bench`` run (warm-ups
  included): the "stats check".
* **agent alone**, 1 and 2 clients: the statistics go to the anchor's discarding ``sink``
  instead of a reporter (``run.sh sink``; for Lars a sink on a free port).
* **the same C client**: ``qps_timed``, 1 client, against each agent (Lars's agent speaks the
  original protocol on the original's fixed ports), agent-alone setup: loops/s and agent CPU
  seconds per 10,000 loops. For the original this is the same run as "agent alone, 1 client".
* **the same polling C driver**: ``c/poll_drive.c`` (built with ``cc``), 1 and 2 clients,
  against each agent, agent-alone setup: the same loop and the same original protocol as
  ``qps_timed``, with the receive of Lars's clients (it polls for the answer for up to
  ``POLL_DRIVE_US`` before it blocks); loops/s and agent CPU per 10,000 loops. qps_timed
  sleeps for every answer; on a small virtual machine that makes both agents' figures
  depend on where the scheduler puts the client (see the README's Performance section).
* **route change reaching an agent**: a new host for module 2/1 is committed to the store and
  the agent's route is polled every millisecond until it lists the host; the latency is from
  the commit to that answer, the median of ``ROUTE_SAMPLES`` changes a random 0.1-0.4 s apart
  (so that they do not fall in step with a poll). The original: INSERT INTO RouteData, then
  RouteVersion and RouteChange updated in the same transaction, as its web tool does (the
  version is ``max(now, version + 1)``: two changes in one second must differ); its agent is
  asked with API GetRoute requests. Lars: ``lars route add`` (the CLI: its commit, then its
  notice to the DNS), the commit taken as the moment the CLI prints its "added" line; the
  agent asked with ``AsyncLarsClient.get_route``.
* **reporter ingest**, host results/s committed into MariaDB, for ``REPORTER_SECONDS`` (the
  original's queue is unbounded and grows by about 250 MB/s under a flood: this is kept short)
  from ``REPORTER_CONNECTIONS`` connections, reports of ``REPORTER_RESULTS`` host results,
  more than each reporter can store. Lars: ``reporter_bench.run`` (sent as fast as the
  reporter takes them; results acknowledged, and Lars acknowledges only once committed). The
  original acknowledges nothing and stores each result with its own autocommitted upsert, so
  its commits are counted in the database: every result sent has a key (modid, cmdid, ip,
  port, caller) of its own, so each committed upsert is one new row of ServerCallStatus, and
  the rate is the rows added between the start and the end of the flood over that time. It
  is offered ``ORIGINAL_OFFERED`` results/s, about ten times what it commits (an unpaced
  flood gets its connections dropped: see the constant); a warning says when the commits
  come near the offer. The original runs in
  a ``run.sh full`` of its own for this, so that no backlog of earlier runs is in its queue.
  The peak RSS of both reporters is shown too.
* **the physical limit**: ``pingpong 1 D``, one C client thread doing UDP round trips over
  loopback with an echo server, unpinned (the scheduler places both), once per round.

Usage: python benchmarks/vs_original.py [--duration 10] [--rounds 3]
           [--rows full,agent,cpu,cpoll,route,reporter,pingpong] [--json] [--mysql URL]
Needs a source checkout with the test dependencies (it uses tests/e2e's helpers), MariaDB on
``--mysql`` (default ``$LARS_TEST_MYSQL`` or ``mysql://root@127.0.0.1:3306``) and the anchor
(``$LARS_ANCHOR``, default ``../shared/anchor``; built into ``$ANCHOR_BUILD``). The original's
ports are fixed (TCP 7778/7779, UDP 8888-8890): the run holds the same lock file as
``tests/e2e/test_original.py``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reporter_bench
from original_bench import cpu_seconds, lars_agent, modules, sink
from reporter_bench import fresh_database, server_connection

from lars import wire
from lars import wire_original as wo
from lars.client import AsyncLarsClient
from lars.core.model import HostKey, ModuleKey, format_host
from lars.errors import LarsError
from lars.store import open_store
from lars.store.mysql import _Connection
from tests.e2e.procs import LARS, LineReader, lars_process, memory_mb, write_config
from tests.e2e.test_original import (
    ANCHOR,
    BUILD,
    FIXED_PORTS,
    PORTS_LOCK,
    PORTS_PATIENCE,
    _ports_free,
    route_of,
)
from tests.netutil import free_udp_base
from tests.roles.test_agent_original import OriginalApi

ROWS = ("full", "agent", "cpu", "cpoll", "route", "reporter", "pingpong")
#: The anchor's routes (sql/routes.sql): 1/1 and 1/2 for the clients, 2/1 for route changes.
HOSTS = [(0x0A000001 + i, 8000 + i) for i in range(3)]
BENCH_MODULES: tuple[ModuleKey, ...] = ((1, 1), (1, 2))
ROUTE_MODULE: ModuleKey = (2, 1)
ROUTE_SAMPLES = 5
ROUTE_TIMEOUT = 10.0
#: Seconds of load on each agent before it is measured (the original's first answer for a
#: module is NOEXIST while it asks its DNS; both sides get the same warm-up).
WARMUP = 0.5
REPORTER_SECONDS = 5.0
REPORTER_CONNECTIONS = 8
REPORTER_RESULTS = 100
#: Host results/s offered to the original's reporter, over all connections: about ten times
#: what it commits. Not more: its reactor reads all that a socket holds into one buffer of
#: at most 8 MB and drops the connection beyond that, which an unpaced flood reaches as soon
#: as its reading thread falls behind.
ORIGINAL_OFFERED = 200_000
#: Distinct reports per connection for the original's reporter (keys of their own).
REPORTER_FRAMES = 500
REPORTER_PORT = 7779
#: Seconds the stats check waits for the last statistics to reach the store.
STATS_PATIENCE = 20.0
#: poll_drive's busy poll for an answer, microseconds: lars.client's default busy_poll.
POLL_DRIVE_US = 100
POLL_DRIVE_SOURCE = Path(__file__).resolve().parent / "c" / "poll_drive.c"


# --- parsing the tools' outputs (pure) ---------------------------------------------------------


def parse_qps(text: str) -> dict[str, Any]:
    """``qps_timed``'s JSON line; ValueError unless NOEXIST and errors are 0 (NOEXIST counts as
    a loop there, so a run without a route would look fast)."""
    figures: dict[str, Any] = json.loads(text)
    for key in ("loops", "loops_per_s", "noexist", "errors"):
        if key not in figures:
            raise ValueError(f"qps_timed output has no {key!r}: {text.strip()[:200]}")
    if figures["noexist"] or figures["errors"]:
        raise ValueError(
            f"qps_timed: noexist {figures['noexist']}, errors {figures['errors']} (want 0)"
        )
    return figures


@dataclass(frozen=True)
class BenchFigures:
    """What ``lars bench --json`` measured."""

    loops_per_s: float
    loops: int
    errors: int
    p50_us: float
    p99_us: float


def parse_bench(text: str) -> BenchFigures:
    """``lars bench --json``'s object: total loops/s, loops and errors over every worker,
    get_host latency percentiles."""
    figures = json.loads(text)
    workers = figures["per_worker"]
    return BenchFigures(
        loops_per_s=float(figures["loops_per_s"]),
        loops=sum(int(w["loops"]) for w in workers),
        errors=sum(int(w["errors"]) for w in workers),
        p50_us=float(figures["p50_us"]),
        p99_us=float(figures["p99_us"]),
    )


def parse_pingpong(text: str) -> float:
    """``pingpong``'s round trips per second."""
    return float(json.loads(text)["round_trips_per_s"])


def per_10k(cpu_s: float, loops: int) -> float:
    """CPU seconds per 10,000 loops."""
    return cpu_s / loops * 10_000 if loops else float("nan")


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo's text (some kernels have none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown CPU"


# --- the table (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One line of the table: ``higher`` says which way is better."""

    key: str
    label: str
    row: str  # the --rows entry that measures it
    higher: bool
    digits: int = 0


METRICS = (
    Metric("full1_loops", "full stack, 1 client, loops/s", "full", True),
    Metric("full2_loops", "full stack, 2 clients, loops/s", "full", True),
    Metric("full1_cpu", "  agent CPU s per 10k loops, 1 client", "full", False, 3),
    Metric("full2_cpu", "  agent CPU s per 10k loops, 2 clients", "full", False, 3),
    Metric("full1_p50", "  get_host p50 us, 1 client", "full", False),
    Metric("full1_p99", "  get_host p99 us, 1 client", "full", False),
    Metric("full2_p50", "  get_host p50 us, 2 clients", "full", False),
    Metric("full2_p99", "  get_host p99 us, 2 clients", "full", False),
    Metric("agent1_loops", "agent alone (sink), 1 client, loops/s", "agent", True),
    Metric("agent2_loops", "agent alone (sink), 2 clients, loops/s", "agent", True),
    Metric("cqps_loops", "same C client (qps_timed), 1 client, loops/s", "cpu", True),
    Metric("cqps_cpu", "  agent CPU s per 10k loops", "cpu", False, 3),
    Metric("cpoll1_loops", "same polling C driver (poll_drive), 1 client, loops/s", "cpoll", True),
    Metric("cpoll1_cpu", "  agent CPU s per 10k loops, 1 client", "cpoll", False, 3),
    Metric("cpoll2_loops", "same polling C driver, 2 clients, loops/s", "cpoll", True),
    Metric("cpoll2_cpu", "  agent CPU s per 10k loops, 2 clients", "cpoll", False, 3),
    Metric("route_ms", "route change reaching an agent, ms", "route", False, 1),
    Metric("reporter_rate", "reporter, host results/s into MariaDB", "reporter", True),
    Metric("reporter_rss", "  reporter peak RSS, MB", "reporter", False),
)
SIDES = ("original", "lars")
#: Per metric, per side, one value per round.
Results = dict[str, dict[str, list[float]]]


def new_results() -> Results:
    return {m.key: {side: [] for side in SIDES} for m in METRICS}


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio_text(metric: Metric, original: float | None, lars: float | None) -> str:
    """Lars/original; for a measure where lower is better, also how many times better or worse
    Lars is (for a higher-is-better one, the ratio itself says it: above 1 is better)."""
    if original is None or lars is None or original <= 0 or lars <= 0:
        return "-"
    ratio = lars / original
    if metric.higher:
        return f"{ratio:.2f}"
    if lars <= original:
        return f"{ratio:.2f} ({original / lars:.1f}x better)"
    return f"{ratio:.2f} ({lars / original:.1f}x worse)"


def render_table(
    results: Results, pingpong: Sequence[float], header: Sequence[str], rows: Iterable[str]
) -> str:
    """The whole report: header, one line per measure, then the ping-pong limit and the
    share of it that each side's 1-client loops/s reach."""
    wanted = set(rows)
    lines = [*header, ""]
    table = [("measure", "original, per round", "Lars, per round", "original", "Lars", "Lars/orig")]
    for metric in METRICS:
        if metric.row not in wanted:
            continue
        per_side = results[metric.key]
        meds = {side: median(per_side[side]) for side in SIDES}
        table.append(
            (
                metric.label,
                " ".join(fmt(v, metric.digits) for v in per_side["original"]) or "-",
                " ".join(fmt(v, metric.digits) for v in per_side["lars"]) or "-",
                fmt(meds["original"], metric.digits),
                fmt(meds["lars"], metric.digits),
                ratio_text(metric, meds["original"], meds["lars"]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for n, cells in enumerate(table):
        left = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        lines.append(f"{left}  {rest}".rstrip())
        if n == 0:
            lines.append("-" * len(lines[-1]))
    lines.append("")
    lines.append(
        "Lars/orig: above 1.00 is better for Lars on rates; for times, CPU and memory it says"
        " how many times better or worse."
    )
    limit = median(pingpong)
    if limit:
        runs = " ".join(fmt(v, 0) for v in pingpong)
        lines.append(
            f"physical limit: C UDP ping-pong, 1 thread, unpinned: {fmt(limit, 0)} round trips/s"
            f" (runs {runs})"
        )
        for key, label in (("full1_loops", "full stack"), ("agent1_loops", "agent alone")):
            meds = {side: median(results[key][side]) for side in SIDES}
            if any(v is not None for v in meds.values()):
                shares = ", ".join(
                    f"{'Lars' if side == 'lars' else 'original'} {100 * v / limit:.0f}%"
                    for side, v in meds.items()
                    if v is not None
                )
                lines.append(f"  {label}, 1 client, share of it: {shares}")
    return "\n".join(lines)


def machine_header(argv: Sequence[str], now: datetime.datetime) -> list[str]:
    """Date, machine (cores, CPU, kernel) and the command line."""
    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    return [
        f"Lars vs the original C++ Lars, {now:%Y-%m-%d %H:%M %Z}".rstrip(),
        f"machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
        f"command: {shlex.join(argv)}",
    ]


# --- running things ----------------------------------------------------------------------------


@dataclass
class Bench:
    """One benchmark run's settings and scratch directory."""

    workdir: Path
    mysql: str
    duration: float
    clients: tuple[int, ...] = (1, 2)
    #: The compiled c/poll_drive.c (for the cpoll rows).
    poll_drive: Path | None = None
    route_samples: int = ROUTE_SAMPLES
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


@dataclass
class SideResult:
    """One side's round: a value per metric key, and the details (for --json)."""

    values: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


def anchor_env(mysql: str) -> dict[str, str]:
    """The anchor's scripts' environment: the build directory and the database server."""
    parts = urlsplit(mysql)
    return {
        **os.environ,
        "ANCHOR_BUILD": str(BUILD),
        "LARS_DB_HOST": parts.hostname or "127.0.0.1",
        "LARS_DB_PORT": str(parts.port or 3306),
        "LARS_DB_USER": parts.username or "root",
        "LARS_DB_PASS": parts.password or "",
    }


async def build_anchor() -> None:
    """Build the original (quick when the build is up to date)."""
    result = await trio.run_process(
        [str(ANCHOR / "build.sh")],
        env={**os.environ, "ANCHOR_BUILD": str(BUILD)},
        capture_stdout=True,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{ANCHOR}/build.sh failed:\n{result.stdout.decode()[-3000:]}")


@asynccontextmanager
async def anchor_stack(mysql: str, mode: str) -> AsyncIterator[dict[str, int]]:
    """``run.sh MODE`` (a fresh lars_anchor database); yields the PIDs by name; stop.sh."""
    await wait_fixed_ports()
    env = anchor_env(mysql)
    result = await trio.run_process(
        [str(ANCHOR / "run.sh"), mode],
        env=env,
        capture_stdout=True,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"run.sh {mode} failed:\n{result.stdout.decode()[-3000:]}")
    try:
        run = BUILD / "run"
        yield {n: int((run / f"{n}.pid").read_text()) for n in ("dns", "reporter", "agent")}
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(
                [str(ANCHOR / "stop.sh")], env=env, capture_stdout=True, check=False
            )


def anchor_running() -> bool:
    """Whether a process that run.sh started (its PID files) still runs."""
    return any(Path(f"/proc/{f.read_text().strip()}").exists() for f in BUILD.glob("run/*.pid"))


async def wait_fixed_ports() -> None:
    """Until nothing listens on the original's UDP ports and no run.sh stack is up (we hold
    the lock; someone who does not take it may be using them for a while)."""
    with trio.move_on_after(PORTS_PATIENCE):
        while not _ports_free() or anchor_running():
            await trio.sleep(0.1)
        return
    ss = ["ss", "-Hlunp", "( sport = :8888 or sport = :8889 or sport = :8890 )"]
    busy = (await trio.run_process(ss, capture_stdout=True, check=False)).stdout.decode()
    raise RuntimeError(f"UDP 8888-8890 stayed busy for {PORTS_PATIENCE:.0f} s:\n{busy}")


async def mysql_connection(server: str, database: str) -> _Connection:
    """A connected, autocommitting connection to ``database`` on ``server``."""
    conn = server_connection(server, database)
    await conn.connect()
    return conn


async def sql(conn: _Connection, statement: str, *args: object) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cursor:
        await cursor.execute(statement, args or None)
        return list(await cursor.fetchall())


async def run_qps(threads: int, duration: float, driver: Path | None = None) -> dict[str, Any]:
    """``qps_timed THREADS DURATION`` on modules 1:1 (1:2 ...), checked; or the same with
    ``poll_drive`` (``driver``), polling for answers up to ``POLL_DRIVE_US``."""
    if driver is None:
        argv = [str(BUILD / "bin" / "qps_timed"), str(threads), str(duration)]
    else:
        argv = [str(driver), str(threads), str(duration), str(POLL_DRIVE_US)]
    argv += modules(threads)
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    try:
        return parse_qps(result.stdout.decode())
    except ValueError as exc:
        raise RuntimeError(f"{exc}\n{result.stderr.decode(errors='replace')[-2000:]}") from None


async def build_poll_drive(workdir: Path) -> Path:
    """Compile ``c/poll_drive.c`` into ``workdir``."""
    target = workdir / "poll_drive"
    argv = ["cc", "-O2", "-Wall", "-pthread", "-o", str(target), str(POLL_DRIVE_SOURCE)]
    result = await trio.run_process(
        argv, capture_stdout=True, stderr=subprocess.STDOUT, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"building poll_drive failed:\n{result.stdout.decode()[-3000:]}")
    return target


async def run_lars_bench(config: Path, workers: int, duration: float) -> BenchFigures:
    argv = [*LARS, "bench", "--workers", str(workers), "--duration", str(duration), "--json"]
    result = await trio.run_process(
        [*argv, "--config", str(config)], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"lars bench failed: {result.stderr.decode()[-2000:]}")
    return parse_bench(result.stdout.decode())


async def pingpong(duration: float) -> float:
    result = await trio.run_process(
        [str(BUILD / "bin" / "pingpong"), "1", str(duration)], capture_stdout=True
    )
    return parse_pingpong(result.stdout.decode())


def new_host(n: int, k: int) -> HostKey:
    """The k-th host added to the route module in round n (distinct from every other)."""
    return (0x0A090000 + n * 256 + k, 9000 + k)


async def poll_route(fetch: Callable[[], Any], host: HostKey, committed: list[float]) -> float:
    """Ask for the route every millisecond until it lists ``host``; the moment it did."""
    with trio.fail_after(ROUTE_TIMEOUT):
        while host not in await fetch():
            await trio.sleep(0.001)
    seen = time.perf_counter()
    with trio.fail_after(ROUTE_TIMEOUT):  # the commit's timestamp may still be on its way
        while not committed:
            await trio.sleep(0.001)
    return seen


# --- the original ------------------------------------------------------------------------------


async def driven_rows(
    bench: Bench,
    agent_pid: int,
    clients: Sequence[int],
    what: str,
    driver: Path | None = None,
) -> dict[int, tuple[dict[str, Any], float]]:
    """qps_timed (or the ``driver``, poll_drive) with each number of clients against a running
    agent on the fixed ports: per number, its figures and the agent's CPU seconds per 10,000
    loops."""
    await run_qps(1, WARMUP, driver)
    measured = {}
    for n in clients:
        before = cpu_seconds(agent_pid)
        figures = await run_qps(n, bench.duration, driver)
        cpu = per_10k(cpu_seconds(agent_pid) - before, figures["loops"])
        measured[n] = ({**figures, "agent_cpu_per_10k": round(cpu, 4)}, cpu)
        bench.log(
            f"  {what}, {'poll_drive' if driver else 'qps_timed'} {n} client(s):"
            f" {figures['loops_per_s']:,.0f} loops/s, agent CPU {cpu:.3f} s/10k loops"
        )
    return measured


async def original_route_samples(bench: Bench, n: int) -> list[float]:
    """Route changes committed to lars_anchor, as seen through the original agent's API."""
    api = OriginalApi(FIXED_PORTS[0])
    conn = await mysql_connection(bench.mysql, "lars_anchor")
    latencies = []
    try:
        with trio.fail_after(ROUTE_TIMEOUT):  # its first answer is empty: it asks its DNS
            while not await route_of(api, ROUTE_MODULE):
                await trio.sleep(0.05)
        for k in range(bench.route_samples):
            await trio.sleep(random.uniform(0.1, 0.4))
            host = new_host(n, k)
            await conn.begin()
            await sql(
                conn,
                "INSERT INTO RouteData(modid, cmdid, serverip, serverport) VALUES (%s, %s, %s, %s)",
                *ROUTE_MODULE,
                *host,
            )
            ((current,),) = await sql(conn, "SELECT version FROM RouteVersion WHERE id = 1")
            version = max(int(time.time()), int(current) + 1)
            await sql(conn, "UPDATE RouteVersion SET version = %s WHERE id = 1", version)
            await sql(
                conn,
                "INSERT INTO RouteChange(modid, cmdid, version) VALUES (%s, %s, %s)",
                *ROUTE_MODULE,
                version,
            )
            await conn.commit()
            committed = [time.perf_counter()]
            seen = await poll_route(lambda: route_of(api, ROUTE_MODULE), host, committed)
            latencies.append(1000 * (seen - committed[0]))
    finally:
        api.close()
        await conn.aclose()
    return latencies


def original_report_frames(conn: int) -> list[bytes]:
    """REPORTER_FRAMES reports for connection ``conn``, every host result a row of its own
    (modid varies per report, caller per connection, ip per result), joined ten a piece."""
    hosts = tuple(
        wire.HostResult(0x0A000000 + i, 8000, 1, 0, False) for i in range(REPORTER_RESULTS)
    )
    frames = [
        wo.encode(wire.ReportStatusRequest(1000 + k, 1, 0x7F000001 + conn, hosts, 1, 0))
        for k in range(REPORTER_FRAMES)
    ]
    return [b"".join(frames[i : i + 10]) for i in range(0, len(frames), 10)]


async def flood_original(
    chunks: list[bytes], deadline: float, sent: list[int], resets: list[int]
) -> None:
    """Send ``chunks`` round and round to lars_reporter until ``deadline``, paced at this
    connection's share of ORIGINAL_OFFERED results/s."""
    per_chunk = 10 * REPORTER_RESULTS
    interval = per_chunk / (ORIGINAL_OFFERED / REPORTER_CONNECTIONS)
    stream = await trio.open_tcp_stream("127.0.0.1", REPORTER_PORT)
    async with stream:
        i = 0
        due = trio.current_time()
        with trio.move_on_at(deadline):
            try:
                while True:
                    await stream.send_all(chunks[i % len(chunks)])
                    sent[0] += per_chunk
                    i += 1
                    due += interval
                    await trio.sleep_until(due)
            except trio.BrokenResourceError:
                resets[0] += 1


async def original_reporter(bench: Bench) -> dict[str, Any]:
    """lars_reporter flooded for REPORTER_SECONDS; the rows it committed meanwhile."""
    chunks = [original_report_frames(c) for c in range(REPORTER_CONNECTIONS)]
    distinct = REPORTER_CONNECTIONS * REPORTER_FRAMES * REPORTER_RESULTS
    async with anchor_stack(bench.mysql, "full") as pids:
        conn = await mysql_connection(bench.mysql, "lars_anchor")
        try:
            count = "SELECT COUNT(*) FROM ServerCallStatus"
            ((rows_before,),) = await sql(conn, count)
            baseline = memory_mb(pids["reporter"])[0]
            samples: list[float] = []
            sent, resets = [0], [0]
            start = trio.current_time()
            deadline = start + REPORTER_SECONDS
            async with trio.open_nursery() as nursery:
                for c in range(REPORTER_CONNECTIONS):
                    nursery.start_soon(flood_original, chunks[c], deadline, sent, resets)
                while trio.current_time() < deadline:
                    await trio.sleep(min(0.5, max(0.0, deadline - trio.current_time())))
                    samples.append(memory_mb(pids["reporter"])[0])
            ((rows_after,),) = await sql(conn, count)
            elapsed = trio.current_time() - start
            peak = memory_mb(pids["reporter"])[1]
        finally:
            await conn.aclose()
    committed = int(rows_after) - int(rows_before)
    result = {
        "results_per_s": round(committed / elapsed),
        "committed": committed,
        "sent": sent[0],
        "connections_reset": resets[0],
        "duration": round(elapsed, 1),
        "rss_start_mb": round(baseline, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_samples_mb": [round(s, 1) for s in samples],
    }
    if committed > 0.5 * sent[0]:
        result["warning"] = "commits near the offered load: the offer may be the limit"
    if committed >= 0.9 * distinct:
        result["warning"] = f"{committed} commits near the {distinct} distinct keys: undercounted"
    return result


async def original_side(bench: Bench, rows: set[str], n: int) -> SideResult:
    out = SideResult()
    if rows & {"full", "route"}:
        async with anchor_stack(bench.mysql, "full") as pids:
            if "full" in rows:
                measured = await driven_rows(bench, pids["agent"], bench.clients, "original full")
                for c, (figures, cpu) in measured.items():
                    out.values[f"full{c}_loops"] = figures["loops_per_s"]
                    out.values[f"full{c}_cpu"] = cpu
                    out.raw[f"full{c}"] = figures
            if "route" in rows:
                latencies = await original_route_samples(bench, n)
                out.values["route_ms"] = statistics.median(latencies)
                out.raw["route_ms"] = [round(v, 1) for v in latencies]
                bench.log(f"  original route change: {[round(v) for v in latencies]} ms")
    if rows & {"agent", "cpu", "cpoll"}:
        # For the original, "the same C client" is its own client on the agent-alone setup:
        # the 1-client run of "agent alone" is that measurement too.
        clients = bench.clients if "agent" in rows else (1,) if "cpu" in rows else ()
        async with anchor_stack(bench.mysql, "sink") as pids:
            measured = await driven_rows(bench, pids["agent"], clients, "original agent alone")
            if "cpoll" in rows:
                polled = await driven_rows(
                    bench, pids["agent"], bench.clients, "original agent", bench.poll_drive
                )
                polled_values(polled, out)
        for c, (figures, cpu) in measured.items():
            if "agent" in rows:
                out.values[f"agent{c}_loops"] = figures["loops_per_s"]
                out.raw[f"agent{c}"] = figures
            if "cpu" in rows and c == 1:
                out.values["cqps_loops"] = figures["loops_per_s"]
                out.values["cqps_cpu"] = cpu
                out.raw["cqps"] = figures
    if "reporter" in rows:
        figures = await original_reporter(bench)
        out.values["reporter_rate"] = figures["results_per_s"]
        out.values["reporter_rss"] = figures["rss_peak_mb"]
        out.raw["reporter"] = figures
        bench.log(
            f"  original reporter: {figures['results_per_s']:,} host results/s committed, "
            f"RSS {figures['rss_start_mb']:.0f} -> {figures['rss_peak_mb']:.0f} MB"
            f" ({figures['sent']:,} results sent, {figures['connections_reset']} connections"
            f" reset){' WARNING: ' + figures['warning'] if 'warning' in figures else ''}"
        )
    return out


def polled_values(measured: Mapping[int, tuple[dict[str, Any], float]], out: SideResult) -> None:
    for c, (figures, cpu) in measured.items():
        out.values[f"cpoll{c}_loops"] = figures["loops_per_s"]
        out.values[f"cpoll{c}_cpu"] = cpu
        out.raw[f"cpoll{c}"] = figures


# --- Lars --------------------------------------------------------------------------------------


async def lars_bench_rows(
    bench: Bench, config: Path, pid: int, prefix: str, out: SideResult
) -> int:
    """``lars bench`` with each number of clients against a Lars agent; the loops it made
    (warm-up included)."""
    total = (await run_lars_bench(config, 1, WARMUP)).loops
    for clients in bench.clients:
        before = cpu_seconds(pid)
        figures = await run_lars_bench(config, clients, bench.duration)
        cpu = cpu_seconds(pid) - before
        total += figures.loops
        out.values[f"{prefix}{clients}_loops"] = figures.loops_per_s
        if prefix == "full":
            out.values[f"full{clients}_cpu"] = per_10k(cpu, figures.loops)
            out.values[f"full{clients}_p50"] = figures.p50_us
            out.values[f"full{clients}_p99"] = figures.p99_us
        out.raw[f"{prefix}{clients}"] = {**asdict(figures), "agent_cpu_s": round(cpu, 3)}
        errors = f", {figures.errors} ERRORS" if figures.errors else ""
        bench.log(
            f"  Lars {prefix} {clients} client(s): {figures.loops_per_s:,.0f} loops/s, "
            f"agent CPU {per_10k(cpu, figures.loops):.3f} s/10k loops, get_host p50 "
            f"{figures.p50_us:.0f} us p99 {figures.p99_us:.0f} us{errors}"
        )
    return total


async def stored_successes(url: str, want: int) -> int:
    """Successes in ServerCallStatus for the bench modules, once they reach ``want`` (or
    STATS_PATIENCE has passed)."""
    async with open_store(url) as store:
        with trio.move_on_after(STATS_PATIENCE):
            while True:
                total = 0
                for module in BENCH_MODULES:
                    total += sum(r.succ_total for r in await store.read_call_status(*module))
                if total >= want:
                    break
                await trio.sleep(0.2)
    return total


async def lars_route_samples(
    bench: Bench, n: int, url: str, config: Path, base: int
) -> list[float]:
    """Route changes by ``lars route add``, as seen through the Lars agent's API."""
    client = AsyncLarsClient(base_port=base, timeout=0.5, retries=2)

    async def route() -> set[HostKey]:
        try:
            return {h.key for h in await client.get_route(*ROUTE_MODULE)}
        except LarsError:
            return set()

    latencies = []
    try:
        with trio.fail_after(ROUTE_TIMEOUT):
            while not await route():
                await trio.sleep(0.05)
        for k in range(bench.route_samples):
            await trio.sleep(random.uniform(0.1, 0.4))
            host = new_host(n, k)
            argv = [*LARS, "route", "add", *map(str, ROUTE_MODULE), format_host(host)]
            process = await trio.lowlevel.open_process(
                [*argv, "--config", str(config), "--store", url],
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            committed: list[float] = []

            async def commit_line(stdout: LineReader, committed: list[float] = committed) -> None:
                while "added" not in await stdout.line():
                    pass
                committed.append(time.perf_counter())

            try:
                assert process.stdout is not None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(commit_line, LineReader(process.stdout))
                    seen = await poll_route(route, host, committed)
                if await process.wait() != 0:
                    raise RuntimeError(f"lars route add exited {process.returncode}")
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            latencies.append(1000 * (seen - committed[0]))
    finally:
        client.close()
    return latencies


async def lars_side(bench: Bench, rows: set[str], n: int) -> SideResult:
    out = SideResult()
    if rows & {"full", "route", "agent", "cpu", "cpoll"}:
        async with fresh_database(bench.mysql, init=True) as url:
            async with open_store(url) as store:
                routes = {module: HOSTS for module in (*BENCH_MODULES, ROUTE_MODULE)}
                await store.change_routes(add=routes)
            dns_config = {"store": url, "dns": {"listen": "127.0.0.1:0"}}
            async with lars_process(bench.workdir, f"dns-{n}", ["dns"], dns_config) as dns_proc:
                await lars_stacks(bench, rows, n, url, dns_proc.addresses["dns"], out)
    if "reporter" in rows:
        args = argparse.Namespace(
            mysql=bench.mysql,
            duration=REPORTER_SECONDS,
            connections=REPORTER_CONNECTIONS,
            results=REPORTER_RESULTS,
        )
        figures: dict[str, Any] = await reporter_bench.run(args)
        out.values["reporter_rate"] = float(figures["results_per_s"])
        out.values["reporter_rss"] = float(figures["rss_peak_mb"])
        out.raw["reporter"] = figures
    return out


async def lars_stacks(
    bench: Bench, rows: set[str], n: int, url: str, dns: str, out: SideResult
) -> None:
    """The Lars rows that need a DNS (running at ``dns``, on the store ``url``)."""
    base = free_udp_base(3)
    config = write_config(
        bench.workdir / f"client-{n}.toml",
        {"agent": {"base_port": base, "ports": 3, "dns": [dns]}, "client": {"timeout": 0.5}},
    )
    if rows & {"full", "route"}:
        reporter_config = {"store": url, "reporter": {"listen": "127.0.0.1:0"}}
        async with (
            lars_process(bench.workdir, f"reporter-{n}", ["reporter"], reporter_config) as reporter,
            lars_agent(
                bench.workdir, f"agent-full-{n}", base, dns, reporter.addresses["reporter"]
            ) as agent,
        ):
            assert agent.process is not None
            if "full" in rows:
                loops = await lars_bench_rows(bench, config, agent.process.pid, "full", out)
            if "route" in rows:
                latencies = await lars_route_samples(bench, n, url, config, base)
                out.values["route_ms"] = statistics.median(latencies)
                out.raw["route_ms"] = [round(v, 1) for v in latencies]
                bench.log(f"  Lars route change: {[round(v) for v in latencies]} ms")
            if "full" in rows:
                stored = await stored_successes(url, loops)
                ok = stored == loops
                out.raw["stats_check"] = {"stored": stored, "loops": loops, "ok": ok}
                check = (
                    f"stats check, round {n + 1}: ServerCallStatus holds {stored:,} successes"
                    f" for modules 1/1 and 1/2; lars bench made {loops:,} loops: "
                    + ("OK" if ok else "MISMATCH")
                )
                out.checks.append(check)
                bench.log(f"  {check}")
    if rows & {"agent", "cpu", "cpoll"}:
        async with sink() as discard:
            if "agent" in rows:
                async with lars_agent(
                    bench.workdir, f"agent-sink-{n}", base, dns, discard
                ) as agent:
                    assert agent.process is not None
                    await lars_bench_rows(bench, config, agent.process.pid, "agent", out)
            if rows & {"cpu", "cpoll"}:
                await wait_fixed_ports()
                async with lars_agent(
                    bench.workdir, f"agent-fixed-{n}", FIXED_PORTS[0], dns, discard
                ) as agent:
                    assert agent.process is not None
                    pid = agent.process.pid
                    if "cpu" in rows:
                        [(figures, cpu)] = (
                            await driven_rows(bench, pid, (1,), "Lars agent")
                        ).values()
                        out.values["cqps_loops"] = figures["loops_per_s"]
                        out.values["cqps_cpu"] = cpu
                        out.raw["cqps"] = figures
                    if "cpoll" in rows:
                        polled = await driven_rows(
                            bench, pid, bench.clients, "Lars agent", bench.poll_drive
                        )
                        polled_values(polled, out)


# --- the run -----------------------------------------------------------------------------------


SIDE_RUNNERS = {"original": original_side, "lars": lars_side}


def record(results: Results, side: str, values: Mapping[str, float]) -> None:
    for key, value in values.items():
        results[key][side].append(value)


async def main(args: argparse.Namespace) -> int:
    header = machine_header(["python", *sys.argv], datetime.datetime.now().astimezone())
    header.append(
        f"{args.rounds} round(s) x {args.duration:g} s, sides alternating; reporter "
        f"{REPORTER_SECONDS:g} s floods; route change: median of {ROUTE_SAMPLES} per round"
    )
    print("\n".join(header), flush=True)
    await build_anchor()
    results = new_results()
    limits: list[float] = []
    rounds: list[dict[str, Any]] = []
    checks: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bench = Bench(Path(tmp), args.mysql, args.duration)
        if "cpoll" in args.rows:
            bench.poll_drive = await build_poll_drive(bench.workdir)
        for n in range(args.rounds):
            print(f"round {n + 1} of {args.rounds}", flush=True)
            raw: dict[str, Any] = {"round": n + 1}
            if "pingpong" in args.rows:
                limits.append(await pingpong(args.duration))
                raw["pingpong"] = limits[-1]
                print(f"  pingpong: {limits[-1]:,.0f} round trips/s", flush=True)
            order = SIDES if n % 2 == 0 else SIDES[::-1]
            for side in order:
                result = await SIDE_RUNNERS[side](bench, args.rows, n)
                record(results, side, result.values)
                raw[side] = result.raw
                checks += result.checks
            rounds.append(raw)
    print()
    print(render_table(results, limits, header, args.rows))
    for check in checks:
        print(check)
    if args.json:
        medians = {k: {s: median(v[s]) for s in SIDES} for k, v in results.items()}
        print(json.dumps({"header": header, "rounds": rounds, "medians": medians}))
    return 0 if all(c.endswith("OK") for c in checks) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"what to measure, of {','.join(ROWS)}"
    )
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    args = parser.parse_args(argv)
    args.rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = args.rows - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    return args


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
