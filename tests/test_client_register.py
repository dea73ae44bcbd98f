"""lars.client's self-registration (DESIGN §14): register, renew, close, the context managers,
and registering again after the agent forgot, with LarsClient and AsyncLarsClient against a
real agent and a fake DNS."""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

import pytest
import trio

from lars import wire
from lars.client import AsyncLarsClient, AsyncRegistration, LarsClient, Registration
from lars.config import AgentConfig
from lars.core.model import Host, ip_to_int
from lars.errors import AgentUnavailable, InvalidValue, RequestRejected
from lars.roles.agent import Agent
from tests.fakes import FakeDns
from tests.netutil import free_udp_base
from tests.roles.test_agent_register import nowhere, registering

IP = ip_to_int("10.0.0.1")


def sync_client(the_agent: Agent) -> LarsClient:
    return LarsClient(base_port=the_agent.config.base_port, ports=the_agent.config.ports)


def async_client(the_agent: Agent) -> AsyncLarsClient:
    return AsyncLarsClient(base_port=the_agent.config.base_port, ports=the_agent.config.ports)


# --- LarsClient --------------------------------------------------------------------------------


async def test_register_renews_in_the_background_and_close_deregisters_with_the_drain() -> None:
    async with registering() as (fake, the_agent, _):

        def work() -> Registration:
            with sync_client(the_agent) as client:
                registration = client.register(1, 1, 7001, ip="10.0.0.1", weight=50, ttl=1)
                assert registration.host == Host("10.0.0.1", 7001)
                assert registration.module == (1, 1) and registration.ttl == 1
                time.sleep(1.2)  # renewed every 1/3 s
                assert registration.renewals >= 2 and registration.error is None
                registration.close(drain=0.5)
                registration.close()  # again: nothing
                return registration

        registration = await trio.to_thread.run_sync(work)
        assert registration.closed
        assert registration._thread is not None and not registration._thread.is_alive()
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 500)]
        leases = [lease for _, lease in fake.leases()]
        assert leases[0] == wire.Lease(1, 1, IP, 7001, 50, None, 1, leases[0].age_ms)
        assert the_agent.metrics.counters["registrations_renewed"] >= 2
        assert len(the_agent.registry) == 0


async def test_without_an_address_the_agent_registers_its_own() -> None:
    async with registering() as (fake, the_agent, _):

        def work() -> Host:
            with sync_client(the_agent) as client, client.register(1, 1, 7001) as registration:
                return registration.host

        assert await trio.to_thread.run_sync(work) == Host("127.0.0.1", 7001)
        local = ip_to_int("127.0.0.1")
        assert fake.drops() == [wire.Drop(1, 1, local, 7001, 0)]  # the address it registered


async def test_the_with_block_deregisters_also_when_it_raises() -> None:
    async with registering() as (fake, the_agent, _):

        def work() -> None:
            with sync_client(the_agent) as client, client.register(1, 1, 7001, ip="10.0.0.1"):
                raise KeyError("the service failed")

        with pytest.raises(KeyError, match="the service failed"):
            await trio.to_thread.run_sync(work)
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]


async def test_a_refused_registration_raises_with_the_reason() -> None:
    async with registering(max_registrations=0) as (fake, the_agent, _):

        def work() -> None:
            with sync_client(the_agent) as client:
                client.register(1, 1, 7001, ip="10.0.0.1")

        with pytest.raises(RequestRejected, match=r"BAD_REQUEST.*max_registrations = 0"):
            await trio.to_thread.run_sync(work)
        assert fake.updates == []


async def test_a_dns_that_does_not_answer_is_a_failed_registration() -> None:
    fake = FakeDns()
    fake.silent = True
    async with registering(fake) as (_, the_agent, _):

        def work() -> None:
            with sync_client(the_agent) as client:
                client.register(1, 1, 7001, ip="10.0.0.1")

        with pytest.raises(RequestRejected, match=r"SYSTEM_ERROR.*did not answer"):
            await trio.to_thread.run_sync(work)


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        ((2**32, 1, 7001), {}, "modid"),
        ((1, 1, 0), {}, "port"),
        ((1, 1, 7001), {"ttl": 0}, "ttl"),
        ((1, 1, 7001), {"ttl": 3601}, "ttl"),
        ((1, 1, 7001), {"ip": "10.0.0"}, "IPv4"),
        ((1, 1, 7001), {"ip": "0.0.0.0"}, "0.0.0.0"),
        ((1, 1, 7001), {"ip": "224.0.0.9"}, "multicast"),
        ((1, 1, 7001), {"weight": -1}, "weight"),
        ((1, 1, 7001), {"zone": " eu"}, "zone"),
    ],
)
def test_bad_arguments_are_invalid_value_and_send_nothing(
    args: tuple[Any, ...], kwargs: dict[str, Any], needle: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as agent_socket:
        agent_socket.bind(("127.0.0.1", 0))
        agent_socket.setblocking(False)
        base = agent_socket.getsockname()[1]
        with (
            LarsClient(base_port=base, ports=1) as client,
            pytest.raises(InvalidValue, match=needle),
        ):
            client.register(*args, **kwargs)
        with pytest.raises(BlockingIOError):
            agent_socket.recv(65536)  # nothing was sent


async def test_a_bad_drain_is_invalid_value_and_keeps_the_registration() -> None:
    async with registering() as (fake, the_agent, _):

        def work() -> None:
            with sync_client(the_agent) as client:
                registration = client.register(1, 1, 7001, ip="10.0.0.1")
                for drain in (-1, 3601, "5"):
                    with pytest.raises(InvalidValue, match="drain"):
                        registration.close(drain=drain)  # type: ignore[arg-type]
                assert not registration.closed
                registration.close(drain=1)

        await trio.to_thread.run_sync(work)
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 1000)]


def test_no_agent_is_agent_unavailable() -> None:
    with LarsClient(base_port=free_udp_base(3)) as client:
        started = time.monotonic()
        with pytest.raises(AgentUnavailable, match="no answer from the agent"):
            client.register(1, 1, 7001)
        assert time.monotonic() - started >= 1.9


async def test_an_agent_from_before_registration_says_so() -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def old_agent() -> None:
        while True:
            data, address = await sock.recvfrom(65536)
            seq = wire.peek_seq(data)
            reason = "the agent does not serve RegisterRequest"
            reply = wire.ErrorReply(seq or 0, wire.RetCode.BAD_REQUEST, reason)
            await sock.sendto(wire.encode_datagram(reply), address)

    def work() -> None:
        with LarsClient(base_port=port, ports=1) as client:
            client.register(1, 1, 7001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_agent)
        with pytest.raises(RequestRejected, match="does not serve RegisterRequest"):
            await trio.to_thread.run_sync(work)
        nursery.cancel_scope.cancel()
    sock.close()


async def test_a_registration_survives_an_agent_restart() -> None:
    fake = FakeDns()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        config = AgentConfig(base_port=free_udp_base(3), dns=[fake.address], reporter=nowhere())

        async def run(the_agent: Agent, scope: trio.CancelScope, task_status: Any) -> None:
            with scope:
                await the_agent.serve(task_status=task_status)

        first, first_scope = Agent(config), trio.CancelScope()
        await nursery.start(run, first, first_scope)
        client = LarsClient(base_port=config.base_port)
        registration = await trio.to_thread.run_sync(
            lambda: client.register(1, 1, 7001, ip="10.0.0.1", ttl=3)
        )
        first_scope.cancel()  # the agent goes away, and its registrations with it
        gone = time.monotonic()
        await trio.sleep(1.5)  # a renewal (every 1 s) finds no agent and keeps trying
        second = Agent(config)
        await nursery.start(run, second, trio.CancelScope())
        with trio.fail_after(5):
            while len(second.registry) != 1:
                await trio.sleep(0.05)
        # Back in the DNS before the lease ran out (ttl 3 s after the last renewal).
        assert fake.leases()[-1][0] < gone + 3.0
        assert second.metrics.counters["registrations_registered"] == 1  # new to this agent
        assert fake.leases()[-1][1].host == (IP, 7001)
        await trio.to_thread.run_sync(registration.close)
        client.close()
        nursery.cancel_scope.cancel()


# --- AsyncLarsClient ---------------------------------------------------------------------------


async def test_async_register_renews_and_the_block_end_deregisters() -> None:
    async with registering() as (fake, the_agent, _), async_client(the_agent) as client:
        async with client.register(1, 1, 7001, ip="10.0.0.1", zone="eu", ttl=1) as registration:
            assert isinstance(registration, AsyncRegistration)
            assert registration.host == Host("10.0.0.1", 7001)
            await trio.sleep(1.2)
            assert registration.renewals >= 2 and registration.error is None
            assert len(the_agent.registry) == 1
        assert registration.closed
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]
        assert fake.leases()[0][1].zone == "eu"
        assert len(the_agent.registry) == 0


async def test_async_aclose_takes_a_drain_and_the_block_end_adds_nothing() -> None:
    async with registering() as (fake, the_agent, _), async_client(the_agent) as client:
        async with client.register(1, 1, 7001, ip="10.0.0.1") as registration:
            await registration.aclose(drain=2.5)
            renewals = registration.renewals
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 2500)]
        await trio.sleep(0.1)
        assert registration.renewals == renewals


async def test_async_an_error_in_the_block_propagates_as_is_and_deregisters() -> None:
    async with registering() as (fake, the_agent, _), async_client(the_agent) as client:
        with pytest.raises(KeyError):
            async with client.register(1, 1, 7001, ip="10.0.0.1"):
                raise KeyError("boom")
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]


async def test_async_a_cancelled_block_still_deregisters() -> None:
    async with registering() as (fake, the_agent, _), async_client(the_agent) as client:
        with trio.move_on_after(0.3) as scope:
            async with client.register(1, 1, 7001, ip="10.0.0.1"):
                await trio.sleep(10)
        assert scope.cancelled_caught
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]


async def test_async_a_refused_registration_raises_before_the_block() -> None:
    async with (
        registering(max_registrations=0) as (_, the_agent, _),
        async_client(the_agent) as client,
    ):
        with pytest.raises(RequestRejected, match="off"):
            async with client.register(1, 1, 7001, ip="10.0.0.1"):
                raise AssertionError("never here")
        with pytest.raises(InvalidValue, match="ttl"):
            async with client.register(1, 1, 7001, ttl=0):
                raise AssertionError("never here")


async def test_async_registers_again_when_the_agent_forgot() -> None:
    async with registering() as (fake, the_agent, _), async_client(the_agent) as client:
        async with client.register(1, 1, 7001, ip="10.0.0.1", ttl=1):
            with the_agent._lock:
                the_agent.registry.entries.clear()  # as after a restart
            with trio.fail_after(2):
                while len(the_agent.registry) != 1:
                    await trio.sleep(0.05)
            assert the_agent.metrics.counters["registrations_registered"] == 2
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]


async def test_a_process_that_exits_without_closing_deregisters() -> None:
    async with registering() as (fake, the_agent, _):
        script = (
            "from lars.client import LarsClient\n"
            f"client = LarsClient(base_port={the_agent.config.base_port})\n"
            "registration = client.register(1, 1, 7001, ip='10.0.0.1')\n"
            "print(registration.host, flush=True)\n"
        )
        result = await trio.run_process([sys.executable, "-c", script], capture_stdout=True)
        assert result.stdout.decode().strip() == "10.0.0.1:7001"
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]
        assert len(the_agent.registry) == 0


async def test_async_renewal_errors_are_kept_until_the_agent_is_back() -> None:
    fake = FakeDns()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        config = AgentConfig(base_port=free_udp_base(3), dns=[fake.address], reporter=nowhere())

        async def run(the_agent: Agent, scope: trio.CancelScope, task_status: Any) -> None:
            with scope:
                await the_agent.serve(task_status=task_status)

        first_scope = trio.CancelScope()
        await nursery.start(run, Agent(config), first_scope)
        async with (
            AsyncLarsClient(base_port=config.base_port) as client,
            client.register(1, 1, 7001, ip="10.0.0.1", ttl=1) as registration,
        ):
            first_scope.cancel()
            with trio.fail_after(4):  # a renewal's resends run out after 2 s
                while registration.error is None:
                    await trio.sleep(0.05)
            assert isinstance(registration.error, AgentUnavailable)
            second = Agent(config)
            await nursery.start(run, second, trio.CancelScope())
            with trio.fail_after(4):  # tried again within RENEW_RETRY + 2 s
                while registration.error is not None or len(second.registry) != 1:
                    await trio.sleep(0.05)
        assert fake.drops() == [wire.Drop(1, 1, IP, 7001, 0)]
        nursery.cancel_scope.cancel()
