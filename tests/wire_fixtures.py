"""The wire fixtures of the C++ and Java clients: what the Python codec and client make of bytes.

``clients/conformance/wire_fixtures.json`` is generated from :mod:`lars.wire` and
:class:`lars.client.ClientCore`, so the other clients' unit tests check their codecs against
the reference rather than against their authors' reading of it. Regenerate after a protocol
change (``tests/e2e/test_conformance.py`` fails while the file is stale)::

    python -m tests.wire_fixtures > clients/conformance/wire_fixtures.json

Sections:

* ``encode``: requests and the exact bytes (hex) the Python client sends for them.
* ``decode``: datagrams an agent could send, each with what the Python client reads in it
  (``reply``: null when it is discarded as garbage) and what ``get_host`` and ``get_route``
  make of it when its seq is the one awaited (a host, the hosts, or an error's name).
* ``ip``: dotted IPv4 text and its integer (null: the text is rejected).
* ``port``: the agent port of a module (``base_port + (modid + cmdid) % ports``, no overflow).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgpack

from lars import wire
from lars.client import ClientCore
from lars.core.model import Host, ip_to_int
from lars.errors import LarsError

U32 = 2**32 - 1
_pack = msgpack.Packer(use_bin_type=True).pack

#: (seq, modid, cmdid) of the request encodings.
REQUESTS = [
    (0, 0, 0),
    (1, 1, 1),
    (127, 128, 255),
    (256, 65535, 65536),
    (12345, 1, 2),
    (U32, U32, U32),
]

#: (modid, cmdid, ip text, port, retcode) of the report encodings.
REPORTS = [
    (1, 1, "10.0.0.1", 7001, 0),
    (1, 2, "0.0.0.0", 1, 1),
    (300, 70000, "192.168.1.200", 8080, 255),
    (U32, 0, "255.255.255.255", 65535, U32),
    (7, 7, "010.000.000.001", 80, 4),
]

IPS = [
    "10.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "127.0.0.1",
    "010.000.000.001",
    "256.0.0.1",
    "1.2.3",
    "1.2.3.4.5",
    "a.b.c.d",
    "1..2.3",
    "",
    " 1.2.3.4",
    "1.2.3.4 ",
    "+1.2.3.4",
    "-1.2.3.4",
    "1.2.3.0004",
    "0x1.2.3.4",
    "\u0661.2.3.4",
]

#: (base_port, ports, modid, cmdid); the last ones overflow 32 bits when added.
PORTS = [
    (8888, 3, 0, 0),
    (8888, 3, 1, 1),
    (8888, 3, 2, 2),
    (20000, 1, 5, 9),
    (20000, 7, 100, 3),
    (8888, 3, U32, U32),
    (8888, 3, U32, 1),
    (8888, 3, 4294960000, 4294967295),
    (30000, 5, 3000000000, 3000000000),
]


def _decode_cases() -> list[tuple[str, bytes]]:
    """Datagrams an agent could send: valid replies of each kind, then garbage."""
    host = [167772161, 7001]
    valid: list[tuple[str, Any]] = [
        ("get_host ok", [5, 7, 1, 1, 0, host]),
        ("get_host extremes", [5, U32, U32, U32, 0, [U32, 65535]]),
        ("get_host overload", [5, 7, 1, 1, 1, None]),
        ("get_host overload with a host", [5, 7, 1, 1, 1, [1, 2]]),
        ("get_host system error", [5, 7, 1, 1, 2, None]),
        ("get_host noexist", [5, 7, 1, 1, 3, None]),
        ("get_host bad request", [5, 7, 1, 1, 4, None]),
        ("get_host unknown retcode", [5, 7, 1, 1, 200, None]),
        ("get_host succ without a host", [5, 7, 1, 1, 0, None]),
        ("get_host for another module", [5, 7, 9, 9, 0, host]),
        ("get_route two hosts", [8, 7, 1, 1, 0, [host, [3232235976, 8080]]]),
        ("get_route empty", [8, 7, 1, 1, 0, []]),
        ("get_route noexist", [8, 7, 1, 1, 3, []]),
        ("get_route overload", [8, 7, 1, 1, 1, []]),
        ("error reply", [9, 7, 4, "modid out of range: 4294967296"]),
        ("error reply system", [9, 7, 2, "internal error: KeyError"]),
        ("error reply 64-bit seq", [9, 2**40, 4, "x"]),
        ("error reply empty reason", [9, 7, 4, ""]),
        ("error reply unicode reason", [9, 7, 2, "d\u00e9j\u00e0 vu \u2713"]),
        ("stats response", [15, 7, "agent", {"requests": 1}]),
        ("get_host request echoed", [4, 7, 1, 1]),
        ("get_host garbage: port 0", [5, 7, 1, 1, 0, [1, 0]]),
        ("get_host garbage: port 65536", [5, 7, 1, 1, 0, [1, 65536]]),
        ("get_host garbage: ip 2**32", [5, 7, 1, 1, 0, [2**32, 80]]),
        ("get_host garbage: negative ip", [5, 7, 1, 1, 0, [-1, 80]]),
        ("get_host garbage: seq -1", [5, -1, 1, 1, 0, host]),
        ("get_host garbage: seq 2**32", [5, 2**32, 1, 1, 0, host]),
        ("get_host garbage: modid 2**32", [5, 7, 2**32, 1, 0, host]),
        ("get_host garbage: retcode 256", [5, 7, 1, 1, 256, None]),
        ("get_host garbage: 4 fields", [5, 7, 1, 1, 0]),
        ("get_host garbage: 6 fields", [5, 7, 1, 1, 0, host, 9]),
        ("get_host garbage: bool seq", [5, True, 1, 1, 0, host]),
        ("get_host garbage: float seq", [5, 7.0, 1, 1, 0, host]),
        ("get_host garbage: string seq", [5, "7", 1, 1, 0, host]),
        ("get_host garbage: host of 3", [5, 7, 1, 1, 0, [1, 2, 3]]),
        ("get_host garbage: host as map", [5, 7, 1, 1, 0, {"ip": 1, "port": 2}]),
        ("get_host garbage: host of strings", [5, 7, 1, 1, 0, ["10.0.0.1", 80]]),
        ("get_route garbage: one bad host", [8, 7, 1, 1, 0, [host, [1, 0]]]),
        ("get_route garbage: hosts not an array", [8, 7, 1, 1, 0, 5]),
        ("get_route garbage: host not an array", [8, 7, 1, 1, 0, [5]]),
        ("error reply garbage: code 256", [9, 7, 256, "x"]),
        ("error reply garbage: seq -1", [9, -1, 4, "x"]),
        ("error reply garbage: no reason", [9, 7, 4]),
        ("error reply garbage: reason nil", [9, 7, 4, None]),
        ("garbage: unknown type", [99, 7]),
        ("garbage: string type", ["5", 7, 1, 1, 0, host]),
        ("garbage: negative type", [-5, 7, 1, 1, 0, host]),
        ("garbage: empty array", []),
        ("garbage: a map", {"type": 5}),
        ("garbage: an integer", 5),
        ("garbage: nil", None),
    ]
    cases = [(name, _pack(obj)) for name, obj in valid]
    ok = _pack([5, 7, 1, 1, 0, host])
    cases += [
        # A uint64 (0xcf) holding a small value: not minimal, still valid msgpack.
        ("get_host ok, wide integers", b"\x96\x05\xcf" + (7).to_bytes(8, "big") + ok[3:]),
        ("garbage: empty datagram", b""),
        ("garbage: reserved byte 0xc1", b"\xc1"),
        ("garbage: truncated", ok[:-1]),
        ("garbage: trailing byte", ok + b"\x00"),
        ("garbage: two messages", ok + ok),
        ("error reply garbage: reason as bin", b"\x94\x09\x07\x04\xc4\x01x"),
        ("error reply garbage: reason not utf-8", b"\x94\x09\x07\x04\xa2\xff\xfe"),
        ("garbage: array header beyond the data", b"\xdd\xff\xff\xff\xff\x05"),
    ]
    return cases


def _reply(core: ClientCore, data: bytes) -> Any:
    got = core.reply(data)
    if got is None:
        return None
    seq, msg = got
    if isinstance(msg, wire.GetHostResponse):
        return {
            "type": msg.TYPE,
            "seq": seq,
            "modid": msg.modid,
            "cmdid": msg.cmdid,
            "retcode": msg.retcode,
            "host": None if msg.host is None else list(msg.host),
        }
    if isinstance(msg, wire.ApiGetRouteResponse):
        return {
            "type": msg.TYPE,
            "seq": seq,
            "modid": msg.modid,
            "cmdid": msg.cmdid,
            "retcode": msg.retcode,
            "hosts": [list(h) for h in msg.hosts],
        }
    if isinstance(msg, wire.ErrorReply):
        return {"type": msg.TYPE, "seq": seq, "code": msg.code, "reason": msg.reason}
    return {"type": msg.TYPE, "seq": seq}


def _outcome(call: Any) -> Any:
    """What a client call makes of a reply: its value, or the name of the error it raises."""
    try:
        value = call()
    except LarsError as exc:
        return {"error": type(exc).__name__}
    if isinstance(value, Host):
        return {"host": str(value)}
    return {"hosts": [str(h) for h in value]}


def fixtures() -> dict[str, Any]:
    """The whole fixture document."""
    core = ClientCore()
    decode = []
    for name, data in _decode_cases():
        reply = _reply(core, data)
        case: dict[str, Any] = {"name": name, "hex": data.hex(), "reply": reply}
        if reply is not None:
            msg = core.reply(data)[1]  # type: ignore[index]
            case["get_host"] = _outcome(lambda msg=msg: core.host_result(msg, 1, 1))
            case["get_route"] = _outcome(lambda msg=msg: core.route_result(msg, 1, 1))
        decode.append(case)

    ips: list[dict[str, Any]] = []
    for text in IPS:
        try:
            value: int | None = ip_to_int(text)
        except LarsError:
            value = None
        ips.append({"text": text, "int": value})

    return {
        "comment": "Generated by `python -m tests.wire_fixtures`; do not edit by hand.",
        "encode": {
            "get_host_request": [
                {
                    "seq": s,
                    "modid": m,
                    "cmdid": c,
                    "hex": wire.encode_get_host_request(s, m, c).hex(),
                }
                for s, m, c in REQUESTS
            ],
            "get_route_request": [
                {
                    "seq": s,
                    "modid": m,
                    "cmdid": c,
                    "hex": wire.encode_datagram(wire.ApiGetRouteRequest(s, m, c)).hex(),
                }
                for s, m, c in REQUESTS
            ],
            "report_request": [
                {
                    "modid": m,
                    "cmdid": c,
                    "ip": ip,
                    "port": port,
                    "retcode": rc,
                    "hex": core.report_request(m, c, Host(ip, port), None, rc).hex(),
                }
                for m, c, ip, port, rc in REPORTS
            ],
        },
        "decode": decode,
        "ip": ips,
        "port": [
            {
                "base_port": base,
                "ports": n,
                "modid": m,
                "cmdid": c,
                "port": ClientCore(base_port=base, ports=n).port(m, c),
            }
            for base, n, m, c in PORTS
        ],
    }


def render() -> str:
    """The fixture file's text."""
    return json.dumps(fixtures(), indent=1, ensure_ascii=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
