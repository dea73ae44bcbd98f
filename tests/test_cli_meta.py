"""``lars route add --weight --zone``, ``lars route set``, ``lars policy``, weights, zones
and policies in export and import, and ``--force`` (DESIGN §13), in process through
main(argv), on SQLite and MySQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lars.cli import main
from lars.core.model import HostMeta, PolicySpec
from lars.store import open_store

A = (167772161, 7001)  # 10.0.0.1:7001
B = (167772162, 7002)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/lars.db"
    else:
        url = request.getfixturevalue("mysql_db")[0]
    assert main(["db", "init", "--store", url]) == 0
    yield url


WRITES = {("route", "add"), ("route", "rm"), ("route", "set"), ("route", "import")}
WRITES |= {("policy", "set"), ("policy", "rm")}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    if tuple(argv[:2]) in WRITES:
        argv = (*argv, "--no-notify")
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def meta(url: str) -> dict[tuple[int, int], dict[tuple[int, int], HostMeta]]:
    async def read() -> dict[tuple[int, int], dict[tuple[int, int], HostMeta]]:
        async with open_store(url) as store:
            return await store.list_route_meta()

    return trio.run(read)


def version(url: str) -> int:
    async def read() -> int:
        async with open_store(url) as store:
            return await store.route_version()

    return trio.run(read)


def test_route_add_and_set_weight_and_zone(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", url]
    code, out, err = run(
        capsys, "route", "add", "1", "1", "10.0.0.1:7001", "--weight", "50", *store
    )
    assert code == 0 and "added 1 host(s)" in out, err
    run(capsys, "route", "add", "1", "1", "10.0.0.2:7002", "--zone", "eu-1", *store)
    assert meta(url) == {(1, 1): {A: HostMeta(50, ""), B: HostMeta(100, "eu-1")}}
    # On a host already there, add --zone changes the zone alone.
    code, out, _ = run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "--zone", "z", *store)
    assert code == 0 and "added 0 host(s), updated 1" in out
    code, out, _ = run(capsys, "route", "set", "1", "1", "10.0.0.1:7001", "--weight", "0", *store)
    assert code == 0 and "updated 1 host(s), route version" in out
    assert meta(url)[(1, 1)][A] == HostMeta(0, "z")
    code, out, _ = run(capsys, "route", "set", "1", "1", "10.0.0.1:7001", "--weight", "0", *store)
    assert "nothing to change" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("route", "set", "1", "1", "10.0.0.1:7001", "--weight", "-1"), "weight must be"),
        (("route", "set", "1", "1", "10.0.0.1:7001", "--weight", "1000001"), "weight must be"),
        (("route", "set", "1", "1", "10.0.0.1:7001", "--zone", " a"), "zone must be"),
        (("route", "set", "1", "1", "10.0.0.1:7001"), "give --weight, --zone or both"),
        (("route", "set", "1", "1", "10.0.0.9:1", "--weight", "5"), "not in its route"),
        (("route", "add", "1", "1", "10.0.0.3:1", "--zone", "x" * 65), "zone must be"),
        (("policy", "set", "1", "1", "--zone-failover", "2"), "zone_failover must be"),
        (("policy", "set", "1", "1", "--slow-start", "-1"), "slow_start must be"),
        (("policy", "set", "1", "1", "--policy", "fastest"), "Invalid value"),
        (("policy", "set", "1", "1"), "give at least one"),
    ],
)
def test_bad_values_are_one_clear_error_and_change_nothing(
    url: str, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "--store", url)
    before = version(url)
    code, _, err = run(capsys, *args, "--store", url)
    assert code in (1, 2) and message in err
    assert version(url) == before
    assert meta(url) == {(1, 1): {A: HostMeta()}}


def test_policy_set_show_rm(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", url]
    run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "10.0.0.2:7002", *store)
    code, out, _ = run(capsys, "policy", "show", "1", "1", *store)
    assert code == 0 and "none (the agents' [agent.loadbalance] applies)" in out
    code, out, err = run(capsys, "policy", "set", "1", "1", "--policy", "weighted", *store)
    assert code == 0 and "policy weighted, route version" in out, err
    code, out, _ = run(
        capsys, "policy", "set", "1", "1", "--zone-affinity", "--zone-failover", "0.5", *store
    )
    assert "weighted, zone affinity (failover below 0.5)" in out  # the policy stays
    code, out, _ = run(capsys, "policy", "show", "1", "1", "--json", *store)
    shown = json.loads(out)
    assert shown["policy"] == PolicySpec("weighted", True, 0.5)._asdict()
    assert shown["hosts"][0] == {"host": "10.0.0.1:7001", "weight": 100, "zone": ""}
    code, out, _ = run(capsys, "policy", "show", "--json", *store)
    assert [(p["modid"], p["cmdid"]) for p in json.loads(out)] == [(1, 1)]
    code, out, _ = run(capsys, "policy", "rm", "1", "1", *store)
    assert code == 0 and "policy removed" in out
    code, out, _ = run(capsys, "policy", "rm", "1", "1", *store)
    assert "has no policy of its own" in out
    code, out, _ = run(capsys, "policy", "show", *store)
    assert "no module has its own policy" in out


def test_export_and_import_carry_weights_zones_and_policies(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", url]
    run(capsys, "route", "add", "1", "1", "10.0.0.1:7001", "--weight", "5", "--zone", "z", *store)
    run(capsys, "route", "add", "1", "1", "10.0.0.2:7002", *store)
    run(capsys, "route", "add", "2", "2", "10.0.0.2:7002", *store)
    run(capsys, "policy", "set", "1", "1", "--policy", "p2c", "--slow-start", "10", *store)
    code, exported, _ = run(capsys, "route", "export", *store)
    assert code == 0
    document = json.loads(exported)
    assert document["routes"][0]["hosts"] == [
        {"host": "10.0.0.1:7001", "weight": 5, "zone": "z"},
        "10.0.0.2:7002",
    ]
    assert document["routes"][0]["policy"]["policy"] == "p2c"
    assert "policy" not in document["routes"][1]
    code, csv_text, _ = run(capsys, "route", "export", "--format", "csv", *store)
    assert csv_text.splitlines()[:2] == ["modid,cmdid,ip,port,weight,zone", "1,1,10.0.0.1,7001,5,z"]
    # Into an empty store: the same routes, weights, zones and policy.
    other = f"sqlite:///{tmp_path}/other.db"
    assert main(["db", "init", "--store", other]) == 0
    path = tmp_path / "routes.json"
    path.write_text(exported)
    code, out, err = run(capsys, "route", "import", str(path), "--store", other)
    assert code == 0, err
    assert meta(other) == meta(url)
    code, again, _ = run(capsys, "route", "export", "--store", other)
    assert again == exported
    # An old file (no weight, zone or policy) leaves them alone, even with --replace.
    old = tmp_path / "old.json"
    old.write_text(
        '{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]},'
        ' {"modid": 2, "cmdid": 2, "hosts": ["10.0.0.2:7002"]}]}'
    )
    code, out, err = run(capsys, "route", "import", str(old), "--replace", "--store", other)
    assert code == 0 and "nothing to change" in out, err
    code, again, _ = run(capsys, "route", "export", "--store", other)
    assert again == exported
    # A file with them, replacing: exactly the file's (the policy goes, weights reset).
    new = tmp_path / "new.csv"
    new.write_text("modid,cmdid,ip,port,weight,zone\n1,1,10.0.0.1,7001,,\n1,1,10.0.0.2,7002,7,\n")
    code, out, err = run(
        capsys, "route", "import", str(new), "--replace", "--dry-run", *["--store", other]
    )
    assert out.splitlines() == [
        "2/2: -10.0.0.2:7002",
        "1/1: ~10.0.0.1:7001 weight 5->100 zone z->",
        "1/1: ~10.0.0.2:7002 weight 100->7",
        "dry run: 1 module(s) would change, 0 host(s) added, 1 removed, 2 weight, zone or policy"
        " change(s); nothing was written",
    ], err
    code, out, err = run(
        capsys, "route", "import", str(new), "--replace", "--force", "--store", other
    )
    assert code == 0, err
    assert meta(other) == {(1, 1): {A: HostMeta(), B: HostMeta(7, "")}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": [{"host": "10.0.0.1:1", "weight": -2}]}]}',
         "hosts[0]: weight must be"),
        ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": [{"host": "10.0.0.1:1", "w": 2}]}]}',
         "unknown key(s) w"),
        ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:1"],'
         ' "policy": {"policy": "x"}}]}',
         "policy: policy must be one of"),
        ('{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:1"], "policy": {"speed": 1}}]}',
         "policy: unknown key(s) speed"),
    ],
)  # fmt: skip
def test_a_bad_weight_zone_or_policy_in_a_file_writes_nothing(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, _, err = run(capsys, "route", "import", str(path), "--store", url)
    assert code == 1 and message in err and "nothing was written" in err
    assert meta(url) == {}


def test_rm_of_more_than_half_needs_force(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", url]
    hosts = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]
    run(capsys, "route", "add", "1", "1", *hosts, *store)
    before = version(url)
    code, _, err = run(capsys, "route", "rm", "1", "1", *hosts[:3], *store)
    assert code == 1 and "1/1 would lose 3 of its 4 host(s)" in err and "--force" in err
    assert version(url) == before
    code, out, _ = run(capsys, "route", "rm", "1", "1", *hosts[:2], *store)  # half: fine
    assert code == 0 and "removed 2 host(s)" in out
    code, out, _ = run(capsys, "route", "rm", "1", "1", *hosts[2:], "--force", *store)
    assert code == 0 and "removed 2 host(s)" in out


async def test_route_confirm_releases_a_held_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lars.config import DnsConfig
    from lars.roles.dns import DnsServer
    from tests.netutil import free_tcp_port

    url = f"sqlite:///{tmp_path}/lars.db"
    async with open_store(url, create=True) as store:
        await store.init_schema()
        hosts = [(167772160 + i, 80) for i in range(1, 13)]
        await store.add_hosts((1, 1), hosts)
        port = free_tcp_port()
        config = DnsConfig(listen=f"127.0.0.1:{port}", check_interval=0.05, shrink_hold=3600.0)
        dns = DnsServer(config, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(dns.serve)
            with trio.fail_after(5):
                while dns.routes is None:
                    await trio.sleep(0.01)
            address = f"127.0.0.1:{port}"
            argv = ["route", "confirm", "--dns", address]
            assert await trio.to_thread.run_sync(main, argv) == 0
            assert "nothing held" in capsys.readouterr().out
            await store.remove_hosts((1, 1), None)
            with trio.fail_after(5):
                while dns.held is None:
                    await trio.sleep(0.01)
            held = dns.held.version
            wrong = ["route", "confirm", "--dns", address, "--version", str(held + 1)]
            assert await trio.to_thread.run_sync(main, wrong) == 0
            assert f"still holding route version {held}" in capsys.readouterr().out
            assert await trio.to_thread.run_sync(main, argv) == 0
            assert f"nothing held; serving route version {held}" in capsys.readouterr().out
            assert dns.routes == {} and dns.held is None
            nursery.cancel_scope.cancel()


def test_diff_meta_names_weight_zone_and_policy_changes() -> None:
    from lars import routes_io

    text = (
        '{"routes": [{"modid": 1, "cmdid": 1, "hosts": [{"host": "10.0.0.1:7001", "weight": 9},'
        ' "10.0.0.2:7002"], "policy": {"policy": "hash"}}]}'
    )
    parsed = routes_io.parse_route_file(text, "json")
    current = {(1, 1): {A: HostMeta(), B: HostMeta(3, "z")}}
    policies = {(2, 2): PolicySpec("p2c")}
    assert routes_io.diff_meta(current, policies, parsed, replace=False) == [
        "1/1: ~10.0.0.1:7001 weight 100->9",
        "1/1: ~10.0.0.2:7002 weight 3->100 zone z->",
        "1/1: policy default->hash",
    ]
    assert routes_io.diff_meta(current, policies, parsed, replace=True)[-1] == (
        "2/2: policy p2c->default"
    )
