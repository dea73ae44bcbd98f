"""``lars.client``: ask the local agent for hosts and report call results.

.. code-block:: python

    from lars.client import LarsClient
    client = LarsClient()                       # agent on 127.0.0.1, ports 8888-8890
    host = client.get_host(1, 1)                # Host(ip="10.0.0.1", port=7001)
    client.report(1, 1, host, ok=True)          # or retcode=...
    hosts = client.get_route(1, 1)              # every host of the module
    client.reg_init(1, 1)                       # preload a module at start-up
    with client.call(1, 1) as host:             # reports success, or failure if it raises
        ...
    with client.register(1, 1, 7001, ttl=10):   # this host serves module 1/1 on port 7001
        serve_forever()                         # renewed in the background; deregistered after

:class:`AsyncLarsClient` has the same methods for trio, awaited (``call`` is an async
context manager). Errors: :class:`~lars.NoRoute`, :class:`~lars.Overloaded`,
:class:`~lars.AgentUnavailable` (no answer after the retries),
:class:`~lars.RequestRejected`, all under :class:`~lars.LarsError`.

:class:`LarsClient` is safe to share between threads, :class:`AsyncLarsClient` between
tasks. Each request carries a sequence number; replies to earlier, timed-out requests are
discarded. A module is served on ``base_port + (modid + cmdid) % ports``. The protocol logic
lives in :class:`ClientCore` (no I/O); the two clients only send and receive. On the hot
path get_host is one send and one receive, and report one send.

Self-registration (DESIGN §14): :meth:`LarsClient.register` registers a host (by default
this one, as the agent knows it) for a module through the local agent, which keeps it alive
in the DNS. The returned :class:`Registration` renews it every ``ttl / 3`` seconds from a
background thread on its own socket, and registers it again if the agent forgot it (an
agent restart): a registration survives an agent that is back within ``ttl``. Its
:meth:`~Registration.close` (or the end of its ``with`` block) deregisters it: the DNS
drains the host at once (weight 0, no new calls) and removes it after ``drain`` seconds.
A host whose process dies without closing leaves the route ``ttl`` seconds after its last
renewal. :meth:`AsyncLarsClient.register` is an async context manager doing the same with a
trio task. A registration the agent or the DNS refuses raises
:class:`~lars.RequestRejected` with the reason; no answer within ``REGISTER_TIMEOUT``
raises :class:`~lars.AgentUnavailable`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import msgpack
import trio

from lars import wire
from lars.config import load_config
from lars.core.model import (
    Host,
    HostKey,
    check_id,
    check_port,
    int_to_ip,
    ip_to_int,
    parse_module,
)
from lars.errors import (
    AgentUnavailable,
    InvalidValue,
    LarsError,
    NoRoute,
    Overloaded,
    ProtocolError,
    RequestRejected,
)
from lars.registry import RegistrationSpec, drain_ms, registration_spec, renew_interval

__all__ = ["AsyncLarsClient", "AsyncRegistration", "Host", "LarsClient", "Registration"]

log = logging.getLogger("lars.client")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 8888
DEFAULT_PORTS = 3
DEFAULT_TIMEOUT = 0.25
DEFAULT_RETRIES = 2
DEFAULT_BUSY_POLL = 0.0001
DEFAULT_REPORT_DELAY = 0.005
#: Largest datagram a client receives (the most UDP carries).
RECEIVE_SIZE = 65536
#: Attempts of reg_init while the agent answers NoRoute, and the pause between them.
REG_INIT_ATTEMPTS = 10
REG_INIT_PAUSE = 0.2
#: Seconds a registration (or a deregistration) waits for the agent's answer: a new one is
#: answered once the DNS has stored it (the agent waits lars.registry.REPLY_TIMEOUT for
#: it). The request is sent again every REGISTER_RESEND seconds meanwhile, in case the
#: datagram was lost.
REGISTER_TIMEOUT = 2.0
REGISTER_RESEND = 0.5
#: Seconds before a renewal that got no answer (an agent restarting) is tried again.
RENEW_RETRY = 0.25
#: Seconds at most a renewal in progress takes to notice that its registration is closing.
STOP_CHECK = 0.1

_SUCC = wire.RetCode.SUCC
_OVERLOAD = wire.RetCode.OVERLOAD
_NOEXIST = wire.RetCode.NOEXIST
_pack_ip = struct.Struct("!I").pack
_unpackb = msgpack.unpackb


class ClientCore:
    """The client's protocol logic, without I/O: build requests, recognise replies."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        base_port: int = DEFAULT_BASE_PORT,
        ports: int = DEFAULT_PORTS,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if ports < 1 or base_port + ports - 1 > 65535:
            raise InvalidValue(f"bad agent ports: base_port={base_port} ports={ports}")
        check_port(base_port)
        if timeout <= 0 or retries < 0:
            raise InvalidValue("timeout must be > 0 and retries >= 0")
        self.host = host
        self.base_port = base_port
        self.ports = ports
        self.timeout = timeout
        self.retries = retries
        self._seqs = itertools.count(os.getpid() & 0xFFFF)
        self._ip_text: dict[int, str] = {}
        self._ip_int: dict[str, int] = {}

    def port(self, modid: int, cmdid: int) -> int:
        """The agent port serving the module."""
        return self.base_port + (modid + cmdid) % self.ports

    def next_seq(self) -> int:
        """A fresh sequence number."""
        return next(self._seqs) & 0xFFFF_FFFF

    # --- requests: each validates its arguments first, so a mistake is a local error ------

    def get_host_request(self, modid: int, cmdid: int) -> tuple[int, bytes]:
        """``(seq, datagram)`` of a GetHostRequest."""
        seq = self.next_seq()
        return seq, wire.encode_get_host_request(seq, *parse_module(modid, cmdid))

    def get_route_request(self, modid: int, cmdid: int) -> tuple[int, bytes]:
        """``(seq, datagram)`` of an API GetRouteRequest."""
        seq = self.next_seq()
        msg = wire.ApiGetRouteRequest(seq, *parse_module(modid, cmdid))
        return seq, wire.encode_datagram(msg)

    def state_request(
        self, modid: int, cmdid: int, offset: int = 0, explain: bool = False
    ) -> tuple[int, bytes]:
        """``(seq, datagram)`` of an AgentStateRequest for the hosts from ``offset`` on
        (what ``lars query`` shows; ``explain``: with the scheduling, ``--explain``)."""
        seq = self.next_seq()
        msg = wire.AgentStateRequest(seq, *parse_module(modid, cmdid), offset, int(explain))
        if not explain:  # the form agents before api_level 3 take too
            return seq, msgpack.packb((10, seq, msg.modid, msg.cmdid, offset))
        return seq, wire.encode_datagram(msg)

    def stats_request(self) -> tuple[int, bytes]:
        """``(seq, datagram)`` of a StatsRequest (the agent's counters)."""
        seq = self.next_seq()
        return seq, wire.encode_datagram(wire.StatsRequest(seq))

    def report_request(
        self, modid: int, cmdid: int, host: Host, ok: bool | None, retcode: int | None
    ) -> bytes:
        """A ReportRequest datagram, from ``ok=`` or ``retcode=`` (exactly one of them)."""
        if (ok is None) == (retcode is None):
            raise InvalidValue("report() takes exactly one of ok= or retcode=")
        code = check_id(retcode, "retcode") if retcode is not None else (0 if ok else 1)
        ip = self._ip_int.get(host.ip)
        if ip is None:
            ip = self._ip_int[host.ip] = ip_to_int(host.ip)
            self._trim(self._ip_int)
        return wire.encode_report_request(*parse_module(modid, cmdid), (ip, host.port), code)

    # --- replies ---------------------------------------------------------------------------

    @staticmethod
    def reply(data: bytes) -> tuple[int, wire.Message] | None:
        """``(seq, message)`` of a datagram from the agent; None for garbage or a message
        that answers no request (one without a sequence number)."""
        try:
            msg = wire.decode_datagram(data)
        except ProtocolError:
            return None
        seq = getattr(msg, "seq", None)
        return None if seq is None else (seq, msg)

    @staticmethod
    def match(data: bytes, seq: int) -> wire.Message | None:
        """The reply in ``data`` if it answers request ``seq``; None for anything else
        (a late reply to an earlier request, or garbage)."""
        got = ClientCore.reply(data)
        return got[1] if got is not None and got[0] == seq else None

    def to_host(self, key: HostKey) -> Host:
        """The public form of a host from the wire."""
        ip = self._ip_text.get(key[0])
        if ip is None:
            ip = self._ip_text[key[0]] = socket.inet_ntoa(_pack_ip(key[0]))
            self._trim(self._ip_text)
        return Host(ip, key[1])

    def host_result(self, msg: wire.Message, modid: int, cmdid: int) -> Host:
        """The host of a GetHostResponse, or the error it stands for."""
        if isinstance(msg, wire.GetHostResponse):
            if msg.retcode == _SUCC and msg.host is not None:
                return self.to_host(msg.host)
            self._raise_for(msg.retcode, modid, cmdid)
        raise self._unexpected(msg)

    def route_result(self, msg: wire.Message, modid: int, cmdid: int) -> list[Host]:
        """The hosts of an API GetRouteResponse, or the error it stands for."""
        if isinstance(msg, wire.ApiGetRouteResponse):
            if msg.retcode == _SUCC:
                return [self.to_host(h) for h in msg.hosts]
            self._raise_for(msg.retcode, modid, cmdid)
        raise self._unexpected(msg)

    @staticmethod
    def state_page(msg: wire.Message, state: dict[str, Any]) -> int | None:
        """Add one AgentStateResponse page to ``state`` (a dict the caller starts empty):
        returns the offset of the next page to ask for, or None when the state is whole
        (or the agent does not know the module: ``state`` stays empty)."""
        if not isinstance(msg, wire.AgentStateResponse):
            raise ClientCore._unexpected(msg)
        if msg.retcode != _SUCC:
            return None
        hosts = [*state.get("hosts", ()), *msg.state.get("hosts", ())]
        state.update(msg.state, hosts=hosts)
        total = msg.state.get("host_count")  # absent from agents that do not page
        if type(total) is not int or not msg.state.get("hosts") or len(hosts) >= total:
            return None
        return len(hosts)

    def register_request(self, spec: RegistrationSpec) -> tuple[int, bytes]:
        """``(seq, datagram)`` of a RegisterRequest (a registration, or its renewal)."""
        seq = self.next_seq()
        return seq, wire.encode_datagram(wire.RegisterRequest(seq, *spec))

    def deregister_request(self, spec: RegistrationSpec, drain: int) -> tuple[int, bytes]:
        """``(seq, datagram)`` of a DeregisterRequest, ``drain`` in milliseconds."""
        seq = self.next_seq()
        msg = wire.DeregisterRequest(seq, spec.modid, spec.cmdid, spec.ip, spec.port, drain)
        return seq, wire.encode_datagram(msg)

    @staticmethod
    def registered(msg: wire.Message, what: str) -> int:
        """The address a RegisterReply says was registered (or deregistered), or the error
        it stands for: RequestRejected naming ``what``, the return code and the reason."""
        if isinstance(msg, wire.RegisterReply):
            if msg.retcode == _SUCC:
                return msg.ip
            code = wire.RetCode.NAMES.get(msg.retcode, str(msg.retcode))
            verb = "failed" if msg.retcode == wire.RetCode.SYSTEM_ERROR else "refused"
            raise RequestRejected(f"{what} {verb} ({code}): {msg.reason}")
        if isinstance(msg, wire.ErrorReply):  # an agent before api_level 4 says so here
            raise RequestRejected(f"{what} refused by the agent: {msg.reason}")
        raise ClientCore._unexpected(msg)

    @staticmethod
    def stats_result(msg: wire.Message) -> dict[str, Any]:
        """The counters of a StatsResponse."""
        if not isinstance(msg, wire.StatsResponse):
            raise ClientCore._unexpected(msg)
        return dict(msg.counters)

    @staticmethod
    def _raise_for(retcode: int, modid: int, cmdid: int) -> None:
        if retcode == _NOEXIST:
            raise NoRoute(f"no route for module {modid}/{cmdid}")
        if retcode == _OVERLOAD:
            raise Overloaded(f"every host of module {modid}/{cmdid} is overloaded")
        raise RequestRejected(f"agent answered {wire.RetCode.NAMES.get(retcode, retcode)}")

    @staticmethod
    def _unexpected(msg: wire.Message) -> RequestRejected:
        if isinstance(msg, wire.ErrorReply):
            return RequestRejected(f"agent rejected the request: {msg.reason}")
        return RequestRejected(f"unexpected reply from the agent: {type(msg).__name__}")

    def unavailable(
        self, modid: int, cmdid: int, attempts: int | None = None, timeout: float | None = None
    ) -> AgentUnavailable:
        """The error for a request that got no answer (after ``attempts`` of ``timeout``
        seconds; by default the client's retries + 1 of its timeout)."""
        attempts = self.retries + 1 if attempts is None else attempts
        timeout = self.timeout if timeout is None else timeout
        return AgentUnavailable(
            f"no answer from the agent at {self.host}:{self.port(modid, cmdid)} "
            f"after {attempts} attempts of {timeout}s"
        )

    @staticmethod
    def _trim(cache: dict[Any, Any]) -> None:
        if len(cache) > 4096:
            cache.clear()


def _config_kwargs(config_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    config = load_config(config_path)
    return {
        "host": config.agent.host,
        "base_port": config.agent.base_port,
        "ports": config.agent.ports,
        "timeout": config.client.timeout,
        "retries": config.client.retries,
        "busy_poll": config.client.busy_poll,
        "report_delay": config.client.report_delay,
    }


#: A report as it rides on a request: ``(modid, cmdid, ip, port, retcode)``.
_Report = tuple[Any, ...]  # (modid, cmdid, ip, port, retcode[, latency_us])
#: After a poll that ran out, a lane answers this many requests without polling, doubled
#: for each further one in a row up to SPIN_SKIP_MAX (a busy machine stops polling).
SPIN_SKIP = 16
SPIN_SKIP_MAX = 4096
#: Times a lane asks the agent's API level before it gives up and sends reports alone.
PROBE_ATTEMPTS = 3
_DONTWAIT = socket.MSG_DONTWAIT
_yield = os.sched_yield
_U32 = 0xFFFF_FFFF


class _Lane:
    """One thread's socket to one agent port, and the reports waiting to ride on its next
    GetHostRequest. Only the owning thread sends requests and appends reports; the flusher
    thread may send the reports of a lane that stayed idle, under ``lock``."""

    __slots__ = (
        "level",
        "lock",
        "misses",
        "pending",
        "piggyback",
        "probe_seq",
        "probes",
        "seen",
        "skip",
        "sock",
        "timed",
        "used",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.pending: list[_Report] = []
        #: Whether the agent takes GetHostReportRequest: None until it said.
        self.piggyback: bool | None = None
        #: The agent's api_level (None until it said; 0: it has none); whether a pending
        #: report carries a latency (then they ride on a GetHostKeyRequest).
        self.level: int | None = None
        self.timed = False
        #: The seq of the StatsRequest asking it, while unanswered; how many were sent.
        self.probe_seq: int | None = None
        self.probes = 0
        #: Requests sent (``used``), and their number at the flusher's last look (``seen``).
        self.used = 0
        self.seen = 0
        #: Requests left to answer without polling, and polls in a row that ran out.
        self.skip = 0
        self.misses = 0

    def flush(self) -> None:
        """Send the pending reports alone, in order (call with ``lock`` held)."""
        pending, self.pending = self.pending, []
        self.timed = False
        for report in pending:
            modid, cmdid, ip, port, code = report[:5]
            # A report is best effort, like the original's: no agent, no report.
            with contextlib.suppress(OSError):
                if len(report) == 6:
                    self.sock.send(
                        wire.encode_timed_report_request(modid, cmdid, (ip, port), code, report[5])
                    )
                else:
                    self.sock.send(wire.encode_report_request(modid, cmdid, (ip, port), code))


class _Flusher(threading.Thread):
    """Sends the reports of lanes that made no request for ``delay`` seconds; sleeps
    while no report waits."""

    def __init__(self, client: LarsClient, delay: float) -> None:
        super().__init__(name="lars-client-flusher", daemon=True)
        self.client = weakref.ref(client)
        self.delay = delay
        self.parked = False
        self.bell = threading.Event()
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            time.sleep(self.delay)
            client = self.client()
            if client is None:
                return
            waiting = client._flush_idle()
            del client
            if waiting or self.stopped:
                continue
            self.parked = True  # report() rings the bell from now on
            client = self.client()
            if client is not None and client._any_pending():
                self.parked = False
                continue
            del client
            self.bell.wait()
            self.bell.clear()
            self.parked = False

    def stop(self) -> None:
        self.stopped = True
        self.bell.set()


#: Clients whose reports may still wait: flushed when the interpreter exits.
_LIVE: weakref.WeakSet[LarsClient] = weakref.WeakSet()


#: Registrations not closed yet: deregistered (drain 0) when the interpreter exits, so a
#: process that ends without closing them does not stay in the route for their ttl.
_OPEN_REGISTRATIONS: weakref.WeakSet[Registration] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    """Send the reports that wait, and deregister what is still registered."""
    for client in list(_LIVE):
        with contextlib.suppress(Exception):
            client.flush()
    for registration in list(_OPEN_REGISTRATIONS):
        with contextlib.suppress(Exception):
            registration.close()


class LarsClient:
    """Synchronous client of the local agent. Safe to share between threads.

    Each thread has its own socket per agent port (a *lane*). Two things make its loop of
    get_host + report cheap (both measured in ``benchmarks/vs_original.py``):

    - a report does not go out alone: it waits, in order, for the thread's next get_host on
      the same port and rides on it (GetHostReportRequest), so the agent reads one datagram
      per call. A report whose thread makes no request within ``report_delay`` is sent alone
      by a background thread; :meth:`flush` and :meth:`close` (and interpreter exit) send
      what waits. Only agents that say they take it get it (asked once per lane);
    - after a request the thread polls for the answer for up to ``busy_poll`` seconds
      before it blocks: a local agent usually answers within it, and a thread that does not
      sleep does not pay the wake-up. A thread whose polls keep running out (no spare core)
      stops polling for a while.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        base_port: int = DEFAULT_BASE_PORT,
        ports: int = DEFAULT_PORTS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        busy_poll: float = DEFAULT_BUSY_POLL,
        report_delay: float = DEFAULT_REPORT_DELAY,
    ) -> None:
        if busy_poll < 0 or report_delay < 0:
            raise InvalidValue("busy_poll and report_delay must be >= 0")
        self.core = ClientCore(host, base_port, ports, timeout, retries)
        self.busy_poll = busy_poll
        self.report_delay = report_delay
        self._local = threading.local()
        self._lanes: list[_Lane] = []
        self._lock = threading.Lock()
        self._flusher: _Flusher | None = None
        self._timeval = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
        #: The wire's (ip, port) of hosts -> Host, and back: no per-call conversions.
        self._hosts: dict[Any, Host] = {}
        self._keys: dict[Host, HostKey] = {}

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> LarsClient:
        """A client for the agent of a lars.toml (``path``, else ./lars.toml, else defaults)."""
        return cls(**_config_kwargs(path))

    # --- lanes -------------------------------------------------------------------------------

    def _lane(self, port: int) -> _Lane:
        lanes: dict[int, _Lane] | None = getattr(self._local, "lanes", None)
        if lanes is None:
            lanes = self._local.lanes = {}
        lane = lanes.get(port)
        if lane is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # A kernel receive timeout keeps each blocking receive a single system call.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval)
            sock.connect((self.core.host, port))
            lane = lanes[port] = _Lane(sock)
            if not self.report_delay:
                lane.piggyback = False
            with self._lock:
                self._lanes.append(lane)
        return lane

    def _receive(self, lane: _Lane) -> bytes:
        """The next datagram on the lane: polled for up to busy_poll, then waited for (the
        socket's timeout raises BlockingIOError)."""
        recv = lane.sock.recv
        if lane.skip or not self.busy_poll:
            if lane.skip:
                lane.skip -= 1
            return recv(RECEIVE_SIZE)
        perf = time.perf_counter
        until = perf() + self.busy_poll
        while True:
            try:
                data = recv(RECEIVE_SIZE, _DONTWAIT)
            except BlockingIOError:
                if perf() < until:
                    _yield()  # a polling client must not keep a busy agent from running
                    continue
                lane.misses += 1
                lane.skip = min(SPIN_SKIP << lane.misses, SPIN_SKIP_MAX)
                return recv(RECEIVE_SIZE)
            lane.misses = 0
            return data

    def _exchange_on(
        self, lane: _Lane, modid: int, cmdid: int, seq: int, request: bytes, retry: bytes
    ) -> tuple[bytes, Any]:
        """Send ``request`` and return the datagram answering ``seq``, raw and unpacked;
        resends ``retry`` (the request without its reports: they travel at most once)."""
        sock = lane.sock
        for _ in range(self.core.retries + 1):
            try:
                sock.send(request)
                while True:
                    data = self._receive(lane)
                    try:
                        obj = _unpackb(data, use_list=False)
                        if obj[1] == seq:
                            break
                    except Exception:  # garbage, or a reply without a seq: not ours
                        continue
                    if obj[1] == lane.probe_seq:
                        self._probed(lane, data)
                if lane.probe_seq is not None and lane.probe_seq != seq:
                    self._probe_lost(lane)  # the agent answers in order: it skipped it
                return data, obj
            except BlockingIOError:  # SO_RCVTIMEO ran out
                if request is not retry:  # an agent that dropped it may not take reports
                    lane.piggyback = None
                    lane.probes = 0
                request = retry
                continue
            except ConnectionRefusedError:  # nothing listens on the port (yet): wait it out
                request = retry
                time.sleep(self.core.timeout)
        raise self.core.unavailable(modid, cmdid)

    def _exchange(self, modid: int, cmdid: int, seq: int, request: bytes) -> wire.Message:
        lane = self._lane(self.core.port(modid, cmdid))
        if lane.pending:  # they go first, alone, in order
            with lane.lock:
                lane.flush()
        lane.used += 1
        data, _ = self._exchange_on(lane, modid, cmdid, seq, request, request)
        return self._message(data, seq)

    def _message(self, data: bytes, seq: int) -> wire.Message:
        reply = self.core.match(data, seq)
        if reply is None:  # it had our seq, but is no valid message
            raise RequestRejected("unreadable reply from the agent")
        return reply

    def _probe(self, lane: _Lane) -> None:
        """Ask the agent of ``lane`` whether it takes reports on requests. The answer is
        read by the receive of the lane's next request, so asking costs no wait."""
        if lane.probe_seq is not None:
            return
        seq, request = self.core.stats_request()
        lane.probe_seq = seq
        lane.probes += 1
        with contextlib.suppress(OSError):
            lane.sock.send(request)

    def _probed(self, lane: _Lane, data: bytes) -> None:
        lane.probe_seq = None
        reply = ClientCore.reply(data)
        msg = reply[1] if reply is not None else None
        if isinstance(msg, wire.StatsResponse):
            level = msg.counters.get("api_level")
            lane.level = level if type(level) is int else 0
            lane.piggyback = lane.level >= wire.API_LEVEL_PIGGYBACK and self.report_delay > 0
        else:  # an agent that refuses StatsRequest predates api_level
            lane.piggyback = False
            lane.level = 0

    @staticmethod
    def _probe_lost(lane: _Lane) -> None:
        lane.probe_seq = None
        if lane.probes >= PROBE_ATTEMPTS:
            lane.piggyback = False

    # --- the API -----------------------------------------------------------------------------

    def get_host(self, modid: int, cmdid: int, key: str | bytes | None = None) -> Host:
        """One healthy host of the module. ``key`` (str or bytes, at most 256 bytes) is the
        caller's key for a module with the ``hash`` policy: the same key gets the same host
        while it stays healthy (agents before api_level 3 ignore it)."""
        if key is not None:
            return self._get_host_keyed(modid, cmdid, key)
        if type(modid) is not int or type(cmdid) is not int or (modid | cmdid) > _U32:
            parse_module(modid, cmdid)  # raises the error that says what is wrong
        if modid < 0 or cmdid < 0:
            parse_module(modid, cmdid)
        core = self.core
        lane = self._lane(core.base_port + (modid + cmdid) % core.ports)
        seq = next(core._seqs) & _U32
        plain = wire.encode_get_host_request(seq, modid, cmdid)
        request = plain
        if lane.pending:
            with lane.lock:
                reports, lane.pending = lane.pending, []
                timed, lane.timed = lane.timed, False
            if reports:
                if timed:
                    request = wire.encode_get_host_key_request(seq, modid, cmdid, None, reports)
                else:
                    request = wire.encode_get_host_report_request(seq, modid, cmdid, reports)
        return self._ask_host(lane, modid, cmdid, seq, request, plain)

    def _get_host_keyed(self, modid: int, cmdid: int, key: str | bytes) -> Host:
        """get_host with a hash key: a GetHostKeyRequest (with the pending reports), or a
        plain get_host to an agent that does not take it."""
        hkey = key if type(key) is bytes and len(key) <= wire.MAX_KEY else _hash_key(key)
        if (
            type(modid) is not int
            or type(cmdid) is not int
            or not (0 <= modid <= _U32 and 0 <= cmdid <= _U32)
        ):
            modid, cmdid = parse_module(modid, cmdid)  # raises the error that says what
        core = self.core
        lane = self._lane(core.base_port + (modid + cmdid) % core.ports)
        if lane.level is None:  # ask now: the key must not go to a host by chance
            probe_seq, probe = core.stats_request()
            data, _ = self._exchange_on(lane, modid, cmdid, probe_seq, probe, probe)
            self._probed(lane, data)
        if not lane.level or lane.level < wire.API_LEVEL_POLICY:
            return self.get_host(modid, cmdid)
        seq = next(core._seqs) & _U32
        plain = wire.encode_get_host_key_request(seq, modid, cmdid, hkey, [])
        request = plain
        if lane.pending:
            with lane.lock:
                reports, lane.pending = lane.pending, []
                lane.timed = False
            if reports:
                request = wire.encode_get_host_key_request(seq, modid, cmdid, hkey, reports)
        return self._ask_host(lane, modid, cmdid, seq, request, plain)

    def _ask_host(
        self, lane: _Lane, modid: int, cmdid: int, seq: int, request: bytes, plain: bytes
    ) -> Host:
        """Send a get_host ``request`` (resent as ``plain``) and return its host."""
        lane.used += 1
        data, reply = self._exchange_on(lane, modid, cmdid, seq, request, plain)
        try:  # the usual answer, read without building a message
            if reply[0] == 5 and reply[4] == 0:
                host = self._hosts.get(reply[5])
                if host is not None:
                    return host
        except Exception:  # anything else takes the general path, which names it
            pass
        return self._host_reply(data, seq, modid, cmdid)

    def _host_reply(self, data: bytes, seq: int, modid: int, cmdid: int) -> Host:
        """The host of a GetHostResponse (or the error it carries), the general way."""
        msg = self._message(data, seq)
        host = self.core.host_result(msg, modid, cmdid)
        if isinstance(msg, wire.GetHostResponse) and msg.host is not None:
            if len(self._hosts) > 4096:
                self._hosts.clear()
                self._keys.clear()
            self._hosts[msg.host] = host
            self._keys[host] = msg.host
        return host

    def get_route(self, modid: int, cmdid: int) -> list[Host]:
        """Every host of the module."""
        seq, request = self.core.get_route_request(modid, cmdid)
        return self.core.route_result(self._exchange(modid, cmdid, seq, request), modid, cmdid)

    def agent_state(self, modid: int, cmdid: int, explain: bool = False) -> dict[str, Any] | None:
        """The agent's view of the module (status, hosts and their counters), as
        ``lars query`` prints it; None if the agent does not know the module. A large
        route comes in several pages, one request each. ``explain`` adds the scheduling
        (``lars query --explain``; see ModuleTable.describe)."""
        state: dict[str, Any] = {}
        offset: int | None = 0
        while offset is not None:
            seq, request = self.core.state_request(modid, cmdid, offset, explain)
            offset = self.core.state_page(self._exchange(modid, cmdid, seq, request), state)
        return state or None

    def agent_stats(self) -> dict[str, Any]:
        """The agent's counters (requests refused, DNS connections, ...), as ``lars stats``
        prints them."""
        seq, request = self.core.stats_request()
        return self.core.stats_result(self._exchange(0, 0, seq, request))

    def report(
        self,
        modid: int,
        cmdid: int,
        host: Host,
        ok: bool | None = None,
        *,
        retcode: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Report the result of a call to ``host``: ``ok=True/False`` or ``retcode=`` (0 ok);
        ``latency``: the call's seconds, for the p2c policy (agents before api_level 3 do
        without it).

        The report rides on the thread's next get_host to the same agent port, or goes
        alone after ``report_delay`` (see the class): either way in order."""
        key = self._keys.get(host) if type(host) is Host else None
        if (
            key is None
            or ok is None
            or retcode is not None
            or type(modid) is not int
            or type(cmdid) is not int
            or not (0 <= modid <= _U32 and 0 <= cmdid <= _U32)
            or (latency is not None and not (type(latency) is float and 0 <= latency < 4294))
        ):
            self._report_checked(modid, cmdid, host, ok, retcode, latency)
            return
        core = self.core
        lane = self._lane(core.base_port + (modid + cmdid) % core.ports)
        code = 0 if ok else 1
        if not lane.piggyback:
            if latency is not None:
                self._report_checked(modid, cmdid, host, ok, retcode, latency)
                return
            self._send_report(lane, modid, cmdid, key, code)
            if lane.piggyback is None:
                self._probe(lane)
            return
        with lane.lock:
            if latency is None or lane.level is None or lane.level < wire.API_LEVEL_POLICY:
                lane.pending.append((modid, cmdid, key[0], key[1], code))
            else:
                lane.pending.append((modid, cmdid, key[0], key[1], code, round(latency * 1e6)))
                lane.timed = True
            if len(lane.pending) >= wire.MAX_PIGGYBACK:
                lane.flush()
        flusher = self._flusher
        if flusher is None:
            self._start_flusher()
        elif flusher.parked:
            flusher.bell.set()

    def _report_checked(
        self,
        modid: int,
        cmdid: int,
        host: Host,
        ok: bool | None,
        retcode: int | None,
        latency: float | None = None,
    ) -> None:
        """report(), the long way: validate everything, then queue or send."""
        request = self.core.report_request(modid, cmdid, host, ok, retcode)  # validates
        latency_us = None if latency is None else _latency_us(latency)
        key = self._keys.get(host)
        if key is None:
            key = (ip_to_int(host.ip), check_port(host.port))
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[host] = key
        lane = self._lane(self.core.port(modid, cmdid))
        code = check_id(retcode, "retcode") if retcode is not None else (0 if ok else 1)
        timed = latency_us is not None and (lane.level or 0) >= wire.API_LEVEL_POLICY
        if not lane.piggyback:
            if timed:
                assert latency_us is not None
                request = wire.encode_timed_report_request(modid, cmdid, key, code, latency_us)
            with contextlib.suppress(ConnectionRefusedError, BlockingIOError):
                lane.sock.send(request)
            if lane.piggyback is None or (latency_us is not None and lane.level is None):
                self._probe(lane)
            return
        with lane.lock:
            if timed:
                lane.pending.append((modid, cmdid, key[0], key[1], code, latency_us))
                lane.timed = True
            else:
                lane.pending.append((modid, cmdid, key[0], key[1], code))
            if len(lane.pending) >= wire.MAX_PIGGYBACK:
                lane.flush()
        if self._flusher is None:
            self._start_flusher()
        elif self._flusher.parked:
            self._flusher.bell.set()

    @staticmethod
    def _send_report(lane: _Lane, modid: int, cmdid: int, key: HostKey, code: int) -> None:
        # A report is best effort, like the original's: no agent, no report.
        with contextlib.suppress(ConnectionRefusedError, BlockingIOError):
            lane.sock.send(wire.encode_report_request(modid, cmdid, key, code))

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is None:
                _LIVE.add(self)
                self._flusher = _Flusher(self, self.report_delay)
                self._flusher.start()

    def _flush_idle(self) -> bool:
        """Send the reports of lanes that made no request since the last look; True if
        some still wait (on lanes in use)."""
        waiting = False
        with self._lock:
            lanes = list(self._lanes)
        for lane in lanes:
            used = lane.used
            idle = used == lane.seen
            lane.seen = used
            if not lane.pending:
                continue
            if idle:
                with lane.lock:
                    lane.flush()
            else:
                waiting = True
        return waiting

    def _any_pending(self) -> bool:
        with self._lock:
            return any(lane.pending for lane in self._lanes)

    def flush(self) -> None:
        """Send every report still waiting for a request (of every thread), now."""
        with self._lock:
            lanes = list(self._lanes)
        for lane in lanes:
            with lane.lock:
                lane.flush()

    def reg_init(self, modid: int, cmdid: int) -> list[Host]:
        """Preload a module at start-up: ask for its route, retrying briefly while the agent
        answers NoRoute (its DNS may not have answered yet). No answer at all is
        AgentUnavailable at once: the client's own timeout and retries have run out."""
        for attempt in range(REG_INIT_ATTEMPTS):
            try:
                return self.get_route(modid, cmdid)
            except NoRoute:
                if attempt == REG_INIT_ATTEMPTS - 1:
                    raise
                time.sleep(REG_INIT_PAUSE)
        raise AssertionError("unreachable")

    @contextmanager
    def call(self, modid: int, cmdid: int, key: str | bytes | None = None) -> Iterator[Host]:
        """Get a host (``key``: as for get_host); report success when the block ends,
        failure if it raises, with the block's duration as the call's latency."""
        host = self.get_host(modid, cmdid, key)
        began = time.perf_counter()
        try:
            yield host
        except BaseException:
            self.report(modid, cmdid, host, ok=False, latency=time.perf_counter() - began)
            raise
        self.report(modid, cmdid, host, ok=True, latency=time.perf_counter() - began)

    def close(self) -> None:
        """Send the reports still waiting, then close the client's sockets."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.stop()
        self.flush()
        with self._lock:
            lanes, self._lanes = self._lanes, []
        for lane in lanes:
            lane.sock.close()
        self._local = threading.local()
        _LIVE.discard(self)

    def __enter__(self) -> LarsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- self-registration ---------------------------------------------------------------

    def register(
        self,
        modid: int,
        cmdid: int,
        port: int,
        ip: str | None = None,
        weight: int | None = None,
        zone: str | None = None,
        ttl: int = 10,
    ) -> Registration:
        """Register ``ip:port`` as a host of module ``modid/cmdid`` through the local agent
        (DESIGN §14) and keep it registered until :meth:`Registration.close`.

        ``ip`` None: this host, as the agent knows it (its ``[agent] ip``, else the address
        it reaches the DNS from); ``weight`` and ``zone`` None: the route's own, or the
        defaults for a new host (100, none). ``ttl`` (1 to 3600 seconds): a host whose
        renewals stop leaves the route this long after the last one. A registration on top
        of a static route (``lars route add``) leaves the static row as it is.

        Returns once the DNS has stored it (at most REGISTER_TIMEOUT seconds). Raises
        InvalidValue for a bad argument (nothing is sent), RequestRejected when the agent
        or the DNS refuses it (the reason says why: a limit, a bad address, a DNS or store
        that is down), AgentUnavailable when no agent answers. See :class:`Registration`.
        """
        spec = registration_spec(modid, cmdid, port, ip, weight, zone, ttl)
        registration = Registration(self.core, spec)
        registration._open()
        return registration


class _RegistrationBase:
    """What a registration handle knows and decides, without I/O (both handles share it)."""

    def __init__(self, core: ClientCore, spec: RegistrationSpec) -> None:
        self.core = core
        #: What is registered; ``ip`` is the agent's answer once registered.
        self.spec = spec
        #: Why the last renewal failed (None: it went through); renewals that went through.
        self.error: LarsError | None = None
        self.renewals = 0
        #: True once closed (deregistered, or the deregistration was tried).
        self.closed = False

    @property
    def host(self) -> Host:
        """The host registered."""
        return Host(int_to_ip(self.spec.ip), self.spec.port)

    @property
    def module(self) -> tuple[int, int]:
        """``(modid, cmdid)``."""
        return self.spec.modid, self.spec.cmdid

    @property
    def ttl(self) -> int:
        """The lease, seconds: renewed every ttl / 3."""
        return self.spec.ttl

    def _registered(self, reply: wire.Message) -> None:
        ip = ClientCore.registered(reply, f"registration of {self.spec.describe()}")
        # Renewals and the deregistration name the address the agent registered.
        self.spec = self.spec._replace(ip=ip)

    def _dropped(self, reply: wire.Message) -> None:
        ClientCore.registered(reply, f"deregistration of {self.spec.describe()}")

    def _renewed(self, error: LarsError | None) -> float:
        """Record how a renewal went; returns the seconds to the next one: ttl / 3, or
        RENEW_RETRY after no answer (an agent restarting: try again soon, the lease in the
        DNS runs meanwhile)."""
        interval = renew_interval(self.spec.ttl)
        if error is None:
            if self.error is not None:
                log.info("registration of %s renewed again", self.spec.describe())
            self.error = None
            self.renewals += 1
            return interval
        if self.error is None:
            log.warning(
                "renewing the registration of %s failed: %s; trying again",
                self.spec.describe(),
                error,
            )
        self.error = error
        return min(RENEW_RETRY, interval) if isinstance(error, AgentUnavailable) else interval

    def _unavailable(self) -> AgentUnavailable:
        attempts = int(REGISTER_TIMEOUT / REGISTER_RESEND)
        return self.core.unavailable(*self.module, attempts, REGISTER_RESEND)


class _Stopped(Exception):
    """A renewal given up because the registration is being closed."""


class Registration(_RegistrationBase):
    """A host registered through the local agent (:meth:`LarsClient.register`).

    A background thread renews it every ``ttl / 3`` seconds on the registration's own
    socket; if the agent forgot it (it restarted), the renewal registers it again. A
    renewal that fails is logged (``lars.client``) and kept in :attr:`error`; it is tried
    again (soon when the agent did not answer). :meth:`close` deregisters it; a ``with``
    block closes it at its end (a deregistration that fails while the block raises is
    logged, not raised over the block's exception), and so does the interpreter's exit
    (drain 0) for one still open. It does not depend on the client that made it: closing
    the client leaves it registered.
    """

    def __init__(self, core: ClientCore, spec: RegistrationSpec) -> None:
        super().__init__(core, spec)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.connect((core.host, core.port(spec.modid, spec.cmdid)))
        except OSError as exc:
            self._sock.close()
            raise AgentUnavailable(f"cannot reach the agent at {core.host}: {exc}") from None
        self._lock = threading.Lock()  # one exchange at a time on the socket
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        """Register (raises if refused), then start renewing."""
        try:
            self._registered(self._ask(*self.core.register_request(self.spec)))
        except BaseException:
            self.closed = True
            self._sock.close()
            raise
        self._thread = threading.Thread(
            target=self._renew_forever,
            name=f"lars-register-{self.spec.modid}-{self.spec.cmdid}-{self.spec.port}",
            daemon=True,
        )
        self._thread.start()
        _OPEN_REGISTRATIONS.add(self)

    def _ask(self, seq: int, request: bytes, renewal: bool = False) -> wire.Message:
        """Send ``request``, again every REGISTER_RESEND seconds, and return the reply to
        ``seq``; AgentUnavailable after REGISTER_TIMEOUT. A renewal gives up (_Stopped) as
        soon as the registration is being closed."""
        deadline = time.monotonic() + REGISTER_TIMEOUT
        sock = self._sock
        with self._lock:
            while (now := time.monotonic()) < deadline:
                try:
                    sock.send(request)
                except ConnectionRefusedError:  # nothing listens (yet): as if lost
                    pass
                except OSError as exc:
                    raise AgentUnavailable(f"cannot reach the agent: {exc}") from None
                resend = min(now + REGISTER_RESEND, deadline)
                while (left := resend - time.monotonic()) > 0:
                    if renewal and self._stop.is_set():
                        raise _Stopped
                    sock.settimeout(min(left, STOP_CHECK))
                    try:
                        data = sock.recv(RECEIVE_SIZE)
                    except (TimeoutError, ConnectionRefusedError):
                        continue
                    except OSError as exc:
                        raise AgentUnavailable(f"cannot reach the agent: {exc}") from None
                    reply = ClientCore.match(data, seq)
                    if reply is not None:
                        return reply
        raise self._unavailable()

    def _renew_forever(self) -> None:
        wait = renew_interval(self.spec.ttl)
        while not self._stop.wait(wait):
            error: LarsError | None = None
            try:
                self._registered(self._ask(*self.core.register_request(self.spec), True))
            except _Stopped:
                return
            except LarsError as exc:
                error = exc
            wait = self._renewed(error)

    def close(self, drain: float = 0.0) -> None:
        """Deregister: stop renewing, and have the DNS drain the host at once (weight 0:
        no new calls) and remove it after ``drain`` seconds (0 to 3600; 0: now). Keep
        serving the calls in flight meanwhile: this returns once the DNS has taken it, it
        does not wait the drain (``lars register`` does). Raises RequestRejected or
        AgentUnavailable if the deregistration did not go through: the host then leaves
        the route ``ttl`` seconds after its last renewal. Closing again does nothing."""
        drain_milliseconds = drain_ms(drain)
        if self.closed:
            return
        self.closed = True
        _OPEN_REGISTRATIONS.discard(self)
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(REGISTER_TIMEOUT + 1.0)
        try:
            request = self.core.deregister_request(self.spec, drain_milliseconds)
            self._dropped(self._ask(*request))
        finally:
            self._sock.close()

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except LarsError as exc:  # the block's own exception matters more
            log.warning("deregistering %s: %s", self.spec.describe(), exc)


def _hash_key(key: object) -> bytes:
    """A get_host key as the wire carries it (str in UTF-8), or InvalidValue."""
    if type(key) is str:
        key = key.encode()
    if type(key) is not bytes or len(key) > wire.MAX_KEY:
        raise InvalidValue(f"key must be str or bytes of at most {wire.MAX_KEY} bytes")
    return key


def _latency_us(latency: object) -> int:
    """A report's latency in whole microseconds, or InvalidValue."""
    if type(latency) not in (int, float) or not 0 <= latency < 4294:  # type: ignore[operator]
        raise InvalidValue(f"latency must be seconds from 0 to 4294, got {latency!r}")
    return round(latency * 1e6)  # type: ignore[operator]


def _closed_error() -> trio.ClosedResourceError:
    return trio.ClosedResourceError("the AsyncLarsClient was closed")


class _Slot:
    """Where the reply to one request in flight lands."""

    __slots__ = ("reply", "wake")

    def __init__(self) -> None:
        self.reply: wire.Message | None = None
        #: While the request's task is parked: set it to wake the task.
        self.wake: trio.Event | None = None


class _Channel:
    """One connected UDP socket to one agent port, shared by every task of a client.

    Replies are dispatched by sequence number: each request in flight has a slot; the task
    that receives a datagram puts it into the slot of its seq and wakes that slot's task. A
    reply whose seq has no slot (its request timed out or was answered already) is dropped.

    trio lets one task at a time receive on a socket, and here that is always one of the
    waiting tasks: a task that needs a reply becomes *the reader* if there is none, and
    receives (dispatching every reply) until its own reply is in, its attempt times out or
    it is cancelled. Then it hands the reading over by waking the oldest parked task. Every
    other waiting task is parked on its slot. Sends go through a lock: two tasks must not
    both wait for room in the socket's buffer.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.closed = False
        self._send_lock = trio.Lock()
        self._slots: dict[int, _Slot] = {}
        #: Slots of the parked tasks, oldest first (a dict as an ordered set).
        self._parked: dict[_Slot, None] = {}
        self._reading = False

    def expect(self, seq: int) -> _Slot:
        """Open the slot for the reply to ``seq``, before the request goes out."""
        slot = self._slots[seq] = _Slot()
        return slot

    def forget(self, seq: int) -> None:
        """Close the slot of ``seq``: a reply to it is stale from now on."""
        self._slots.pop(seq, None)

    async def send(self, datagram: bytes) -> None:
        """Send one datagram. A send refused because nothing listens on the port is dropped:
        the request's attempt runs out, as if the datagram had been lost."""
        async with self._send_lock:
            if self.closed:
                raise _closed_error()
            try:
                await self.sock.send(datagram)
            except ConnectionRefusedError:
                pass
            except (OSError, trio.ClosedResourceError):
                if self.closed:
                    raise _closed_error() from None
                raise

    async def receive(self, slot: _Slot) -> wire.Message:
        """Wait for the reply in ``slot``, being the reader meanwhile if no task is."""
        try:
            while slot.reply is None:
                if self.closed:
                    raise _closed_error()
                if self._reading:
                    await self._park(slot)
                else:
                    await self._read_until(slot)
        finally:
            if not self._reading:  # we were the reader, or were woken to become it
                self._hand_over()
        return slot.reply

    async def _park(self, slot: _Slot) -> None:
        slot.wake = trio.Event()
        self._parked[slot] = None
        try:
            await slot.wake.wait()
        finally:
            slot.wake = None
            del self._parked[slot]

    async def _read_until(self, slot: _Slot) -> None:
        self._reading = True
        try:
            while slot.reply is None:
                try:
                    data = await self.sock.recv(RECEIVE_SIZE)
                except ConnectionRefusedError:  # some request met a closed port: it runs out
                    continue
                except (OSError, trio.ClosedResourceError):
                    if self.closed:
                        raise _closed_error() from None
                    raise
                self._deliver(data)
        finally:
            self._reading = False

    def _deliver(self, data: bytes) -> None:
        got = ClientCore.reply(data)
        if got is None:
            return
        slot = self._slots.get(got[0])
        if slot is None or slot.reply is not None:
            return  # stale: its request is gone; or a duplicate
        slot.reply = got[1]
        if slot.wake is not None:
            slot.wake.set()

    def _hand_over(self) -> None:
        """Wake the oldest parked task that has not been woken yet: it becomes the reader."""
        for slot in self._parked:
            if slot.wake is not None and not slot.wake.is_set():
                slot.wake.set()
                return

    def close(self) -> None:
        """Close the socket; the reader and the parked tasks get ClosedResourceError."""
        self.closed = True
        self.sock.close()  # ends the reader's receive
        for slot in self._parked:
            if slot.wake is not None:
                slot.wake.set()


class AsyncLarsClient:
    """The trio client of the local agent: :class:`LarsClient`'s methods, awaited.

    Safe to share between tasks. Each agent port has one socket; replies are dispatched to
    the waiting requests by sequence number (see :class:`_Channel`). The reading is done by
    the waiting tasks themselves, one at a time, handed over from one to the next, rather
    than by a background reader task: a background task needs a nursery — the caller's, which
    every user would have to open, or a trio system task, which outlives the client and whose
    crash ends the whole program. This way each receive runs inside a request's own cancel
    scope, so timeouts and cancellation stay per request, and nothing runs while no request
    is in flight. One task alone still does one send and one receive per request.

    :meth:`close` is final: waiting tasks, and any later call, get
    :class:`trio.ClosedResourceError`.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        base_port: int = DEFAULT_BASE_PORT,
        ports: int = DEFAULT_PORTS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        self.core = ClientCore(host, base_port, ports, timeout, retries)
        self._channels: dict[int, _Channel] = {}
        self._open_lock = trio.Lock()
        self._closed = False
        self._api_level: int | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> AsyncLarsClient:
        """A client for the agent of a lars.toml (``path``, else ./lars.toml, else defaults)."""
        return cls(**_config_kwargs(path))

    async def _channel(self, port: int) -> _Channel:
        channel = self._channels.get(port)
        if channel is not None:
            return channel
        async with self._open_lock:  # one socket per port, however many tasks ask at once
            if self._closed:
                raise _closed_error()
            channel = self._channels.get(port)
            if channel is None:
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    await sock.connect((self.core.host, port))
                except BaseException:
                    sock.close()
                    raise
                channel = self._channels[port] = _Channel(sock)
        return channel

    async def _exchange(
        self,
        modid: int,
        cmdid: int,
        seq: int,
        request: bytes,
        attempts: int | None = None,
        each: float | None = None,
    ) -> wire.Message:
        """Send ``request`` to the module's port and return the reply to ``seq``: up to
        ``attempts`` sends (default: retries + 1), waiting ``each`` seconds after each
        (default: the client's timeout)."""
        attempts = self.core.retries + 1 if attempts is None else attempts
        timeout = self.core.timeout if each is None else each
        channel = await self._channel(self.core.port(modid, cmdid))
        slot = channel.expect(seq)
        try:
            for _ in range(attempts):
                with trio.move_on_after(timeout):
                    if slot.reply is None:  # else it came in as the last attempt ran out
                        await channel.send(request)
                    return await channel.receive(slot)
            if slot.reply is not None:
                return slot.reply
        finally:
            channel.forget(seq)
        raise self.core.unavailable(modid, cmdid, attempts, timeout)

    async def get_host(self, modid: int, cmdid: int, key: str | bytes | None = None) -> Host:
        """One healthy host of the module (``key``: as for LarsClient.get_host)."""
        if key is not None and await self._level() >= wire.API_LEVEL_POLICY:
            hkey = _hash_key(key)
            modid, cmdid = parse_module(modid, cmdid)
            seq = self.core.next_seq()
            request = wire.encode_get_host_key_request(seq, modid, cmdid, hkey, [])
        else:
            if key is not None:
                _hash_key(key)
            seq, request = self.core.get_host_request(modid, cmdid)
        reply = await self._exchange(modid, cmdid, seq, request)
        return self.core.host_result(reply, modid, cmdid)

    async def get_route(self, modid: int, cmdid: int) -> list[Host]:
        """Every host of the module."""
        seq, request = self.core.get_route_request(modid, cmdid)
        reply = await self._exchange(modid, cmdid, seq, request)
        return self.core.route_result(reply, modid, cmdid)

    async def agent_state(
        self, modid: int, cmdid: int, explain: bool = False
    ) -> dict[str, Any] | None:
        """The agent's view of the module (status, hosts and their counters), as
        ``lars query`` prints it; None if the agent does not know the module. A large
        route comes in several pages, one request each. ``explain`` adds the scheduling
        (``lars query --explain``)."""
        state: dict[str, Any] = {}
        offset: int | None = 0
        while offset is not None:
            seq, request = self.core.state_request(modid, cmdid, offset, explain)
            reply = await self._exchange(modid, cmdid, seq, request)
            offset = self.core.state_page(reply, state)
        return state or None

    async def agent_stats(self) -> dict[str, Any]:
        """The agent's counters (requests refused, DNS connections, ...), as ``lars stats``
        prints them."""
        seq, request = self.core.stats_request()
        return self.core.stats_result(await self._exchange(0, 0, seq, request))

    async def report(
        self,
        modid: int,
        cmdid: int,
        host: Host,
        ok: bool | None = None,
        *,
        retcode: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Report the result of a call to ``host``: ``ok=True/False`` or ``retcode=`` (0 ok);
        ``latency``: the call's seconds (agents before api_level 3 do without it)."""
        request = self.core.report_request(modid, cmdid, host, ok, retcode)
        if latency is not None:
            latency_us = _latency_us(latency)
            if await self._level() >= wire.API_LEVEL_POLICY:
                code = check_id(retcode, "retcode") if retcode is not None else (0 if ok else 1)
                key = (ip_to_int(host.ip), check_port(host.port))
                request = wire.encode_timed_report_request(
                    *parse_module(modid, cmdid), key, code, latency_us
                )
        # A report is best effort, like the original's: no agent, no report.
        await (await self._channel(self.core.port(modid, cmdid))).send(request)

    async def reg_init(self, modid: int, cmdid: int) -> list[Host]:
        """Preload a module at start-up: ask for its route, retrying briefly while the agent
        answers NoRoute (its DNS may not have answered yet). No answer at all is
        AgentUnavailable at once: the client's own timeout and retries have run out."""
        for attempt in range(REG_INIT_ATTEMPTS):
            try:
                return await self.get_route(modid, cmdid)
            except NoRoute:
                if attempt == REG_INIT_ATTEMPTS - 1:
                    raise
                await trio.sleep(REG_INIT_PAUSE)
        raise AssertionError("unreachable")

    async def _level(self) -> int:
        """The agent's api_level, asked once (0: an agent that has none)."""
        if self._api_level is None:
            try:
                level = (await self.agent_stats()).get("api_level")
            except LarsError:  # refused, or no answer: an agent to treat as the oldest
                level = 0
            self._api_level = level if type(level) is int else 0
        return self._api_level

    @asynccontextmanager
    async def call(
        self, modid: int, cmdid: int, key: str | bytes | None = None
    ) -> AsyncIterator[Host]:
        """Get a host (``key``: as for get_host); report success when the block ends,
        failure if it raises, with the block's duration as the call's latency."""
        host = await self.get_host(modid, cmdid, key)
        began = time.perf_counter()
        try:
            yield host
        except BaseException:
            await self.report(modid, cmdid, host, ok=False, latency=time.perf_counter() - began)
            raise
        await self.report(modid, cmdid, host, ok=True, latency=time.perf_counter() - began)

    @asynccontextmanager
    async def register(
        self,
        modid: int,
        cmdid: int,
        port: int,
        ip: str | None = None,
        weight: int | None = None,
        zone: str | None = None,
        ttl: int = 10,
    ) -> AsyncIterator[AsyncRegistration]:
        """Register ``ip:port`` for the module while the block runs (arguments, errors and
        rules as :meth:`LarsClient.register`)::

            async with client.register(1, 1, 7001) as registration:
                await serve()
                await registration.aclose(drain=5)   # optional: the end deregisters anyway

        A task renews it every ``ttl / 3`` seconds (and registers it again if the agent
        forgot it); the end of the block deregisters it (drain 0) unless
        :meth:`AsyncRegistration.aclose` did, also when the block raises or is cancelled.
        """
        spec = registration_spec(modid, cmdid, port, ip, weight, zone, ttl)
        registration = AsyncRegistration(self, spec)
        registration._registered(await registration._ask(*self.core.register_request(spec)))
        failed: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(registration._renew_forever)
                try:
                    yield registration
                except BaseException as exc:  # raised again below, not inside a group
                    failed = exc
                nursery.cancel_scope.cancel()
        except BaseException:
            await registration._close_quietly()
            raise
        if failed is not None:
            await registration._close_quietly()
            raise failed
        if not registration.closed:
            with trio.CancelScope(shield=True):
                await registration.aclose()

    def close(self) -> None:
        """Close the client's sockets, for good: tasks waiting for a reply, and any later
        call, get :class:`trio.ClosedResourceError`."""
        self._closed = True
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()

    async def __aenter__(self) -> AsyncLarsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRegistration(_RegistrationBase):
    """A host registered through the local agent for the block of
    :meth:`AsyncLarsClient.register`: renewed by a task every ``ttl / 3`` seconds (and
    registered again if the agent forgot it), deregistered by :meth:`aclose` or the end of
    the block. A renewal that fails is logged (``lars.client``) and kept in :attr:`error`.
    """

    def __init__(self, client: AsyncLarsClient, spec: RegistrationSpec) -> None:
        super().__init__(client.core, spec)
        self._client = client
        self._renewal: trio.CancelScope | None = None

    async def _ask(self, seq: int, request: bytes) -> wire.Message:
        attempts = int(REGISTER_TIMEOUT / REGISTER_RESEND)
        return await self._client._exchange(*self.module, seq, request, attempts, REGISTER_RESEND)

    async def _renew_forever(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._renewal = scope
            task_status.started()
            wait = renew_interval(self.spec.ttl)
            while True:
                await trio.sleep(wait)
                error: LarsError | None = None
                try:
                    self._registered(await self._ask(*self.core.register_request(self.spec)))
                except LarsError as exc:
                    error = exc
                except trio.ClosedResourceError:  # the client was closed: nothing to renew on
                    return
                wait = self._renewed(error)

    async def aclose(self, drain: float = 0.0) -> None:
        """Deregister now (as :meth:`Registration.close`): stop renewing; the DNS drains the
        host at once and removes it after ``drain`` seconds. Closing again does nothing."""
        drain_milliseconds = drain_ms(drain)
        if self.closed:
            return
        self.closed = True
        if self._renewal is not None:
            self._renewal.cancel()
        request = self.core.deregister_request(self.spec, drain_milliseconds)
        self._dropped(await self._ask(*request))

    async def _close_quietly(self) -> None:
        """Deregister at the end of a block that raised: shielded, errors logged."""
        if self.closed:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.aclose()
            except (LarsError, trio.ClosedResourceError) as exc:
                log.warning("deregistering %s: %s", self.spec.describe(), exc)
