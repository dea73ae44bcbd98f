"""An existing Lars deployment keeps its database: the original tables, filled by hand."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import trio

from lars.cli import main
from lars.errors import SchemaMissing
from lars.store import CallStatus, open_store
from tests import mysql_admin

pytestmark = pytest.mark.mysql

# The original lars_dns tables: same columns, types and keys, no Lars additions.
ORIGINAL_TABLES = [
    """CREATE TABLE RouteData (
        id int(10) unsigned NOT NULL AUTO_INCREMENT,
        modid int(10) unsigned NOT NULL,
        cmdid int(10) unsigned NOT NULL,
        serverip int(10) unsigned NOT NULL,
        serverport int(10) unsigned NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE=InnoDB AUTO_INCREMENT=116064 DEFAULT CHARSET=utf8""",
    """CREATE TABLE RouteVersion (
        id int(10) unsigned NOT NULL AUTO_INCREMENT,
        version int(10) unsigned NOT NULL,
        PRIMARY KEY (id)
    )""",
    "INSERT INTO RouteVersion(version) VALUES(0)",
    """CREATE TABLE RouteChange (
        id int(10) unsigned NOT NULL AUTO_INCREMENT,
        modid int(10) unsigned NOT NULL,
        cmdid int(10) unsigned NOT NULL,
        version bigint(20) unsigned NOT NULL,
        PRIMARY KEY (id)
    )""",
    """CREATE TABLE ServerCallStatus (
        modid int(11) NOT NULL,
        cmdid int(11) NOT NULL,
        ip int(11) unsigned NOT NULL,
        port int(11) unsigned NOT NULL,
        caller int(11) unsigned NOT NULL,
        succ_cnt int(11) NOT NULL,
        err_cnt int(11) NOT NULL,
        ts bigint(20) NOT NULL,
        overload char(1) NOT NULL,
        PRIMARY KEY (modid, cmdid, ip, port, caller),
        KEY mlb_index (modid, cmdid, ip, port, caller)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8""",
    """CREATE TABLE ModIDConfig (
        id int(10) unsigned NOT NULL AUTO_INCREMENT,
        modid int(10) unsigned NOT NULL,
        content char(255) NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8""",
    """CREATE TABLE CmdIDConfig (
        id int(10) unsigned NOT NULL AUTO_INCREMENT,
        cmdid int(10) unsigned NOT NULL,
        content char(255) NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8""",
]

# Plain INSERTs as the original scripts and web console write them (192.168.1.177 etc.),
# including a duplicate row, which the original schema does not prevent.
FILL = [
    "INSERT INTO RouteData(modid, cmdid, serverip, serverport) VALUES(1, 1, 3232235953, 7777)",
    "INSERT INTO RouteData(modid, cmdid, serverip, serverport) VALUES(1, 2, 3232235954, 7776)",
    "INSERT INTO RouteData(modid, cmdid, serverip, serverport) VALUES(1, 2, 3232235955, 7778)",
    "INSERT INTO RouteData(modid, cmdid, serverip, serverport) VALUES(1, 2, 3232235956, 7779)",
    "INSERT INTO RouteData(modid, cmdid, serverip, serverport) VALUES(1, 2, 3232235956, 7779)",
    "UPDATE RouteVersion SET version = UNIX_TIMESTAMP(NOW()) WHERE id = 1",
    "INSERT INTO RouteChange(modid, cmdid, version) VALUES(1, 2, UNIX_TIMESTAMP(NOW()))",
]

EXPECTED = [
    {"modid": 1, "cmdid": 1, "hosts": ["192.168.1.177:7777"]},
    {
        "modid": 1,
        "cmdid": 2,
        "hosts": ["192.168.1.178:7776", "192.168.1.179:7778", "192.168.1.180:7779"],
    },
]


@pytest.fixture
def legacy_url() -> Iterator[str]:
    url, name = mysql_admin.new_database_sync(*ORIGINAL_TABLES, *FILL)
    try:
        yield url
    finally:
        mysql_admin.drop_database_sync(name)


def route_ls(url: str, capsys: pytest.CaptureFixture[str]) -> object:
    assert main(["route", "ls", "--json", "--store", url]) == 0
    return json.loads(capsys.readouterr().out)


def test_route_ls_reads_an_original_lars_database(
    legacy_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert route_ls(legacy_url, capsys) == EXPECTED


def test_dns_snapshot_reads_an_original_lars_database(legacy_url: str) -> None:
    async def load() -> None:
        async with open_store(legacy_url) as store:
            snapshot = await store.load_routes(changes_since=0)
            assert snapshot.version > 1_600_000_000
            assert snapshot.changed == {(1, 2)}
            assert snapshot.routes[(1, 2)] == {
                (3232235954, 7776),
                (3232235955, 7778),
                (3232235956, 7779),
            }

    trio.run(load)


def test_route_writes_work_on_an_original_database(
    legacy_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def write() -> None:
        async with open_store(legacy_url) as store:
            await store.add_hosts((1, 1), [(167772161, 80)])  # 10.0.0.1:80

    trio.run(write)  # a write without an actor needs no audit table
    # The command line records who wrote in RouteAudit, a table of Lars's own: until
    # `lars db init` creates it, a write is refused, whole, with one line saying so.
    store = ["--store", legacy_url, "--no-notify"]
    assert main(["route", "rm", "1", "2", "192.168.1.180:7779", *store]) == 1
    err = capsys.readouterr().err
    assert "RouteAudit" in err and "run `lars db init`" in err and len(err.splitlines()) == 1
    assert len(route_ls(legacy_url, capsys)[1]["hosts"]) == 3  # type: ignore[index]
    assert main(["db", "init", "--store", legacy_url]) == 0
    assert main(["route", "rm", "1", "2", "192.168.1.180:7779", *store]) == 0
    capsys.readouterr()
    routes = route_ls(legacy_url, capsys)
    assert routes == [
        {"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:80", "192.168.1.177:7777"]},
        {"modid": 1, "cmdid": 2, "hosts": ["192.168.1.178:7776", "192.168.1.179:7778"]},
    ]


def test_db_init_upgrades_an_original_database_without_touching_data(
    legacy_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def stats_need_init() -> None:
        async with open_store(legacy_url) as store:
            with pytest.raises(SchemaMissing, match="lars db init"):
                await store.upsert_call_status([CallStatus(1, 1, 1, 1, 1, 1, 0, 1, False)])

    trio.run(stats_need_init)
    assert main(["db", "init", "--store", legacy_url]) == 0
    out = capsys.readouterr().out
    assert "added column RouteChange.created" in out
    assert "added column ServerCallStatus.succ_total" in out
    assert "added column RouteData.weight" in out and "added column RouteData.zone" in out
    # The original tables are kept; only Lars's own new tables are created.
    assert [line for line in out.splitlines() if line.startswith("created table")] == [
        f"created table {table}"
        for table in (
            "RouteAudit",
            "RoutePolicy",
            "CallHistory",
            "ReportBatch",
            "AlarmRule",
            "AlarmState",
            "AlarmEvent",
            "AlarmLease",
        )
    ]
    assert route_ls(legacy_url, capsys) == EXPECTED
    assert main(["db", "init", "--store", legacy_url]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_an_original_database_takes_weights_zones_and_policies_after_db_init(
    legacy_url: str,
) -> None:
    from lars.core.model import HostMeta, PolicySpec

    async def before() -> None:
        async with open_store(legacy_url) as store:
            # Not upgraded: routes load with the defaults, plain writes work.
            snapshot = await store.load_routes()
            assert snapshot.meta == {} and snapshot.policies == {}
            await store.add_hosts((9, 9), [(167772161, 80)])
            listed = await store.list_route_meta(9)
            assert listed == {(9, 9): {(167772161, 80): HostMeta()}}

    async def after() -> None:
        async with open_store(legacy_url) as store:
            old_rows = await store.list_route_meta(1, 2)
            assert set(old_rows[(1, 2)].values()) == {HostMeta()}  # the column defaults
            await store.set_host_meta((1, 2), (3232235954, 7776), weight=5, zone="z")
            await store.set_policy((1, 2), PolicySpec("p2c"))
            snapshot = await store.load_routes()
            assert snapshot.meta == {(1, 2): {(3232235954, 7776): HostMeta(5, "z")}}
            assert snapshot.policies == {(1, 2): PolicySpec("p2c")}

    trio.run(before)
    assert main(["db", "init", "--store", legacy_url]) == 0
    trio.run(after)
