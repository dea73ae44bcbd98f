"""The DNS's self-registration leases, without I/O (DESIGN §14): what each agent session
holds, what a LeaseUpdate asks to write, and which renewals are due. The clock (unix
milliseconds) is passed in; :mod:`lars.roles.dns` moves the bytes and runs the writes.

Rules, per agent session (one DNS connection of one agent):

* A :class:`~lars.wire.Lease` the session does not hold yet, or holds with another ttl,
  weight or zone, is a **registration**: written to the store (a new or changed route row),
  expiring ``now - age_ms + ttl``. The session holds it once the write has committed (until
  then it is *pending*: a heartbeat for it updates the pending one, nothing more is written).
* A Lease the session holds unchanged is a **renewal**: it only moves the lease's
  ``last_seen`` (``now - age_ms``) in memory. Nothing is written per heartbeat: the flush
  (:meth:`LeaseBook.due`, every ``lease_sweep``) writes ``last_seen + ttl`` for the leases
  whose stored expiry has less than half their ttl left, all in one batched write.
* A lease whose client has not renewed it for its ttl is forgotten (the store's expiry
  removes its row); so are a session's leases when it closes.
* A :class:`~lars.wire.Drop` is a **deregistration**: written (weight 0 now, removed after
  its drain), then forgotten. A key both renewed and dropped in one update is dropped.
* Refused, one by one, with a reason (``LeaseReply.errors``, leases first, then drops): an
  address that is not a host's (0.0.0.0/8, multicast, 255.255.255.255), a zone that is not
  printable ASCII, a lease its client let lapse (``age_ms`` >= ttl), and registrations
  beyond ``max_per_session``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence

import attrs

from lars import wire
from lars.core.model import HostKey, ModuleKey, check_zone
from lars.errors import InvalidValue
from lars.store import LeaseDrop, LeaseGrant

#: ``(module, host)``: one RouteData row.
RowKey = tuple[ModuleKey, HostKey]
#: Milliseconds after a failed renewal write before the lease is tried again.
RENEW_RETRY_MS = 1000
#: 224.0.0.0/4
_MULTICAST = (0xE000_0000, 0xEFFF_FFFF)


def address_problem(ip: int) -> str | None:
    """Why ``ip`` (uint32) cannot be a registered host's address, or None."""
    if ip >> 24 == 0:
        return "address 0.0.0.0/8 is not a host's (the agent must name the address)"
    if ip == 0xFFFF_FFFF:
        return "address 255.255.255.255 is not a host's"
    if _MULTICAST[0] <= ip <= _MULTICAST[1]:
        return "a multicast address is not a host's"
    return None


def lease_problem(lease: wire.Lease) -> str | None:
    """Why a decoded Lease cannot be registered, or None (the wire already checked the
    ranges of ids, port, weight and ttl)."""
    problem = address_problem(lease.ip)
    if problem is None and lease.zone is not None:
        try:
            check_zone(lease.zone)
        except InvalidValue as exc:
            problem = str(exc)
    if problem is None and lease.age_ms >= lease.ttl * 1000:
        problem = (
            f"lapsed: its client last renewed it {lease.age_ms} ms ago, past its ttl"
            f" of {lease.ttl} s"
        )
    return problem


@attrs.define(eq=False)
class HeldLease:
    """One lease a session holds (or has pending)."""

    ttl_ms: int
    weight: int | None
    zone: str | None
    #: Unix ms the client last renewed it.
    last_seen: int
    #: The expiry written to the store (as far as this DNS knows).
    expires: int
    #: When the flush looks at it next (unix ms); its entry in the heap.
    due: int = 0

    def same_terms(self, other: HeldLease) -> bool:
        """True if ``other`` renews this lease (same ttl, weight and zone)."""
        return (self.ttl_ms, self.weight, self.zone) == (other.ttl_ms, other.weight, other.zone)


@attrs.define(eq=False)
class LeasePlan:
    """What one LeaseUpdate asks: the reply's ``errors``, and the registrations and
    deregistrations to write (empty: answered at once)."""

    session: Hashable
    seq: int
    errors: list[tuple[int, str]]
    grants: list[LeaseGrant]
    drops: list[LeaseDrop]
    #: The registrations' leases, held once the write commits.
    pending: dict[RowKey, HeldLease]
    #: Heartbeats of leases already held.
    renewals: int = 0

    @property
    def writes(self) -> bool:
        """True if the plan has something to write."""
        return bool(self.grants or self.drops)


@attrs.define(eq=False)
class Renewal:
    """A renewal due: the session holding it, and the grant to write."""

    session: Hashable
    grant: LeaseGrant

    @property
    def key(self) -> RowKey:
        return self.grant.key


@attrs.define(eq=False)
class _Session:
    held: dict[RowKey, HeldLease] = attrs.Factory(dict)
    pending: dict[RowKey, HeldLease] = attrs.Factory(dict)


class LeaseBook:
    """Every session's leases and the heap of renewals due."""

    def __init__(self, max_per_session: int) -> None:
        self.max_per_session = max_per_session
        self._sessions: dict[Hashable, _Session] = {}
        #: ``(due, tie, session, key)``; entries whose lease moved on are skipped.
        self._heap: list[tuple[int, int, Hashable, RowKey]] = []
        self._tie = itertools.count()
        #: Leases held, over every session.
        self.held = 0

    def holds(self, session: Hashable) -> dict[RowKey, HeldLease]:
        """The leases ``session`` holds (a copy)."""
        state = self._sessions.get(session)
        return dict(state.held) if state else {}

    def take_update(self, session: Hashable, msg: wire.LeaseUpdate, now_ms: int) -> LeasePlan:
        """Sort an update's items into errors, renewals (applied now, in memory) and the
        registrations and deregistrations to write."""
        state = self._sessions.setdefault(session, _Session())
        plan = LeasePlan(session, msg.seq, [], [], [], {})
        grants: dict[RowKey, LeaseGrant] = {}
        for index, lease in enumerate(msg.leases):
            problem = lease_problem(lease)
            if problem is not None:
                plan.errors.append((index, problem))
                continue
            key = (lease.module, lease.host)
            offered = HeldLease(
                lease.ttl * 1000,
                None if lease.weight < 0 else lease.weight,
                lease.zone,
                now_ms - lease.age_ms,
                now_ms - lease.age_ms + lease.ttl * 1000,
            )
            known = plan.pending.get(key) or state.pending.get(key) or state.held.get(key)
            if known is not None and known.same_terms(offered):
                known.last_seen = max(known.last_seen, offered.last_seen)
                if key in plan.pending:  # the same lease twice in one update
                    grants[key] = attrs.evolve(grants[key], expires=known.last_seen + known.ttl_ms)
                elif key in state.held and known is state.held[key]:
                    plan.renewals += 1
                continue
            new = key not in state.held and key not in state.pending and key not in plan.pending
            if new and len(state.held) + len(state.pending) + len(plan.pending) >= (
                self.max_per_session
            ):
                plan.errors.append(
                    (index, f"more than {self.max_per_session} registrations on this session")
                )
                continue
            plan.pending[key] = offered
            grants[key] = LeaseGrant(*key, offered.expires, offered.weight, offered.zone)
        drops: dict[RowKey, LeaseDrop] = {}
        for index, drop in enumerate(msg.drops, len(msg.leases)):
            problem = address_problem(drop.ip)
            if problem is not None:
                plan.errors.append((index, problem))
                continue
            key = (drop.module, drop.host)
            drops[key] = LeaseDrop(*key, drop.drain_ms)
            grants.pop(key, None)
            plan.pending.pop(key, None)
        plan.grants = list(grants.values())
        plan.drops = list(drops.values())
        state.pending.update(plan.pending)
        return plan

    def commit(self, plan: LeasePlan) -> None:
        """The plan's write committed: its registrations are held, its deregistered leases
        forgotten (a closed session's plan changes nothing)."""
        state = self._sessions.get(plan.session)
        if state is None:
            return
        for drop in plan.drops:
            if state.held.pop(drop.key, None) is not None:
                self.held -= 1
        written = {grant.key: grant.expires for grant in plan.grants}
        for key, lease in plan.pending.items():
            if state.pending.get(key) is lease:
                del state.pending[key]
            if key not in state.held:
                self.held += 1
            state.held[key] = lease
            lease.expires = written[key]  # heartbeats since are the flush's to write
            self._schedule(plan.session, key, lease)

    def abandon(self, plan: LeasePlan) -> None:
        """The plan's write failed: its registrations are not held (the agent sends them
        again)."""
        state = self._sessions.get(plan.session)
        if state is None:
            return
        for key, lease in plan.pending.items():
            if state.pending.get(key) is lease:
                del state.pending[key]

    def close(self, session: Hashable) -> int:
        """Forget a closed session's leases (their rows expire unless registered again
        elsewhere); returns how many it held."""
        state = self._sessions.pop(session, None)
        if state is None:
            return 0
        self.held -= len(state.held)
        return len(state.held)

    def _schedule(self, session: Hashable, key: RowKey, lease: HeldLease) -> None:
        """Look at ``lease`` again when half its ttl is left of its stored expiry."""
        lease.due = lease.expires - lease.ttl_ms // 2
        heapq.heappush(self._heap, (lease.due, next(self._tie), session, key))

    def next_due(self) -> int | None:
        """When the flush has something to look at (unix ms), or None."""
        return self._heap[0][0] if self._heap else None

    def due(self, now_ms: int) -> list[Renewal]:
        """The renewals to write now: leases whose stored expiry has less than half their
        ttl left and whose client renewed them since it was written. A lease whose client
        has not renewed it for its ttl is forgotten."""
        renewals: list[Renewal] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            due, _, session, key = heapq.heappop(heap)
            state = self._sessions.get(session)
            lease = state.held.get(key) if state else None
            if lease is None or lease.due != due:
                continue  # forgotten, or scheduled again since
            assert state is not None
            target = lease.last_seen + lease.ttl_ms
            if target <= now_ms:  # its client stopped: the store's expiry removes the row
                del state.held[key]
                self.held -= 1
            elif target > lease.expires:
                renewals.append(
                    Renewal(session, LeaseGrant(*key, target, lease.weight, lease.zone))
                )
                lease.due = -1  # being written: renewed() schedules it again
            else:  # nothing heard since: look again when it would lapse
                lease.due = target
                heapq.heappush(heap, (target, next(self._tie), session, key))
        return renewals

    def renewed(self, renewals: Sequence[Renewal]) -> None:
        """The renewals' write committed."""
        for renewal in renewals:
            lease = self._lease(renewal)
            if lease is not None:
                lease.expires = max(lease.expires, renewal.grant.expires)
                self._schedule(renewal.session, renewal.key, lease)

    def retry(self, renewals: Sequence[Renewal], now_ms: int) -> None:
        """The renewals' write failed: try them again RENEW_RETRY_MS from now."""
        for renewal in renewals:
            lease = self._lease(renewal)
            if lease is not None:
                lease.due = now_ms + RENEW_RETRY_MS
                heapq.heappush(
                    self._heap, (lease.due, next(self._tie), renewal.session, renewal.key)
                )

    def _lease(self, renewal: Renewal) -> HeldLease | None:
        state = self._sessions.get(renewal.session)
        lease = state.held.get(renewal.key) if state else None
        return lease if lease is not None and lease.due == -1 else None
