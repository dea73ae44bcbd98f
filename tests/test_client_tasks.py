"""One AsyncLarsClient shared by many trio tasks: against a real agent in process, and
against a scripted agent that answers out of order, with stale replies, or not at all."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from lars import wire
from lars.client import AsyncLarsClient
from lars.config import AgentConfig
from lars.core.model import Host, HostKey, ModuleKey
from lars.errors import AgentUnavailable, NoRoute
from lars.roles.agent import Agent
from tests.fakes import FramedClient
from tests.netutil import free_tcp_port, free_udp_base

#: Modules on all three ports, each with hosts of its own, so every answer tells whose it is.
ROUTES: dict[ModuleKey, tuple[HostKey, ...]] = {
    (1, cmdid): tuple((0x0A000000 + cmdid * 256 + i, 7000 + cmdid) for i in range(1, 1 + cmdid))
    for cmdid in range(1, 7)
}
UNKNOWN = (1, 99)


async def serve_fake_dns(
    routes: dict[ModuleKey, tuple[HostKey, ...]], *, task_status: trio.TaskStatus[int]
) -> None:
    """A DNS stand-in: answers every GetRouteRequest from ``routes`` (empty: no such module)."""

    async def handle(stream: trio.SocketStream) -> None:
        peer = FramedClient(stream)
        async with stream:
            while True:
                try:
                    msg = await peer.receive()
                except (EOFError, trio.BrokenResourceError):
                    return
                if isinstance(msg, wire.GetRouteRequest):
                    key = (msg.modid, msg.cmdid)
                    await peer.send(wire.GetRouteResponse(*key, routes.get(key, ())))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@asynccontextmanager
async def agent_and_client() -> AsyncIterator[AsyncLarsClient]:
    """A real agent (fake DNS, no reporter) on free ports, and one client of it."""
    async with trio.open_nursery() as nursery:
        dns_port = await nursery.start(serve_fake_dns, ROUTES)
        base = free_udp_base(3)
        config = AgentConfig(
            base_port=base,
            dns=[f"127.0.0.1:{dns_port}"],
            reporter=f"127.0.0.1:{free_tcp_port()}",  # nothing listens: statistics wait
        )
        await nursery.start(Agent(config).serve)
        async with AsyncLarsClient(base_port=base, timeout=2.0, retries=2) as client:
            yield client
        nursery.cancel_scope.cancel()


async def test_100_tasks_share_one_client_and_each_gets_its_own_answers() -> None:
    modules = sorted(ROUTES)
    answered: list[int] = []

    async def task(index: int) -> None:
        for round_ in range(10):
            module = modules[(index + round_) % len(modules)]
            host = await client.get_host(*module)
            assert host.key in ROUTES[module]
            hosts = await client.get_route(*module)
            assert sorted(h.key for h in hosts) == sorted(ROUTES[module])
            if round_ % 5 == index % 5:
                with pytest.raises(NoRoute):
                    await client.get_host(*UNKNOWN)
            answered.append(index)

    async with agent_and_client() as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(100):
                    nursery.start_soon(task, index)
    assert len(answered) == 1000


# --- a scripted agent ------------------------------------------------------------------------

A = (167772161, 7001)
B = (167772162, 7002)
#: Two modules served by the same port ((1 + 1) % 3 == (1 + 4) % 3), so by one socket.
M1, M4 = (1, 1), (1, 4)


#: What the scripted agent does with a request: datagrams to send back, and pauses (seconds).
Script = Callable[[wire.Message], list[bytes | float]]


class ScriptedAgent:
    """UDP sockets on base..base+2 in a thread; ``script(msg)`` says what to send back to the
    sender of ``msg``: datagrams, with pauses between them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.base = free_udp_base(3)
        self.received: list[wire.Message] = []
        self.sockets = []
        for i in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", self.base + i))
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select(self.sockets, [], [], 0.02)
            for sock in readable:
                data, address = sock.recvfrom(65536)
                msg = wire.decode_datagram(data)
                self.received.append(msg)
                for reply in self.script(msg):
                    if isinstance(reply, float):
                        time.sleep(reply)
                    else:
                        sock.sendto(reply, address)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedAgent]]:
    agents: list[ScriptedAgent] = []

    def start(script: Script) -> ScriptedAgent:
        agents.append(ScriptedAgent(script))
        return agents[-1]

    yield start
    for agent in agents:
        agent.close()


def host_reply(msg: wire.GetHostRequest, seq: int | None = None) -> bytes:
    host = A if (msg.modid, msg.cmdid) == M1 else B
    reply = wire.GetHostResponse(msg.seq if seq is None else seq, msg.modid, msg.cmdid, 0, host)
    return wire.encode_datagram(reply)


async def test_replies_in_the_wrong_order_reach_the_right_tasks(
    scripted: Callable[[Script], ScriptedAgent],
) -> None:
    held: list[wire.GetHostRequest] = []

    def script(msg: wire.Message) -> list[bytes | float]:
        assert isinstance(msg, wire.GetHostRequest)
        held.append(msg)
        if len(held) < 2:
            return []  # hold the first request until the second arrives: answer both, reversed
        return [host_reply(m) for m in reversed(held)]

    agent = scripted(script)
    got: dict[ModuleKey, Host] = {}
    async with AsyncLarsClient(base_port=agent.base, timeout=2.0, retries=0) as client:

        async def ask(module: ModuleKey) -> None:
            got[module] = await client.get_host(*module)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, M1)
                await trio.sleep(0.05)
                nursery.start_soon(ask, M4)
    assert got == {M1: Host.from_key(A), M4: Host.from_key(B)}


async def test_the_reader_hands_over_when_its_own_reply_came_first(
    scripted: Callable[[Script], ScriptedAgent],
) -> None:
    held: list[wire.GetHostRequest] = []

    def script(msg: wire.Message) -> list[bytes | float]:
        assert isinstance(msg, wire.GetHostRequest)
        held.append(msg)
        if len(held) < 2:
            return []
        # The first task (the reader) gets its reply; the second's comes once it is alone.
        return [host_reply(held[0]), 0.1, host_reply(held[1])]

    agent = scripted(script)
    got: dict[ModuleKey, Host] = {}
    async with AsyncLarsClient(base_port=agent.base, timeout=3.0, retries=0) as client:

        async def ask(module: ModuleKey) -> None:
            got[module] = await client.get_host(*module)

        with trio.fail_after(1):  # well before the timeout: the second task became the reader
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, M1)
                await trio.sleep(0.05)
                nursery.start_soon(ask, M4)
    assert got == {M1: Host.from_key(A), M4: Host.from_key(B)}


async def test_stale_replies_with_another_seq_are_discarded(
    scripted: Callable[[Script], ScriptedAgent],
) -> None:
    def script(msg: wire.Message) -> list[bytes | float]:
        assert isinstance(msg, wire.GetHostRequest)
        # First a reply to a request nobody waits for (an earlier one that timed out), with
        # the other module's host, then garbage, then the real reply.
        other = wire.GetHostRequest(msg.seq, *(M4 if (msg.modid, msg.cmdid) == M1 else M1))
        stale = host_reply(other, seq=(msg.seq + 1_000_000) & 0xFFFF_FFFF)
        return [stale, b"\xc1garbage", host_reply(msg)]

    agent = scripted(script)
    async with AsyncLarsClient(base_port=agent.base, timeout=2.0, retries=0) as client:

        async def ask(module: ModuleKey, expected: HostKey) -> None:
            for _ in range(20):
                assert (await client.get_host(*module)).key == expected

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    if i % 2:
                        nursery.start_soon(ask, M1, A)
                    else:
                        nursery.start_soon(ask, M4, B)
    assert len(agent.received) == 200


async def test_concurrent_requests_without_answers_each_time_out(
    scripted: Callable[[Script], ScriptedAgent],
) -> None:
    agent = scripted(lambda msg: [])
    failures: list[BaseException] = []
    async with AsyncLarsClient(base_port=agent.base, timeout=0.05, retries=1) as client:

        async def ask() -> None:
            try:
                await client.get_host(*M1)
            except AgentUnavailable as exc:
                failures.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(ask)
    assert len(failures) == 8
    with trio.fail_after(2):
        while len(agent.received) < 16:
            await trio.sleep(0.01)
    await trio.sleep(0.05)  # room for more, which must not come
    assert len(agent.received) == 16  # each: the first try and one retry, same seq
    assert len({m.seq for m in agent.received}) == 8  # type: ignore[attr-defined]


async def test_a_late_reply_is_taken_by_its_retry_while_others_wait(
    scripted: Callable[[Script], ScriptedAgent],
) -> None:
    seen: list[int] = []

    def script(msg: wire.Message) -> list[bytes | float]:
        assert isinstance(msg, wire.GetHostRequest)
        seen.append(msg.seq)
        if (msg.modid, msg.cmdid) == M4:
            return []  # M4 is never answered
        return [] if seen.count(msg.seq) == 1 else [host_reply(msg)]  # M1: only its retry

    agent = scripted(script)
    async with AsyncLarsClient(base_port=agent.base, timeout=0.1, retries=2) as client:
        results: dict[ModuleKey, object] = {}

        async def ask(module: ModuleKey) -> None:
            try:
                results[module] = await client.get_host(*module)
            except AgentUnavailable as exc:
                results[module] = exc

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, M4)  # starts first: it is the reader when M1 asks
                await trio.sleep(0.01)
                nursery.start_soon(ask, M1)
    assert results[M1] == Host.from_key(A)
    assert isinstance(results[M4], AgentUnavailable)


async def test_closing_the_client_wakes_every_waiting_task_with_a_clear_error(
    scripted: Callable[[Script], ScriptedAgent],
) -> None:
    agent = scripted(lambda msg: [])
    client = AsyncLarsClient(base_port=agent.base, timeout=10.0, retries=0)
    errors: list[BaseException] = []

    async def ask(module: ModuleKey) -> None:
        try:
            await client.get_host(*module)
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(ask, M1 if i % 2 else (1, 2))  # two sockets
            while len(agent.received) < 6:
                await trio.sleep(0.01)
            client.close()
    assert len(errors) == 6
    assert all("closed" in str(exc) for exc in errors)
    with pytest.raises(trio.ClosedResourceError, match="closed"):
        await client.get_host(*M1)
