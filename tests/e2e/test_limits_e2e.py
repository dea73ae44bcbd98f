"""The attacks of issue 13 on a real ``lars run --role dns``: a flood of idle connections up
to max_connections (the agents already connected, change notices and `lars stats` go on),
and 300 half-sent frames of almost 1 MiB (dropped at frame_timeout, the memory given back).

max_connections is 300 here, not the default 10,000, so that the flood stays fast and well
within the test process's open-files limit; the rules do not depend on the number."""

from __future__ import annotations

import contextlib
import json
import resource
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from lars import wire
from lars.config import TlsConfig
from lars.core.model import int_to_ip
from lars.roles.common import ask, connect_tls
from lars.tls import TlsContexts, contexts_for, generate
from tests.e2e.procs import lars_cli, lars_process, memory_mb
from tests.fakes import FramedClient
from tests.netutil import free_tcp_port
from tests.roles.test_limits import non_loopback_ipv4

pytestmark = pytest.mark.e2e

H1, H2 = "10.0.0.1:7001", "10.0.0.2:7002"
#: max_connections of the DNS under attack.
LIMIT = 300
#: Connections attempted beyond the limit in the idle flood (the issue's 20,000).
STORM = 20_000
#: Seconds any one step may take.
DEADLINE = 20.0
#: Lars's default max_frame.
MAX_FRAME = 1 << 20


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> None:
    """Room in this process for the attackers' sockets (the DNS raises its own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * LIMIT
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the open-files limit ({hard}) is too low for this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
async def opened() -> AsyncIterator[list[trio.abc.Stream]]:
    """Every client stream a test opens, closed after it."""
    streams: list[trio.abc.Stream] = []
    yield streams
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def until(check: Callable[[], Awaitable[bool]], what: str | Callable[[], str]) -> None:
    with trio.move_on_after(DEADLINE):
        while not await check():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {DEADLINE}s: {what if isinstance(what, str) else what()}")


async def counters(address: str, tls: TlsContexts | None = None) -> dict[str, float]:
    """The DNS's counters, asked as `lars stats` does (an admin: from loopback, or with an
    admin certificate)."""
    reply = await ask(address, wire.StatsRequest(1), wait=5.0, tls=tls)
    assert isinstance(reply, wire.StatsResponse), reply
    return dict(reply.counters)


async def connect(
    host: str, port: int, opened: list[trio.abc.Stream], source: str | None = None
) -> trio.SocketStream:
    """A TCP connection to ``host:port``, from ``source`` if given."""
    sock = trio.socket.socket()
    stream = trio.SocketStream(sock)
    opened.append(stream)
    if source is not None:
        await sock.bind((source, 0))
    await sock.connect((host, port))
    return stream


async def refused_at_once(stream: trio.abc.Stream, within: float = 1.0) -> bool:
    """True if the DNS closes ``stream`` without a word within ``within`` seconds."""
    with trio.move_on_after(within):
        try:
            return await stream.receive_some(65536) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def route_pushed(agent: FramedClient, hosts: list[str]) -> None:
    with trio.fail_after(DEADLINE):
        pushed = await agent.route()
    assert sorted(f"{int_to_ip(ip)}:{port}" for ip, port in pushed.hosts) == hosts


async def init_store(tmp_path: Path) -> str:
    store = f"sqlite:///{tmp_path}/lars.db"
    await lars_cli("db", "init", "--store", store)
    await lars_cli("route", "add", "1", "1", H1, "--store", store, "--no-notify")
    return store


# Pushes in these tests come from change notices alone, never from a poll.
QUIET_STORE = {"check_interval": 600.0, "reload_interval": 600.0}


async def test_an_idle_flood_leaves_the_dns_serving_agents_notices_and_stats(
    tmp_path: Path, opened: list[trio.abc.Stream]
) -> None:
    """TLS off: the flood comes from this host's network address, the admin from loopback."""
    outside = non_loopback_ipv4()
    if outside is None:
        pytest.skip("this host has no IPv4 address beyond loopback")
    store = await init_store(tmp_path)
    port = free_tcp_port("0.0.0.0")
    dns_config = {
        "listen": f"0.0.0.0:{port}",
        "max_connections": LIMIT,
        "admin_reserve": 16,
        "first_frame_timeout": 600.0,  # the flood stays for the whole test
        **QUIET_STORE,
    }
    config = {"store": store, "dns": dns_config, "tls": {"mode": "off"}}
    admin = f"127.0.0.1:{port}"
    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        agent = FramedClient(await connect(outside, port, opened, outside))
        await agent.send(wire.GetRouteRequest(1, 1))
        await route_pushed(agent, [H1])

        async with trio.open_nursery() as nursery:
            for _ in range(LIMIT - 1):
                nursery.start_soon(connect, outside, port, opened, outside)

        async def full() -> bool:
            return (await counters(admin))["connections"] >= LIMIT + 1  # + the asking admin

        await until(full, f"{LIMIT} connections open")
        # A storm of 20,000 more connections from beyond loopback, 100 at a time: each is
        # closed without a word as soon as the DNS accepts it (the listen backlog may hold
        # some a moment in such a storm) ...
        refused = 0
        limiter = trio.CapacityLimiter(100)

        async def attempt() -> None:
            nonlocal refused
            async with limiter:
                stream = await connect(outside, port, [], outside)
                try:
                    closed = await refused_at_once(stream, within=DEADLINE)
                    refused += closed  # after the await: `x += await f()` loses updates
                finally:
                    await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            for _ in range(STORM):
                nursery.start_soon(attempt)
        assert refused == STORM
        # ... while `lars stats`, from loopback, takes a seat of the admin reserve,
        stats = json.loads(await lars_cli("stats", "--dns", admin, "--json"))
        assert stats["connections_refused"] == STORM
        assert stats["connections"] == LIMIT + 1
        assert stats["connections_open"] == LIMIT + 1
        # a change notice gets in and reaches the agent connected before the flood,
        writer = tmp_path / "writer.toml"
        writer.write_text(f'[agent]\ndns = ["{admin}"]\n')
        await lars_cli("route", "add", "1", "1", H2, "--store", store, "--config", str(writer))
        await route_pushed(agent, [H1, H2])
        # and the agent's own requests are answered.
        await agent.send(wire.GetRouteRequest(1, 1))
        await route_pushed(agent, [H1, H2])
        assert dns.log.count("refused a connection from") <= 3  # 20,000, at a rate limit


async def test_half_sent_frames_are_dropped_at_the_deadline_and_memory_returns(
    tmp_path: Path, opened: list[trio.abc.Stream]
) -> None:
    store = await init_store(tmp_path)
    config = {"store": store, "dns": {"listen": "127.0.0.1:0", "frame_timeout": 2.0}}
    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        address = dns.addresses["dns"]
        host, port = address.rsplit(":", 1)
        assert dns.process is not None
        pid = dns.process.pid
        await counters(address)  # warm: one connection served
        baseline, _ = memory_mb(pid)

        length = MAX_FRAME - 16  # a frame the DNS must accept: just under max_frame
        almost = struct.pack(">I", length) + b"\x00" * (length - 1)

        async def attack() -> None:
            stream = await connect(host, int(port), opened)
            with contextlib.suppress(trio.BrokenResourceError):  # cut before the end
                await stream.send_all(almost)

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(attack)

        async def all_cut() -> bool:
            return (await counters(address)).get("frame_timeouts", 0) >= 300

        await until(all_cut, "300 frame timeouts")
        for stream in opened:
            assert await refused_at_once(stream)  # closed by the DNS
        _, peak = memory_mb(pid)
        assert peak > baseline + 100, (baseline, peak)  # the frames were buffered a while

        async def given_back() -> bool:
            return memory_mb(pid)[0] <= baseline + 30

        await until(given_back, lambda: f"RSS {memory_mb(pid)[0]:.0f} MB, was {baseline:.0f}")
        assert (await counters(address))["frame_timeouts"] == 300
        assert "a frame still incomplete" in dns.log


def tls_section(certs: Path, role: str, **extra: Any) -> dict[str, Any]:
    return {
        "mode": "on",
        "ca": str(certs / "ca.pem"),
        "cert": str(certs / f"{role}.pem"),
        "key": str(certs / f"{role}.key"),
        **extra,
    }


def contexts(certs: Path, role: str) -> TlsContexts:
    tls = contexts_for(TlsConfig(**tls_section(certs, role)), role)
    assert tls is not None
    return tls


async def test_with_tls_a_full_dns_still_takes_admins_and_serves_its_agents(
    tmp_path: Path, opened: list[trio.abc.Stream]
) -> None:
    certs = tmp_path / "certs"
    generate(certs)
    store = await init_store(tmp_path)
    admin_tls = contexts(certs, "admin")
    admin_config = tmp_path / "admin.toml"
    admin_config.write_text(
        "[tls]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tls_section(certs, "admin").items())
    )
    dns_config = {"listen": "127.0.0.1:0", "max_connections": LIMIT, **QUIET_STORE}
    # The handshake timeout keeps the flood's unfinished handshakes for the whole test.
    tls = tls_section(certs, "dns", handshake_timeout=600.0)
    config = {"store": store, "dns": dns_config, "tls": tls}
    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        address = dns.addresses["dns"]
        host, port = address.rsplit(":", 1)
        tcp = await connect(host, int(port), opened)
        agent_stream = await connect_tls(tcp, contexts(certs, "agent"), "dns")
        opened.append(agent_stream)
        agent = FramedClient(agent_stream)
        await agent.send(wire.GetRouteRequest(1, 1))
        await route_pushed(agent, [H1])

        async with trio.open_nursery() as nursery:  # connections that never say hello
            for _ in range(LIMIT - 1):
                nursery.start_soon(connect, host, int(port), opened)

        async def full() -> bool:
            return (await counters(address, admin_tls))["connections_open"] >= LIMIT + 1

        await until(full, f"{LIMIT} connections open")
        # An agent's certificate over the limit: handshake, then refused (not an admin).
        late_tcp = await connect(host, int(port), opened)
        late_agent = await connect_tls(late_tcp, contexts(certs, "agent"), "dns")
        opened.append(late_agent)
        assert await refused_at_once(late_agent)
        # More silent connections than the reserve has seats: each newer one takes the seat
        # of the oldest, whose handshake is not done.
        silent = [await connect(host, int(port), opened) for _ in range(20)]
        assert await refused_at_once(silent[0])
        # Still, `lars stats` and a change notice with the admin certificate get in,
        stats = json.loads(
            await lars_cli("stats", "--dns", address, "--json", "--config", str(admin_config))
        )
        assert stats["connections_refused"] >= 1 + 4
        assert stats["max_connections"] == LIMIT
        writer = tmp_path / "writer.toml"
        writer.write_text(admin_config.read_text() + f'[agent]\ndns = ["{address}"]\n')
        await lars_cli("route", "add", "1", "1", H2, "--store", store, "--config", str(writer))
        # and the agent connected before the flood gets its push.
        await route_pushed(agent, [H1, H2])
        assert (await counters(address, admin_tls))["change_notices"] == 1
