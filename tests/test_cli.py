"""The admin CLI, in process through main(argv), on SQLite and MySQL."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lars import __version__, wire
from lars.cli import main
from lars.store import open_store
from tests.netutil import free_tcp_port
from tests.store_helpers import change_rows


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/lars.db"
        return
    yield request.getfixturevalue("mysql_db")[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``lars ARGV`` in process; route writes get --no-notify unless they say otherwise
    (the default config would notify a DNS on the default port)."""
    if argv[:1] == ("route",) and argv[1:2] != ("ls",) and "--notify" not in argv:
        argv = (*argv, "--no-notify")
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def changes(url: str) -> list[tuple[int, int, int]]:
    async def read() -> list[tuple[int, int, int]]:
        async with open_store(url) as store:
            return await change_rows(store)

    return trio.run(read)


def version(url: str) -> int:
    async def read() -> int:
        async with open_store(url) as store:
            return await store.route_version()

    return trio.run(read)


def test_round_trip_raises_version_and_logs_changes_once_per_effective_change(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "db", "init", "--store", url)[0] == 0
    assert version(url) == 0

    code, out, _ = run(
        capsys, "route", "add", "1", "1", "10.0.0.1:7001", "10.0.0.2:7002", "--store", url
    )
    assert code == 0 and "added 2 host(s)" in out
    v1 = version(url)
    assert changes(url) == [(1, 1, v1)]

    # Adding what is there already changes nothing: no version raise, no change row.
    code, out, _ = run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "--store", url)
    assert code == 0 and "nothing to change" in out
    assert version(url) == v1 and len(changes(url)) == 1

    code, out, _ = run(capsys, "route", "ls", "--json", "--store", url)
    assert json.loads(out) == [
        {"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]}
    ]

    code, out, _ = run(capsys, "route", "rm", "1", "1", "10.0.0.1:7001", "--store", url)
    assert code == 0 and "removed 1 host(s)" in out
    v2 = version(url)
    assert v2 > v1 and changes(url) == [(1, 1, v1), (1, 1, v2)]

    code, out, _ = run(capsys, "route", "rm", "1", "1", "10.0.0.9:1", "--store", url)
    assert "nothing to change" in out and version(url) == v2

    # Removing every host of a module needs --force (DESIGN §13): refused whole without it.
    code, _, err = run(capsys, "route", "rm", "1", "1", "--all", "--store", url)
    assert code == 1 and "would lose all of its 1 host(s)" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and version(url) == v2
    code, out, _ = run(capsys, "route", "rm", "1", "1", "--all", "--force", "--store", url)
    assert code == 0 and "removed 1 host(s)" in out
    assert len(changes(url)) == 3
    code, out, _ = run(capsys, "route", "ls", "--json", "--store", url)
    assert json.loads(out) == []


def test_route_ls_text_and_filters(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "db", "init", "--store", url)
    run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "--store", url)
    run(capsys, "route", "add", "2", "5", "10.0.0.2:80", "--store", url)
    code, out, _ = run(capsys, "route", "ls", "--store", url)
    assert code == 0
    assert "10.0.0.1:7001" in out and "10.0.0.2:80" in out
    code, out, _ = run(capsys, "route", "ls", "2", "--json", "--store", url)
    assert json.loads(out) == [{"modid": 2, "cmdid": 5, "hosts": ["10.0.0.2:80"]}]
    code, out, _ = run(capsys, "route", "ls", "2", "6", "--json", "--store", url)
    assert json.loads(out) == []


def test_store_from_env_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env_url = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("LARS_STORE", env_url)
    assert run(capsys, "db", "init")[0] == 0
    assert (tmp_path / "env.db").exists()
    monkeypatch.delenv("LARS_STORE")
    config = tmp_path / "custom.toml"
    config.write_text(f'store = "sqlite:///{tmp_path}/conf.db"\n')
    assert run(capsys, "db", "init", "--config", str(config))[0] == 0
    assert (tmp_path / "conf.db").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["route", "add", "1", "1", "10.0.0.300:80"], "not an IPv4 address"),
        (["route", "add", "1", "1", "10.0.0.1:0"], "port"),
        (["route", "add", "1", "1", "10.0.0.1"], "IP:PORT"),
        (["route", "add", "4294967296", "1", "10.0.0.1:80"], "out of range"),
        (["route", "add", "-1", "1", "10.0.0.1:80"], "'MODID': -1 is out of range"),
        (["route", "add", "1", "-7", "10.0.0.1:80"], "'CMDID': -7 is out of range"),
        (["route", "rm", "-1", "1", "--all"], "'MODID': -1 is out of range"),
        (["route", "ls", "-12"], "'MODID': -12 is out of range"),
        (["route", "add", "--nosuch", "1", "1", "10.0.0.1:80"], "No such option '--nosuch'"),
        (["route", "add", "-x", "1", "1", "10.0.0.1:80"], "No such option '-x'"),
        (["route", "add", "x", "1", "10.0.0.1:80"], "not an integer"),
        (["route", "add", "1", "1"], "Missing argument"),
        (["route", "rm", "1", "1"], "--all"),
        (["route", "rm", "1", "1", "10.0.0.1:80", "--all"], "--all"),
    ],
)
def test_usage_mistakes_are_one_clear_error(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *argv, "--store", f"sqlite:///{tmp_path}/x.db")
    assert code == 2
    assert needle in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "-1", "1"],
        ["query", "1", "-1", "--json"],
        ["simulate", "-3", "1", "--count", "5"],
        ["bench", "--modid", "-1", "--duration", "0.1"],
    ],
)
def test_a_negative_id_is_out_of_range_not_an_unknown_option(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    (error,) = [line for line in err.splitlines() if line.startswith("Error:")]
    assert "is out of range (0 to 4294967295)" in error
    assert "No such option" not in err and "Traceback" not in err + out


@pytest.mark.parametrize(
    ("store", "needle"),
    [
        ("mysql://root@127.0.0.1:1/lars?connect_timeout=2", "unreachable"),
        ("sqlite:///{tmp}/missing.db", "lars db init"),
        ("bogus://x", "unsupported store"),
        ("mysql://root@127.0.0.1:3306/lars?nope=1", "unknown store URL option"),
        ("mysql://u:secret@127.0.0.1:1,127.0.0.1:x/lars", "bad port 'x' for host 2 of 2"),
    ],
)
def test_store_problems_are_one_line_and_exit_1(
    store: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "route", "ls", "--store", store.format(tmp=tmp_path))
    assert code == 1
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out


def test_uninitialised_store_says_to_run_db_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    (tmp_path / "empty.db").touch()
    code, _, err = run(capsys, "route", "add", "1", "1", "10.0.0.1:80", "--store", url)
    assert code == 1 and "lars db init" in err


@pytest.mark.mysql
def test_uninitialised_mysql_says_to_run_db_init(
    mysql_db: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "route", "ls", "--store", mysql_db[0])
    assert code == 1 and "lars db init" in err and "Traceback" not in err


def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[agent]\nbase_prot = 1\n")
    code, _, err = run(capsys, "route", "ls", "--config", str(config))
    assert code == 1
    assert "agent.base_prot" in err and str(config) in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out
    for argv in (
        ["--help"],
        ["route", "add", "--help"],
        ["route", "ls", "-h"],
        ["db", "init", "--help"],
    ):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and "Usage:" in out
    code, out, _ = run(capsys, "route", "add", "--help")
    assert "Example" in out


def test_run_with_a_port_in_use_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        config = tmp_path / "ports.toml"
        config.write_text(
            f'store = "sqlite:///{tmp_path}/x.db"\n'
            f'[dns]\nlisten = "127.0.0.1:{tcp_port}"\n'
            f"[agent]\nbase_port = {udp_port}\nports = 1\n"
        )
        code, out, err = run(capsys, "run", "--role", "dns", "--config", str(config))
        assert code == 1
        assert f"dns cannot listen on tcp 127.0.0.1:{tcp_port}" in err
        assert "Traceback" not in err + out
        code, out, err = run(capsys, "run", "--role", "agent", "--config", str(config))
        assert code == 1
        assert f"agent cannot listen on udp 127.0.0.1:{udp_port}" in err
        assert "Traceback" not in err + out


def test_route_writes_notify_the_configured_dns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as dns:
        dns.bind(("127.0.0.1", 0))
        dns.listen()
        config = tmp_path / "notify.toml"
        config.write_text(
            f'store = "sqlite:///{tmp_path}/lars.db"\n'
            f'[agent]\ndns = ["127.0.0.1:{dns.getsockname()[1]}", "127.0.0.1:{free_tcp_port()}"]\n'
        )
        assert run(capsys, "db", "init", "--config", str(config))[0] == 0
        code, out, err = run(
            capsys, "route", "add", "1", "1", "10.0.0.1:80", "--config", str(config), "--notify"
        )
        assert code == 0
        version = int(out.split("route version ")[1])
        # The DNS that listens gets the notice; the one that does not is a warning only.
        assert "could not notify DNS 127.0.0.1:" in err and len(err.splitlines()) == 1
        conn, _ = dns.accept()
        with conn:
            conn.settimeout(5)
            decoder = wire.FrameDecoder()
            while not (messages := list(decoder)):
                decoder.feed(conn.recv(65536))
    assert messages == [wire.RouteChangeNotice(version)]


def test_json_log_lines_carry_the_text_format_fields() -> None:
    import logging

    from lars.cli import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("lars.dns").makeRecord(
            "lars.dns", logging.ERROR, __file__, 1, "store %s down", ("x",), sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "ERROR" and line["logger"] == "lars.dns"
    assert line["message"] == "store x down"
    assert line["time"].endswith("+00:00")
    assert "ValueError: boom" in line["exception"]


def test_alarms_shows_states_and_history_as_text_and_json(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lars.store.base import AlarmDecision, AlarmEvent, AlarmState

    assert run(capsys, "db", "init", "--store", url)[0] == 0
    assert run(capsys, "alarms", "--store", url)[1] == "no alarms\n"
    firing = AlarmState("errors", "1/1", "error_rate", True, 1_700_000_000.0, 0.75, 0.5, 1, 1)
    resolved = AlarmState("silent", "caller 10.0.0.9", "caller_silent", False, 1_700_000_100.0,
                          None, 10.0, caller="10.0.0.9")  # fmt: skip
    event = AlarmEvent(0, 1_700_000_000.0, "errors", "1/1", "error_rate", True, 0.75, 0.5, 1, 1)

    async def write() -> None:
        async with open_store(url) as store:
            decision = AlarmDecision(states=(firing, resolved), events=(event,))
            assert await store.alarm_round("web-1", 30.0, lambda states: decision)

    trio.run(write)
    code, out, _ = run(capsys, "alarms", "--store", url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SINCE", "STATE", "ALARM", "VALUE", "THRESHOLD", "SUBJECT"]
    assert "FIRING" in lines[1] and "errors" in lines[1] and "0.75" in lines[1]
    assert "resolved" in lines[2] and lines[2].rstrip().endswith("caller 10.0.0.9")
    firing_only = json.loads(run(capsys, "alarms", "--firing", "--json", "--store", url)[1])
    assert [(a["alarm"], a["state"], a["module"]) for a in firing_only] == [
        ("errors", "firing", "1/1")
    ]
    history = json.loads(run(capsys, "alarms", "--history", "--json", "--store", url)[1])
    assert [(e["alarm"], e["state"], e["value"]) for e in history] == [("errors", "firing", 0.75)]
    assert json.loads(run(capsys, "alarms", "--rule", "nope", "--json", "--store", url)[1]) == []
    code, _, err = run(capsys, "alarms", "--store", "mysql://root@127.0.0.1:1/nowhere")
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
