"""``lars route export`` and ``lars route import``, and the actor of CLI route writes, in
process through main(argv), on SQLite and MySQL."""

from __future__ import annotations

import getpass
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lars import wire
from lars.cli import main
from lars.store import AuditEntry, open_store
from tests.store_helpers import fetch

ROUTES_JSON = """{"routes": [
{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]},
{"modid": 2, "cmdid": 5, "hosts": ["192.168.1.177:80"]}
]}
"""
ROUTES_CSV = "modid,cmdid,ip,port\n1,1,10.0.0.1,7001\n1,1,10.0.0.2,7002\n2,5,192.168.1.177,80\n"
LISTED = [
    {"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]},
    {"modid": 2, "cmdid": 5, "hosts": ["192.168.1.177:80"]},
]


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An initialised store of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/lars.db"
    else:
        url = request.getfixturevalue("mysql_db")[0]
    assert main(["db", "init", "--store", url]) == 0
    yield url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``lars ARGV`` in process; writes get --no-notify unless they say otherwise."""
    if argv[:1] == ("route",) and argv[1] in ("add", "rm", "import") and "--notify" not in argv:
        argv = (*argv, "--no-notify")
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def routes(capsys: pytest.CaptureFixture[str], url: str) -> object:
    code, out, err = run(capsys, "route", "ls", "--json", "--store", url)
    assert code == 0, err
    return json.loads(out)


def version(url: str) -> int:
    async def read() -> int:
        async with open_store(url) as store:
            return await store.route_version()

    return trio.run(read)


def audit(url: str) -> list[AuditEntry]:
    async def read() -> list[AuditEntry]:
        async with open_store(url) as store:
            return await store.list_audit()

    return trio.run(read)


def audit_rows(url: str) -> int:
    async def read() -> int:
        async with open_store(url) as store:
            return int((await fetch(store, "SELECT COUNT(*) FROM RouteAudit"))[0][0])

    return trio.run(read)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_then_import_into_another_store_round_trips(
    fmt: str, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"sqlite:///{tmp_path}/source.db"
    assert run(capsys, "db", "init", "--store", source)[0] == 0
    run(capsys, "route", "add", "2", "5", "192.168.1.177:80", "--store", source)
    run(capsys, "route", "add", "1", "1", "10.0.0.2:7002", "10.0.0.1:7001", "--store", source)
    code, exported, err = run(capsys, "route", "export", "--format", fmt, "--store", source)
    assert code == 0 and err == ""
    assert exported == (ROUTES_JSON if fmt == "json" else ROUTES_CSV)
    code, out, err = run(
        capsys, "route", "import", write(tmp_path / f"r.{fmt}", exported), "--store", url
    )
    assert code == 0, err
    assert "2 module(s) changed, 3 host(s) added, 0 removed, route version" in out
    assert routes(capsys, url) == LISTED
    code, again, _ = run(capsys, "route", "export", "--format", fmt, "--store", url)
    assert again == exported
    # Importing the same file again changes nothing and records nothing.
    before = version(url)
    code, out, _ = run(capsys, "route", "import", str(tmp_path / f"r.{fmt}"), "--store", url)
    assert code == 0 and "nothing to change" in out
    assert version(url) == before and audit_rows(url) == 2


def test_export_of_an_empty_store(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "route", "export", "--store", url)[1] == '{"routes": []}\n'
    assert run(capsys, "route", "export", "--format", "csv", "--store", url)[1] == (
        "modid,cmdid,ip,port\n"
    )


def test_import_adds_and_import_replace_makes_the_routes_exactly_the_file(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "route", "add", "1", "1", "10.0.0.9:9", "--store", url)
    run(capsys, "route", "add", "7", "7", "10.0.0.7:7", "--store", url)
    path = write(tmp_path / "routes.json", ROUTES_JSON)
    code, out, err = run(capsys, "route", "import", path, "--store", url)
    assert code == 0, err
    assert routes(capsys, url) == [
        {"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.9:9"]},
        {"modid": 2, "cmdid": 5, "hosts": ["192.168.1.177:80"]},
        {"modid": 7, "cmdid": 7, "hosts": ["10.0.0.7:7"]},
    ]
    # 7/7 would lose its only host: refused without --force, nothing written.
    code, out, err = run(capsys, "route", "import", path, "--replace", "--store", url)
    assert code == 1 and "7/7 would lose all of its 1 host(s)" in err and "--force" in err
    assert len(routes(capsys, url)) == 3  # type: ignore[arg-type]
    code, out, err = run(capsys, "route", "import", path, "--replace", "--force", "--store", url)
    assert code == 0, err
    assert "2 module(s) changed, 0 host(s) added, 2 removed" in out
    assert routes(capsys, url) == LISTED
    last = audit(url)[:2]
    assert {(e.modid, e.cmdid, e.removed) for e in last} == {
        (1, 1, ((167772169, 9),)),
        (7, 7, ((167772167, 7),)),
    }
    assert len({e.version for e in last}) == 1  # one transaction, one version


def test_dry_run_prints_the_diff_and_writes_nothing(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "route", "add", "1", "1", "10.0.0.9:9", "10.0.0.1:7001", "--store", url)
    run(capsys, "route", "add", "7", "7", "10.0.0.7:7", "--store", url)
    before, rows = version(url), audit_rows(url)
    path = write(tmp_path / "routes.csv", ROUTES_CSV)
    code, out, err = run(capsys, "route", "import", path, "--dry-run", "--store", url)
    assert code == 0, err
    assert out.splitlines() == [
        "1/1: +10.0.0.2:7002",
        "2/5: +192.168.1.177:80",
        "dry run: 2 module(s) would change, 2 host(s) added, 0 removed; nothing was written",
    ]
    code, out, err = run(capsys, "route", "import", path, "--dry-run", "--replace", "--store", url)
    assert code == 0, err
    assert out.splitlines() == [
        "1/1: +10.0.0.2:7002 -10.0.0.9:9",
        "2/5: +192.168.1.177:80",
        "7/7: -10.0.0.7:7",
        "dry run: 3 module(s) would change, 2 host(s) added, 2 removed; nothing was written",
    ]
    assert version(url) == before and audit_rows(url) == rows
    assert len(routes(capsys, url)) == 2  # type: ignore[arg-type]


BAD_FILES = [
    ("bad.json", ROUTES_JSON.replace("10.0.0.2:7002", "10.0.0.2"), "hosts[1]: expected IP:PORT"),
    ("bad.json", ROUTES_JSON.replace("10.0.0.2:7002", "10.0.0.2:0"), "port must be an integer"),
    ("bad.json", ROUTES_JSON.replace('"modid": 2', '"modid": 4294967296'), "routes[1]: modid"),
    ("bad.json", ROUTES_JSON.replace('"cmdid": 5, ', ""), "routes[1]: missing cmdid"),
    ("bad.json", ROUTES_JSON.replace("10.0.0.2:7002", "10.0.0.1:7001"), "is given twice"),
    ("bad.json", ROUTES_JSON.removesuffix("]}\n") + "]\n", "line 5 column 1: bad JSON"),
    ("bad.csv", ROUTES_CSV + "3,3,10.0.0.300,80\n", "line 5: not an IPv4 address"),
    ("bad.csv", ROUTES_CSV + "3,-3,10.0.0.3,80\n", "line 5: cmdid must be"),
    ("bad.csv", ROUTES_CSV + "3,3,10.0.0.3,99999\n", "line 5: port must be"),
    ("bad.csv", ROUTES_CSV + "3,3,10.0.0.3\n", "line 5: expected 4 fields"),
    ("bad.csv", ROUTES_CSV + "1,1,10.0.0.2,7002\n", "line 5: host 10.0.0.2:7002 of module 1/1"),
    ("bad.csv", "ip,port\n", "line 1: expected the header modid,cmdid,ip,port"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES)
@pytest.mark.parametrize("replace", [False, True])
def test_a_malformed_file_is_one_clear_error_and_writes_nothing(
    name: str,
    text: str,
    message: str,
    replace: bool,
    url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run(capsys, "route", "add", "9", "9", "10.0.0.9:9", "--store", url)
    before, rows = version(url), audit_rows(url)
    path = write(tmp_path / name, text)
    argv = ["route", "import", path, "--store", url] + (["--replace"] if replace else [])
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"Error: {path}: ") and message in err
    assert err.rstrip().endswith("nothing was written")
    assert version(url) == before and audit_rows(url) == rows
    assert routes(capsys, url) == [{"modid": 9, "cmdid": 9, "hosts": ["10.0.0.9:9"]}]


def test_file_problems_are_one_line(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "route", "import", str(tmp_path / "missing.json"), "--store", url)
    assert code == 1 and "cannot read" in err and len(err.splitlines()) == 1
    (tmp_path / "latin1.csv").write_bytes(b"modid,cmdid,ip,port\n1,1,10.0.0.1,80 \xe9\n")
    code, _, err = run(capsys, "route", "import", str(tmp_path / "latin1.csv"), "--store", url)
    assert code == 1 and "not UTF-8" in err and len(err.splitlines()) == 1
    path = write(tmp_path / "routes.txt", ROUTES_CSV)
    code, _, err = run(capsys, "route", "import", path, "--store", url)
    assert code == 2 and "give --format json or csv" in err
    code, _, err = run(capsys, "route", "import", path, "--format", "csv", "--store", url)
    assert code == 0, err
    assert routes(capsys, url) == LISTED


def test_import_reads_stdin(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(ROUTES_JSON.encode())))
    code, _, err = run(capsys, "route", "import", "-", "--format", "json", "--store", url)
    assert code == 0, err
    assert routes(capsys, url) == LISTED


def test_import_into_a_store_without_tables_says_to_run_db_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/missing.db"
    path = write(tmp_path / "routes.json", ROUTES_JSON)
    code, _, err = run(capsys, "route", "import", path, "--store", url)
    assert code == 1 and "lars db init" in err and len(err.splitlines()) == 1


def test_cli_route_writes_are_recorded_as_cli_user_at_host(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"[:128]
    run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "10.0.0.2:7002", "--store", url)
    run(capsys, "route", "rm", "1", "1", "10.0.0.1:7001", "--store", url)
    run(capsys, "route", "add", "1", "1", "10.0.0.2:7002", "--store", url)  # nothing to change
    run(capsys, "route", "import", write(tmp_path / "r.csv", ROUTES_CSV), "--store", url)
    entries = audit(url)
    assert [(e.actor, e.source) for e in entries] == [(actor, "cli")] * 4
    assert [((e.modid, e.cmdid), e.added, e.removed) for e in reversed(entries)] == [
        ((1, 1), ((167772161, 7001), (167772162, 7002)), ()),
        ((1, 1), (), ((167772161, 7001),)),
        ((1, 1), ((167772161, 7001),), ()),
        ((2, 5), ((3232235953, 80),), ()),
    ]
    assert entries[0].version == version(url)


def test_cli_actor_survives_a_missing_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from lars.cli import cli_actor

    def no_user() -> str:
        raise OSError("no login name")

    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 300)
    actor = cli_actor()
    assert actor.name.startswith("cli:unknown@hhh") and len(actor.name) == 128
    assert actor.source == "cli"


def test_import_notifies_the_configured_dns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as dns:
        dns.bind(("127.0.0.1", 0))
        dns.listen()
        config = tmp_path / "notify.toml"
        config.write_text(
            f'store = "sqlite:///{tmp_path}/lars.db"\n'
            f'[agent]\ndns = ["127.0.0.1:{dns.getsockname()[1]}"]\n'
        )
        assert run(capsys, "db", "init", "--config", str(config))[0] == 0
        path = write(tmp_path / "routes.json", ROUTES_JSON)
        code, out, err = run(capsys, "route", "import", path, "--config", str(config), "--notify")
        assert code == 0 and err == ""
        version = int(out.split("route version ")[1])
        conn, _ = dns.accept()
        with conn:
            conn.settimeout(5)
            decoder = wire.FrameDecoder()
            while not (messages := list(decoder)):
                decoder.feed(conn.recv(65536))
    assert messages == [wire.RouteChangeNotice(version)]
