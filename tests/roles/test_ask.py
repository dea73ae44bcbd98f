"""``ask``: one request to a role over TCP, its answer, and what a DNS says unasked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from lars import wire
from lars.errors import LarsError
from lars.roles.common import ask

STALE = wire.DnsState(1, 12, 7)


@asynccontextmanager
async def server(answer: Callable[[wire.Message], list[wire.Message]]) -> AsyncIterator[str]:
    """A peer that says STALE at once (as a stale DNS does to every new connection), then
    answers the request with ``answer(request)`` and closes."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(wire.encode_frame(STALE))
            decoder = wire.FrameDecoder()
            while not (requests := list(decoder)):
                decoder.feed(await stream.receive_some(65536))
            await stream.send_all(b"".join(wire.encode_frame(m) for m in answer(requests[0])))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def test_unasked_news_from_a_dns_is_skipped_for_the_answer() -> None:
    counters = wire.StatsResponse(1, "dns", {"connections": 2})
    async with server(lambda request: [STALE, counters]) as address:
        assert await ask(address, wire.StatsRequest(1)) == counters


async def test_a_peer_that_only_says_it_is_stale_did_not_answer() -> None:
    async with server(lambda request: []) as address:
        with pytest.raises(LarsError, match="without answering"):
            await ask(address, wire.StatsRequest(1))
