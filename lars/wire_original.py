"""The original Lars wire protocol (aceld/Lars): an 8-byte header and a protobuf body.
Sans-IO, no trio, no protobuf library: a codec written by hand from the format of the
original's ``lars.proto``, for exactly the messages Lars speaks with original peers.

Lars's own protocol is msgpack (:mod:`lars.wire`). This one lets the original's compiled
services (its ``lars_api``) and agents (``lars_lb_agent``) work against Lars unchanged.

**Framing.** Every message, one per UDP datagram or back to back on TCP, is::

    msgid   int32, little-endian (the original writes its native struct on x86)
    msglen  int32, little-endian: the body's length
    body    msglen bytes: one protobuf message, its type given by msgid

**Messages** (field numbers and types as in the original's ``lars.proto``)::

    1 GetRouteRequest      agent -> DNS (TCP)     1 modid int32, 2 cmdid int32
    2 GetRouteResponse     DNS -> agent, answer   1 modid, 2 cmdid, 3 repeated HostInfo host
                           and push (TCP)
    3 ReportStatusRequest  agent -> reporter      1 modid, 2 cmdid, 3 caller int32,
                           (TCP; no ack)          4 repeated HostCallResult results, 5 ts uint32
    4 GetHostRequest       API -> agent (UDP)     1 seq uint32, 2 modid, 3 cmdid
    5 GetHostResponse      agent -> API           1 seq, 2 modid, 3 cmdid, 4 retcode int32,
                                                  5 HostInfo host (absent unless retcode 0)
    6 ReportRequest        API -> agent           1 modid, 2 cmdid, 3 HostInfo host, 4 retcode
    7 API GetRouteRequest  API -> agent           the body of GetRouteRequest
    8 API GetRouteResponse agent -> API           the body of GetRouteResponse (no retcode:
                                                  an unknown module is an empty route)
    HostInfo               1 ip int32, 2 port int32
    HostCallResult         1 ip int32, 2 port int32, 3 succ uint32, 4 err uint32, 5 overload bool

**Values.** Module ids, IP addresses and callers are Lars's unsigned 32-bit integers (an IP
in host order, as ``RouteData.serverip``) carried in the original's int32 fields: the same
32 bits. Decoding takes the low 32 bits of the varint; encoding writes a value of 2**31 or
more as the negative int32 it is, which protobuf sign-extends to a ten-byte varint.

**Protobuf, as the reference implementation parses it.** Fields in any order; the last
occurrence of a scalar wins; a submessage that occurs twice is merged; unknown fields are
skipped, and so is a known field number with another wire type; groups are skipped, nested
up to the library's recursion limit of 100 (a submessage counts as one level). Malformed,
and so :class:`~lars.errors.ProtocolError`: a truncated field; a varint over ten bytes, a
tag or length over five; a tag of 2**32 or more; field number 0 (except inside a group,
where the library lets it pass); wire type 6 or 7; an end-group without its start (or of
another field); a length past the end. ``tests/test_wire_original`` checks every rule
against the protobuf library on random bytes. Encoding writes the fields in field-number
order and leaves out zeros and absent submessages, as protobuf's serializer does, so that
the bytes are the library's bytes.

**Mapped onto Lars's messages.** :func:`decode_body` returns the :mod:`lars.wire` message of
the same id (``wire.GetHostRequest`` for 4, ...); fields the original lacks take fixed
values: ``seq`` 0 on 3, 7 and 8, ``retcode`` SUCC on 8. A value Lars cannot take (a port
outside 1..65535, a retcode over 255) raises ProtocolError with ``msg_type`` set, as
:mod:`lars.wire` does for a well-formed request with invalid values. :func:`encode_body`
is the reverse and refuses what the original's fields cannot carry (a count over 2**32-1).

Anything that cannot be decoded raises :class:`~lars.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator
from typing import Any

from lars import wire
from lars.core.model import PORT_MAX, UINT32_MAX, HostKey
from lars.errors import ProtocolError

__all__ = [
    "API_GET_ROUTE_REQUEST",
    "API_GET_ROUTE_RESPONSE",
    "GET_HOST_REQUEST",
    "GET_HOST_RESPONSE",
    "GET_ROUTE_REQUEST",
    "GET_ROUTE_RESPONSE",
    "HEADER_SIZE",
    "MAX_BODY",
    "MESSAGE_NAMES",
    "REPORT_REQUEST",
    "REPORT_STATUS_REQUEST",
    "FrameDecoder",
    "decode_agent_request",
    "decode_body",
    "decode_datagram",
    "encode",
    "encode_api_route_response",
    "encode_body",
    "encode_get_host_response",
    "is_original_datagram",
    "parse_body",
    "sniff_stream",
    "system_error_reply",
]

GET_ROUTE_REQUEST = 1
GET_ROUTE_RESPONSE = 2
REPORT_STATUS_REQUEST = 3
GET_HOST_REQUEST = 4
GET_HOST_RESPONSE = 5
REPORT_REQUEST = 6
API_GET_ROUTE_REQUEST = 7
API_GET_ROUTE_RESPONSE = 8

#: Message names by id, for logs.
MESSAGE_NAMES = {
    GET_ROUTE_REQUEST: "GetRouteRequest",
    GET_ROUTE_RESPONSE: "GetRouteResponse",
    REPORT_STATUS_REQUEST: "ReportStatusRequest",
    GET_HOST_REQUEST: "GetHostRequest",
    GET_HOST_RESPONSE: "GetHostResponse",
    REPORT_REQUEST: "ReportRequest",
    API_GET_ROUTE_REQUEST: "API GetRouteRequest",
    API_GET_ROUTE_RESPONSE: "API GetRouteResponse",
}

HEADER_SIZE = 8
_header = struct.Struct("<ii")
#: The original's largest body (its MESSAGE_LENGTH_LIMIT, 65535 - 8): its UDP server drops a
#: longer datagram and its TCP server closes the connection.
MAX_BODY = 65535 - HEADER_SIZE
#: Largest UDP payload over IPv4.
_MAX_DATAGRAM = 65507

#: Datagrams that compare below this are in the original format (see is_original_datagram).
_ORIGINAL_BELOW = b"\x09"

_U64 = (1 << 64) - 1
_INT32_NEGATIVE = 0xFFFF_FFFF_0000_0000  # the sign extension of a negative int32 to 64 bits
#: The library's recursion limit: submessages and groups nested in one message.
_MAX_DEPTH = 100

# --- the protobuf layer ----------------------------------------------------------------------
# A message's spec lists its fields' kinds in field-number order (1, 2, ...). parse_body
# returns a message as a list of its fields' values in that order: int32 and uint32 as their
# low 32 bits (unsigned), bool as a bool, a submessage as a list (None if absent), a
# repeated submessage as a list of lists.

_INT32 = 0
_UINT32 = 1
_BOOL = 2
_MESSAGE = 3
_REPEATED = 4


class _Spec:
    """One message type: its fields' kinds, their defaults, and each field's expected tag."""

    __slots__ = ("by_tag", "defaults", "kinds", "repeated")

    def __init__(self, *kinds: Any) -> None:
        #: Per field: _INT32, _UINT32, _BOOL, or (_MESSAGE or _REPEATED, the submessage).
        self.kinds = kinds
        defaults: list[Any] = []
        #: tag (number << 3 | wire type) -> (field index, kind, submessage spec)
        self.by_tag: dict[int, tuple[int, int, _Spec | None]] = {}
        for index, kind in enumerate(kinds):
            number = index + 1
            if type(kind) is tuple:
                self.by_tag[number << 3 | 2] = (index, kind[0], kind[1])
                defaults.append(None)
            else:
                self.by_tag[number << 3] = (index, kind, None)
                defaults.append(False if kind == _BOOL else 0)
        self.defaults = tuple(defaults)
        self.repeated = tuple(i for i, k in enumerate(kinds) if type(k) is tuple and k[0] == 4)


_HOST_INFO = _Spec(_INT32, _INT32)
_HOST_CALL_RESULT = _Spec(_INT32, _INT32, _UINT32, _UINT32, _BOOL)
_ROUTE_REQUEST = _Spec(_INT32, _INT32)
_ROUTE_RESPONSE = _Spec(_INT32, _INT32, (_REPEATED, _HOST_INFO))
_SPECS: dict[int, _Spec] = {
    GET_ROUTE_REQUEST: _ROUTE_REQUEST,
    GET_ROUTE_RESPONSE: _ROUTE_RESPONSE,
    REPORT_STATUS_REQUEST: _Spec(_INT32, _INT32, _INT32, (_REPEATED, _HOST_CALL_RESULT), _UINT32),
    GET_HOST_REQUEST: _Spec(_UINT32, _INT32, _INT32),
    GET_HOST_RESPONSE: _Spec(_UINT32, _INT32, _INT32, _INT32, (_MESSAGE, _HOST_INFO)),
    REPORT_REQUEST: _Spec(_INT32, _INT32, (_MESSAGE, _HOST_INFO), _INT32),
    API_GET_ROUTE_REQUEST: _ROUTE_REQUEST,
    API_GET_ROUTE_RESPONSE: _ROUTE_RESPONSE,
}


class _Malformed(Exception):
    """Bytes that are no protobuf message (turned into ProtocolError at the surface)."""


def _varint(buf: bytes, pos: int, end: int, most: int = 10) -> tuple[int, int]:
    """The varint at ``pos`` (at most ``most`` bytes; bits past 64 dropped) and the position
    after it."""
    limit = pos + most
    value = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value & _U64 if shift > 56 else value), pos
        if pos == limit:
            raise _Malformed(f"varint longer than {most} bytes")
        shift += 7
    raise _Malformed("truncated varint")


def _tag(buf: bytes, pos: int, end: int, in_group: bool = False) -> tuple[int, int, int]:
    """``(field number, wire type, position after the tag)``. Field number 0 is malformed,
    except inside a group (where the library lets it pass)."""
    byte = buf[pos]
    if byte < 0x80:
        tag, pos = byte, pos + 1
    else:
        tag, pos = _varint(buf, pos, end, 5)
        if tag > UINT32_MAX:
            raise _Malformed("tag of 2**32 or more")
    number = tag >> 3
    if number == 0 and not in_group:
        raise _Malformed("field number 0")
    return number, tag & 7, pos


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length-delimited field's ``(start, end)``."""
    byte = buf[pos] if pos < end else 0x80
    if byte < 0x80:
        length, pos = byte, pos + 1
    else:
        length, pos = _varint(buf, pos, end, 5)
    if length > end - pos:
        raise _Malformed(f"a length of {length} past the end")
    return pos, pos + length


def _skip(buf: bytes, pos: int, end: int, number: int, wire_type: int, depth: int) -> int:
    """Skip the value of an unknown field (or one with an unexpected wire type)."""
    if wire_type == 0:
        return _varint(buf, pos, end)[1]
    if wire_type == 2:
        return _length(buf, pos, end)[1]
    if wire_type == 1 or wire_type == 5:
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise _Malformed("truncated fixed-size field")
        return pos
    if wire_type == 3:
        if depth < 1:
            raise _Malformed("nested too deeply")
        while True:
            if pos >= end:
                raise _Malformed("group without its end")
            inner, inner_type, pos = _tag(buf, pos, end, in_group=True)
            if inner_type == 4:
                if inner != number:
                    raise _Malformed(f"group {number} ended by the end of {inner}")
                return pos
            pos = _skip(buf, pos, end, inner, inner_type, depth - 1)
    if wire_type == 4:
        raise _Malformed(f"end of group {number} without its start")
    raise _Malformed(f"wire type {wire_type}")


def _parse(
    buf: bytes, pos: int, end: int, spec: _Spec, depth: int, into: list[Any] | None = None
) -> list[Any]:
    """Parse ``buf[pos:end]`` as a message of ``spec`` (into an earlier occurrence: merged).
    ``depth``: how many more submessages and groups may nest."""
    values = list(spec.defaults) if into is None else into
    by_tag = spec.by_tag
    while pos < end:
        entry = by_tag.get(buf[pos])  # every known field has a one-byte tag
        if entry is None:  # unknown, another wire type, or a tag in more bytes than needed
            number, wire_type, pos = _tag(buf, pos, end)
            entry = by_tag.get(number << 3 | wire_type)
            if entry is None:
                pos = _skip(buf, pos, end, number, wire_type, depth)
                continue
        else:
            pos += 1
        index, kind, sub = entry
        if kind <= _UINT32:
            byte = buf[pos] if pos < end else 0x80
            if byte < 0x80:
                values[index] = byte
                pos += 1
            elif pos + 1 < end and buf[pos + 1] < 0x80:  # two bytes: ports, small ids
                values[index] = byte & 0x7F | buf[pos + 1] << 7
                pos += 2
            else:
                value, pos = _varint(buf, pos, end)
                values[index] = value & UINT32_MAX
        elif kind == _BOOL:
            value, pos = _varint(buf, pos, end)
            values[index] = value != 0
        else:
            assert sub is not None
            start, pos = _length(buf, pos, end)
            if depth < 1:
                raise _Malformed("nested too deeply")
            if kind == _MESSAGE:
                values[index] = _parse(buf, start, pos, sub, depth - 1, values[index])
            elif values[index] is None:
                values[index] = [_parse(buf, start, pos, sub, depth - 1)]
            else:
                values[index].append(_parse(buf, start, pos, sub, depth - 1))
    for index in spec.repeated:
        if values[index] is None:
            values[index] = []
    return values


def parse_body(msgid: int, body: bytes | bytearray | memoryview) -> list[Any]:
    """The protobuf fields of a body of message ``msgid`` (the layer under
    :func:`decode_body`: values as the library parses them, ids and IPs as their low 32 bits,
    nothing checked beyond the format). Raises :class:`ProtocolError`."""
    spec = _SPECS.get(msgid)
    if spec is None:
        raise ProtocolError(f"unknown original message id {msgid}")
    data = bytes(body)
    try:
        return _parse(data, 0, len(data), spec, _MAX_DEPTH)
    except _Malformed as exc:
        raise ProtocolError(f"original {MESSAGE_NAMES[msgid]}: malformed: {exc}") from None


# --- Lars's messages -------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _host(values: list[Any] | None) -> HostKey:
    ip, port = values if values is not None else (0, 0)
    if not 1 <= port <= PORT_MAX:
        raise _Invalid(f"port out of range: {_signed(port)}")
    return ip, port


def _signed(value: int) -> int:
    """An int32 field's value as the original sees it (for messages)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _to_message(msgid: int, f: list[Any]) -> wire.Message:
    if msgid == GET_ROUTE_REQUEST:
        return wire.GetRouteRequest(f[0], f[1])
    if msgid == API_GET_ROUTE_REQUEST:
        return wire.ApiGetRouteRequest(0, f[0], f[1])
    if msgid == GET_HOST_REQUEST:
        return wire.GetHostRequest(f[0], f[1], f[2])
    if msgid == REPORT_REQUEST:
        return wire.ReportRequest(f[0], f[1], _host(f[2]), f[3])
    if msgid in (GET_ROUTE_RESPONSE, API_GET_ROUTE_RESPONSE):
        hosts = tuple(_host(h) for h in f[2])
        if msgid == GET_ROUTE_RESPONSE:
            return wire.GetRouteResponse(f[0], f[1], hosts)
        return wire.ApiGetRouteResponse(0, f[0], f[1], wire.RetCode.SUCC, hosts)
    if msgid == GET_HOST_RESPONSE:
        if f[3] > 255:
            raise _Invalid(f"retcode out of range: {_signed(f[3])}")
        return wire.GetHostResponse(f[0], f[1], f[2], f[3], None if f[4] is None else _host(f[4]))
    assert msgid == REPORT_STATUS_REQUEST
    results = []
    for ip, port, succ, err, overload in f[3]:
        results.append(wire.HostResult(*_host([ip, port]), succ, err, overload))
    return wire.ReportStatusRequest(f[0], f[1], f[2], tuple(results), f[4], 0)


def decode_body(msgid: int, body: bytes | bytearray | memoryview) -> wire.Message:
    """The Lars message of a body of message ``msgid``. Raises :class:`ProtocolError` and
    nothing else: with ``msg_type`` (and ``seq`` for 4) set when the body is well-formed
    protobuf and a value is out of Lars's range."""
    fields = parse_body(msgid, body)
    try:
        return _to_message(msgid, fields)
    except _Invalid as exc:
        seq = fields[0] if msgid == GET_HOST_REQUEST else None
        raise ProtocolError(
            f"original {MESSAGE_NAMES[msgid]}: {exc}", msg_type=msgid, seq=seq
        ) from None


def decode_datagram(data: bytes | bytearray | memoryview) -> wire.Message:
    """Decode one datagram: the header, a ``msglen`` equal to what follows it, the body."""
    msgid, start = _datagram_header(data)
    return decode_body(msgid, memoryview(data)[start:])


def _datagram_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"original datagram of {len(data)} bytes: shorter than its header")
    msgid, msglen = _header.unpack_from(data)
    if msglen != len(data) - HEADER_SIZE:
        raise ProtocolError(
            f"original datagram: msglen {msglen} but {len(data) - HEADER_SIZE} bytes of body"
        )
    if msgid not in _SPECS:
        raise ProtocolError(f"original datagram: unknown message id {msgid}")
    return msgid, HEADER_SIZE


# --- encoding --------------------------------------------------------------------------------


def _varint_bytes(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def _int32_bytes(value: int) -> bytes:
    """A uint32 as the int32 with the same bits (ten bytes when negative)."""
    if value < 0x80:
        return _SMALL[value]
    return _varint_bytes(value | _INT32_NEGATIVE if value >= 1 << 31 else value)


def _encode(spec: _Spec, values: tuple[Any, ...] | list[Any]) -> bytes:
    out = bytearray()
    for number, (kind, value) in enumerate(zip(spec.kinds, values, strict=True), 1):
        if kind in (_INT32, _UINT32):
            if value:
                out.append(number << 3)
                out += _int32_bytes(value) if kind == _INT32 else _varint_bytes(value)
        elif kind == _BOOL:
            if value:
                out.append(number << 3)
                out.append(1)
        else:
            items = value if kind[0] == _REPEATED else () if value is None else (value,)
            for item in items:
                body = _encode(kind[1], item)
                out.append(number << 3 | 2)
                out += _varint_bytes(len(body))
                out += body
    return bytes(out)


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= UINT32_MAX:
        raise ProtocolError(f"{what} {value} does not fit the original's 32-bit field")
    return value


def _fields(msg: wire.Message) -> tuple[int, tuple[Any, ...]]:
    """``(msgid, field values)`` of a Lars message in the original's layout."""
    if isinstance(msg, wire.GetRouteRequest):
        return GET_ROUTE_REQUEST, (msg.modid, msg.cmdid)
    if isinstance(msg, wire.ApiGetRouteRequest):
        return API_GET_ROUTE_REQUEST, (msg.modid, msg.cmdid)
    if isinstance(msg, wire.GetRouteResponse | wire.ApiGetRouteResponse):
        response = isinstance(msg, wire.GetRouteResponse)
        msgid = GET_ROUTE_RESPONSE if response else API_GET_ROUTE_RESPONSE
        return msgid, (msg.modid, msg.cmdid, msg.hosts)
    if isinstance(msg, wire.GetHostRequest):
        return GET_HOST_REQUEST, (msg.seq, msg.modid, msg.cmdid)
    if isinstance(msg, wire.GetHostResponse):
        return GET_HOST_RESPONSE, (msg.seq, msg.modid, msg.cmdid, msg.retcode, msg.host)
    if isinstance(msg, wire.ReportRequest):
        return REPORT_REQUEST, (msg.modid, msg.cmdid, msg.host, _u32(msg.retcode, "retcode"))
    if isinstance(msg, wire.ReportStatusRequest):
        results = [
            (r.ip, r.port, _u32(r.succ, "succ"), _u32(r.err, "err"), r.overload)
            for r in msg.results
        ]
        fields = (msg.modid, msg.cmdid, msg.caller, results, _u32(msg.ts, "ts"))
        return REPORT_STATUS_REQUEST, fields
    raise ProtocolError(f"the original protocol has no {type(msg).__name__}")


def encode_body(msg: wire.Message) -> tuple[int, bytes]:
    """``(msgid, protobuf body)`` of a Lars message in the original format. Raises
    ProtocolError for a message the original has no id for, or a value its field cannot
    carry."""
    msgid, values = _fields(msg)
    return msgid, _encode(_SPECS[msgid], values)


def encode(msg: wire.Message, max_body: int = MAX_BODY) -> bytes:
    """A whole message (header and body), for a datagram or a TCP stream; raises
    ProtocolError if the body is longer than ``max_body``."""
    msgid, body = encode_body(msg)
    if len(body) > max_body:
        raise ProtocolError(f"original message of {len(body)} bytes exceeds the limit {max_body}")
    return _header.pack(msgid, len(body)) + body


# --- the agent's hot path --------------------------------------------------------------------


def is_original_datagram(data: bytes) -> bool:
    """True if a datagram is in the original format: its first byte is 8 or less (an
    original msgid, 1 to 8, as a little-endian int32; the agent serves 4, 6 and 7 and refuses
    the rest as such). Lars's own datagrams start with a msgpack array (0x90-0x9f, 0xdc,
    0xdd). The agent inlines this test (``data < b"\\x09"``): it runs on every datagram."""
    return data < _ORIGINAL_BELOW


def decode_agent_request(data: bytes) -> tuple[Any, ...]:
    """Decode a datagram to the agent in the original format into the tuples of
    :func:`lars.wire.decode_agent_request`: ``(4, seq, modid, cmdid)``,
    ``(6, modid, cmdid, (ip, port), retcode)``, or ``(7, 0, modid, cmdid)`` for the API
    GetRouteRequest (which carries no seq). Other ids raise ProtocolError (without
    ``msg_type``: the original has no error reply), as does anything malformed; an invalid
    report raises it with ``msg_type`` 6.

    The two messages of every client loop take a fast path when their body is laid out as
    protobuf's serializer writes it (fields in order, each once, varints of at most ten
    bytes); any other body takes the general parser, with the same result (the tests
    compare the two). A report decoded that way is remembered by its bytes: the next
    identical datagram costs one dict lookup (a get_host carries its seq: none is alike)."""
    if type(data) is bytes:
        report = _REPORTS.get(data)
        if report is not None:
            return report
    end = len(data)
    msgid, pos = _datagram_header(data)
    if msgid == GET_HOST_REQUEST:
        fields = _plain_varints(data, pos, end, 3)
        if fields is not None:
            return (4, *fields)
    elif msgid == REPORT_REQUEST:
        request = _plain_report(data, pos, end)
        if request is not None:
            if len(_REPORTS) >= _REPORTS_SIZE:
                _REPORTS.clear()
            _REPORTS[bytes(data)] = request
            return request
    try:
        f = _parse(data, pos, end, _SPECS[msgid], _MAX_DEPTH)
    except _Malformed as exc:
        raise ProtocolError(f"original {MESSAGE_NAMES[msgid]}: malformed: {exc}") from None
    if msgid == GET_HOST_REQUEST:
        return (4, f[0], f[1], f[2])
    if msgid == REPORT_REQUEST:
        try:
            return (6, f[0], f[1], _host(f[2]), f[3])
        except _Invalid as exc:
            raise ProtocolError(f"original ReportRequest: {exc}", msg_type=msgid) from None
    if msgid == API_GET_ROUTE_REQUEST:
        return (7, 0, f[0], f[1])
    raise ProtocolError(f"original {MESSAGE_NAMES[msgid]} is not a request to the agent")


#: ReportRequest datagrams already decoded, by their bytes: a client loop reports the same
#: few (module, host, retcode) over and over, and carries no seq to make them differ.
#: Emptied when full.
_REPORTS: dict[bytes, tuple[Any, ...]] = {}
_REPORTS_SIZE = 4096


def _plain_varints(buf: bytes, pos: int, end: int, count: int) -> list[int] | None:
    """The low 32 bits of varint fields 1..``count`` in ``buf[pos:end]``, if it holds
    nothing but such fields, each at most once, in order, with one-byte tags; else None."""
    values = [0] * count
    last = 0
    while pos < end:
        tag = buf[pos]
        number = tag >> 3
        if tag & 7 or not last < number <= count:
            return None
        last = number
        pos += 1
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                return None
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        values[number - 1] = value & UINT32_MAX
    return values


def _plain_report(buf: bytes, pos: int, end: int) -> tuple[Any, ...] | None:
    """A ReportRequest laid out as the serializer writes it (modid, cmdid, the host as a
    submessage of plain varints with a one-byte length, the retcode), else None."""
    # The host's tag (0x1a) follows two varints of at most ten bytes. A 0x1a inside them
    # ends a varint: what precedes it then ends in a tag or an unfinished varint, and is
    # refused below.
    host_at = buf.find(b"\x1a", pos, min(end, pos + 23))
    if host_at < 0 or host_at + 1 >= end:
        return None
    length = buf[host_at + 1]
    host_end = host_at + 2 + length
    if length >= 0x80 or host_end > end:
        return None
    ids = _plain_varints(buf, pos, host_at, 2)
    host = _plain_varints(buf, host_at + 2, host_end, 2)
    retcode = 0
    if host_end < end:  # nothing but the retcode (field 4) may follow
        tail = _plain_varints(buf, host_end, end, 4) if buf[host_end] == 0x20 else None
        if tail is None:
            return None
        retcode = tail[3]
    if ids is None or host is None or not 1 <= host[1] <= PORT_MAX:
        return None
    return (6, ids[0], ids[1], (host[0], host[1]), retcode)


_PACKED_HOST: dict[HostKey, bytes] = {}
#: Hosts whose encoded HostInfo is cached (a route's hosts are few; a bound all the same).
_HOST_CACHE_SIZE = 100_000


def _host_info(host: HostKey) -> bytes:
    """The encoded HostInfo submessage of a host, tag and length included."""
    packed = _PACKED_HOST.get(host)
    if packed is None:
        ip, port = host
        body = (b"\x08" + _int32_bytes(ip) if ip else b"") + b"\x10" + _int32_bytes(port)
        packed = _SMALL[len(body)] + body  # at most 15 bytes
        if len(_PACKED_HOST) < _HOST_CACHE_SIZE:
            _PACKED_HOST[host] = packed
    return packed


#: Encoded GetHostResponse bodies after the seq, by (modid, cmdid, retcode, host): a client
#: loop asks for few modules and gets few hosts. Emptied when full.
_ANSWER_TAILS: dict[tuple[int, int, int, HostKey | None], bytes] = {}
_ANSWER_TAILS_SIZE = 100_000


def encode_get_host_response(
    seq: int, modid: int, cmdid: int, retcode: int, host: HostKey | None
) -> bytes:
    """``encode(wire.GetHostResponse(seq, modid, cmdid, retcode, host))``, faster."""
    key = (modid, cmdid, retcode, host)
    tail = _ANSWER_TAILS.get(key)
    if tail is None:
        body = bytearray()
        if modid:
            body += b"\x10" + _int32_bytes(modid)
        if cmdid:
            body += b"\x18" + _int32_bytes(cmdid)
        if retcode:
            body += b"\x20" + _int32_bytes(retcode)
        if host is not None:
            body += b"\x2a" + _host_info(host)
        tail = bytes(body)
        if len(_ANSWER_TAILS) >= _ANSWER_TAILS_SIZE:
            _ANSWER_TAILS.clear()
        _ANSWER_TAILS[key] = tail
    if seq:
        head = b"\x08" + _varint_bytes(seq)
        return _header.pack(GET_HOST_RESPONSE, len(head) + len(tail)) + head + tail
    return _header.pack(GET_HOST_RESPONSE, len(tail)) + tail


def encode_api_route_response(modid: int, cmdid: int, hosts: Collection[HostKey]) -> bytes:
    """``encode(wire.ApiGetRouteResponse(0, modid, cmdid, 0, hosts))`` (an unknown module is
    an empty route); raises ProtocolError when the route does not fit one datagram."""
    body = bytearray()
    if modid:
        body += b"\x08" + _int32_bytes(modid)
    if cmdid:
        body += b"\x10" + _int32_bytes(cmdid)
    for host in hosts:
        body += b"\x1a" + _host_info(host)
    if len(body) > _MAX_DATAGRAM - HEADER_SIZE:
        raise ProtocolError(f"route of {len(hosts)} hosts does not fit one original datagram")
    return _header.pack(API_GET_ROUTE_RESPONSE, len(body)) + body


def system_error_reply(data: bytes) -> bytes | None:
    """The reply to an original request the agent failed to handle, so that its client,
    which waits without a timeout, is not left waiting: SYSTEM_ERROR to a GetHostRequest, an
    empty route to an API GetRouteRequest. None for anything else. Never raises."""
    try:
        request = decode_agent_request(data)
    except ProtocolError:
        return None
    if request[0] == GET_HOST_REQUEST:
        _, seq, modid, cmdid = request
        return encode_get_host_response(seq, modid, cmdid, wire.RetCode.SYSTEM_ERROR, None)
    if request[0] == API_GET_ROUTE_REQUEST:
        return encode_api_route_response(request[2], request[3], ())
    return None


# --- TCP -------------------------------------------------------------------------------------


def sniff_stream(prefix: bytes) -> bool | None:
    """Which protocol a TCP connection speaks, from its first bytes: True for the original,
    False for Lars's, None while they do not tell yet.

    An original frame starts with its msgid, 1 to 8, as a little-endian int32: that byte and
    three zeros. A Lars frame starts with its length as a big-endian uint32, whose first byte
    is 0 for every frame under 16 MiB; with ``max_frame`` raised that far, only a frame of
    exactly 16, 32, ... or 128 MiB would look original.
    """
    if not prefix:
        return None
    if not 1 <= prefix[0] <= API_GET_ROUTE_RESPONSE:
        return False
    if len(prefix) < 4:
        return None
    return prefix[1:4] == b"\x00\x00\x00"


class FrameDecoder:
    """Incremental decoder of the original's TCP stream: feed bytes in, take messages out.

    Iterating yields the Lars message of each complete frame whose id is in ``serves`` and
    raises :class:`ProtocolError` for each that is not:

    * a frame whose body does not decode, or whose id this role does not serve, is consumed
      and raises with ``msg_type`` set to its id: the framing is intact, the stream goes on
      (iterate again);
    * a negative ``msglen``, or one over ``max_frame``, raises without ``msg_type``, before
      any of the body is buffered: the framing is lost and the caller closes the connection.

    An empty body is a valid message (every field zero).
    """

    def __init__(self, max_frame: int, serves: Collection[int] = tuple(_SPECS)) -> None:
        self.max_frame = max_frame
        self.serves = frozenset(serves)
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf) - self._pos

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived."""
        return len(self._buf) > self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def __iter__(self) -> Iterator[wire.Message]:
        """Yield every complete message buffered so far (see the class docstring)."""
        buf = self._buf
        while len(buf) - self._pos >= HEADER_SIZE:
            msgid, msglen = _header.unpack_from(buf, self._pos)
            if msglen < 0 or msglen > self.max_frame:
                raise ProtocolError(
                    f"original frame of {msglen} bytes (msgid {msgid}): over the limit"
                    f" {self.max_frame}"
                    if msglen >= 0
                    else f"original frame with a negative length {msglen} (msgid {msgid})"
                )
            start = self._pos + HEADER_SIZE
            if len(buf) - start < msglen:
                return
            self._pos = start + msglen
            if msgid not in self.serves:
                name = MESSAGE_NAMES.get(msgid, "unknown message")
                raise ProtocolError(
                    f"original {name} (msgid {msgid}) is not served here", msg_type=msgid
                )
            body = bytes(buf[start : start + msglen])
            try:
                yield decode_body(msgid, body)
            except ProtocolError as exc:
                exc.msg_type = msgid
                raise
