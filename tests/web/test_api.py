"""The JSON API under /api/v1/, in process (open mode: no token needed)."""

from __future__ import annotations

import json

import pytest
from starlette.exceptions import HTTPException

from lars.core.model import Host
from lars.store import CallStatus
from tests.web.conftest import CLIENT, Console

A, B, C = (Host(f"10.0.0.{i}", 7000 + i).key for i in (1, 2, 3))
CALLER = Host("192.168.1.1", 1).key[0]


async def test_a_module_is_created_read_changed_and_removed(open_console: Console) -> None:
    store = open_console.store
    async with open_console.client() as http:
        created = await http.post(
            "/api/v1/modules",
            json={"modid": 1, "cmdid": 2, "hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]},
        )
        assert created.status_code == 201
        body = created.json()
        assert (body["added"], body["removed"], body["modules"], body["warnings"]) == (2, 0, 1, [])
        assert open_console.notified == [body["version"]]

        more = await http.post("/api/v1/modules/1/2/hosts", json={"hosts": ["10.0.0.3:7003"]})
        assert more.status_code == 200 and more.json()["added"] == 1

        module = (await http.get("/api/v1/modules/1/2")).json()
        assert module["host_count"] == 3
        assert [h["host"] for h in module["hosts"]] == [
            "10.0.0.1:7001",
            "10.0.0.2:7002",
            "10.0.0.3:7003",
        ]
        assert [(c["added"], c["actor"], c["source"]) for c in module["changes"]] == [
            (["10.0.0.3:7003"], "anonymous", CLIENT),
            (["10.0.0.1:7001", "10.0.0.2:7002"], "anonymous", CLIENT),
        ]

        one = await http.delete("/api/v1/modules/1/2/hosts/10.0.0.2:7002")
        assert one.json()["removed"] == 1
        two = await http.request(
            "DELETE", "/api/v1/modules/1/2/hosts", json={"hosts": ["10.0.0.3:7003"]}
        )
        assert two.json()["removed"] == 1
        assert await store.list_routes() == {(1, 2): [A]}

        # Removing all of a module's hosts needs "force" (DESIGN §13).
        refused = await http.delete("/api/v1/modules/1/2")
        assert refused.status_code == 409 and "would lose all" in refused.json()["error"]
        assert await store.list_routes() == {(1, 2): [A]}
        gone = await http.delete("/api/v1/modules/1/2?force=true")
        assert gone.json()["removed"] == 1
        assert (await http.get("/api/v1/modules/1/2")).status_code == 404
    assert await store.list_routes() == {}
    assert len(open_console.notified) == 5


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        (
            "POST",
            "/api/v1/modules",
            {"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:0"]},
            400,
            "hosts",
        ),
        (
            "POST",
            "/api/v1/modules",
            {"modid": -1, "cmdid": 1, "hosts": ["10.0.0.1:1"]},
            400,
            "modid",
        ),
        ("POST", "/api/v1/modules", {"modid": 1, "hosts": ["10.0.0.1:1"]}, 400, "cmdid"),
        ("POST", "/api/v1/modules", {"modid": 1, "cmdid": 1}, 400, "hosts"),
        ("POST", "/api/v1/modules", [1, 2], 400, "body"),
        ("POST", "/api/v1/modules", {"modid": 1, "cmdid": 1, "hosts": ["10.0.0.9:1"]}, 409, None),
        ("POST", "/api/v1/modules/1/1/hosts", {"hosts": ["10.0.0.1:7001"]}, 409, None),
        ("POST", "/api/v1/modules/1/4294967296/hosts", {"hosts": ["10.0.0.9:1"]}, 400, "cmdid"),
        ("POST", "/api/v1/modules/1/x/hosts", {"hosts": ["10.0.0.9:1"]}, 400, "cmdid"),
        ("DELETE", "/api/v1/modules/9/9", None, 404, None),
        ("DELETE", "/api/v1/modules/1/1/hosts/10.0.0.9:1", None, 404, None),
        ("DELETE", "/api/v1/modules/1/1/hosts/10.0.0.9", None, 400, "host"),
        ("GET", "/api/v1/modules/9/9", None, 404, None),
        ("GET", "/api/v1/modules?limit=0", None, 400, "limit"),
        ("GET", "/api/v1/modules?offset=-1", None, 400, "offset"),
        ("GET", "/api/v1/status?sort=color", None, 400, "sort"),
        ("GET", "/api/v1/status?overloaded=maybe", None, 400, "overloaded"),
        ("GET", "/api/v1/status?caller=1.2.3", None, 400, "caller"),
        ("GET", "/api/v1/status?modid=1", None, 400, "cmdid"),
        ("GET", "/api/v1/changes?before_id=x", None, 400, "before_id"),
        ("PUT", "/api/v1/names/mod/1", {"name": ""}, 400, "name"),
        ("PUT", "/api/v1/names/mod/99999999999", {"name": "x"}, 400, "modid"),
        ("PUT", "/api/v1/names/host/1", {"name": "x"}, 404, None),
        ("DELETE", "/api/v1/names/cmd/1", None, 404, None),
        ("GET", "/api/v1/export?format=xml", None, 400, "format"),
        ("POST", "/api/v1/import", {"data": "{", "format": "json"}, 400, "data"),
        ("GET", "/api/v1/nothing", None, 404, None),
        ("PATCH", "/api/v1/modules", None, 405, None),
    ],
)
async def test_errors_are_json_with_the_right_status_and_the_field(
    open_console: Console,
    method: str,
    path: str,
    body: object,
    status: int,
    error: str | None,
) -> None:
    await open_console.store.add_hosts((1, 1), [A])
    await open_console.store.set_name("mod", 1, "user")
    version = await open_console.store.route_version()
    async with open_console.client() as http:
        kwargs = {"json": body} if body is not None else {}
        response = await http.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    answer = response.json()
    assert isinstance(answer["error"], str) and answer["error"]
    assert answer.get("field") == error
    if error:
        assert answer["error"].startswith(f"{error}: ")
    # Nothing partly written.
    assert await open_console.store.list_routes() == {(1, 1): [A]}
    assert await open_console.store.route_version() == version
    assert await open_console.store.list_names("mod") == {1: "user"}


async def test_a_body_that_is_not_json_is_refused(open_console: Console) -> None:
    async with open_console.client() as http:
        text = await http.post(
            "/api/v1/modules", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert text.status_code == 400
        assert text.json()["field"] == "body"
        broken = await http.post(
            "/api/v1/modules", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 400
        assert "not valid JSON" in broken.json()["error"]


async def test_overview_search_and_paging(open_console: Console) -> None:
    store = open_console.store
    for cmdid in range(1, 6):
        await store.add_hosts((7, cmdid), [A])
    await store.set_name("mod", 7, "orders")
    async with open_console.client() as http:
        page = (await http.get("/api/v1/modules?limit=2&offset=2")).json()
        assert (page["total"], page["offset"], page["limit"], page["next_offset"]) == (5, 2, 2, 4)
        assert [(m["modid"], m["cmdid"]) for m in page["modules"]] == [(7, 3), (7, 4)]
        assert page["modules"][0]["mod_name"] == "orders"
        found = (await http.get("/api/v1/modules", params={"q": "7/4"})).json()
        assert [(m["modid"], m["cmdid"]) for m in found["modules"]] == [(7, 4)]
        named = (await http.get("/api/v1/modules", params={"q": "ORDER"})).json()
        assert named["total"] == 5


async def test_call_status_filters_sorts_and_marks_overload(open_console: Console) -> None:
    store = open_console.store
    await store.add_hosts((1, 1), [A, B])
    await store.upsert_call_status(
        [
            CallStatus(1, 1, *A, CALLER, 100, 0, 1_800_000_000, False),
            CallStatus(1, 1, *B, CALLER, 10, 90, 1_800_000_001, True),
        ]
    )
    async with open_console.client() as http:
        rows = (await http.get("/api/v1/status?overloaded=1")).json()
        assert rows["total"] == 1
        (row,) = rows["rows"]
        assert row == {
            "modid": 1,
            "cmdid": 1,
            "host": "10.0.0.2:7002",
            "caller": "192.168.1.1",
            "succ_cnt": 10,
            "err_cnt": 90,
            "succ_total": 10,
            "err_total": 90,
            "overload": True,
            "ts": 1_800_000_001,
        }
        by_err = (await http.get("/api/v1/status?sort=err&desc=1&modid=1&cmdid=1")).json()
        assert [r["err_cnt"] for r in by_err["rows"]] == [90, 0]
        caller = (await http.get("/api/v1/status?caller=192.168.1.2")).json()
        assert caller["total"] == 0
        overview = (await http.get("/api/v1/modules")).json()["modules"][0]
        assert (overview["overloaded_hosts"], overview["error_rate"]) == (1, 0.45)
        module = (await http.get("/api/v1/modules/1/1")).json()
        assert [h["overloaded"] for h in module["hosts"]] == [False, True]


async def test_changes_names_export_and_import(open_console: Console) -> None:
    store = open_console.store
    async with open_console.client() as http:
        await http.post(
            "/api/v1/modules", json={"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001"]}
        )
        changes = (await http.get("/api/v1/changes?actor=anonymous")).json()
        assert changes["version"] == await store.route_version()
        assert [a["added"] for a in changes["audit"]] == [["10.0.0.1:7001"]]
        assert changes["recent_changes"] == [
            {"modid": 1, "cmdid": 1, "version": changes["version"]}
        ]
        assert changes["next_before_id"] is None

        put = await http.put("/api/v1/names/mod/1", json={"name": "user"})
        assert put.json() == {"kind": "mod", "id": 1, "name": "user"}
        assert (await http.get("/api/v1/names/mod")).json() == {
            "kind": "mod",
            "names": {"1": "user"},
        }
        assert (await http.delete("/api/v1/names/mod/1")).json()["deleted"] is True

        exported = await http.get("/api/v1/export")
        assert exported.headers["content-type"] == "application/json"
        routes = exported.json()
        assert routes == {"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001"]}]}
        csv = await http.get("/api/v1/export?format=csv")
        assert csv.text == "modid,cmdid,ip,port\n1,1,10.0.0.1,7001\n"

        new = json.dumps({"routes": [{"modid": 2, "cmdid": 2, "hosts": ["10.0.0.3:7003"]}]})
        dry = await http.post(
            "/api/v1/import", json={"data": new, "replace": True, "dry_run": True}
        )
        assert dry.json() == {
            "dry_run": True,
            "format": "json",
            "replace": True,
            "modules_in_file": 1,
            "added": 1,
            "removed": 1,
            "changes": [
                {"modid": 1, "cmdid": 1, "added": [], "removed": ["10.0.0.1:7001"]},
                {"modid": 2, "cmdid": 2, "added": ["10.0.0.3:7003"], "removed": []},
            ],
        }
        assert await store.list_routes() == {(1, 1): [A]}
        refused = await http.post("/api/v1/import", json={"data": new, "replace": True})
        assert refused.status_code == 409 and "1/1 would lose all" in refused.json()["error"]
        applied = await http.post(
            "/api/v1/import", json={"data": new, "replace": True, "force": True}
        )
        assert applied.json()["result"]["removed"] == 1
        assert await store.list_routes() == {(2, 2): [C]}
        assert open_console.notified[-1] == applied.json()["result"]["version"]


async def test_requests_are_counted_by_route_template_and_status(open_console: Console) -> None:
    async with open_console.client() as http:
        await http.get("/api/v1/modules/1/1")
        await http.get("/api/v1/modules/2/2")
        await http.get("/")
        await http.get("/no/such/page")
    value = open_console.registry.get_sample_value
    name = "lars_web_http_requests_total"
    assert value(name, {"route": "/api/v1/modules/{modid}/{cmdid}", "status": "404"}) == 2
    assert value(name, {"route": "/", "status": "200"}) == 1
    assert value(name, {"route": "unmatched", "status": "404"}) == 1


async def test_a_body_too_large_is_a_413_with_or_without_its_length(
    open_console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lars.web.app

    monkeypatch.setattr(lars.web.app, "MAX_BODY", 1000)
    async with open_console.client() as http:
        sized = await http.post("/api/v1/import", json={"data": "x" * 2000})
        assert sized.status_code == 413
        assert "larger than" in sized.json()["error"]
        small = await http.post(
            "/api/v1/modules", json={"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:1"]}
        )
        assert small.status_code == 201
    # Without a Content-Length, the body is counted as it arrives.
    chunk = {"type": "http.request", "body": b"x" * 800, "more_body": True}
    messages = [chunk, {**chunk, "more_body": False}]

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    limited = lars.web.app._limited(receive)
    await limited()
    with pytest.raises(HTTPException) as info:
        await limited()
    assert info.value.status_code == 413
