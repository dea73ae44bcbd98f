"""Reporter ingest benchmark: host results per second into MariaDB, and the reporter's memory.

Starts ``lars run --role reporter`` on a fresh MariaDB database, then floods it from several
connections with ReportStatusRequest frames (each ``--results`` host results, distinct rows)
as fast as TCP lets them through, for ``--duration`` seconds. Counts the results the
reporter acknowledged (acknowledged = committed) and samples its resident memory. Each
batch also adds its calls to CallHistory, in the same transaction: the calls found there
at the end are printed too.

Usage: python benchmarks/reporter_bench.py [--duration S] [--connections N] [--results N]
MariaDB: ``--mysql mysql://root@127.0.0.1:3306`` (a fresh database is created and dropped).

The benchmarks need only Lars's runtime dependencies (a plain ``pip install .``): from
``tests/`` they use the process and port helpers, which need nothing else, but not
``tests.mysql_admin``, which reports through pytest; :func:`fresh_database` here stands in
for it, and the other benchmarks import it from this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lars import wire
from lars.store import open_store
from lars.store.mysql import _Connection
from tests.e2e.procs import lars_process, memory_mb


def server_connection(server: str, database: str | None = None) -> _Connection:
    """An autocommitting connection (not yet connected) to the MySQL server
    ``mysql://user:password@host:port``, in ``database`` if given."""
    parts = urlsplit(server)
    return _Connection(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=database,
        autocommit=True,
    )


async def server_sql(server: str, *statements: str) -> None:
    """Run statements on the MySQL server ``mysql://user:password@host:port`` (no database);
    exit with one line if it cannot be reached."""
    conn = server_connection(server)
    try:
        await conn.connect()
    except Exception as exc:
        raise SystemExit(f"no MySQL server at {server} ({exc}); see --mysql") from None
    try:
        async with conn.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
    finally:
        await conn.aclose()


@asynccontextmanager
async def fresh_database(server: str, *, init: bool = False) -> AsyncIterator[str]:
    """A new, empty database on ``server`` (with Lars's tables if ``init``), dropped
    afterwards; yields its store URL."""
    server = server.rstrip("/")
    name = f"lars_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    await server_sql(server, f"CREATE DATABASE `{name}`")
    url = f"{server}/{name}"
    try:
        if init:
            async with open_store(url) as store:
                await store.init_schema()
        yield url
    finally:
        with trio.CancelScope(shield=True):
            await server_sql(server, f"DROP DATABASE IF EXISTS `{name}`")


def frame(conn: int, seq: int, results: int) -> bytes:
    """One report of ``results`` distinct hosts; modules vary so rows spread."""
    hosts = tuple(
        wire.HostResult(0x0A000000 + conn * 65536 + i, 8000 + seq % 50, 7, 1, False)
        for i in range(results)
    )
    report = wire.ReportStatusRequest(1 + seq % 100, conn, 0x7F000001, hosts, 1_800_000_000, seq)
    return wire.encode_frame(report)


async def flood(address: str, conn: int, results: int, deadline: float, acked: list[int]) -> None:
    host, port = address.split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    frames = [frame(conn, seq, results) for seq in range(200)]

    async def send() -> None:
        seq = 0
        while trio.current_time() < deadline:
            await stream.send_all(frames[seq % len(frames)])
            seq += 1

    async def receive() -> None:
        decoder = wire.FrameDecoder()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            decoder.feed(data)
            for msg in decoder:
                if isinstance(msg, wire.ReportStatusAck):
                    acked[0] += results

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        with trio.move_on_at(deadline):
            await send()
        nursery.cancel_scope.cancel()


async def run(args: argparse.Namespace) -> dict[str, object]:
    async with fresh_database(args.mysql, init=True) as url:
        with tempfile.TemporaryDirectory() as tmp:
            config = {"store": url, "reporter": {"listen": "127.0.0.1:0"}}
            async with lars_process(Path(tmp), "reporter", ["reporter"], config) as proc:
                assert proc.process is not None
                pid = proc.process.pid
                baseline = memory_mb(pid)[0]
                acked = [0]
                samples: list[float] = []
                start = trio.current_time()
                deadline = start + args.duration
                async with trio.open_nursery() as nursery:
                    for conn in range(args.connections):
                        nursery.start_soon(
                            flood, proc.addresses["reporter"], conn, args.results, deadline, acked
                        )
                    while trio.current_time() < deadline:
                        await trio.sleep(0.5)
                        samples.append(memory_mb(pid)[0])
                elapsed = trio.current_time() - start
                peak = memory_mb(pid)[1]
        async with open_store(url) as store:  # each batch also went to CallHistory
            hosts = await store.window_calls(0)
        history_calls = sum(h.succ + h.err for h in hosts)
        rate = acked[0] / elapsed
        result = {
            "results_per_s": round(rate),
            "duration": round(elapsed, 1),
            "connections": args.connections,
            "results_per_report": args.results,
            "rss_start_mb": round(baseline, 1),
            "rss_peak_mb": round(peak, 1),
            "rss_samples_mb": [round(s, 1) for s in samples],
            "history_hosts": len(hosts),
            "history_calls": history_calls,
        }
        print(
            f"reporter: {rate:,.0f} host results/s into MariaDB (acknowledged = committed), "
            f"{args.connections} connections flooding for {elapsed:.0f}s; RSS "
            f"{baseline:.0f} MB at start, peak {peak:.0f} MB; samples "
            f"{[round(s) for s in samples]} MB; CallHistory: {history_calls:,} calls of "
            f"{len(hosts):,} hosts"
        )
        return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--results", type=int, default=100)
    print(json.dumps(trio.run(run, parser.parse_args())))
