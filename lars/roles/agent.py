"""The agent role: the local UDP API, the route cache and the load balancers of one host.

An I/O shell around :class:`lars.core.table.ModuleTable`, in two halves:

* **The API** on ``base_port .. base_port + ports - 1`` (module ``(modid, cmdid)`` belongs on
  ``base_port + (modid + cmdid) % ports``) is served by one OS thread per port doing
  blocking ``recvfrom``/``sendto``: one system call per datagram, answered in place, no task
  or thread per request, O(1) work per get_host and report. Why not trio: trio waits on a
  socket with a one-shot epoll registration and a pass through its run loop, twice per
  client loop (the get_host, then the report with the next get_host). Measured here with a
  trivial agent behind ``lars bench``: 29k loops/s waiting through trio, 49k with blocking
  reads. The threads release the GIL while they wait.
* **Everything else** runs as trio tasks: the DNS client (a list of addresses, failover,
  reconnect forever with capped backoff, re-request every known module after reconnecting,
  apply pushes; the cache keeps serving meanwhile), the timer answering first requests
  whose ``route_wait`` ran out, and the statistics sender (every ``report_interval``, one
  ReportStatusRequest per module; counts stay in place until the reporter acknowledges),
  and the registrations of services that register themselves through this agent
  (DESIGN §14, rules in :mod:`lars.registry`): LeaseUpdates on the DNS session, a heartbeat
  of every live registration each ``min(ttl) / 3`` (at most 1 s), all of them again on every
  new DNS session, and the deferred answers to RegisterRequest and DeregisterRequest once
  the DNS replied (or SYSTEM_ERROR after ``lars.registry.REPLY_TIMEOUT``).

The module table is shared under one lock; both halves use ``time.monotonic()``. The API
threads wake trio (``run_sync_soon``) only when they need it to act: a module to request
from DNS, or a request waiting for its route. They check for stop after every datagram,
so a steady client cannot hold up a shutdown; a shutdown first stops them (no new counts)
and then sends the last statistics.

The same ports speak the original Lars's protocol too (:mod:`lars.wire_original`), so that
services compiled against the original's ``lars_api`` work unchanged: a datagram whose first
byte is 8 or less is in its format, Lars's own start with a msgpack array. Its requests go
through the same table, balancers and statistics, and each is answered in the format it came
in, also when it waited for its module's route (a waiter's address says which).

Bad datagrams (not msgpack, wrong types, ids out of range) are counted and dropped, or
answered with an ErrorReply when they carry a sequence number; they never stop the agent.
The original protocol has no error reply: its bad datagrams are counted and dropped.
Nor does a bug: an unexpected error while handling one datagram is logged (at a rate
limit), counted as ``internal_errors`` and answered with SYSTEM_ERROR, and an API thread
whose socket fails keeps trying. A reply always leaves from the socket its request came in
on, also when it was deferred until the route arrived.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lars import wire, wire_original
from lars.config import AgentConfig
from lars.core.balancer import LoadBalancer
from lars.core.model import ModuleKey, ip_to_int
from lars.core.table import GET_HOST, ModuleTable, Waiter
from lars.errors import InvalidValue, LarsError, ProtocolError
from lars.registry import Answer, Registry
from lars.roles.common import (
    RECEIVE_SIZE,
    Metrics,
    RateLimitedLog,
    Reconnector,
    is_loopback,
    receive_messages,
    socket_of,
)
from lars.roles.http import Observed
from lars.tls import TlsContexts, refusal_hint

try:  # the API loop compiled (lars/_udploop.c); the Python one below is the reference
    from lars import _udploop
except ImportError:  # a build without a C compiler
    _udploop = None  # type: ignore[assignment]

#: Whether the compiled API loop was built.
COMPILED_LOOP = _udploop is not None

log = logging.getLogger("lars.agent")

#: Seconds to wait for a TCP connection to a DNS or the reporter.
CONNECT_TIMEOUT = 2.0
#: A TLS session that ends within this many seconds of its handshake was likely refused.
TLS_REFUSAL_WINDOW = 1.0
#: Receive buffer asked of the kernel for each API socket.
SOCKET_BUFFER = 4 << 20
#: Seconds an API thread's receive may block before it checks whether to stop.
STOP_CHECK = 0.2
#: Seconds without an acknowledgement after which the reporter connection is renewed.
ACK_TIMEOUT = 30.0
#: Seconds a DNS that said it is stale is avoided (unless it says it is fresh again).
STALE_DNS_MEMORY = 60.0
#: Seconds a stopping agent waits for its API threads (they check every STOP_CHECK).
API_STOP_TIMEOUT = 2.0
#: Seconds an API thread pauses after its socket failed, before it receives again.
SOCKET_ERROR_PAUSE = 0.05
#: After a poll for the next request ran out, the API thread answers this many requests
#: without polling, doubled for each further one in a row up to POLL_SKIP_MAX.
POLL_SKIP = 2
POLL_SKIP_MAX = 1024
#: Hosts in the first page of an agent state reply (halved until the page fits a datagram).
STATE_PAGE = 256
#: Modules whose statistics are taken per hold of the table lock.
STATS_CHUNK = 64

#: The registration counters (agent stats and /metrics as lars_agent_NAME_total).
REGISTRATION_COUNTERS = (
    ("registrations_registered", "New registrations the DNS took."),
    ("registrations_renewed", "Renewals of registrations held, answered at once."),
    ("registrations_deregistered", "Deregistrations the DNS took."),
    (
        "registrations_refused",
        "Registration and deregistration requests refused (BAD_REQUEST or SYSTEM_ERROR).",
    ),
    ("registrations_expired", "Registrations forgotten: their client stopped renewing."),
    ("lease_updates_sent", "LeaseUpdates sent to the DNS."),
    ("lease_timeouts", "LeaseUpdates the DNS did not answer in time."),
)

_SUCC = wire.RetCode.SUCC
_BAD = wire.RetCode.BAD_REQUEST
_REGISTRATIONS = (wire.RegisterRequest.TYPE, wire.DeregisterRequest.TYPE)


def port_for(module: ModuleKey, base_port: int, ports: int) -> int:
    """The API port that serves ``module`` (the original Lars rule)."""
    return base_port + (module[0] + module[1]) % ports


class Agent:
    """One agent process: the API ports, the module table, the DNS and reporter clients."""

    def __init__(self, config: AgentConfig, *, tls: TlsContexts | None = None) -> None:
        self.config = config
        #: Mutual TLS to the DNS and the reporter (None: plaintext; see lars.tls).
        self.tls = tls
        self.table = ModuleTable(config.loadbalance, config.route_wait)
        self.table.zone = config.zone
        self.metrics = Metrics("agent")
        # Tells clients what this agent's API takes (GetHostReportRequest from level 2,
        # GetHostKeyRequest and TimedReportRequest from level 3, RegisterRequest and
        # DeregisterRequest from level 4).
        self.metrics.set("api_level", wire.API_LEVEL_REGISTER)
        #: The registrations of local services (DESIGN §14), under ``_lock`` like the table.
        self.registry = Registry(config.max_registrations, count=self.metrics.incr)
        #: This host's IPv4 as the DNS session sees it (the local end of the last session),
        #: for registrations without an address when ``[agent] ip`` is not set.
        self.local_ip: int | None = None
        self.dns_address: str | None = None
        #: DNS addresses that said they are stale (DnsState), with when: avoided while
        #: another is not, for STALE_DNS_MEMORY seconds.
        self.stale_dns: dict[str, float] = {}
        self._leave_dns = False
        #: True while a reporter session is up.
        self.reporter_connected = False
        #: Set whenever a route arrives from DNS (tests wait on it).
        self.route_received = trio.Event()
        self._dns_bell = trio.Event()
        self._wait_bell = trio.Event()
        self._lease_bell = trio.Event()
        self._bad_input_log = RateLimitedLog(log)
        self._internal_error_log = RateLimitedLog(log)
        self._session_log = RateLimitedLog(log)
        self._report_seqs = itertools.count(1)
        #: Statistics sent and not yet acknowledged: seq -> (module, balancer, when sent).
        self._in_flight: dict[int, tuple[ModuleKey, LoadBalancer, float]] = {}
        self._flush_now = trio.Event()
        self._acked = trio.Event()
        self._sockets: list[socket.socket] = []
        self._socket_by_port: dict[int, socket.socket] = {}
        #: Guards the table (and the metrics) between the API threads and trio.
        self._lock = threading.Lock()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- serving ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the API ports, connect to DNS and the reporter, and serve until cancelled."""
        host = self.config.host
        self._trio_token = trio.lowlevel.current_trio_token()
        try:
            for index in range(self.config.ports):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                # A kernel timeout on a blocking socket: each receive stays one system call.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(STOP_CHECK))
                port = self.config.base_port + index
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    raise LarsError(
                        f"agent cannot listen on udp {host}:{port}: {exc.strerror or exc}"
                    ) from None
            ports = [s.getsockname()[1] for s in self._sockets]
            self._socket_by_port = dict(zip(ports, self._sockets, strict=True))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_api_threads)
                nursery.start_soon(self._dns_loop)
                nursery.start_soon(self._wait_timer)
                nursery.start_soon(self._lease_timer)
                nursery.start_soon(self._report_loop)
                log.info(
                    "agent API on udp %s ports %s (%s loop); dns %s",
                    host,
                    ",".join(map(str, ports)),
                    "compiled" if _compiled_loop() else "Python",
                    ", ".join(self.config.dns),
                )
                task_status.started(ports)
        finally:
            for sock in self._sockets:
                sock.close()

    async def _run_api_threads(self) -> None:
        """Run the API thread; stop it when cancelled, fail if it fails."""
        failed = trio.Event()
        errors: list[BaseException] = []

        def run(socks: list[socket.socket]) -> None:
            try:
                self._serve_socket(socks)
            except BaseException as exc:
                errors.append(exc)
                if self._trio_token is not None:
                    self._trio_token.run_sync_soon(failed.set)

        ports = ",".join(str(sock.getsockname()[1]) for sock in self._sockets)
        self._threads = [
            threading.Thread(
                target=run, args=(list(self._sockets),), name=f"lars-api-{ports}", daemon=True
            )
        ]
        self._stopping.clear()
        for thread in self._threads:
            thread.start()
        try:
            await failed.wait()
            raise RuntimeError("the agent API thread failed") from errors[0]
        finally:
            with trio.CancelScope(shield=True):
                await self.stop_api()

    async def stop_api(self) -> None:
        """Stop the API thread: it finishes the datagram in hand, within STOP_CHECK.
        Waits at most API_STOP_TIMEOUT (a daemon thread: a stuck one cannot keep the
        process alive)."""
        self._stopping.set()
        threads = self._threads

        def join() -> None:
            deadline = time.monotonic() + API_STOP_TIMEOUT
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

        with trio.move_on_after(API_STOP_TIMEOUT + 0.5):
            await trio.to_thread.run_sync(join, abandon_on_cancel=True)
        if any(thread.is_alive() for thread in threads):
            log.error("the agent API thread did not stop within %.0fs", API_STOP_TIMEOUT)

    def _serve_socket(self, socks: list[socket.socket]) -> None:
        """The body of the API thread: receive, answer, repeat, until told to stop.

        One thread serves every API port. The original runs one thread per port; in CPython
        the handling holds the interpreter lock, so more threads only add contention.
        """
        stopping = self._stopping.is_set
        while not stopping():
            try:
                if _compiled_loop():
                    self._serve_datagrams_c(socks)
                else:
                    self._serve_datagrams(socks)
            except OSError as exc:
                if stopping():
                    return
                with self._lock:
                    self.metrics.incr("socket_errors")
                self._internal_error_log.warning("agent API socket failed: %s", exc)
                time.sleep(SOCKET_ERROR_PAUSE)

    def _poll_budgets(self) -> tuple[float, float]:
        """How long to poll for the next datagram after one it did not answer, and after an
        answer: none on a single core, where polling only keeps the client from running."""
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        if cores < 2:
            return 0.0, 0.0
        return self.config.busy_poll, min(self.config.busy_poll, self.config.busy_poll_reply)

    def _serve_datagrams_c(self, socks: list[socket.socket]) -> None:
        """:meth:`_serve_datagrams`, compiled: the same loop in lars/_udploop.c."""
        poll_budget, reply_budget = self._poll_budgets()
        _udploop.serve(
            list(socks),
            self.handle_datagram,
            [is_loopback(sock.getsockname()[0]) for sock in socks],
            poll_budget,
            reply_budget,
            POLL_SKIP,
            POLL_SKIP_MAX,
            self._stopping.is_set,
            self._foreign_datagram,
            self._reply_dropped,
            STOP_CHECK,
        )

    def _serve_datagrams(self, socks: list[socket.socket]) -> None:
        """Receive and answer until told to stop; raises OSError if a socket fails.

        After each datagram the thread polls every port for the next one (yielding the CPU
        to anything else runnable between polls) before it blocks again: on virtual machines
        waking a halted vCPU costs tens of microseconds, more than the whole exchange. How
        long it polls adapts to the clients. After a datagram it did not answer (a report)
        the same client's next request usually follows at once: it polls up to
        ``busy_poll``. After an answer the client must act first: Lars's clients poll for
        their answer and ask again within microseconds, while a client that sleeps
        meanwhile (the original's) or works between calls takes much longer, and polling
        for it would only burn CPU. So it polls up to ``busy_poll_reply``, and after a poll
        that ran out it answers the next POLL_SKIP requests without polling (doubling while
        polls keep running out, up to POLL_SKIP_MAX). Nothing is polled on a single core.
        """
        handle = self.handle_datagram
        # On loopback, only this host may ask (the kernel already drops other sources sent
        # to 127/8; this holds even where it is told not to, e.g. route_localnet).
        local_only = [is_loopback(sock.getsockname()[0]) for sock in socks]
        receivers = [sock.recvfrom for sock in socks]
        senders = [sock.sendto for sock in socks]
        stopping = self._stopping.is_set
        poll_budget, reply_budget = self._poll_budgets()
        perf, pause, dontwait = time.perf_counter, os.sched_yield, socket.MSG_DONTWAIT
        poller = None
        index_of: dict[int, int] = {}
        if len(socks) > 1:
            poller = select.poll()
            for sock in socks:
                poller.register(sock, select.POLLIN)
            index_of = {sock.fileno(): index for index, sock in enumerate(socks)}
        skip = misses = 0  # answered datagrams to go without polling; polls run out in a row
        current = 0
        while not stopping():
            try:
                if poller is None:
                    data, address = receivers[0](RECEIVE_SIZE)
                else:
                    index = _ready(poller.poll(STOP_CHECK * 1000), index_of, current)
                    if index is None:
                        continue
                    current = index
                    data, address = receivers[current](RECEIVE_SIZE, dontwait)
            except BlockingIOError:  # SO_RCVTIMEO: time to check whether to stop
                continue
            except OSError as exc:
                if _ignorable(exc):
                    continue
                raise
            while True:
                # (127/8 first, inline: the hot path pays one slice and compare)
                if local_only[current] and address[0][:4] != "127." and not is_loopback(address[0]):
                    self._foreign_datagram(address)
                    reply = None
                else:
                    reply = handle(data, address, socks[current])
                budget = poll_budget
                if reply is not None:
                    budget = reply_budget
                    try:
                        senders[current](reply, address)
                    except OSError:  # the client's buffer is full or it is gone: UDP drops
                        self._reply_dropped()
                    if skip:
                        skip -= 1
                        budget = 0.0
                if not budget or stopping():
                    break
                until = perf() + budget
                got = False
                while True:
                    # Several ports: one poll() asks them all (a receive that finds nothing
                    # costs a system call and a Python exception per port).
                    index = current if poller is None else _ready(poller.poll(0), index_of, current)
                    if index is not None:
                        try:
                            data, address = receivers[index](RECEIVE_SIZE, dontwait)
                            current = index
                            got = True
                        except BlockingIOError:
                            pass
                        except OSError as exc:
                            if not _ignorable(exc):
                                raise
                    if got or perf() >= until:
                        break
                    pause()
                if reply is not None:
                    if got:
                        misses = 0
                    else:
                        misses += 1
                        skip = min(POLL_SKIP << (misses - 1), POLL_SKIP_MAX)
                if not got:
                    break

    def _refused_hint(self, started: float) -> str:
        """Why a TLS session that ended at once probably ended: under TLS 1.3 a server that
        refuses our certificate (wrong CA, expired, a role it does not take) closes the
        session after the handshake has succeeded on our side."""
        if self.tls is None or trio.current_time() - started > TLS_REFUSAL_WINDOW:
            return ""
        return f" ({refusal_hint(None)})"

    def _reply_dropped(self) -> None:
        """Count a reply the kernel refused (the client's buffer full, or it is gone)."""
        with self._lock:
            self.metrics.incr("replies_dropped")

    def _foreign_datagram(self, address: Any) -> None:
        with self._lock:
            self.metrics.incr("foreign_datagrams")
        self._bad_input_log.warning(
            "dropped a datagram from %s: the API on loopback answers this host only", address[0]
        )

    def _wake_trio(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the trio thread soon (from an API thread; a no-op in tests
        that call handle_datagram without serve())."""
        if self._trio_token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # shutting down
                self._trio_token.run_sync_soon(action)

    def _wake_dns(self) -> None:
        self._dns_bell.set()

    def _wake_waits(self) -> None:
        self._wait_bell.set()

    def _wake_leases(self) -> None:
        self._lease_bell.set()
        self._dns_bell.set()

    def handle_datagram(
        self, data: bytes, address: Any, sock: socket.socket | None = None
    ) -> bytes | None:
        """Answer one API datagram that came in on ``sock`` (None: no reply). Never raises.

        Called from the API threads (and directly by tests); takes the table lock. A
        datagram whose first byte is 8 or less is in the original's format (its msgid as a
        little-endian int32; Lars's own start with a msgpack array): one comparison, the
        only cost the original protocol adds to Lars's.
        """
        try:
            if data < b"\x09":  # wire_original.is_original_datagram, inlined
                return self._original_datagram(data, address, sock)
            try:
                msg = wire.decode_agent_request(data)
            except ProtocolError as exc:
                return self._bad_datagram(exc, address)
            now = time.monotonic()
            table = self.table
            if type(msg) is tuple:
                kind = msg[0]
                if kind != wire.ReportRequest.TYPE:  # GetHost(Report|Key)Request
                    # _lookup's steps, inlined: this is the hot path of every client loop.
                    seq, modid, cmdid = msg[1], msg[2], msg[3]
                    hkey = msg[4] if kind == wire.GetHostKeyRequest.TYPE else None
                    with self._lock:
                        if kind != wire.GetHostRequest.TYPE:  # reports first, in order
                            report = table.report
                            for item in msg[-1]:  # (modid, cmdid, ip, port, code[, latency])
                                if len(item) == 6 and item[5] is not None:
                                    report(
                                        (item[0], item[1]),
                                        (item[2], item[3]),
                                        item[4] == 0,
                                        now,
                                        item[5] / 1e6,
                                    )
                                else:
                                    report(
                                        (item[0], item[1]), (item[2], item[3]), item[4] == 0, now
                                    )
                        wanted = bool(table.want)
                        retcode, host = table.get_host(
                            (modid, cmdid), now, seq, (sock, address, False), hkey
                        )
                        wake_dns = not wanted and bool(table.want)
                    if wake_dns:
                        self._wake_trio(self._wake_dns)
                    if retcode < 0:
                        self._wake_trio(self._wake_waits)
                        return None
                    return wire.encode_get_host_response(seq, modid, cmdid, retcode, host)
                _, modid, cmdid, host, retcode = msg  # a ReportRequest
                with self._lock:
                    table.report((modid, cmdid), host, retcode == 0, now)
                return None
            assert isinstance(msg, wire.Message)
            return self._other(msg, (sock, address, False), now)
        except Exception as exc:  # a bug: it costs this datagram, never the agent
            return self._internal_error(data, address, exc)

    def _original_datagram(
        self, data: bytes, address: Any, sock: socket.socket | None
    ) -> bytes | None:
        """Answer a datagram in the original's format, through the same table, balancers and
        statistics as Lars's own: GetHostRequest (4) -> GetHostResponse (5), ReportRequest
        (6), API GetRouteRequest (7) -> API GetRouteResponse (8). The original has no error
        reply: anything else is counted and dropped."""
        try:
            request = wire_original.decode_agent_request(data)
        except ProtocolError as exc:
            with self._lock:
                self.metrics.incr(
                    "malformed_datagrams" if exc.msg_type is None else "invalid_requests"
                )
            self._bad_input_log.warning(
                "dropped a datagram in the original format from %s: %s", address, exc
            )
            return None
        now = time.monotonic()
        table = self.table
        kind = request[0]
        if kind == wire_original.REPORT_REQUEST:
            _, modid, cmdid, host, retcode = request
            with self._lock:
                self.metrics.incr("original_requests")
                table.report((modid, cmdid), host, retcode == 0, now)
            return None
        _, seq, modid, cmdid = request
        key = (modid, cmdid)
        with self._lock:
            self.metrics.incr("original_requests")
        get_host = kind == wire_original.GET_HOST_REQUEST
        retcode, payload = self._lookup(get_host, key, now, seq, (sock, address, True))
        if retcode < 0:
            return None
        if get_host:
            return wire_original.encode_get_host_response(seq, modid, cmdid, retcode, payload)
        return self._original_route_reply(key, payload or ())

    def _lookup(
        self,
        get_host: bool,
        key: ModuleKey,
        now: float,
        seq: int,
        reply_to: Any,
        hkey: bytes | None = None,
    ) -> tuple[int, Any]:
        """``table.get_host`` (with the caller's hash key ``hkey``, if any) or ``get_route``
        under the lock; wakes trio when the module is to be asked of DNS, or when the request
        now waits for its route (retcode -1)."""
        table = self.table
        with self._lock:
            wanted = bool(table.want)
            if get_host:
                retcode, payload = table.get_host(key, now, seq, reply_to, hkey)
            else:
                retcode, payload = table.get_route(key, now, seq, reply_to)
            wake_dns = not wanted and bool(table.want)
        if wake_dns:
            self._wake_trio(self._wake_dns)
        if retcode < 0:
            self._wake_trio(self._wake_waits)
        return retcode, payload

    def _original_route_reply(self, key: ModuleKey, hosts: Any) -> bytes:
        """An API GetRouteResponse in the original format (an unknown module: no hosts)."""
        try:
            return wire_original.encode_api_route_response(key[0], key[1], hosts)
        except ProtocolError as exc:  # the original API would wait for ever: say "no hosts"
            self._internal_error_log.error("answering an original API GetRoute: %s", exc)
            return wire_original.encode_api_route_response(key[0], key[1], ())

    def _internal_error(self, data: bytes, address: Any, exc: Exception) -> bytes | None:
        """Count and log an unexpected error; SYSTEM_ERROR to the request if it has a seq."""
        with self._lock:
            self.metrics.incr("internal_errors")
        self._internal_error_log.error(
            "internal error on a datagram from %s: %r", address, exc, exc_info=exc
        )
        if wire_original.is_original_datagram(data):  # its client waits without a timeout
            return wire_original.system_error_reply(data)
        seq = wire.peek_seq(data)
        if seq is None:
            return None
        reason = f"internal error: {type(exc).__name__}"
        return wire.encode_datagram(wire.ErrorReply(seq, wire.RetCode.SYSTEM_ERROR, reason))

    def _other(self, msg: wire.Message, reply_to: Any, now: float) -> bytes | None:
        if isinstance(msg, wire.ApiGetRouteRequest):
            key = (msg.modid, msg.cmdid)
            retcode, hosts = self._lookup(False, key, now, msg.seq, reply_to)
            if retcode < 0:
                return None
            return self._route_reply(msg.seq, key, retcode, hosts)
        if isinstance(msg, wire.AgentStateRequest):
            return self._state_reply(msg, now)
        if isinstance(msg, wire.TimedReportRequest):
            with self._lock:
                self.table.report(
                    (msg.modid, msg.cmdid), msg.host, msg.retcode == 0, now, msg.latency_us / 1e6
                )
            return None
        if isinstance(msg, (wire.RegisterRequest, wire.DeregisterRequest)):
            return self._registration(msg, reply_to, now)
        with self._lock:
            if isinstance(msg, wire.StatsRequest):
                self.metrics.set("registrations", len(self.registry))
                self.metrics.set("modules", len(self.table.modules))
                self.metrics.set("pending_modules", len(self.table.pending))
                self.metrics.set("dns_connected", int(self.dns_address is not None))
                return wire.encode_datagram(self.metrics.response(msg.seq))
            self.metrics.incr("invalid_requests")
        seq = getattr(msg, "seq", 0)
        reason = f"the agent does not serve {type(msg).__name__}"
        return wire.encode_datagram(wire.ErrorReply(seq, _BAD, reason))

    def _registration(
        self, msg: wire.RegisterRequest | wire.DeregisterRequest, reply_to: Any, now: float
    ) -> bytes | None:
        """A RegisterRequest or DeregisterRequest (see lars.registry): answered now (a
        renewal, a refusal), or later from the trio thread once the DNS replied."""
        sock, address, _ = reply_to
        reply_to = (sock, address, (msg.modid, msg.cmdid))
        ip = msg.ip or self._own_ip()
        answers: list[Answer] = []
        with self._lock:
            if ip is None:
                reply: wire.RegisterReply | None = self.registry.refuse(
                    msg.seq,
                    0,
                    "the agent does not know its address: set [agent] ip or pass ip",
                )
            elif isinstance(msg, wire.RegisterRequest):
                reply = self.registry.register(msg, ip, reply_to, now)
            else:
                reply, answers = self.registry.deregister(msg, ip, reply_to, now)
            send = self.registry.has_updates
        if reply is None or send:
            self._wake_trio(self._wake_leases)  # a new deadline, and something to send
        self._send_answers(answers)
        return None if reply is None else wire.encode_datagram(reply)

    def _own_ip(self) -> int | None:
        """The address a registration without one gets: ``[agent] ip``, else the local
        address of the (last) DNS session, else None (unknown)."""
        if self.config.ip:
            return ip_to_int(self.config.ip)
        return self.local_ip

    def _send_answers(self, answers: list[Answer]) -> None:
        """Send deferred RegisterReplies, each from the socket its request came in on."""
        for (sock, address, module), reply in answers:
            if sock is None:  # handle_datagram called without a socket (tests)
                port = port_for(module, self.config.base_port, self.config.ports)
                sock = self._socket_by_port.get(port)
                if sock is None:
                    continue
            try:
                sock.sendto(wire.encode_datagram(reply), address)
            except OSError:
                self._reply_dropped()

    def _state_reply(self, msg: wire.AgentStateRequest, now: float) -> bytes:
        """One page of the module's state, as many hosts from ``msg.offset`` as fit."""
        key = (msg.modid, msg.cmdid)
        limit = STATE_PAGE
        while True:
            with self._lock:
                state = self.table.describe(
                    key, now, time.time(), msg.offset, limit, bool(msg.explain)
                )
            retcode = wire.RetCode.NOEXIST if state is None else _SUCC
            reply = wire.AgentStateResponse(msg.seq, msg.modid, msg.cmdid, retcode, state or {})
            try:
                return wire.encode_datagram(reply)
            except ProtocolError:
                if limit == 1:
                    raise
                limit //= 2

    def _route_reply(self, seq: int, key: ModuleKey, retcode: int, hosts: Any) -> bytes:
        msg = wire.ApiGetRouteResponse(seq, key[0], key[1], retcode, tuple(hosts or ()))
        try:
            return wire.encode_datagram(msg)
        except ProtocolError:
            reason = f"route of {key[0]}/{key[1]} has too many hosts for one datagram"
            return wire.encode_datagram(wire.ErrorReply(seq, wire.RetCode.SYSTEM_ERROR, reason))

    def _bad_datagram(self, exc: ProtocolError, address: Any) -> bytes | None:
        with self._lock:
            if exc.msg_type is not None and exc.seq is not None:
                self.metrics.incr("invalid_requests")
                if exc.msg_type in _REGISTRATIONS:  # answered in the kind its client reads
                    reply = self.registry.refuse(exc.seq, 0, str(exc))
                    return wire.encode_datagram(reply)
                return wire.encode_datagram(wire.ErrorReply(exc.seq, _BAD, str(exc)))
            self.metrics.incr("malformed_datagrams")
            self._bad_input_log.warning("dropped a datagram from %s: %s", address, exc)
        return None

    def _answer(self, waiter: Waiter, key: ModuleKey, retcode: int, payload: Any) -> None:
        """Send the answer to a request that waited for its module's route, in the format
        the request came in (``waiter.address`` is ``(socket, client, original?)``)."""
        sock, address, original = waiter.address
        if original and waiter.kind == GET_HOST:
            reply = wire_original.encode_get_host_response(
                waiter.seq, key[0], key[1], retcode, payload
            )
        elif original:
            reply = self._original_route_reply(key, payload or ())
        elif waiter.kind == GET_HOST:
            reply = wire.encode_datagram(
                wire.GetHostResponse(waiter.seq, key[0], key[1], retcode, payload)
            )
        else:
            reply = self._route_reply(waiter.seq, key, retcode, payload)
        # Answer from the socket the request came in on, as a direct reply would.
        if sock is None:  # handle_datagram called without a socket (tests)
            port = port_for(key, self.config.base_port, self.config.ports)
            sock = self._socket_by_port.get(port, self._sockets[0])
        try:
            sock.sendto(reply, address)
        except OSError:
            self._reply_dropped()

    async def _wait_timer(self) -> None:
        """Answer NOEXIST to first requests whose ``route_wait`` ran out."""
        while True:
            self._wait_bell = trio.Event()  # a new wait from here on wakes us
            with self._lock:
                deadline = self.table.next_deadline()
            if deadline is None:
                await self._wait_bell.wait()
                continue
            delay = deadline - time.monotonic()  # already past after a burst: no wait
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wait_bell.wait()
            with self._lock:
                answers = self.table.expire_waits(time.monotonic())
            for key, waiter, retcode, payload in answers:
                self._answer(waiter, key, retcode, payload)

    async def _lease_timer(self) -> None:
        """The registrations' clock: answer SYSTEM_ERROR to requests the DNS did not answer
        in time, forget registrations whose clients stopped renewing, and wake the DNS
        writer for each heartbeat."""
        while True:
            self._lease_bell = trio.Event()  # a change from here on wakes us
            with self._lock:
                deadline = self.registry.next_deadline()
            if deadline is None:
                await self._lease_bell.wait()
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._lease_bell.wait()
            with self._lock:
                answers = self.registry.expire(time.monotonic())
                send = self.registry.has_updates
            self._send_answers(answers)
            if send:
                self._dns_bell.set()

    # --- DNS -------------------------------------------------------------------------------

    async def _dns_loop(self) -> None:
        """Stay connected to one of the DNS instances, failing over between them forever."""
        dns = Reconnector(
            "dns",
            self.config.dns,
            log=log,
            metrics=self.metrics,
            retry_max=self.config.retry_max,
            connect_timeout=CONNECT_TIMEOUT,
            tls=self.tls,
        )
        while True:
            self.dns_address, stream = await dns.connect(avoid=self._stale_addresses())
            self._leave_dns = False
            started = trio.current_time()
            self.local_ip = _local_ipv4(stream) or self.local_ip
            try:
                await self._dns_session(stream)
            finally:
                self.dns_address = None
                with self._lock:
                    self.table.dns_unavailable()
                    self.registry.session_lost()
                await trio.aclose_forcefully(stream)
            if self._leave_dns:
                dns.reconnect_now()  # a move to a fresh DNS, not a failure: no backoff
                continue
            self._session_log.warning(
                "lost dns%s; serving from cache, failing over", self._refused_hint(started)
            )

    def _stale_addresses(self) -> set[str]:
        """The DNS addresses that said they were stale within STALE_DNS_MEMORY seconds."""
        now = trio.current_time()
        for address, since in list(self.stale_dns.items()):
            if now - since >= STALE_DNS_MEMORY:
                del self.stale_dns[address]
        return set(self.stale_dns)

    async def _dns_session(self, stream: trio.abc.Stream) -> None:
        """Request every known module, then exchange requests and routes until the end."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dns_writer, stream, nursery.cancel_scope)
            await self._dns_reader(stream)
            nursery.cancel_scope.cancel()

    async def _dns_writer(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        """The one writer of the DNS session: route requests, then lease updates (every
        registration at the start of the session)."""
        table = self.table
        with self._lock:
            table.want.update(table.known())
            self.registry.session_started()
        try:
            while True:
                self._dns_bell = trio.Event()  # a new want from here on wakes us
                with self._lock:
                    wanted, table.want = table.want, set()
                    updates = self.registry.updates(time.monotonic())
                if updates:
                    self._lease_bell.set()  # the replies are due: a new deadline
                if wanted or updates:
                    frames = [wire.encode_frame(wire.GetRouteRequest(*m)) for m in wanted]
                    frames += [wire.encode_frame(u) for u in updates]
                    await stream.send_all(b"".join(frames))
                    if wanted:
                        self.metrics.incr("dns_requests", len(wanted))
                    continue
                await self._dns_bell.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()

    async def _dns_reader(self, stream: trio.abc.Stream) -> None:
        decoder = wire.FrameDecoder(self.config.max_frame)
        while (items := await receive_messages(stream, decoder)) is not None:
            for item in items:
                if isinstance(item, ProtocolError):
                    self._bad_input_log.error(
                        "bad frame from dns %s: %s (the agent's limit is [agent] max_frame);"
                        " reconnecting",
                        self.dns_address,
                        item,
                    )
                    self.metrics.incr("dns_bad_frames")
                    return
                self._dns_message(item)
            if self._leave_dns:
                return

    def _dns_message(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.GetRouteResponse):
            key = (msg.modid, msg.cmdid)
            # Weights, zones and the module's policy (DESIGN §13), when the DNS sent any.
            meta = dict(zip(msg.hosts, msg.meta, strict=True)) if msg.meta else None
            policy = msg.policy
            if policy is not None:
                try:
                    policy = policy.check()
                except InvalidValue as exc:  # a newer DNS's policy: keep the default
                    self._bad_input_log.warning(
                        "module %d/%d: policy from dns ignored, the default applies: %s",
                        *key,
                        exc,
                    )
                    policy = None
            with self._lock:
                answers = self.table.apply_route(
                    key, msg.hosts, time.monotonic(), meta=meta, policy=policy, demoted=msg.demoted
                )
                self.metrics.incr("routes_received")
            for _, waiter, retcode, payload in answers:
                self._answer(waiter, key, retcode, payload)
            self.route_received.set()
            self.route_received = trio.Event()
        elif isinstance(msg, wire.DnsState):
            self._dns_state(msg)
        elif isinstance(msg, wire.LeaseReply) or (
            isinstance(msg, wire.ErrorReply) and self.registry.expects(msg.seq)
        ):
            self._lease_reply(msg)
        elif isinstance(msg, wire.ErrorReply):
            self._bad_input_log.warning(
                "dns %s refused a request: %s", self.dns_address, msg.reason
            )
        else:
            self._bad_input_log.warning("unexpected %s from dns", type(msg).__name__)

    def _lease_reply(self, msg: wire.LeaseReply | wire.ErrorReply) -> None:
        """The DNS's answer to a LeaseUpdate: answer the clients that waited for it."""
        if isinstance(msg, wire.ErrorReply):
            self._bad_input_log.warning(
                "dns %s refused registrations: %s", self.dns_address, msg.reason
            )
        elif msg.retcode != _SUCC:
            self._bad_input_log.warning(
                "dns %s could not store registrations (its store is unavailable);"
                " sending them again",
                self.dns_address,
            )
        elif msg.errors:
            self._bad_input_log.warning(
                "dns %s refused %d registration(s), e.g. %s",
                self.dns_address,
                len(msg.errors),
                msg.errors[0][1],
            )
        with self._lock:
            answers = self.registry.replied(msg, time.monotonic())
            send = self.registry.has_updates
        self._send_answers(answers)
        self._lease_bell.set()  # fewer deadlines, maybe a heartbeat to plan
        if send:
            self._dns_bell.set()

    def _dns_state(self, msg: wire.DnsState) -> None:
        """The current DNS says whether its routes may be out of date; a stale one is left
        for another DNS that has not said so lately (if there is none, it stays: its last
        good routes are better than none)."""
        address = self.dns_address
        if address is None:
            return
        if not msg.stale:
            if self.stale_dns.pop(address, None) is not None:
                log.info("dns %s reads its store again", address)
            return
        self.metrics.incr("dns_stale_notices")
        self.stale_dns[address] = trio.current_time()
        others = [a for a in self.config.dns if a not in self._stale_addresses()]
        if others:
            log.warning(
                "dns %s is stale (store unreachable for %d s, version %d); moving to %s",
                address,
                msg.store_age,
                msg.version,
                " or ".join(others),
            )
            self._leave_dns = True
        else:
            self._bad_input_log.warning(
                "dns %s is stale (store unreachable for %d s) and no other DNS is fresh; staying",
                address,
                msg.store_age,
            )

    # --- statistics to the reporter -------------------------------------------------------

    async def _report_loop(self) -> None:
        """Stay connected to the reporter; send statistics every ``report_interval``."""
        reporter = Reconnector(
            "reporter",
            [self.config.reporter],
            log=log,
            metrics=self.metrics,
            retry_max=self.config.retry_max,
            connect_timeout=CONNECT_TIMEOUT,
            tls=self.tls,
        )
        while True:
            _, stream = await reporter.connect()
            started = trio.current_time()
            try:
                caller = self._caller(stream)
                if caller is not None:
                    self.reporter_connected = True
                    await self._report_session(stream, caller)
            finally:
                self.reporter_connected = False
                with self._lock:
                    for key, lb, _ in self._in_flight.values():
                        self.table.stats_done(key, lb, stored=False)  # send them again later
                self._in_flight.clear()
                await trio.aclose_forcefully(stream)
            self._session_log.warning(
                "lost the reporter%s; keeping the counts, reconnecting",
                self._refused_hint(started),
            )

    def _caller(self, stream: trio.abc.Stream) -> int | None:
        """This host's IPv4 as an integer, which names it in the statistics: ``[agent] ip``,
        else the address used to reach the reporter. None (logged) when neither is IPv4."""
        if self.config.ip:
            return ip_to_int(self.config.ip)
        sock = socket_of(stream)
        if sock is None:
            return None
        local = sock.getsockname()[0]
        try:
            return ip_to_int(local.removeprefix("::ffff:"))  # IPv4 or IPv4-mapped
        except InvalidValue:
            self._bad_input_log.error(
                "the reporter is reached over IPv6 (from %s) and [agent] ip is not set: set it"
                " to this host's IPv4 address, which names it in the statistics; keeping the"
                " counts meanwhile",
                local,
            )
            return None

    async def _report_session(self, stream: trio.abc.Stream, caller: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_acks, stream, nursery.cancel_scope)
            while True:
                with trio.move_on_after(self.config.report_interval):
                    await self._flush_now.wait()
                self._flush_now = trio.Event()
                oldest = next(iter(self._in_flight.values()), None)  # sent first
                if oldest is not None and time.monotonic() - oldest[2] > ACK_TIMEOUT:
                    log.warning("reporter acknowledged nothing for %.0fs", ACK_TIMEOUT)
                    nursery.cancel_scope.cancel()
                    return
                try:
                    await self.send_reports(stream, caller)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
                    return

    async def send_reports(self, stream: trio.abc.SendStream, caller: int) -> int:
        """Send one ReportStatusRequest per module with counts since the last acknowledged
        send and none in flight; the counts are in flight until acknowledged. Returns the
        number sent.

        Only modules with calls are touched, STATS_CHUNK of them per hold of the table lock,
        so the API threads never wait long however many modules there are.
        """
        with self._lock:
            due = self.table.take_due()
        sent = 0
        try:
            while chunk := list(itertools.islice(due, STATS_CHUNK)):
                with self._lock:
                    taken = self.table.collect_stats(chunk)
                now, ts = time.monotonic(), int(time.time())
                messages = []
                for key, lb, lines in taken:
                    seq = next(self._report_seqs)
                    results = tuple(wire.HostResult(*h, s, e, o) for h, s, e, o in lines)
                    messages.append(wire.ReportStatusRequest(*key, caller, results, ts, seq))
                    self._in_flight[seq] = (key, lb, now)
                if messages:
                    await stream.send_all(b"".join(wire.encode_frame(m) for m in messages))
                    self.metrics.incr("reports_sent", len(messages))
                    sent += len(messages)
        finally:
            if rest := list(due):  # the send failed: what was not taken is due again
                with self._lock:
                    self.table.requeue(rest)
        return sent

    async def _report_acks(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        decoder = wire.FrameDecoder()
        while (items := await receive_messages(stream, decoder)) is not None:
            for item in items:
                if isinstance(item, wire.ReportStatusAck):
                    entry = self._in_flight.pop(item.seq, None)
                    if entry is not None:
                        with self._lock:
                            self.table.stats_done(entry[0], entry[1], stored=True)
                        self.metrics.incr("reports_acknowledged")
                elif isinstance(item, ProtocolError) and item.msg_type is None:
                    log.error("bad frame from the reporter: %s; reconnecting", item)
                    scope.cancel()
                    return
                else:
                    self._bad_input_log.warning("unexpected %s from the reporter", item)
            with self._lock:
                self.table.forget_drained()
            self._acked.set()
            self._acked = trio.Event()
        scope.cancel()

    @property
    def stats_settled(self) -> bool:
        """True when every count has been acknowledged by the reporter."""
        with self._lock:
            return not self._in_flight and self.table.stats_settled()

    async def drain(self) -> None:
        """Stop the API (no new counts), send the remaining statistics and wait for their
        acknowledgement (shutdown)."""
        await self.stop_api()
        while not self.stats_settled:
            self._flush_now.set()
            await self._acked.wait()

    # --- observability ---------------------------------------------------------------------

    def observed(self, max_module_labels: int = 1000) -> Observed:
        """The agent's registry and readiness check for the HTTP listener."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(self, max_module_labels))

        async def not_ready() -> str | None:
            if not self._sockets or any(s.fileno() < 0 for s in self._sockets):
                return "API ports not bound"
            if self.dns_address is None:
                return "no DNS session"
            return None

        return Observed("agent", registry, not_ready)


class AgentCollector(Collector):
    """The agent's metrics, read from its table and counters at scrape time (the API
    threads only increment plain integers, as they do anyway). Per-module series cover
    the first ``max_module_labels`` modules; the totals cover all."""

    def __init__(self, agent: Agent, max_module_labels: int) -> None:
        self.agent = agent
        self.max_module_labels = max_module_labels

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        table = a.table
        with a._lock:
            get_host = list(table.get_host_answers)
            get_route = list(table.get_route_answers)
            reports = list(table.reports)
            tally = table.tally
            to_overload, to_idle = dict(tally.to_overload), dict(tally.to_idle)
            probes, hosts, overloaded = tally.probes, tally.hosts, tally.overloaded
            modules, pending, due = len(table.modules), len(table.pending), len(table.stats_due)
            registrations = len(a.registry)
            counters = dict(a.metrics.counters)
            per_module = [
                (key, len(lb.hosts), lb.overloaded_count, lb.reports_ok, lb.reports_failed)
                for key, lb in itertools.islice(table.modules.items(), self.max_module_labels)
            ]
        in_flight = len(a._in_flight)

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"lars_agent_{name}", doc, value=counters.get(key, 0))

        requests = CounterMetricFamily(
            "lars_agent_requests",
            "API requests answered, by kind and result.",
            labels=["kind", "result"],
        )
        for code, result in ((0, "succ"), (1, "overload"), (3, "noexist")):
            requests.add_metric(["get_host", result], get_host[code])
        for code, result in ((0, "succ"), (3, "noexist")):
            requests.add_metric(["get_route", result], get_route[code])
        requests.add_metric(["report", "success"], reports[1])
        requests.add_metric(["report", "failure"], reports[0])
        yield requests
        yield counter("invalid_requests", "Requests with invalid values.", "invalid_requests")
        yield counter(
            "malformed_datagrams", "Datagrams that did not decode.", "malformed_datagrams"
        )
        yield counter(
            "internal_errors", "Datagrams that met an unexpected error.", "internal_errors"
        )
        yield counter("replies_dropped", "Replies the kernel refused to send.", "replies_dropped")
        yield counter(
            "foreign_datagrams",
            "Datagrams from another host to an API on loopback (dropped).",
            "foreign_datagrams",
        )
        yield counter(
            "original_requests",
            "API requests in the original Lars format (counted in requests_total too).",
            "original_requests",
        )
        transitions = CounterMetricFamily(
            "lars_agent_host_transitions",
            "Hosts that changed state, by the state entered and the rule.",
            labels=["to", "reason"],
        )
        for reason, n in to_overload.items():
            transitions.add_metric(["overload", reason], n)
        for reason, n in to_idle.items():
            transitions.add_metric(["idle", reason], n)
        yield transitions
        yield CounterMetricFamily("lars_agent_probes", "Overloaded hosts probed.", value=probes)
        by_state = GaugeMetricFamily(
            "lars_agent_hosts", "Hosts of every route, by state.", labels=["state"]
        )
        by_state.add_metric(["idle"], hosts - overloaded)
        by_state.add_metric(["overload"], overloaded)
        yield by_state
        yield GaugeMetricFamily("lars_agent_modules", "Modules with a route.", value=modules)
        yield GaugeMetricFamily(
            "lars_agent_pending_modules", "Modules asked of DNS, not answered yet.", value=pending
        )
        yield counter("route_updates", "Routes received from DNS.", "routes_received")
        yield counter("dns_stale_notices", "DNS notices of stale routes.", "dns_stale_notices")
        for peer, up in (("dns", a.dns_address is not None), ("reporter", a.reporter_connected)):
            yield GaugeMetricFamily(
                f"lars_agent_{peer}_up", f"1 while a {peer} session is up.", value=int(up)
            )
            yield counter(
                f"{peer}_connects", f"Connections made to the {peer}.", f"{peer}_connects"
            )
            yield counter(
                f"{peer}_connect_failures",
                f"Failed attempts to connect to the {peer}.",
                f"{peer}_connect_failures",
            )
        yield counter("stats_reports_sent", "Statistics reports sent.", "reports_sent")
        yield counter(
            "stats_reports_acknowledged", "Statistics reports stored.", "reports_acknowledged"
        )
        yield GaugeMetricFamily(
            "lars_agent_stats_reports_in_flight", "Reports sent, not yet stored.", value=in_flight
        )
        yield GaugeMetricFamily(
            "lars_agent_stats_modules_due", "Modules with counts to send.", value=due
        )
        yield GaugeMetricFamily(
            "lars_agent_registrations",
            "Registrations of local services held (DESIGN §14).",
            value=registrations,
        )
        for key, doc in REGISTRATION_COUNTERS:
            yield counter(key, doc, key)
        module_hosts = GaugeMetricFamily(
            "lars_agent_module_hosts",
            "Hosts of one module, by state.",
            labels=["modid", "cmdid", "state"],
        )
        module_reports = CounterMetricFamily(
            "lars_agent_module_reports",
            "Call results reported on one module's hosts.",
            labels=["modid", "cmdid", "result"],
        )
        for (modid, cmdid), n_hosts, n_over, ok, failed in per_module:
            ids = [str(modid), str(cmdid)]
            module_hosts.add_metric([*ids, "idle"], n_hosts - n_over)
            module_hosts.add_metric([*ids, "overload"], n_over)
            module_reports.add_metric([*ids, "success"], ok)
            module_reports.add_metric([*ids, "failure"], failed)
        yield module_hosts
        yield module_reports


def _local_ipv4(stream: trio.abc.Stream) -> int | None:
    """This end's IPv4 address of a connection, as an integer (None: not IPv4)."""
    sock = socket_of(stream)
    try:
        local = sock.getsockname()[0] if sock is not None else ""
        return ip_to_int(str(local).removeprefix("::ffff:"))
    except (OSError, InvalidValue):
        return None


def _compiled_loop() -> bool:
    """Whether the API thread runs the compiled loop: when it is built, unless the
    environment says ``LARS_PURE_API_LOOP`` (the tests run both)."""
    return COMPILED_LOOP and not os.environ.get("LARS_PURE_API_LOOP")


def _ready(events: list[tuple[int, int]], index_of: dict[int, int], last: int) -> int | None:
    """The port to read from among those poll() found ready (None: none is): the first one
    after ``last``, so that a busy port does not starve the others."""
    if not events:
        return None
    if len(events) == 1:
        return index_of[events[0][0]]
    indexes = sorted(index_of[fd] for fd, _ in events)
    return next((index for index in indexes if index > last), indexes[0])


def _ignorable(exc: OSError) -> bool:
    """Errors a receive can report that only concern one client (ICMP "port unreachable"
    for an earlier reply) or nothing at all (a signal)."""
    return exc.errno in (errno.ECONNREFUSED, errno.EINTR)


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO."""
    return int(seconds).to_bytes(8, "little") + int(seconds % 1 * 1_000_000).to_bytes(8, "little")
