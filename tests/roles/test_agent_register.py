"""Self-registration through the agent (DESIGN §14), against a fake DNS: RegisterRequest and
DeregisterRequest from clients, LeaseUpdates and heartbeats on the DNS session, limits and
bad input, and demoted hosts from a route."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
from prometheus_client import generate_latest

from lars import wire
from lars.config import AgentConfig
from lars.core.model import ip_to_int
from lars.registry import REPLY_TIMEOUT
from lars.roles.agent import REGISTRATION_COUNTERS, Agent, port_for
from tests.fakes import FakeDns
from tests.netutil import free_tcp_port, free_udp_base

M = (1, 1)
IP = ip_to_int("10.0.0.1")
A = (167772161, 7001)
B = (167772162, 7002)
SUCC = wire.RetCode.SUCC
BAD = wire.RetCode.BAD_REQUEST
SYSTEM = wire.RetCode.SYSTEM_ERROR


def nowhere() -> str:
    return f"127.0.0.1:{free_tcp_port()}"


def register(seq: int, port: int = 7001, ttl: int = 3, **fields: Any) -> wire.RegisterRequest:
    values: dict[str, Any] = {"modid": 1, "cmdid": 1, "ip": IP, "weight": -1, "zone": None}
    values.update(fields)
    return wire.RegisterRequest(seq=seq, port=port, ttl=ttl, **values)


def deregister(seq: int, port: int = 7001, drain_ms: int = 0) -> wire.DeregisterRequest:
    return wire.DeregisterRequest(seq, 1, 1, IP, port, drain_ms)


class Udp:
    """A client socket speaking raw datagrams to the agent's API."""

    def __init__(self, base_port: int, ports: int) -> None:
        self.base_port = base_port
        self.ports = ports
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def send(self, msg: wire.Message | bytes, module: tuple[int, int] = M) -> float:
        """Send; returns when (time.monotonic())."""
        data = msg if isinstance(msg, bytes) else wire.encode_datagram(msg)
        port = port_for(module, self.base_port, self.ports)
        sent = time.monotonic()
        await self.sock.sendto(data, ("127.0.0.1", port))
        return sent

    async def receive(self, timeout: float = 3.0) -> tuple[float, wire.Message]:
        with trio.fail_after(timeout):
            data = await self.sock.recv(65536)
        return time.monotonic(), wire.decode_datagram(data)

    async def ask(self, msg: wire.Message | bytes, timeout: float = 3.0) -> wire.RegisterReply:
        await self.send(msg)
        _, reply = await self.receive(timeout)
        assert isinstance(reply, wire.RegisterReply), reply
        return reply

    async def nothing(self, seconds: float) -> None:
        """Assert no datagram comes within ``seconds``."""
        with trio.move_on_after(seconds):
            data = await self.sock.recv(65536)
            raise AssertionError(f"unexpected datagram {wire.decode_datagram(data)}")


@asynccontextmanager
async def registering(
    fake: FakeDns | None = None, **config: Any
) -> AsyncIterator[tuple[FakeDns, Agent, Udp]]:
    """A fake DNS, an agent connected to it, and a raw client of the agent."""
    fake = fake or FakeDns()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        config.setdefault("reporter", nowhere())
        the_agent = Agent(AgentConfig(base_port=free_udp_base(3), dns=[fake.address], **config))
        await nursery.start(the_agent.serve)
        with trio.fail_after(5):
            while the_agent.dns_address is None:
                await trio.sleep(0.01)
        udp = Udp(the_agent.config.base_port, the_agent.config.ports)
        try:
            yield fake, the_agent, udp
        finally:
            udp.sock.close()
        nursery.cancel_scope.cancel()


# --- registering -----------------------------------------------------------------------------


async def test_a_new_registration_goes_to_the_dns_at_once_and_is_answered_after_it() -> None:
    fake = FakeDns()
    fake.delay = 0.3  # the DNS takes its time: the client must wait for it
    async with registering(fake) as (_, the_agent, udp):
        sent = await udp.send(register(1, weight=50, zone="eu"))
        await fake.wait_for(lambda: bool(fake.updates))
        arrived, _, update = fake.updates[0]
        assert arrived - sent < 0.1
        assert update.drops == ()
        assert update.leases == (wire.Lease(1, 1, IP, 7001, 50, "eu", 3, update.leases[0].age_ms),)
        assert update.leases[0].age_ms < 100
        answered, reply = await udp.receive()
        assert isinstance(reply, wire.RegisterReply)
        assert (reply.seq, reply.retcode, reply.ip, reply.reason) == (1, SUCC, IP, "")
        assert answered - arrived >= 0.3  # after the LeaseReply, not before
        assert len(the_agent.registry) == 1
        assert the_agent.metrics.counters["registrations_registered"] == 1


async def test_a_renewal_is_answered_at_once_even_without_the_dns() -> None:
    async with registering() as (fake, the_agent, udp):
        assert (await udp.ask(register(1))).retcode == SUCC
        fake.silent = True
        started = time.monotonic()
        reply = await udp.ask(register(2))
        assert (reply.seq, reply.retcode) == (2, SUCC)
        assert time.monotonic() - started < 0.1
        assert the_agent.metrics.counters["registrations_renewed"] == 1


async def test_a_resent_request_waits_for_the_same_reply_and_is_answered_once() -> None:
    fake = FakeDns()
    fake.delay = 0.2
    async with registering(fake) as (_, _, udp):
        await udp.send(register(7))
        await udp.send(register(7))  # the client's resend: same seq
        _, reply = await udp.receive()
        assert isinstance(reply, wire.RegisterReply) and (reply.seq, reply.retcode) == (7, SUCC)
        await udp.nothing(0.3)
        assert len([lease for _, lease in fake.leases()]) == 1


async def test_an_address_of_zero_registers_the_agents_own() -> None:
    async with registering() as (fake, _, udp):
        reply = await udp.ask(register(1, ip=0))
        assert (reply.retcode, reply.ip) == (SUCC, ip_to_int("127.0.0.1"))  # its DNS session's
    async with registering(ip="10.9.9.9") as (fake, _, udp):
        reply = await udp.ask(register(1, ip=0))
        assert (reply.retcode, reply.ip) == (SUCC, ip_to_int("10.9.9.9"))  # [agent] ip
        assert fake.leases()[0][1].ip == ip_to_int("10.9.9.9")


async def test_heartbeats_carry_every_registration_with_its_age() -> None:
    async with registering() as (fake, _, udp):
        assert (await udp.ask(register(1, port=7001, ttl=3))).retcode == SUCC
        assert (await udp.ask(register(2, port=7002, ttl=30))).retcode == SUCC
        await trio.sleep(0.5)
        renewed = await udp.send(register(3, port=7001, ttl=3))
        await udp.receive()
        # Heartbeats every min(ttl) / 3 = 1 s, with both registrations each time.
        await fake.wait_for(lambda: len(fake.updates) >= 5, timeout=4)
        beats = [(at, u) for at, _, u in fake.updates[2:5]]
        for at, update in beats:
            assert sorted(lease.port for lease in update.leases) == [7001, 7002]
            age = next(lease.age_ms for lease in update.leases if lease.port == 7001)
            assert abs(age - (at - renewed) * 1000) < 150
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
        assert all(0.8 < gap < 1.4 for gap in gaps), gaps


async def test_the_heartbeat_follows_the_shortest_ttl() -> None:
    async with registering() as (fake, _, udp):
        assert (await udp.ask(register(1, ttl=1))).retcode == SUCC
        first = fake.updates[0][0]

        async def renew() -> None:  # the client's job, every ttl / 3
            for seq in range(2, 20):
                await trio.sleep(0.3)
                await udp.send(register(seq, ttl=1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew)
            await fake.wait_for(lambda: len(fake.updates) >= 4, timeout=3)
            nursery.cancel_scope.cancel()
        assert fake.updates[3][0] - first < 1.3  # three beats of about 1/3 s


async def test_every_registration_goes_to_a_new_dns_session_at_once() -> None:
    async with registering() as (fake, the_agent, udp):
        for port in (7001, 7002, 7003):
            assert (await udp.ask(register(port, port=port, ttl=30))).retcode == SUCC
        await fake.kick()
        await fake.wait_for(lambda: any(number == 2 for _, number, _ in fake.updates))
        _, _, update = next(u for u in fake.updates if u[1] == 2)
        assert sorted(lease.port for lease in update.leases) == [7001, 7002, 7003]
        connected = the_agent.metrics.counters["dns_connects"]
        assert connected == 2


async def test_a_registration_waiting_when_the_session_drops_goes_to_the_next() -> None:
    fake = FakeDns()
    fake.silent = True
    async with registering(fake) as (_, _, udp):
        await udp.send(register(1))
        await fake.wait_for(lambda: bool(fake.updates))
        fake.silent = False
        await fake.kick()
        _, reply = await udp.receive()
        assert isinstance(reply, wire.RegisterReply) and reply.retcode == SUCC
        assert [number for _, number, _ in fake.updates] == [1, 2]


async def test_a_registration_its_client_stops_renewing_is_dropped_after_its_ttl() -> None:
    async with registering() as (fake, the_agent, udp):
        sent = await udp.send(register(1, ttl=1))
        await udp.receive()
        await trio.sleep(2.0)
        leases = fake.leases()
        assert all(lease.age_ms <= 1000 for _, lease in leases)  # none older than its ttl
        assert max(at for at, _ in leases) <= sent + 1.2  # and nothing after it
        assert len(leases) >= 3  # the heartbeats before it
        assert len(the_agent.registry) == 0
        assert the_agent.metrics.counters["registrations_expired"] == 1
        # Coming back is a new registration, sent to the DNS again.
        assert (await udp.ask(register(2, ttl=1))).retcode == SUCC
        assert the_agent.metrics.counters["registrations_registered"] == 2


# --- deregistering ---------------------------------------------------------------------------


async def test_a_deregistration_sends_a_drop_with_the_drain_and_ends_the_heartbeats() -> None:
    fake = FakeDns()
    async with registering(fake) as (_, the_agent, udp):
        assert (await udp.ask(register(1, ttl=3))).retcode == SUCC
        fake.delay = 0.2
        sent = await udp.send(deregister(2, drain_ms=5000))
        answered, reply = await udp.receive()
        assert isinstance(reply, wire.RegisterReply)
        assert (reply.seq, reply.retcode, reply.ip) == (2, SUCC, IP)
        assert answered - sent >= 0.2  # after the DNS
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 5000)]
        assert len(the_agent.registry) == 0
        await trio.sleep(1.5)
        assert not fake.leases(since=sent)
        assert the_agent.metrics.counters["registrations_deregistered"] == 1


async def test_a_deregistration_of_a_host_this_agent_does_not_hold_still_reaches_the_dns() -> None:
    async with registering() as (fake, _, udp):
        reply = await udp.ask(deregister(1, port=7009, drain_ms=0))
        assert reply.retcode == SUCC
        assert fake.drops() == [wire.Drop(1, 1, IP, 7009, 0)]


async def test_register_after_deregister_reaches_the_dns_in_that_order() -> None:
    async with registering() as (fake, _, udp):
        assert (await udp.ask(register(1))).retcode == SUCC
        fake.delay = 0.1
        await udp.send(deregister(2, drain_ms=100))
        await udp.send(register(3))
        replies = {}
        for _ in range(2):
            _, reply = await udp.receive()
            assert isinstance(reply, wire.RegisterReply)
            replies[reply.seq] = reply.retcode
        assert replies == {2: SUCC, 3: SUCC}
        kinds = [("drop" if u.drops else "lease") for _, _, u in fake.updates]
        assert kinds[:3] == ["lease", "drop", "lease"]


# --- the DNS refuses or does not answer ------------------------------------------------------


async def test_a_dns_that_does_not_answer_is_system_error_and_nothing_is_held() -> None:
    fake = FakeDns()
    fake.silent = True
    async with registering(fake) as (_, the_agent, udp):
        sent = await udp.send(register(1))
        answered, reply = await udp.receive()
        assert isinstance(reply, wire.RegisterReply)
        assert (reply.retcode, reply.seq) == (SYSTEM, 1)
        assert "did not answer" in reply.reason
        assert REPLY_TIMEOUT <= answered - sent < REPLY_TIMEOUT + 0.3
        assert len(the_agent.registry) == 0
        await trio.sleep(1.2)
        assert len(fake.updates) == 1  # never heartbeated
        assert the_agent.metrics.counters["registrations_refused"] == 1


async def test_without_a_dns_a_new_registration_is_system_error() -> None:
    the_agent = Agent(
        AgentConfig(base_port=free_udp_base(3), dns=[nowhere()], reporter=nowhere(), ip="10.0.0.5")
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(the_agent.serve)
        udp = Udp(the_agent.config.base_port, 3)
        reply = await udp.ask(register(1))
        assert reply.retcode == SYSTEM
        assert len(the_agent.registry) == 0
        udp.sock.close()
        nursery.cancel_scope.cancel()


async def test_items_the_dns_refuses_are_bad_request_with_its_reason() -> None:
    fake = FakeDns()

    def refuse_7002(update: wire.LeaseUpdate) -> wire.Message:
        errors = tuple(
            (i, "port 7002 is reserved") for i, x in enumerate(update.leases) if x.port == 7002
        )
        return wire.LeaseReply(update.seq, SUCC, errors)

    fake.reply = refuse_7002
    async with registering(fake) as (_, the_agent, udp):
        assert (await udp.ask(register(1, port=7001))).retcode == SUCC
        reply = await udp.ask(register(2, port=7002))
        assert reply.retcode == BAD and "port 7002 is reserved" in reply.reason
        assert len(the_agent.registry) == 1


async def test_a_store_outage_is_system_error_for_new_ones_and_keeps_the_held_ones() -> None:
    fake = FakeDns()
    async with registering(fake) as (_, the_agent, udp):
        assert (await udp.ask(register(1, port=7001))).retcode == SUCC
        fake.reply = lambda update: wire.LeaseReply(update.seq, SYSTEM, ())
        reply = await udp.ask(register(2, port=7002))
        assert reply.retcode == SYSTEM and "store" in reply.reason
        await fake.wait_for(lambda: len(fake.updates) >= 3)  # a heartbeat, also refused
        assert len(the_agent.registry) == 1  # held: it goes again with the next one
        assert (await udp.ask(register(3, port=7001))).retcode == SUCC  # a renewal


async def test_a_dns_from_before_registration_refuses_with_its_error_reply() -> None:
    fake = FakeDns()
    fake.reply = lambda update: wire.ErrorReply(
        update.seq, BAD, "the dns role does not serve LeaseUpdate"
    )
    async with registering(fake) as (_, the_agent, udp):
        reply = await udp.ask(register(1))
        assert reply.retcode == BAD and "does not serve LeaseUpdate" in reply.reason
        assert len(the_agent.registry) == 0


# --- limits and bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([22, 5, 1, 1, IP, 7001, -1, None, 0], "ttl"),
        ([22, 5, 1, 1, IP, 7001, -1, None, 3601], "ttl"),
        ([22, 5, 1, 1, IP, 0, -1, None, 10], "port"),
        ([22, 5, 2**32, 1, IP, 7001, -1, None, 10], "modid"),
        ([22, 5, 1, -1, IP, 7001, -1, None, 10], "cmdid"),
        ([22, 5, 1, 1, 2**32, 7001, -1, None, 10], "ip"),
        ([22, 5, 1, 1, IP, 7001, 10**9, None, 10], "weight"),
        ([22, 5, 1, 1, IP, 7001, -1, "z" * 65, 10], "zone"),
        ([22, 5, 1, 1, IP, 7001, -1, "bad\tzone", 10], "zone"),
        ([22, 5, 1, 1, ip_to_int("224.0.0.1"), 7001, -1, None, 10], "multicast"),
        ([22, 5, 1, 1, 0xFFFF_FFFF, 7001, -1, None, 10], "255.255.255.255"),
        ([23, 5, 1, 1, IP, 7001, 3_600_001], "drain_ms"),
        ([23, 5, 1, 1, ip_to_int("239.1.1.1"), 7001, 0], "multicast"),
    ],
)
async def test_bad_registrations_get_a_clear_refusal_and_change_nothing(
    body: list[Any], needle: str
) -> None:
    async with registering() as (fake, the_agent, udp):
        reply = await udp.ask(msgpack.packb(body))
        assert (reply.seq, reply.retcode) == (5, BAD)
        assert needle in reply.reason
        await trio.sleep(0.1)
        assert fake.updates == [] and len(the_agent.registry) == 0
        assert the_agent.metrics.counters["registrations_refused"] == 1


async def test_more_registrations_than_the_limit_are_refused() -> None:
    async with registering(max_registrations=2) as (fake, the_agent, udp):
        for port in (7001, 7002):
            assert (await udp.ask(register(port, port=port))).retcode == SUCC
        reply = await udp.ask(register(3, port=7003))
        assert reply.retcode == BAD and "max_registrations" in reply.reason
        assert len(the_agent.registry) == 2 and len(fake.updates) == 2
        assert (await udp.ask(register(4, port=7001))).retcode == SUCC  # renewals still go
    async with registering(max_registrations=0) as (fake, _, udp):
        reply = await udp.ask(register(1))
        assert reply.retcode == BAD and "off" in reply.reason


async def test_without_an_address_or_a_dns_session_the_agent_cannot_register_ip_zero() -> None:
    the_agent = Agent(AgentConfig(dns=[nowhere()], reporter=nowhere()))
    data = the_agent.handle_datagram(wire.encode_datagram(register(1, ip=0)), ("127.0.0.1", 1))
    assert data is not None
    reply = wire.decode_datagram(data)
    assert isinstance(reply, wire.RegisterReply) and reply.retcode == BAD
    assert "set [agent] ip or pass ip" in reply.reason


# --- counters and demoted hosts --------------------------------------------------------------


async def test_the_agent_counts_registrations_in_its_stats_and_metrics() -> None:
    async with registering() as (_, the_agent, udp):
        assert (await udp.ask(register(1))).retcode == SUCC
        assert (await udp.ask(register(2))).retcode == SUCC
        await udp.send(wire.StatsRequest(3))
        _, stats = await udp.receive()
        assert isinstance(stats, wire.StatsResponse)
        counters = stats.counters
        assert counters["api_level"] == wire.API_LEVEL_REGISTER
        assert counters["registrations"] == 1
        assert counters["registrations_registered"] == 1
        assert counters["registrations_renewed"] == 1
        assert counters["lease_updates_sent"] >= 1
        text = generate_latest(the_agent.observed().registry).decode()
        assert "lars_agent_registrations 1.0" in text
        for name, _ in REGISTRATION_COUNTERS:
            assert f"lars_agent_{name}_total" in text
        assert "lars_agent_registrations_registered_total 1.0" in text


async def test_demoted_hosts_of_a_route_start_overloaded() -> None:
    fake = FakeDns(routes={M: [A, B]}, demoted={M: [B]})
    async with registering(fake) as (_, _, udp):
        await udp.send(wire.GetHostRequest(1, *M))
        _, reply = await udp.receive()
        assert isinstance(reply, wire.GetHostResponse) and reply.host == A
        await udp.send(wire.AgentStateRequest(2, *M))
        _, state = await udp.receive()
        assert isinstance(state, wire.AgentStateResponse)
        hosts = {h["host"]: (h["state"], h["demoted"]) for h in state.state["hosts"]}
        assert hosts == {"10.0.0.1:7001": ("idle", False), "10.0.0.2:7002": ("overload", True)}
