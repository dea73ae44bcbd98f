"""The DNS role: serves routes to agents over TCP and pushes every change to subscribers.

State: ``routes``, the map ``module -> frozenset(hosts)`` of one store version. A new map is
built aside and swapped in with one assignment, so a request never sees half a reload.

Change tracking (DESIGN §5): every ``check_interval`` the poller reads ``RouteVersion``.
When it moved, it reads the ``RouteChange`` rows newer than the version this instance last
loaded and reloads just those modules; every ``reload_interval`` it reloads everything, and
it also does when the version moved without any change row. Each reload pushes the new route
of every changed module to the connections subscribed to it (an empty host list when the
module is gone). Rows are never deleted on reading, so several DNS instances on one database
all see every change; they are purged by age only. A ``RouteChangeNotice`` from a route
writer triggers the check at once, so a change usually reaches agents within milliseconds.

When the store is unreachable the last good map keeps being served; the poller retries with
capped backoff (``retry_max``, a few seconds) and logs when the store goes down and when it
comes back, not every retry. Until the first load succeeds, requests subscribe and are
answered when it does. After ``stale_after`` seconds without a good read, the DNS tells its
agents it is stale (``DnsState``, again every ``stale_after`` while it lasts, and at once to
an agent that connects meanwhile); agents that know a fresh DNS move there. When it reads
its store again it tells them it is fresh.

Routes may be read from another store than the one written (``[dns] store_read``: a
replica, a nearby Galera node), which can be behind the writer. A change notice carries the
version its write made: a DNS that reads an older one re-reads every ``CATCH_UP_INTERVAL``
until it sees it, for at most ``catch_up`` seconds, rather than waiting for the next check.

Each connection has one reader and one writer task. The writer sends what is queued for the
connection: routes coalesce per module (a newer route replaces an unsent older one), so a
slow agent costs at most one pending frame per subscribed module, never an unbounded queue.
A consequence: two requests for one module answered in one write get one (current) route.

A subscription to a module that does not exist (asked for, or deleted) lapses after
``ABSENT_SUBSCRIPTION_TTL`` unless the module appears or is asked for again meanwhile: an
agent that asked for a made-up module gets NOEXIST, caches that for its ``update_timeout``
and asks again on the next use, so the DNS need not remember every module any client ever
named.

Original Lars agents (``lars_lb_agent``) are served on the same port: the first bytes of a
connection tell its protocol (:func:`lars.wire_original.sniff_stream`). Such a connection
sends GetRouteRequests in the original format and gets its answers and pushes as original
GetRouteResponses (msgid 2), from a second frame cache; it is subscribed like any other, so
a Lars agent and an original one on the same module see the same changes at the same time.
The original protocol has no error reply: a frame in it that does not decode, or is not a
GetRouteRequest, is counted and skipped (its framing is intact), and only a broken framing
closes the connection.

Routes carry each host's weight and zone and the module's own policy (DESIGN §13): a Lars
agent gets them in GetRouteResponse's appended fields (left out when all are defaults, so
the frame is the one older agents know), an original agent the hosts alone. A change of any
of them is a change of the module, pushed like one.

Route protection (DESIGN §13): a reload that would remove more than ``shrink_guard`` of all
hosts at once (and at least ``shrink_min_hosts``) is held, the previous routes keep serving,
it is logged and counted (``shrinks_held``), and it is served once the loss has persisted for
``shrink_hold`` seconds (each check re-reads it; a reload that no longer loses as much is
served at once) or an admin confirms it (a ShrinkConfirm, `lars route confirm`).

Connections come through a :class:`lars.roles.common.ConnectionGate` (DESIGN §16): at most
``max_connections`` with a reserve for admins, a deadline on a frame once started (and on the
first frame of a plaintext connection arriving in a crowd), and change notices and
StatsRequests at most ``control_rate`` a second per connection. Notices also coalesce: a
burst of them arriving during a check costs one more check.

Self-registration (DESIGN §14): agents send their services' leases in LeaseUpdates over
their session (TLS: only ``lars://agent``). :mod:`lars.roles.dns_leases` sorts each update
(its rules are there): heartbeats of leases the session holds stay in memory and are answered
at once; registrations and deregistrations go to one writer task, which stores those of every
session waiting in one transaction (each audited as its agent's, ``lease:ADDRESS``) and
answers each LeaseReply once committed, or SYSTEM_ERROR when the store failed (nothing is
held: the agent sends it again). Every ``lease_sweep`` the DNS writes the renewals due in one
batched write, then sweeps expired leases (any instance may: see
:meth:`lars.store.RouteStore.expire_leases`). After each of its own route writes it checks
the store at once, so its agents get the change within milliseconds; other instances see it
at their ``check_interval``. A closed session's leases are forgotten: their rows expire.

The fleet view (``fleet_view``, off by default): every ``fleet_interval`` the DNS reads the
hosts that enough callers report overloaded (:meth:`lars.store.RouteStore.demoted_hosts`),
sends them in every route frame of their module (``GetRouteResponse.demoted``: answers and
pushes, Lars agents only) and pushes a module whose demoted hosts change. When the read
fails the last set stays.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs
import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lars import wire, wire_original
from lars.config import DnsConfig
from lars.core.model import UINT32_MAX, HostKey, HostMeta, ModuleKey
from lars.errors import ProtocolError, StoreError
from lars.roles.common import (
    ConnectionGate,
    Limits,
    Metrics,
    Outbox,
    RateLimitedLog,
    Session,
    backoff,
    bound_address,
    gate_metrics,
    open_listener,
    permitted,
    refuse,
    stream_decoder,
    write_loop,
)
from lars.roles.dns_leases import LeaseBook, LeasePlan, Renewal
from lars.roles.http import Observed
from lars.store import (
    ACTOR_NAME_MAX,
    ACTOR_SOURCE_MAX,
    Actor,
    LeaseBatch,
    MetaMap,
    PolicyMap,
    RouteDelta,
    RouteMap,
    RouteSnapshot,
    RouteStore,
)
from lars.tls import TlsContexts
from lars.wire_original import GET_ROUTE_REQUEST

log = logging.getLogger("lars.dns")

#: How often RouteChange rows older than ``change_retention`` are purged, seconds.
PURGE_INTERVAL = 3600.0
#: Seconds between re-reads while a notified route version is not read yet.
CATCH_UP_INTERVAL = 0.05
#: Modules one connection may subscribe to.
MAX_SUBSCRIPTIONS = 100_000
#: Replies (errors, stats) queued for one connection before it counts as abusive.
MAX_QUEUED_REPLIES = 1000
#: Seconds a subscription to a module without a route is kept (longer than an agent's
#: negative cache, so a module added meanwhile is still pushed).
ABSENT_SUBSCRIPTION_TTL = 60.0
#: Subscriptions to modules without a route one connection may hold; past it, such
#: requests are answered (with the empty route) but not subscribed.
MAX_ABSENT_SUBSCRIPTIONS = 1_000
#: Bytes of route frames queued for a connection beyond which its requests are not read
#: until its writer has taken them: an agent that does not read holds bounded memory.
MAX_BACKLOG = 1 << 20
#: Bytes of memory one queued route frame costs beyond the frame itself (key and slot).
ENTRY_COST = 160
#: LeaseUpdates with something to write waiting for the lease writer, over all sessions, and
#: per session; beyond either, an update is answered SYSTEM_ERROR at once (sent again).
MAX_QUEUED_LEASE_UPDATES = 256
MAX_QUEUED_LEASE_UPDATES_PER_SESSION = 8
#: Registrations and deregistrations the lease writer puts in one transaction at most.
MAX_LEASE_BATCH = 4096
#: Who the audit log names for the DNS's own lease writes (expiry, and the renewals that
#: find their row gone and register it again).
EXPIRY_ACTOR = Actor("lease:expired", "dns")
RENEWAL_ACTOR = Actor("lease:renewal", "dns")

_EMPTY: frozenset[HostKey] = frozenset()
_DEFAULT_META = HostMeta()


@attrs.define
class HeldReload:
    """A reload the shrink guard holds back: what it would serve, since when (trio time),
    and how many of how many hosts it would remove."""

    routes: RouteMap
    version: int
    changed: set[ModuleKey]
    meta: MetaMap
    policies: PolicyMap
    since: float
    lost: int
    total: int


class Subscriber(Outbox):
    """One agent connection: what it subscribed to and what waits to be written to it."""

    def __init__(self, peer: str, original: bool = False) -> None:
        super().__init__(peer)
        #: True for an original Lars agent: its routes are encoded in its format, and it
        #: gets no other replies (the original protocol has none).
        self.original = original
        #: The peer's role under TLS (lars.tls.ROLES); None without TLS.
        self.role: str | None = None
        self.modules: set[ModuleKey] = set()
        #: Encoded route frames by module; a newer frame replaces an unsent one.
        self.pending: dict[ModuleKey, bytes] = {}
        self.pending_bytes = 0
        self.replies: list[wire.Message] = []
        #: Subscriptions to modules without a route (counted toward their cap).
        self.absent = 0
        #: Its LeaseUpdates waiting for the lease writer.
        self.leases_queued = 0
        self._actor: Actor | None = None
        self._room = trio.Event()

    def queue_route(self, module: ModuleKey, frame: bytes) -> None:
        """Queue a module's route frame."""
        old = self.pending.get(module)
        self.pending[module] = frame
        # What the entry costs in memory: the frame, plus its key and slot (~ENTRY_COST).
        self.pending_bytes += len(frame) - len(old) if old is not None else len(frame) + ENTRY_COST
        self.ring()

    async def wait_for_room(self) -> None:
        """Wait until the writer has taken the queued frames, if they exceed MAX_BACKLOG."""
        while self.pending_bytes > MAX_BACKLOG and not self.closed:
            self._room = trio.Event()
            await self._room.wait()

    def queue_reply(self, msg: wire.Message) -> bool:
        """Queue a reply; False if too many are queued (the connection should close)."""
        if len(self.replies) >= MAX_QUEUED_REPLIES:
            return False
        self.replies.append(msg)
        self.ring()
        return True

    @property
    def actor(self) -> Actor:
        """Who the audit log names for this agent's lease writes: ``lease:ADDRESS``."""
        if self._actor is None:
            host = self.peer.rpartition(":")[0].strip("[]") or self.peer or "?"
            self._actor = Actor(f"lease:{host}"[:ACTOR_NAME_MAX], host[:ACTOR_SOURCE_MAX])
        return self._actor

    def take(self) -> bytes:
        data = b"".join(self.pending.values())
        data += b"".join(wire.encode_frame(m) for m in self.replies)
        self.pending = {}
        self.pending_bytes = 0
        self.replies = []
        self._room.set()
        return data


class DnsServer:
    """The route service. ``await nursery.start(server.serve)`` returns its bound address."""

    def __init__(
        self,
        config: DnsConfig,
        store: RouteStore,
        *,
        tls: TlsContexts | None = None,
        read_store: RouteStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        #: Epoch seconds, for lease expiries and the fleet view's window (the store's
        #: RouteData.lease_expires and ServerCallStatus.ts are wall-clock times).
        self.wall_clock = wall_clock
        #: Where routes are read from (``[dns] store_read``; else ``store``).
        self.read_store = read_store or store
        #: True while agents are told the routes may be out of date (see DnsState).
        self.stale = False
        #: trio time of the last good read of the store (or of the start of tracking).
        self.last_good_read = -math.inf
        #: trio time of the first failed read since the last good one (None: none failed),
        #: and of the start of the read in progress (None: none is): staleness counts from
        #: the first, or from a read that hangs, never from a pause between good reads.
        self.unreachable_since: float | None = None
        self.reading_since: float | None = None
        #: The newest version a change notice named, and until when to re-read for it.
        self._awaited_version = 0
        self._awaited_until = -math.inf
        #: Mutual TLS with agents and admins (None: plaintext; see lars.tls).
        self.tls = tls
        #: The map being served; ``None`` until the first successful load.
        self.routes: RouteMap | None = None
        #: Store version of ``routes``.
        self.version = 0
        #: Weights and zones other than the defaults, and modules' own policies, of
        #: ``routes`` (DESIGN §13).
        self.meta: MetaMap = {}
        self.policies: PolicyMap = {}
        #: The reload the shrink guard holds back, if any.
        self.held: HeldReload | None = None
        #: The agents' leases (DESIGN §14), and the updates waiting to be written.
        self.leases = LeaseBook(config.max_leases_per_session)
        self._lease_send, self._lease_receive = trio.open_memory_channel[LeasePlan](
            MAX_QUEUED_LEASE_UPDATES
        )
        #: Held by each lease write of registrations or renewals, so that a renewal never
        #: races a deregistration of its lease (and brings the row back).
        self._lease_lock = trio.Lock()
        self._lease_log = RateLimitedLog(log)
        #: The fleet view: per module, the hosts sent demoted (empty unless ``fleet_view``).
        self.demoted: dict[ModuleKey, frozenset[HostKey]] = {}
        #: Hosts in ``routes``.
        self._host_count = 0
        self.subscribers: dict[ModuleKey, set[Subscriber]] = {}
        self.connections: set[Subscriber] = set()
        self.metrics = Metrics("dns")
        #: Connection limits, deadlines and the control rate (see ConnectionGate).
        self.gate = ConnectionGate("dns", Limits.of(config), metrics=self.metrics, log=log, tls=tls)
        self.store_ok: bool | None = None
        #: Set after each successful check of the store (tests wait on it).
        self.checked = trio.Event()
        self._poke = trio.Event()
        self._frames: dict[ModuleKey, bytes | None] = {}
        self._original_frames: dict[ModuleKey, bytes | None] = {}
        self._next_full_reload = -math.inf
        self._bad_input_log = RateLimitedLog(log)
        # Subscriptions to modules without a route, with when they lapse, oldest first.
        self._absent: OrderedDict[tuple[Subscriber, ModuleKey], float] = OrderedDict()
        #: The DNS's metrics (see :meth:`observed`).
        self.registry = CollectorRegistry(auto_describe=False)
        self._fanout_seconds = Histogram(
            "lars_dns_push_fanout_seconds",
            "Time to queue one reload's pushes to every subscribed agent.",
            registry=self.registry,
        )
        self._load_seconds = Histogram(
            "lars_dns_store_load_seconds",
            "Time to read routes from the store: everything (full) or what changed (partial).",
            ["kind"],
            registry=self.registry,
        )
        self.registry.register(DnsCollector(self))

    # --- serving ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, start polling the store, and serve connections until cancelled."""
        listener = await open_listener(self.config.listen, "dns")
        address = bound_address(listener)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.track_changes)
            await nursery.start(self.gate.serve, listener, self.handle_connection)
            log.info("dns listening on %s:%d, store %s", *address, self.read_store.display_url)
            task_status.started(address)

    async def track_changes(self) -> None:
        """Poll the store and push changes, and purge old change rows, until cancelled."""
        self.last_good_read = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_loop)
            nursery.start_soon(self._purge_loop)
            nursery.start_soon(self._stale_loop)
            nursery.start_soon(self._lease_writer)
            nursery.start_soon(self._lease_loop)
            if self.config.fleet_view:
                nursery.start_soon(self._fleet_loop)

    def poke(self) -> None:
        """Check the store now instead of at the next interval."""
        self._poke.set()

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one agent connection until it closes, sends a malformed frame or misses a
        deadline (see ConnectionGate)."""
        session = await self.gate.open(stream)
        if session is None:
            return
        sub = Subscriber(session.peer)
        sub.role = session.role
        self.connections.add(sub)
        self.metrics.incr("connections_accepted")
        self.metrics.set("connections", len(self.connections))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_loop, session.stream, sub, nursery.cancel_scope)
                await self._read_loop(session, sub)
                nursery.cancel_scope.cancel()
        finally:
            self._drop(sub)
            await trio.aclose_forcefully(session.stream)

    def _drop(self, sub: Subscriber) -> None:
        sub.closed = True
        self.connections.discard(sub)
        if self.leases.close(sub):
            self.metrics.set("leases", self.leases.held)
        for module in sub.modules:
            self._unsubscribe_one(sub, module)
        sub.modules.clear()
        self.metrics.set("connections", len(self.connections))
        self.metrics.set("subscribed_modules", len(self.subscribers))

    def _unsubscribe_one(self, sub: Subscriber, module: ModuleKey) -> None:
        subs = self.subscribers.get(module)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subscribers[module]

    def _absent_for(self, sub: Subscriber, module: ModuleKey) -> None:
        """``sub`` is subscribed to a module without a route: let that lapse in time."""
        entry = (sub, module)
        if entry not in self._absent:
            sub.absent += 1
        self._absent[entry] = trio.current_time() + ABSENT_SUBSCRIPTION_TTL
        self._absent.move_to_end(entry)

    def lapse_absent(self) -> int:
        """End the subscriptions to modules still without a route ABSENT_SUBSCRIPTION_TTL
        after they were last asked for or pushed empty; returns how many ended."""
        now = trio.current_time()
        absent = self._absent
        lapsed = 0
        while absent:
            (sub, module), expires = next(iter(absent.items()))
            if now < expires:
                break
            del absent[sub, module]
            sub.absent -= 1
            routes = self.routes
            if (
                not sub.closed
                and module in sub.modules
                and (routes is None or module not in routes)
            ):
                sub.modules.discard(module)
                self._unsubscribe_one(sub, module)
                lapsed += 1
        if lapsed:
            self.metrics.incr("subscriptions_lapsed", lapsed)
            self.metrics.set("subscribed_modules", len(self.subscribers))
        return lapsed

    async def _read_loop(self, session: Session, sub: Subscriber) -> None:
        original = await session.sniff()
        if original is None:
            return
        sub.original = original
        if original:
            self.metrics.incr("original_connections_accepted")
        elif self.stale:
            sub.queue_reply(self._state_message())
        decoder = stream_decoder(original, self.config.max_frame, GET_ROUTE_REQUEST)
        items: list[wire.Message | ProtocolError] | None = session.start(decoder)
        while items is not None:
            for item in items:
                if isinstance(item, ProtocolError):
                    if sub.original and item.msg_type is not None:
                        # The framing is intact: this frame costs itself alone. (Closing an
                        # original agent's connection could stop it: it exits when its
                        # reconnect fails.)
                        self.metrics.incr("malformed_frames")
                        self._bad_input_log.warning("skipped a frame from %s: %s", sub.peer, item)
                        continue
                    reply = refuse(item, sub.peer, self.metrics, self._bad_input_log)
                    if reply is None or not sub.queue_reply(reply):
                        return
                elif not self._dispatch(sub, item, session):
                    return
                if sub.pending_bytes > MAX_BACKLOG:
                    await sub.wait_for_room()
            items = await session.receive()

    def _dispatch(self, sub: Subscriber, msg: wire.Message, session: Session) -> bool:
        if not permitted("dns", sub.role, msg):
            return sub.queue_reply(self.gate.refuse_message(sub.peer, sub.role, msg))
        if isinstance(msg, wire.GetRouteRequest):
            self.metrics.incr("route_requests")
            module = (msg.modid, msg.cmdid)
            routes = self.routes
            if (
                routes is not None
                and module not in routes
                and module not in sub.modules
                and sub.absent >= MAX_ABSENT_SUBSCRIPTIONS
            ):
                self._queue_route(sub, module)  # answered, not subscribed
                return True
            if module not in sub.modules:
                if len(sub.modules) >= MAX_SUBSCRIPTIONS:
                    if sub.original:  # no error reply in its protocol: answered, not subscribed
                        self._bad_input_log.warning(
                            "%s asks for more than %d modules; not subscribing it to more",
                            sub.peer,
                            MAX_SUBSCRIPTIONS,
                        )
                        if routes is not None:
                            self._queue_route(sub, module)
                        return True
                    return sub.queue_reply(
                        wire.ErrorReply(0, wire.RetCode.BAD_REQUEST, "too many subscriptions")
                    )
                sub.modules.add(module)
                self.subscribers.setdefault(module, set()).add(sub)
                self.metrics.set("subscribed_modules", len(self.subscribers))
            if self.routes is not None:
                self._queue_route(sub, module)
                if module not in self.routes:
                    self._absent_for(sub, module)
            return True
        if isinstance(msg, wire.LeaseUpdate):
            return self._take_leases(sub, msg)
        if isinstance(msg, wire.RouteChangeNotice):
            if session.allow_control():  # else dropped, and the connection read slowly
                self.metrics.incr("change_notices")
                self.await_version(msg.version)
                self.poke()
            return True
        if isinstance(msg, wire.StatsRequest):
            if not session.allow_control():
                return True
            self._update_gauges()
            return sub.queue_reply(self.metrics.response(msg.seq))
        if isinstance(msg, wire.ShrinkConfirm):
            if not session.allow_control():
                return True
            self.confirm_shrink(msg.version)
            self._update_gauges()
            return sub.queue_reply(self.metrics.response(msg.seq))
        self.metrics.incr("invalid_requests")
        seq = getattr(msg, "seq", 0)
        reason = f"the dns role does not serve {type(msg).__name__}"
        return sub.queue_reply(wire.ErrorReply(seq, wire.RetCode.BAD_REQUEST, reason))

    def _queue_route(self, sub: Subscriber, module: ModuleKey) -> None:
        frame = self._frame(module, sub.original)
        if frame is not None:
            sub.queue_route(module, frame)

    def _frame(self, module: ModuleKey, original: bool = False) -> bytes | None:
        """The encoded route of ``module`` in the current map, in Lars's format or the
        original's (each cached until the next swap, when the module has a route). None for
        a route too large for an original frame: the agent keeps the route it has."""
        cache = self._original_frames if original else self._frames
        if module in cache:
            return cache[module]
        assert self.routes is not None
        route = self.routes.get(module, _EMPTY)
        hosts = tuple(sorted(route))
        msg = wire.GetRouteResponse(module[0], module[1], hosts)
        if hosts and not original:
            known = self.meta.get(module)
            meta = tuple(known.get(h, _DEFAULT_META) for h in hosts) if known else ()
            policy = self.policies.get(module)
            demoted = tuple(sorted(self.demoted.get(module, _EMPTY) & route))
            if meta or policy is not None or demoted:
                msg = wire.GetRouteResponse(module[0], module[1], hosts, meta, policy, demoted)
        frame: bytes | None
        try:
            if original:
                frame = wire_original.encode(msg, self.config.max_frame)
            else:
                frame = wire.encode_frame(msg, self.config.max_frame)
        except ProtocolError:
            log.error("route of %s/%s has %d hosts: too large for one frame", *module, len(hosts))
            if original:
                frame = None
            else:
                reason = f"route of {module[0]}/{module[1]} exceeds the frame limit"
                frame = wire.encode_frame(wire.ErrorReply(0, wire.RetCode.SYSTEM_ERROR, reason))
        if module in self.routes:  # not every made-up module anyone asks for
            cache[module] = frame
        return frame

    # --- change tracking -------------------------------------------------------------------

    def _swap(
        self,
        routes: RouteMap,
        version: int,
        changed: set[ModuleKey],
        meta: MetaMap | None = None,
        policies: PolicyMap | None = None,
    ) -> None:
        """Serve ``routes`` from now on and push ``changed`` modules to their subscribers."""
        started = time.perf_counter()
        self.routes = routes
        self.version = version
        self.meta = meta if meta is not None else {}
        self.policies = policies if policies is not None else {}
        self._host_count = sum(map(len, routes.values()))
        self._frames = {}
        self._original_frames = {}
        pushed = 0
        for module in changed:
            subs = self.subscribers.get(module)
            if subs:
                frames: dict[bool, bytes | None] = {}  # by protocol (original?), as needed
                gone = module not in routes
                for sub in subs:
                    if sub.original not in frames:
                        frames[sub.original] = self._frame(module, sub.original)
                    frame = frames[sub.original]
                    if frame is not None:
                        sub.queue_route(module, frame)
                    if gone:
                        self._absent_for(sub, module)
                pushed += len(subs)
        self.metrics.incr("pushes", pushed)
        if pushed:
            self._fanout_seconds.observe(time.perf_counter() - started)
        self.metrics.set("route_version", version)
        self.metrics.set("modules", len(routes))

    def apply_snapshot(self, snapshot: RouteSnapshot) -> None:
        """Swap in a full reload; push every subscribed module whose route, weights, zones
        or policy differ (unless the shrink guard holds it)."""
        old = self.routes
        new, meta, policies = snapshot.routes, snapshot.meta, snapshot.policies
        if old is None:  # first load: answer everyone who subscribed while waiting
            changed = set(self.subscribers)
        else:
            changed = {
                m
                for m in self.subscribers
                if old.get(m) != new.get(m)
                or self.meta.get(m) != meta.get(m)
                or self.policies.get(m) != policies.get(m)
            }
            changed |= snapshot.changed & self.subscribers.keys()
            if self._hold(new, snapshot.version, changed, meta, policies, old.keys()):
                return
        self._swap(new, snapshot.version, changed, meta, policies)
        self.metrics.incr("full_reloads")

    def apply_delta(self, delta: RouteDelta) -> None:
        """Swap in the map patched with the changed modules; push them (unless the shrink
        guard holds it)."""
        assert self.routes is not None
        routes = dict(self.routes)
        meta = dict(self.meta)
        policies = dict(self.policies)
        for module in delta.changed:
            hosts = delta.routes.get(module)
            if hosts:
                routes[module] = hosts
            else:
                routes.pop(module, None)
            if module in delta.meta:
                meta[module] = delta.meta[module]
            else:
                meta.pop(module, None)
            if module in delta.policies:
                policies[module] = delta.policies[module]
            else:
                policies.pop(module, None)
        changed = set(delta.changed)
        if self._hold(routes, delta.version, changed, meta, policies, delta.changed):
            return
        self._swap(routes, delta.version, changed, meta, policies)
        self.metrics.incr("partial_reloads")

    # --- route protection ------------------------------------------------------------------

    def _hold(
        self,
        routes: RouteMap,
        version: int,
        changed: set[ModuleKey],
        meta: MetaMap,
        policies: PolicyMap,
        candidates: Iterable[ModuleKey],
    ) -> bool:
        """True if the shrink guard holds this reload back (``candidates``: the modules
        that may have lost hosts). A reload held for ``shrink_hold`` seconds is let go."""
        old = self.routes
        assert old is not None
        guard = self.config.shrink_guard
        total = self._host_count
        lost = 0
        if guard < 1.0 and total:
            lost = sum(len(old[m] - routes.get(m, _EMPTY)) for m in candidates if m in old)
        if lost < self.config.shrink_min_hosts or lost <= guard * total:
            if self.held is not None:
                log.warning(
                    "route version %d no longer removes more than %.0f%% of the hosts:"
                    " serving it (the held reload is dropped)",
                    version,
                    100 * guard,
                )
                self._clear_held()
            return False
        now = trio.current_time()
        held = self.held
        if held is None:
            self.metrics.incr("shrinks_held")
            log.error(
                "route version %d would remove %d of the %d hosts at once (more than"
                " shrink_guard %.0f%%): still serving version %d; it is served if it persists"
                " %.0f s, or now with `lars route confirm`",
                version,
                lost,
                total,
                100 * guard,
                self.version,
                self.config.shrink_hold,
            )
            held = self.held = HeldReload(
                routes, version, changed, meta, policies, now, lost, total
            )
        else:
            held.routes, held.version, held.meta, held.policies = routes, version, meta, policies
            held.changed |= changed
            held.lost, held.total = lost, total
        self.metrics.set("shrink_held", 1)
        self.metrics.set("held_version", version)
        if now - held.since >= self.config.shrink_hold:
            log.warning(
                "the loss of %d of %d hosts persisted %.0f s: serving route version %d",
                lost,
                total,
                now - held.since,
                version,
            )
            self.metrics.incr("shrinks_released")
            self._clear_held()
            return False
        return True

    def _clear_held(self) -> None:
        self.held = None
        self.metrics.set("shrink_held", 0)
        self.metrics.set("held_version", 0)

    def confirm_shrink(self, version: int = 0) -> bool:
        """Serve the held reload now (an admin confirmed it); ``version`` other than 0 must
        be the held one. True if a reload was released."""
        held = self.held
        if held is None or (version and version != held.version):
            return False
        log.warning(
            "an admin confirmed the removal of %d of %d hosts: serving route version %d",
            held.lost,
            held.total,
            held.version,
        )
        self.metrics.incr("shrinks_confirmed")
        self._clear_held()
        self._swap(held.routes, held.version, held.changed, held.meta, held.policies)
        return True

    async def check(self) -> None:
        """Read the store's version; reload what changed. Raises StoreError."""
        now = trio.current_time()
        if self.routes is None or now >= self._next_full_reload:
            self.apply_snapshot(await self._load_all())
            self._next_full_reload = now + self.config.reload_interval
            return
        version = await self.read_store.route_version()
        if version == self.version:
            return
        with self._load_seconds.labels("partial").time():
            delta = await self.read_store.load_changes(self.version)
        if delta.changed and delta.version > self.version:
            self.apply_delta(delta)
        else:  # the version moved without change rows (or went back): reload it all
            self.apply_snapshot(await self._load_all())
            self._next_full_reload = now + self.config.reload_interval

    async def _load_all(self) -> RouteSnapshot:
        with self._load_seconds.labels("full").time():
            return await self.read_store.load_routes(changes_since=self.version)

    async def _poll_loop(self) -> None:
        delays = None
        while True:
            self._poke = trio.Event()  # a poke from here on triggers the next check
            self.reading_since = trio.current_time()
            try:
                await self.check()
            except StoreError as exc:
                if self.unreachable_since is None:
                    self.unreachable_since = self.reading_since
                self.reading_since = None
                self.metrics.incr("store_errors")
                if self.store_ok is not False:
                    what = (
                        "serving the last good routes"
                        if self.routes is not None
                        else ("no routes loaded yet")
                    )
                    log.error("route store unavailable (%s); %s, retrying", exc, what)
                self.store_ok = False
                self.metrics.set("store_ok", 0)
                delays = delays or backoff(cap=self.config.retry_max)
                await trio.sleep(next(delays))
                continue
            if self.store_ok is False:
                log.warning("route store is back; serving version %d", self.version)
            self.store_ok = True
            self.metrics.set("store_ok", 1)
            self.last_good_read = trio.current_time()
            self.unreachable_since = self.reading_since = None
            if self.stale:
                self._set_stale(False)
            delays = None
            self.lapse_absent()
            self.checked.set()
            self.checked = trio.Event()
            with trio.move_on_after(self._next_check_in()):
                await self._poke.wait()

    def await_version(self, version: int) -> None:
        """A change notice says the store reached ``version``: until this DNS reads it (or
        ``catch_up`` seconds pass), it re-reads every CATCH_UP_INTERVAL."""
        if version > self.version:
            self._awaited_version = max(self._awaited_version, version)
            self._awaited_until = trio.current_time() + self.config.catch_up

    def _next_check_in(self) -> float:
        """Seconds to the next check: ``check_interval``, or CATCH_UP_INTERVAL while a
        notified version is not read yet."""
        seen = max(self.version, self.held.version if self.held is not None else 0)
        if self._awaited_version > seen:
            if trio.current_time() < self._awaited_until:
                self.metrics.incr("catch_up_rereads")
                return min(CATCH_UP_INTERVAL, self.config.check_interval)
            log.warning(
                "a change notice named route version %d, but the store read still has %d"
                " after %ss (a replica or node behind?); checking at the usual interval",
                self._awaited_version,
                self.version,
                self.config.catch_up,
            )
        self._awaited_version = 0
        return self.config.check_interval

    async def _stale_loop(self) -> None:
        """Tell the agents when this DNS has been unable to read its store for
        ``stale_after`` seconds: reads failing, or one hanging (again every ``stale_after``
        while it lasts: an agent may have found no fresh DNS the last time). A DNS that reads
        rarely (a long ``check_interval``) is not stale between its good reads."""
        look = min(1.0, self.config.stale_after / 4)
        while True:
            since = self.unreachable_since
            if since is None:
                since = self.reading_since
            if since is None or trio.current_time() - since < self.config.stale_after:
                await trio.sleep(look)
                continue
            if not self.stale:
                self._set_stale(True)
            else:
                self._broadcast_state()
            await trio.sleep(self.config.stale_after)

    def _set_stale(self, stale: bool) -> None:
        self.stale = stale
        self.metrics.set("stale", int(stale))
        if stale:
            log.error(
                "no good read of the route store for %.0f s: telling agents this DNS is stale",
                trio.current_time() - self.last_good_read,
            )
        else:
            log.warning("route store read again: telling agents this DNS is fresh")
        self._broadcast_state()

    def _state_message(self) -> wire.DnsState:
        age = max(0, int(trio.current_time() - self.last_good_read))
        return wire.DnsState(int(self.stale), min(age, UINT32_MAX), self.version)

    def _broadcast_state(self) -> None:
        msg = self._state_message()
        for sub in list(self.connections):
            if not sub.original:
                sub.queue_reply(msg)

    async def _purge_loop(self) -> None:
        while True:
            try:
                purged = await self.store.purge_changes(self.config.change_retention)
            except StoreError as exc:
                log.debug("purging old RouteChange rows failed: %s", exc)
            else:
                if purged:
                    log.info(
                        "purged %d RouteChange rows older than %ss",
                        purged,
                        self.config.change_retention,
                    )
            await trio.sleep(PURGE_INTERVAL)

    # --- self-registration (DESIGN §14) ----------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.wall_clock() * 1000)

    def _take_leases(self, sub: Subscriber, msg: wire.LeaseUpdate) -> bool:
        """Sort an agent's LeaseUpdate: heartbeats of leases it holds are kept in memory and
        answered at once; registrations and deregistrations go to the lease writer, which
        answers once they are stored. False if the connection should close."""
        self.metrics.incr("lease_updates")
        plan = self.leases.take_update(sub, msg, self._now_ms())
        if plan.errors:
            self.metrics.incr("lease_errors", len(plan.errors))
            self._lease_log.warning(
                "%s: %d lease item(s) refused, the first: %s",
                sub.peer,
                len(plan.errors),
                plan.errors[0][1],
            )
        if not plan.writes:
            return sub.queue_reply(wire.LeaseReply(msg.seq, wire.RetCode.SUCC, tuple(plan.errors)))
        if sub.leases_queued < MAX_QUEUED_LEASE_UPDATES_PER_SESSION:
            try:
                self._lease_send.send_nowait(plan)
            except trio.WouldBlock:
                pass
            else:
                sub.leases_queued += 1
                return True
        # The writer is behind (a slow store): the agent sends it again.
        self.leases.abandon(plan)
        self.metrics.incr("lease_updates_refused")
        reply = wire.LeaseReply(msg.seq, wire.RetCode.SYSTEM_ERROR, tuple(plan.errors))
        return sub.queue_reply(reply)

    async def _lease_writer(self) -> None:
        """Write the queued registrations and deregistrations, as many agents' at once as
        are waiting (one transaction), and answer each update."""
        async for plan in self._lease_receive:
            plans = [plan]
            items = len(plan.grants) + len(plan.drops)
            while items < MAX_LEASE_BATCH:
                try:
                    more = self._lease_receive.receive_nowait()
                except trio.WouldBlock:
                    break
                plans.append(more)
                items += len(more.grants) + len(more.drops)
            await self.write_plans(plans)

    async def write_plans(self, plans: Sequence[LeasePlan]) -> None:
        """Store the plans' writes in one transaction, each audited as its agent's; hold
        their leases and answer SUCC, or on a store error hold nothing and answer
        SYSTEM_ERROR (the agents send them again)."""
        subs = [self._subscriber(plan) for plan in plans]
        batches = [
            LeaseBatch(sub.actor, plan.grants, plan.drops)
            for sub, plan in zip(subs, plans, strict=True)
        ]
        async with self._lease_lock:
            try:
                write = await self.store.write_lease_batches(batches, now_ms=self._now_ms())
            except StoreError as exc:
                write = None
                self.metrics.incr("lease_store_errors")
                self._lease_log.error(
                    "storing %d agents' leases failed (they send them again): %s", len(plans), exc
                )
            for sub, plan in zip(subs, plans, strict=True):
                sub.leases_queued -= 1
                if write is None:
                    self.leases.abandon(plan)
                    code = wire.RetCode.SYSTEM_ERROR
                else:
                    self.leases.commit(plan)
                    self.metrics.incr("lease_registrations", len(plan.grants))
                    self.metrics.incr("lease_drops", len(plan.drops))
                    code = wire.RetCode.SUCC
                if not sub.closed:
                    sub.queue_reply(wire.LeaseReply(plan.seq, code, tuple(plan.errors)))
        self.metrics.set("leases", self.leases.held)
        if write is not None and write.changed:
            self._wrote(write.version)

    @staticmethod
    def _subscriber(plan: LeasePlan) -> Subscriber:
        assert isinstance(plan.session, Subscriber)
        return plan.session

    def _wrote(self, version: int | None) -> None:
        """This DNS changed routes: read them now, so its agents get them at once (and keep
        re-reading a store read that is behind until it shows ``version``)."""
        if version is not None:
            self.await_version(version)
        self.poke()

    async def _lease_loop(self) -> None:
        """Every ``lease_sweep``: write the renewals due, then remove expired leases."""
        while True:
            now_ms = self._now_ms()
            await self.flush_renewals(now_ms)
            await self.sweep_leases(now_ms)
            await trio.sleep(self.config.lease_sweep)

    async def flush_renewals(self, now_ms: int) -> int:
        """Write the renewals due, in one batched write; returns how many."""
        async with self._lease_lock:
            due: list[Renewal] = self.leases.due(now_ms)
            if not due:
                self.metrics.set("leases", self.leases.held)
                return 0
            try:
                result = await self.store.renew_leases(
                    [renewal.grant for renewal in due], actor=RENEWAL_ACTOR
                )
            except StoreError as exc:
                self.leases.retry(due, now_ms)
                self.metrics.incr("lease_store_errors")
                self._lease_log.error("renewing %d leases failed (retrying): %s", len(due), exc)
                return 0
            self.leases.renewed(due)
        self.metrics.incr("lease_renewals", result.renewed)
        self.metrics.incr("lease_reinserts", result.reinserted)
        self.metrics.set("leases", self.leases.held)
        if result.write.changed:
            self._wrote(result.write.version)
        return len(due)

    async def sweep_leases(self, now_ms: int) -> int:
        """Remove the leases expired before ``now_ms`` (in batches); returns how many."""
        removed = 0
        while True:
            try:
                result = await self.store.expire_leases(now_ms, actor=EXPIRY_ACTOR)
            except StoreError as exc:
                self.metrics.incr("lease_store_errors")
                self._lease_log.error("sweeping expired leases failed: %s", exc)
                break
            if not result.write.changed:
                break
            removed += result.write.removed
            self.metrics.incr("leases_expired", result.write.removed)
            self._wrote(result.write.version)
            if not result.more:
                break
        return removed

    # --- the fleet view (DESIGN §14) -------------------------------------------------------

    async def _fleet_loop(self) -> None:
        """Every ``fleet_interval``: read which hosts the fleet sees overloaded, and push the
        modules whose demoted hosts changed."""
        while True:
            await self.update_fleet_view()
            await trio.sleep(self.config.fleet_interval)

    async def update_fleet_view(self) -> bool:
        """Read the demoted hosts once and apply them; False if the store failed (the last
        set stays)."""
        config = self.config
        since = max(0, math.ceil(self.wall_clock() - config.demote_window))
        try:
            demoted = await self.read_store.demoted_hosts(
                since, callers=config.demote_callers, share=config.demote_share
            )
        except StoreError as exc:
            self.metrics.incr("fleet_view_errors")
            self._lease_log.error("reading the fleet view failed (keeping the last): %s", exc)
            return False
        self.apply_demoted(demoted)
        return True

    def apply_demoted(self, demoted: dict[ModuleKey, frozenset[HostKey]]) -> set[ModuleKey]:
        """Send ``demoted`` from now on; push every subscribed module whose demoted hosts in
        its route changed. Returns the modules changed."""
        old, self.demoted = self.demoted, demoted
        changed = {m for m in old.keys() | demoted.keys() if old.get(m) != demoted.get(m)}
        self.metrics.set("demoted_hosts", sum(map(len, demoted.values())))
        if changed:
            log.info(
                "fleet view: %d host(s) demoted in %d module(s); %d module(s) changed",
                sum(map(len, demoted.values())),
                len(demoted),
                len(changed),
            )
        routes = self.routes
        if routes is None:
            return changed
        for module in changed:
            self._frames.pop(module, None)
            route = routes.get(module, _EMPTY)
            if old.get(module, _EMPTY) & route == demoted.get(module, _EMPTY) & route:
                continue  # the route's own hosts are sent as they were
            for sub in self.subscribers.get(module, ()):
                if not sub.original:
                    self._queue_route(sub, module)
                    self.metrics.incr("pushes")
        return changed

    def observed(self) -> Observed:
        """The DNS's registry and readiness check (routes loaded) for the HTTP listener."""

        async def not_ready() -> str | None:
            return None if self.routes is not None else "routes not loaded yet"

        return Observed("dns", self.registry, not_ready)

    def _update_gauges(self) -> None:
        self.metrics.set("connections", len(self.connections))
        self.metrics.set("subscribed_modules", len(self.subscribers))
        self.metrics.set("loaded", int(self.routes is not None))
        self.metrics.set("route_version", self.version)
        self.metrics.set("shrink_held", int(self.held is not None))
        self.metrics.set("held_version", self.held.version if self.held else 0)
        self.metrics.set("leases", self.leases.held)
        self.metrics.set("demoted_hosts", sum(map(len, self.demoted.values())))


class DnsCollector(Collector):
    """The DNS's counters and gauges, read at scrape time."""

    def __init__(self, dns: DnsServer) -> None:
        self.dns = dns

    def collect(self) -> Iterator[Metric]:
        dns = self.dns
        counters = dns.metrics.counters
        routes = dns.routes

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"lars_dns_{name}", doc, value=value)

        def counter(name: str, doc: str, key: str | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(f"lars_dns_{name}", doc, value=counters[key or name])

        yield gauge("routes_loaded", "1 once routes are loaded from the store.", routes is not None)
        yield gauge("modules", "Modules with a route.", len(routes or ()))
        yield gauge("hosts", "Hosts of every route.", sum(map(len, (routes or {}).values())))
        yield gauge("route_version", "Store version of the routes served.", dns.version)
        yield gauge("connections", "Agent connections.", len(dns.connections))
        yield gauge(
            "original_connections",
            "Connections of original Lars agents (counted in connections too).",
            sum(1 for c in dns.connections if c.original),
        )
        yield gauge("subscribed_modules", "Modules some agent subscribed to.", len(dns.subscribers))
        yield counter("route_requests", "GetRouteRequests answered.")
        yield counter("pushes", "Routes pushed to agents after a change.")
        loads = CounterMetricFamily(
            "lars_dns_store_loads", "Route loads from the store, by kind.", labels=["kind"]
        )
        loads.add_metric(["full"], counters["full_reloads"])
        loads.add_metric(["partial"], counters["partial_reloads"])
        yield loads
        yield counter("store_errors", "Failed reads of the store.")
        yield gauge("store_up", "1 while the store answers.", dns.store_ok is True)
        yield gauge(
            "stale", "1 while agents are told this DNS is stale (see stale_after).", dns.stale
        )
        yield counter("catch_up_rereads", "Early re-reads for a notified version not read yet.")
        yield counter("change_notices", "RouteChangeNotices received.")
        yield counter("malformed_frames", "Frames that did not decode (connection closed).")
        yield counter("invalid_requests", "Requests with invalid values.")
        yield counter("subscriptions_lapsed", "Subscriptions to absent modules that lapsed.")
        yield counter(
            "shrinks_held", "Reloads held back for removing too many hosts at once (shrink_guard)."
        )
        yield counter("shrinks_released", "Held reloads served after persisting shrink_hold.")
        yield counter("shrinks_confirmed", "Held reloads served on an admin's confirmation.")
        yield gauge(
            "shrink_held", "1 while a reload that removes too many hosts is held.", bool(dns.held)
        )
        yield gauge("leases", "Leases the agents' sessions hold on this DNS.", dns.leases.held)
        yield counter("lease_updates", "LeaseUpdates received from agents.")
        yield counter("lease_registrations", "Registrations written (new or changed leases).")
        yield counter("lease_renewals", "Lease renewals written (in batches, not per heartbeat).")
        yield counter("lease_reinserts", "Renewals that found their row gone and registered it.")
        yield counter("lease_drops", "Deregistrations written.")
        yield counter("leases_expired", "Expired leases this DNS removed.")
        yield counter(
            "lease_errors",
            "Lease items refused: a bad address or zone, a lapsed lease, over the session cap.",
        )
        yield counter("lease_store_errors", "Lease writes and sweeps that failed on the store.")
        yield counter(
            "lease_updates_refused", "LeaseUpdates answered SYSTEM_ERROR at once (writer behind)."
        )
        yield gauge(
            "demoted_hosts",
            "Hosts the fleet view demotes.",
            sum(map(len, dns.demoted.values())),
        )
        yield counter("fleet_view_errors", "Failed reads of the fleet view.")
        yield from gate_metrics(
            counter, gauge, dns.gate, "Change notices and StatsRequests dropped over control_rate."
        )
