"""The agent role: the local UDP API, the route cache and the load balancers of one host.

I/O shell around :class:`lars.core.table.ModuleTable`:

* **UDP API** on ``base_port .. base_port + ports - 1``; module ``(modid, cmdid)`` belongs on
  ``base_port + (modid + cmdid) % ports``. Each port is served by one task that, once the
  socket is readable, drains every queued datagram with plain non-blocking calls (no
  scheduler round trip per datagram) and answers each one at once. No task is spawned per
  request, and get_host / report cost O(1).
* **DNS client**: a list of DNS addresses; connect to one, request every known module, apply
  answers and pushes; on loss fail over to the next address, forever, with capped backoff.
  While no DNS is reachable the cache keeps serving.
* **Waits**: the first request for an unknown module waits up to ``route_wait`` for DNS; a
  timer task answers NOEXIST to waits that run out.

Bad datagrams (not msgpack, wrong types, ids out of range) are counted and dropped, or
answered with an ErrorReply when they carry a sequence number; they never stop the agent.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import trio

from lars import wire
from lars.config import AgentConfig, parse_address
from lars.core.model import ModuleKey
from lars.core.table import GET_HOST, GET_ROUTE, ModuleTable, Waiter
from lars.errors import ProtocolError
from lars.roles.common import RECEIVE_SIZE, Metrics, RateLimitedLog, backoff

log = logging.getLogger("lars.agent")

#: Datagrams handled per wake-up before letting other tasks run.
DRAIN_BATCH = 256
#: Seconds to wait for a TCP connection to a DNS.
CONNECT_TIMEOUT = 2.0
#: Receive buffer asked of the kernel for each API socket.
SOCKET_BUFFER = 4 << 20

_SUCC = wire.RetCode.SUCC
_BAD = wire.RetCode.BAD_REQUEST


def port_for(module: ModuleKey, base_port: int, ports: int) -> int:
    """The API port that serves ``module`` (the original Lars rule)."""
    return base_port + (module[0] + module[1]) % ports


class Agent:
    """One agent process: serves ``port_indexes`` of the configured API ports."""

    def __init__(self, config: AgentConfig, port_indexes: Sequence[int] | None = None) -> None:
        self.config = config
        self.port_indexes = list(range(config.ports) if port_indexes is None else port_indexes)
        self.table = ModuleTable(config.loadbalance, config.route_wait)
        self.metrics = Metrics("agent")
        self.dns_address: str | None = None
        #: Set whenever a route arrives from DNS (tests wait on it).
        self.route_received = trio.Event()
        self._dns_bell = trio.Event()
        self._wait_bell = trio.Event()
        self._bad_input_log = RateLimitedLog(log)
        self._sockets: list[socket.socket] = []
        self._socket_by_port: dict[int, socket.socket] = {}

    # --- serving ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the API ports, connect to DNS, and serve until cancelled."""
        host = self.config.host
        try:
            for index in self.port_indexes:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.setblocking(False)
                sock.bind((host, self.config.base_port + index))
            ports = [s.getsockname()[1] for s in self._sockets]
            self._socket_by_port = dict(zip(ports, self._sockets, strict=True))
            async with trio.open_nursery() as nursery:
                for sock in self._sockets:
                    nursery.start_soon(self._serve_socket, sock)
                nursery.start_soon(self._dns_loop)
                nursery.start_soon(self._wait_timer)
                log.info(
                    "agent API on udp %s ports %s; dns %s",
                    host,
                    ",".join(map(str, ports)),
                    ", ".join(self.config.dns),
                )
                task_status.started(ports)
        finally:
            for sock in self._sockets:
                sock.close()

    async def _serve_socket(self, sock: socket.socket) -> None:
        recvfrom = sock.recvfrom
        handle = self.handle_datagram
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(DRAIN_BATCH):
                try:
                    data, address = recvfrom(RECEIVE_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ICMP "port unreachable" from a gone client
                    if exc.errno != errno.ECONNREFUSED:
                        raise
                    continue
                reply = handle(data, address)
                if reply is not None:
                    try:
                        sock.sendto(reply, address)
                    except OSError:  # the client's buffer is full or it is gone: UDP drops
                        self.metrics.incr("replies_dropped")
            else:
                await trio.lowlevel.checkpoint()  # a full batch: let the other tasks run
            if self.table.want:
                self._dns_bell.set()

    def handle_datagram(self, data: bytes, address: Any) -> bytes | None:
        """Answer one API datagram (None: no reply). Never raises for bad input."""
        try:
            msg = wire.decode_datagram(data)
        except ProtocolError as exc:
            return self._bad_datagram(exc, address)
        now = trio.current_time()
        if type(msg) is wire.GetHostRequest:
            key = (msg.modid, msg.cmdid)
            waiter = Waiter(GET_HOST, msg.seq, address)
            retcode, host = self.table.get_host(key, now, waiter)
            if retcode < 0:
                self._wait_bell.set()
                return None
            return wire.encode_datagram(
                wire.GetHostResponse(msg.seq, msg.modid, msg.cmdid, retcode, host)
            )
        if type(msg) is wire.ReportRequest:
            self.table.report((msg.modid, msg.cmdid), msg.host, msg.retcode == 0, now)
            return None
        return self._other(msg, address, now)

    def _other(self, msg: wire.Message, address: Any, now: float) -> bytes | None:
        if isinstance(msg, wire.ApiGetRouteRequest):
            key = (msg.modid, msg.cmdid)
            retcode, hosts = self.table.get_route(key, now, Waiter(GET_ROUTE, msg.seq, address))
            if retcode < 0:
                self._wait_bell.set()
                return None
            return self._route_reply(msg.seq, key, retcode, hosts)
        if isinstance(msg, wire.AgentStateRequest):
            key = (msg.modid, msg.cmdid)
            state = self.table.describe(key, now, time.time())
            retcode = wire.RetCode.NOEXIST if state is None else _SUCC
            return wire.encode_datagram(
                wire.AgentStateResponse(msg.seq, msg.modid, msg.cmdid, retcode, state or {})
            )
        if isinstance(msg, wire.StatsRequest):
            self.metrics.set("modules", len(self.table.modules))
            self.metrics.set("pending_modules", len(self.table.pending))
            self.metrics.set("dns_connected", int(self.dns_address is not None))
            return wire.encode_datagram(self.metrics.response(msg.seq))
        self.metrics.incr("invalid_requests")
        seq = getattr(msg, "seq", 0)
        reason = f"the agent does not serve {type(msg).__name__}"
        return wire.encode_datagram(wire.ErrorReply(seq, _BAD, reason))

    def _route_reply(self, seq: int, key: ModuleKey, retcode: int, hosts: Any) -> bytes:
        msg = wire.ApiGetRouteResponse(seq, key[0], key[1], retcode, tuple(hosts or ()))
        try:
            return wire.encode_datagram(msg)
        except ProtocolError:
            reason = f"route of {key[0]}/{key[1]} has too many hosts for one datagram"
            return wire.encode_datagram(wire.ErrorReply(seq, wire.RetCode.SYSTEM_ERROR, reason))

    def _bad_datagram(self, exc: ProtocolError, address: Any) -> bytes | None:
        if exc.msg_type is not None and exc.seq is not None:
            self.metrics.incr("invalid_requests")
            return wire.encode_datagram(wire.ErrorReply(exc.seq, _BAD, str(exc)))
        self.metrics.incr("malformed_datagrams")
        self._bad_input_log.warning("dropped a datagram from %s: %s", address, exc)
        return None

    def _answer(self, waiter: Waiter, key: ModuleKey, retcode: int, payload: Any) -> None:
        """Send the answer to a request that waited for its module's route."""
        if waiter.kind == GET_HOST:
            reply = wire.encode_datagram(
                wire.GetHostResponse(waiter.seq, key[0], key[1], retcode, payload)
            )
        else:
            reply = self._route_reply(waiter.seq, key, retcode, payload)
        # Answer from the port the request went to (the module's), as a direct reply would.
        port = port_for(key, self.config.base_port, self.config.ports)
        sock = self._socket_by_port.get(port, self._sockets[0])
        try:
            sock.sendto(reply, waiter.address)
        except OSError:
            self.metrics.incr("replies_dropped")

    async def _wait_timer(self) -> None:
        """Answer NOEXIST to first requests whose ``route_wait`` ran out."""
        while True:
            deadline = self.table.next_deadline()
            if deadline is None:
                await self._wait_bell.wait()
                self._wait_bell = trio.Event()
                continue
            with trio.move_on_at(deadline):
                await trio.sleep_forever()
            for key, waiter, retcode, payload in self.table.expire_waits(trio.current_time()):
                self._answer(waiter, key, retcode, payload)

    # --- DNS -------------------------------------------------------------------------------

    async def _dns_loop(self) -> None:
        """Stay connected to one of the DNS instances, failing over between them forever."""
        addresses = self.config.dns
        delays = backoff(cap=self.config.retry_max)
        attempt = 0
        reported_down = False
        while True:
            address = addresses[attempt % len(addresses)]
            attempt += 1
            try:
                host, port = parse_address(address)
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
            except (OSError, trio.TooSlowError) as exc:
                self.metrics.incr("dns_connect_failures")
                if not reported_down:
                    log.warning(
                        "cannot reach dns %s (%s); serving from cache, retrying",
                        address,
                        exc or "timed out",
                    )
                    reported_down = True
                if attempt % len(addresses) == 0:  # tried them all: wait before the next round
                    await trio.sleep(next(delays))
                continue
            delays = backoff(cap=self.config.retry_max)
            reported_down = False
            _keepalive(stream)
            log.info("connected to dns %s", address)
            self.dns_address = address
            self.metrics.incr("dns_connects")
            try:
                await self._dns_session(stream)
            finally:
                self.dns_address = None
                self.table.dns_unavailable()
                await trio.aclose_forcefully(stream)
            log.warning("lost dns %s; failing over", address)  # attempt points at the next

    async def _dns_session(self, stream: trio.SocketStream) -> None:
        """Request every known module, then exchange requests and routes until the end."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dns_writer, stream, nursery.cancel_scope)
            await self._dns_reader(stream)
            nursery.cancel_scope.cancel()

    async def _dns_writer(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        table = self.table
        table.want.update(table.known())
        try:
            while True:
                if table.want:
                    wanted, table.want = table.want, set()
                    frames = [wire.encode_frame(wire.GetRouteRequest(*m)) for m in wanted]
                    await stream.send_all(b"".join(frames))
                    self.metrics.incr("dns_requests", len(frames))
                    continue
                await self._dns_bell.wait()
                self._dns_bell = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()

    async def _dns_reader(self, stream: trio.SocketStream) -> None:
        decoder = wire.FrameDecoder()
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            decoder.feed(data)
            try:
                for msg in decoder:
                    self._dns_message(msg)
            except ProtocolError as exc:
                log.error("bad frame from dns %s: %s; reconnecting", self.dns_address, exc)
                self.metrics.incr("dns_bad_frames")
                return

    def _dns_message(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.GetRouteResponse):
            key = (msg.modid, msg.cmdid)
            now = trio.current_time()
            for _, waiter, retcode, payload in self.table.apply_route(key, msg.hosts, now):
                self._answer(waiter, key, retcode, payload)
            self.metrics.incr("routes_received")
            self.route_received.set()
            self.route_received = trio.Event()
        elif isinstance(msg, wire.ErrorReply):
            self._bad_input_log.warning(
                "dns %s refused a request: %s", self.dns_address, msg.reason
            )
        else:
            self._bad_input_log.warning("unexpected %s from dns", type(msg).__name__)


def _keepalive(stream: trio.SocketStream) -> None:
    """Notice a silently dead DNS within about 20 s (TCP keepalive)."""
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
