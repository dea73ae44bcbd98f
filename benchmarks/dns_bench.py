"""DNS benchmark: a route table of 100,000 routes, 2,000 subscribed agent connections.

Starts ``lars run --role dns`` as a separate process on SQLite and on MariaDB and prints:

* GetRoute requests/s served (pipelined clients over loopback TCP);
* the delay from ``lars route add`` returning to the push arriving at a watcher, with the
  writer's notification (the usual path) and without it (the poll fallback);
* the time for one change to reach all 2,000 subscribed connections;
* the DNS process's resident memory.

With ``--tls both`` (or ``on``) the same runs again with mutual TLS: certificates from
``lars.tls.generate``, every connection an agent's, the writer an admin.

Usage: python benchmarks/dns_bench.py [--store sqlite|mysql|both] [--routes N] [--connections N]
       [--tls off|on|both]
MariaDB: ``--mysql mysql://root@127.0.0.1:3306`` (a fresh database is created and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reporter_bench import fresh_database

from lars import wire
from lars.config import TlsConfig
from lars.roles.common import connect_tls, notify_dns
from lars.roles.run import raise_fd_limit
from lars.store import open_store
from lars.tls import TlsContexts, contexts_for, generate
from tests.e2e.procs import LARS, lars_process, memory_mb


async def fill(url: str, routes: int) -> None:
    """``routes`` modules of one host each, written in chunks (one version raise each)."""
    async with open_store(url, create=True) as store:
        await store.init_schema()
        chunk = 10_000
        for start in range(0, routes, chunk):
            add = {
                (1 + i // 1000, i % 1000): [(0x0A000000 + i, 8000 + i % 1000)]
                for i in range(start, min(routes, start + chunk))
            }
            await store.change_routes(add=add)


#: With TLS: the certificates' directory, the agents' and the admin's contexts.
CERTS: Path | None = None
AGENT_TLS: TlsContexts | None = None
ADMIN_TLS: TlsContexts | None = None


def tls_section(role: str) -> dict[str, str]:
    assert CERTS is not None
    return {
        "mode": "on",
        "ca": str(CERTS / "ca.pem"),
        "cert": str(CERTS / f"{role}.pem"),
        "key": str(CERTS / f"{role}.key"),
    }


def tls_config(role: str) -> TlsConfig:
    section = tls_section(role)
    return TlsConfig(mode="on", ca=section["ca"], cert=section["cert"], key=section["key"])


class Conn:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = wire.FrameDecoder()
        self.ready: list[wire.Message] = []

    async def receive(self) -> wire.Message:
        while not self.ready:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.decoder.feed(data)
            self.ready.extend(self.decoder)
        return self.ready.pop(0)


async def connect(host: str, port: int) -> Conn:
    return Conn(await connect_tls(await trio.open_tcp_stream(host, port), AGENT_TLS, "dns"))


async def get_route_rate(host: str, port: int, routes: int, seconds: float = 5.0) -> float:
    """Requests/s with 8 pipelined connections, 64 requests in flight each."""
    done = 0
    deadline = trio.current_time() + seconds

    async def client() -> None:
        nonlocal done
        conn = await connect(host, port)
        async with conn.stream:
            while trio.current_time() < deadline:
                # Distinct modules: the DNS coalesces route frames per module, so two requests
                # for one module in flight may be answered by one frame.
                batch = [
                    wire.encode_frame(wire.GetRouteRequest(1 + i // 1000, i % 1000))
                    for i in random.sample(range(routes), 64)
                ]
                await conn.stream.send_all(b"".join(batch))
                for _ in range(64):
                    await conn.receive()
                done += 64

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(client)
    return done / (trio.current_time() - start)


async def push_delays(
    host: str, port: int, url: str, workdir: Path, notify: bool, samples: int
) -> tuple[list[float], list[float]]:
    """Delays from `lars route add` exiting, and from its start, to the push arriving at a
    subscribed connection (a push may land before the command has finished exiting)."""
    config = workdir / "writer.toml"
    text = f'[agent]\ndns = ["{host}:{port}"]\n'
    if ADMIN_TLS is not None:
        text += "[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in tls_section("admin").items())
    config.write_text(text)
    delays = []
    totals = []
    conn = await connect(host, port)
    async with conn.stream:
        module = (999_999, 1 if notify else 2)
        await conn.stream.send_all(wire.encode_frame(wire.GetRouteRequest(*module)))
        await conn.receive()
        for i in range(samples):
            argv = [
                *LARS,
                "route",
                "add",
                *map(str, module),
                f"10.9.{i // 250}.{i % 250 + 1}:80",
                "--store",
                url,
                "--config",
                str(config),
            ]
            if not notify:
                argv.append("--no-notify")
            started = trio.current_time()
            await trio.run_process(argv, stdout=subprocess.DEVNULL)
            returned = trio.current_time()
            msg = await conn.receive()
            delays.append(trio.current_time() - returned)
            totals.append(trio.current_time() - started)
            assert isinstance(msg, wire.GetRouteResponse) and len(msg.hosts) == i + 1
            if not notify:
                await trio.sleep(random.uniform(0, 1))  # land anywhere in the poll cycle
    return delays, totals


async def subscribers(host: str, port: int, url: str, count: int) -> tuple[float, float]:
    """Open ``count`` connections subscribed to one module each plus a shared one; returns
    (seconds to subscribe them all, seconds for one change to reach all of them)."""
    shared = (999_998, 7)
    conns: list[Conn] = []
    start = trio.current_time()
    for i in range(count):
        conn = await connect(host, port)
        mine = (1 + i // 1000, i % 1000)
        await conn.stream.send_all(
            wire.encode_frame(wire.GetRouteRequest(*mine))
            + wire.encode_frame(wire.GetRouteRequest(*shared))
        )
        conns.append(conn)
    for conn in conns:
        await conn.receive()
        await conn.receive()
    subscribed = trio.current_time() - start
    changed = trio.current_time()
    async with open_store(url) as store:
        result = await store.add_hosts(shared, [(0x0B000001, 80)])
    assert result.version is not None
    await notify_dns([f"{host}:{port}"], result.version, tls=ADMIN_TLS)
    got = 0

    async def wait(conn: Conn) -> None:
        nonlocal got
        msg = await conn.receive()
        assert isinstance(msg, wire.GetRouteResponse) and msg.hosts
        got += 1

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(wait, conn)
    fanout = trio.current_time() - changed
    assert got == count
    for conn in conns:
        await conn.stream.aclose()
    return subscribed, fanout


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[int(len(ms) * 0.9) - 1] if len(ms) >= 10 else ms[-1]
    return f"median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, max {ms[-1]:.1f} ms"


async def bench(kind: str, url: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    t0 = time.monotonic()
    await fill(url, args.routes)
    print(f"[{kind}] filled {args.routes} routes in {time.monotonic() - t0:.1f}s", flush=True)
    config: dict[str, object] = {
        "store": url,
        "dns": {"listen": "127.0.0.1:0", "check_interval": 1.0},
    }
    if AGENT_TLS is not None:
        config["tls"] = tls_section("dns")
    async with lars_process(workdir, f"dns-{kind}", ["dns"], config) as dns:
        host, port_text = dns.addresses["dns"].split(":")
        port = int(port_text)
        assert dns.process is not None
        rate = await get_route_rate(host, port, args.routes)
        print(f"[{kind}] GetRoute: {rate:,.0f} requests/s (8 pipelined connections)", flush=True)
        notified, whole = await push_delays(host, port, url, workdir, True, args.samples)
        print(f"[{kind}] route add returned -> push, notified: {summary(notified)}", flush=True)
        print(f"[{kind}] route add started -> push (incl. CLI start-up): {summary(whole)}")
        polled, _ = await push_delays(host, port, url, workdir, False, max(5, args.samples // 4))
        print(f"[{kind}] route add returned -> push, poll only: {summary(polled)}", flush=True)
        subscribed, fanout = await subscribers(host, port, url, args.connections)
        print(
            f"[{kind}] {args.connections} connections subscribed in {subscribed:.2f}s; one "
            f"change reached all of them in {fanout * 1000:.0f} ms",
            flush=True,
        )
        rss = memory_mb(dns.process.pid)[0]
        print(f"[{kind}] DNS RSS with {args.routes} routes: {rss:.0f} MB", flush=True)
    return {
        "store": kind,
        "tls": AGENT_TLS is not None,
        "routes": args.routes,
        "get_route_per_s": round(rate),
        "push_notified_median_ms": round(statistics.median(notified) * 1000, 1),
        "push_polled_median_ms": round(statistics.median(polled) * 1000, 1),
        "fanout_ms": round(fanout * 1000),
        "connections": args.connections,
        "rss_mb": round(rss),
    }


async def main(args: argparse.Namespace) -> None:
    global CERTS, AGENT_TLS, ADMIN_TLS
    raise_fd_limit()
    results = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.tls]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        CERTS = workdir / "certs"
        generate(CERTS)
        for tls in modes:
            if tls:
                AGENT_TLS = contexts_for(tls_config("agent"), "agent")
                ADMIN_TLS = contexts_for(tls_config("admin"), "admin")
            else:
                AGENT_TLS = ADMIN_TLS = None
            name = "+tls" if tls else ""
            if args.store in ("sqlite", "both"):
                url = f"sqlite:///{workdir}/bench{'-tls' if tls else ''}.db"
                results.append(await bench(f"sqlite{name}", url, args, workdir))
            if args.store in ("mysql", "both"):
                async with fresh_database(args.mysql) as url:
                    results.append(await bench(f"mysql{name}", url, args, workdir))
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "mysql", "both"], default="both")
    parser.add_argument(
        "--mysql", default=os.environ.get("LARS_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
    )
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tls", choices=["off", "on", "both"], default="both")
    trio.run(main, parser.parse_args())
