"""The agent's API in the original Lars format: the same table, balancers and statistics as
Lars's own, each request answered in the format it came in."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
import trio

from lars import wire
from lars import wire_original as wo
from lars.client import AsyncLarsClient
from lars.config import AgentConfig
from lars.roles.agent import Agent, AgentCollector, port_for
from tests.roles.test_agent import CLIENT, A, B, C, M, stack


def agent(**config: object) -> Agent:
    return Agent(AgentConfig(**config))  # type: ignore[arg-type]


def ask(a: Agent, msg: wire.Message) -> wire.Message | None:
    reply = a.handle_datagram(wo.encode(msg), CLIENT)
    return None if reply is None else wo.decode_datagram(reply)


async def test_get_host_and_report_in_the_original_format_share_lars_balancer() -> None:
    a = agent()
    a.table.apply_route(M, [A, B], time.monotonic())
    hosts = []
    for seq in range(4):
        if seq % 2:  # Lars's own client and an original one take turns on one balancer
            reply = wire.decode_datagram(
                a.handle_datagram(wire.encode_get_host_request(seq, *M), CLIENT) or b""
            )
        else:
            reply = ask(a, wire.GetHostRequest(seq, *M))  # type: ignore[assignment]
        assert isinstance(reply, wire.GetHostResponse)
        assert (reply.seq, reply.modid, reply.cmdid, reply.retcode) == (seq, *M, 0)
        hosts.append(reply.host)
    assert hosts == hosts[:2] * 2 and set(hosts) == {A, B}
    for _ in range(15):  # contin_err_limit: 15 failures in a row overload a host
        assert ask(a, wire.ReportRequest(*M, B, 1)) is None
    assert a.table.modules[M].overloaded == [B]
    assert a.table.get_host_answers[0] == 4
    assert a.table.reports == [15, 0]
    assert a.metrics.counters["original_requests"] == 17


async def test_api_get_route_in_the_original_format() -> None:
    a = agent(route_wait=0)
    a.table.apply_route(M, [C, A, B], time.monotonic())
    reply = ask(a, wire.ApiGetRouteRequest(0, *M))
    assert isinstance(reply, wire.ApiGetRouteResponse)
    assert sorted(reply.hosts) == [A, B, C]
    # An unknown module, with no wait: the original's answer, an empty route.
    assert ask(a, wire.ApiGetRouteRequest(0, 5, 5)) == wire.ApiGetRouteResponse(0, 5, 5, 0, ())
    assert ask(a, wire.GetHostRequest(7, 5, 5)) == wire.GetHostResponse(7, 5, 5, 3, None)


async def test_ids_and_ips_above_2_to_the_31_come_back_as_they_were_sent() -> None:
    a = agent()
    module, host = (2**32 - 2, 2**31), (0xC0A801B1, 65535)
    a.table.apply_route(module, [host], time.monotonic())
    reply = a.handle_datagram(wo.encode(wire.GetHostRequest(2**32 - 1, *module)), CLIENT)
    assert reply is not None
    # The original client compares the reply's int32 modid with the one it sent.
    assert struct.unpack_from("<ii", reply) == (wo.GET_HOST_RESPONSE, len(reply) - 8)
    assert wo.decode_datagram(reply) == wire.GetHostResponse(2**32 - 1, *module, 0, host)


@pytest.mark.parametrize(
    ("data", "counter"),
    [
        (b"", "malformed_datagrams"),
        (b"\x04\x00\x00", "malformed_datagrams"),  # shorter than the header
        (struct.pack("<ii", 4, 5) + b"\x08\x01", "malformed_datagrams"),  # msglen lies
        (struct.pack("<ii", 4, -1), "malformed_datagrams"),
        (struct.pack("<ii", 4, 2) + b"\x08\x80", "malformed_datagrams"),  # truncated varint
        (struct.pack("<ii", 6, 1) + b"\x0e", "malformed_datagrams"),  # wire type 6
        (wo.encode(wire.GetRouteRequest(1, 1)), "malformed_datagrams"),  # not for the agent
        (wo.encode(wire.GetHostResponse(1, 1, 1, 0, A)), "malformed_datagrams"),
        (struct.pack("<ii", 6, 2) + b"\x08\x01", "invalid_requests"),  # a report without host
    ],
)
async def test_bad_datagrams_in_the_original_format_are_counted_and_dropped(
    data: bytes, counter: str
) -> None:
    a = agent()
    a.table.apply_route(M, [A], time.monotonic())
    assert a.handle_datagram(data, CLIENT) is None
    assert a.metrics.counters[counter] == 1
    assert a.metrics.counters["internal_errors"] == 0
    assert ask(a, wire.GetHostRequest(1, *M)) == wire.GetHostResponse(1, *M, 0, A)


async def test_an_internal_error_answers_the_original_client_which_has_no_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = agent()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(a.table, "get_host", broken)
    monkeypatch.setattr(a.table, "get_route", broken)
    assert ask(a, wire.GetHostRequest(3, *M)) == wire.GetHostResponse(3, *M, 2, None)
    assert ask(a, wire.ApiGetRouteRequest(0, *M)) == wire.ApiGetRouteResponse(0, *M, 0, ())
    assert a.metrics.counters["internal_errors"] == 2


async def test_the_original_requests_are_a_metric() -> None:
    a = agent()
    a.table.apply_route(M, [A], time.monotonic())
    ask(a, wire.GetHostRequest(1, *M))
    metrics = {m.name: m for m in AgentCollector(a, 10).collect()}
    assert metrics["lars_agent_original_requests"].samples[0].value == 1
    samples = {tuple(s.labels.values()): s.value for s in metrics["lars_agent_requests"].samples}
    assert samples["get_host", "succ"] == 1


# --- waiting for the route, over loopback -------------------------------------------------------


def waiting(agent_: Agent, module: tuple[int, int]) -> int:
    return len(agent_.table.pending[module].waiters)


class OriginalApi:
    """What the original lars_api does, in Python: one connected UDP socket per agent port."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.socks = []
        for i in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(("127.0.0.1", base + i))
            sock.setblocking(False)
            self.socks.append(sock)

    def sock(self, modid: int, cmdid: int) -> socket.socket:
        return self.socks[port_for((modid, cmdid), 0, 3)]

    async def send(self, msg: wire.ApiGetRouteRequest | wire.GetHostRequest) -> None:
        self.sock(msg.modid, msg.cmdid).send(wo.encode(msg))

    async def receive(self, modid: int, cmdid: int) -> wire.Message:
        sock = self.sock(modid, cmdid)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(sock)
        return wo.decode_datagram(sock.recv(65536))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


async def test_requests_that_wait_for_the_route_are_answered_in_their_own_format(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, {M: [A]}, route_wait=5.0) as (_, dns, agent_, _):
        original = OriginalApi(agent_.config.base_port)
        lars = AsyncLarsClient(base_port=agent_.config.base_port, timeout=5.0, retries=1)
        try:
            module = (4, 4)
            dns.scope.cancel()  # type: ignore[attr-defined]  # no DNS: the requests wait
            with trio.fail_after(5):
                while agent_.dns_address is not None:
                    await trio.sleep(0.01)
            await original.send(wire.GetHostRequest(11, *module))
            await original.send(wire.ApiGetRouteRequest(0, *module))
            async with trio.open_nursery() as nursery:
                got: list[object] = []

                async def lars_get_host() -> None:
                    got.append(await lars.get_host(*module))

                nursery.start_soon(lars_get_host)
                with trio.fail_after(5):
                    while module not in agent_.table.pending or waiting(agent_, module) < 3:
                        await trio.sleep(0.01)
                agent_._dns_message(wire.GetRouteResponse(*module, (B,)))  # as if from DNS
            assert [h.key for h in got] == [B]  # type: ignore[attr-defined]
            replies = [await original.receive(*module) for _ in range(2)]
            assert wire.GetHostResponse(11, *module, 0, B) in replies
            assert wire.ApiGetRouteResponse(0, *module, 0, (B,)) in replies
        finally:
            lars.close()
            original.close()
