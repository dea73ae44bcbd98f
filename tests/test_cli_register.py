"""`lars register` (the sidecar) as a real process against an agent in this process and a fake
DNS, and `lars query` showing demoted hosts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from lars import wire
from lars.cli import main
from lars.core.model import ip_to_int
from lars.roles.agent import Agent
from tests.fakes import FakeDns
from tests.roles.test_agent_register import A, B, M, registering

IP = ip_to_int("10.0.0.1")
LARS = [sys.executable, "-m", "lars"]


def config_for(tmp_path: Path, the_agent: Agent) -> Path:
    """A config file naming the agent (and its DNS, never a default port)."""
    a = the_agent.config
    path = tmp_path / "lars.toml"
    path.write_text(
        f'[agent]\nbase_port = {a.base_port}\nports = {a.ports}\ndns = ["{a.dns[0]}"]\n'
        f'reporter = "{a.reporter}"\n[log]\nlevel = "warning"\n'
    )
    return path


class Sidecar:
    """A `lars register` process, its output read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def line(self, timeout: float = 10.0) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(timeout):
            while b"\n" not in self.buffer:
                data = await self.process.stdout.receive_some(4096)
                assert data, f"the sidecar exited: {await self.stderr()}"
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        chunks = []
        with trio.move_on_after(5):
            while data := await self.process.stderr.receive_some(4096):
                chunks.append(data)
        return b"".join(chunks).decode()

    async def wait(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def sidecar(config: Path, *args: str) -> AsyncIterator[Sidecar]:
    process = await trio.lowlevel.open_process(
        [*LARS, "register", *args, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=config.parent,
    )
    try:
        yield Sidecar(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_sidecar_registers_renews_and_on_a_signal_drains_and_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with registering() as (fake, the_agent, _):
        config = config_for(tmp_path, the_agent)
        args = ("1", "1", "10.0.0.1:7001", "--ttl", "1", "--weight", "30", "--drain", "0.5")
        async with sidecar(config, *args) as process:
            line = await process.line()
            assert line.startswith("registered 10.0.0.1:7001 for module 1/1 (ttl 1s")
            first = fake.leases()[0][1]
            assert (first.host, first.weight, first.ttl) == ((IP, 7001), 30, 1)
            await trio.sleep(1.0)  # renewed every 1/3 s: still held after its ttl
            assert len(the_agent.registry) == 1
            assert the_agent.metrics.counters["registrations_renewed"] >= 2
            process.process.send_signal(signum)
            assert (await process.line()).startswith("deregistered 10.0.0.1:7001")
            stopped = time.monotonic()
            assert await process.wait() == 0
            assert time.monotonic() - stopped >= 0.4  # it waited the drain
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 500)]
        assert len(the_agent.registry) == 0


async def test_the_sidecar_without_an_address_registers_this_host(tmp_path: Path) -> None:
    async with registering() as (fake, the_agent, _):
        config = config_for(tmp_path, the_agent)
        async with sidecar(config, "1", "1", ":7001", "--drain", "0") as process:
            assert (await process.line()).startswith("registered 127.0.0.1:7001")
            process.process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        assert fake.drops() == [wire.Drop(1, 1, ip_to_int("127.0.0.1"), 7001, 0)]


async def test_a_refused_registration_exits_1_with_the_reason(tmp_path: Path) -> None:
    async with registering(max_registrations=0) as (_, the_agent, _):
        config = config_for(tmp_path, the_agent)
        async with sidecar(config, "1", "1", "10.0.0.1:7001") as process:
            assert await process.wait() == 1
            error = await process.stderr()
            assert "refused" in error and "max_registrations = 0" in error
            assert "Traceback" not in error


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["1", "1", "10.0.0.1"], "IP:PORT"),
        (["1", "1", "10.0.0.1:0"], "port"),
        (["1", "1", "10.0.0.1:7001", "--ttl", "0"], "ttl"),
        (["1", "1", "224.0.0.1:7001"], "multicast"),
        (["1", "1", "10.0.0.1:7001", "--drain", "-1"], "drain"),
        (["1", "1", "10.0.0.1:7001", "--zone", "a b\t"], "zone"),
        (["-1", "1", "10.0.0.1:7001"], "out of range"),
    ],
)
def test_bad_arguments_are_usage_errors(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["register", *args]) == 2
    assert needle in capsys.readouterr().err


async def test_lars_query_shows_demoted_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeDns(routes={M: [A, B]}, demoted={M: [B]})
    async with registering(fake) as (_, the_agent, udp):
        await udp.send(wire.GetHostRequest(1, *M))
        await udp.receive()  # the route is in
        config = str(config_for(tmp_path, the_agent))
        code = await trio.to_thread.run_sync(main, ["query", "1", "1", "--config", config])
        assert code == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].split()[-1] == "DEMOTED"
        rows = {line.split()[0]: (line.split()[1], line.split()[-1]) for line in lines[2:]}
        assert rows == {"10.0.0.1:7001": ("idle", "-"), "10.0.0.2:7002": ("overload", "yes")}
        args = ["query", "1", "1", "--json", "--config", config]
        assert await trio.to_thread.run_sync(main, args) == 0
        hosts = json.loads(capsys.readouterr().out)["hosts"]
        assert {h["host"]: h["demoted"] for h in hosts} == {
            "10.0.0.1:7001": False,
            "10.0.0.2:7002": True,
        }


def test_register_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register", "--help"]) == 0
    out = capsys.readouterr().out
    assert "SIGTERM" in out and "--drain" in out and "Examples" in out
