"""Test doubles: a store that can be switched off, a framed test client, a fake DNS."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

import trio

from lars import wire
from lars.core.model import HostKey, HostMeta, ModuleKey, PolicySpec
from lars.errors import StoreUnavailable
from lars.store import Actor, CallStatus, RouteDelta, RouteSnapshot, RouteStore, RouteWrite
from lars.store.sqlite import SqliteStore


def memory_store() -> SqliteStore:
    """A fresh in-memory SQLite store that runs inline (safe under MockClock)."""
    return SqliteStore(":memory:", create=True, inline=True)


class FlakyStore(RouteStore):
    """Delegates to a real store, or raises StoreUnavailable while ``down`` is set.

    Writes through ``inner`` always work: they stand for the operator, not the DNS.
    """

    def __init__(self, inner: RouteStore) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.display_url = inner.display_url
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("test: store switched off")

    async def init_schema(self) -> list[str]:
        self._check()
        return await self.inner.init_schema()

    async def route_version(self) -> int:
        self._check()
        return await self.inner.route_version()

    async def load_routes(self, changes_since: int | None = None) -> RouteSnapshot:
        self._check()
        return await self.inner.load_routes(changes_since)

    async def load_changes(self, since: int) -> RouteDelta:
        self._check()
        return await self.inner.load_changes(since)

    async def change_routes(
        self,
        add: Mapping[ModuleKey, Collection[HostKey]] | None = None,
        remove: Mapping[ModuleKey, Collection[HostKey] | None] | None = None,
        *,
        meta: Mapping[ModuleKey, Mapping[HostKey, HostMeta]] | None = None,
        actor: Actor | None = None,
        force: bool = True,
        policies: Mapping[ModuleKey, PolicySpec | None] | None = None,
    ) -> RouteWrite:
        self._check()
        return await self.inner.change_routes(
            add, remove, meta=meta, actor=actor, force=force, policies=policies
        )

    async def list_routes(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> dict[ModuleKey, list[HostKey]]:
        self._check()
        return await self.inner.list_routes(modid, cmdid)

    async def purge_changes(self, older_than: float) -> int:
        self._check()
        return await self.inner.purge_changes(older_than)

    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        self._check()
        await self.inner.upsert_call_status(rows)

    async def read_call_status(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> list[CallStatus]:
        self._check()
        return await self.inner.read_call_status(modid, cmdid)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FramedClient:
    """A test peer on a trio stream: sends messages or raw bytes, receives messages."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.stream = stream
        self.decoder = wire.FrameDecoder(max_frame)
        self._ready: list[wire.Message] = []

    async def send(self, *messages: wire.Message) -> None:
        await self.stream.send_all(b"".join(wire.encode_frame(m) for m in messages))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> wire.Message:
        """The next message; raises EOFError if the peer closed the stream."""
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("peer closed the stream")
            self.decoder.feed(data)
            self._ready.extend(self.decoder)
        return self._ready.pop(0)

    async def route(self) -> wire.GetRouteResponse:
        """The next route (a DnsState before it, saying whether the DNS is stale, skipped)."""
        msg = await self.receive()
        while isinstance(msg, wire.DnsState):
            msg = await self.receive()
        assert isinstance(msg, wire.GetRouteResponse), msg
        return msg

    async def closed_by_peer(self) -> bool:
        """True once the peer has closed the stream (reads until EOF)."""
        try:
            while True:
                await self.receive()
        except (EOFError, trio.BrokenResourceError):
            return True


class FakeDns:
    """A DNS double for agent tests, on a free loopback TCP port: answers GetRouteRequest
    from ``routes`` (with the ``demoted`` hosts of each module), records each LeaseUpdate
    as ``(when it arrived by time.monotonic(), session number, update)`` and answers it with
    ``reply(update)`` after ``delay`` seconds (by default: all stored), or not at all while
    ``silent``. :meth:`kick` closes every session (the agent reconnects)."""

    def __init__(
        self,
        routes: Mapping[ModuleKey, Sequence[HostKey]] | None = None,
        demoted: Mapping[ModuleKey, Sequence[HostKey]] | None = None,
    ) -> None:
        self.routes = {key: tuple(hosts) for key, hosts in (routes or {}).items()}
        self.demoted = {key: tuple(hosts) for key, hosts in (demoted or {}).items()}
        self.updates: list[tuple[float, int, wire.LeaseUpdate]] = []
        self.silent = False
        self.delay = 0.0
        self.reply: Callable[[wire.LeaseUpdate], wire.Message | None] = lambda update: (
            wire.LeaseReply(update.seq, wire.RetCode.SUCC, ())
        )
        self.sessions = 0
        self.address = ""
        self._streams: set[trio.abc.Stream] = set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1, port 0; ``task_status.started(address)``; serve forever."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"{host}:{port}"
        task_status.started(self.address)
        await trio.serve_listeners(self._session, listeners)

    def leases(self, since: float = 0.0) -> list[tuple[float, wire.Lease]]:
        """Every lease received at or after ``since``, with its arrival time."""
        return [(at, lease) for at, _, u in self.updates if at >= since for lease in u.leases]

    def drops(self) -> list[wire.Drop]:
        """Every drop received."""
        return [drop for _, _, u in self.updates for drop in u.drops]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``check()`` holds, looking again after each session and update."""
        with trio.fail_after(timeout):
            while not check():
                await self._changed.wait()

    async def kick(self) -> None:
        """Close every session now."""
        for stream in list(self._streams):
            await trio.aclose_forcefully(stream)

    def _ring(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _session(self, stream: trio.SocketStream) -> None:
        self.sessions += 1
        number = self.sessions
        self._streams.add(stream)
        self._ring()
        peer = FramedClient(stream)
        try:
            while True:
                try:
                    msg = await peer.receive()
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if isinstance(msg, wire.GetRouteRequest):
                    key = (msg.modid, msg.cmdid)
                    route = wire.GetRouteResponse(
                        *key, self.routes.get(key, ()), demoted=self.demoted.get(key, ())
                    )
                    await peer.send(route)
                elif isinstance(msg, wire.LeaseUpdate):
                    self.updates.append((time.monotonic(), number, msg))
                    self._ring()
                    if self.silent:
                        continue
                    await trio.sleep(self.delay)
                    reply = self.reply(msg)
                    if reply is not None:
                        await peer.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self._streams.discard(stream)
            self._ring()
            await trio.aclose_forcefully(stream)
