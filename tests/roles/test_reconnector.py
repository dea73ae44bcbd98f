"""Reconnector: which peer it connects to, and when it waits (issue 18's DNS moves)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from lars.roles.common import Metrics, Reconnector

log = logging.getLogger("test")


@asynccontextmanager
async def peers(count: int) -> AsyncIterator[list[str]]:
    """``count`` TCP listeners that accept and hold connections."""

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        addresses = []
        for _ in range(count):
            listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
            addresses.append(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        yield addresses
        nursery.cancel_scope.cancel()


def reconnector(addresses: list[str]) -> Reconnector:
    return Reconnector("dns", addresses, log=log, metrics=Metrics("agent"), retry_max=5.0)


async def test_an_avoided_address_is_skipped_while_another_is_there() -> None:
    async with peers(2) as (a, b):
        r = reconnector([a, b])
        for _ in range(3):
            address, stream = await r.connect(avoid={a})
            await stream.aclose()
            r.reconnect_now()
            assert address == b


async def test_when_every_address_is_avoided_they_are_all_tried() -> None:
    async with peers(2) as (a, b):
        r = reconnector([a, b])
        seen = set()
        for _ in range(2):
            address, stream = await r.connect(avoid={a, b})
            await stream.aclose()
            r.reconnect_now()
            seen.add(address)
        assert seen == {a, b}


async def test_a_short_session_waits_a_backoff_unless_ended_on_purpose() -> None:
    async with peers(1) as (a,):
        r = reconnector([a])
        _, stream = await r.connect()
        await stream.aclose()
        began = trio.current_time()
        _, stream = await r.connect()  # the session lasted no time: a backoff (~0.1 s)
        await stream.aclose()
        assert trio.current_time() - began >= 0.08
        r.reconnect_now()  # this one ended on purpose: a move, not a failure
        began = trio.current_time()
        _, stream = await r.connect()
        await stream.aclose()
        assert trio.current_time() - began < 0.05
