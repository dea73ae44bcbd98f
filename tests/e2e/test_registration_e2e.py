"""Self-registration end to end (issue 15, DESIGN §14): real ``lars`` processes on MariaDB,
two DNS instances, two agents, services that come and go through ``lars register``
sidecars while a caller loops get_host + report through lars.client."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from lars.client import LarsClient
from lars.errors import LarsError
from tests.e2e.procs import LARS, LineReader, lars_process
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

TTL = 2
DRAIN = 1.0


def service(i: int) -> str:
    return f"10.9.0.{i}:{8000 + i}"


class Sidecar:
    """One ``lars register 1 1 IP:PORT`` process: the service's registration."""

    def __init__(self, process: trio.Process, address: str) -> None:
        self.process = process
        self.address = address
        self.registered_at = 0.0  # time.monotonic() of its "registered" line


@asynccontextmanager
async def sidecar(config: Path, i: int, alive: set[str]) -> AsyncIterator[Sidecar]:
    argv = [*LARS, "register", "1", "1", service(i), "--ttl", str(TTL), "--drain", str(DRAIN)]
    process = await trio.lowlevel.open_process(
        [*argv, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    car = Sidecar(process, service(i))
    try:
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        with trio.fail_after(15):
            line = await reader.line()
        assert "registered" in line, line
        car.registered_at = time.monotonic()
        alive.add(car.address)
        yield car
    finally:
        if process.poll() is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        alive.discard(car.address)


class Caller:
    """A caller thread: get_host + report on 1/1 as fast as it goes; a call to a service
    that is not alive fails (and is reported so)."""

    def __init__(self, base_port: int, alive: set[str]) -> None:
        self.client = LarsClient(base_port=base_port, timeout=0.5, retries=2)
        self.alive = alive
        self.picks: list[tuple[float, str]] = []
        self.failed: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                host = self.client.get_host(1, 1)
            except LarsError:
                time.sleep(0.001)
                continue
            now, name = time.monotonic(), str(host)
            ok = name in self.alive
            self.picks.append((now, name))
            if not ok:
                self.failed.append((now, name))
            self.client.report(1, 1, host, ok=ok)

    async def finish(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            await trio.to_thread.run_sync(self.thread.join)
        self.client.close()

    def first_pick(self, name: str, after: float = 0.0) -> float | None:
        return next((t for t, h in self.picks if h == name and t >= after), None)

    def last_pick(self, name: str) -> float | None:
        return next((t for t, h in reversed(self.picks) if h == name), None)


def route_of(client: LarsClient) -> set[str]:
    return {str(h) for h in client.get_route(1, 1)}


async def wait_until(what: Any, timeout: float, step: float = 0.02) -> float:
    """Poll ``what()`` until true; returns when (time.monotonic()), or fails."""
    with trio.fail_after(timeout):
        while not what():
            await trio.sleep(step)
    return time.monotonic()


async def test_services_scale_out_die_drain_and_outlive_a_dns(tmp_path: Path, db_url: str) -> None:
    dns_ports = [free_tcp_port(), free_tcp_port()]
    dns_addresses = [f"127.0.0.1:{p}" for p in dns_ports]
    bases = [free_udp_base(3), free_udp_base(3)]
    reporter = f"127.0.0.1:{free_tcp_port()}"

    def dns_config(port: int) -> dict[str, Any]:
        return {"store": db_url, "dns": {"listen": f"127.0.0.1:{port}", "check_interval": 0.05}}

    def agent_config(base: int, dns: list[str]) -> dict[str, Any]:
        return {
            "agent": {
                "base_port": base,
                "dns": dns,
                "reporter": reporter,
                "ip": "127.0.0.1",
                "retry_max": 0.2,
            }
        }

    # the services register through agent 0 (first DNS 0); the caller uses agent 1 (DNS 1)
    register_config = tmp_path / "register.toml"
    register_config.write_text(f"[agent]\nbase_port = {bases[0]}\n")
    alive: set[str] = set()
    async with (
        lars_process(tmp_path, "dns0", ["dns"], dns_config(dns_ports[0])) as dns0,
        lars_process(tmp_path, "dns1", ["dns"], dns_config(dns_ports[1])),
        lars_process(tmp_path, "agent0", ["agent"], agent_config(bases[0], dns_addresses)),
        lars_process(tmp_path, "agent1", ["agent"], agent_config(bases[1], dns_addresses[::-1])),
        sidecar(register_config, 1, alive) as s1,
        sidecar(register_config, 2, alive) as s2,
        sidecar(register_config, 3, alive),
    ):
        watcher = LarsClient(base_port=bases[1], timeout=0.5, retries=2)
        clients = [LarsClient(base_port=b, timeout=0.5, retries=2) for b in bases]
        first = {service(i) for i in (1, 2, 3)}
        await wait_until(lambda: route_of(watcher) == first, 5)
        caller = Caller(bases[1], alive)
        caller.thread.start()
        try:
            await trio.sleep(0.5)
            # three more services register while traffic runs: each gets calls within 1 s
            async with (
                sidecar(register_config, 4, alive) as s4,
                sidecar(register_config, 5, alive) as s5,
                sidecar(register_config, 6, alive) as s6,
            ):
                for car in (s4, s5, s6):
                    await wait_until(lambda c=car: caller.first_pick(c.address) is not None, 3)
                    first_call = caller.first_pick(car.address)
                    assert first_call is not None
                    assert first_call - car.registered_at < 1.0

                # SIGKILL: no goodbye; gone from every agent's route within ttl + 1 s
                killed_at = time.monotonic()
                s1.process.kill()
                alive.discard(s1.address)
                gone_at = await wait_until(
                    lambda: all(s1.address not in route_of(c) for c in clients), TTL + 3
                )
                assert gone_at - killed_at <= TTL + 1.0

                # SIGTERM: drained at once (no new calls within 100 ms), no failed call
                # while it drains, then it exits
                termed_at = time.monotonic()
                s2.process.send_signal(signal.SIGTERM)
                with trio.fail_after(DRAIN + 5):
                    status = await s2.process.wait()
                alive.discard(s2.address)
                assert status == 0
                assert time.monotonic() - termed_at >= DRAIN * 0.9  # it waited the drain
                last = caller.last_pick(s2.address)
                assert last is not None and last - termed_at < 0.1
                assert not [f for f in caller.failed if f[1] == s2.address]

                # kill DNS 0 (agent 0's, which holds the leases): agent 0 moves to DNS 1
                # and re-registers; the leases survive, no service leaves the route
                dns0.kill()
                survivors = {service(i) for i in (3, 4, 5, 6)}
                await wait_until(lambda: route_of(watcher) == survivors, TTL + 3)
                until = time.monotonic() + 2 * TTL + 1
                while time.monotonic() < until:
                    assert route_of(watcher) == survivors
                    await trio.sleep(0.1)
                recent = {h for t, h in caller.picks if t > until - TTL}
                assert recent == survivors
                await caller.finish()  # before the sidecars stop
        finally:
            await caller.finish()
            for client in (watcher, *clients):
                client.close()
    # only the service killed without goodbye ever failed a call, and not for long
    assert {h for _, h in caller.failed} <= {s1.address}
    assert all(t - killed_at < TTL + 1.0 for t, _ in caller.failed)
