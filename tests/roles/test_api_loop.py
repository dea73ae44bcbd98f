"""The agent's API receive loop, compiled (lars/_udploop.c) and in Python: both serve real
sockets the same way. The Python loop's polling decisions are also checked step by step
with scripted sockets in test_agent.py."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
import trio

from lars import wire
from lars import wire_original as wo
from lars.config import AgentConfig
from lars.roles import agent as agent_module
from lars.roles.agent import Agent, port_for

with contextlib.suppress(ImportError):  # the tests that need it fail, saying so
    from lars import _udploop
from tests.netutil import free_udp_base

M = (1, 1)
A = (167772161, 7001)


def test_ci_has_the_compiled_loop() -> None:
    """CI sets LARS_REQUIRE_COMPILED: there the compiled loop must have been built."""
    if os.environ.get("LARS_REQUIRE_COMPILED"):
        assert agent_module.COMPILED_LOOP


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    return sock


async def test_requests_on_every_port_are_answered_and_reports_counted(api_loop: str) -> None:
    base = free_udp_base(3)
    a = Agent(AgentConfig(base_port=base, ports=3, route_wait=0.0))
    modules = [(1, 1), (1, 2), (1, 3)]  # one on each port
    assert sorted(port_for(m, base, 3) for m in modules) == [base, base + 1, base + 2]
    for module in modules:
        a.table.apply_route(module, [A], time.monotonic())
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)

        def talk() -> list[object]:
            got: list[object] = []
            with _client() as sock:
                for seq, module in enumerate(modules * 20):
                    port = port_for(module, base, 3)
                    sock.sendto(wire.encode_get_host_request(seq, *module), ("127.0.0.1", port))
                    reply = wire.decode_datagram(sock.recv(65536))
                    assert isinstance(reply, wire.GetHostResponse) and reply.seq == seq
                    got.append(reply.host)
                    # Every other one reported in the original's format, alone.
                    report = wo.encode(wire.ReportRequest(*module, A, 0))
                    sock.sendto(report, ("127.0.0.1", port))
                sock.sendto(b"\xff\x00", ("127.0.0.1", base))  # malformed
                # An unknown module, answered at once (route_wait 0): the loop goes on.
                sock.sendto(wire.encode_get_host_request(999, 9, 9), ("127.0.0.1", base))
                reply = wire.decode_datagram(sock.recv(65536))
                assert isinstance(reply, wire.GetHostResponse) and reply.seq == 999
                got.append(reply.retcode)
            return got

        got = await trio.to_thread.run_sync(talk)
        assert got[:60] == [A] * 60
        assert got[60] == wire.RetCode.NOEXIST
        with trio.fail_after(2):
            while sum(a.table.reports) < 60:
                await trio.sleep(0.01)
        assert a.table.reports == [0, 60]
        assert a.metrics.counters["malformed_datagrams"] == 1
        started = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - started < 1.0  # stopped within STOP_CHECK


def _non_loopback_ipv4() -> str:
    """A local address that is not 127/8 (the source of the route to a TEST-NET address;
    no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
        except OSError as exc:
            pytest.fail(f"this test needs a non-loopback IPv4 address: {exc}")
        address: str = probe.getsockname()[0]
    assert not address.startswith("127."), address
    return address


def test_the_compiled_loop_answers_this_host_only_on_a_loopback_port() -> None:
    """Run directly with the port marked loopback-only and bound to every address: a
    datagram from another address goes to ``foreign``, one from 127/8 is answered."""
    if not agent_module.COMPILED_LOOP:
        pytest.fail("lars._udploop is not built")
    other = _non_loopback_ipv4()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 0))
    port = server.getsockname()[1]
    stop = threading.Event()
    foreign: list[object] = []
    handled: list[tuple[bytes, object]] = []

    def handle(data: bytes, address: object, sock: socket.socket) -> bytes | None:
        assert sock is server
        handled.append((data, address))
        stop.set()
        return b"answer:" + data

    thread = threading.Thread(
        target=_udploop.serve,
        args=([server], handle, [True], 0.0, 0.0, 2, 1024, stop.is_set, foreign.append,
              lambda: None, 0.05),
    )  # fmt: skip
    thread.start()
    try:
        with _client() as outsider, _client() as local:
            outsider.bind((other, 0))
            outsider.sendto(b"from outside", (other, port))
            deadline = time.monotonic() + 2
            while not foreign and time.monotonic() < deadline:
                time.sleep(0.01)
            local.sendto(b"hello", ("127.0.0.1", port))
            assert local.recv(100) == b"answer:hello"
    finally:
        stop.set()
        thread.join(2)
        server.close()
    assert not thread.is_alive()
    assert [address[0] for address in foreign] == [other]  # type: ignore[index]
    assert [data for data, _ in handled] == [b"hello"]
    assert handled[0][1][0] == "127.0.0.1"  # type: ignore[index]


def test_the_compiled_loop_reports_a_failing_socket() -> None:
    if not agent_module.COMPILED_LOOP:
        pytest.fail("lars._udploop is not built")
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.close()
    with pytest.raises(OSError):
        _udploop.serve(
            [server], lambda *_: None, [True], 0.0, 0.0, 2, 1024, lambda: False,
            lambda _: None, lambda: None, 0.05,
        )  # fmt: skip
