"""The console's functions without HTTP: input parsing, writes with audit and DNS notice,
reads. The writes run on SQLite and on a real MySQL/MariaDB database."""

from __future__ import annotations

import json

import pytest

from lars.core.model import Host
from lars.errors import InvalidValue
from lars.store import Actor, CallStatus, RouteStore
from lars.web.service import (
    BadInput,
    Conflict,
    ConsoleService,
    NeedsForce,
    NotFound,
    http_status,
    parse_bool,
    parse_caller,
    parse_hosts,
    parse_id,
    parse_import,
    parse_int,
    parse_name,
)

A, B, C = (Host(f"10.0.0.{i}", 7000 + i).key for i in (1, 2, 3))
M = (1, 1)
ALICE = Actor("alice", "192.0.2.7")
CALLER = Host("192.168.1.1", 1).key[0]


class Recorder:
    """Stands in for notify_dns: records versions, reports the configured failures."""

    def __init__(self, failures: list[str] | None = None) -> None:
        self.versions: list[int] = []
        self.failures = failures or []

    async def __call__(self, version: int) -> list[str]:
        self.versions.append(version)
        return self.failures


@pytest.fixture
def notify() -> Recorder:
    return Recorder()


@pytest.fixture
def service(store: RouteStore, notify: Recorder) -> ConsoleService:
    return ConsoleService(store, notify)


# --- parsing ---------------------------------------------------------------------------------


def test_hosts_are_read_from_lines_spaces_commas_or_a_list() -> None:
    assert parse_hosts("10.0.0.1:7001\n10.0.0.2:7002, 10.0.0.3:7003") == [A, B, C]
    assert parse_hosts(" 10.0.0.1:7001 ;\r\n") == [A]
    assert parse_hosts(["10.0.0.2:7002", "10.0.0.1:7001"]) == [B, A]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "at least one host"),
        (None, "at least one host"),
        ([], "at least one host"),
        ("10.0.0.1", "expected IP:PORT"),
        ("10.0.0.1:0", "port must be"),
        ("10.0.0.1:65536", "port must be"),
        ("10.0.0.256:80", "not an IPv4 address"),
        ("host.example:80", "not an IPv4 address"),
        ("10.0.0.1:7001 10.0.0.1:7001", "listed twice"),
        ([7001], "IP:PORT"),
        ({"10.0.0.1": 7001}, "IP:PORT"),
    ],
)
def test_bad_hosts_are_a_400_naming_the_field(value: object, needle: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_hosts(value)
    assert info.value.field == "hosts"
    assert needle in str(info.value)
    assert str(info.value).startswith("hosts: ")
    assert http_status(info.value) == 400


@pytest.mark.parametrize("value", ["-1", "4294967296", "1.5", "one", "", None, True, -1, 2**32])
def test_ids_out_of_range_or_not_numbers_are_refused(value: object) -> None:
    with pytest.raises(BadInput) as info:
        parse_id(value, "modid")
    assert info.value.field == "modid"


def test_ids_in_range_are_read_from_text_or_numbers() -> None:
    assert parse_id(" 4294967295 ", "cmdid") == 4294967295
    assert parse_id(0, "modid") == 0


def test_small_parsers() -> None:
    assert parse_caller("192.168.1.1") == CALLER
    assert parse_caller("") is None
    with pytest.raises(BadInput, match="caller"):
        parse_caller("192.168.1")
    assert parse_bool("yes", "x") is True
    assert parse_bool("0", "x") is False
    assert parse_bool(None, "x") is None
    with pytest.raises(BadInput, match="overloaded"):
        parse_bool("maybe", "overloaded")
    assert parse_int("7", "limit", default=1, low=1, high=10) == 7
    with pytest.raises(BadInput, match="limit"):
        parse_int("11", "limit", default=1, low=1, high=10)
    assert parse_name("  user service ") == "user service"
    with pytest.raises(BadInput, match="longer than 255"):
        parse_name("x" * 256)
    with pytest.raises(BadInput, match="control"):
        parse_name("a\x00b")


def test_a_malformed_import_names_the_entry_and_field() -> None:
    with pytest.raises(BadInput) as info:
        parse_import('{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:99999"]}]}', "json")
    assert info.value.field == "data"
    assert "routes[0]" in str(info.value)
    assert "port" in str(info.value)
    with pytest.raises(BadInput, match="line 3"):
        parse_import("modid,cmdid,ip,port\n1,1,10.0.0.1,7001\n1,x,10.0.0.2,7002\n", "csv")
    with pytest.raises(BadInput, match="format"):
        parse_import("{}", "xml")
    with pytest.raises(BadInput, match="not UTF-8"):
        parse_import(b"\xff\xfe", "json")


# --- writes ----------------------------------------------------------------------------------


async def test_creating_a_module_writes_its_hosts_one_audit_row_and_tells_dns(
    service: ConsoleService, store: RouteStore, notify: Recorder
) -> None:
    outcome = await service.create_module(ALICE, M, [A, B, C])
    assert (outcome.added, outcome.removed) == (3, 0)
    assert outcome.version is not None
    assert notify.versions == [outcome.version]
    assert (await store.list_routes()) == {M: [A, B, C]}
    (entry,) = await store.list_audit()
    assert (entry.actor, entry.source, entry.added, entry.version) == (
        "alice",
        "192.0.2.7",
        (A, B, C),
        outcome.version,
    )
    assert outcome.describe() == f"added 3 host(s); route version {outcome.version}"


async def test_creating_a_module_that_exists_is_a_conflict(
    service: ConsoleService, store: RouteStore, notify: Recorder
) -> None:
    await service.create_module(ALICE, M, [A])
    with pytest.raises(Conflict, match="already exists") as info:
        await service.create_module(ALICE, M, [B])
    assert http_status(info.value) == 409
    assert (await store.list_routes()) == {M: [A]}
    assert len(notify.versions) == 1


async def test_adding_a_host_that_is_there_is_a_409_and_adds_nothing(
    service: ConsoleService, store: RouteStore, notify: Recorder
) -> None:
    await service.add_hosts(ALICE, M, [A])
    version = await store.route_version()
    with pytest.raises(Conflict, match=r"10\.0\.0\.1:7001"):
        await service.add_hosts(ALICE, M, [B, A])  # B is new, but not added alone
    assert (await store.list_routes()) == {M: [A]}
    assert await store.route_version() == version
    assert len(await store.list_audit()) == 1
    assert len(notify.versions) == 1


async def test_removing_what_is_not_there_is_a_404_and_removes_nothing(
    service: ConsoleService, store: RouteStore
) -> None:
    with pytest.raises(NotFound, match="module 1/1 has no hosts"):
        await service.remove_module(ALICE, M)
    with pytest.raises(NotFound):
        await service.remove_hosts(ALICE, M, [A])
    await service.add_hosts(ALICE, M, [A, B])
    with pytest.raises(NotFound, match=r"no host 10\.0\.0\.3:7003") as info:
        await service.remove_hosts(ALICE, M, [A, C])
    assert http_status(info.value) == 404
    assert (await store.list_routes()) == {M: [A, B]}


async def test_removing_hosts_and_the_module_is_audited(
    service: ConsoleService, store: RouteStore, notify: Recorder
) -> None:
    await service.add_hosts(ALICE, M, [A, B, C])
    removed = await service.remove_hosts(Actor("bob", "192.0.2.8"), M, [B])
    assert removed.removed == 1
    with pytest.raises(NeedsForce, match="would lose all of its 2 host"):
        await service.remove_module(ALICE, M)
    gone = await service.remove_module(ALICE, M, force=True)
    assert gone.removed == 2
    assert await store.list_routes() == {}
    entries = await store.list_audit(module=M)
    assert [(e.actor, e.removed) for e in entries] == [
        ("alice", (A, C)),
        ("bob", (B,)),
        ("alice", ()),
    ]
    assert notify.versions == [e.version for e in reversed(entries)]


async def test_a_dns_that_cannot_be_told_is_a_warning_after_the_write(store: RouteStore) -> None:
    service = ConsoleService(store, Recorder(["127.0.0.1:1: connection refused"]))
    outcome = await service.add_hosts(ALICE, M, [A])
    assert outcome.version is not None
    assert outcome.warnings == (
        "could not notify DNS 127.0.0.1:1: connection refused; it will notice by polling",
    )
    assert (await store.list_routes()) == {M: [A]}


# --- reads -----------------------------------------------------------------------------------


async def test_overview_module_and_status_show_the_overloaded_host(
    service: ConsoleService, store: RouteStore
) -> None:
    await store.set_name("mod", 1, "user")
    await store.set_name("cmd", 1, "get profile")
    await service.create_module(ALICE, M, [A, B])
    await service.create_module(ALICE, (2, 5), [C])
    await store.upsert_call_status(
        [
            CallStatus(*M, *A, CALLER, 90, 10, 1_800_000_000, False),
            CallStatus(*M, *B, CALLER, 5, 45, 1_800_000_000, True),
        ]
    )
    page = await service.overview(None, 0, 1)
    assert (page.total, page.next_offset, page.prev_offset) == (2, 1, None)
    (summary,) = page.items
    assert (summary.mod_name, summary.cmd_name, summary.hosts) == ("user", "get profile", 2)
    assert (summary.overloaded_hosts, summary.succ, summary.err) == (1, 95, 55)
    assert [s.modid for s in (await service.overview("profile", 0, 10)).items] == [1]

    view = await service.module(M)
    assert view.summary == summary
    assert [h.host for h in view.hosts] == [A, B]
    assert [[r.overload for r in h.callers] for h in view.hosts] == [[False], [True]]
    assert [e.added for e in view.audit] == [(A, B)]
    with pytest.raises(NotFound):
        await service.module((9, 9))

    flagged = await service.call_status(overloaded=True)
    assert [(r.ip, r.port) for r in flagged.items] == [B]
    by_errors = await service.call_status(sort="err", descending=True)
    assert [r.err for r in by_errors.items] == [45, 10]
    with pytest.raises(InvalidValue, match="sort"):
        await service.call_status(sort="'; DROP TABLE RouteData; --")


async def test_changes_page_through_the_audit_log(service: ConsoleService) -> None:
    for port in range(1, 6):
        await service.add_hosts(ALICE, M, [(A[0], port)])
    first = await service.changes(limit=2)
    assert [e.added[0][1] for e in first.audit] == [5, 4]
    assert first.next_before is not None
    assert first.version == first.audit[0].version
    assert first.recent[0] == (*M, first.version)
    second = await service.changes(limit=2, before_id=first.next_before)
    assert [e.added[0][1] for e in second.audit] == [3, 2]
    last = await service.changes(limit=2, before_id=second.next_before)
    assert [e.added[0][1] for e in last.audit] == [1]
    assert last.next_before is None
    assert (await service.changes(actor="nobody")).audit == []


# --- import, export, names -------------------------------------------------------------------


def _routes_json(*modules: tuple[tuple[int, int], list[str]]) -> str:
    return json.dumps(
        {"routes": [{"modid": m, "cmdid": c, "hosts": hosts} for (m, c), hosts in modules]}
    )


async def test_import_previews_then_adds_or_replaces_in_one_write(
    service: ConsoleService, store: RouteStore, notify: Recorder
) -> None:
    await service.add_hosts(ALICE, M, [A])
    await service.add_hosts(ALICE, (3, 3), [C])
    data = _routes_json((M, ["10.0.0.2:7002"]), ((2, 2), ["10.0.0.1:7001"]))

    plan = await service.plan_import(data, "json", replace=False)
    assert plan.diff == [(M, frozenset({B}), frozenset()), ((2, 2), frozenset({A}), frozenset())]
    assert (plan.added, plan.removed, plan.modules_in_file) == (2, 0, 2)
    assert len(notify.versions) == 2  # a preview writes nothing

    replace = await service.plan_import(data, "json", replace=True)
    assert replace.removed == 2  # A from 1/1 and C with all of 3/3

    outcome = await service.apply_import(ALICE, data, "json", replace=False)
    assert (outcome.added, outcome.removed, outcome.modules) == (2, 0, 2)
    assert await store.list_routes() == {M: [A, B], (2, 2): [A], (3, 3): [C]}
    with pytest.raises(NeedsForce, match="3/3 would lose all"):
        await service.apply_import(ALICE, data, "json", replace=True)
    outcome = await service.apply_import(ALICE, data, "json", replace=True, force=True)
    assert await store.list_routes() == {M: [B], (2, 2): [A]}
    assert notify.versions[-1] == outcome.version

    exported = await service.export("csv")
    assert exported.splitlines() == [
        "modid,cmdid,ip,port",
        "1,1,10.0.0.2,7002",
        "2,2,10.0.0.1,7001",
    ]
    assert await service.plan_import(exported, "csv", replace=True) == type(replace)(
        "csv", True, 2, []
    )


async def test_a_malformed_import_writes_nothing(
    service: ConsoleService, store: RouteStore
) -> None:
    await service.add_hosts(ALICE, M, [A])
    version = await store.route_version()
    bad = _routes_json(((2, 2), ["10.0.0.1:7001"]), ((4294967296, 1), ["10.0.0.2:7002"]))
    with pytest.raises(BadInput, match=r"routes\[1\].*modid"):
        await service.apply_import(ALICE, bad, "json", replace=True)
    assert await store.list_routes() == {M: [A]}
    assert await store.route_version() == version


async def test_names_are_added_edited_and_deleted(service: ConsoleService) -> None:
    await service.set_name("mod", 7, "orders")
    await service.set_name("mod", 7, "order service")
    await service.set_name("cmd", 1, "create")
    assert await service.names("mod") == {7: "order service"}
    assert await service.names("cmd") == {1: "create"}
    await service.delete_name("mod", 7)
    assert await service.names("mod") == {}
    with pytest.raises(NotFound):
        await service.delete_name("mod", 7)
    with pytest.raises(NotFound):
        await service.names("host")
