from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lars import wire
from lars.errors import ProtocolError
from lars.wire import (
    AgentStateRequest,
    AgentStateResponse,
    ApiGetRouteRequest,
    ApiGetRouteResponse,
    ErrorReply,
    FrameDecoder,
    GetHostReportRequest,
    GetHostRequest,
    GetHostResponse,
    GetRouteRequest,
    GetRouteResponse,
    HostResult,
    ReportRequest,
    ReportStatusAck,
    ReportStatusRequest,
    RouteChangeNotice,
    StatsRequest,
    StatsResponse,
    decode_datagram,
    encode_datagram,
    encode_frame,
)

SAMPLES: list[wire.Message] = [
    GetRouteRequest(1, 2),
    GetRouteResponse(1, 2, ((167772161, 7001), (167772162, 7002))),
    GetRouteResponse(1, 2, ()),
    ReportStatusRequest(
        1, 2, 2130706433, (HostResult(167772161, 7001, 10, 2, False),), 1_700_000_000, 7
    ),
    GetHostRequest(9, 1, 2),
    GetHostResponse(9, 1, 2, 0, (167772161, 7001)),
    GetHostResponse(9, 1, 2, 3, None),
    ReportRequest(1, 2, (167772161, 7001), 0),
    ApiGetRouteRequest(3, 1, 2),
    ApiGetRouteResponse(3, 1, 2, 0, ((167772161, 7001),)),
    ErrorReply(3, 4, "modid out of range"),
    AgentStateRequest(5, 1, 2),
    AgentStateRequest(5, 1, 2, 256),
    AgentStateResponse(5, 1, 2, 0, {"status": "ready", "hosts": ()}),
    RouteChangeNotice(1_700_000_000),
    ReportStatusAck(7),
    StatsRequest(11),
    StatsResponse(11, "dns", {"connections": 3}),
    GetHostReportRequest(9, 1, 2, ((1, 2, 167772161, 7001, 0), (1, 3, 167772162, 7002, 1))),
    GetHostReportRequest(9, 1, 2, ()),
]


def test_type_ids_are_those_of_the_original_lars() -> None:
    assert [m.TYPE for m in SAMPLES[:11]] == [1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_as_datagram_and_frame(msg: wire.Message) -> None:
    assert decode_datagram(encode_datagram(msg)) == msg
    decoder = FrameDecoder()
    decoder.feed(encode_frame(msg))
    assert list(decoder) == [msg]


def test_datagram_is_a_msgpack_array_led_by_the_type() -> None:
    assert msgpack.unpackb(encode_datagram(GetHostRequest(9, 1, 2))) == [4, 9, 1, 2]


def test_frame_is_length_prefixed() -> None:
    frame = encode_frame(GetRouteRequest(1, 2))
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4


def test_frames_split_at_every_byte_boundary_decode_in_order() -> None:
    stream = b"".join(encode_frame(m) for m in SAMPLES)
    decoder = FrameDecoder()
    out: list[wire.Message] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(decoder)
    assert out == SAMPLES
    assert decoder.buffered == 0


def test_oversized_frame_is_rejected_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(struct.pack("!I", 101))  # only the header: nothing of the body yet
    with pytest.raises(ProtocolError, match="exceeds"):
        list(decoder)


def test_empty_frame_is_malformed() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack("!I", 0))
    with pytest.raises(ProtocolError):
        list(decoder)


def test_encoding_refuses_a_message_over_the_limit() -> None:
    big = GetRouteResponse(1, 1, tuple((i, 1) for i in range(20000)))
    with pytest.raises(ProtocolError):
        encode_datagram(big)
    with pytest.raises(ProtocolError):
        encode_frame(big, max_size=1000)


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {},
        "hello",
        [99, 1, 2],  # unknown type
        [4, 1, 2],  # GetHostRequest with a field missing
        [4, 1, 2, 3, 4],  # one field too many
        [4, "1", 2, 3],  # wrong kind
        [4, True, 2, 3],  # a bool is not an integer here
        [4, 1.5, 2, 3],
        [6, 1, 2, [1], 0],  # host must be [ip, port]
        [6, 1, 2, "10.0.0.1:80", 0],
        [3, 1, 2, 3, [[1, 2, 3]], 5, 1],  # a result with 3 of 5 elements
        [11, 1, 2, 3, 0, []],  # state must be a map
    ],
)
def test_malformed_messages_raise_protocol_error(obj: object) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_datagram(msgpack.packb(obj))
    assert info.value.msg_type is None


@pytest.mark.parametrize(
    ("obj", "seq"),
    [
        ([4, 7, 2**32, 1], 7),  # modid out of range
        ([4, 7, 1, -1], 7),  # negative cmdid
        ([7, 8, 1, 2**40], 8),
        ([6, 1, 2, [1, 0], 0], None),  # port 0: no seq in a ReportRequest
        ([6, 1, 2, [2**32, 80], 0], None),  # ip out of range
    ],
)
def test_well_formed_requests_with_invalid_values_carry_type_and_seq(
    obj: list[object], seq: int | None
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_datagram(msgpack.packb(obj))
    assert info.value.msg_type == obj[0]
    assert info.value.seq == seq


def test_invalid_seq_itself_is_not_echoed() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_datagram(msgpack.packb([4, 2**33, 1, 1]))
    assert info.value.seq is None


@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_datagram(data)


@given(st.binary(max_size=300))
def test_random_streams_only_ever_raise_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=128)
    decoder.feed(data)
    with contextlib.suppress(ProtocolError):
        list(decoder)


@given(st.sampled_from(SAMPLES), st.data())
def test_truncated_messages_raise_protocol_error(msg: wire.Message, data: st.DataObject) -> None:
    body = encode_datagram(msg)
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    with pytest.raises(ProtocolError):
        decode_datagram(body[:cut])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=12,
)


@given(st.integers(min_value=0, max_value=20), st.lists(msgpack_values, max_size=6))
def test_random_arrays_with_valid_type_ids_only_raise_protocol_error(
    msg_type: int, fields: list[object]
) -> None:
    try:
        msg = decode_datagram(msgpack.packb([msg_type, *fields]))
    except ProtocolError:
        return
    # Whatever decoded must re-encode to an equal message.
    assert decode_datagram(encode_datagram(msg)) == msg


def test_wire_does_not_import_trio() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(wire))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "msgpack" in imported
    assert "trio" not in imported


def test_hot_path_encoders_match_the_generic_encoder() -> None:
    assert wire.encode_get_host_request(7, 1, 2) == encode_datagram(GetHostRequest(7, 1, 2))
    for host in ((167772161, 7001), None):
        assert wire.encode_get_host_response(7, 1, 2, 0, host) == encode_datagram(
            GetHostResponse(7, 1, 2, 0, host)
        )
    assert wire.encode_report_request(1, 2, (167772161, 7001), 3) == encode_datagram(
        ReportRequest(1, 2, (167772161, 7001), 3)
    )
    reports = [(1, 2, 167772161, 7001, 0), (5, 6, 167772162, 80, 7)]
    assert wire.encode_get_host_report_request(7, 1, 2, reports) == encode_datagram(
        GetHostReportRequest(7, 1, 2, tuple(reports))
    )


_report_entries = st.lists(
    st.one_of(
        st.tuples(
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
            st.integers(-1, 70000),
            st.integers(-1, 2**33),
        ),
        st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9), st.integers(1, 9)),
        msgpack_values,
    ),
    max_size=4,
)


@given(
    st.one_of(
        st.tuples(st.just(4), msgpack_values, msgpack_values, msgpack_values),
        st.tuples(st.just(6), msgpack_values, msgpack_values, msgpack_values, msgpack_values),
        st.tuples(
            st.just(6),
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
            st.tuples(st.integers(-1, 2**33), st.integers(-1, 70000)),
            st.integers(-1, 2**33),
        ),
        st.tuples(
            st.sampled_from([4, 4.0, True, 6, 6.0]),
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
        ),
        st.tuples(
            st.sampled_from([16, 16.0]),
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
            st.integers(-1, 2**33),
            st.one_of(_report_entries, msgpack_values),
        ),
        st.binary(max_size=30),
    )
)
def test_agent_fast_path_decodes_exactly_like_the_general_decoder(obj: object) -> None:
    data = obj if isinstance(obj, bytes) else msgpack.packb(obj)
    try:
        general: object = decode_datagram(data)
    except ProtocolError as exc:
        general = ("error", exc.msg_type, exc.seq)
    try:
        fast: object = wire.decode_agent_request(data)
    except ProtocolError as exc:
        fast = ("error", exc.msg_type, exc.seq)
    if isinstance(fast, tuple) and fast and fast[0] != "error":
        assert isinstance(general, GetHostRequest | ReportRequest | GetHostReportRequest)
        assert fast == (general.TYPE, *general._values())
    else:
        assert fast == general


def test_agent_fast_path_returns_tuples_for_the_hot_messages() -> None:
    assert wire.decode_agent_request(encode_datagram(GetHostRequest(7, 1, 2))) == (4, 7, 1, 2)
    report = encode_datagram(ReportRequest(1, 2, (167772161, 80), 0))
    assert wire.decode_agent_request(report) == (6, 1, 2, (167772161, 80), 0)
    assert wire.decode_agent_request(encode_datagram(StatsRequest(3))) == StatsRequest(3)
    reports = ((1, 2, 167772161, 80, 0), (1, 2, 167772162, 81, 1))
    piggyback = encode_datagram(GetHostReportRequest(7, 1, 2, reports))
    assert wire.decode_agent_request(piggyback) == (16, 7, 1, 2, reports)


def test_a_field_added_later_may_be_omitted_by_an_older_peer() -> None:
    # AgentStateRequest gained ``offset``: the three-field form still decodes.
    assert wire.decode_datagram(msgpack.packb([10, 5, 1, 2])) == AgentStateRequest(5, 1, 2, 0)
    assert wire.decode_datagram(msgpack.packb([10, 5, 1, 2, 9])) == AgentStateRequest(5, 1, 2, 9)
    # ... and later ``explain`` (issue 14)
    assert wire.decode_datagram(msgpack.packb([10, 5, 1, 2, 9, 1])) == AgentStateRequest(
        5, 1, 2, 9, 1
    )
    with pytest.raises(ProtocolError, match="takes 3 to 5 fields, got 2"):
        wire.decode_datagram(msgpack.packb([10, 5, 1]))
    with pytest.raises(ProtocolError, match="takes 3 fields, got 4"):  # no added field
        wire.decode_datagram(msgpack.packb([4, 5, 1, 2, 3]))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", b"\x91\x01\x02", b"\xdd" * 3])
def test_undecodable_bytes_say_why(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_datagram(data)
    reason = str(info.value).removeprefix("not a msgpack message:").strip()
    assert reason, "the reason must not be empty"


def test_peek_seq_finds_a_request_seq_or_nothing() -> None:
    assert wire.peek_seq(msgpack.packb([4, 77, 1, 1])) == 77
    assert wire.peek_seq(msgpack.packb([10, 5, "x"])) == 5  # malformed, seq still readable
    assert wire.peek_seq(msgpack.packb([6, 1, 1, [1, 1], 0])) is None  # a report has none
    assert wire.peek_seq(msgpack.packb([4, -1, 1, 1])) is None
    assert wire.peek_seq(msgpack.packb([[{}], 1])) is None
    assert wire.peek_seq(b"\xc1") is None


def test_an_error_reply_echoes_a_64_bit_seq() -> None:
    # A ReportStatusAck (64-bit seq) sent where it is not served is answered with its seq.
    reply = ErrorReply(2**64 - 1, 4, "not served")
    assert wire.decode_datagram(wire.encode_datagram(reply)) == reply


def test_the_decoder_says_when_a_frame_has_started() -> None:
    frame = wire.encode_frame(wire.StatsRequest(3))
    decoder = wire.FrameDecoder()
    assert not decoder.in_frame
    decoder.feed(frame[:4])  # the length header alone
    assert decoder.in_frame
    assert list(decoder) == [] and decoder.in_frame  # header consumed, body due
    decoder.feed(frame[4:])
    assert list(decoder) == [wire.StatsRequest(3)]
    assert not decoder.in_frame
