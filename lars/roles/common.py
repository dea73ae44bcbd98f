"""Plumbing shared by the roles: counters, rate-limited logs, backoff, TCP helpers."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator

import trio

from lars import wire
from lars.config import parse_address
from lars.errors import LarsError

#: Bytes asked of the kernel per receive on a TCP stream.
RECEIVE_SIZE = 65536


class Metrics:
    """A role's counters and gauges, served to ``StatsRequest`` and ``lars stats``."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def incr(self, name: str, amount: int = 1) -> None:
        """Add to a counter."""
        self.counters[name] += amount

    def set(self, name: str, value: float) -> None:
        """Set a gauge."""
        self.gauges[name] = value

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge by name."""
        return {**self.counters, **self.gauges}

    def response(self, seq: int) -> wire.StatsResponse:
        """The reply to a StatsRequest."""
        return wire.StatsResponse(seq, self.role, self.snapshot())


class RateLimitedLog:
    """Logs a recurring problem at most once per ``interval`` seconds, with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next = -math.inf
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        """Log now, or count the message if one was logged less than ``interval`` ago."""
        now = trio.current_time()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, self._suppressed)
        self.logger.warning(message, *args)
        self._suppressed = 0
        self._next = now + self.interval


def backoff(initial: float = 0.1, cap: float = 30.0) -> Iterator[float]:
    """Capped exponential backoff delays with jitter: 0.1, 0.2, 0.4 ... cap, cap, ..."""
    delay = initial
    while True:
        yield delay * random.uniform(0.8, 1.0)
        delay = min(cap, delay * 2)


async def open_listener(address: str) -> trio.SocketListener:
    """Bind a TCP listener on ``host:port`` (port 0: any free port)."""
    host, port = parse_address(address, listen=True)
    listeners = await trio.open_tcp_listeners(port, host=host)
    return listeners[0]


def bound_address(listener: trio.SocketListener) -> tuple[str, int]:
    """The ``(host, port)`` a listener is bound to."""
    host, port = listener.socket.getsockname()[:2]
    return host, port


async def send_frames(stream: trio.abc.SendStream, messages: list[wire.Message]) -> None:
    """Encode and send several messages in one write."""
    await stream.send_all(b"".join(wire.encode_frame(m) for m in messages))


async def notify_dns(addresses: list[str], version: int, wait: float = 0.5) -> list[str]:
    """Tell DNS instances the routes changed (``RouteChangeNotice``). Returns the failures.

    Best effort by design: the DNS poll is the fallback, so a DNS that is down or slow
    costs the caller at most ``wait`` seconds and never fails the write.
    """
    failures: list[str] = []
    frame = wire.encode_frame(wire.RouteChangeNotice(version))

    async def notify(address: str) -> None:
        try:
            host, port = parse_address(address)
            with trio.fail_after(wait):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(frame)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, LarsError) as exc:
            failures.append(f"{address}: {exc or type(exc).__name__}")

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(notify, address)
    return failures
