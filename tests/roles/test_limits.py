"""Connection limits of the DNS and the reporter (DESIGN §16, issue 13): the limit and its
admin reserve, frame deadlines, the control rate, and accept() out of file descriptors.

Most run on memory streams behind a fake listener under trio's MockClock; the reserve's
rules, which depend on peer addresses and certificates, on real loopback sockets."""

from __future__ import annotations

import errno
import logging
import math
import resource
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from lars import wire
from lars.config import DnsConfig, ReporterConfig, TlsConfig
from lars.roles import common
from lars.roles.common import (
    CROWDED_SHARE,
    FD_MARGIN,
    RELEASE_ABOVE,
    RELEASE_DELAY,
    THROTTLED_RECEIVE_SIZE,
    Seat,
    TokenBucket,
    ask,
    connect_tls,
    frame_started,
    is_loopback,
    seat_for,
)
from lars.roles.dns import DnsServer
from lars.roles.reporter import Reporter
from lars.store import open_store
from lars.tls import TlsContexts, contexts_for, generate
from tests.fakes import FlakyStore, FramedClient, memory_store

A = (167772161, 7001)
B = (167772162, 7002)
M1 = (1, 1)
VIRTUAL_DEADLINE = 3600
#: Seconds any step on real sockets may take before the test fails.
REAL_DEADLINE = 10


@pytest.fixture
async def store() -> AsyncIterator[FlakyStore]:
    inner = memory_store()
    await inner.init_schema()
    flaky = FlakyStore(inner)
    yield flaky
    await flaky.aclose()


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the server ends of memory stream pairs to the gate's accept loop. Each accept()
    first takes the next of ``errors``: an OSError is raised, None (or none left) hands out
    the next connection."""

    def __init__(self, errors: Sequence[OSError | None] = ()) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](1000)
        self.errors = list(errors)

    def connect(self) -> FramedClient:
        client, served = trio.testing.memory_stream_pair()
        self._send.send_nowait(served)
        return FramedClient(client)

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def dns_behind(
    store: FlakyStore, listener: MemoryListener | None = None, **config: Any
) -> AsyncIterator[tuple[DnsServer, MemoryListener]]:
    """A DNS whose gate accepts from a MemoryListener."""
    server = DnsServer(DnsConfig(listen="127.0.0.1:0", **config), store)
    listener = listener or MemoryListener()
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.track_changes)
            await nursery.start(server.gate.serve, listener, server.handle_connection)
            yield server, listener
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def reporter_behind(
    store: FlakyStore, **config: Any
) -> AsyncIterator[tuple[Reporter, MemoryListener]]:
    """A reporter (with its writers) whose gate accepts from a MemoryListener."""
    reporter = Reporter(ReporterConfig(listen="127.0.0.1:0", **config), store)
    listener = MemoryListener()
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(reporter.config.writers):
                nursery.start_soon(reporter._writer)
            await nursery.start(reporter.gate.serve, listener, reporter.handle_connection)
            yield reporter, listener
            nursery.cancel_scope.cancel()


async def route(client: FramedClient, module: tuple[int, int]) -> frozenset[tuple[int, int]]:
    await client.send(wire.GetRouteRequest(*module))
    msg = await client.route()
    assert (msg.modid, msg.cmdid) == module
    return frozenset(msg.hosts)


async def stats(client: FramedClient, seq: int = 1) -> dict[str, float]:
    await client.send(wire.StatsRequest(seq))
    msg = await client.receive()
    assert isinstance(msg, wire.StatsResponse), msg
    return dict(msg.counters)


def report(seq: int) -> wire.Message:
    return wire.ReportStatusRequest(
        1, 1, 2130706433, (wire.HostResult(*A, 3, 1, False),), 1_800_000_000, seq
    )


def partial_frame(length: int = 1000, sent: int = 500) -> bytes:
    """The length header of a Lars frame of ``length`` bytes and ``sent`` bytes of its body."""
    return struct.pack(">I", length) + b"\x00" * sent


# --- the pure rules --------------------------------------------------------------------------


def test_seats_regular_below_the_limit_then_the_reserve_then_none() -> None:
    assert seat_for(0, 2, 1) is Seat.REGULAR
    assert seat_for(1, 2, 1) is Seat.REGULAR
    assert seat_for(2, 2, 1) is Seat.RESERVE
    assert seat_for(3, 2, 1) is Seat.NONE
    assert seat_for(2, 2, 0) is Seat.NONE


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.full_in(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.05)
    assert bucket.take(0.1)  # one token per 1/rate seconds
    assert not bucket.take(0.1)
    assert bucket.full_in(10.0) == 0  # never more than the burst
    assert [bucket.take(10.0) for _ in range(6)] == [True] * 5 + [False]


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("192.0.2.2", "10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "localhost", ""):
        assert not is_loopback(host), host


def test_a_length_header_alone_is_a_started_frame() -> None:
    decoder = wire.FrameDecoder()
    assert not frame_started(decoder)
    decoder.feed(wire.encode_frame(wire.StatsRequest(1)) + struct.pack(">I", 100))
    assert len(list(decoder)) == 1
    assert decoder.buffered == 0  # the header of the next frame is consumed ...
    assert frame_started(decoder)  # ... and its body is due
    decoder.feed(b"\x00" * 99)
    assert frame_started(decoder)


def test_max_connections_is_lowered_to_fit_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = DnsServer(DnsConfig(max_connections=20_000, admin_reserve=16), memory_store())
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    with caplog.at_level(logging.INFO, "lars.dns"):
        server.gate.fit_fd_limit()
    assert server.gate.max_connections == 1024 - 16 - FD_MARGIN
    (record,) = caplog.records
    assert record.levelno == logging.WARNING  # a limit the operator set
    assert "does not fit the open-files limit 1024" in record.getMessage()
    caplog.clear()
    default = DnsServer(DnsConfig(), memory_store())
    with caplog.at_level(logging.INFO, "lars.dns"):
        default.gate.fit_fd_limit()
    assert default.gate.max_connections == 1024 - 16 - FD_MARGIN
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # the default, fitted
    roomy = DnsServer(DnsConfig(max_connections=100), memory_store())
    roomy.gate.fit_fd_limit()
    assert roomy.gate.max_connections == 100
    # A DNS and a reporter in one process share the limit: each fits in its half.
    shared = DnsServer(DnsConfig(max_connections=10_000, admin_reserve=16), memory_store())
    shared.gate.fd_share = 2
    shared.gate.fit_fd_limit()
    assert shared.gate.max_connections == (1024 - FD_MARGIN) // 2 - 16


async def test_run_shares_the_open_files_limit_between_its_listening_roles(
    tmp_path: Path,
) -> None:
    from lars.config import Config
    from lars.roles.run import run_roles

    config = Config(
        dns=DnsConfig(listen="127.0.0.1:0", http_listen=""),
        reporter=ReporterConfig(listen="127.0.0.1:0", http_listen=""),
    )
    store = f"sqlite:///{tmp_path}/lars.db"
    async with open_store(store, create=True) as opened:
        await opened.init_schema()
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(
            lambda task_status: run_roles(
                config, ["dns", "reporter"], store_override=store, task_status=task_status
            )
        )
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # as run_roles raised it
        for address in (addresses["dns"], addresses["reporter"]):
            counters = await ask(f"{address[0]}:{address[1]}", wire.StatsRequest(1))
            assert isinstance(counters, wire.StatsResponse)
            limit = dict(counters.counters)["max_connections"]
            assert limit == min(10_000, (soft - FD_MARGIN) // 2 - 16)
        nursery.cancel_scope.cancel()


# --- the limit ------------------------------------------------------------------------------


async def test_dns_refuses_connections_over_the_limit_at_once_and_serves_the_others(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with dns_behind(store, max_connections=2, admin_reserve=4) as (server, listener):
        first, second = listener.connect(), listener.connect()
        assert await route(first, M1) == {A}
        assert await route(second, M1) == {A}
        started = trio.current_time()
        extra = listener.connect()  # a memory stream has no loopback address: no reserve
        assert await extra.closed_by_peer()
        assert trio.current_time() == started  # at once, not after some timeout
        assert server.metrics.counters["connections_refused"] == 1
        # The connections already open keep their routes and their pushes.
        await store.inner.add_hosts(M1, [B])
        assert frozenset((await first.route()).hosts) == {A, B}
        assert frozenset((await second.route()).hosts) == {A, B}
        # A seat is free again once a connection closes.
        await first.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.gate.open_connections == 1
        assert await route(listener.connect(), M1) == {A, B}
        exposed = generate_latest(server.registry).decode()
        assert "lars_dns_connections_refused_total 1.0" in exposed


async def test_reporter_refuses_connections_over_the_limit_and_acknowledges_the_others(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with reporter_behind(store, max_connections=1, admin_reserve=0) as (reporter, listener):
        agent = listener.connect()
        await agent.send(report(1))
        assert await agent.receive() == wire.ReportStatusAck(1)
        assert await listener.connect().closed_by_peer()
        await agent.send(report(2))
        assert await agent.receive() == wire.ReportStatusAck(2)
        assert reporter.metrics.counters["connections_refused"] == 1
        exposed = generate_latest(reporter.registry).decode()
        assert "lars_reporter_connections_refused_total 1.0" in exposed


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this host beyond loopback (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
        except OSError:
            return None
        host: str = sock.getsockname()[0]
    return None if is_loopback(host) or host == "0.0.0.0" else host


@pytest.fixture
async def opened() -> AsyncIterator[list[FramedClient]]:
    """The clients a test opens on real sockets, closed after it."""
    clients: list[FramedClient] = []
    yield clients
    for client in clients:
        await trio.aclose_forcefully(client.stream)


async def connect_from(source: str, port: int, opened: list[FramedClient]) -> FramedClient:
    """A TCP connection from ``source`` to ``source:port`` (the server listens on 0.0.0.0)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = FramedClient(trio.SocketStream(sock))
    opened.append(client)
    await sock.bind((source, 0))
    await sock.connect((source, port))
    return client


async def until(check: Callable[[], bool]) -> None:
    """Wait (real time, on real sockets) until ``check()`` holds."""
    while not check():
        await trio.sleep(0.005)


async def test_with_tls_off_the_admin_reserve_is_for_loopback_peers(
    store: FlakyStore, opened: list[FramedClient]
) -> None:
    outside = non_loopback_ipv4()
    if outside is None:
        pytest.skip("this host has no IPv4 address beyond loopback")
    await store.inner.add_hosts(M1, [A])
    server = DnsServer(DnsConfig(listen="0.0.0.0:0", max_connections=2, admin_reserve=1), store)
    with trio.fail_after(REAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(server.serve)
            agents = [await connect_from(outside, port, opened) for _ in range(2)]
            for agent in agents:
                assert await route(agent, M1) == {A}
            assert await (await connect_from(outside, port, opened)).closed_by_peer()
            admin = await connect_from("127.0.0.1", port, opened)  # over the limit, in the reserve
            assert (await stats(admin))["connections_refused"] == 1
            assert await (
                await connect_from("127.0.0.1", port, opened)
            ).closed_by_peer()  # reserve full
            assert server.metrics.counters["connections_refused"] == 2
            await admin.stream.aclose()
            await until(lambda: server.gate.open_connections == 2)
            # What `lars stats` does, from loopback, with every regular seat taken.
            reply = await common.ask(f"127.0.0.1:{port}", wire.StatsRequest(7))
            assert isinstance(reply, wire.StatsResponse)
            for agent in agents:
                assert await route(agent, M1) == {A}
            nursery.cancel_scope.cancel()


def tls_contexts(certs: Path, role: str) -> TlsContexts:
    config = TlsConfig(
        mode="on",
        ca=str(certs / "ca.pem"),
        cert=str(certs / f"{role}.pem"),
        key=str(certs / f"{role}.key"),
    )
    contexts = contexts_for(config, role)
    assert contexts is not None
    return contexts


async def tls_client(port: int, contexts: TlsContexts, opened: list[FramedClient]) -> FramedClient:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    opened.append(FramedClient(tcp))
    client = FramedClient(await connect_tls(tcp, contexts, "dns"))
    opened.append(client)
    return client


async def test_with_tls_on_the_admin_reserve_is_for_admin_certificates(
    store: FlakyStore, tmp_path: Path, opened: list[FramedClient]
) -> None:
    certs = tmp_path / "certs"
    generate(certs)
    await store.inner.add_hosts(M1, [A])
    config = DnsConfig(listen="127.0.0.1:0", max_connections=1, admin_reserve=1)
    server = DnsServer(config, store, tls=tls_contexts(certs, "dns"))
    with trio.fail_after(REAL_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(server.serve)
            agent = await tls_client(port, tls_contexts(certs, "agent"), opened)
            assert await route(agent, M1) == {A}
            # An agent over the limit gets its handshake (the reserve is for whoever turns
            # out to be an admin), then is closed: it is not one.
            late = await tls_client(port, tls_contexts(certs, "agent"), opened)
            assert await late.closed_by_peer()
            await until(lambda: server.gate.open_connections == 1)
            assert server.metrics.counters["connections_refused"] == 1
            assert server.metrics.counters["tls_refused"] == 0
            reply = await common.ask(
                f"127.0.0.1:{port}",
                wire.StatsRequest(1),
                tls=tls_contexts(certs, "admin"),
                expect="dns",
            )
            assert isinstance(reply, wire.StatsResponse)
            assert reply.counters["connections_refused"] == 1
            assert reply.counters["connections_open"] == 2  # the agent, the admin asking
            # A connection that never says hello holds the reserve only until a newer one
            # needs the seat: an admin's, here.
            await until(lambda: server.gate.open_connections == 1)
            silent = FramedClient(await trio.open_tcp_stream("127.0.0.1", port))
            opened.append(silent)
            await until(lambda: server.gate.open_connections == 2)
            reply = await common.ask(
                f"127.0.0.1:{port}",
                wire.StatsRequest(2),
                tls=tls_contexts(certs, "admin"),
                expect="dns",
            )
            assert isinstance(reply, wire.StatsResponse)
            assert await silent.closed_by_peer()
            assert server.metrics.counters["connections_refused"] == 2
            assert await route(agent, M1) == {A}
            nursery.cancel_scope.cancel()


# --- deadlines ------------------------------------------------------------------------------


@asynccontextmanager
async def either_role(
    kind: str, store: FlakyStore, **config: Any
) -> AsyncIterator[tuple[DnsServer | Reporter, MemoryListener]]:
    if kind == "dns":
        async with dns_behind(store, **config) as pair:
            yield pair
    else:
        async with reporter_behind(store, **config) as pair:
            yield pair


ROLES = pytest.mark.parametrize("kind", ["dns", "reporter"])


@ROLES
async def test_a_half_sent_frame_is_cut_at_frame_timeout(
    kind: str, store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with either_role(kind, store, frame_timeout=4.0) as (server, listener):
        client = listener.connect()
        await stats(client)  # a first frame, so that only frame_timeout applies
        started = trio.current_time()
        await client.send_raw(partial_frame())
        # A slowloris: a byte now and then does not move the deadline.
        for _ in range(3):
            await trio.sleep(1.0)
            await client.send_raw(b"\x00")
        assert await client.closed_by_peer()
        assert trio.current_time() - started == pytest.approx(4.0)
        assert server.metrics.counters["frame_timeouts"] == 1
        await trio.testing.wait_all_tasks_blocked()
        assert server.gate.open_connections == 0


async def test_memory_goes_back_to_the_system_once_per_burst_of_large_cut_frames(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[float] = []
    monkeypatch.setattr(common, "malloc_trim", lambda: trims.append(trio.current_time()))
    async with dns_behind(store, frame_timeout=4.0) as (server, listener):
        small = listener.connect()
        await small.send_raw(partial_frame(1000, 500))
        await trio.sleep(10.0)
        assert trims == []  # a small buffer: nothing worth the trouble
        started = trio.current_time()
        clients = [listener.connect() for _ in range(3)]
        for client in clients:
            await client.send_raw(partial_frame(RELEASE_ABOVE * 2, RELEASE_ABOVE + 1))
        for client in clients:
            assert await client.closed_by_peer()
        await trio.sleep(10.0)
        assert trims == [pytest.approx(started + 4.0 + RELEASE_DELAY)]
        assert server.metrics.counters["frame_timeouts"] == 4


@ROLES
async def test_a_length_header_alone_is_cut_at_frame_timeout(
    kind: str, store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with either_role(kind, store, frame_timeout=4.0) as (server, listener):
        client = listener.connect()
        # A complete frame and the header of the next, in one segment: nothing of the next
        # frame's body is buffered, and yet it has started.
        await client.send_raw(wire.encode_frame(wire.StatsRequest(1)) + struct.pack(">I", 500))
        assert isinstance(await client.receive(), wire.StatsResponse)
        started = trio.current_time()
        assert await client.closed_by_peer()
        assert trio.current_time() - started == pytest.approx(4.0)
        assert server.metrics.counters["frame_timeouts"] == 1


async def test_time_the_reporter_holds_back_does_not_count(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    """A frame whose first bytes arrived while the reporter did not read on (its queue full,
    the store down) has its frame_timeout from when the reporter reads again."""
    store.down = True
    async with reporter_behind(store, frame_timeout=4.0, queue_size=1, writers=1) as (
        reporter,
        listener,
    ):
        agent = listener.connect()
        # The writer holds one or two reports, the queue one: the reader stops at the
        # fourth, with the first bytes of the fifth in its decoder.
        last = wire.encode_frame(report(5))
        head = b"".join(wire.encode_frame(report(seq)) for seq in range(1, 5))
        await agent.send_raw(head[:9])  # a frame started: due within 4 s
        await trio.sleep(1.0)
        await agent.send_raw(head[9:] + last[:9])  # ... and complete, and the next started
        await trio.sleep(60.0)
        store.down = False
        acked = [await agent.receive() for _ in range(4)]
        assert sorted(m.seq for m in acked) == [1, 2, 3, 4]  # type: ignore[attr-defined]
        await agent.send_raw(last[9:])  # long after its first bytes, soon after the read
        assert await agent.receive() == wire.ReportStatusAck(5)
        assert reporter.metrics.counters["frame_timeouts"] == 0


@ROLES
async def test_an_idle_agent_between_frames_is_never_cut(
    kind: str, store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with either_role(kind, store, frame_timeout=1.0, first_frame_timeout=1.0) as (
        server,
        listener,
    ):
        quiet = listener.connect()  # connected in normal times: no first-frame deadline
        talker = listener.connect()
        await stats(talker)
        await trio.sleep(1800.0)
        await stats(quiet)
        await stats(talker, 2)
        assert server.metrics.counters["frame_timeouts"] == 0
        assert server.gate.open_connections == 2


@ROLES
async def test_a_silent_connection_arriving_in_a_crowd_is_cut_at_first_frame_timeout(
    kind: str, store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with either_role(kind, store, max_connections=4, first_frame_timeout=10.0) as (
        server,
        listener,
    ):
        assert CROWDED_SHARE == 0.5
        early = [listener.connect() for _ in range(2)]  # before the crowd: no deadline
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        crowd = [listener.connect() for _ in range(2)]  # 2 of 4 open: crowded
        speaker = crowd.pop()
        await trio.sleep(9.0)
        await stats(speaker)  # spoke in time: no deadline from now on
        assert await crowd[0].closed_by_peer()
        assert trio.current_time() - started == pytest.approx(10.0)
        assert server.metrics.counters["frame_timeouts"] == 1
        await trio.sleep(1800.0)
        for client in (*early, speaker):
            await stats(client)
        assert server.gate.open_connections == 3


async def test_an_agent_with_a_certificate_has_no_first_frame_deadline(
    store: FlakyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    opened: list[FramedClient],
) -> None:
    """With TLS on the handshake proved who it is: it may stay silent, crowd or not. (Real
    sockets under a MockClock that moves only when told.)"""
    certs = tmp_path / "certs"
    generate(certs)
    await store.inner.add_hosts(M1, [A])
    config = DnsConfig(listen="127.0.0.1:0", max_connections=2, first_frame_timeout=1.0)
    server = DnsServer(config, store, tls=tls_contexts(certs, "dns"))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(server.serve)
        agents = [await tls_client(port, tls_contexts(certs, "agent"), opened) for _ in range(2)]
        assert server.gate.open_connections == 2  # the second arrived in a crowd
        mock_clock.jump(1800.0)
        for agent in agents:
            assert await route(agent, M1) == {A}
        assert server.metrics.counters["frame_timeouts"] == 0
        nursery.cancel_scope.cancel()


# --- the control rate -----------------------------------------------------------------------


async def test_change_notices_over_the_rate_are_dropped_and_the_connection_stays(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    await store.inner.add_hosts(M1, [A])
    async with dns_behind(store, control_rate=20.0, control_burst=50) as (server, listener):
        admin = listener.connect()
        started = trio.current_time()
        await admin.send(*(wire.RouteChangeNotice(1) for _ in range(80)))
        await trio.testing.wait_all_tasks_blocked()
        assert server.metrics.counters["change_notices"] == 50
        assert server.metrics.counters["rate_limited"] == 30
        # The connection stays; it is read again once its bucket is full (50 / 20 s).
        assert await route(admin, M1) == {A}
        assert trio.current_time() - started == pytest.approx(2.5)
        await admin.send(wire.RouteChangeNotice(2))
        await trio.testing.wait_all_tasks_blocked()
        assert server.metrics.counters["change_notices"] == 51
        exposed = generate_latest(server.registry).decode()
        assert "lars_dns_rate_limited_total 30.0" in exposed


@ROLES
async def test_stats_requests_over_the_rate_are_dropped(
    kind: str, store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with either_role(kind, store, control_rate=1.0, control_burst=3) as (server, listener):
        client = listener.connect()
        await client.send(*(wire.StatsRequest(seq) for seq in range(1, 6)))
        answered = [await client.receive() for _ in range(3)]
        assert [m.seq for m in answered] == [1, 2, 3]  # type: ignore[attr-defined]
        assert (await stats(client, 9))["rate_limited"] == 2  # answered after the pause
        assert server.metrics.counters["rate_limited"] == 2


async def test_a_flood_is_read_in_small_bites(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    """After going over its rate a connection is read a few KB per pause: a flood of
    notices costs the DNS a few hundred decodes per pause, not all it sends."""
    async with dns_behind(store, control_rate=20.0, control_burst=50) as (server, listener):
        flooder = listener.connect()
        frame = wire.encode_frame(wire.RouteChangeNotice(1))
        await flooder.send_raw(frame * 100)  # over the burst: throttled from now on
        await trio.testing.wait_all_tasks_blocked()
        await flooder.send_raw(frame * 100_000)
        await trio.sleep(2.5 * 10)  # ten pauses
        decoded = (
            server.metrics.counters["change_notices"] + server.metrics.counters["rate_limited"]
        )
        assert decoded - 100 <= 11 * math.ceil(THROTTLED_RECEIVE_SIZE / len(frame))
        # ... and still served at its rate: a full burst after each pause.
        assert server.metrics.counters["change_notices"] >= 50 + 9 * 50
        assert server.gate.open_connections == 1


# --- accept() out of resources ----------------------------------------------------------------


async def test_accept_errors_back_off_and_are_logged_once(
    store: FlakyStore, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    listener = MemoryListener([emfile] * 5 + [None, emfile])
    with caplog.at_level(logging.ERROR, "lars.dns"):
        async with dns_behind(store, listener) as (server, _):
            started = trio.current_time()
            await stats(listener.connect())
            waited = trio.current_time() - started
            # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s, each up to 20% shorter (jitter)
            assert 0.8 * 3.1 <= waited <= 3.1
            # A success resets the backoff: the next error costs 0.1 s again.
            started = trio.current_time()
            await stats(listener.connect())
            assert 0 < trio.current_time() - started <= 0.1
            assert server.metrics.counters["accept_errors"] == 6
    lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "Too many open files" in lines[0]


async def test_the_accept_backoff_stops_at_five_seconds(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    listener = MemoryListener([OSError(errno.ENFILE, "Too many open files in system")] * 12)
    async with dns_behind(store, listener) as (server, _):
        started = trio.current_time()
        await stats(listener.connect())
        waited = trio.current_time() - started
        capped = 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 6 * 5.0
        assert 0.8 * capped <= waited <= capped
        assert server.metrics.counters["accept_errors"] == 12


async def test_other_accept_errors_are_not_swallowed(store: FlakyStore) -> None:
    server = DnsServer(DnsConfig(), store)
    listener = MemoryListener([OSError(errno.EBADF, "Bad file descriptor")])
    with pytest.raises(ExceptionGroup) as raised:
        await server.gate.serve(listener, server.handle_connection)
    assert raised.group_contains(OSError, match="Bad file descriptor")


def test_an_agent_api_beyond_loopback_needs_allow_remote_api() -> None:
    import attrs as _attrs

    from lars.config import AgentConfig, Config
    from lars.errors import ConfigError
    from lars.roles.run import check_transport

    public = Config(agent=AgentConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="allow_remote_api"):
        check_transport(public, ["agent"])
    check_transport(
        _attrs.evolve(public, agent=AgentConfig(host="0.0.0.0", allow_remote_api=True)), ["agent"]
    )
    check_transport(Config(), ["agent", "dns", "reporter"])  # loopback: nothing to refuse


async def test_the_control_rate_is_per_peer_not_per_connection(
    store: FlakyStore, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that opens a connection per notice gets no fresh burst with each."""
    async with dns_behind(store, control_rate=20.0, control_burst=50) as (server, listener):
        for _ in range(4):
            conn = listener.connect()  # every test connection is the same peer
            await conn.send(*(wire.RouteChangeNotice(1) for _ in range(20)))
            await trio.testing.wait_all_tasks_blocked()
        assert server.metrics.counters["change_notices"] == 50
        assert server.metrics.counters["rate_limited"] == 30
