"""The Lars wire protocol: msgpack messages, TCP framing, UDP datagrams. Sans-IO, no trio.

Every message is a msgpack array whose first element is the message type id, followed by the
message's fields in declaration order::

    [4, seq, modid, cmdid]                       # GetHostRequest

A UDP datagram carries exactly one such array. A TCP stream carries frames: a 4-byte big-endian
body length, then the body. :class:`FrameDecoder` checks the length against the configured
maximum *before* buffering the body, so an oversized frame costs nothing but the 4 header bytes.

Hosts travel as ``[ip, port]`` with ``ip`` the unsigned 32-bit integer of the IPv4 address.

Anything that cannot be decoded into a valid message raises :class:`ProtocolError`, and nothing
else: not msgpack, not an array, unknown type id, wrong field count, a field of the wrong kind,
a value out of range. When the type and sequence number could be read, the error carries them
(``msg_type``, ``seq``) so that a server can answer the caller with an :class:`ErrorReply`
instead of dropping the request silently.

Type ids 1-8 are those of the original Lars protocol; ids from 9 on are Lars additions. Ids
are stable once released: never renumber, only append.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import attrs
import msgpack

from lars.core.model import (
    DRAIN_MAX_MS,
    PORT_MAX,
    TTL_MAX,
    TTL_MIN,
    UINT32_MAX,
    WEIGHT_MAX,
    ZONE_MAX_LENGTH,
    HostKey,
    HostMeta,
    PolicySpec,
)
from lars.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_DATAGRAM",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "AgentStateRequest",
    "AgentStateResponse",
    "ApiGetRouteRequest",
    "ApiGetRouteResponse",
    "DeregisterRequest",
    "DnsState",
    "Drop",
    "ErrorReply",
    "FrameDecoder",
    "GetHostKeyRequest",
    "GetHostReportRequest",
    "GetHostRequest",
    "GetHostResponse",
    "GetRouteRequest",
    "GetRouteResponse",
    "HostResult",
    "Lease",
    "LeaseReply",
    "LeaseUpdate",
    "Message",
    "ProtocolError",
    "RegisterReply",
    "RegisterRequest",
    "ReportRequest",
    "ReportStatusAck",
    "ReportStatusRequest",
    "RetCode",
    "RouteChangeNotice",
    "ShrinkConfirm",
    "StatsRequest",
    "StatsResponse",
    "TimedReportRequest",
    "decode_agent_request",
    "decode_body",
    "decode_datagram",
    "encode_datagram",
    "encode_frame",
    "encode_get_host_key_request",
    "encode_get_host_report_request",
    "encode_get_host_request",
    "encode_get_host_response",
    "encode_report_request",
    "encode_timed_report_request",
    "peek_seq",
]

#: Default maximum TCP frame body, in bytes.
DEFAULT_MAX_FRAME = 1 << 20
#: Largest UDP payload over IPv4.
DEFAULT_MAX_DATAGRAM = 65507
HEADER_SIZE = 4

_header = struct.Struct("!I")
_packb = msgpack.Packer(use_bin_type=True).pack


class RetCode:
    """Return codes, as in the original Lars (0-3), plus BAD_REQUEST for invalid input."""

    SUCC = 0
    OVERLOAD = 1
    SYSTEM_ERROR = 2
    NOEXIST = 3
    BAD_REQUEST = 4

    NAMES: ClassVar[dict[int, str]] = {
        0: "SUCC",
        1: "OVERLOAD",
        2: "SYSTEM_ERROR",
        3: "NOEXIST",
        4: "BAD_REQUEST",
    }


# --- field checkers --------------------------------------------------------------------------
# Each takes the raw msgpack value and returns the Python value, or raises _Invalid (a value
# of the right kind out of range) or _Malformed (the wrong kind altogether).


class _Malformed(Exception):
    pass


class _Invalid(Exception):
    pass


def _int(value: Any, hi: int, what: str, lo: int = 0) -> int:
    if type(value) is not int:
        raise _Malformed(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _Invalid(f"{what} out of range: {value}")
    return value


def _u32(what: str) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        return _int(v, UINT32_MAX, what)

    check.uint32 = what  # type: ignore[attr-defined]  # lets decode_object take a fast path
    return check


def _u64(what: str) -> Callable[[Any], int]:
    return lambda v: _int(v, (1 << 64) - 1, what)


def _i64(v: Any) -> int:
    return _int(v, (1 << 63) - 1, "ts", lo=-(1 << 63))


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _Malformed(f"expected a boolean, got {type(v).__name__}")
    return v


def _str(v: Any) -> str:
    if type(v) is not str:
        raise _Malformed(f"expected a string, got {type(v).__name__}")
    return v


def _array(v: Any, n: int | None, what: str) -> list[Any] | tuple[Any, ...]:
    if type(v) is not list and type(v) is not tuple:
        raise _Malformed(f"{what} must be an array, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise _Malformed(f"{what} must have {n} elements, got {len(v)}")
    return v


def _host(v: Any) -> HostKey:
    ip, port = _array(v, 2, "host")
    return _int(ip, UINT32_MAX, "ip"), _int(port, PORT_MAX, "port", lo=1)


def _opt_host(v: Any) -> HostKey | None:
    return None if v is None else _host(v)


def _hosts(v: Any) -> tuple[HostKey, ...]:
    return tuple(_host(h) for h in _array(v, None, "hosts"))


def _results(v: Any) -> tuple[HostResult, ...]:
    out = []
    for item in _array(v, None, "results"):
        ip, port, succ, err, overload = _array(item, 5, "result")
        out.append(
            HostResult(
                _int(ip, UINT32_MAX, "ip"),
                _int(port, PORT_MAX, "port", lo=1),
                _int(succ, (1 << 64) - 1, "succ"),
                _int(err, (1 << 64) - 1, "err"),
                _bool(overload),
            )
        )
    return tuple(out)


def _map(v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise _Malformed(f"expected a map, got {type(v).__name__}")
    return v


def _retcode(v: Any) -> int:
    return _int(v, 255, "retcode")


_seq = _u32("seq")
_modid = _u32("modid")
_cmdid = _u32("cmdid")


def _port(v: Any) -> int:
    return _int(v, PORT_MAX, "port", lo=1)


# --- messages --------------------------------------------------------------------------------


class Message:
    """Base of all messages. ``TYPE`` is the wire id; ``_FIELDS`` the checker of each field."""

    TYPE: ClassVar[int]
    _FIELDS: ClassVar[tuple[Callable[[Any], Any], ...]]
    #: Names of the fields when every one is a uint32 (decoded by a faster path), else ().
    _UINT32: ClassVar[tuple[str, ...]] = ()
    #: How many trailing fields were added after the message was first released: a peer
    #: that predates them omits them, and they take their defaults. Encoding writes all.
    _ADDED: ClassVar[int] = 0
    #: The fields' values in order (an operator.attrgetter, set by _register).
    _getter: ClassVar[Callable[..., Any]]

    def _values(self) -> tuple[Any, ...]:
        values = type(self)._getter(self)
        return tuple(values) if len(self._FIELDS) > 1 else (values,)


_REGISTRY: dict[int, type[Message]] = {}


def _register(cls: type[Message]) -> type[Message]:
    assert cls.TYPE not in _REGISTRY, cls
    _REGISTRY[cls.TYPE] = cls
    names = [f.name for f in attrs.fields(cls)]  # type: ignore[arg-type]
    assert len(names) == len(cls._FIELDS), cls
    cls._getter = operator.attrgetter(*names)
    if all(hasattr(check, "uint32") for check in cls._FIELDS):
        cls._UINT32 = tuple(check.uint32 for check in cls._FIELDS)  # type: ignore[attr-defined]
    return cls


@_register
@attrs.frozen
class GetRouteRequest(Message):
    """Agent -> DNS: send me this module's route and keep me subscribed to its changes."""

    TYPE = 1
    modid: int
    cmdid: int
    _FIELDS = (_modid, _cmdid)


def _metas(v: Any) -> tuple[HostMeta, ...]:
    out = []
    for item in _array(v, None, "meta"):
        weight, zone = _array(item, 2, "host meta")
        zone = _str(zone)
        if len(zone) > ZONE_MAX_LENGTH:
            raise _Invalid(f"zone longer than {ZONE_MAX_LENGTH} characters")
        out.append(HostMeta(_int(weight, WEIGHT_MAX, "weight"), zone))
    return tuple(out)


def _number(v: Any) -> float:
    if (type(v) is not int and type(v) is not float) or v != v:
        raise _Malformed(f"expected a number, got {type(v).__name__}")
    return float(v)


def _policy(v: Any) -> PolicySpec | None:
    """A policy as sent, its kinds checked but not its values: an agent checks them
    (PolicySpec.check) and keeps its default for one it does not know, rather than
    dropping the route."""
    if v is None:
        return None
    name, affinity, failover, panic, slow = _array(v, 5, "policy")
    return PolicySpec(_str(name), _bool(affinity), _number(failover), _number(panic), _number(slow))


@_register
@attrs.frozen
class GetRouteResponse(Message):
    """DNS -> agent: a module's current route, as an answer or a push. Empty: module gone.

    Lars additions (DESIGN §13), both optional: ``meta``, each host's ``(weight, zone)``
    parallel to ``hosts`` (empty: every host HostMeta()), and the module's own ``policy``
    (``[policy, zone_affinity, zone_failover, panic_threshold, slow_start]``, None: the
    agent's default). ``demoted`` (DESIGN §14, the fleet view): hosts that enough callers see
    overloaded; an agent starts them overloaded (still probed). Trailing defaults are not
    encoded, so a route without any of these is the 3-field frame of before, which older
    agents decode.
    """

    TYPE = 2
    modid: int
    cmdid: int
    hosts: tuple[HostKey, ...]
    meta: tuple[HostMeta, ...] = ()
    policy: PolicySpec | None = None
    demoted: tuple[HostKey, ...] = ()
    _FIELDS = (_modid, _cmdid, _hosts, _metas, _policy, _hosts)
    _ADDED = 3

    def __attrs_post_init__(self) -> None:
        if self.meta and len(self.meta) != len(self.hosts):
            raise ProtocolError(
                f"GetRouteResponse: meta has {len(self.meta)} entries for {len(self.hosts)} hosts"
            )

    def _values(self) -> tuple[Any, ...]:
        values = (self.modid, self.cmdid, self.hosts, self.meta, self.policy, self.demoted)
        if self.demoted:
            return values
        if self.policy is not None:
            return values[:5]
        return values[:4] if self.meta else values[:3]


@attrs.frozen
class HostResult:
    """One host's call counts inside a :class:`ReportStatusRequest`."""

    ip: int
    port: int
    succ: int
    err: int
    overload: bool


@_register
@attrs.frozen
class ReportStatusRequest(Message):
    """Agent -> reporter: per-host call counts of one module since the last acknowledged send.

    ``caller`` is the agent host's IPv4 as an integer; ``seq`` is echoed in the
    :class:`ReportStatusAck` once the counts are stored.
    """

    TYPE = 3
    modid: int
    cmdid: int
    caller: int
    results: tuple[HostResult, ...]
    ts: int
    seq: int = 0
    _FIELDS = (_modid, _cmdid, _u32("caller"), _results, _i64, _u64("seq"))

    def _values(self) -> tuple[Any, ...]:
        results = [(r.ip, r.port, r.succ, r.err, r.overload) for r in self.results]
        return (self.modid, self.cmdid, self.caller, results, self.ts, self.seq)


@_register
@attrs.frozen
class GetHostRequest(Message):
    """Client -> agent: give me one host of this module."""

    TYPE = 4
    seq: int
    modid: int
    cmdid: int
    _FIELDS = (_seq, _modid, _cmdid)


@_register
@attrs.frozen
class GetHostResponse(Message):
    """Agent -> client: the chosen host, or ``None`` with a non-zero ``retcode``."""

    TYPE = 5
    seq: int
    modid: int
    cmdid: int
    retcode: int
    host: HostKey | None
    _FIELDS = (_seq, _modid, _cmdid, _retcode, _opt_host)


@_register
@attrs.frozen
class ReportRequest(Message):
    """Client -> agent: the call to ``host`` ended with ``retcode`` (0 = success). No reply."""

    TYPE = 6
    modid: int
    cmdid: int
    host: HostKey
    retcode: int
    _FIELDS = (_modid, _cmdid, _host, _u32("retcode"))


@_register
@attrs.frozen
class ApiGetRouteRequest(Message):
    """Client -> agent: give me every host of this module."""

    TYPE = 7
    seq: int
    modid: int
    cmdid: int
    _FIELDS = (_seq, _modid, _cmdid)


@_register
@attrs.frozen
class ApiGetRouteResponse(Message):
    """Agent -> client: the module's hosts (empty with a non-zero ``retcode``)."""

    TYPE = 8
    seq: int
    modid: int
    cmdid: int
    retcode: int
    hosts: tuple[HostKey, ...]
    _FIELDS = (_seq, _modid, _cmdid, _retcode, _hosts)


@_register
@attrs.frozen
class ErrorReply(Message):
    """Any role -> peer: your request ``seq`` could not be served (``code`` is a RetCode).

    ``seq`` takes 64 bits: it echoes whatever the refused message carried, and some
    messages (ReportStatusAck) number themselves with 64 bits.
    """

    TYPE = 9
    seq: int
    code: int
    reason: str
    _FIELDS = (_u64("seq"), _retcode, _str)


@_register
@attrs.frozen
class AgentStateRequest(Message):
    """``lars query`` -> agent: describe this module's balancer, its hosts from ``offset`` on.

    A large route does not fit one datagram, so the reply carries one page of hosts; the
    client asks again from the next offset until it has ``host_count`` of them. ``explain``
    1 (``lars query --explain``; agents from api_level 3) adds the module's scheduling.
    """

    TYPE = 10
    seq: int
    modid: int
    cmdid: int
    offset: int = 0
    explain: int = 0
    _FIELDS = (_seq, _modid, _cmdid, _u32("offset"), _u32("explain"))
    _ADDED = 2


@_register
@attrs.frozen
class AgentStateResponse(Message):
    """Agent -> ``lars query``: the module's state as a map: ``status``, ``last_update``,
    ``host_count`` and the page ``hosts`` starting at the request's ``offset``."""

    TYPE = 11
    seq: int
    modid: int
    cmdid: int
    retcode: int
    state: dict[str, Any]
    _FIELDS = (_seq, _modid, _cmdid, _retcode, _map)


@_register
@attrs.frozen
class RouteChangeNotice(Message):
    """Route writer -> DNS: routes changed (store version ``version``); check now."""

    TYPE = 12
    version: int
    _FIELDS = (_u64("version"),)


@_register
@attrs.frozen
class ReportStatusAck(Message):
    """Reporter -> agent: the report ``seq`` is stored."""

    TYPE = 13
    seq: int
    _FIELDS = (_u64("seq"),)


@_register
@attrs.frozen
class StatsRequest(Message):
    """Anyone -> any role: send me your counters."""

    TYPE = 14
    seq: int
    _FIELDS = (_seq,)


@_register
@attrs.frozen
class StatsResponse(Message):
    """A role's counters (name -> number) and its role name."""

    TYPE = 15
    seq: int
    role: str
    counters: dict[str, Any]
    _FIELDS = (_seq, _str, _map)


def _reports(v: Any) -> tuple[tuple[int, int, int, int, int], ...]:
    out = []
    for item in _array(v, None, "reports"):
        modid, cmdid, ip, port, retcode = _array(item, 5, "report")
        out.append(
            (
                _int(modid, UINT32_MAX, "modid"),
                _int(cmdid, UINT32_MAX, "cmdid"),
                _int(ip, UINT32_MAX, "ip"),
                _int(port, PORT_MAX, "port", lo=1),
                _int(retcode, UINT32_MAX, "retcode"),
            )
        )
    return tuple(out)


@_register
@attrs.frozen
class GetHostReportRequest(Message):
    """Client -> agent: a GetHostRequest carrying the client's pending reports, each
    ``(modid, cmdid, ip, port, retcode)`` as a ReportRequest would carry it. The agent takes
    the reports, in order, before it chooses the host: one datagram per client loop instead
    of two. Answered by a GetHostResponse. A client sends it only to an agent whose counters
    say ``api_level`` >= 2 (agents before it drop unknown types)."""

    TYPE = 16
    seq: int
    modid: int
    cmdid: int
    reports: tuple[tuple[int, int, int, int, int], ...]
    _FIELDS = (_seq, _modid, _cmdid, _reports)


#: The agent API level that takes GetHostReportRequest (StatsResponse counter ``api_level``).
API_LEVEL_PIGGYBACK = 2
#: Most reports a client puts on one request (a datagram of ~1 KB at most).
MAX_PIGGYBACK = 32


#: Most bytes of a caller key (GetHostKeyRequest).
MAX_KEY = 256
#: The agent API level that takes GetHostKeyRequest and TimedReportRequest.
API_LEVEL_POLICY = 3


def _key(v: Any) -> bytes | None:
    if v is None:
        return None
    if type(v) is not bytes:
        raise _Malformed(f"key must be bytes or nil, got {type(v).__name__}")
    if len(v) > MAX_KEY:
        raise _Invalid(f"key longer than {MAX_KEY} bytes: {len(v)}")
    return v


def _latency(v: Any) -> int | None:
    return None if v is None else _int(v, UINT32_MAX, "latency_us")


def _timed_reports(v: Any) -> tuple[tuple[Any, ...], ...]:
    out: list[tuple[Any, ...]] = []
    for item in _array(v, None, "reports"):
        if type(item) is tuple and len(item) == 6:
            out.append((*_reports((item[:5],))[0], _latency(item[5])))
        else:
            out.append(_reports((item,))[0])
    return tuple(out)


@_register
@attrs.frozen
class GetHostKeyRequest(Message):
    """Client -> agent: a get_host with the caller's ``key`` for the hash policy (nil: none),
    carrying the client's pending reports like GetHostReportRequest, each ``(modid, cmdid,
    ip, port, retcode)`` or with a sixth field, the call's latency in microseconds (nil:
    unknown). Answered by a GetHostResponse. Sent only to agents whose ``api_level`` is at
    least 3 (API_LEVEL_POLICY)."""

    TYPE = 17
    seq: int
    modid: int
    cmdid: int
    key: bytes | None
    reports: tuple[tuple[Any, ...], ...]
    _FIELDS = (_seq, _modid, _cmdid, _key, _timed_reports)


@_register
@attrs.frozen
class TimedReportRequest(Message):
    """Client -> agent: a ReportRequest with the call's latency in microseconds (for the
    p2c policy). No reply. Sent only to agents whose ``api_level`` is at least 3."""

    TYPE = 18
    modid: int
    cmdid: int
    host: HostKey
    retcode: int
    latency_us: int
    _FIELDS = (_modid, _cmdid, _host, _u32("retcode"), _u32("latency_us"))


@_register
@attrs.frozen
class DnsState(Message):
    """DNS -> agent: whether the routes it serves may be out of date. ``stale`` is 1 when
    its store has been unreachable for longer than its ``stale_after`` (``store_age``
    seconds since its last good read, ``version`` the route version it serves), 0 when it
    reads its store again. Sent when the state changes, and at once to a connection that
    arrives while stale; an agent with another DNS that is not stale moves there.
    (Agents before it take the unknown frame as a reason to reconnect: they fail over too.)"""

    TYPE = 20
    stale: int
    store_age: int
    version: int
    _FIELDS = (_u32("stale"), _u32("store_age"), _u64("version"))


@_register
@attrs.frozen
class ShrinkConfirm(Message):
    """Admin -> DNS (`lars route confirm`): serve the reload held by the shrink guard now
    (DESIGN §13). ``version``: the held route version the admin saw (0: whatever is held);
    a DNS holding another version releases nothing. Answered by a StatsResponse with the
    DNS's counters after it (``shrink_held`` 0 once released, ``route_version``)."""

    TYPE = 21
    seq: int
    version: int
    _FIELDS = (_seq, _u64("version"))


# --- self-registration (DESIGN §14) ---------------------------------------------------------


def _reg_ip(v: Any) -> int:
    return _int(v, UINT32_MAX, "ip")


def _reg_weight(v: Any) -> int:
    return _int(v, WEIGHT_MAX, "weight", lo=-1)


def _opt_zone(v: Any) -> str | None:
    if v is None:
        return None
    zone = _str(v)
    if len(zone) > ZONE_MAX_LENGTH:
        raise _Invalid(f"zone longer than {ZONE_MAX_LENGTH} characters")
    return zone


def _ttl(v: Any) -> int:
    return _int(v, TTL_MAX, "ttl", lo=TTL_MIN)


def _drain_ms(v: Any) -> int:
    return _int(v, DRAIN_MAX_MS, "drain_ms")


#: Most leases or drops one LeaseUpdate carries (an agent sends more in several frames).
MAX_LEASE_ITEMS = 1024


class _HostItem:
    """What a Lease and a Drop share: the module and host they are about."""

    modid: int
    cmdid: int
    ip: int
    port: int

    @property
    def module(self) -> tuple[int, int]:
        return self.modid, self.cmdid

    @property
    def host(self) -> HostKey:
        return self.ip, self.port


@attrs.frozen
class Lease(_HostItem):
    """One registration as an agent holds it and heartbeats it to the DNS.

    ``weight`` -1: none given (a new row takes DEFAULT_WEIGHT, a static row keeps its own);
    ``zone`` None: likewise. ``age_ms``: how long ago the registering client last renewed
    it, so the DNS dates the lease from the client, not from the agent's batching."""

    modid: int
    cmdid: int
    ip: int
    port: int
    weight: int
    zone: str | None
    ttl: int
    age_ms: int


@attrs.frozen
class Drop(_HostItem):
    """One deregistration: drain the host (weight 0) now and remove it after ``drain_ms``."""

    modid: int
    cmdid: int
    ip: int
    port: int
    drain_ms: int


def _leases(v: Any) -> tuple[Lease, ...]:
    items = _array(v, None, "leases")
    if len(items) > MAX_LEASE_ITEMS:
        raise _Invalid(f"more than {MAX_LEASE_ITEMS} leases in one update")
    out = []
    for item in items:
        modid, cmdid, ip, port, weight, zone, ttl, age = _array(item, 8, "lease")
        out.append(
            Lease(
                _modid(modid),
                _cmdid(cmdid),
                _reg_ip(ip),
                _port(port),
                _reg_weight(weight),
                _opt_zone(zone),
                _ttl(ttl),
                _int(age, UINT32_MAX, "age_ms"),
            )
        )
    return tuple(out)


def _drops(v: Any) -> tuple[Drop, ...]:
    items = _array(v, None, "drops")
    if len(items) > MAX_LEASE_ITEMS:
        raise _Invalid(f"more than {MAX_LEASE_ITEMS} drops in one update")
    out = []
    for item in items:
        modid, cmdid, ip, port, drain = _array(item, 5, "drop")
        out.append(
            Drop(
                _modid(modid),
                _cmdid(cmdid),
                _reg_ip(ip),
                _port(port),
                _drain_ms(drain),
            )
        )
    return tuple(out)


def _errors(v: Any) -> tuple[tuple[int, str], ...]:
    return tuple(
        (_int(index, UINT32_MAX, "index"), _str(reason))
        for index, reason in (_array(item, 2, "error") for item in _array(v, None, "errors"))
    )


@_register
@attrs.frozen
class RegisterRequest(Message):
    """Client -> agent (UDP): register this host for the module, or renew the registration
    (the same request again, every ttl/3). ``ip`` 0: the agent's own address. ``weight``
    -1 and ``zone`` nil: not given. Answered by a RegisterReply once the DNS has taken a
    new registration (a renewal is answered at once). Agents from API_LEVEL_REGISTER."""

    TYPE = 22
    seq: int
    modid: int
    cmdid: int
    ip: int
    port: int
    weight: int
    zone: str | None
    ttl: int
    _FIELDS = (_seq, _modid, _cmdid, _reg_ip, _port, _reg_weight, _opt_zone, _ttl)


@_register
@attrs.frozen
class DeregisterRequest(Message):
    """Client -> agent (UDP): end this registration. The DNS drains the host (weight 0)
    at once and removes it after ``drain_ms``. Answered by a RegisterReply."""

    TYPE = 23
    seq: int
    modid: int
    cmdid: int
    ip: int
    port: int
    drain_ms: int
    _FIELDS = (_seq, _modid, _cmdid, _reg_ip, _port, _drain_ms)


@_register
@attrs.frozen
class RegisterReply(Message):
    """Agent -> client: ``retcode`` SUCC, or BAD_REQUEST / SYSTEM_ERROR with ``reason``;
    ``ip`` the address registered (the agent's own when the request said 0)."""

    TYPE = 24
    seq: int
    retcode: int
    ip: int
    reason: str
    _FIELDS = (_seq, _retcode, _reg_ip, _str)


@_register
@attrs.frozen
class LeaseUpdate(Message):
    """Agent -> DNS (its route session): registrations, new or renewed, and deregistrations,
    batched. On a new session an agent sends every registration it holds. Answered by a
    LeaseReply with the same ``seq``."""

    TYPE = 25
    seq: int
    leases: tuple[Lease, ...]
    drops: tuple[Drop, ...]
    _FIELDS = (_seq, _leases, _drops)

    def _values(self) -> tuple[Any, ...]:
        return (
            self.seq,
            [attrs.astuple(lease) for lease in self.leases],
            [attrs.astuple(drop) for drop in self.drops],
        )


@_register
@attrs.frozen
class LeaseReply(Message):
    """DNS -> agent: the LeaseUpdate ``seq`` is stored. ``retcode`` SYSTEM_ERROR: nothing
    was (store unavailable; the agent sends it again). ``errors``: ``(index, reason)`` of
    items refused, counting leases first and then drops; the others were stored."""

    TYPE = 26
    seq: int
    retcode: int
    errors: tuple[tuple[int, str], ...]
    _FIELDS = (_seq, _retcode, _errors)


#: The agent API level that takes RegisterRequest and DeregisterRequest.
API_LEVEL_REGISTER = 4


#: Message types whose first field is a sequence number, echoed in the reply.
_SEQ_FIRST = frozenset(
    t
    for t, cls in _REGISTRY.items()
    if attrs.fields(cls)[0].name == "seq"  # type: ignore[arg-type]
)


# --- encoding --------------------------------------------------------------------------------


def encode_body(msg: Message) -> bytes:
    """Encode a message as a msgpack array (the datagram / frame body)."""
    body: bytes = _packb([msg.TYPE, *msg._values()])
    return body


def encode_datagram(msg: Message, max_size: int = DEFAULT_MAX_DATAGRAM) -> bytes:
    """Encode a message for one UDP datagram; raises ProtocolError if it would not fit."""
    body = encode_body(msg)
    if len(body) > max_size:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the datagram limit {max_size}")
    return body


def encode_frame(msg: Message, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode a message as one TCP frame (length header + body)."""
    body = encode_body(msg)
    if len(body) > max_size:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the frame limit {max_size}")
    return _header.pack(len(body)) + body


# --- decoding --------------------------------------------------------------------------------


# --- the hot path ----------------------------------------------------------------------------
# The three messages of every client loop, encoded straight from their fields: the same bytes
# as encode_datagram(Message(...)) (the tests check it), without building an object.


def encode_get_host_request(seq: int, modid: int, cmdid: int) -> bytes:
    """``encode_datagram(GetHostRequest(seq, modid, cmdid))``."""
    data: bytes = _packb((4, seq, modid, cmdid))
    return data


def encode_get_host_response(
    seq: int, modid: int, cmdid: int, retcode: int, host: HostKey | None
) -> bytes:
    """``encode_datagram(GetHostResponse(seq, modid, cmdid, retcode, host))``."""
    data: bytes = _packb((5, seq, modid, cmdid, retcode, host))
    return data


def encode_get_host_report_request(
    seq: int, modid: int, cmdid: int, reports: list[tuple[int, int, int, int, int]]
) -> bytes:
    """``encode_datagram(GetHostReportRequest(seq, modid, cmdid, reports))``."""
    data: bytes = _packb((16, seq, modid, cmdid, reports))
    return data


def encode_report_request(modid: int, cmdid: int, host: HostKey, retcode: int) -> bytes:
    """``encode_datagram(ReportRequest(modid, cmdid, host, retcode))``."""
    data: bytes = _packb((6, modid, cmdid, host, retcode))
    return data


def encode_get_host_key_request(
    seq: int, modid: int, cmdid: int, key: bytes | None, reports: list[tuple[Any, ...]]
) -> bytes:
    """``encode_datagram(GetHostKeyRequest(seq, modid, cmdid, key, reports))``."""
    data: bytes = _packb((17, seq, modid, cmdid, key, reports))
    return data


def encode_timed_report_request(
    modid: int, cmdid: int, host: HostKey, retcode: int, latency_us: int
) -> bytes:
    """``encode_datagram(TimedReportRequest(modid, cmdid, host, retcode, latency_us))``."""
    data: bytes = _packb((18, modid, cmdid, host, retcode, latency_us))
    return data


def decode_agent_request(data: bytes) -> tuple[Any, ...] | Message:
    """Decode a datagram sent to the agent, with a fast path for the two messages of every
    client loop: a valid GetHostRequest comes back as the tuple ``(4, seq, modid, cmdid)``
    and a valid ReportRequest as ``(6, modid, cmdid, (ip, port), retcode)``, validated
    exactly as :func:`decode_datagram` validates them (the tests compare the two); a valid
    GetHostReportRequest comes back as ``(16, seq, modid, cmdid, reports)`` and a valid
    GetHostKeyRequest as ``(17, seq, modid, cmdid, key, reports)``. Anything
    else comes back as a :class:`Message`. Raises :class:`ProtocolError` and nothing else.
    """
    try:
        obj = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a dozen kinds; all mean "malformed"
        raise _unpack_error(exc) from None
    if type(obj) is tuple:
        size = len(obj)
        if size == 4 and obj[0] == 4 and type(obj[0]) is int:
            _, seq, modid, cmdid = obj
            if (
                type(seq) is int
                and type(modid) is int
                and type(cmdid) is int
                and 0 <= seq <= UINT32_MAX
                and 0 <= modid <= UINT32_MAX
                and 0 <= cmdid <= UINT32_MAX
            ):
                return obj
        elif size == 5 and obj[0] == 6 and type(obj[0]) is int:
            _, modid, cmdid, host, retcode = obj
            if (
                type(modid) is int
                and type(cmdid) is int
                and type(retcode) is int
                and type(host) is tuple
                and len(host) == 2
                and type(host[0]) is int
                and type(host[1]) is int
                and 0 <= modid <= UINT32_MAX
                and 0 <= cmdid <= UINT32_MAX
                and 0 <= retcode <= UINT32_MAX
                and 0 <= host[0] <= UINT32_MAX
                and 1 <= host[1] <= PORT_MAX
            ):
                return obj
        elif size == 5 and obj[0] == 16 and type(obj[0]) is int:
            _, seq, modid, cmdid, reports = obj
            if (
                type(seq) is int
                and type(modid) is int
                and type(cmdid) is int
                and 0 <= seq <= UINT32_MAX
                and 0 <= modid <= UINT32_MAX
                and 0 <= cmdid <= UINT32_MAX
                and type(reports) is tuple
                and all(_valid_report(report) for report in reports)
            ):
                return obj
        elif size == 6 and obj[0] == 17 and type(obj[0]) is int:
            _, seq, modid, cmdid, key, reports = obj
            if (
                type(seq) is int
                and type(modid) is int
                and type(cmdid) is int
                and 0 <= seq <= UINT32_MAX
                and 0 <= modid <= UINT32_MAX
                and 0 <= cmdid <= UINT32_MAX
                and (key is None or (type(key) is bytes and len(key) <= MAX_KEY))
                and type(reports) is tuple
                and all(_valid_timed_report(report) for report in reports)
            ):
                return obj
    return decode_object(obj)  # the general path; it also names what is wrong


def _valid_report(report: Any) -> bool:
    """One ``(modid, cmdid, ip, port, retcode)`` of a GetHostReportRequest, as _reports
    takes it (for the fast path; the general path names what is wrong)."""
    return type(report) is tuple and len(report) == 5 and _valid_timed_report(report)


def _valid_timed_report(report: Any) -> bool:
    """One report of a GetHostKeyRequest: as _valid_report, or with a sixth field, the
    latency (nil or a uint32)."""
    if type(report) is not tuple:
        return False
    size = len(report)
    if size == 6:
        modid, cmdid, ip, port, retcode, latency = report
        if latency is not None and (type(latency) is not int or not 0 <= latency <= UINT32_MAX):
            return False
    elif size == 5:
        modid, cmdid, ip, port, retcode = report
    else:
        return False
    return (
        type(modid) is int
        and type(cmdid) is int
        and type(ip) is int
        and type(port) is int
        and type(retcode) is int
        and 0 <= modid <= UINT32_MAX
        and 0 <= cmdid <= UINT32_MAX
        and 0 <= ip <= UINT32_MAX
        and 1 <= port <= PORT_MAX
        and 0 <= retcode <= UINT32_MAX
    )


def peek_seq(data: bytes) -> int | None:
    """The sequence number of a request datagram, if it has a readable one: for answering
    a request that could not be handled with an error naming it. Never raises."""
    try:
        obj = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except Exception:  # not msgpack: no seq to answer
        return None
    if type(obj) is not tuple or len(obj) < 2 or type(obj[0]) is not int:
        return None
    if obj[0] not in _SEQ_FIRST:
        return None
    seq = obj[1]
    return seq if type(seq) is int and 0 <= seq <= UINT32_MAX else None


def decode_body(body: bytes | bytearray | memoryview) -> Message:
    """Decode one message body. Raises :class:`ProtocolError` and nothing else."""
    try:
        obj = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a dozen kinds; all mean "malformed"
        raise _unpack_error(exc) from None
    return decode_object(obj)


def decode_object(obj: Any) -> Message:
    """Turn an already unpacked msgpack value into a message (see :func:`decode_body`)."""
    if type(obj) is not tuple or not obj:
        raise ProtocolError("a message must be a non-empty array")
    msg_type = obj[0]
    cls = _REGISTRY.get(msg_type) if type(msg_type) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    checks = cls._FIELDS
    nfields = len(obj) - 1
    if not len(checks) - cls._ADDED <= nfields <= len(checks):
        raise ProtocolError(f"{cls.__name__} takes {_field_count(cls)} fields, got {nfields}")
    seq = None
    if msg_type in _SEQ_FIRST and type(obj[1]) is int and 0 <= obj[1] <= UINT32_MAX:
        seq = obj[1]
    if cls._UINT32:  # the hot requests: every field an unsigned 32-bit integer
        fields = obj[1:]
        for value, name in zip(fields, cls._UINT32):  # noqa: B905 (trailing fields may lack)
            if type(value) is not int:
                raise ProtocolError(f"{cls.__name__}: malformed: {name} must be an integer")
            if not 0 <= value <= UINT32_MAX:
                raise ProtocolError(
                    f"{cls.__name__}: {name} out of range: {value}", msg_type=msg_type, seq=seq
                )
        return cls(*fields)
    try:
        values = [check(value) for check, value in zip(checks, obj[1:])]  # noqa: B905
    except _Invalid as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}", msg_type=msg_type, seq=seq) from None
    except (_Malformed, ValueError, TypeError) as exc:
        raise ProtocolError(f"{cls.__name__}: malformed: {exc}") from None
    return cls(*values)


def _field_count(cls: type[Message]) -> str:
    """How many fields a message takes, for errors: "3" or "3 to 4"."""
    most = len(cls._FIELDS)
    return f"{most - cls._ADDED} to {most}" if cls._ADDED else str(most)


_UNPACK_ERRORS = {
    "FormatError": "a byte that starts no msgpack value",
    "StackError": "nested too deeply",
    "OutOfData": "truncated",
}


def _unpack_error(exc: Exception) -> ProtocolError:
    """The ProtocolError for bytes msgpack could not unpack (some of its errors carry no
    message: say what they mean)."""
    detail = str(exc) or _UNPACK_ERRORS.get(type(exc).__name__, type(exc).__name__)
    return ProtocolError(f"not a msgpack message: {detail}")


def decode_datagram(data: bytes | bytearray | memoryview) -> Message:
    """Decode one UDP datagram. Raises :class:`ProtocolError` and nothing else."""
    return decode_body(data)


class FrameDecoder:
    """Incremental TCP frame decoder: feed bytes in, take messages out.

    The length header is checked against ``max_frame`` as soon as it arrives, before any of
    the body is buffered. After a :class:`ProtocolError` the stream is unusable (the framing is
    lost): the caller closes the connection.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame in progress

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived (the length header alone counts: it is
        consumed before its body comes)."""
        return bool(self._buf) or self._need is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes."""
        self._buf += data

    def _next_body(self) -> bytes | None:
        buf = self._buf
        if self._need is None:
            if len(buf) < HEADER_SIZE:
                return None
            (length,) = _header.unpack_from(buf)
            if length == 0:
                raise ProtocolError("empty frame")
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit {self.max_frame}")
            del buf[:HEADER_SIZE]
            self._need = length
        need = self._need
        if len(buf) < need:
            return None
        body = bytes(buf[:need])
        del buf[:need]
        self._need = None
        return body

    def __iter__(self) -> Iterator[Message]:
        """Yield every complete message buffered so far."""
        while (body := self._next_body()) is not None:
            yield decode_body(body)
