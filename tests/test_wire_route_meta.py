"""GetRouteResponse's Lars additions (DESIGN §13): per-host weight and zone, the module's
policy; a route without them stays the 3-field frame older agents decode."""

from __future__ import annotations

import msgpack
import pytest

from lars import wire, wire_original
from lars.core.model import HostMeta, PolicySpec
from lars.errors import ProtocolError

A = (167772161, 7001)
B = (167772162, 7002)


@pytest.mark.parametrize(
    "msg",
    [
        wire.GetRouteResponse(1, 2, (A, B), (HostMeta(50, "z1"), HostMeta())),
        wire.GetRouteResponse(1, 2, (A,), (), PolicySpec("p2c", True, 0.5, 0.1, 20.0)),
        wire.GetRouteResponse(1, 2, (A, B), (HostMeta(0, ""), HostMeta(7, "b")), PolicySpec()),
    ],
)
def test_meta_and_policy_round_trip(msg: wire.GetRouteResponse) -> None:
    decoded = wire.decode_datagram(wire.encode_datagram(msg))
    assert decoded == msg
    assert isinstance(decoded, wire.GetRouteResponse)
    assert all(isinstance(m, HostMeta) for m in decoded.meta)
    assert decoded.policy is None or isinstance(decoded.policy, PolicySpec)


def test_a_plain_route_encodes_as_before_and_old_frames_decode() -> None:
    plain = wire.GetRouteResponse(1, 2, (A, B))
    body = wire.encode_datagram(plain)
    assert msgpack.unpackb(body) == [2, 1, 2, [list(A), list(B)]]
    old = msgpack.packb([2, 1, 2, [list(A)]])
    assert wire.decode_datagram(old) == wire.GetRouteResponse(1, 2, (A,), (), None)
    meta_only = wire.GetRouteResponse(1, 2, (A,), (HostMeta(3, ""),))
    assert len(msgpack.unpackb(wire.encode_datagram(meta_only))) == 5


def test_the_original_format_carries_hosts_only() -> None:
    msg = wire.GetRouteResponse(1, 2, (A,), (HostMeta(3, "z"),), PolicySpec("hash"))
    assert wire_original.encode(msg) == wire_original.encode(wire.GetRouteResponse(1, 2, (A,)))


@pytest.mark.parametrize(
    "fields",
    [
        [[list(A)], [[1]]],  # a meta entry of one element
        [[list(A)], [[-1, ""]]],  # weight out of range
        [[list(A)], [[1, "x" * 65]]],  # zone too long
        [[list(A)], [[1, 2]]],  # zone not a string
        [[list(A)], [[1, ""], [2, ""]]],  # more meta than hosts
        [[list(A)], [], ["rr", False, 0.7, 0.0]],  # policy of 4 fields
        [[list(A)], [], ["rr", 1, 0.7, 0.0, 0.0]],  # affinity not a bool
        [[list(A)], [], ["rr", False, "x", 0.0, 0.0]],  # a number that is not
    ],
)
def test_bad_additions_are_protocol_errors(fields: list[object]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_datagram(msgpack.packb([2, 1, 2, *fields]))


def test_an_unknown_policy_name_decodes_for_the_agent_to_judge() -> None:
    body = msgpack.packb([2, 1, 2, [list(A)], [], ["fastest", False, 0.7, 0, 0]])
    msg = wire.decode_datagram(body)
    assert isinstance(msg, wire.GetRouteResponse) and msg.policy is not None
    assert msg.policy.policy == "fastest"
