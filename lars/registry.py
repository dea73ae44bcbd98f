"""Self-registration through the local agent (DESIGN §14): the rules, without I/O.

Pure: no sockets, no trio, the clock passed in. :class:`Registry` is what one agent holds
for the clients that registered through it, and :func:`registration_spec` checks what a client
asks for (the client checks it before sending, the agent again on arrival).

The agent's rules:

* **Register** (RegisterRequest): a registration the agent does not hold is *new*: it is
  held *pending* and sent to the DNS at once (a LeaseUpdate on the route session), and the
  client is answered when the DNS replies (LeaseReply: SUCC, or BAD_REQUEST with the
  DNS's reason), or with SYSTEM_ERROR when no reply came within ``reply_timeout``; a
  refused or unanswered registration is not held. A request for a registration the agent
  holds is a *renewal*: it is answered SUCC at once and dates the lease from now; a new
  weight, zone or ttl in it is sent to the DNS at once. A renewal of a pending
  registration (the client's resend) waits for the same reply. At most
  ``max_registrations`` are held (0: registration is off).
* **Heartbeat**: every ``min(ttl) / 3`` seconds, at most every second, one LeaseUpdate
  carries every held registration the DNS took, each with ``age_ms``, how long ago its
  client last renewed it, so the DNS dates its expiry from the client and not from this
  batching. A registration whose client has not renewed it for its ``ttl`` is forgotten
  (the DNS expires it from the store). On a new DNS session everything held is sent at
  once (the agent may have moved to another DNS).
* **Deregister** (DeregisterRequest): the registration is forgotten here at once, a Drop
  (with the drain) goes to the DNS, and the client is answered after the DNS replies. A
  Drop is sent also for a registration this agent does not hold: another agent, or this
  one before a restart, may have made it.
* **Replies**: a LeaseReply names the update by ``seq``. ``errors`` refuse single items
  (leases first, then drops); a refused registration is forgotten also when the DNS had
  taken it before, so the client's next renewal comes in as new and learns the reason.
  SYSTEM_ERROR (the DNS could not store anything) fails the new registrations and drops
  of that update; held ones are kept and go again with the next heartbeat. An ErrorReply
  with the update's seq (a DNS from before registration) refuses the whole update.
* **Order**: drops and leases never share an update: drops go first, in their own, so a
  deregistration followed by a new registration of the same host, or the reverse, reaches
  the DNS in the order the clients sent them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import attrs

from lars import wire
from lars.core.model import (
    DRAIN_MAX_MS,
    check_port,
    check_ttl,
    check_weight,
    check_zone,
    format_host,
    int_to_ip,
    ip_to_int,
    parse_module,
)
from lars.errors import InvalidValue

#: Seconds a new registration or a deregistration waits for the DNS's reply before its
#: client gets SYSTEM_ERROR (a client waits longer than this: see lars.client).
REPLY_TIMEOUT = 1.0
#: Longest time between two heartbeats, seconds (shorter when a ttl / 3 is).
HEARTBEAT_MAX = 1.0
#: Requests of one client waiting for one reply (its resends): beyond it the oldest goes.
MAX_WAITERS = 8

_SUCC = wire.RetCode.SUCC
_BAD = wire.RetCode.BAD_REQUEST
_SYSTEM = wire.RetCode.SYSTEM_ERROR

#: One registration: ``(modid, cmdid, ip, port)``.
Key = tuple[int, int, int, int]
#: Where to send a client's reply (the agent's business: socket and address).
ReplyTo = Any
#: A reply to send: where, and what.
Answer = tuple[ReplyTo, wire.RegisterReply]


def check_register_ip(ip: int) -> int:
    """Return ``ip`` (an IPv4 as an integer) if a host may be registered on it, else raise
    InvalidValue: not 0.0.0.0, 255.255.255.255 or a multicast address (224.0.0.0/4)."""
    if type(ip) is not int or not 0 < ip < 0xFFFF_FFFF or 0xE000_0000 <= ip <= 0xEFFF_FFFF:
        shown = int_to_ip(ip) if type(ip) is int and 0 <= ip <= 0xFFFF_FFFF else repr(ip)
        raise InvalidValue(
            f"cannot register address {shown}: not 0.0.0.0, 255.255.255.255 or multicast"
        )
    return ip


class RegistrationSpec(NamedTuple):
    """What a client registers, as the wire carries it (``ip`` 0: the agent's address,
    ``weight`` -1 and ``zone`` None: not given)."""

    modid: int
    cmdid: int
    ip: int
    port: int
    weight: int
    zone: str | None
    ttl: int

    def describe(self) -> str:
        """``10.0.0.1:7001 for module 1/1`` (``port 7001 of this host`` without an ip)."""
        where = format_host((self.ip, self.port)) if self.ip else f"port {self.port}"
        return f"{where} for module {self.modid}/{self.cmdid}"


def registration_spec(
    modid: object,
    cmdid: object,
    port: object,
    ip: object = None,
    weight: object = None,
    zone: object = None,
    ttl: object = 10,
) -> RegistrationSpec:
    """Check a client's registration and return it in wire form; raises InvalidValue
    naming what is wrong. ``ip`` None: the agent's own address."""
    modid, cmdid = parse_module(modid, cmdid)
    if ip is None:
        ip_int = 0
    elif type(ip) is str:
        ip_int = check_register_ip(ip_to_int(ip))
    else:
        raise InvalidValue(f"ip must be dotted IPv4 text or None, got {ip!r}")
    return RegistrationSpec(
        modid,
        cmdid,
        ip_int,
        check_port(port),
        -1 if weight is None else check_weight(weight),
        None if zone is None else check_zone(zone),
        check_ttl(ttl),
    )


def drain_ms(drain: object) -> int:
    """A drain in seconds as the wire's milliseconds; raises InvalidValue."""
    if (
        isinstance(drain, bool)
        or not isinstance(drain, (int, float))
        or not 0 <= drain <= DRAIN_MAX_MS / 1000
    ):
        raise InvalidValue(f"drain must be 0 to {DRAIN_MAX_MS // 1000} seconds, got {drain!r}")
    return round(drain * 1000)


def renew_interval(ttl: int) -> float:
    """Seconds between a client's renewals of a registration with this ttl."""
    return ttl / 3


@attrs.define(eq=False)
class _Entry:
    """A registration held: pending until the DNS took it, then confirmed."""

    weight: int
    zone: str | None
    ttl: int
    #: When its client last renewed it.
    renewed: float
    confirmed: bool = False
    #: Pending: when its waiters get SYSTEM_ERROR, and the update carrying it (None: to send).
    deadline: float = 0.0
    sent: int | None = None
    #: Confirmed: changed by a renewal, to send at once.
    dirty: bool = False
    waiters: list[tuple[int, ReplyTo]] = attrs.field(factory=list)


@attrs.define(eq=False)
class _DropEntry:
    drain_ms: int
    deadline: float
    sent: int | None = None
    waiters: list[tuple[int, ReplyTo]] = attrs.field(factory=list)


def _wait(waiters: list[tuple[int, ReplyTo]], seq: int, reply_to: ReplyTo) -> None:
    """Add a waiting request, once (a client's resend has the same seq and address)."""
    if (seq, reply_to) not in waiters:
        if len(waiters) >= MAX_WAITERS:
            del waiters[0]
        waiters.append((seq, reply_to))


_LEASE = 0
_DROP = 1


class Registry:
    """The registrations one agent holds, and the LeaseUpdates that keep them in the DNS.
    See the module docstring for the rules. ``count(name, n)`` receives the counters:
    registrations_registered, _renewed, _deregistered, _refused, _expired,
    lease_updates_sent, lease_timeouts."""

    def __init__(
        self,
        max_registrations: int,
        reply_timeout: float = REPLY_TIMEOUT,
        count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_registrations = max_registrations
        self.reply_timeout = reply_timeout
        self._count = count or (lambda name, n: None)
        self.entries: dict[Key, _Entry] = {}
        self.drops: dict[Key, _DropEntry] = {}
        #: Updates sent and not answered yet: seq -> (when sent, its items in order).
        self.in_flight: OrderedDict[int, tuple[float, list[tuple[int, Key]]]] = OrderedDict()
        self._seqs = itertools.count(1)  # 0 is the seq of the DNS's unsolicited errors
        self._heartbeat_due = False
        self._next_tick: float | None = None

    def __len__(self) -> int:
        return len(self.entries)

    # --- clients ---------------------------------------------------------------------------

    def register(
        self, msg: wire.RegisterRequest, ip: int, reply_to: ReplyTo, now: float
    ) -> wire.RegisterReply | None:
        """A client's RegisterRequest, its ``ip`` resolved (0 replaced by the agent's own
        address). Returns the reply to send now, or None when it waits for the DNS."""
        try:
            check_register_ip(ip)
            if msg.zone is not None:
                check_zone(msg.zone)
        except InvalidValue as exc:
            return self.refuse(msg.seq, ip, str(exc))
        key = (msg.modid, msg.cmdid, ip, msg.port)
        entry = self.entries.get(key)
        if entry is not None:
            entry.renewed = now
            if (entry.weight, entry.zone, entry.ttl) != (msg.weight, msg.zone, msg.ttl):
                entry.weight, entry.zone, entry.ttl = msg.weight, msg.zone, msg.ttl
                entry.dirty = entry.confirmed
                self._tick_sooner(now, msg.ttl)
            if entry.confirmed:
                self._count("registrations_renewed", 1)
                return wire.RegisterReply(msg.seq, _SUCC, ip, "")
            _wait(entry.waiters, msg.seq, reply_to)
            return None
        if len(self.entries) >= self.max_registrations:
            if not self.max_registrations:
                reason = "registration is off on this agent ([agent] max_registrations = 0)"
            else:
                reason = (
                    f"this agent holds {len(self.entries)} registrations, its limit"
                    " ([agent] max_registrations)"
                )
            return self.refuse(msg.seq, ip, reason)
        self.entries[key] = _Entry(
            msg.weight,
            msg.zone,
            msg.ttl,
            renewed=now,
            deadline=now + self.reply_timeout,
            waiters=[(msg.seq, reply_to)],
        )
        return None

    def deregister(
        self, msg: wire.DeregisterRequest, ip: int, reply_to: ReplyTo, now: float
    ) -> tuple[wire.RegisterReply | None, list[Answer]]:
        """A client's DeregisterRequest (``ip`` resolved): forgets the registration and
        sends a Drop. Returns the reply to send now (a refusal; None: it waits for the DNS)
        and the answers to other requests it ends (a registration still waiting for the
        DNS is refused)."""
        try:
            check_register_ip(ip)
        except InvalidValue as exc:
            return self.refuse(msg.seq, ip, str(exc)), []
        key = (msg.modid, msg.cmdid, ip, msg.port)
        drop = self.drops.get(key)
        if drop is None:
            if len(self.drops) >= max(self.max_registrations, 1):
                return self.refuse(msg.seq, ip, "too many deregistrations in progress"), []
            drop = self.drops[key] = _DropEntry(msg.drain_ms, now + self.reply_timeout)
        elif drop.sent is None:
            drop.drain_ms = msg.drain_ms
        _wait(drop.waiters, msg.seq, reply_to)
        entry = self.entries.pop(key, None)
        if entry is None or entry.confirmed:
            return None, []
        reason = "deregistered before the DNS took the registration"
        return None, self._answer_all(entry.waiters, _BAD, ip, reason)

    def refuse(self, seq: int, ip: int, reason: str) -> wire.RegisterReply:
        """The BAD_REQUEST reply to registration request ``seq`` (counted as refused)."""
        self._count("registrations_refused", 1)
        return wire.RegisterReply(seq, _BAD, ip if 0 <= ip <= 0xFFFF_FFFF else 0, reason)

    def _answer_all(
        self, waiters: list[tuple[int, ReplyTo]], retcode: int, ip: int, reason: str
    ) -> list[Answer]:
        if retcode != _SUCC:
            self._count("registrations_refused", len(waiters))
        return [(to, wire.RegisterReply(seq, retcode, ip, reason)) for seq, to in waiters]

    # --- the DNS ---------------------------------------------------------------------------

    def session_started(self) -> None:
        """A new DNS session: everything held goes to it with the next :meth:`updates`."""
        self.session_lost()
        self._heartbeat_due = True

    def session_lost(self) -> None:
        """The DNS session ended: its updates will not be answered; what they carried for
        the first time is sent again on the next session (their waiters keep waiting until
        their deadline)."""
        self.in_flight.clear()
        for entry in self.entries.values():
            entry.sent = None
        for drop in self.drops.values():
            drop.sent = None

    @property
    def has_updates(self) -> bool:
        """True when :meth:`updates` has something to send."""
        return (
            self._heartbeat_due
            or any(d.sent is None for d in self.drops.values())
            or any((not e.confirmed and e.sent is None) or e.dirty for e in self.entries.values())
        )

    def updates(self, now: float) -> list[wire.LeaseUpdate]:
        """The LeaseUpdates to send now, in order, each recorded as in flight: the drops not
        sent yet, then the new registrations not sent yet, those a renewal changed and, at a
        heartbeat, every registration the DNS took."""
        heartbeat, self._heartbeat_due = self._heartbeat_due, False
        drops = [(key, d) for key, d in self.drops.items() if d.sent is None]
        leases: list[tuple[Key, _Entry]] = []
        for key, entry in self.entries.items():
            if entry.confirmed:
                if (heartbeat or entry.dirty) and now - entry.renewed <= entry.ttl:
                    leases.append((key, entry))
                    entry.dirty = False
            elif entry.sent is None:
                leases.append((key, entry))
        out = []
        for chunk in _chunks(drops):
            seq = next(self._seqs)
            drop_items = []
            for key, drop in chunk:
                drop.sent = seq
                modid, cmdid, ip, port = key
                drop_items.append(wire.Drop(modid, cmdid, ip, port, drop.drain_ms))
            self.in_flight[seq] = (now, [(_DROP, key) for key, _ in chunk])
            out.append(wire.LeaseUpdate(seq, (), tuple(drop_items)))
        for chunk in _chunks(leases):
            seq = next(self._seqs)
            lease_items = []
            for key, entry in chunk:
                if not entry.confirmed:
                    entry.sent = seq
                age = min(max(0, round((now - entry.renewed) * 1000)), 0xFFFF_FFFF)
                modid, cmdid, ip, port = key
                lease_items.append(
                    wire.Lease(modid, cmdid, ip, port, entry.weight, entry.zone, entry.ttl, age)
                )
            self.in_flight[seq] = (now, [(_LEASE, key) for key, _ in chunk])
            out.append(wire.LeaseUpdate(seq, tuple(lease_items), ()))
        self._count("lease_updates_sent", len(out))
        return out

    def expects(self, seq: int) -> bool:
        """True if ``seq`` names an update in flight (an ErrorReply may answer one)."""
        return seq in self.in_flight

    def replied(self, msg: wire.LeaseReply | wire.ErrorReply, now: float) -> list[Answer]:
        """The DNS's answer to an update: returns the answers to the clients that waited
        for it. An ErrorReply (a DNS that does not take leases) refuses every item."""
        sent = self.in_flight.pop(msg.seq, None)
        if sent is None:
            return []  # an update already given up on
        items = sent[1]
        errors: dict[int, str]
        if isinstance(msg, wire.ErrorReply):
            errors = dict.fromkeys(range(len(items)), f"the DNS refused: {msg.reason}")
            failed = False
        else:
            errors = {index: f"the DNS refused: {why}" for index, why in msg.errors}
            failed = msg.retcode != _SUCC
        answers: list[Answer] = []
        for index, (kind, key) in enumerate(items):
            reason = errors.get(index)
            if kind == _DROP:
                answers += self._drop_replied(key, msg.seq, failed, reason)
            else:
                answers += self._lease_replied(key, msg.seq, failed, reason, now)
        return answers

    def _lease_replied(
        self, key: Key, seq: int, failed: bool, reason: str | None, now: float
    ) -> list[Answer]:
        entry = self.entries.get(key)
        if entry is None:
            return []
        ip = key[2]
        if entry.confirmed:
            if reason is not None:  # refused now: forget it, the next renewal hears why
                del self.entries[key]
                self._count("registrations_refused", 1)
            return []  # a heartbeat the store missed (failed) goes again with the next one
        if entry.sent != seq:
            return []
        if failed:
            del self.entries[key]
            why = "the DNS could not store the registration (its store is unavailable)"
            return self._answer_all(entry.waiters, _SYSTEM, ip, why)
        if reason is not None:
            del self.entries[key]
            return self._answer_all(entry.waiters, _BAD, ip, reason)
        entry.confirmed = True
        entry.sent = None
        waiters, entry.waiters = entry.waiters, []
        self._count("registrations_registered", 1)
        if self._next_tick is None:
            self._next_tick = now + self.heartbeat_interval()
        else:
            self._tick_sooner(now, entry.ttl)
        return self._answer_all(waiters, _SUCC, ip, "")

    def _drop_replied(self, key: Key, seq: int, failed: bool, reason: str | None) -> list[Answer]:
        drop = self.drops.get(key)
        if drop is None or drop.sent != seq:
            return []
        del self.drops[key]
        ip = key[2]
        if failed:
            why = "the DNS could not store the deregistration (its store is unavailable)"
            return self._answer_all(drop.waiters, _SYSTEM, ip, why)
        if reason is not None:
            return self._answer_all(drop.waiters, _BAD, ip, reason)
        self._count("registrations_deregistered", 1)
        return self._answer_all(drop.waiters, _SUCC, ip, "")

    # --- time ------------------------------------------------------------------------------

    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: the shortest ttl / 3, at most HEARTBEAT_MAX."""
        ttls = [e.ttl for e in self.entries.values() if e.confirmed]
        return min([HEARTBEAT_MAX, *(renew_interval(t) for t in ttls)])

    def _tick_sooner(self, now: float, ttl: int) -> None:
        if self._next_tick is not None:
            self._next_tick = min(self._next_tick, now + min(HEARTBEAT_MAX, renew_interval(ttl)))

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has something to do next (None: nothing until a change)."""
        times: list[float] = []
        if self._next_tick is not None:
            times.append(self._next_tick)
        if self.in_flight:
            times.append(next(iter(self.in_flight.values()))[0] + self.reply_timeout)
        for entry in self.entries.values():
            times.append(entry.renewed + entry.ttl if entry.confirmed else entry.deadline)
        times.extend(drop.deadline for drop in self.drops.values())
        return min(times, default=None)

    def expire(self, now: float) -> list[Answer]:
        """Do what is due at ``now``: SYSTEM_ERROR to requests the DNS did not answer in
        time (their registrations are not held), forget registrations whose client stopped
        renewing them, and mark the heartbeat due. Returns the answers to send; afterwards
        :attr:`has_updates` says whether to wake the sender."""
        answers: list[Answer] = []
        while self.in_flight:
            seq, (sent, _) = next(iter(self.in_flight.items()))
            if now < sent + self.reply_timeout:
                break
            del self.in_flight[seq]
            self._count("lease_timeouts", 1)
        for key, entry in list(self.entries.items()):
            if entry.confirmed:
                if now - entry.renewed > entry.ttl:
                    del self.entries[key]
                    self._count("registrations_expired", 1)
            elif now >= entry.deadline:
                del self.entries[key]
                why = "the DNS did not answer in time (no DNS session, or a slow store)"
                answers += self._answer_all(entry.waiters, _SYSTEM, key[2], why)
        for key, drop in list(self.drops.items()):
            if now >= drop.deadline:
                del self.drops[key]
                why = "the DNS did not answer the deregistration in time"
                answers += self._answer_all(drop.waiters, _SYSTEM, key[2], why)
        if not any(e.confirmed for e in self.entries.values()):
            self._next_tick = None
        elif self._next_tick is None:
            self._next_tick = now + self.heartbeat_interval()
        elif now >= self._next_tick:
            self._heartbeat_due = True
            self._next_tick = now + self.heartbeat_interval()
        return answers


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    """``items`` in lists of at most MAX_LEASE_ITEMS (one LeaseUpdate each)."""
    size = wire.MAX_LEASE_ITEMS
    for start in range(0, len(items), size):
        yield items[start : start + size]
