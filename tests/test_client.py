"""lars.client against a scripted fake agent: sequence numbers, timeouts, error mapping."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from lars import wire
from lars.client import SPIN_SKIP, AsyncLarsClient, ClientCore, LarsClient
from lars.core.model import Host
from lars.errors import (
    AgentUnavailable,
    InvalidValue,
    LarsError,
    NoRoute,
    Overloaded,
    RequestRejected,
)
from tests.netutil import free_udp_base

A = (167772161, 7001)
#: What the fake agent does with a request: a list of datagrams to send back.
Script = Callable[[wire.Message], list[bytes]]


class FakeAgent:
    """UDP sockets on base..base+2 in a thread, answering each request with a script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.base = free_udp_base(3)
        self.received: list[tuple[int, wire.Message]] = []
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
                self.received.append((sock.getsockname()[1], msg))
                for reply in self.script(msg):
                    sock.sendto(reply, address)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Script], FakeAgent]]:
    agents: list[FakeAgent] = []

    def start(script: Script) -> FakeAgent:
        agents.append(FakeAgent(script))
        return agents[-1]

    yield start
    for agent in agents:
        agent.close()


def host_reply(retcode: int = 0, host: tuple[int, int] | None = A) -> Script:
    def script(msg: wire.Message) -> list[bytes]:
        if isinstance(msg, wire.GetHostRequest):
            reply = wire.GetHostResponse(msg.seq, msg.modid, msg.cmdid, retcode, host)
            return [wire.encode_datagram(reply)]
        return []

    return script


def client_for(agent: FakeAgent, **kw: float) -> LarsClient:
    return LarsClient(
        base_port=agent.base, timeout=kw.get("timeout", 0.2), retries=int(kw.get("retries", 2))
    )


def test_get_host_asks_the_modules_port_and_returns_a_host(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(host_reply())
    with client_for(agent) as client:
        assert client.get_host(1, 1) == Host("10.0.0.1", 7001)
        assert client.get_host(1, 2) == Host("10.0.0.1", 7001)
    ports = [port for port, _ in agent.received]
    assert ports == [agent.base + 2, agent.base]  # (1+1) % 3 = 2, (1+2) % 3 = 0


def test_stale_replies_are_discarded(fake: Callable[[Script], FakeAgent]) -> None:
    def script(msg: wire.Message) -> list[bytes]:
        assert isinstance(msg, wire.GetHostRequest)
        stale = wire.GetHostResponse(msg.seq - 1, 1, 1, 0, (1, 1))
        right = wire.GetHostResponse(msg.seq, 1, 1, 0, A)
        return [wire.encode_datagram(stale), b"garbage", wire.encode_datagram(right)]

    with client_for(fake(script)) as client:
        assert client.get_host(1, 1).key == A


def test_lost_replies_are_retried_then_agent_unavailable(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(lambda msg: [])
    with client_for(agent, timeout=0.05, retries=2) as client, pytest.raises(AgentUnavailable):
        client.get_host(1, 1)
    wait_until(lambda: len(agent.received) >= 3)
    assert len(agent.received) == 3  # the first try and two retries
    seqs = {msg.seq for _, msg in agent.received}  # type: ignore[attr-defined]
    assert len(seqs) == 1  # a retry resends the same request


def test_one_lost_reply_is_recovered_by_a_retry(fake: Callable[[Script], FakeAgent]) -> None:
    calls = []

    def script(msg: wire.Message) -> list[bytes]:
        calls.append(msg)
        return [] if len(calls) == 1 else host_reply()(msg)

    with client_for(fake(script), timeout=0.05) as client:
        assert client.get_host(1, 1).key == A
    assert len(calls) == 2


def test_nothing_listening_is_agent_unavailable() -> None:
    client = LarsClient(base_port=free_udp_base(3), timeout=0.05, retries=1)
    with client, pytest.raises(AgentUnavailable, match="2 attempts"):
        client.get_host(1, 1)


@pytest.mark.parametrize(
    ("retcode", "error"),
    [
        (wire.RetCode.NOEXIST, NoRoute),
        (wire.RetCode.OVERLOAD, Overloaded),
        (wire.RetCode.SYSTEM_ERROR, RequestRejected),
    ],
)
def test_retcodes_map_to_errors(
    fake: Callable[[Script], FakeAgent], retcode: int, error: type[LarsError]
) -> None:
    with client_for(fake(host_reply(retcode, None))) as client, pytest.raises(error):
        client.get_host(1, 1)


def test_error_reply_is_request_rejected(fake: Callable[[Script], FakeAgent]) -> None:
    def script(msg: wire.Message) -> list[bytes]:
        return [wire.encode_datagram(wire.ErrorReply(msg.seq, 4, "nope"))]  # type: ignore[attr-defined]

    with client_for(fake(script)) as client, pytest.raises(RequestRejected, match="nope"):
        client.get_host(1, 1)


def test_get_route(fake: Callable[[Script], FakeAgent]) -> None:
    def script(msg: wire.Message) -> list[bytes]:
        assert isinstance(msg, wire.ApiGetRouteRequest)
        reply = wire.ApiGetRouteResponse(msg.seq, 1, 1, 0, (A, (167772162, 80)))
        return [wire.encode_datagram(reply)]

    with client_for(fake(script)) as client:
        assert client.get_route(1, 1) == [Host("10.0.0.1", 7001), Host("10.0.0.2", 80)]


def test_report_and_call_send_the_right_retcodes(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(host_reply())
    with client_for(agent) as client:
        host = client.get_host(1, 1)
        client.report(1, 1, host, ok=True)
        client.report(1, 1, host, ok=False)
        client.report(1, 1, host, retcode=7)
        with client.call(1, 1) as called:
            assert called == host
        with pytest.raises(ZeroDivisionError), client.call(1, 1):
            1 / 0  # noqa: B018
        wait_until(lambda: kinds(agent).count("ReportRequest") == 5)
    reports = [msg for _, msg in agent.received if isinstance(msg, wire.ReportRequest)]
    assert [(r.host, r.retcode) for r in reports] == [(A, 0), (A, 1), (A, 7), (A, 0), (A, 1)]


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (up to 2 s) for a condition the fake agent's thread will make true."""
    deadline = time.monotonic() + 2
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the fake agent"
        time.sleep(0.005)


def test_local_mistakes_are_errors_before_anything_is_sent() -> None:
    client = LarsClient(base_port=free_udp_base(3))
    with pytest.raises(InvalidValue):
        client.get_host(2**32, 1)
    with pytest.raises(InvalidValue):
        client.report(1, 1, Host("10.0.0.1", 80))  # neither ok= nor retcode=
    with pytest.raises(InvalidValue):
        client.report(1, 1, Host("10.0.0.1", 80), ok=True, retcode=0)
    with pytest.raises(InvalidValue):
        LarsClient(base_port=65535, ports=3)
    client.close()


def test_threads_share_one_client(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(host_reply())
    results: list[Host] = []
    with client_for(agent) as client:
        threads = [
            threading.Thread(
                target=lambda: results.extend(client.get_host(1, 1) for _ in range(20))
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 80 and set(results) == {Host("10.0.0.1", 7001)}


def test_from_config_uses_the_agent_section(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "lars.toml"
    path.write_text("[agent]\nbase_port = 9000\nports = 2\n[client]\ntimeout = 0.1\n")
    client = LarsClient.from_config(path)
    assert (client.core.base_port, client.core.ports, client.core.timeout) == (9000, 2, 0.1)
    assert client.core.port(1, 2) == 9001


def test_core_reads_the_seq_of_a_reply_and_ignores_the_rest() -> None:
    reply = wire.GetHostResponse(5, 1, 1, 0, A)
    assert ClientCore.reply(wire.encode_datagram(reply)) == (5, reply)
    assert ClientCore.reply(b"\xc1") is None
    assert ClientCore.reply(wire.encode_datagram(wire.ReportRequest(1, 1, A, 0))) is None


def route_reply(noroute_first: int) -> Script:
    """Answer GetRoute with NOEXIST ``noroute_first`` times, then with route [A]."""
    asked: list[int] = []

    def script(msg: wire.Message) -> list[bytes]:
        assert isinstance(msg, wire.ApiGetRouteRequest)
        asked.append(msg.seq)
        if len(asked) <= noroute_first:
            reply = wire.ApiGetRouteResponse(msg.seq, 1, 1, wire.RetCode.NOEXIST, ())
        else:
            reply = wire.ApiGetRouteResponse(msg.seq, 1, 1, 0, (A,))
        return [wire.encode_datagram(reply)]

    return script


def test_reg_init_retries_no_route_but_not_a_silent_agent(
    fake: Callable[[Script], FakeAgent],
) -> None:
    with client_for(fake(route_reply(noroute_first=2))) as client:
        assert client.reg_init(1, 1) == [Host("10.0.0.1", 7001)]
    silent = fake(lambda msg: [])
    with client_for(silent, timeout=0.05, retries=2) as client, pytest.raises(AgentUnavailable):
        client.reg_init(1, 1)
    wait_until(lambda: len(silent.received) >= 3)
    time.sleep(0.1)  # room for a fourth, which must not come
    assert len(silent.received) == 3  # one get_route and its two retries, not ten of them


async def test_async_reg_init_retries_no_route_but_not_a_silent_agent(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(route_reply(noroute_first=2))
    async with AsyncLarsClient(base_port=agent.base, timeout=0.2) as client:
        assert await client.reg_init(1, 1) == [Host("10.0.0.1", 7001)]
    silent = fake(lambda msg: [])
    async with AsyncLarsClient(base_port=silent.base, timeout=0.05, retries=2) as client:
        with pytest.raises(AgentUnavailable):
            await client.reg_init(1, 1)
    with trio.fail_after(2):
        while len(silent.received) < 3:
            await trio.sleep(0.01)
    await trio.sleep(0.1)  # room for a fourth, which must not come
    assert len(silent.received) == 3


def test_core_matches_only_its_own_seq() -> None:
    core = ClientCore()
    good = wire.encode_datagram(wire.GetHostResponse(5, 1, 1, 0, A))
    assert core.match(good, 5) is not None
    assert core.match(good, 6) is None
    assert core.match(b"\xc1", 5) is None


# --- async -----------------------------------------------------------------------------------


async def test_async_client_mirrors_the_sync_one(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(host_reply())
    async with AsyncLarsClient(base_port=agent.base, timeout=0.2) as client:
        host = await client.get_host(1, 1)
        assert host == Host("10.0.0.1", 7001)
        async with client.call(1, 1):
            pass
        with pytest.raises(ValueError):
            async with client.call(1, 1):
                raise ValueError
        await client.report(1, 1, host, retcode=3)
    await trio.sleep(0.2)
    reports = [msg for _, msg in agent.received if isinstance(msg, wire.ReportRequest)]
    assert [r.retcode for r in reports] == [0, 1, 3]


async def test_async_client_times_out_and_raises(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(lambda msg: [])
    async with AsyncLarsClient(base_port=agent.base, timeout=0.05, retries=1) as client:
        with pytest.raises(AgentUnavailable):
            await client.get_host(1, 1)
    assert len(agent.received) == 2


async def test_async_client_error_mapping(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(host_reply(wire.RetCode.NOEXIST, None))
    async with AsyncLarsClient(base_port=agent.base, timeout=0.2) as client:
        with pytest.raises(NoRoute):
            await client.get_host(1, 1)


def test_agent_state(fake: Callable[[Script], FakeAgent]) -> None:
    def script(msg: wire.Message) -> list[bytes]:
        assert isinstance(msg, wire.AgentStateRequest)
        known = msg.modid == 1
        state = {"status": "ready", "hosts": []} if known else {}
        code = wire.RetCode.SUCC if known else wire.RetCode.NOEXIST
        return [wire.encode_datagram(wire.AgentStateResponse(msg.seq, msg.modid, 1, code, state))]

    with client_for(fake(script)) as client:
        assert client.agent_state(1, 1) == {"status": "ready", "hosts": []}
        assert client.agent_state(2, 1) is None


def test_agent_state_is_read_page_by_page(fake: Callable[[Script], FakeAgent]) -> None:
    hosts = [{"host": f"10.0.0.{i}:7001"} for i in range(1, 8)]
    offsets = []

    def script(msg: wire.Message) -> list[bytes]:
        assert isinstance(msg, wire.AgentStateRequest)
        offsets.append(msg.offset)
        page = hosts[msg.offset : msg.offset + 3]
        state = {"status": "ready", "host_count": len(hosts), "hosts": page}
        return [wire.encode_datagram(wire.AgentStateResponse(msg.seq, 1, 1, 0, state))]

    with client_for(fake(script)) as client:
        state = client.agent_state(1, 1)
    assert offsets == [0, 3, 6]
    assert state == {"status": "ready", "host_count": 7, "hosts": hosts}


# --- reports riding on requests, and polling for the answer ----------------------------------


def piggyback_agent(level: int | None = wire.API_LEVEL_PIGGYBACK, drop_first: int = 0) -> Script:
    """Answers get_host (plain or carrying reports) with A, and StatsRequest with its
    ``api_level`` (None: a counter it does not have). Drops the first ``drop_first``
    requests that carry reports."""
    dropped = [0]

    def script(msg: wire.Message) -> list[bytes]:
        if isinstance(msg, wire.StatsRequest):
            counters = {} if level is None else {"api_level": level}
            return [wire.encode_datagram(wire.StatsResponse(msg.seq, "agent", counters))]
        if isinstance(msg, wire.GetHostReportRequest) and dropped[0] < drop_first:
            dropped[0] += 1
            return []
        if isinstance(msg, wire.GetHostRequest | wire.GetHostReportRequest):
            return [wire.encode_datagram(wire.GetHostResponse(msg.seq, msg.modid, msg.cmdid, 0, A))]
        return []

    return script


def kinds(agent: FakeAgent) -> list[str]:
    return [type(msg).__name__ for _, msg in agent.received]


def test_reports_ride_on_the_next_get_host_in_order(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(piggyback_agent())
    with LarsClient(base_port=agent.base, timeout=0.2, report_delay=60) as client:
        host = client.get_host(1, 1)
        client.report(1, 1, host, ok=True)  # the lane does not know yet: alone, and it asks
        client.get_host(1, 1)  # reads the answer to its question on the way
        client.report(1, 1, host, ok=False)
        client.report(1, 1, host, retcode=7)
        client.report(1, 1, host, ok=True)
        assert kinds(agent)[-1] == "GetHostRequest"  # nothing went out for them
        client.get_host(1, 1)
    assert kinds(agent) == [
        "GetHostRequest",
        "ReportRequest",
        "StatsRequest",
        "GetHostRequest",
        "GetHostReportRequest",
    ]
    last = agent.received[-1][1]
    assert isinstance(last, wire.GetHostReportRequest)
    assert last.reports == ((1, 1, *A, 1), (1, 1, *A, 7), (1, 1, *A, 0))


def test_reports_of_an_idle_thread_go_alone_after_report_delay(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(piggyback_agent())
    with LarsClient(base_port=agent.base, timeout=0.2, report_delay=0.02) as client:
        host = client.get_host(1, 1)
        client.report(1, 1, host, ok=True)
        client.get_host(1, 1)  # the lane now knows
        sent = len(agent.received)
        began = time.monotonic()
        client.report(1, 1, host, ok=False)
        client.report(1, 1, host, ok=True)
        wait_until(lambda: len(agent.received) == sent + 2)
        assert time.monotonic() - began < 0.5
        assert [msg for _, msg in agent.received[sent:]] == [
            wire.ReportRequest(1, 1, A, 1),
            wire.ReportRequest(1, 1, A, 0),
        ]
        # The flusher went back to sleep; a later report wakes it again.
        client.report(1, 1, host, retcode=3)
        wait_until(lambda: len(agent.received) == sent + 3)
        assert agent.received[-1][1] == wire.ReportRequest(1, 1, A, 3)


def test_close_and_flush_send_the_waiting_reports(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(piggyback_agent())
    client = LarsClient(base_port=agent.base, timeout=0.2, report_delay=60)
    host = client.get_host(1, 1)
    client.report(1, 1, host, ok=True)
    client.get_host(1, 1)
    client.report(1, 1, host, ok=False)
    client.flush()
    wait_until(lambda: agent.received[-1][1] == wire.ReportRequest(1, 1, A, 1))
    client.report(1, 1, host, retcode=9)
    client.close()
    wait_until(lambda: agent.received[-1][1] == wire.ReportRequest(1, 1, A, 9))


def test_other_requests_send_the_waiting_reports_first(
    fake: Callable[[Script], FakeAgent],
) -> None:
    def script(msg: wire.Message) -> list[bytes]:
        if isinstance(msg, wire.ApiGetRouteRequest):
            reply = wire.ApiGetRouteResponse(msg.seq, msg.modid, msg.cmdid, 0, (A,))
            return [wire.encode_datagram(reply)]
        return piggyback_agent()(msg)

    agent = fake(script)
    with LarsClient(base_port=agent.base, timeout=0.2, report_delay=60) as client:
        host = client.get_host(1, 1)
        client.report(1, 1, host, ok=True)
        client.get_host(1, 1)
        client.report(1, 1, host, ok=False)
        assert client.get_route(1, 1) == [host]
    assert kinds(agent)[-2:] == ["ReportRequest", "ApiGetRouteRequest"]


def test_a_full_batch_goes_at_once(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(piggyback_agent())
    with LarsClient(base_port=agent.base, timeout=0.2, report_delay=60) as client:
        host = client.get_host(1, 1)
        client.report(1, 1, host, ok=True)
        client.get_host(1, 1)
        sent = len(agent.received)
        for _ in range(wire.MAX_PIGGYBACK):
            client.report(1, 1, host, ok=True)
        wait_until(lambda: len(agent.received) == sent + wire.MAX_PIGGYBACK)
        assert set(kinds(agent)[sent:]) == {"ReportRequest"}


@pytest.mark.parametrize("level", [None, 1])
def test_an_agent_that_does_not_take_them_gets_reports_alone(
    fake: Callable[[Script], FakeAgent], level: int | None
) -> None:
    agent = fake(piggyback_agent(level=level))
    with LarsClient(base_port=agent.base, timeout=0.2, report_delay=60) as client:
        for _ in range(3):
            host = client.get_host(1, 1)
            client.report(1, 1, host, ok=True)
    wait_until(lambda: len(agent.received) == 7)
    assert kinds(agent) == [
        "GetHostRequest",
        "ReportRequest",
        "StatsRequest",
        "GetHostRequest",
        "ReportRequest",
        "GetHostRequest",
        "ReportRequest",
    ]


def test_an_agent_that_never_says_gets_reports_alone(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(host_reply())  # answers nothing but get_host
    with LarsClient(base_port=agent.base, timeout=0.2, report_delay=60) as client:
        for _ in range(6):
            host = client.get_host(1, 1)
            client.report(1, 1, host, ok=True)
    wait_until(lambda: kinds(agent).count("ReportRequest") == 6)
    assert kinds(agent).count("StatsRequest") == 3  # PROBE_ATTEMPTS, then it stops asking


def test_a_request_that_timed_out_is_resent_without_its_reports(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(piggyback_agent(drop_first=1))
    with LarsClient(base_port=agent.base, timeout=0.1, report_delay=60) as client:
        host = client.get_host(1, 1)
        client.report(1, 1, host, ok=True)
        client.get_host(1, 1)
        client.report(1, 1, host, ok=False)
        assert client.get_host(1, 1) == Host("10.0.0.1", 7001)
    # The reports travel once (at most once, as any datagram): never counted twice.
    assert kinds(agent)[-2:] == ["GetHostReportRequest", "GetHostRequest"]


def test_each_thread_carries_its_own_reports(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(piggyback_agent())
    client = LarsClient(base_port=agent.base, timeout=0.5, report_delay=60)

    def work(retcode: int) -> None:
        for _ in range(20):
            host = client.get_host(1, 1)
            client.report(1, 1, host, retcode=retcode)

    threads = [threading.Thread(target=work, args=(code,)) for code in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    wait_until(lambda: sum(_reports_seen(agent).values()) == 40)
    assert _reports_seen(agent) == {11: 20, 12: 20}


def _reports_seen(agent: FakeAgent) -> dict[int, int]:
    seen: dict[int, int] = {}
    for _, msg in list(agent.received):
        if isinstance(msg, wire.ReportRequest):
            seen[msg.retcode] = seen.get(msg.retcode, 0) + 1
        elif isinstance(msg, wire.GetHostReportRequest):
            for report in msg.reports:
                seen[report[4]] = seen.get(report[4], 0) + 1
    return seen


def test_a_poll_that_runs_out_stops_polling_for_a_while(
    fake: Callable[[Script], FakeAgent],
) -> None:
    def slow(msg: wire.Message) -> list[bytes]:
        time.sleep(0.003)  # longer than the client polls
        return host_reply()(msg)

    agent = fake(slow)
    with LarsClient(base_port=agent.base, timeout=0.2, busy_poll=0.0005) as client:
        client.get_host(1, 1)
        lane = client._local.lanes[client.core.port(1, 1)]
        assert (lane.misses, lane.skip) == (1, SPIN_SKIP << 1)
        client.get_host(1, 1)
        assert (lane.misses, lane.skip) == (1, (SPIN_SKIP << 1) - 1)  # answered, no poll
        lane.skip = 0
        client.get_host(1, 1)
        assert (lane.misses, lane.skip) == (2, SPIN_SKIP << 2)  # doubled


def test_a_poll_that_gets_its_answer_keeps_polling(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(host_reply())
    with LarsClient(base_port=agent.base, timeout=0.2, busy_poll=0.5) as client:
        for _ in range(5):
            client.get_host(1, 1)
        lane = client._local.lanes[client.core.port(1, 1)]
        assert (lane.misses, lane.skip) == (0, 0)


def test_polling_and_delaying_can_be_turned_off(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(piggyback_agent())
    with LarsClient(base_port=agent.base, timeout=0.2, busy_poll=0, report_delay=0) as client:
        for _ in range(3):
            host = client.get_host(1, 1)
            client.report(1, 1, host, ok=True)
    wait_until(lambda: kinds(agent).count("ReportRequest") == 3)
    assert "StatsRequest" not in kinds(agent)  # no question: reports always go alone
    with pytest.raises(InvalidValue):
        LarsClient(busy_poll=-1)
