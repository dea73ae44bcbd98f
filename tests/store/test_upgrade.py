"""``lars db upgrade``: an original Lars database brought to Lars's schema, nothing lost."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import trio

from lars.cli import main
from lars.store import CallStatus, open_store
from tests import mysql_admin
from tests.store.test_legacy_schema import EXPECTED, FILL, ORIGINAL_TABLES
from tests.store_helpers import fetch

IP_177 = 3232235953  # 192.168.1.177: above 2**31 - 1
BIG_ID = 2**31  # above a signed INT

#: The original tables in the variant whose ServerCallStatus.ip is signed too.
SIGNED_IP_TABLES = [
    stmt.replace("ip int(11) unsigned NOT NULL", "ip int(11) NOT NULL") for stmt in ORIGINAL_TABLES
]
assert SIGNED_IP_TABLES != ORIGINAL_TABLES


def make_database(*statements: str) -> Iterator[str]:
    url, name = mysql_admin.new_database_sync(*statements)
    try:
        yield url
    finally:
        mysql_admin.drop_database_sync(name)


@pytest.fixture
def original_url() -> Iterator[str]:
    """An original Lars database (signed ServerCallStatus.modid/cmdid/ip), filled by the
    original scripts, one RouteData row repeated."""
    yield from make_database(*SIGNED_IP_TABLES, *FILL)


@pytest.fixture
def db_url_sync(mysql_db: tuple[str, str]) -> str:
    """A fresh MySQL database made by `lars db init`."""
    assert main(["db", "init", "--store", mysql_db[0]]) == 0
    return mysql_db[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def column_types(url: str, table: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        async with open_store(url) as store:
            rows = await fetch(
                store,
                "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (table,),
            )
        return {str(name): str(kind) for name, kind in rows}

    return trio.run(read)


def indexes(url: str, table: str) -> dict[str, tuple[bool, list[str]]]:
    """Index name -> (unique, columns)."""

    async def read() -> dict[str, tuple[bool, list[str]]]:
        async with open_store(url) as store:
            rows = await fetch(
                store,
                "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME FROM information_schema.STATISTICS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
                " ORDER BY INDEX_NAME, SEQ_IN_INDEX",
                (table,),
            )
        found: dict[str, tuple[bool, list[str]]] = {}
        for name, non_unique, column in rows:
            found.setdefault(str(name), (not int(non_unique), []))[1].append(str(column))
        return found

    return trio.run(read)


def route_data_rows(url: str) -> int:
    async def read() -> int:
        async with open_store(url) as store:
            return int((await fetch(store, "SELECT COUNT(*) FROM RouteData"))[0][0])

    return trio.run(read)


def routes(url: str, capsys: pytest.CaptureFixture[str]) -> object:
    code, out, _ = run(capsys, "route", "ls", "--json", "--store", url)
    assert code == 0
    return json.loads(out)


def store_stats(url: str, *rows: CallStatus) -> list[CallStatus]:
    async def write() -> list[CallStatus]:
        async with open_store(url) as store:
            await store.upsert_call_status(rows)
            return await store.read_call_status()

    return trio.run(write)


WIDE = CallStatus(BIG_ID, BIG_ID + 1, IP_177, 80, IP_177, 5, 1, 1_800_000_000, False)


@pytest.mark.mysql
def test_upgrade_widens_columns_adds_what_is_missing_and_dedups_routes(
    original_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "db", "upgrade", "--store", original_url, "--dry-run")
    assert code == 0, err
    assert "ALTER TABLE ServerCallStatus MODIFY COLUMN modid int(10) unsigned NOT NULL" in out
    assert "MODIFY COLUMN ip int(11) unsigned NOT NULL" in out
    assert "ADD COLUMN succ_total" in out and "ADD COLUMN created" in out
    assert "ADD UNIQUE KEY uniq_node (modid, cmdid, serverip, serverport)" in out
    assert "1 duplicate" in out and "serverip=3232235956" in out
    assert "dry run" in out.splitlines()[-1]
    # A dry run changes nothing.
    assert column_types(original_url, "ServerCallStatus")["modid"] == "int(11)"
    assert route_data_rows(original_url) == 5

    code, out, err = run(capsys, "db", "upgrade", "--store", original_url)
    assert code == 0, err
    assert "upgraded" in out.splitlines()[-1]
    types = column_types(original_url, "ServerCallStatus")
    for column in ("modid", "cmdid"):
        assert types[column] == "int(10) unsigned"
    for column in ("ip", "port", "caller"):
        assert types[column] == "int(11) unsigned"
    assert types["succ_total"] == types["err_total"] == "bigint(20) unsigned"
    assert "created" in column_types(original_url, "RouteChange")
    assert indexes(original_url, "RouteData")["uniq_node"] == (
        True,
        ["modid", "cmdid", "serverip", "serverport"],
    )
    assert indexes(original_url, "RouteChange")["idx_version"] == (False, ["version"])
    # The repeated row is gone, the routes are the same.
    assert route_data_rows(original_url) == 4
    assert routes(original_url, capsys) == EXPECTED
    # Statistics for ids and addresses above 2**31 - 1 now fit.
    assert store_stats(original_url, WIDE)[0].key == WIDE.key

    code, out, _ = run(capsys, "db", "upgrade", "--store", original_url)
    assert code == 0 and "nothing to do" in out and "ALTER" not in out


@pytest.mark.mysql
def test_upgrade_after_db_init_still_widens_the_original_columns(
    original_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "db", "init", "--store", original_url)[0] == 0
    assert column_types(original_url, "ServerCallStatus")["modid"] == "int(11)"  # init does not
    code, out, _ = run(capsys, "db", "upgrade", "--store", original_url)
    assert code == 0 and "MODIFY COLUMN modid" in out and "ADD COLUMN" not in out
    assert column_types(original_url, "ServerCallStatus")["modid"] == "int(10) unsigned"


@pytest.mark.mysql
def test_upgrade_refuses_values_the_new_type_cannot_hold_and_changes_nothing(
    original_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(
        mysql_admin.execute,
        original_url,
        "INSERT INTO ServerCallStatus VALUES (-5, 1, 1, 1, 1, 0, 0, 0, '0')",
        "INSERT INTO ServerCallStatus VALUES (-6, 1, 1, 1, 1, 0, 0, 0, '0')",
    )
    code, _, err = run(capsys, "db", "upgrade", "--store", original_url)
    assert code == 1
    assert "ServerCallStatus.modid" in err and "2 rows" in err and "nothing was changed" in err
    assert len(err.strip().splitlines()) == 1
    assert column_types(original_url, "ServerCallStatus")["modid"] == "int(11)"
    assert route_data_rows(original_url) == 5


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def test_upgrade_of_a_current_store_has_nothing_to_do(
    kind: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "sqlite":
        url = "sqlite:///lars.db"
        assert run(capsys, "db", "init", "--store", url)[0] == 0
    else:
        url = request.getfixturevalue("db_url_sync")
        capsys.readouterr()
    code, out, err = run(capsys, "db", "upgrade", "--store", url)
    assert (code, err) == (0, "")
    display = open_store(url).display_url
    assert out.strip().splitlines() == [f"store {display} is up to date (nothing to do)"]
    code, out, _ = run(capsys, "db", "upgrade", "--store", url, "--dry-run")
    assert code == 0 and "up to date" in out


def test_upgrade_of_an_old_sqlite_store_appends_the_missing_columns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sqlite3

    with sqlite3.connect("old.db") as conn:
        conn.execute(
            "CREATE TABLE ServerCallStatus (modid INTEGER NOT NULL, cmdid INTEGER NOT NULL,"
            " ip INTEGER NOT NULL, port INTEGER NOT NULL, caller INTEGER NOT NULL,"
            " succ_cnt INTEGER NOT NULL, err_cnt INTEGER NOT NULL, ts INTEGER NOT NULL,"
            " overload TEXT NOT NULL, PRIMARY KEY (modid, cmdid, ip, port, caller))"
        )
    conn.close()
    code, out, err = run(capsys, "db", "upgrade", "--store", "sqlite:///old.db")
    assert code == 0, err
    assert "ALTER TABLE ServerCallStatus ADD COLUMN succ_total" in out
    assert "CREATE TABLE IF NOT EXISTS RouteData" in out
    assert "MODIFY" not in out  # SQLite integers have no width to widen
    assert "up to date" in run(capsys, "db", "upgrade", "--store", "sqlite:///old.db")[1]


def test_upgrade_needs_an_existing_store(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "db", "upgrade", "--store", "sqlite:///missing.db")
    assert code == 1 and "lars db init" in err and len(err.strip().splitlines()) == 1


@pytest.mark.mysql
def test_db_init_points_to_db_upgrade_when_more_is_needed(
    original_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "db", "init", "--store", original_url)
    assert code == 0 and "see `lars db upgrade --dry-run`" in out
    assert run(capsys, "db", "upgrade", "--store", original_url)[0] == 0
    code, out, _ = run(capsys, "db", "init", "--store", original_url)
    assert code == 0 and "nothing to do" in out and "lars db upgrade" not in out


#: What a store made by Lars before the console (issue 9) lacks: the audit table and the
#: keys the console's reads use.
CONSOLE_KEYS = {
    "RouteChange": ("idx_module", ["modid", "cmdid", "version"]),
    "ModIDConfig": ("idx_modid", ["modid"]),
    "CmdIDConfig": ("idx_cmdid", ["cmdid"]),
}


@pytest.mark.mysql
def test_upgrade_of_a_store_from_before_the_console_adds_the_audit_table_and_keys(
    db_url_sync: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(
        mysql_admin.execute,
        db_url_sync,
        "DROP TABLE RouteAudit",
        *(f"ALTER TABLE {table} DROP KEY {key}" for table, (key, _) in CONSOLE_KEYS.items()),
    )
    capsys.readouterr()
    code, out, err = run(capsys, "db", "upgrade", "--store", db_url_sync, "--dry-run")
    assert code == 0, err
    assert "-- create table RouteAudit" in out
    for table, (key, columns) in CONSOLE_KEYS.items():
        assert f"ALTER TABLE {table} ADD KEY {key} ({', '.join(columns)});" in out
    assert "MODIFY" not in out and "ADD COLUMN" not in out
    code, out, err = run(capsys, "db", "upgrade", "--store", db_url_sync)
    assert code == 0 and "upgraded (4 change(s))" in out, err
    for table, (key, columns) in CONSOLE_KEYS.items():
        assert indexes(db_url_sync, table)[key] == (False, columns)
    assert indexes(db_url_sync, "RouteAudit")["idx_module"] == (False, ["modid", "cmdid", "id"])
    assert "up to date" in run(capsys, "db", "upgrade", "--store", db_url_sync)[1]


def test_db_init_adds_the_audit_table_and_keys_to_an_older_sqlite_store(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sqlite3

    url = "sqlite:///lars.db"
    assert run(capsys, "db", "init", "--store", url)[0] == 0
    with sqlite3.connect("lars.db") as conn:
        conn.execute("DROP TABLE RouteAudit")
        for index in ("RouteChange_module", "ModIDConfig_modid", "CmdIDConfig_cmdid"):
            conn.execute(f"DROP INDEX {index}")
    conn.close()
    code, out, _ = run(capsys, "db", "init", "--store", url)
    assert code == 0 and "created table RouteAudit" in out
    assert "up to date" in run(capsys, "db", "upgrade", "--store", url)[1]
    with sqlite3.connect("lars.db") as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"RouteAudit_module", "RouteChange_module", "ModIDConfig_modid"} <= names


def test_upgrade_of_a_sqlite_store_from_before_weights_adds_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sqlite3

    from lars.core.model import HostMeta, PolicySpec

    with sqlite3.connect("pre14.db") as conn:
        conn.execute(
            "CREATE TABLE RouteData (id INTEGER PRIMARY KEY AUTOINCREMENT, modid INTEGER NOT"
            " NULL, cmdid INTEGER NOT NULL, serverip INTEGER NOT NULL, serverport INTEGER NOT NULL)"
        )
        conn.execute("INSERT INTO RouteData (modid, cmdid, serverip, serverport) VALUES (1,1,5,80)")
    conn.close()
    url = "sqlite:///pre14.db"
    code, out, err = run(capsys, "db", "upgrade", "--store", url)
    assert code == 0, err
    assert "ALTER TABLE RouteData ADD COLUMN weight INTEGER NOT NULL DEFAULT 100" in out
    assert "ALTER TABLE RouteData ADD COLUMN zone" in out
    assert "CREATE TABLE IF NOT EXISTS RoutePolicy" in out

    async def use() -> None:
        async with open_store(url) as store:
            assert await store.list_route_meta() == {(1, 1): {(5, 80): HostMeta()}}
            await store.set_host_meta((1, 1), (5, 80), weight=3)
            await store.set_policy((1, 1), PolicySpec("p2c"))
            snapshot = await store.load_routes()
            assert snapshot.meta == {(1, 1): {(5, 80): HostMeta(3, "")}}
            assert snapshot.policies == {(1, 1): PolicySpec("p2c")}

    trio.run(use)


@pytest.mark.mysql
def test_upgrade_keeps_repeated_routes_that_differ_in_weight(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for url in make_database(
        "CREATE TABLE RouteData (id int(10) unsigned NOT NULL AUTO_INCREMENT, modid int(10)"
        " unsigned NOT NULL, cmdid int(10) unsigned NOT NULL, serverip int(10) unsigned NOT"
        " NULL, serverport int(10) unsigned NOT NULL, weight int(10) unsigned NOT NULL"
        " DEFAULT 100, zone varchar(64) NOT NULL DEFAULT '', PRIMARY KEY (id))",
        "INSERT INTO RouteData (modid, cmdid, serverip, serverport, weight) VALUES"
        " (1, 1, 5, 80, 100), (1, 1, 5, 80, 7), (2, 2, 6, 80, 100), (2, 2, 6, 80, 100)",
    ):
        code, out, err = run(capsys, "db", "upgrade", "--store", url, "--dry-run")
        assert code == 1 and "1 sets of rows repeat" in err, (out, err)
        # Rows that repeat exactly (weights and zones too) are still deduplicated.
        assert "duplicate" not in err
