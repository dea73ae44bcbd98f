"""Plumbing shared by the roles: counters, rate-limited logs, backoff, TCP helpers."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import trio

from lars import wire, wire_original
from lars.config import parse_address
from lars.errors import LarsError, ProtocolError
from lars.tls import TlsContexts, TlsRefused, refusal_hint
from lars.tls import accept as tls_accept
from lars.tls import connect as tls_connect

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

    def log(self, level: int, message: str, *args: object, **kwargs: Any) -> None:
        """Log now, or count the message if one was logged less than ``interval`` ago.
        Safe to call from any thread (the agent's API threads use it)."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (and %d more like it since the last report)"
            args = (*args, self._suppressed)
        self.logger.log(level, message, *args, **kwargs)
        self._suppressed = 0
        self._next = now + self.interval

    def warning(self, message: str, *args: object, **kwargs: Any) -> None:
        """:meth:`log` at WARNING."""
        self.log(logging.WARNING, message, *args, **kwargs)

    def error(self, message: str, *args: object, **kwargs: Any) -> None:
        """:meth:`log` at ERROR."""
        self.log(logging.ERROR, message, *args, **kwargs)


def backoff(initial: float = 0.1, cap: float = 30.0) -> Iterator[float]:
    """Capped exponential backoff delays with jitter: 0.1, 0.2, 0.4 ... cap, cap, ..."""
    delay = initial
    while True:
        yield delay * random.uniform(0.8, 1.0)
        delay = min(cap, delay * 2)


async def open_listener(address: str, role: str) -> trio.SocketListener:
    """Bind a TCP listener on ``host:port`` (port 0: any free port); a clear LarsError if
    the address cannot be had."""
    host, port = parse_address(address, listen=True)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise LarsError(f"{role} cannot listen on tcp {address}: {exc.strerror or exc}") from None
    return listeners[0]


def bound_address(listener: trio.SocketListener) -> tuple[str, int]:
    """The ``(host, port)`` a listener is bound to."""
    host, port = listener.socket.getsockname()[:2]
    return host, port


async def ask(
    address: str,
    msg: wire.Message,
    wait: float = 2.0,
    *,
    tls: TlsContexts | None = None,
    expect: str = "dns",
) -> wire.Message:
    """Send one message to a role over TCP (mutual TLS to a peer of role ``expect`` with
    ``tls``) and return its first reply (StatsRequest and the like). Raises LarsError when
    the role cannot be reached, refuses us or does not answer."""
    try:
        host, port = parse_address(address)
        with trio.fail_after(wait):
            tcp = await trio.open_tcp_stream(host, port)
            async with await connect_tls(tcp, tls, expect) as stream:
                await stream.send_all(wire.encode_frame(msg))
                decoder = wire.FrameDecoder()
                while (items := await receive_messages(stream, decoder)) == []:
                    pass  # part of a frame so far
    except TlsRefused as exc:
        raise LarsError(f"{address} refused TLS: {exc.reason}") from None
    except (OSError, trio.TooSlowError) as exc:
        raise LarsError(f"no answer from {address}: {exc or 'timed out'}") from None
    if not items:
        hint = f" ({refusal_hint(None)})" if tls is not None else ""
        raise LarsError(f"{address} closed the connection without answering{hint}")
    reply = items[0]
    if isinstance(reply, ProtocolError):
        raise LarsError(f"bad answer from {address}: {reply}")
    return reply


async def notify_dns(
    addresses: list[str], version: int, wait: float = 0.5, *, tls: TlsContexts | None = None
) -> list[str]:
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
                tcp = await trio.open_tcp_stream(host, port)
                async with await connect_tls(tcp, tls, "dns") as stream:
                    await stream.send_all(frame)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, LarsError) as exc:
            failures.append(f"{address}: {exc or type(exc).__name__}")

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(notify, address)
    return failures


class Outbox:
    """What waits to be written to one connection, and the doorbell of its writer task.

    Subclasses decide what is queued and how it is encoded (:meth:`take`); one writer task
    per connection (:func:`write_loop`) sends it, so there is one writer per stream.
    """

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.closed = False
        self._bell_send, self.bell = trio.open_memory_channel[None](1)

    def ring(self) -> None:
        """Wake the writer (a no-op if it is already due to run)."""
        with contextlib.suppress(trio.WouldBlock):
            self._bell_send.send_nowait(None)

    def take(self) -> bytes:
        """Everything queued, encoded, with the queue emptied (b"" when nothing is)."""
        raise NotImplementedError


async def write_loop(stream: trio.abc.SendStream, outbox: Outbox, scope: trio.CancelScope) -> None:
    """Send what the outbox holds whenever its bell rings; cancel ``scope`` if the peer is
    gone."""
    try:
        async for _ in outbox.bell:
            while data := outbox.take():
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()


class Decoder(Protocol):
    """A TCP stream decoder: :class:`lars.wire.FrameDecoder` or
    :class:`lars.wire_original.FrameDecoder`."""

    def feed(self, data: bytes | bytearray | memoryview) -> None: ...

    def __iter__(self) -> Iterator[wire.Message]: ...


def take_messages(decoder: Decoder) -> list[wire.Message | ProtocolError]:
    """Every complete frame buffered in ``decoder``: messages, and a ProtocolError in place
    of each frame that did not decode. A ProtocolError without ``msg_type`` is always last:
    the stream is unusable after it."""
    items: list[wire.Message | ProtocolError] = []
    while True:
        try:
            items.extend(decoder)
            return items
        except ProtocolError as exc:
            items.append(exc)
            if exc.msg_type is None:
                return items


async def receive_messages(
    stream: trio.abc.ReceiveStream, decoder: Decoder
) -> list[wire.Message | ProtocolError] | None:
    """Receive once and decode every complete frame (see :func:`take_messages`). ``None``
    when the peer closed the stream."""
    try:
        data = await stream.receive_some(RECEIVE_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    if not data:
        return None
    decoder.feed(data)
    return take_messages(decoder)


async def sniff_protocol(stream: trio.abc.ReceiveStream) -> tuple[bool, bytes] | None:
    """Receive until the first bytes of a connection tell its protocol (see
    :func:`lars.wire_original.sniff_stream`): ``(original?, the bytes received)``, or None
    when the peer closed the stream first. The DNS and the reporter serve both on one port."""
    received = b""
    while (original := wire_original.sniff_stream(received)) is None:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        received += data
    return original, received


def stream_decoder(original: bool, max_frame: int, serves: int) -> Decoder:
    """The decoder of a connection in the protocol sniffed: the original's serving message
    id ``serves`` alone, or Lars's."""
    if original:
        return wire_original.FrameDecoder(max_frame, serves=(serves,))
    return wire.FrameDecoder(max_frame)


def refuse(
    error: ProtocolError, peer: str, metrics: Metrics, bad_input_log: RateLimitedLog
) -> wire.ErrorReply | None:
    """Count a frame that did not decode. Returns the ErrorReply to send for a well-formed
    request with invalid values, or None when the stream is unusable and must be closed
    (that is logged, at a rate limit)."""
    if error.msg_type is None:
        metrics.incr("malformed_frames")
        bad_input_log.warning("closing %s: %s", peer, error)
        return None
    metrics.incr("invalid_requests")
    return wire.ErrorReply(error.seq or 0, wire.RetCode.BAD_REQUEST, str(error))


def socket_of(stream: object) -> trio.socket.SocketType | None:
    """The socket under a socket stream, or under a TLS stream over one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def peer_name(stream: object) -> str:
    """``host:port`` of a socket stream's peer, for logs."""
    sock = socket_of(stream)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("", 0)
    except OSError:
        return "<stream>"
    return f"{host}:{port}" if host else "<stream>"


#: Seconds a session must have lasted for the reconnect backoff to start afresh.
HEALTHY_SESSION = 10.0


class Reconnector:
    """Connects to one of ``addresses`` (in turn, failing over), forever, with capped backoff.

    Logs once when a peer becomes unreachable, not on every retry; a full round of failed
    addresses waits the next backoff delay before the next round. A session that ends
    within HEALTHY_SESSION of its start also waits the next delay before reconnecting (and
    only a longer one resets the backoff), so a peer that accepts and then drops every
    connection is not hammered in a hot loop; the connect and loss lines of such a
    session are logged at a rate limit.
    """

    def __init__(
        self,
        what: str,
        addresses: list[str],
        *,
        log: logging.Logger,
        metrics: Metrics,
        retry_max: float,
        connect_timeout: float = 2.0,
        tls: TlsContexts | None = None,
    ) -> None:
        self.what = what
        #: Mutual TLS to a peer whose certificate names the role ``what`` (None: plaintext).
        self.tls = tls
        self.addresses = addresses
        self.log = log
        self.metrics = metrics
        self.retry_max = retry_max
        self.connect_timeout = connect_timeout
        self._attempt = 0
        self._delays = backoff(cap=retry_max)
        self._reported_down = False
        self._session_started: float | None = None
        self._connected_log = RateLimitedLog(log)

    async def connect(self) -> tuple[str, trio.abc.Stream]:
        """The next working connection, as ``(address, stream)``. Call it again when the
        session on the previous one has ended."""
        short = False
        if self._session_started is not None:
            lasted = trio.current_time() - self._session_started
            self._session_started = None
            if lasted >= HEALTHY_SESSION:
                self._delays = backoff(cap=self.retry_max)
            else:
                short = True
                await trio.sleep(next(self._delays))
        while True:
            address = self.addresses[self._attempt % len(self.addresses)]
            self._attempt += 1
            try:
                host, port = parse_address(address)
                with trio.fail_after(self.connect_timeout):
                    tcp = await trio.open_tcp_stream(host, port)
                keepalive(tcp)
                stream = await connect_tls(tcp, self.tls, self.what)
            except (OSError, trio.TooSlowError, TlsRefused) as exc:
                self.metrics.incr(f"{self.what}_connect_failures")
                if not self._reported_down:
                    self.log.warning(
                        "cannot reach %s %s (%s); retrying", self.what, address, exc or "timed out"
                    )
                    self._reported_down = True
                if self._attempt % len(self.addresses) == 0:  # a full round failed
                    await trio.sleep(next(self._delays))
                continue
            self._reported_down = False
            self._session_started = trio.current_time()
            self.metrics.incr(f"{self.what}_connects")
            if short:  # maybe one of many: at a rate limit
                self._connected_log.log(logging.INFO, "connected to %s %s", self.what, address)
            else:
                self.log.info("connected to %s %s", self.what, address)
            return address, stream


def keepalive(stream: trio.SocketStream) -> None:
    """Notice a silently dead peer within about 20 s (TCP keepalive)."""
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# --- TLS between the roles (issue 13) ----------------------------------------------------------

#: Message type -> the peer roles (lars.tls.ROLES) that may send it, per serving role.
PERMISSIONS: dict[str, dict[type[wire.Message], tuple[str, ...]]] = {
    # Agents read routes; admins (the CLI, the console) read them too (`lars query --dns`),
    # send change notices and ask for counters.
    "dns": {
        wire.GetRouteRequest: ("agent", "admin"),
        wire.RouteChangeNotice: ("admin",),
        wire.StatsRequest: ("admin",),
    },
    # Only agents write statistics.
    "reporter": {
        wire.ReportStatusRequest: ("agent",),
        wire.StatsRequest: ("admin",),
    },
}


def permitted(serving: str, peer_role: str | None, msg: wire.Message) -> bool:
    """True if a peer of ``peer_role`` may send ``msg`` to the ``serving`` role (a peer
    without a role, i.e. TLS off, may send anything)."""
    if peer_role is None:
        return True
    return peer_role in PERMISSIONS[serving].get(type(msg), ())


def may_connect(serving: str) -> tuple[str, ...]:
    """The roles that may connect to ``serving`` at all."""
    return tuple(sorted({r for roles in PERMISSIONS[serving].values() for r in roles}))


async def accept_tls(
    stream: trio.abc.Stream,
    contexts: TlsContexts,
    serving: str,
    peer: str,
    metrics: Metrics,
    refusals: RateLimitedLog,
) -> tuple[trio.abc.Stream, str] | None:
    """The server side of mutual TLS on an accepted connection: ``(TLS stream, peer role)``,
    or None when the peer was refused (logged at a rate limit, counted in ``tls_refused``;
    the connection is closed and nothing else is affected)."""
    try:
        return await tls_accept(stream, contexts, may_connect(serving))
    except TlsRefused as exc:
        metrics.incr("tls_refused")
        refusals.warning("refused a TLS connection from %s: %s", peer, exc.reason)
        return None


async def connect_tls(
    stream: trio.abc.Stream, contexts: TlsContexts | None, expect: str
) -> trio.abc.Stream:
    """The client side of mutual TLS to a role ``expect`` (the stream itself when TLS is
    off). Raises LarsError (TlsRefused) with the reason when refused."""
    if contexts is None:
        return stream
    return await tls_connect(stream, contexts, expect)
