"""The agent role in process: datagram handling, and the agent with a real DNS and client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio

from lars import wire
from lars.client import AsyncLarsClient, LarsClient
from lars.config import AgentConfig, DnsConfig
from lars.core.balancer import BalancerParams
from lars.errors import AgentUnavailable, NoRoute, Overloaded
from lars.roles.agent import Agent, port_for
from lars.roles.dns import DnsServer
from lars.store import RouteStore, open_store
from tests.netutil import free_tcp_port, free_udp_base

A = (167772161, 7001)
B = (167772162, 7002)
C = (167772163, 7003)
M = (1, 1)
CLIENT = ("127.0.0.1", 45000)


def agent(**config: object) -> Agent:
    return Agent(AgentConfig(**config))  # type: ignore[arg-type]


def decode(data: bytes | None) -> wire.Message:
    assert data is not None
    return wire.decode_datagram(data)


# --- one datagram at a time ------------------------------------------------------------------


async def test_garbage_datagrams_are_dropped_and_counted() -> None:
    a = agent()
    for data in (b"", b"\xc1", b"hello", msgpack.packb([4, "x", 1, 1]), msgpack.packb({"a": 1})):
        assert a.handle_datagram(data, CLIENT) is None
    assert a.metrics.counters["malformed_datagrams"] == 5


async def test_out_of_range_ids_get_an_error_reply_with_the_seq() -> None:
    a = agent()
    reply = decode(a.handle_datagram(msgpack.packb([4, 77, 2**32, 1]), CLIENT))
    assert isinstance(reply, wire.ErrorReply)
    assert (reply.seq, reply.code) == (77, wire.RetCode.BAD_REQUEST)
    assert "modid" in reply.reason
    assert a.metrics.counters["invalid_requests"] == 1
    assert a.table.want == set()  # nothing was asked of DNS for it


async def test_a_report_with_a_bad_host_is_dropped() -> None:
    a = agent()
    assert a.handle_datagram(msgpack.packb([6, 1, 1, [1, 0], 0]), CLIENT) is None
    assert a.handle_datagram(msgpack.packb([6, 1, 1, [1, 99999], 0]), CLIENT) is None
    assert a.metrics.counters["malformed_datagrams"] == 2


async def test_messages_the_agent_does_not_serve_get_an_error_reply() -> None:
    a = agent()
    reply = decode(a.handle_datagram(wire.encode_datagram(wire.GetRouteRequest(1, 1)), CLIENT))
    assert isinstance(reply, wire.ErrorReply)
    reply = decode(
        a.handle_datagram(wire.encode_datagram(wire.GetHostResponse(5, 1, 1, 0, None)), CLIENT)
    )
    assert isinstance(reply, wire.ErrorReply) and reply.seq == 5


async def test_get_host_on_a_cached_route_and_reports() -> None:
    a = agent(loadbalance=BalancerParams(contin_err_limit=2))
    a.table.apply_route(M, [A, B], time.monotonic())
    seen = []
    for seq in range(4):
        reply = decode(
            a.handle_datagram(wire.encode_datagram(wire.GetHostRequest(seq, *M)), CLIENT)
        )
        assert isinstance(reply, wire.GetHostResponse)
        assert (reply.seq, reply.modid, reply.cmdid, reply.retcode) == (seq, 1, 1, 0)
        seen.append(reply.host)
    assert seen == [seen[0], seen[1]] * 2 and set(seen) == {A, B}
    for _ in range(2):
        assert a.handle_datagram(wire.encode_datagram(wire.ReportRequest(*M, A, 1)), CLIENT) is None
    assert a.table.modules[M].overloaded == [A]


async def test_reports_riding_on_a_get_host_count_in_order_before_the_choice() -> None:
    a = agent(loadbalance=BalancerParams(contin_err_limit=2, contin_succ_limit=1))
    now = time.monotonic()
    a.table.apply_route(M, [A, B], now)
    # Two failures on A overload it: the host chosen for this very request is B.
    request = wire.GetHostReportRequest(1, *M, ((*M, *A, 1), (*M, *A, 7)))
    reply = decode(a.handle_datagram(wire.encode_datagram(request), CLIENT))
    assert isinstance(reply, wire.GetHostResponse) and (reply.seq, reply.host) == (1, B)
    assert a.table.modules[M].overloaded == [A]
    # In order: success, failure, failure overloads B; the reverse order would leave it idle
    # (two failures overload it, the success after them brings it back).
    a.table.apply_route((2, 2), [A, B], now)
    request = wire.GetHostReportRequest(2, 2, 2, ((2, 2, *B, 0), (2, 2, *B, 1), (2, 2, *B, 1)))
    reply = decode(a.handle_datagram(wire.encode_datagram(request), CLIENT))
    assert isinstance(reply, wire.GetHostResponse) and reply.host == A
    assert a.table.modules[(2, 2)].overloaded == [B]


async def test_a_get_host_with_a_bad_report_is_refused_whole() -> None:
    a = agent()
    a.table.apply_route(M, [A], time.monotonic())
    bad = msgpack.packb([16, 9, 1, 1, [[1, 1, A[0], 0, 0]]])  # port 0
    reply = decode(a.handle_datagram(bad, CLIENT))
    assert isinstance(reply, wire.ErrorReply) and reply.seq == 9
    assert reply.code == wire.RetCode.BAD_REQUEST and "port" in reply.reason
    assert (a.table.modules[M].hosts[A].rsucc, a.table.modules[M].hosts[A].rerr) == (0, 0)


async def test_the_agent_says_it_takes_reports_on_requests() -> None:
    a = agent()
    reply = decode(a.handle_datagram(wire.encode_datagram(wire.StatsRequest(5)), CLIENT))
    assert isinstance(reply, wire.StatsResponse)
    assert reply.counters["api_level"] == wire.API_LEVEL_REGISTER  # >= POLICY >= PIGGYBACK


async def test_first_request_for_an_unknown_module_waits_for_dns() -> None:
    a = agent()
    assert a.handle_datagram(wire.encode_datagram(wire.GetHostRequest(1, 9, 9)), CLIENT) is None
    assert a.table.want == {(9, 9)}


async def test_agent_state_and_stats_requests() -> None:
    a = agent()
    reply = decode(a.handle_datagram(wire.encode_datagram(wire.AgentStateRequest(3, *M)), CLIENT))
    assert isinstance(reply, wire.AgentStateResponse)
    assert reply.retcode == wire.RetCode.NOEXIST
    a.table.apply_route(M, [A], time.monotonic())
    reply = decode(a.handle_datagram(wire.encode_datagram(wire.AgentStateRequest(4, *M)), CLIENT))
    assert isinstance(reply, wire.AgentStateResponse)
    assert reply.state["status"] == "ready"
    assert [h["host"] for h in reply.state["hosts"]] == ["10.0.0.1:7001"]
    reply = decode(a.handle_datagram(wire.encode_datagram(wire.StatsRequest(5)), CLIENT))
    assert isinstance(reply, wire.StatsResponse) and reply.counters["modules"] == 1


def test_module_port_rule_is_the_original() -> None:
    assert port_for((1, 1), 8888, 3) == 8890
    assert port_for((0, 0), 8888, 3) == 8888
    assert port_for((2**32 - 1, 2**32 - 1), 8888, 3) == 8888 + (2**33 - 2) % 3


# --- the agent with a DNS and a client, over loopback ----------------------------------------


@asynccontextmanager
async def stack(
    tmp_path: Path, routes: dict[tuple[int, int], list[tuple[int, int]]], **agent_config: object
) -> AsyncIterator[tuple[RouteStore, DnsServer, Agent, AsyncLarsClient]]:
    """Store seeded with ``routes``, a DNS on it, an agent, and a client of the agent."""
    store = open_store(f"sqlite:///{tmp_path}/lars.db", create=True)
    await store.init_schema()
    await store.change_routes(add=routes)
    dns_port = free_tcp_port()
    dns = DnsServer(DnsConfig(listen=f"127.0.0.1:{dns_port}", check_interval=0.1), store)
    base = free_udp_base(3)
    config = {
        "base_port": base,
        "dns": [f"127.0.0.1:{dns_port}"],
        "reporter": f"127.0.0.1:{free_tcp_port()}",  # nothing there: never a default port
        **agent_config,
    }
    the_agent = agent(**config)
    client = AsyncLarsClient(base_port=base, timeout=0.5, retries=2)
    try:
        async with trio.open_nursery() as nursery:
            dns.scope = trio.CancelScope()  # type: ignore[attr-defined]

            async def run_dns(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with dns.scope:  # type: ignore[attr-defined]
                    await dns.serve(task_status=task_status)

            await nursery.start(run_dns)
            await nursery.start(the_agent.serve)
            yield store, dns, the_agent, client
            nursery.cancel_scope.cancel()
    finally:
        client.close()
        await store.aclose()


async def test_client_gets_hosts_round_robin_from_a_route_in_the_store(tmp_path: Path) -> None:
    async with stack(tmp_path, {M: [A, B, C]}) as (_, _, _, client):
        hosts = [await client.get_host(*M) for _ in range(6)]  # the first waits for DNS
        assert hosts[:3] == hosts[3:]
        assert {h.key for h in hosts} == {A, B, C}
        assert sorted(h.key for h in await client.get_route(*M)) == [A, B, C]
        with pytest.raises(NoRoute):
            await client.get_host(2, 2)


async def test_route_changes_reach_the_agent(tmp_path: Path) -> None:
    async with stack(tmp_path, {M: [A]}) as (store, dns, agent_, client):
        assert (await client.get_host(*M)).key == A
        await store.change_routes(add={M: [B]}, remove={M: [A]})
        dns.poke()
        with trio.fail_after(5):
            while sorted(agent_.table.modules[M].hosts) != [B]:
                await agent_.route_received.wait()
        assert [(await client.get_host(*M)).key for _ in range(3)] == [B, B, B]
        await store.remove_hosts(M, None)
        dns.poke()
        with trio.fail_after(5):
            while M in agent_.table.modules:
                await agent_.route_received.wait()
        with pytest.raises(NoRoute):
            await client.get_host(*M)


async def test_failing_host_leaves_rotation_and_all_failing_is_overloaded(tmp_path: Path) -> None:
    async with stack(tmp_path, {M: [A]}) as (_, _, _, client):
        host = await client.get_host(*M)
        for _ in range(15):
            await client.report(*M, host, ok=False)
        await trio.sleep(0.05)  # reports are fire and forget
        with pytest.raises(Overloaded):
            await client.get_host(*M)


async def test_a_sync_clients_reports_ride_on_its_requests_and_all_count(tmp_path: Path) -> None:
    async with stack(tmp_path, {M: [A, B]}) as (_, _, agent_, client):
        await client.get_host(*M)  # the route is in

        def counted() -> int:
            with agent_._lock:
                hosts = agent_.table.modules[M].hosts.values()
                return sum(h.rsucc + h.rerr for h in hosts)

        def work() -> None:
            base = agent_.config.base_port
            sync = LarsClient(base_port=base, timeout=0.5, report_delay=0.05)
            for _ in range(300):
                with sync.call(*M):
                    pass
            lane = sync._local.lanes[sync.core.port(*M)]
            assert lane.piggyback is True
            assert counted() == 299  # the last one waits for a request
            deadline = time.monotonic() + 2
            while counted() < 300:  # ... or report_delay
                assert time.monotonic() < deadline
                time.sleep(0.01)
            host = sync.get_host(*M)
            sync.report(*M, host, ok=False)
            sync.close()  # sends what waits
            deadline = time.monotonic() + 2
            while counted() < 301:
                assert time.monotonic() < deadline
                time.sleep(0.01)

        await trio.to_thread.run_sync(work)
        assert agent_.metrics.counters["malformed_datagrams"] == 0


async def test_agent_keeps_serving_from_cache_without_dns(tmp_path: Path) -> None:
    async with stack(tmp_path, {M: [A]}) as (_, dns, agent_, client):
        assert (await client.get_host(*M)).key == A
        dns.scope.cancel()  # type: ignore[attr-defined]  # the DNS is gone
        with trio.fail_after(5):
            while agent_.dns_address is not None:
                await trio.sleep(0.01)
        assert [(await client.get_host(*M)).key for _ in range(3)] == [A, A, A]
        with pytest.raises(NoRoute):  # unknown modules cannot be asked for meanwhile
            await client.get_host(3, 3)


async def test_no_agent_is_agent_unavailable() -> None:
    client = AsyncLarsClient(base_port=free_udp_base(3), timeout=0.05, retries=1)
    try:
        start = trio.current_time()
        with pytest.raises(AgentUnavailable):
            await client.get_host(*M)
        assert trio.current_time() - start >= 0.1  # waited out both attempts
    finally:
        client.close()


def test_bad_datagrams_are_handled_off_the_trio_thread() -> None:
    # The API threads call handle_datagram without trio: nothing on the bad-input path may
    # need trio (the rate-limited log once did, and killed the agent).
    a = agent()
    for data in (b"\xc1", msgpack.packb([4, 1, 2**33, 1]), msgpack.packb([6, 1, 1, [1, 0], 0])):
        a.handle_datagram(data, CLIENT)
    assert a.metrics.counters["malformed_datagrams"] == 2
    assert a.metrics.counters["invalid_requests"] == 1


# --- polling for the next datagram -----------------------------------------------------------


class _ScriptedSocket:
    """One API socket fed from a list: a blocking receive takes the next datagram (none
    left: the agent is told to stop); a polling receive finds nothing unless ``polled`` has
    one. Records, per blocking receive, how many polls came before it."""

    def __init__(self, a: Agent, datagrams: list[bytes], polled: list[bytes] | None = None):
        self.agent = a
        self.datagrams = list(datagrams)
        self.polled = list(polled or [])
        self.polls = 0
        self.polls_between: list[int] = []
        self.sent: list[bytes] = []

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 8888)

    def recvfrom(self, size: int, flags: int = 0) -> tuple[bytes, object]:
        if flags:  # MSG_DONTWAIT: a poll
            self.polls += 1
            if self.polled:
                return self.polled.pop(0), CLIENT
            raise BlockingIOError
        self.polls_between.append(self.polls)
        self.polls = 0
        if not self.datagrams:
            self.agent._stopping.set()
            raise BlockingIOError
        return self.datagrams.pop(0), CLIENT

    def sendto(self, data: bytes, address: object) -> None:
        self.sent.append(data)


def _cores(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(n)))


def test_answers_whose_client_did_not_ask_again_stop_the_polling_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _cores(monkeypatch, 2)
    a = agent(busy_poll=0.001, busy_poll_reply=0.001)
    a.table.apply_route(M, [A], time.monotonic())
    requests = [wire.encode_get_host_request(seq, *M) for seq in range(9)]
    sock = _ScriptedSocket(a, requests)
    a._serve_datagrams([sock])  # type: ignore[list-item]
    assert len(sock.sent) == 9
    polled = [n > 0 for n in sock.polls_between[1:]]  # after answers 1..9
    # 1 polls and runs out: 2 unpolled; 4 runs out again: 4 unpolled; then 9 polls.
    assert polled == [True, False, False, True, False, False, False, False, True]


def test_a_poll_that_finds_the_next_request_keeps_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 2)
    a = agent(busy_poll=0.001, busy_poll_reply=0.001)
    a.table.apply_route(M, [A], time.monotonic())
    first = wire.encode_get_host_request(0, *M)
    report = wire.encode_report_request(*M, A, 0)
    follow = [wire.encode_get_host_request(seq, *M) for seq in range(1, 4)] + [report]
    sock = _ScriptedSocket(a, [first], polled=follow)
    a._serve_datagrams([sock])  # type: ignore[list-item]
    assert len(sock.sent) == 4  # every request found by polling was answered
    assert a.table.modules[M].hosts[A].rsucc == 1  # and the report counted


def test_nothing_is_polled_on_a_single_core(monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 1)
    a = agent(busy_poll=0.001, busy_poll_reply=0.001)
    a.table.apply_route(M, [A], time.monotonic())
    sock = _ScriptedSocket(a, [wire.encode_get_host_request(s, *M) for s in range(3)])
    a._serve_datagrams([sock])  # type: ignore[list-item]
    assert len(sock.sent) == 3 and sock.polls_between == [0, 0, 0, 0]
