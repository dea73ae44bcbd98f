from __future__ import annotations

import pytest

from lars.core.model import (
    UINT32_MAX,
    Host,
    check_id,
    check_port,
    format_host,
    host_key,
    int_to_ip,
    ip_to_int,
    parse_module,
)
from lars.errors import InvalidValue, LarsError


def test_ip_matches_the_routedata_serverip_encoding() -> None:
    # DESIGN §3: 10.0.0.1 = 167772161; the original's insert script uses 192.168.1.177.
    assert ip_to_int("10.0.0.1") == 167772161
    assert ip_to_int("192.168.1.177") == 3232235953
    assert int_to_ip(167772161) == "10.0.0.1"
    assert ip_to_int("0.0.0.0") == 0
    assert ip_to_int("255.255.255.255") == UINT32_MAX


@pytest.mark.parametrize(
    "text", ["", "10.0.0", "10.0.0.1.2", "10.0.0.256", "a.b.c.d", "10.0.0.-1", "1e1.0.0.1", " "]
)
def test_bad_ipv4_text_is_rejected(text: str) -> None:
    with pytest.raises(InvalidValue):
        ip_to_int(text)


@pytest.mark.parametrize("value", [-1, UINT32_MAX + 1, "1", 1.0, True, None])
def test_ids_must_be_uint32(value: object) -> None:
    with pytest.raises(InvalidValue):
        check_id(value)


def test_id_bounds_are_inclusive() -> None:
    assert check_id(0) == 0
    assert check_id(UINT32_MAX) == UINT32_MAX
    assert parse_module(1, UINT32_MAX) == (1, UINT32_MAX)


@pytest.mark.parametrize("port", [0, 65536, -1, "80", True])
def test_port_must_be_1_to_65535(port: object) -> None:
    with pytest.raises(InvalidValue):
        check_port(port)
    with pytest.raises(InvalidValue):
        host_key(1, port)


def test_host_parse_and_format_round_trip() -> None:
    host = Host.parse("10.0.0.1:7001")
    assert host == Host("10.0.0.1", 7001)
    assert str(host) == "10.0.0.1:7001"
    assert host.key == (167772161, 7001)
    assert Host.from_key(host.key) == host
    assert format_host((167772161, 7001)) == "10.0.0.1:7001"


@pytest.mark.parametrize("text", ["10.0.0.1", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:70000", ":80"])
def test_host_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        Host.parse(text)
    assert isinstance(info.value, LarsError)
