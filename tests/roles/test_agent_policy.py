"""The agent's and the client's side of the scheduling policies (issue 14): get_host with a
hash key (GetHostKeyRequest), reports with a latency (on requests and alone), the explain
state, and clients that meet an agent from before them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio

from lars import wire
from lars.client import AsyncLarsClient, LarsClient
from lars.config import AgentConfig
from lars.core.balancer import BalancerParams
from lars.core.model import Host, HostMeta, PolicySpec
from lars.errors import InvalidValue, ProtocolError
from lars.roles.agent import Agent
from tests.netutil import free_tcp_port, free_udp_base

A = (167772161, 7001)
B = (167772162, 7002)
C = (167772163, 7003)
M = (1, 1)
CLIENT = ("127.0.0.1", 45000)


def agent(policy: str = "hash", **config: object) -> Agent:
    lb = BalancerParams(policy=policy)
    return Agent(AgentConfig(loadbalance=lb, **config))  # type: ignore[arg-type]


def decode(data: bytes | None) -> wire.Message:
    assert data is not None
    return wire.decode_datagram(data)


# --- the wire --------------------------------------------------------------------------------


def test_get_host_key_request_fast_path_matches_the_general_one() -> None:
    reports = [(1, 1, A[0], A[1], 0), (1, 1, B[0], B[1], 1, 2500), (1, 1, C[0], C[1], 0, None)]
    data = wire.encode_get_host_key_request(7, 1, 2, b"user-1", reports)
    assert data == wire.encode_datagram(
        wire.GetHostKeyRequest(7, 1, 2, b"user-1", tuple(map(tuple, reports)))
    )
    fast = wire.decode_agent_request(data)
    general = wire.decode_datagram(data)
    assert isinstance(general, wire.GetHostKeyRequest)
    assert fast == (17, 7, 1, 2, b"user-1", tuple(reports))
    assert general.reports == tuple(reports)
    assert wire.decode_agent_request(wire.encode_get_host_key_request(7, 1, 2, None, [])) == (
        17,
        7,
        1,
        2,
        None,
        (),
    )


@pytest.mark.parametrize(
    "body",
    [
        [17, 7, 1, 2, b"x" * 257, []],  # key too long
        [17, 7, 1, 2, b"k", [[1, 1, 1, 0, 0]]],  # port 0
        [17, 7, 1, 2, b"k", [[1, 1, 1, 80, 0, -1]]],  # negative latency
        [18, 1, 1, [1, 80], 0, 2**32],  # latency beyond uint32
    ],
)
def test_bad_policy_requests_are_refused(body: list[object]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_agent_request(msgpack.packb(body))


def test_timed_report_request_round_trips() -> None:
    data = wire.encode_timed_report_request(1, 2, A, 0, 1500)
    assert decode(data) == wire.TimedReportRequest(1, 2, A, 0, 1500)


# --- the agent, one datagram at a time -------------------------------------------------------


async def test_a_keyed_get_host_takes_its_reports_then_keeps_the_key_on_one_host() -> None:
    a = agent("hash")
    a.table.apply_route(M, [A, B, C], time.monotonic())
    hosts = set()
    for seq in range(20):
        reply = decode(
            a.handle_datagram(
                wire.encode_get_host_key_request(seq, 1, 1, b"user-7", [(1, 1, *A, 0, 4000)]),
                CLIENT,
            )
        )
        assert isinstance(reply, wire.GetHostResponse) and reply.retcode == 0
        hosts.add(reply.host)
    assert len(hosts) == 1
    st = a.table.modules[M].hosts[A]
    assert st.latency.value == pytest.approx(0.004)
    assert st.vsucc == 180 + 20  # the reports were counted


async def test_a_timed_report_alone_feeds_the_latency() -> None:
    a = agent("p2c")
    a.table.apply_route(M, [A, B], time.monotonic())
    assert a.handle_datagram(wire.encode_timed_report_request(1, 1, B, 1, 9000), CLIENT) is None
    st = a.table.modules[M].hosts[B]
    assert st.latency.value == pytest.approx(0.009)
    assert st.verr == 1


async def test_agent_state_request_with_explain_adds_the_scheduling() -> None:
    a = agent("weighted", zone="eu")
    meta = {A: HostMeta(300, "eu"), B: HostMeta(100, "us")}
    a.table.apply_route(M, [A, B], time.monotonic(), meta=meta)
    request = wire.encode_datagram(wire.AgentStateRequest(3, 1, 1, 0, 1))
    reply = decode(a.handle_datagram(request, CLIENT))
    assert isinstance(reply, wire.AgentStateResponse)
    state = reply.state
    assert state["policy"]["policy"] == "weighted"
    assert state["agent_zone"] == "eu"
    assert {h["host"]: h["share"] for h in state["hosts"]} == {
        "10.0.0.1:7001": 0.75,
        "10.0.0.2:7002": 0.25,
    }
    # the plain request (agents before level 3 take only this form) has none of it
    plain = decode(a.handle_datagram(msgpack.packb([10, 4, 1, 1, 0]), CLIENT))
    assert isinstance(plain, wire.AgentStateResponse) and "policy" not in plain.state


async def test_the_module_policy_from_the_route_beats_the_agent_default() -> None:
    a = agent("rr")
    a.table.apply_route(M, [A, B, C], time.monotonic(), policy=PolicySpec("hash"))
    replies = {
        decode(a.handle_datagram(wire.encode_get_host_key_request(s, 1, 1, b"k", []), CLIENT)).host  # type: ignore[attr-defined]
        for s in range(10)
    }
    assert len(replies) == 1


# --- with a client -----------------------------------------------------------------------------


@asynccontextmanager
async def served(a: Agent) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(a.serve)
        await trio.sleep(0.2)  # the API thread starts (sync clients block this thread)
        try:
            yield ports[0]
        finally:
            nursery.cancel_scope.cancel()


def config(policy: str) -> dict[str, object]:
    return {
        "base_port": free_udp_base(1),
        "ports": 1,
        "dns": [f"127.0.0.1:{free_tcp_port()}"],  # nothing there: the routes are set here
        "reporter": f"127.0.0.1:{free_tcp_port()}",
        "http_listen": "",
    }


async def test_the_client_sends_keys_and_latencies() -> None:
    a = agent("hash", **config("hash"))
    a.table.apply_route(M, [A, B, C], time.monotonic())
    async with served(a) as port:
        with LarsClient(base_port=port, ports=1, timeout=0.5) as client:
            first = client.get_host(1, 1, key="user-1")
            assert all(client.get_host(1, 1, key="user-1") == first for _ in range(20))
            assert client.get_host(1, 1, key=b"user-1") == first  # str is its UTF-8
            with client.call(1, 1, key="user-1") as host:
                busy = time.perf_counter() + 0.002
                while time.perf_counter() < busy:
                    pass
            client.report(1, 1, host, ok=True, latency=0.0031)
            client.get_host(1, 1)  # the reports ride on it
            with pytest.raises(InvalidValue):
                client.get_host(1, 1, key="x" * 300)
            with pytest.raises(InvalidValue):
                client.report(1, 1, host, ok=True, latency=-1.0)
        st = a.table.modules[M].hosts[(167772161 + int(host.ip.split(".")[-1]) - 1, host.port)]
        assert st.latency.value is not None and st.latency.value >= 0.002


async def test_the_async_client_sends_keys_and_latencies() -> None:
    a = agent("hash", **config("hash"))
    a.table.apply_route(M, [A, B, C], time.monotonic())
    async with served(a) as port, AsyncLarsClient(base_port=port, ports=1, timeout=0.5) as client:
        first = await client.get_host(1, 1, key="user-1")
        for _ in range(10):
            assert await client.get_host(1, 1, key="user-1") == first
        await client.report(1, 1, Host("10.0.0.2", 7002), ok=False, latency=0.25)
        await trio.sleep(0.1)
    st = a.table.modules[M].hosts[B]
    assert st.latency.value == pytest.approx(0.25)
    assert st.verr == 1


async def test_a_client_meeting_an_agent_from_before_sends_what_it_takes() -> None:
    a = agent("rr", **config("rr"))
    a.metrics.set("api_level", wire.API_LEVEL_PIGGYBACK)  # an agent of before issue 14
    a.table.apply_route(M, [A, B], time.monotonic())
    async with served(a) as port:
        with LarsClient(base_port=port, ports=1, timeout=0.5) as client:
            hosts = [client.get_host(1, 1, key="k") for _ in range(4)]
            assert len(set(hosts)) == 2  # the key is not sent: round robin
            with client.call(1, 1):
                pass
            client.get_host(1, 1)
        await trio.sleep(0.05)
    assert a.metrics.counters.get("invalid_requests", 0) == 0
    assert a.metrics.counters.get("malformed_datagrams", 0) == 0
    assert a.table.reports[1] == 1  # the report arrived, without its latency
