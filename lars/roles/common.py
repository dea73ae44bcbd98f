"""Plumbing shared by the roles: counters, rate-limited logs, backoff, TCP helpers, and the
connection limits of the DNS and the reporter (:class:`ConnectionGate`, :class:`Session`)."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import enum
import errno
import functools
import ipaddress
import logging
import math
import random
import resource
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any, Protocol

import attrs
import trio
from prometheus_client.core import Metric

from lars import wire, wire_original
from lars.config import DEFAULT_MAX_CONNECTIONS, DnsConfig, ReporterConfig, parse_address
from lars.core.model import UINT32_MAX
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
    ``tls``) and return its first reply (StatsRequest and the like), skipping what a DNS
    says unasked (a DnsState). Raises LarsError when the role cannot be reached, refuses
    us or does not answer."""
    try:
        host, port = parse_address(address)
        with trio.fail_after(wait):
            tcp = await trio.open_tcp_stream(host, port)
            async with await connect_tls(tcp, tls, expect) as stream:
                await stream.send_all(wire.encode_frame(msg))
                decoder = wire.FrameDecoder()
                items: list[wire.Message | ProtocolError] | None = []
                while items == []:  # part of a frame, or only unasked news, so far
                    items = await receive_messages(stream, decoder)
                    if items:
                        items = [item for item in items if not isinstance(item, wire.DnsState)]
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

    @property
    def buffered(self) -> int: ...

    @property
    def in_frame(self) -> bool: ...

    def feed(self, data: bytes | bytearray | memoryview) -> None: ...

    def __iter__(self) -> Iterator[wire.Message]: ...


def frame_started(decoder: Decoder) -> bool:
    """True while part of a frame has arrived in ``decoder`` (its length header alone
    counts)."""
    return decoder.in_frame


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

    def reconnect_now(self) -> None:
        """The session ended on purpose (moving to another peer): the next :meth:`connect`
        waits no backoff for it."""
        self._session_started = None

    async def connect(self, avoid: Collection[str] = ()) -> tuple[str, trio.abc.Stream]:
        """The next working connection, as ``(address, stream)``. Call it again when the
        session on the previous one has ended. Addresses in ``avoid`` are tried only when
        every address is in it."""
        short = False
        if self._session_started is not None:
            lasted = trio.current_time() - self._session_started
            self._session_started = None
            if lasted >= HEALTHY_SESSION:
                self._delays = backoff(cap=self.retry_max)
            else:
                short = True
                await trio.sleep(next(self._delays))
        addresses = [a for a in self.addresses if a not in avoid] or self.addresses
        while True:
            address = addresses[self._attempt % len(addresses)]
            self._attempt += 1
            try:
                host, port = parse_address(address)
                with trio.fail_after(self.connect_timeout):
                    tcp = await trio.open_tcp_stream(host, port)
                try:
                    keepalive(tcp)
                    stream = await connect_tls(tcp, self.tls, self.what)
                except OSError:
                    await trio.aclose_forcefully(tcp)
                    raise
            except (OSError, trio.TooSlowError, TlsRefused) as exc:
                self.metrics.incr(f"{self.what}_connect_failures")
                if not self._reported_down:
                    self.log.warning(
                        "cannot reach %s %s (%s); retrying", self.what, address, exc or "timed out"
                    )
                    self._reported_down = True
                if self._attempt % len(addresses) == 0:  # a full round failed
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
        wire.LeaseUpdate: ("agent",),  # its services' registrations (DESIGN §14)
        wire.RouteChangeNotice: ("admin",),
        wire.StatsRequest: ("admin",),
        # Serve a reload held by the shrink guard now (`lars route confirm`, DESIGN §13).
        wire.ShrinkConfirm: ("admin",),
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


# --- connection limits of the DNS and the reporter (issue 13) -------------------------------

#: accept() errors that mean "out of resources for now": retried with backoff, not raised.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Backoff between accept() retries after such an error: 0.1 s doubling to 5 s.
ACCEPT_RETRY_INITIAL = 0.1
ACCEPT_RETRY_MAX = 5.0
#: File descriptors a role keeps for itself beyond its connections and admin reserve
#: (listeners, store connections, log files, the HTTP listener).
FD_MARGIN = 64
#: Bytes asked of the kernel per receive on a connection that went over its control rate:
#: about 300 change notices, so each pause of its reading costs at most that many decodes.
THROTTLED_RECEIVE_SIZE = 4096
#: Bytes of a frame left in a closed connection's buffer from which the memory is handed
#: back to the system (see ConnectionGate.release_memory), and the seconds a burst of such
#: closes is waited out first.
RELEASE_ABOVE = 65536
RELEASE_DELAY = 0.5
#: Share of max_connections from which a role counts as crowded: a plaintext connection
#: accepted then must send its first frame within first_frame_timeout (see Session).
CROWDED_SHARE = 0.5


@attrs.frozen
class Limits:
    """A role's connection limits: the keys of the same names in ``[dns]`` and ``[reporter]``."""

    max_connections: int
    admin_reserve: int
    first_frame_timeout: float
    frame_timeout: float
    control_rate: float
    control_burst: int

    @classmethod
    def of(cls, config: DnsConfig | ReporterConfig) -> Limits:
        """The limits a role's config sets."""
        return cls(
            config.max_connections,
            config.admin_reserve,
            config.first_frame_timeout,
            config.frame_timeout,
            config.control_rate,
            config.control_burst,
        )


class Seat(enum.Enum):
    """Where a new connection may sit (:func:`seat_for`)."""

    REGULAR = "regular"
    #: One of the admin reserve: the connection stays only if its peer is an admin.
    RESERVE = "reserve"
    NONE = "none"


def seat_for(open_connections: int, max_connections: int, admin_reserve: int) -> Seat:
    """The seat of a connection arriving while ``open_connections`` are open: a regular one
    below ``max_connections``, then one of the ``admin_reserve``, then none."""
    if open_connections < max_connections:
        return Seat.REGULAR
    if open_connections < max_connections + admin_reserve:
        return Seat.RESERVE
    return Seat.NONE


class TokenBucket:
    """At most ``rate`` events a second on average and ``burst`` at once. Pure: the caller
    passes the time (trio's clock, so that tests run it on a MockClock)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> float:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self, now: float) -> bool:
        """Take a token: True if there was one."""
        if self._refill(now) >= 1:
            self._tokens -= 1
            return True
        return False

    def full_in(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return (self.burst - self._refill(now)) / self.rate


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, and 127.x mapped into IPv6)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def peer_is_loopback(stream: object) -> bool:
    """True if a socket stream's peer has a loopback address."""
    sock = socket_of(stream)
    try:
        return sock is not None and is_loopback(sock.getpeername()[0])
    except OSError:
        return False


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: its malloc does what it does
        return None
    return trim


def malloc_trim() -> None:
    """Return the free memory of glibc's malloc to the system (its ``malloc_trim(0)``,
    which releases free pages anywhere in the heap, not only at its top); a no-op
    elsewhere. It takes a few milliseconds on a large heap: call it once per burst."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


@attrs.define
class _Slot:
    """An accepted connection, as the gate counts it."""

    reserve: bool
    #: Accepted while the role was crowded (CROWDED_SHARE of max_connections open).
    crowded: bool
    accepted_at: float
    #: The TLS handshake of a reserve seat, cancelled if a newer connection needs the seat.
    handshake: trio.CancelScope | None = None


#: A role's connection handler, as given to :meth:`ConnectionGate.serve`.
Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class ConnectionGate:
    """Admits the connections of a DNS or a reporter and watches how they are read
    (DESIGN §16; the attacks of issue 13: idle connections by the ten thousand, half-sent
    frames, floods of change notices, accept() failing with EMFILE).

    * **A limit with a reserve.** At most ``max_connections`` are open at once, TLS
      handshakes in progress included. Beyond it a new connection is accepted and closed at
      once (counted in ``connections_refused``, logged at a rate limit): the connections
      already open keep working, and a refused client learns it at once instead of waiting
      in the listen backlog. ``admin_reserve`` more seats are kept for admins, so that
      `lars stats`, change notices and the console get in while agents or an attacker hold
      every regular seat. With TLS on, a connection in the reserve gets its handshake and
      stays only if its certificate names ``lars://admin``; while every seat of the reserve
      is held by a handshake not done yet, a newer connection takes the oldest one's (see
      ``_admit``). With TLS off there are no
      identities, so a peer on a loopback address counts as an admin: the CLI and the
      console run on the DNS host or reach it through it (ssh), agents elsewhere connect
      from their own addresses, and whoever can connect from loopback has the host anyway.
    * **It fits the open-files limit.** A limit above what the process may open would hit
      EMFILE first, and the reserve would never be reached: at start ``max_connections`` is
      lowered, with a warning, to leave the reserve and FD_MARGIN descriptors free.
    * **accept() out of resources** (EMFILE, ENFILE, ENOBUFS, ENOMEM: other processes, or
      several roles in one process) is retried after 0.1 s doubling to 5 s, reset by the next
      success; it is logged at a rate limit with a count, and counted in ``accept_errors``.
    * **Deadlines and the control rate** of each admitted connection: see :class:`Session`.
    * **Memory back to the system.** A connection closed with a large partial frame frees
      its buffer, but glibc's malloc keeps freed memory that is not at the top of its heap:
      300 half-sent 1 MiB frames, dropped, left 150 MB behind. So once such a burst is over
      (RELEASE_DELAY), :func:`malloc_trim` hands the free pages back.
    """

    def __init__(
        self,
        serving: str,
        limits: Limits,
        *,
        metrics: Metrics,
        log: logging.Logger,
        tls: TlsContexts | None = None,
    ) -> None:
        self.serving = serving
        self.limits = limits
        #: The limit in force: ``limits.max_connections``, or less to fit the fd limit.
        self.max_connections = limits.max_connections
        #: How many gates share this process's open-files limit (a DNS and a reporter in one
        #: `lars run`): each fits its connections in its share.
        self.fd_share = 1
        self.tls = tls
        self.metrics = metrics
        self.log = log
        self._slots: dict[trio.abc.Stream, _Slot] = {}
        #: Reserve seats whose TLS handshake is not done yet, oldest first.
        self._handshaking: dict[trio.abc.Stream, _Slot] = {}
        self._refused_log = RateLimitedLog(log)
        self._accept_log = RateLimitedLog(log)
        self._tls_log = RateLimitedLog(log)
        self._timeout_log = RateLimitedLog(log)
        self._rate_log = RateLimitedLog(log)
        self._forbidden_log = RateLimitedLog(log)
        #: The control-rate buckets by peer address (not by connection: a peer opening a
        #: connection per notice gets no fresh burst), least recently used first.
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._release_due = trio.Event()
        metrics.set("max_connections", self.max_connections)

    def control_bucket(self, peer: str, now: float) -> TokenBucket:
        """The control-rate bucket of the peer address ``peer`` (host, without the port).
        At most max_connections + admin_reserve peers are remembered; the one unheard of
        longest goes first (its bucket is as good as full by then, or nearly)."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            limits = self.limits
            bucket = self._buckets[peer] = TokenBucket(
                limits.control_rate, limits.control_burst, now
            )
            if len(self._buckets) > self.max_connections + limits.admin_reserve:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket

    @property
    def open_connections(self) -> int:
        """Connections accepted through :meth:`serve` and not yet closed."""
        return len(self._slots)

    async def serve(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        handler: Handler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` and run ``handler`` on each admitted one (the
        stream is closed after it) until cancelled. Replaces ``trio.serve_listeners``, whose
        retry after EMFILE is a fixed 0.1 s with a log line each time."""
        self.fit_fd_limit()
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(self._release_loop)
            task_status.started()
            delays: Iterator[float] | None = None
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    delays = delays or backoff(ACCEPT_RETRY_INITIAL, ACCEPT_RETRY_MAX)
                    delay = next(delays)
                    self.metrics.incr("accept_errors")
                    self._accept_log.error(
                        "cannot accept connections: %s (%d open); retrying in %.1fs",
                        exc.strerror or exc,
                        self.open_connections,
                        delay,
                    )
                    await trio.sleep(delay)
                    continue
                delays = None
                slot = self._admit(stream)
                if slot is None:
                    await trio.aclose_forcefully(stream)
                    continue
                self._slots[stream] = slot
                self._count()
                nursery.start_soon(self._run, handler, stream)

    def fit_fd_limit(self) -> None:
        """Lower ``max_connections`` to what the open-files limit allows (see the class)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        room = max(1, (soft - FD_MARGIN) // self.fd_share - self.limits.admin_reserve)
        if self.limits.max_connections > room:
            self.max_connections = room
            self.metrics.set("max_connections", room)
            # A limit the operator set is worth a warning; the default fitted is just news.
            configured = self.limits.max_connections != DEFAULT_MAX_CONNECTIONS
            self.log.log(
                logging.WARNING if configured else logging.INFO,
                "%s max_connections %d does not fit the open-files limit %d (with the admin"
                " reserve of %d and %d descriptors kept free): serving at most %d; raise the"
                " limit (ulimit -n, LimitNOFILE=) to serve more",
                self.serving,
                self.limits.max_connections,
                soft,
                self.limits.admin_reserve,
                FD_MARGIN,
                room,
            )

    def _admit(self, stream: trio.abc.Stream) -> _Slot | None:
        open_now = len(self._slots)
        seat = seat_for(open_now, self.max_connections, self.limits.admin_reserve)
        if seat is Seat.RESERVE and self.tls is None and not peer_is_loopback(stream):
            seat = Seat.NONE  # no certificate to tell an admin: only loopback peers
        if seat is Seat.NONE and self._handshaking:
            # The reserve is full of handshakes in progress: the oldest makes room. Else a
            # few connections that never finish a handshake, renewed every
            # handshake_timeout, would keep the admins out; this way an admin's handshake
            # (milliseconds) would have to be outrun by admin_reserve newer connections.
            oldest, slot = next(iter(self._handshaking.items()))
            del self._handshaking[oldest]
            assert slot.handshake is not None
            slot.handshake.cancel()
            seat = Seat.RESERVE
        if seat is Seat.NONE:
            self._refuse(peer_name(stream), "not from an admin")
            return None
        crowded = open_now >= self.max_connections * CROWDED_SHARE
        slot = _Slot(seat is Seat.RESERVE, crowded, trio.current_time())
        if slot.reserve and self.tls is not None:
            slot.handshake = trio.CancelScope()
            self._handshaking[stream] = slot
        return slot

    def _count(self) -> None:
        self.metrics.set("connections_open", len(self._slots))

    def _refuse(self, peer: str, why: str) -> None:
        self.metrics.incr("connections_refused")
        self._refused_log.warning(
            "refused a connection from %s: %d connections open, the limit is %d"
            " (max_connections) and %d more for admins, %s",
            peer,
            len(self._slots),
            self.max_connections,
            self.limits.admin_reserve,
            why,
        )

    async def _run(self, handler: Handler, stream: trio.abc.Stream) -> None:
        try:
            await handler(stream)
        finally:
            del self._slots[stream]
            self._handshaking.pop(stream, None)
            self._count()
            await trio.aclose_forcefully(stream)

    async def open(self, stream: trio.abc.Stream) -> Session | None:
        """Start serving an accepted connection: the TLS handshake when TLS is on, and the
        reserve's rule. None when the peer is refused (logged and counted; the stream is
        closed). A stream that did not come through :meth:`serve` (tests) has no seat to
        check and no first-frame deadline."""
        peer = peer_name(stream)
        slot = self._slots.get(stream)
        role = None
        if self.tls is not None:
            handshake = slot.handshake if slot is not None else None
            with handshake or trio.CancelScope():
                accepted = await accept_tls(
                    stream, self.tls, self.serving, peer, self.metrics, self._tls_log
                )
            self._handshaking.pop(stream, None)
            if handshake is not None and handshake.cancelled_caught:
                self._refuse(peer, "and a newer connection took its seat in the reserve")
                return None
            if accepted is None:
                return None
            stream, role = accepted
            if slot is not None and slot.reserve and role != "admin":
                self._refuse(peer, f"and it is lars://{role}, not lars://admin")
                await trio.aclose_forcefully(stream)
                return None
        first_frame_due = math.inf
        if role is None and slot is not None and slot.crowded:
            first_frame_due = slot.accepted_at + self.limits.first_frame_timeout
        return Session(stream, peer, role, self, first_frame_due)

    def timed_out(self, session: Session, in_frame: bool) -> None:
        """Count and log (at a rate limit) a connection closed past its deadline: the
        frame_timeout of a frame ``in_frame``, else the first_frame_timeout."""
        self.metrics.incr("frame_timeouts")
        if in_frame:
            self._timeout_log.warning(
                "closing %s: a frame still incomplete %gs after its first bytes (frame_timeout)",
                session.peer,
                self.limits.frame_timeout,
            )
        else:
            self._timeout_log.warning(
                "closing %s: no frame within %gs of connecting while crowded (first_frame_timeout)",
                session.peer,
                self.limits.first_frame_timeout,
            )

    def release_memory(self) -> None:
        """Hand freed memory back to the system soon (see the class docstring)."""
        self._release_due.set()

    async def _release_loop(self) -> None:
        while True:
            await self._release_due.wait()
            await trio.sleep(RELEASE_DELAY)  # the rest of the burst, and the buffers freed
            self._release_due = trio.Event()
            malloc_trim()

    def forbidden(self, peer: str, role: str | None, what: str) -> None:
        """Count and log (at a rate limit) what a peer's role may not do."""
        self.metrics.incr("forbidden_requests")
        self._forbidden_log.warning("%s (lars://%s) %s", peer, role, what)

    def refuse_message(self, peer: str, role: str | None, msg: wire.Message) -> wire.ErrorReply:
        """Count and log a message the peer's role may not send; the ErrorReply that tells
        the peer why (the connection goes on: one message costs itself alone)."""
        name = type(msg).__name__
        self.forbidden(peer, role, f"may not send {name}; refused")
        seq = getattr(msg, "seq", 0)
        seq = seq if 0 <= seq <= UINT32_MAX else 0  # ErrorReply.seq is 32 bits
        reason = f"lars://{role} may not send {name} to the {self.serving} role"
        return wire.ErrorReply(seq, wire.RetCode.BAD_REQUEST, reason)

    def rate_limited(self, session: Session) -> None:
        """Count and log (at a rate limit) a control message dropped over the rate."""
        self.metrics.incr("rate_limited")
        self._rate_log.warning(
            "%s sends change notices or StatsRequests faster than %g/s (control_rate):"
            " dropping the excess and reading it more slowly",
            session.peer,
            self.limits.control_rate,
        )


class Session:
    """An admitted connection: its stream (TLS done), its peer, the peer's role under TLS,
    and the reading of its frames under deadlines and the control rate.

    **Deadlines.** The rest of a frame must arrive within ``frame_timeout`` of its first
    bytes, so a half-sent frame (a slowloris, or 1 MiB less a byte held open) costs its
    buffer for that long at most: then the connection is closed and the buffer freed
    (counted in ``frame_timeouts``, logged at a rate limit). Time the role spends on the
    frames before it (a full queue, an agent that does not read its routes) is not counted.
    Between frames there is no deadline: agents keep their sessions for days with nothing to
    say (an agent's DNS session sends its first GetRouteRequest only when an application
    asks for a route, its reporter session its first report only after calls).

    So the *first* frame is due within ``first_frame_timeout`` of connecting only from a
    connection that is not authenticated and arrived in a crowd:

    * with TLS on there is no such deadline: the handshake, under its own timeout, already
      sends away whoever is not an agent or an admin, and what an authenticated peer does
      with its seat is its business;
    * with TLS off, only a connection accepted while CROWDED_SHARE of ``max_connections``
      were open has one: quiet agents that connected in normal times keep their sessions,
      while in a flood of idle connections those that never speak give their seats back
      after ``first_frame_timeout`` (an agent among them reconnects, and sends at once if it
      has anything to ask). A flood that took the first seats keeps them: TLS is the answer.

    **Control rate.** Change notices and StatsRequests are limited per connection by a token
    bucket (``control_rate`` a second, ``control_burst`` at once): beyond it the message is
    dropped (counted in ``rate_limited``) and the connection stays. Dropping alone would
    still cost the decoding of every frame (about 2.5 µs each: a 90,000/s flood is a quarter
    of a CPU), so the connection is also not read until its bucket is full again, and from
    then on THROTTLED_RECEIVE_SIZE bytes at a time: the flood waits in its sender's TCP
    buffers, and costs the role a few hundred decodes per ``control_burst / control_rate``
    seconds.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str,
        role: str | None,
        gate: ConnectionGate,
        first_frame_due: float = math.inf,
    ) -> None:
        self.stream = stream
        self.peer = peer
        #: The peer's role under TLS (lars.tls.ROLES); None without TLS.
        self.role = role
        self._gate = gate
        #: When the first frame is due (inf: no deadline, or one has arrived).
        self._first_frame_due = first_frame_due
        #: When the frame in progress is due (None: not yet set, see _receive_some).
        self._frame_due: float | None = None
        self._decoder: Decoder | None = None
        self._sniffed = b""
        #: Until when the reading pauses, once over the control rate.
        self._resume_at: float | None = None
        self._receive_size = RECEIVE_SIZE
        #: The control-rate bucket: the peer address's (see ConnectionGate.control_bucket),
        #: or this connection's own for a loopback peer. Found at the first control message.
        self._bucket: TokenBucket | None = None

    async def sniff(self) -> bool | None:
        """Receive until the first bytes tell the protocol (see
        :func:`lars.wire_original.sniff_stream`): True for the original's, False for Lars's,
        None when the peer closed the stream (or missed its deadline) first, or spoke the
        original's protocol over TLS. The DNS and the reporter serve both on one port. Then
        call :meth:`start`."""
        received = b""
        while (original := wire_original.sniff_stream(received)) is None:
            data = await self._receive_some(bool(received))
            if not data:
                return None
            received += data
        if original and self.role is not None:
            # Original agents speak plaintext only: under TLS this is someone else (an admin
            # writing statistics, say) in the original's framing, which no role may use.
            self._gate.forbidden(self.peer, self.role, "spoke the original protocol over TLS")
            return None
        self._sniffed = received
        return original

    def start(self, decoder: Decoder) -> list[wire.Message | ProtocolError]:
        """Decode with ``decoder`` from now on; the frames complete in what :meth:`sniff`
        received (see :func:`take_messages`)."""
        self._decoder = decoder
        decoder.feed(self._sniffed)
        self._sniffed = b""
        return self._take(decoder)

    async def receive(self) -> list[wire.Message | ProtocolError] | None:
        """Receive once and decode every complete frame (see :func:`take_messages`); None
        when the peer closed the stream or missed a deadline."""
        decoder = self._decoder
        assert decoder is not None, "start() first"
        resume_at = self._resume_at
        if resume_at is not None and resume_at > trio.current_time():  # over its rate: wait
            await trio.sleep_until(resume_at)
        data = await self._receive_some(frame_started(decoder))
        if not data:
            if decoder.buffered >= RELEASE_ABOVE:  # a large buffer is about to be freed
                self._gate.release_memory()
            return None
        decoder.feed(data)
        return self._take(decoder)

    def _take(self, decoder: Decoder) -> list[wire.Message | ProtocolError]:
        items = take_messages(decoder)
        if items:  # progress: the first frame is in, and the next frame's time starts anew
            self._first_frame_due = math.inf
            self._frame_due = None
        return items

    async def _receive_some(self, in_frame: bool) -> bytes | bytearray:
        """The next bytes; b"" at the end of the stream or past the deadline."""
        due = self._first_frame_due
        if in_frame:
            if self._frame_due is None:  # its first bytes, or the role just took frames
                self._frame_due = trio.current_time() + self._gate.limits.frame_timeout
            due = min(due, self._frame_due)
        else:
            self._frame_due = None
        try:
            if due == math.inf:  # no timer at all between an agent's frames
                return await self.stream.receive_some(self._receive_size)
            with trio.move_on_at(due):
                return await self.stream.receive_some(self._receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        self._gate.timed_out(self, due != self._first_frame_due)
        return b""

    def allow_control(self) -> bool:
        """True if the peer may send one more change notice or StatsRequest now; False
        (counted, logged at a rate limit) when the message is to be dropped: then this
        connection is not read until its bucket is full again."""
        now = trio.current_time()
        bucket = self._bucket
        if bucket is None:
            host = self.peer.rpartition(":")[0] or self.peer
            if is_loopback(host):
                # This host's own tools (the CLI, the console, health checks): one bucket per
                # connection, so that a local flood cannot starve them of their counters.
                limits = self._gate.limits
                bucket = TokenBucket(limits.control_rate, limits.control_burst, now)
            else:
                bucket = self._gate.control_bucket(host, now)
            self._bucket = bucket
        if bucket.take(now):
            return True
        self._resume_at = now + bucket.full_in(now)
        self._receive_size = THROTTLED_RECEIVE_SIZE
        self._gate.rate_limited(self)
        return False


def gate_metrics(
    counter: Callable[[str, str], Metric],
    gauge: Callable[[str, str, float], Metric],
    gate: ConnectionGate,
    rate_limited: str,
) -> Iterator[Metric]:
    """The connection limits' series of a role's collector (``counter``/``gauge`` name them
    for the role); ``rate_limited`` says what the role drops over ``control_rate``."""
    yield counter(
        "connections_refused",
        "Connections closed at once: over max_connections (and not an admin's).",
    )
    yield counter(
        "frame_timeouts",
        "Connections closed for a frame not complete within frame_timeout, or no first"
        " frame within first_frame_timeout.",
    )
    yield counter("rate_limited", rate_limited)
    yield counter("tls_refused", "TLS connections refused: handshake failed, or a role not let in.")
    yield counter(
        "forbidden_requests", "Requests a peer's role may not make (the connection is closed)."
    )
    yield counter("accept_errors", "Failed accepts (EMFILE and the like), retried.")
    yield gauge(
        "connections_open",
        "Connections accepted and not closed, TLS handshakes included: what"
        " max_connections counts.",
        gate.open_connections,
    )
    yield gauge(
        "max_connections",
        "The connection limit in force: max_connections, or less to fit the open-files limit.",
        gate.max_connections,
    )
