"""The pages in process: what they show, and the forms' flows (an admin, alice, logged in)."""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from lars.core.model import Host
from lars.store import CallStatus
from tests.web.conftest import Console, csrf_of, login

A, B, C = (Host(f"10.0.0.{i}", 7000 + i).key for i in (1, 2, 3))
CALLER = Host("192.168.1.1", 1).key[0]


@pytest.fixture
async def alice(secured_console: Console) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client logged in as the admin alice, and its CSRF token."""
    async with secured_console.client() as http:
        yield http, await login(http, "alice")


def text_of(response: httpx.Response) -> str:
    """The page's text with entities decoded (for messages with quotes in them)."""
    return html.unescape(response.text)


async def test_add_a_module_with_three_hosts_and_see_it_everywhere(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    http, csrf = alice
    created = await http.post(
        "/modules",
        data={
            "csrf": csrf,
            "modid": "10",
            "cmdid": "1",
            "hosts": "10.0.0.1:7001\n10.0.0.2:7002\n10.0.0.3:7003",
        },
    )
    assert created.status_code == 303
    assert created.headers["location"] == "/modules/10/1"
    page = await http.get("/modules/10/1")
    assert "module 10/1: added 3 host(s)" in page.text  # the flash message, shown once
    for host in ("10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.3:7003"):
        assert host in page.text
    again = await http.get("/modules/10/1")
    assert "added 3 host(s)" not in again.text
    overview = await http.get("/")
    assert 'href="/modules/10/1"' in overview.text
    changes = await http.get("/changes")
    assert ">alice<" in changes.text and "192.0.2.7" in changes.text
    assert await secured_console.store.list_routes() == {(10, 1): [A, B, C]}
    (entry,) = await secured_console.store.list_audit()
    assert entry.actor == "alice"


@pytest.mark.parametrize(
    ("form", "status", "message"),
    [
        ({"modid": "1", "cmdid": "1", "hosts": "10.0.0.1:99999"}, 400, "hosts: port must be"),
        ({"modid": "1", "cmdid": "1", "hosts": "10.0.0.1"}, 400, "hosts: expected IP:PORT"),
        ({"modid": "4294967296", "cmdid": "1", "hosts": "10.0.0.1:1"}, 400, "modid: must be"),
        ({"modid": "", "cmdid": "1", "hosts": "10.0.0.1:1"}, 400, "modid: is required"),
        ({"modid": "5", "cmdid": "5", "hosts": "10.0.0.9:1"}, 409, "module 5/5 already exists"),
        ({"modid": "1", "cmdid": "1", "hosts": "10.0.0.1:1 10.0.0.1:1"}, 400, "listed twice"),
    ],
)
async def test_bad_input_to_the_module_form_is_shown_and_writes_nothing(
    secured_console: Console,
    alice: tuple[httpx.AsyncClient, str],
    form: dict[str, str],
    status: int,
    message: str,
) -> None:
    await secured_console.store.add_hosts((5, 5), [A])
    http, csrf = alice
    response = await http.post("/modules", data={"csrf": csrf, **form})
    assert response.status_code == status
    assert message in text_of(response)
    assert f'value="{form["modid"]}"' in response.text  # what was typed is kept
    assert await secured_console.store.list_routes() == {(5, 5): [A]}
    assert secured_console.notified == []


async def test_hosts_are_added_and_removed_on_the_module_page(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    await store.add_hosts((1, 1), [A])
    http, csrf = alice
    added = await http.post(
        "/modules/1/1/hosts", data={"csrf": csrf, "hosts": "10.0.0.2:7002, 10.0.0.3:7003"}
    )
    assert added.status_code == 303
    duplicate = await http.post("/modules/1/1/hosts", data={"csrf": csrf, "hosts": "10.0.0.1:7001"})
    assert duplicate.status_code == 409
    assert "already has 10.0.0.1:7001; nothing was added" in duplicate.text
    assert "10.0.0.1:7001" in duplicate.text  # the form keeps what was typed
    two = ["10.0.0.1:7001", "10.0.0.3:7003"]  # 2 of 3: more than half needs the box
    refused = await http.post("/modules/1/1/hosts/remove", data={"csrf": csrf, "host": two})
    assert refused.status_code == 409 and "would lose 2 of its 3 host(s)" in refused.text
    removed = await http.post(
        "/modules/1/1/hosts/remove", data={"csrf": csrf, "host": two, "force": "1"}
    )
    assert removed.status_code == 303 and removed.headers["location"] == "/modules/1/1"
    assert await store.list_routes() == {(1, 1): [B]}
    nothing = await http.post("/modules/1/1/hosts/remove", data={"csrf": csrf})
    assert nothing.status_code == 400
    assert "tick at least one host" in nothing.text
    # The last host: removing all of a module's hosts needs the box ticked (DESIGN §13).
    refused = await http.post(
        "/modules/1/1/hosts/remove", data={"csrf": csrf, "host": "10.0.0.2:7002"}
    )
    assert refused.status_code == 409 and "would lose all of its 1 host(s)" in refused.text
    assert await store.list_routes() == {(1, 1): [B]}
    last = await http.post(
        "/modules/1/1/hosts/remove", data={"csrf": csrf, "host": "10.0.0.2:7002", "force": "1"}
    )
    assert last.headers["location"] == "/"  # the module is gone with its last host
    assert await store.list_routes() == {}
    assert len(secured_console.notified) == 3


async def test_removing_a_module_asks_first(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    await store.add_hosts((3, 4), [A, B])
    http, csrf = alice
    confirm = await http.get("/modules/3/4/delete")
    assert confirm.status_code == 200
    assert "Remove module 3/4?" in confirm.text
    assert await store.list_routes() == {(3, 4): [A, B]}  # asking removes nothing
    unconfirmed = await http.post("/modules/3/4/delete", data={"csrf": csrf})
    assert unconfirmed.status_code == 409 and "tick the box" in unconfirmed.text
    assert await store.list_routes() == {(3, 4): [A, B]}
    done = await http.post("/modules/3/4/delete", data={"csrf": csrf, "force": "1"})
    assert done.status_code == 303
    assert await store.list_routes() == {}
    overview = await http.get("/")
    assert "module 3/4 removed: removed 2 host(s)" in overview.text
    again = await http.post("/modules/3/4/delete", data={"csrf": csrf, "force": "1"})
    assert again.status_code == 404
    assert (await http.get("/modules/3/4")).status_code == 404
    assert (await http.get("/modules/3/4/delete")).status_code == 404


async def test_the_module_page_shows_overload_per_caller(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    await store.add_hosts((1, 1), [A, B])
    await store.set_name("mod", 1, "user service")
    await store.upsert_call_status(
        [
            CallStatus(1, 1, *A, CALLER, 100, 0, 1_800_000_000, False),
            CallStatus(1, 1, *B, CALLER, 10, 90, 1_800_000_000, True),
        ]
    )
    http, _ = alice
    page = await http.get("/modules/1/1")
    assert "user service" in page.text
    assert page.text.count("badge bad") == 1 and "overloaded" in page.text
    assert "192.168.1.1" in page.text
    assert "90.0%" in page.text
    overview = await http.get("/")
    assert "45.0%" in overview.text  # 90 errors of 200 calls
    status = await http.get("/status?overloaded=1")
    assert "10.0.0.2:7002" in status.text and "10.0.0.1:7001" not in status.text


async def test_call_status_sorts_and_pages(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    await store.upsert_call_status(
        [
            CallStatus(1, 1, A[0], port, CALLER, port, 0, 1_800_000_000, False)
            for port in range(1, 121)
        ]
    )
    http, _ = alice
    first = await http.get("/status?sort=succ&desc=1")
    assert first.status_code == 200
    assert "1\u2013100 of 120" in first.text
    assert first.text.index("10.0.0.1:120<") < first.text.index("10.0.0.1:119<")
    second = await http.get("/status?sort=succ&desc=1&page=2")
    assert "101\u2013120 of 120" in second.text
    bad = await http.get("/status?sort=color")
    assert bad.status_code == 400 and "sort: must be one of" in bad.text
    bad_caller = await http.get("/status?caller=300.1.1.1")
    assert bad_caller.status_code == 400


async def test_names_are_added_edited_and_deleted(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    http, csrf = alice
    for form in (
        {"kind": "mod", "id": "7", "name": "orders"},
        {"kind": "cmd", "id": "1", "name": "create"},
        {"kind": "mod", "id": "7", "name": "order service"},
    ):
        assert (await http.post("/names", data={"csrf": csrf, **form})).status_code == 303
    assert await store.list_names("mod") == {7: "order service"}
    page = await http.get("/names")
    assert 'value="order service"' in page.text and "create" in page.text
    bad = await http.post("/names", data={"csrf": csrf, "kind": "cmd", "id": "-3", "name": "x"})
    assert bad.status_code == 400 and "cmdid: must be" in bad.text
    empty = await http.post("/names", data={"csrf": csrf, "kind": "mod", "id": "3", "name": " "})
    assert empty.status_code == 400 and "name: is required" in empty.text
    deleted = await http.post("/names/delete", data={"csrf": csrf, "kind": "mod", "id": "7"})
    assert deleted.status_code == 303
    missing = await http.post("/names/delete", data={"csrf": csrf, "kind": "mod", "id": "7"})
    assert missing.status_code == 404
    assert await store.list_names("mod") == {}


async def test_import_previews_then_applies_and_exports(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    await store.add_hosts((1, 1), [A])
    http, csrf = alice
    data = "modid,cmdid,ip,port\n1,1,10.0.0.2,7002\n2,2,10.0.0.3,7003\n"
    preview = await http.post(
        "/import",
        data={"csrf": csrf, "format": ""},
        files={"file": ("routes.csv", data.encode(), "text/csv")},
    )
    assert preview.status_code == 200
    assert "2 module(s)" in preview.text and "Apply import" in preview.text
    assert await store.list_routes() == {(1, 1): [A]}  # a preview writes nothing
    applied = await http.post(
        "/import/apply",
        data={"csrf": csrf_of(preview.text), "format": "csv", "data": data},
        files={"unused": ("x", b"")},
    )
    assert applied.status_code == 303 and applied.headers["location"] == "/changes"
    assert await store.list_routes() == {(1, 1): [A, B], (2, 2): [C]}
    exported = await http.get("/export?format=json")
    assert exported.headers["content-disposition"] == 'attachment; filename="lars-routes.json"'
    assert json.loads(exported.text)["routes"][0]["hosts"] == ["10.0.0.1:7001", "10.0.0.2:7002"]


async def test_a_malformed_import_is_explained_and_writes_nothing(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    http, csrf = alice
    bad = '{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", "10.0.0.1:7001"]}]}'
    preview = await http.post(
        "/import",
        data={"csrf": csrf, "format": ""},
        files={"file": ("routes.json", bad.encode(), "application/json")},
    )
    assert preview.status_code == 400
    assert "routes.json: data: routes[0]" in text_of(preview)
    assert "given twice" in preview.text and "nothing was changed" in preview.text
    applied = await http.post(
        "/import/apply",
        data={"csrf": csrf, "format": "json", "data": bad},
        files={"unused": ("x", b"")},
    )
    assert applied.status_code == 400
    assert await secured_console.store.list_routes() == {}
    assert secured_console.notified == []


async def test_every_page_renders_for_an_empty_store(alice: tuple[httpx.AsyncClient, str]) -> None:
    http, _ = alice
    for path, needle in (
        ("/", "No modules yet."),
        ("/status", "No call statistics match."),
        ("/changes", "No changes recorded."),
        ("/names", "No names."),
        ("/import", "Download JSON"),
        ("/?q=nothing", "No module matches"),
        ("/?page=2", "none"),
    ):
        page = await http.get(path)
        assert page.status_code == 200, path
        assert needle in text_of(page), path
    assert (await http.get("/?page=0")).status_code == 400
    assert (await http.get("/static/console.css")).headers["content-type"].startswith("text/css")


async def test_a_dns_that_cannot_be_told_is_a_warning_on_the_page(sqlite_store: object) -> None:
    from lars.store import RouteStore
    from tests.web.conftest import make_console

    assert isinstance(sqlite_store, RouteStore)
    console = make_console(sqlite_store, notify_failures=["127.0.0.1:9: connection refused"])
    async with console.client() as http:
        csrf = csrf_of((await http.get("/")).text)
        await http.post(
            "/modules", data={"csrf": csrf, "modid": "1", "cmdid": "1", "hosts": "10.0.0.1:1"}
        )
        page = await http.get("/modules/1/1")
    assert "flash-warning" in page.text
    assert "could not notify DNS 127.0.0.1:9: connection refused" in page.text
