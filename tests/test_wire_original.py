"""The original Lars wire codec: round trips, the protobuf rules, and the very bytes of the
protobuf library on the original's own ``lars.proto``.

The library check compiles the original's ``lars.proto`` (``../shared/anchor``, or
``$LARS_ANCHOR``) with ``protoc`` into a descriptor set and loads it into the ``protobuf``
package (a test dependency only). Without protoc, the proto or the package it skips, saying
why, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import importlib
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lars import wire
from lars import wire_original as wo
from lars.errors import ProtocolError

REPO = Path(__file__).resolve().parent.parent
ANCHOR = Path(os.environ.get("LARS_ANCHOR", REPO.parent / "shared" / "anchor"))
ORIGINAL_PROTO = ANCHOR / "original" / "base" / "proto" / "lars.proto"
IN_CI = os.environ.get("CI") == "true"

U32 = st.integers(0, 2**32 - 1)
HOST = st.tuples(U32, st.integers(1, 65535))
HOSTS = st.lists(HOST, max_size=20).map(tuple)


def results() -> st.SearchStrategy[tuple[wire.HostResult, ...]]:
    result = st.builds(wire.HostResult, U32, st.integers(1, 65535), U32, U32, st.booleans())
    return st.lists(result, max_size=10).map(tuple)


#: Every message of the original protocol, as the Lars message it decodes to.
MESSAGES: st.SearchStrategy[wire.Message] = st.one_of(
    st.builds(wire.GetRouteRequest, U32, U32),
    st.builds(wire.GetRouteResponse, U32, U32, HOSTS),
    st.builds(wire.ReportStatusRequest, U32, U32, U32, results(), U32, st.just(0)),
    st.builds(wire.GetHostRequest, U32, U32, U32),
    st.builds(wire.GetHostResponse, U32, U32, U32, st.integers(0, 255), st.one_of(st.none(), HOST)),
    st.builds(wire.ReportRequest, U32, U32, HOST, U32),
    st.builds(wire.ApiGetRouteRequest, st.just(0), U32, U32),
    st.builds(wire.ApiGetRouteResponse, st.just(0), U32, U32, st.just(0), HOSTS),
)


# --- round trips ------------------------------------------------------------------------------


@given(MESSAGES)
def test_every_message_round_trips_through_a_datagram(msg: wire.Message) -> None:
    data = wo.encode(msg)
    msgid, msglen = struct.unpack_from("<ii", data)
    assert msgid == msg.TYPE and msglen == len(data) - 8
    assert wo.decode_datagram(data) == msg


@given(st.lists(MESSAGES, min_size=1, max_size=5), st.integers(1, 64))
def test_a_stream_decodes_whatever_way_it_is_cut(messages: list[wire.Message], step: int) -> None:
    stream = b"".join(wo.encode(m) for m in messages)
    decoder = wo.FrameDecoder(1 << 20)
    out: list[wire.Message] = []
    for i in range(0, len(stream), step):
        decoder.feed(stream[i : i + step])
        out.extend(decoder)
    assert out == messages
    assert decoder.buffered == 0


@given(U32, U32, U32, st.integers(0, 255), st.one_of(st.none(), HOST))
def test_the_agents_get_host_reply_is_the_general_encoding(
    seq: int, modid: int, cmdid: int, retcode: int, host: Any
) -> None:
    fast = wo.encode_get_host_response(seq, modid, cmdid, retcode, host)
    assert fast == wo.encode(wire.GetHostResponse(seq, modid, cmdid, retcode, host))


@given(U32, U32, HOSTS)
def test_the_agents_route_reply_is_the_general_encoding(modid: int, cmdid: int, hosts: Any) -> None:
    fast = wo.encode_api_route_response(modid, cmdid, hosts)
    assert fast == wo.encode(wire.ApiGetRouteResponse(0, modid, cmdid, 0, hosts))


@given(
    st.one_of(
        st.builds(wire.GetHostRequest, U32, U32, U32),
        st.builds(wire.ReportRequest, U32, U32, HOST, U32),
        st.builds(wire.ApiGetRouteRequest, st.just(0), U32, U32),
    )
)
def test_the_agents_request_decoder_agrees_with_the_general_one(msg: wire.Message) -> None:
    data = wo.encode(msg)
    assert wo.is_original_datagram(data)
    fast = wo.decode_agent_request(data)
    general = wo.decode_datagram(data)
    if isinstance(general, wire.ReportRequest):
        assert fast == (6, general.modid, general.cmdid, general.host, general.retcode)
    else:
        assert isinstance(general, wire.GetHostRequest | wire.ApiGetRouteRequest)
        assert fast == (msg.TYPE, general.seq, general.modid, general.cmdid)


# --- values -----------------------------------------------------------------------------------


def test_ids_and_ips_of_2_to_the_31_and_above_travel_as_negative_int32() -> None:
    """The original's int32 fields carry Lars's uint32 values bit for bit: 192.168.1.177 is
    the int32 -1062731343, which protobuf writes in ten bytes."""
    ip = 0xC0A801B1
    body = wo.encode_body(wire.GetRouteResponse(2**32 - 1, 1, ((ip, 80),)))[1]
    assert body.startswith(b"\x08" + b"\xff" * 9 + b"\x01")  # modid -1
    assert wo.decode_body(2, body) == wire.GetRouteResponse(2**32 - 1, 1, ((ip, 80),))


def test_zeros_are_left_out_as_protobuf_does() -> None:
    assert wo.encode(wire.GetRouteRequest(0, 0)) == struct.pack("<ii", 1, 0)
    assert wo.decode_datagram(struct.pack("<ii", 7, 0)) == wire.ApiGetRouteRequest(0, 0, 0)
    no_host = wo.encode(wire.GetHostResponse(1, 1, 1, 3, None))
    assert no_host[8:] == b"\x08\x01\x10\x01\x18\x01\x20\x03"  # no field 5


@pytest.mark.parametrize(
    ("msgid", "body", "error"),
    [
        (6, b"\x08\x01\x10\x01\x20\x00", "port out of range: 0"),  # no host
        (6, b"\x1a\x04\x08\x01\x10\x00", "port out of range: 0"),
        (2, b"\x1a\x04\x08\x01\x10\x00", "port out of range: 0"),
        (3, b"\x22\x03\x10\xff\x01", "port out of range: 255"),  # fine: 255 is a port
        (3, b"\x22\x04\x10\x80\x80\x04", "port out of range: 65536"),
        (5, b"\x20\xff\xff\xff\xff\x0f", "retcode out of range: -1"),
    ],
)
def test_values_lars_cannot_take_are_invalid_not_malformed(
    msgid: int, body: bytes, error: str
) -> None:
    if error.endswith(": 255"):
        decoded = wo.decode_body(msgid, body)
        assert isinstance(decoded, wire.ReportStatusRequest)
        assert decoded.results[0].port == 255
        return
    with pytest.raises(ProtocolError, match=error) as caught:
        wo.decode_body(msgid, body)
    assert caught.value.msg_type == msgid


def test_counts_the_original_cannot_carry_are_refused_on_encoding() -> None:
    report = wire.ReportStatusRequest(1, 1, 1, (wire.HostResult(1, 80, 2**32, 0, False),), 1)
    with pytest.raises(ProtocolError, match="succ"):
        wo.encode(report)
    with pytest.raises(ProtocolError, match="no StatsRequest"):
        wo.encode(wire.StatsRequest(1))


# --- the protobuf rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b"\x08\x05\x08\x07", [7, 0, 0]),  # the last occurrence wins
        (b"\x18\x03\x10\x02\x08\x01", [1, 2, 3]),  # any order
        (b"\x0d\x01\x00\x00\x00\x08\x02", [2, 0, 0]),  # field 1 as fixed32: skipped
        (b"\x20\x09\x32\x02ab\x39" + bytes(8) + b"\x10\x04", [0, 4, 0]),  # unknown fields
        (b"\x23\x08\x01\x24\x08\x03", [3, 0, 0]),  # an unknown group, skipped
        (b"\x88\x80\x00\x09", [9, 0, 0]),  # a tag in three bytes
        (b"\x08" + b"\xff" * 9 + b"\x7f", [2**32 - 1, 0, 0]),  # bits past 64 dropped
        (b"\x1b" * 100 + b"\x1c" * 100, [0, 0, 0]),  # groups nested 100 deep: the limit
    ],
)
def test_protobuf_rules(body: bytes, fields: list[int]) -> None:
    assert wo.parse_body(wo.GET_HOST_REQUEST, body) == fields


def test_a_submessage_that_occurs_twice_is_merged() -> None:
    body = b"\x2a\x02\x08\x01\x2a\x02\x10\x05"
    assert wo.parse_body(wo.GET_HOST_RESPONSE, body)[4] == [1, 5]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x00", "field number 0"),
        (b"\x88\x80\x80\x80\x80\x00", "longer than 5 bytes"),  # a tag in six bytes
        (b"\x80\x80\x80\x80\x10", "2\\*\\*32"),
        (b"\x0e", "wire type 6"),
        (b"\x0f", "wire type 7"),
        (b"\x0c", "without its start"),
        (b"\x1b\x2c", "ended by the end of 5"),
        (b"\x1b", "group without its end"),
        (b"\x1b" * 101 + b"\x1c" * 101, "nested too deeply"),
        (b"\x12\x05abc", "past the end"),
        (b"\x09" + bytes(7), "truncated fixed-size"),
    ],
)
def test_malformed_bodies(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as caught:
        wo.decode_body(wo.GET_HOST_REQUEST, body)
    assert caught.value.msg_type is None


@given(st.integers(1, 8), st.binary(max_size=64))
@example(6, b"\x1a\x80\x01")
def test_any_bytes_decode_to_a_message_that_round_trips_or_raise_protocol_error(
    msgid: int, body: bytes
) -> None:
    try:
        msg = wo.decode_body(msgid, body)
    except ProtocolError as exc:
        assert exc.msg_type in (None, msgid)
        return
    assert msgid == msg.TYPE
    assert wo.decode_body(*wo.encode_body(msg)) == msg


@given(st.binary(max_size=80))
def test_any_datagram_to_the_agent_decodes_or_raises_protocol_error(data: bytes) -> None:
    try:
        request = wo.decode_agent_request(data)
    except ProtocolError:
        return
    assert request[0] in (4, 6, 7)


# --- framing ----------------------------------------------------------------------------------


def test_datagram_framing() -> None:
    good = wo.encode(wire.GetHostRequest(1, 2, 3))
    assert wo.decode_datagram(good) == wire.GetHostRequest(1, 2, 3)
    for bad, why in (
        (good[:7], "shorter than its header"),
        (good + b"\x00", "msglen 6 but 7 bytes"),
        (good[:-1], "msglen 6 but 5 bytes"),
        (struct.pack("<ii", 4, -1), "msglen -1"),
        (struct.pack("<ii", 99, 0), "unknown message id 99"),
    ):
        with pytest.raises(ProtocolError, match=why):
            wo.decode_datagram(bad)
        with pytest.raises(ProtocolError):
            wo.decode_agent_request(bad)
    with pytest.raises(ProtocolError, match="not a request to the agent"):
        wo.decode_agent_request(wo.encode(wire.GetRouteRequest(1, 1)))


def test_a_frame_the_role_does_not_serve_costs_that_frame_only() -> None:
    decoder = wo.FrameDecoder(1024, serves=(wo.GET_ROUTE_REQUEST,))
    decoder.feed(
        wo.encode(wire.GetHostRequest(1, 1, 1))
        + struct.pack("<ii", 1, 2)
        + b"\x08\x80"  # a body that does not decode: a truncated varint
        + struct.pack("<ii", 77, 1)
        + b"x"  # an unknown msgid
        + wo.encode(wire.GetRouteRequest(5, 6))
    )
    out: list[Any] = []
    while True:
        try:
            out.extend(decoder)
            break
        except ProtocolError as exc:
            assert exc.msg_type is not None
            out.append(exc.msg_type)
    assert out == [4, 1, 77, wire.GetRouteRequest(5, 6)]


@pytest.mark.parametrize("msglen", [-1, -(2**31), 1025, 2**31 - 1])
def test_a_broken_framing_is_refused_before_the_body(msglen: int) -> None:
    decoder = wo.FrameDecoder(1024)
    decoder.feed(struct.pack("<ii", 1, msglen))
    with pytest.raises(ProtocolError) as caught:
        list(decoder)
    assert caught.value.msg_type is None


@pytest.mark.parametrize(
    ("prefix", "original"),
    [
        (b"", None),
        (b"\x00", False),  # a Lars frame under 16 MiB
        (b"\x00\x00\x00\x01", False),
        (b"\x01", None),
        (b"\x01\x00\x00", None),
        (b"\x01\x00\x00\x00", True),  # GetRouteRequest
        (b"\x03\x00\x00\x00\x10", True),  # ReportStatusRequest
        (b"\x01\x00\x00\x10", False),  # a Lars frame of 16 MiB + 16
        (b"\x40\x00\x00\x00", False),  # a Lars frame of 1 GiB: refused by its header
        (b"GET ", False),
    ],
)
def test_sniffing_a_stream(prefix: bytes, original: bool | None) -> None:
    assert wo.sniff_stream(prefix) is original


def test_datagrams_in_the_original_format_are_told_by_their_first_byte() -> None:
    assert wo.is_original_datagram(wo.encode(wire.GetHostRequest(1, 1, 1)))
    assert wo.is_original_datagram(b"")  # refused by the original decoder, as too short
    assert not wo.is_original_datagram(wire.encode_get_host_request(1, 1, 1))
    for first in (0x90, 0x9F, 0xDC, 0xDD):  # every msgpack array
        assert not wo.is_original_datagram(bytes([first]) + b"\x00" * 8)


def test_a_failed_request_gets_an_answer_its_client_can_read() -> None:
    reply = wo.system_error_reply(wo.encode(wire.GetHostRequest(9, 1, 2)))
    assert reply is not None
    assert wo.decode_datagram(reply) == wire.GetHostResponse(9, 1, 2, 2, None)
    reply = wo.system_error_reply(wo.encode(wire.ApiGetRouteRequest(0, 1, 2)))
    assert reply is not None
    assert wo.decode_datagram(reply) == wire.ApiGetRouteResponse(0, 1, 2, 0, ())
    assert wo.system_error_reply(b"\x06garbage") is None


# --- against the protobuf library on the original's lars.proto --------------------------------


def _unavailable(why: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{why} (in CI the cross-check with the protobuf library must run)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """The original's messages as protobuf classes, by msgid."""
    try:  # imported by name: a test dependency, without type stubs
        descriptor_pb2 = importlib.import_module("google.protobuf.descriptor_pb2")
        descriptor_pool = importlib.import_module("google.protobuf.descriptor_pool")
        message_factory = importlib.import_module("google.protobuf.message_factory")
    except ImportError:
        _unavailable("the protobuf package is not installed (pip install -e '.[test]')")
    protoc = shutil.which("protoc")
    if protoc is None:
        _unavailable("protoc is not installed (Debian's protobuf-compiler)")
    if not ORIGINAL_PROTO.is_file():
        _unavailable(f"the original's lars.proto is not at {ORIGINAL_PROTO} (set LARS_ANCHOR)")
    out = tmp_path_factory.mktemp("proto") / "lars.desc"
    subprocess.run(
        [protoc, f"-I{ORIGINAL_PROTO.parent}", f"--descriptor_set_out={out}", "lars.proto"],
        check=True,
    )
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)

    def cls(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"lars.{name}"))

    route_request, route_response = cls("GetRouteRequest"), cls("GetRouteResponse")
    return {
        1: route_request,
        2: route_response,
        3: cls("ReportStatusRequest"),
        4: cls("GetHostRequest"),
        5: cls("GetHostResponse"),
        6: cls("ReportRequest"),
        7: route_request,
        8: route_response,
    }


def _as_fields(message: Any) -> list[Any]:
    """A library message as parse_body's list (int32 values as their low 32 bits)."""
    fields: list[Any] = []
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                fields.append([_as_fields(item) for item in value])
            else:
                fields.append(_as_fields(value) if message.HasField(field.name) else None)
        elif isinstance(value, bool):
            fields.append(value)
        else:
            fields.append(value & 0xFFFF_FFFF)
    return fields


def _library_parse(library: dict[int, Any], msgid: int, body: bytes) -> list[Any] | None:
    decode_error = importlib.import_module("google.protobuf.message").DecodeError
    try:
        return _as_fields(library[msgid].FromString(body))
    except decode_error:
        return None


def _ours(msgid: int, body: bytes) -> list[Any] | None:
    try:
        return wo.parse_body(msgid, body)
    except ProtocolError:
        return None


@settings(max_examples=300)
@given(MESSAGES)
def test_the_bytes_are_the_protobuf_librarys(library: dict[int, Any], msg: wire.Message) -> None:
    msgid, body = wo.encode_body(msg)
    parsed = library[msgid].FromString(body)
    assert parsed.SerializeToString() == body  # the library writes exactly these bytes
    assert _as_fields(parsed) == wo.parse_body(msgid, body)


#: Pieces of protobuf that random bytes seldom make: every tag of every field number 1-5 and
#: wire type, one byte of a long varint, lengths, zeros.
PIECES = [bytes([n << 3 | t]) for n in range(6) for t in range(8)] + [
    b"\x80",
    b"\xff",
    b"\x01",
    b"\x02",
    b"\x05",
    b"\x7f",
    b"\x00",
]


@settings(max_examples=2000)
@given(
    st.integers(1, 8),
    st.one_of(st.binary(max_size=40), st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)),
)
def test_any_bytes_parse_as_the_protobuf_library_parses_them(
    library: dict[int, Any], msgid: int, body: bytes
) -> None:
    """Accepted by one iff accepted by the other, with the same values: every rule of the
    format the codec follows, checked against the reference."""
    assert _ours(msgid, body) == _library_parse(library, msgid, body)


@pytest.mark.parametrize(
    "body",
    [
        b"\x1b\x00\x00\x1c",  # field number 0 inside a group: the library lets it pass
        b"\x1b\x03\x04\x1c",  # a group 0 inside a group
        b"\x2a" + bytes([200]) + b"\x1b" * 100 + b"\x1c" * 100,  # too deep inside a submessage
        b"\x2a" + bytes([198]) + b"\x1b" * 99 + b"\x1c" * 99,  # just deep enough
        b"\x12\x81\x80\x80\x80\x00\x05",  # a length in five bytes
        b"\x12\x81\x80\x80\x80\x80\x00\x05",  # ... and in six
        b"\x2a\x81\x80\x80\x80\x00\x08",
        b"\x08" + b"\x80" * 9 + b"\x02",  # 2**64: zero
    ],
)
def test_edge_cases_parse_as_the_protobuf_library_parses_them(
    library: dict[int, Any], body: bytes
) -> None:
    for msgid in (wo.GET_HOST_REQUEST, wo.GET_HOST_RESPONSE):
        assert _ours(msgid, body) == _library_parse(library, msgid, body)


def _as_agent_tuple(data: bytes) -> tuple[Any, ...]:
    """What decode_agent_request should return, through the general decoder."""
    try:
        msg = wo.decode_datagram(data)
    except ProtocolError as exc:
        return ("refused", exc.msg_type)
    if isinstance(msg, wire.GetHostRequest):
        return (4, msg.seq, msg.modid, msg.cmdid)
    if isinstance(msg, wire.ReportRequest):
        return (6, msg.modid, msg.cmdid, msg.host, msg.retcode)
    if isinstance(msg, wire.ApiGetRouteRequest):
        return (7, 0, msg.modid, msg.cmdid)
    return ("refused", None)


@st.composite
def agent_bodies(draw: st.DrawFn) -> tuple[int, bytes]:
    """A request's body as the serializer writes it, now and then with a piece of protobuf
    put in or bytes cut off: what takes the fast path and what only nearly does."""
    msg = draw(
        st.one_of(
            st.builds(wire.GetHostRequest, U32, U32, U32),
            st.builds(wire.ReportRequest, U32, U32, st.tuples(U32, st.integers(0, 70000)), U32),
        )
    )
    msgid, body = wo.encode_body(msg)
    at = draw(st.integers(0, len(body)))
    change = draw(st.sampled_from(["none", "insert", "cut"]))
    if change == "insert":
        body = body[:at] + draw(st.sampled_from(PIECES)) + body[at:]
    elif change == "cut":
        body = body[:at]
    return msgid, body


@settings(max_examples=3000)
@given(agent_bodies())
def test_the_agents_fast_path_agrees_with_the_general_parser(request: tuple[int, bytes]) -> None:
    msgid, body = request
    data = struct.pack("<ii", msgid, len(body)) + body
    try:
        fast: tuple[Any, ...] = wo.decode_agent_request(data)
    except ProtocolError as exc:
        fast = ("refused", exc.msg_type)
    assert fast == _as_agent_tuple(data)


def test_a_report_decoded_once_is_remembered_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wo, "_REPORTS", {})
    monkeypatch.setattr(wo, "_REPORTS_SIZE", 8)
    data = wo.encode(wire.ReportRequest(1, 2, (167772161, 7001), 0))
    first = wo.decode_agent_request(data)
    assert first == (6, 1, 2, (167772161, 7001), 0) == _as_agent_tuple(data)
    assert wo.decode_agent_request(data) is first  # from memory: one dict lookup
    # not hashable: decoded afresh (the agent passes bytes; the decoder takes any buffer)
    assert wo.decode_agent_request(bytearray(data)) == first  # type: ignore[arg-type]
    for port in range(1, 50):
        wo.decode_agent_request(wo.encode(wire.ReportRequest(1, 2, (167772161, port), 1)))
        assert len(wo._REPORTS) <= 8
    # what is refused is not remembered
    bad = wo.encode(wire.ReportRequest(1, 2, (167772161, 7001), 0))[:-3]
    with pytest.raises(ProtocolError):
        wo.decode_agent_request(bad)
    assert bad not in wo._REPORTS
