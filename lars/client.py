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

:class:`AsyncLarsClient` has the same methods for trio, awaited (``call`` is an async
context manager). Errors: :class:`~lars.NoRoute`, :class:`~lars.Overloaded`,
:class:`~lars.AgentUnavailable` (no answer after the retries),
:class:`~lars.RequestRejected`, all under :class:`~lars.LarsError`.

Each request carries a sequence number; replies to earlier, timed-out requests are
discarded. A module is served on ``base_port + (modid + cmdid) % ports``. The protocol logic
lives in :class:`ClientCore` (no I/O); the two clients only send and receive. On the hot
path get_host is one send and one receive, and report one send.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from lars import wire
from lars.config import load_config
from lars.core.model import Host, HostKey, check_id, check_port, ip_to_int, parse_module
from lars.errors import (
    AgentUnavailable,
    InvalidValue,
    NoRoute,
    Overloaded,
    ProtocolError,
    RequestRejected,
)

__all__ = ["AsyncLarsClient", "Host", "LarsClient"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 8888
DEFAULT_PORTS = 3
DEFAULT_TIMEOUT = 0.25
DEFAULT_RETRIES = 2
#: Attempts of reg_init, and the pause between them.
REG_INIT_ATTEMPTS = 10
REG_INIT_PAUSE = 0.2

_SUCC = wire.RetCode.SUCC
_OVERLOAD = wire.RetCode.OVERLOAD
_NOEXIST = wire.RetCode.NOEXIST
_pack_ip = struct.Struct("!I").pack


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

    def state_request(self, modid: int, cmdid: int) -> tuple[int, bytes]:
        """``(seq, datagram)`` of an AgentStateRequest (what ``lars query`` shows)."""
        seq = self.next_seq()
        return seq, wire.encode_datagram(wire.AgentStateRequest(seq, *parse_module(modid, cmdid)))

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
    def match(data: bytes, seq: int) -> wire.Message | None:
        """The reply in ``data`` if it answers request ``seq``; None for anything else
        (a late reply to an earlier request, or garbage)."""
        try:
            msg = wire.decode_datagram(data)
        except ProtocolError:
            return None
        if getattr(msg, "seq", None) != seq:
            return None
        return msg

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
    def state_result(msg: wire.Message) -> dict[str, Any] | None:
        """The module's state from an AgentStateResponse; None if the agent does not know
        the module."""
        if not isinstance(msg, wire.AgentStateResponse):
            raise ClientCore._unexpected(msg)
        return dict(msg.state) if msg.retcode == _SUCC else None

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

    def unavailable(self, modid: int, cmdid: int) -> AgentUnavailable:
        """The error for a request that got no answer."""
        return AgentUnavailable(
            f"no answer from the agent at {self.host}:{self.port(modid, cmdid)} "
            f"after {self.retries + 1} attempts of {self.timeout}s"
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
    }


class LarsClient:
    """Synchronous client of the local agent. Safe to share between threads."""

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
        self._local = threading.local()
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()
        timeval = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
        self._timeval = timeval

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> LarsClient:
        """A client for the agent of a lars.toml (``path``, else ./lars.toml, else defaults)."""
        return cls(**_config_kwargs(path))

    def _socket(self, port: int) -> socket.socket:
        sockets: dict[int, socket.socket] | None = getattr(self._local, "sockets", None)
        if sockets is None:
            sockets = self._local.sockets = {}
        sock = sockets.get(port)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # A kernel receive timeout keeps each receive a single system call.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval)
            sock.connect((self.core.host, port))
            sockets[port] = sock
            with self._lock:
                self._all.append(sock)
        return sock

    def _exchange(self, modid: int, cmdid: int, seq: int, request: bytes) -> wire.Message:
        sock = self._socket(self.core.port(modid, cmdid))
        for _ in range(self.core.retries + 1):
            try:
                sock.send(request)
                while True:
                    reply = self.core.match(sock.recv(65536), seq)
                    if reply is not None:
                        return reply
            except BlockingIOError:  # SO_RCVTIMEO ran out
                continue
            except ConnectionRefusedError:  # nothing listens on the port (yet): wait it out
                time.sleep(self.core.timeout)
        raise self.core.unavailable(modid, cmdid)

    def get_host(self, modid: int, cmdid: int) -> Host:
        """One healthy host of the module."""
        seq, request = self.core.get_host_request(modid, cmdid)
        return self.core.host_result(self._exchange(modid, cmdid, seq, request), modid, cmdid)

    def get_route(self, modid: int, cmdid: int) -> list[Host]:
        """Every host of the module."""
        seq, request = self.core.get_route_request(modid, cmdid)
        return self.core.route_result(self._exchange(modid, cmdid, seq, request), modid, cmdid)

    def agent_state(self, modid: int, cmdid: int) -> dict[str, Any] | None:
        """The agent's view of the module (status, hosts and their counters), as
        ``lars query`` prints it; None if the agent does not know the module."""
        seq, request = self.core.state_request(modid, cmdid)
        return self.core.state_result(self._exchange(modid, cmdid, seq, request))

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
    ) -> None:
        """Report the result of a call to ``host``: ``ok=True/False`` or ``retcode=`` (0 ok)."""
        request = self.core.report_request(modid, cmdid, host, ok, retcode)
        # A report is best effort, like the original's: no agent, no report.
        with contextlib.suppress(ConnectionRefusedError, BlockingIOError):
            self._socket(self.core.port(modid, cmdid)).send(request)

    def reg_init(self, modid: int, cmdid: int) -> list[Host]:
        """Preload a module at start-up: ask for its route, retrying briefly."""
        for attempt in range(REG_INIT_ATTEMPTS):
            try:
                return self.get_route(modid, cmdid)
            except (NoRoute, AgentUnavailable):
                if attempt == REG_INIT_ATTEMPTS - 1:
                    raise
                time.sleep(REG_INIT_PAUSE)
        raise AssertionError("unreachable")

    @contextmanager
    def call(self, modid: int, cmdid: int) -> Iterator[Host]:
        """Get a host; report success when the block ends, failure if it raises."""
        host = self.get_host(modid, cmdid)
        try:
            yield host
        except BaseException:
            self.report(modid, cmdid, host, ok=False)
            raise
        self.report(modid, cmdid, host, ok=True)

    def close(self) -> None:
        """Close the client's sockets."""
        with self._lock:
            sockets, self._all = self._all, []
        for sock in sockets:
            sock.close()
        self._local = threading.local()

    def __enter__(self) -> LarsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLarsClient:
    """The trio client of the local agent: :class:`LarsClient`'s methods, awaited."""

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
        self._sockets: dict[int, trio.socket.SocketType] = {}

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> AsyncLarsClient:
        """A client for the agent of a lars.toml (``path``, else ./lars.toml, else defaults)."""
        return cls(**_config_kwargs(path))

    async def _socket(self, port: int) -> trio.socket.SocketType:
        sock = self._sockets.get(port)
        if sock is None:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.connect((self.core.host, port))
            self._sockets[port] = sock
        return sock

    async def _exchange(self, modid: int, cmdid: int, seq: int, request: bytes) -> wire.Message:
        sock = await self._socket(self.core.port(modid, cmdid))
        for _ in range(self.core.retries + 1):
            with trio.move_on_after(self.core.timeout):
                try:
                    await sock.send(request)
                    while True:
                        reply = self.core.match(await sock.recv(65536), seq)
                        if reply is not None:
                            return reply
                except ConnectionRefusedError:
                    await trio.sleep_forever()  # nothing listens yet: wait out the attempt
        raise self.core.unavailable(modid, cmdid)

    async def get_host(self, modid: int, cmdid: int) -> Host:
        """One healthy host of the module."""
        seq, request = self.core.get_host_request(modid, cmdid)
        reply = await self._exchange(modid, cmdid, seq, request)
        return self.core.host_result(reply, modid, cmdid)

    async def get_route(self, modid: int, cmdid: int) -> list[Host]:
        """Every host of the module."""
        seq, request = self.core.get_route_request(modid, cmdid)
        reply = await self._exchange(modid, cmdid, seq, request)
        return self.core.route_result(reply, modid, cmdid)

    async def agent_state(self, modid: int, cmdid: int) -> dict[str, Any] | None:
        """The agent's view of the module (status, hosts and their counters), as
        ``lars query`` prints it; None if the agent does not know the module."""
        seq, request = self.core.state_request(modid, cmdid)
        return self.core.state_result(await self._exchange(modid, cmdid, seq, request))

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
    ) -> None:
        """Report the result of a call to ``host``: ``ok=True/False`` or ``retcode=`` (0 ok)."""
        request = self.core.report_request(modid, cmdid, host, ok, retcode)
        sock = await self._socket(self.core.port(modid, cmdid))
        # A report is best effort, like the original's: no agent, no report.
        with contextlib.suppress(ConnectionRefusedError):
            await sock.send(request)

    async def reg_init(self, modid: int, cmdid: int) -> list[Host]:
        """Preload a module at start-up: ask for its route, retrying briefly."""
        for attempt in range(REG_INIT_ATTEMPTS):
            try:
                return await self.get_route(modid, cmdid)
            except (NoRoute, AgentUnavailable):
                if attempt == REG_INIT_ATTEMPTS - 1:
                    raise
                await trio.sleep(REG_INIT_PAUSE)
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def call(self, modid: int, cmdid: int) -> AsyncIterator[Host]:
        """Get a host; report success when the block ends, failure if it raises."""
        host = await self.get_host(modid, cmdid)
        try:
            yield host
        except BaseException:
            await self.report(modid, cmdid, host, ok=False)
            raise
        await self.report(modid, cmdid, host, ok=True)

    def close(self) -> None:
        """Close the client's sockets."""
        sockets, self._sockets = self._sockets, {}
        for sock in sockets.values():
            sock.close()

    async def __aenter__(self) -> AsyncLarsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
