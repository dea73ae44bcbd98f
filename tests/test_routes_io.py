"""Routes as files (lars.routes_io): export, strict parsing, diff. Pure functions, no store."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lars.errors import InvalidValue
from lars.routes_io import (
    diff_routes,
    export_routes,
    format_diff,
    merge_routes,
    parse_routes,
)

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)  # 10.0.0.2:7002
C = (3232235953, 80)  # 192.168.1.177:80
ROUTES = {(2, 5): [C], (1, 1): [B, A], (4294967295, 0): [(0, 1), (4294967295, 65535)]}
PARSED = {module: frozenset(hosts) for module, hosts in ROUTES.items()}


def test_json_export_is_sorted_one_module_per_line() -> None:
    text = export_routes(ROUTES, "json")
    assert text.splitlines() == [
        '{"routes": [',
        '{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]},',
        '{"modid": 2, "cmdid": 5, "hosts": ["192.168.1.177:80"]},',
        '{"modid": 4294967295, "cmdid": 0, "hosts": ["0.0.0.0:1", "255.255.255.255:65535"]}',
        "]}",
    ]
    assert json.loads(text)["routes"][0] == {
        "modid": 1,
        "cmdid": 1,
        "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"],
    }


def test_csv_export_has_a_header_and_one_row_per_host() -> None:
    assert export_routes(ROUTES, "csv").splitlines() == [
        "modid,cmdid,ip,port",
        "1,1,10.0.0.1,7001",
        "1,1,10.0.0.2,7002",
        "2,5,192.168.1.177,80",
        "4294967295,0,0.0.0.0,1",
        "4294967295,0,255.255.255.255,65535",
    ]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_then_parse_is_the_identity(fmt: str) -> None:
    assert parse_routes(export_routes(ROUTES, fmt), fmt) == PARSED


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_no_routes_round_trip(fmt: str) -> None:
    assert parse_routes(export_routes({}, fmt), fmt) == {}
    assert parse_routes(export_routes({(1, 1): []}, fmt), fmt) == {}  # no hosts, no module


hosts = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 65535))
modules = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@given(st.dictionaries(modules, st.frozensets(hosts, min_size=1, max_size=5), max_size=20))
def test_round_trip_property(routes: dict[tuple[int, int], frozenset[tuple[int, int]]]) -> None:
    for fmt in ("json", "csv"):
        assert parse_routes(export_routes(routes, fmt), fmt) == routes


def test_parsers_accept_what_people_write() -> None:
    csv_text = "\ufeffModid, cmdid ,IP,port\r\n1, 1, 10.0.0.1 ,7001\r\n\r\n1,1,10.0.0.2,7002\r\n"
    assert parse_routes(csv_text, "csv") == {(1, 1): frozenset({A, B})}
    json_text = '{"routes": [{"hosts": [" 10.0.0.1:7001"], "cmdid": 1, "modid": 1}]}'
    assert parse_routes(json_text, "json") == {(1, 1): frozenset({A})}
    assert parse_routes('{"routes": []}', "json") == {}


BAD_JSON = [
    ("", "line 1 column 1: bad JSON"),
    ('{"routes": [', "line 1 column 13: bad JSON"),
    ("[]", 'expected an object {"routes": [...]}'),
    ('{"routes": [], "version": 3}', 'expected an object {"routes": [...]}'),
    ('{"routes": {}}', "routes must be a list"),
    ('{"routes": [1]}', "routes[0]: expected an object"),
    ('{"routes": [{"modid": 1, "hosts": []}]}', "routes[0]: missing cmdid"),
    ('{"routes": [{"modid": 1, "cmdid": 1}]}', "routes[0]: missing hosts"),
    (
        '{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["1.1.1.1:1"], "weight": 2}]}',
        "routes[0]: unknown key(s) weight",
    ),
    ('{"routes": [{"modid": -1, "cmdid": 1, "hosts": ["1.1.1.1:1"]}]}', "routes[0]: modid must"),
    (
        '{"routes": [{"modid": 1, "cmdid": 4294967296, "hosts": ["1.1.1.1:1"]}]}',
        "routes[0]: cmdid must be an integer from 0 to 4294967295, got 4294967296",
    ),
    ('{"routes": [{"modid": "1", "cmdid": 1, "hosts": ["1.1.1.1:1"]}]}', "modid must"),
    ('{"routes": [{"modid": 1.0, "cmdid": 1, "hosts": ["1.1.1.1:1"]}]}', "modid must"),
    ('{"routes": [{"modid": true, "cmdid": 1, "hosts": ["1.1.1.1:1"]}]}', "modid must"),
    ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": []}]}', "module 1/1): hosts must be"),
    ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": "1.1.1.1:1"}]}', "hosts must be"),
    ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": [7]}]}', 'hosts[0] must be "IP:PORT"'),
    (
        '{"routes": [{"modid": 1, "cmdid": 2, "hosts": ["1.1.1.1:1", "10.0.0.1"]}]}',
        "routes[0] (module 1/2): hosts[1]: expected IP:PORT, got '10.0.0.1'",
    ),
    ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["1.1.1.1:0"]}]}', "hosts[0]: port must"),
    ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["1.1.1.1:65536"]}]}', "port must"),
    ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["1.1.1.256:80"]}]}', "not an IPv4"),
    (
        '{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["1.1.1.1:80", "1.1.1.1:80"]}]}',
        "hosts[1] 1.1.1.1:80 is given twice (also hosts[0])",
    ),
    (
        '{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["1.1.1.1:80"]},\n'
        ' {"modid": 1, "cmdid": 1, "hosts": ["1.1.1.2:80"]}]}',
        "routes[1] (module 1/1): the module is given twice (also routes[0])",
    ),
    ('{"routes": [{"modid": 1, "modid": 2, "cmdid": 1, "hosts": []}]}', "'modid' appears twice"),
]


@pytest.mark.parametrize(("text", "message"), BAD_JSON)
def test_malformed_json_is_one_error_naming_the_entry_and_field(text: str, message: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        parse_routes(text, "json")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


BAD_CSV = [
    ("", "line 1: expected the header modid,cmdid,ip,port, got an empty file"),
    (
        "modid,cmdid,host\n",
        "line 1: expected the header modid,cmdid,ip,port, got 'modid,cmdid,host'",
    ),
    ("1,1,10.0.0.1,80\n", "line 1: expected the header"),
    (
        "modid,cmdid,ip,port\n1,1,10.0.0.1\n",
        "line 2: expected 4 fields (modid,cmdid,ip,port), got 3",
    ),
    ("modid,cmdid,ip,port\n1,1,10.0.0.1,80,x\n", "line 2: expected 4 fields"),
    ("modid,cmdid,ip,port\n1,1,10.0.0.1,80\n-1,1,10.0.0.1,80\n", "line 3: modid must be"),
    ("modid,cmdid,ip,port\n1,4294967296,10.0.0.1,80\n", "line 2: cmdid must be an integer"),
    ("modid,cmdid,ip,port\n1,x,10.0.0.1,80\n", "line 2: cmdid must be a decimal integer"),
    ("modid,cmdid,ip,port\n1,1,10.0.0.1,0\n", "line 2: port must be an integer from 1 to 65535"),
    ("modid,cmdid,ip,port\n1,1,10.0.0.1,\n", "line 2: port must be a decimal integer, got ''"),
    ("modid,cmdid,ip,port\n1,1,10.0.0.1:80,80\n", "line 2: not an IPv4 address: '10.0.0.1:80'"),
    ("modid,cmdid,ip,port\n1,1,10.0.0,80\n", "line 2: not an IPv4 address"),
    (
        "modid,cmdid,ip,port\n1,1,10.0.0.1,80\n\n2,1,10.0.0.1,80\n1,1,10.0.0.1,80\n",
        "line 5: host 10.0.0.1:80 of module 1/1 is given twice (also line 2)",
    ),
    ('modid,cmdid,ip,port\n1,1,"10.0.0.1\n",80\n1,"1\n', "line 4: bad CSV"),
    ('modid,cmdid,ip,port\n1,1,"10.0.0.1\n",80\n1,1,x,80\n', "line 4: not an IPv4"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CSV)
def test_malformed_csv_is_one_error_naming_the_line_and_field(text: str, message: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        parse_routes(text, "csv")
    assert message in str(caught.value)


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(InvalidValue, match="format must be one of json, csv"):
        export_routes({}, "yaml")
    with pytest.raises(InvalidValue, match="format must be one of json, csv"):
        parse_routes("", "xml")


def test_diff_names_the_hosts_added_and_removed_per_module() -> None:
    old = {(1, 1): [A, B], (2, 2): [C], (3, 3): [A]}
    new = {(1, 1): [B, C], (2, 2): [C], (4, 4): [A], (5, 5): []}
    assert diff_routes(old, new) == [
        ((1, 1), frozenset({C}), frozenset({A})),
        ((3, 3), frozenset(), frozenset({A})),
        ((4, 4), frozenset({A}), frozenset()),
    ]
    assert diff_routes(old, old) == []
    assert format_diff(diff_routes(old, new)) == [
        "1/1: -10.0.0.1:7001 +192.168.1.177:80",
        "3/3: -10.0.0.1:7001",
        "4/4: +10.0.0.1:7001",
    ]


def test_merge_adds_hosts_and_removes_nothing() -> None:
    merged = merge_routes({(1, 1): [A], (2, 2): [B]}, {(1, 1): [B], (3, 3): [C]})
    assert merged == {(1, 1): {A, B}, (2, 2): {B}, (3, 3): {C}}
    assert diff_routes({(1, 1): [A], (2, 2): [B]}, merged) == [
        ((1, 1), frozenset({B}), frozenset()),
        ((3, 3), frozenset({C}), frozenset()),
    ]
