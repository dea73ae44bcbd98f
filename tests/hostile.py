"""Hostile input for the Lars daemons: seeded generators of malformed and abusive messages.

Pure: no I/O, no trio, no pytest. Every generator takes a :class:`random.Random` and returns
bytes, so a seed replays a batch exactly. Shared by the fuzz tests
(``tests/e2e/test_fuzz.py``) and the soak (``benchmarks/fuzz_soak.py``), which send the bytes
to real daemons; ``benchmarks/fuzz_soak.py`` must run after a plain ``pip install .``, so
nothing here may need the test dependencies.

Message bodies, by kind (:data:`KINDS`):

``garbage``       random bytes, mostly short, now and then up to a full datagram.
``truncated``     a well-formed message cut short, or with a few bytes overwritten.
``bad_msgpack``   msgpack that lies or breaks the unpacker: an array, map, string or binary
                  promising 2**32-1 elements or bytes and carrying none, deep nesting,
                  reserved byte 0xc1, integer map keys, trailing bytes after a message,
                  timestamps of an impossible length.
``wrong_shape``   valid msgpack that is not a message: scalars, maps, an empty array, a type
                  id that is a string, float, nil, boolean, negative, huge or unknown.
``wrong_types``   every type id of the catalogue with the right field count and fields of
                  the wrong kind (float, string, nil, boolean, bytes, map, nested array,
                  extension type), or with a wrong field count.
``out_of_range``  every type id with fields of the right kind and values out of range: ids
                  above 2**32-1 or negative, ports 0 and 65536, retcodes above 255,
                  counters and timestamps past 64 bits, malformed hosts and results.
``valid``         well-formed messages of every type with random values, edge values
                  (0, 2**32-1, 2**64-1, ...) included, now and then with thousands of hosts.

The catalogue is read from :mod:`lars.wire` (every public message class), so a message type
added there is fuzzed without touching this file; its fields are filled by name (``modid``,
``hosts``, ...) and unknown names get arbitrary values.

Streams for the abuse that is not about one message: requests for thousands of distinct
(unknown) modules, and TCP frame headers that promise more than they deliver.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import attrs
import msgpack

from lars import wire

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)

#: Every message class of the wire protocol, by type id.
CATALOGUE: dict[int, type[wire.Message]] = {
    cls.TYPE: cls
    for cls in (getattr(wire, name) for name in wire.__all__)
    if isinstance(cls, type) and issubclass(cls, wire.Message) and hasattr(cls, "TYPE")
}
#: Type ids no message has: below, between and above the catalogue.
UNKNOWN_TYPES = (0, -1, max(CATALOGUE) + 1, 127, 128, 255, 256, UINT32_MAX, UINT64_MAX, INT64_MIN)

_header = struct.Struct("!I")
_pack = msgpack.Packer(use_bin_type=True).pack

# Integers msgpack can carry, chosen to sit on every boundary a decoder checks.
EDGE_U32 = (0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, UINT32_MAX)
TOO_BIG = (2**32, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, UINT64_MAX)
NEGATIVE = (-1, -2, -(2**31), -(2**32), INT64_MIN)
OUT_OF_U32 = TOO_BIG + NEGATIVE


def pack(value: Any) -> bytes:
    """msgpack bytes of any value (the wire's own packer settings)."""
    data: bytes = _pack(value)
    return data


def fields_of(msg_type: int) -> tuple[str, ...]:
    """The field names of a message type, in wire order."""
    return tuple(f.name for f in attrs.fields(CATALOGUE[msg_type]))  # type: ignore[arg-type]


# --- values --------------------------------------------------------------------------------


def u32(rng: random.Random) -> int:
    """An unsigned 32-bit integer, an edge value one time in four."""
    return rng.choice(EDGE_U32) if rng.random() < 0.25 else rng.randrange(UINT32_MAX + 1)


def u64(rng: random.Random) -> int:
    """An unsigned 64-bit integer, an edge value one time in four."""
    if rng.random() < 0.25:
        return rng.choice((0, 1, UINT32_MAX, 2**63 - 1, 2**63, UINT64_MAX))
    return rng.randrange(UINT64_MAX + 1) if rng.random() < 0.5 else rng.randrange(1 << 20)


def text(rng: random.Random, longest: int = 64) -> str:
    """A string: empty, ASCII, or any code point msgpack can carry (no lone surrogates).
    Long strings repeat a short random piece (building them a character at a time is slow)."""
    length = rng.randrange(longest + 1)
    if rng.random() < 0.5:
        piece = "".join(chr(rng.randrange(32, 127)) for _ in range(min(length, 64)))
    else:
        piece = "".join(
            chr(rng.choice((rng.randrange(0x80, 0xD800), 0x10FFFF))) for _ in range(min(length, 64))
        )
    return (piece * (length // max(len(piece), 1) + 1))[:length]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """Any value msgpack can carry, biased to what a decoder mishandles."""
    pick = rng.randrange(14 if depth < 3 else 11)
    if pick == 0:
        return rng.choice(TOO_BIG)
    if pick == 1:
        return rng.choice(NEGATIVE)
    if pick == 2:
        return rng.choice(EDGE_U32)
    if pick == 3:
        return rng.choice((0.0, -0.0, 0.5, 1.0, 4294967296.0, 1e308, float("inf"), float("nan")))
    if pick == 4:
        return text(rng, rng.choice((8, 64, 4096)))
    if pick == 5:
        return rng.randbytes(rng.randrange(64))
    if pick == 6:
        return None
    if pick == 7:
        return rng.random() < 0.5
    if pick == 8:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(16)))
    if pick == 9:
        return msgpack.Timestamp(rng.randrange(2**34), rng.randrange(10**9))
    if pick == 10:
        return rng.choice(((), [], {}, ""))
    if pick == 11:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if pick == 12:
        return {text(rng, 8): hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {rng.randrange(10): hostile_value(rng, depth + 1)}  # integer keys


def host(rng: random.Random) -> list[int]:
    return [u32(rng), rng.randrange(1, 65536)]


def reports(rng: random.Random) -> list[list[int]]:
    """Reports riding on a GetHostReportRequest: ``[modid, cmdid, ip, port, retcode]``."""
    count = rng.choice((0, 1, rng.randrange(33)))
    return [[u32(rng), u32(rng), *host(rng), rng.randrange(256)] for _ in range(count)]


def _bad_report(rng: random.Random) -> Any:
    good: list[Any] = [u32(rng), u32(rng), *host(rng), 0]
    slot = rng.randrange(6)
    if slot == 5:
        return good[:4]  # four elements
    good[slot] = rng.choice((-1, 0 if slot == 3 else 2**32, "1", None))
    return good


def hosts(rng: random.Random, most: int = 8) -> list[list[int]]:
    count = rng.choice((0, 1, rng.randrange(most + 1), rng.randrange(most + 1)))
    if rng.random() < 0.02:
        count = rng.randrange(1000, 5000)  # a big route
    return [host(rng) for _ in range(count)]


def results(rng: random.Random, most: int = 8) -> list[list[Any]]:
    count = rng.choice((0, 1, rng.randrange(most + 1)))
    if rng.random() < 0.02:
        count = rng.randrange(100, 2000)
    return [[*host(rng), u64(rng), u64(rng), rng.random() < 0.5] for _ in range(count)]


#: A plausible current time, as seconds (fixed: a seed must regenerate the same bytes).
NOW = 1_800_000_000


def ts(rng: random.Random) -> int:
    return rng.choice((NOW, 0, -1, INT64_MIN, 2**63 - 1, rng.randrange(2**40)))


#: A valid value per field name. Names not listed (a field added to the protocol since) get
#: an unsigned 32-bit integer, the commonest kind.
VALID: dict[str, Callable[[random.Random], Any]] = {
    "seq": u32,
    "modid": u32,
    "cmdid": u32,
    "caller": u32,
    "retcode": lambda rng: rng.choice((0, 1, 2, 3, 4, rng.randrange(256))),
    "code": lambda rng: rng.randrange(256),
    "host": host,
    "hosts": hosts,
    "results": results,
    "reports": reports,
    "ts": ts,
    "version": u64,
    "reason": text,
    "role": text,
    "state": lambda rng: {text(rng, 8): rng.choice((None, 1, "idle", [])) for _ in range(4)},
    "counters": lambda rng: {text(rng, 8): rng.randrange(2**40) for _ in range(rng.randrange(6))},
    # GetRouteResponse's additions (DESIGN §13): meta parallel to hosts (empty always is).
    "meta": lambda rng: [],
    "policy": lambda rng: rng.choice(
        (None, ["rr", False, 0.7, 0.0, 0.0], ["p2c", True, 0.5, 0.25, rng.randrange(3600)])
    ),
    # GetHostKeyRequest's key (nil or up to 256 bytes), TimedReportRequest's latency.
    "key": lambda rng: rng.choice((None, b"", rng.randbytes(rng.randrange(257)))),
    "latency_us": u32,
    # Self-registration (DESIGN §14).
    "demoted": hosts,
    "ip": u32,
    "port": lambda rng: rng.choice((1, 80, 65535, rng.randrange(1, 65536))),
    "weight": lambda rng: rng.choice((-1, 0, 100, 1_000_000)),
    "zone": lambda rng: rng.choice((None, "", "eu-1", "z" * 64)),
    "ttl": lambda rng: rng.choice((1, 10, 3600)),
    "drain_ms": lambda rng: rng.choice((0, 5000, 3_600_000)),
    "leases": lambda rng: [_lease(rng) for _ in range(rng.randrange(4))],
    "drops": lambda rng: [
        [u32(rng), u32(rng), u32(rng), rng.randrange(1, 65536), rng.randrange(3_600_001)]
        for _ in range(rng.randrange(4))
    ],
    "errors": lambda rng: [[rng.randrange(1024), text(rng)] for _ in range(rng.randrange(3))],
}


def _lease(rng: random.Random) -> list[Any]:
    """One LeaseUpdate item: (modid, cmdid, ip, port, weight, zone, ttl, age_ms)."""
    return [
        u32(rng),
        u32(rng),
        u32(rng),
        rng.randrange(1, 65536),
        rng.choice((-1, 0, 100)),
        rng.choice((None, "eu-1")),
        rng.randrange(1, 3601),
        u32(rng),
    ]


def _bad_host(rng: random.Random) -> Any:
    return rng.choice(
        (
            [rng.choice(TOO_BIG + NEGATIVE), 80],
            [u32(rng), rng.choice((0, 65536, -1, UINT32_MAX))],
            [u32(rng)],
            [u32(rng), 80, 1],
            "10.0.0.1:80",
        )
    )


def _bad_result(rng: random.Random) -> Any:
    good: list[Any] = [*host(rng), u64(rng), u64(rng), False]
    slot = rng.randrange(6)
    if slot == 5:
        return good[:4]  # four elements
    good[slot] = rng.choice((-1, 0 if slot == 1 else 65536, 1, "1", None))
    return good


#: A value of the right kind and out of range (or malformed inside), per field name.
OUT_OF_RANGE: dict[str, Callable[[random.Random], Any]] = {
    **dict.fromkeys(("seq", "modid", "cmdid", "caller"), lambda rng: rng.choice(OUT_OF_U32)),
    "retcode": lambda rng: rng.choice((256, 2**32, UINT64_MAX, -1)),
    "code": lambda rng: rng.choice((256, 2**32, -1)),
    "host": _bad_host,
    "hosts": lambda rng: [*hosts(rng), _bad_host(rng), *hosts(rng)],
    "results": lambda rng: [*results(rng), _bad_result(rng)],
    "reports": lambda rng: [*reports(rng), _bad_report(rng)],
    "ts": lambda rng: rng.choice((2**63, UINT64_MAX)),
    "version": lambda rng: rng.choice(NEGATIVE),
    "reason": lambda rng: text(rng, 60_000),
    "role": lambda rng: text(rng, 60_000),
    "state": lambda rng: {rng.randrange(10): 1},
    "counters": lambda rng: {text(rng, 8): [1, {2: 3}]},
    "meta": lambda rng: [[rng.choice((-1, 2**32)), ""], [1, "x" * 65], [1], "1"],
    "policy": lambda rng: rng.choice((["rr", False, 0.7, 0.0], ["rr", 1, 0.7, 0.0, 0.0], 7)),
    "key": lambda rng: rng.choice((b"x" * 257, "text", 7)),
    "latency_us": lambda rng: rng.choice(OUT_OF_U32),
    "demoted": lambda rng: [*hosts(rng), _bad_host(rng)],
    "ip": lambda rng: rng.choice(OUT_OF_U32),
    "port": lambda rng: rng.choice((0, 65536, -1)),
    "weight": lambda rng: rng.choice((-2, 1_000_001, 2**32)),
    "zone": lambda rng: rng.choice(("z" * 65, 7, b"eu")),
    "ttl": lambda rng: rng.choice((0, 3601, -1, 2**32)),
    "drain_ms": lambda rng: rng.choice((3_600_001, -1, 2**40)),
    "leases": lambda rng: [_lease(rng), [*_lease(rng)[:6], 0, 0], [1, 2], 7],
    "drops": lambda rng: [[1, 2, 3, 0, 0], [1, 2, 3, 80], "x"],
    "errors": lambda rng: [[-1, "x"], [1], 7],
}


def valid_fields(rng: random.Random, msg_type: int) -> list[Any]:
    """Valid field values for a message type (every one in range)."""
    return [VALID.get(name, u32)(rng) for name in fields_of(msg_type)]


# --- message bodies ------------------------------------------------------------------------


def garbage(rng: random.Random) -> bytes:
    """Random bytes: mostly a few dozen, sometimes thousands."""
    size = rng.choice((0, 1, 2, 3, 4, 5, rng.randrange(64), rng.randrange(64), rng.randrange(4096)))
    if rng.random() < 0.01:
        size = rng.randrange(60_000, 65_000)
    return rng.randbytes(size)


def valid(rng: random.Random) -> bytes:
    """A well-formed message of any type, with random valid values."""
    msg_type = rng.choice(list(CATALOGUE))
    return pack([msg_type, *valid_fields(rng, msg_type)])


def truncated(rng: random.Random) -> bytes:
    """A well-formed message cut short, or with a few bytes overwritten."""
    body = bytearray(valid(rng))
    if len(body) > 1 and rng.random() < 0.6:
        return bytes(body[: rng.randrange(1, len(body))])
    for _ in range(rng.randrange(1, 4)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return bytes(body)


def bad_msgpack(rng: random.Random) -> bytes:
    """msgpack that lies about its sizes or breaks the unpacker."""
    tail = valid(rng)[: rng.randrange(16)]
    choices: list[Callable[[], bytes]] = [
        lambda: b"\xdd\xff\xff\xff\xff" + tail,  # array32 of 2**32-1 elements
        lambda: b"\xdf\xff\xff\xff\xff" + tail,  # map32 of 2**32-1 pairs
        lambda: b"\xdb\xff\xff\xff\xff" + tail,  # str32 of 4 GiB
        lambda: b"\xc6\xff\xff\xff\xff" + tail,  # bin32 of 4 GiB
        lambda: b"\xc9\xff\xff\xff\xff\x05" + tail,  # ext32 of 4 GiB
        lambda: b"\x94\x04" + b"\xdd\x00\x01\x00\x00" + b"\xc0" * 100,  # array of 65536 promised
        lambda: b"\x91" * rng.choice((100, 1000, 5000, 60_000)),  # deep nesting, never closed
        lambda: b"\x91" * 2000 + b"\x04",  # deep nesting, closed
        lambda: b"\x81" * 1000 + b"\xa1a" * 1000 + b"\xc0",  # deep maps
        lambda: b"\xc1",  # reserved
        lambda: b"\x94\x04\xc1\x01\x01",  # reserved inside a request
        lambda: pack({1: 2}),  # integer map key
        lambda: pack([11, 1, 1, 1, 0, {1: 2}]),  # integer key inside a state reply
        lambda: valid(rng) + valid(rng),  # trailing data
        lambda: b"\xd4\xff\x00",  # timestamp of one byte
        lambda: b"\xc7\x05\xff" + b"\x00" * 5,  # timestamp of five bytes
        lambda: b"\x94\x04\x01\x01\xd4\xff\x00",  # bad timestamp as a field
        lambda: b"\x94\x04\x01\x01\xcf",  # uint64 without its bytes
    ]
    return rng.choice(choices)()


def wrong_shape(rng: random.Random) -> bytes:
    """Valid msgpack that is not a message."""
    pick = rng.randrange(5)
    if pick == 0:
        value: Any = hostile_value(rng)
    elif pick == 1:
        value = []
    elif pick == 2:  # a type id that is not a known integer
        bad_id = rng.choice((*UNKNOWN_TYPES, hostile_value(rng)))
        value = [bad_id, *(hostile_value(rng) for _ in range(rng.randrange(6)))]
    elif pick == 3:  # a message inside a message
        value = [[rng.choice(list(CATALOGUE)), *(u32(rng) for _ in range(3))]]
    else:
        value = {text(rng, 8): [rng.choice(list(CATALOGUE)), 1, 1, 1]}
    return pack(value)


def wrong_types(rng: random.Random) -> bytes:
    """A known type id with fields of the wrong kind, or the wrong number of fields."""
    msg_type = rng.choice(list(CATALOGUE))
    fields = valid_fields(rng, msg_type)
    if rng.random() < 0.25:  # wrong field count
        count = rng.choice((0, len(fields) - 1, len(fields) + 1, 100))
        fields = (fields + [hostile_value(rng) for _ in range(count)])[: max(count, 0)]
    else:
        for _ in range(rng.randrange(1, len(fields) + 1)):
            fields[rng.randrange(len(fields))] = hostile_value(rng)
    return pack([msg_type, *fields])


def out_of_range(rng: random.Random) -> bytes:
    """A known type id with fields of the right kind, one or more out of range."""
    msg_type = rng.choice(list(CATALOGUE))
    names = fields_of(msg_type)
    fields = valid_fields(rng, msg_type)
    for _ in range(rng.randrange(1, len(fields) + 1)):
        slot = rng.randrange(len(fields))
        fields[slot] = OUT_OF_RANGE.get(names[slot], hostile_value)(rng)
    return pack([msg_type, *fields])


KINDS: dict[str, Callable[[random.Random], bytes]] = {
    "garbage": garbage,
    "truncated": truncated,
    "bad_msgpack": bad_msgpack,
    "wrong_shape": wrong_shape,
    "wrong_types": wrong_types,
    "out_of_range": out_of_range,
    "valid": valid,
}
#: Bodies that cannot be decoded at all: a TCP daemon closes the connection on them.
MALFORMED = ("garbage", "truncated", "bad_msgpack")
#: Bodies that decode as msgpack but are no valid message, and valid messages.
MISSHAPEN = ("wrong_shape", "wrong_types", "out_of_range", "valid")


def bodies(rng: random.Random, kinds: tuple[str, ...], count: int, limit: int) -> list[bytes]:
    """``count`` bodies of the given kinds, each at most ``limit`` bytes (longer ones are cut:
    a datagram cannot carry more)."""
    return [KINDS[rng.choice(kinds)](rng)[:limit] for _ in range(count)]


# --- TCP framing ---------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """A TCP frame: the 4-byte length header, then the body."""
    return _header.pack(len(body)) + body


def header(length: int) -> bytes:
    """A frame header promising ``length`` bytes of body."""
    return _header.pack(length)


def lying_stream(rng: random.Random, max_frame: int) -> bytes:
    """Bytes that break the framing: an empty frame, a header over the limit, a header cut
    short, or unframed garbage."""
    return rng.choice(
        (
            lambda: header(0),
            lambda: header(max_frame + 1) + rng.randbytes(64),
            lambda: header(UINT32_MAX),
            lambda: header(rng.randrange(1, 64))[: rng.randrange(1, 4)],
            lambda: rng.randbytes(rng.randrange(1, 256)),
            lambda: frame(valid(rng))[:-1],  # one byte short, then the peer goes away
        )
    )()


# --- floods --------------------------------------------------------------------------------


def distinct_modules(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """``count`` distinct random modules (that no route will have)."""
    modules: set[tuple[int, int]] = set()
    while len(modules) < count:
        modules.add((rng.randrange(1 << 31, UINT32_MAX + 1), rng.randrange(UINT32_MAX + 1)))
    return sorted(modules, key=lambda _: rng.random())


def unknown_module_requests(rng: random.Random, count: int) -> list[tuple[tuple[int, int], bytes]]:
    """``(module, datagram)``: a GetHost or API GetRoute request for each of ``count``
    distinct unknown modules."""
    kinds = (wire.GetHostRequest.TYPE, wire.ApiGetRouteRequest.TYPE)
    return [
        (m, pack([rng.choice(kinds), seq, *m]))
        for seq, m in enumerate(distinct_modules(rng, count))
    ]


def route_requests(rng: random.Random, count: int) -> bytes:
    """TCP frames: GetRouteRequests for ``count`` distinct unknown modules, back to back."""
    return b"".join(
        wire.encode_frame(wire.GetRouteRequest(*m)) for m in distinct_modules(rng, count)
    )


def stats_requests(rng: random.Random, count: int) -> bytes:
    """TCP frames: ``count`` StatsRequests."""
    return b"".join(wire.encode_frame(wire.StatsRequest(u32(rng))) for _ in range(count))


def status_reports(rng: random.Random, count: int, size: int) -> bytes:
    """TCP frames: ``count`` valid ReportStatusRequests of ``size`` host results each."""
    frames = []
    for _ in range(count):
        rows = tuple(
            wire.HostResult(u32(rng), rng.randrange(1, 65536), rng.randrange(100), 0, False)
            for _ in range(size)
        )
        report = wire.ReportStatusRequest(u32(rng), u32(rng), u32(rng), rows, ts(rng), u32(rng))
        frames.append(wire.encode_frame(report))
    return b"".join(frames)


# --- the original Lars's format (issue 17) -----------------------------------------------------
# Whole messages (the 8-byte header and a protobuf body), for a datagram or a TCP stream. The
# agent takes a datagram whose first byte is below 8 in this format; the DNS and the reporter
# take a connection whose first four bytes are an original msgid (1 to 8) in it.

_original_header = struct.Struct("<ii")


def original_message(msgid: int, body: bytes) -> bytes:
    """A message in the original format: msgid, msglen (both little-endian int32), body."""
    return _original_header.pack(msgid, len(body)) + body


def _varint(value: int) -> bytes:
    value &= UINT64_MAX
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int32(value: int) -> bytes:
    """An int32 field's varint (negative values in ten bytes, as protobuf writes them)."""
    return _varint(value if value >= 0 else value + (1 << 64))


def _field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _int32(value)


def _submessage(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _original_host(rng: random.Random, port: int | None = None) -> bytes:
    ip = u32(rng)
    return _field(1, ip - (1 << 32) if ip >= 1 << 31 else ip) + _field(
        2, rng.randrange(1, 65536) if port is None else port
    )


#: Original message ids: every one of the protocol (1-8), and ids no message has.
ORIGINAL_IDS = tuple(range(1, 9))
ORIGINAL_UNKNOWN_IDS = (0, 9, 10, 127, 255, 256, -1, -(2**31), 2**31 - 1)


def original_valid(rng: random.Random, msgid: int | None = None) -> bytes:
    """A well-formed original message of any id, with random values (ids and IPs of 2**31
    and more travel as negative int32), now and then with thousands of hosts."""
    msgid = rng.choice(ORIGINAL_IDS) if msgid is None else msgid
    ids = b"".join(_field(n, rng.choice((u32(rng), -rng.randrange(1, 2**31)))) for n in (1, 2))
    if msgid in (1, 7):
        body = ids
    elif msgid in (2, 8):
        count = rng.choice((0, 1, 3, rng.randrange(20)))
        if rng.random() < 0.02:
            count = rng.randrange(1000, 3000)
        body = ids + b"".join(_submessage(3, _original_host(rng)) for _ in range(count))
    elif msgid == 3:
        results = []
        for _ in range(rng.choice((0, 1, 3, rng.randrange(50)))):
            result = _original_host(rng) + _field(3, u32(rng)) + _field(4, u32(rng))
            results.append(_submessage(4, result + (_field(5, 1) if rng.random() < 0.5 else b"")))
        body = ids + _field(3, u32(rng)) + b"".join(results) + _field(5, rng.randrange(2**32))
    elif msgid in (4, 5):
        seq = _field(1, u32(rng))
        body = seq + _field(2, u32(rng)) + _field(3, u32(rng))
        if msgid == 5:
            body += _field(4, rng.choice((0, 1, 2, 3))) + _submessage(5, _original_host(rng))
    else:  # 6, ReportRequest
        body = ids + _submessage(3, _original_host(rng)) + _field(4, rng.choice((0, 1, -1)))
    return original_message(msgid, body)


def original_bad_protobuf(rng: random.Random) -> bytes:
    """A correct header around protobuf that breaks a rule of the format."""
    good = original_valid(rng)[8:]
    tail = good[: rng.randrange(len(good) + 1)]
    body = rng.choice(
        (
            lambda: b"\x08" + b"\xff" * rng.choice((10, 11, 64)),  # a varint too long
            lambda: b"\x08",  # truncated
            lambda: good[: max(len(good) - rng.randrange(1, 4), 0)] + b"\x80",
            lambda: b"\x00" + tail,  # field number 0
            lambda: bytes([rng.randrange(1, 16) << 3 | rng.choice((6, 7))]) + tail,
            lambda: b"\x0c" + tail,  # an end of group without its start
            lambda: b"\x1b" * rng.choice((50, 101, 5000)) + b"\x1c" * 50,  # deep groups
            lambda: b"\x1b" + tail,  # a group never ended
            lambda: b"\x1a" + _varint(rng.choice((5, 2**31 - 1, 2**32 + 7))) + b"ab",
            lambda: b"\x2a\x05\x08\x01",  # a submessage past the end
            lambda: b"\x88\x80\x80\x80\x80\x80\x00",  # a tag in seven bytes
            lambda: b"\x80\x80\x80\x80\x10\x00",  # a tag of 2**32
            lambda: b"\x09" + bytes(rng.randrange(8)),  # fixed64 cut short
        )
    )()
    return original_message(rng.choice(ORIGINAL_IDS), body)


def original_lying_header(rng: random.Random) -> bytes:
    """A header whose msglen is not the body's length: negative, short, long, huge."""
    body = original_valid(rng)[8:]
    msglen = rng.choice(
        (-1, -(2**31), len(body) + 1, max(len(body) - 1, 0), 65535, 2**31 - 1, 1 << 20)
    )
    return _original_header.pack(rng.choice(ORIGINAL_IDS), msglen) + body


def original_unknown(rng: random.Random) -> bytes:
    """A well-framed message of an id the protocol does not have."""
    return original_message(rng.choice(ORIGINAL_UNKNOWN_IDS), rng.randbytes(rng.randrange(64)))


def original_out_of_range(rng: random.Random) -> bytes:
    """Well-formed protobuf whose values Lars cannot take: ports 0, 65536 and -1 (also a
    missing host, which is port 0), retcodes over 255 in replies."""
    bad_port = rng.choice((0, 65536, -1, 2**31 - 1))
    msgid = rng.choice((2, 3, 5, 6, 8))
    ids = _field(1, u32(rng)) + _field(2, u32(rng))
    if msgid in (2, 8):
        body = (
            ids
            + _submessage(3, _original_host(rng))
            + _submessage(3, _original_host(rng, bad_port))
        )
    elif msgid == 3:
        body = ids + _submessage(4, _original_host(rng, bad_port) + _field(3, 1))
    elif msgid == 5:
        body = _field(1, 1) + ids + _field(4, rng.choice((256, -1, 2**31 - 1)))
    else:
        body = ids + (_submessage(3, _original_host(rng, bad_port)) if rng.random() < 0.7 else b"")
    return original_message(msgid, body)


def original_garbage(rng: random.Random) -> bytes:
    """Random bytes, behind a correct header now and then, or a mutated valid message."""
    pick = rng.randrange(3)
    if pick == 0:
        return original_message(rng.choice(ORIGINAL_IDS), rng.randbytes(rng.randrange(200)))
    if pick == 1:
        data = bytearray(original_valid(rng))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(8, max(len(data), 9)) if len(data) > 8 else 0] = rng.randrange(256)
        return bytes(data)
    return bytes([rng.randrange(8)]) + rng.randbytes(rng.randrange(64))  # sniffed, no more


ORIGINAL_KINDS: dict[str, Callable[[random.Random], bytes]] = {
    "original_garbage": original_garbage,
    "original_bad_protobuf": original_bad_protobuf,
    "original_lying_header": original_lying_header,
    "original_unknown": original_unknown,
    "original_out_of_range": original_out_of_range,
    "original_valid": original_valid,
}


def original_messages(rng: random.Random, kinds: tuple[str, ...], count: int) -> list[bytes]:
    """``count`` whole messages in the original format, of the given kinds."""
    return [ORIGINAL_KINDS[rng.choice(kinds)](rng) for _ in range(count)]
