"""The console shows and edits hosts' weights and zones and modules' policies, and asks
before removing more than half of a module's hosts (DESIGN §13): the JSON API and the pages.
Admin only and CSRF-checked like every write (tests/web/test_auth.py enumerates the new
write paths with the others)."""

from __future__ import annotations

import httpx

from lars.core.model import Host, HostMeta, PolicySpec
from tests.web.conftest import CLIENT, Console, bearer
from tests.web.test_pages import alice as alice  # the fixture

A, B, C = (Host(f"10.0.0.{i}", 7000 + i).key for i in (1, 2, 3))


async def test_the_api_sets_weight_zone_and_policy_and_audits_them(
    open_console: Console,
) -> None:
    store = open_console.store
    await store.add_hosts((1, 2), [A, B])
    async with open_console.client() as http:
        set_weight = await http.put("/api/v1/modules/1/2/hosts/10.0.0.1:7001", json={"weight": 0})
        assert set_weight.status_code == 200 and set_weight.json()["updated"] == 1
        set_zone = await http.put(
            "/api/v1/modules/1/2/hosts/10.0.0.2:7002", json={"zone": "eu-1", "weight": 30}
        )
        assert set_zone.status_code == 200
        for bad, field in (
            ({"weight": -1}, "weight"),
            ({"weight": "x"}, "weight"),
            ({"zone": "a b\t"}, "zone"),
            ({"colour": 1}, "colour"),
            ({}, "weight"),
        ):
            refused = await http.put("/api/v1/modules/1/2/hosts/10.0.0.1:7001", json=bad)
            assert refused.status_code == 400 and refused.json()["field"] == field, bad
        missing = await http.put("/api/v1/modules/1/2/hosts/10.0.0.9:1", json={"weight": 5})
        assert missing.status_code == 404

        assert (await http.get("/api/v1/modules/1/2/policy")).json() == {"policy": None}
        put = await http.put(
            "/api/v1/modules/1/2/policy",
            json={"policy": "weighted", "zone_affinity": True, "zone_failover": 0.5},
        )
        assert put.status_code == 200
        spec = PolicySpec("weighted", True, 0.5)
        assert put.json()["policy"] == spec._asdict()
        for bad, field in (
            ({"policy": "fastest"}, "policy"),
            ({"panic_threshold": 2}, "panic_threshold"),
            ({"slow_start": "soon"}, "slow_start"),
            ({"speed": 1}, "speed"),
        ):
            refused = await http.put("/api/v1/modules/1/2/policy", json=bad)
            assert refused.status_code == 400 and refused.json()["field"] == field, bad

        module = (await http.get("/api/v1/modules/1/2")).json()
        assert module["policy"] == spec._asdict()
        assert [(h["host"], h["weight"], h["zone"]) for h in module["hosts"]] == [
            ("10.0.0.1:7001", 0, ""),
            ("10.0.0.2:7002", 30, "eu-1"),
        ]
        changes = module["changes"]
        assert changes[0]["changes"]["policy"][1]["policy"] == "weighted"
        assert changes[1]["changes"] == {
            "hosts": {"10.0.0.2:7002": {"weight": [100, 30], "zone": ["", "eu-1"]}}
        }
        assert changes[2]["actor"] == "anonymous" and changes[2]["source"] == CLIENT

        gone = await http.delete("/api/v1/modules/1/2/policy")
        assert gone.status_code == 200 and gone.json()["policy"] is None
    assert await store.get_policy((1, 2)) is None
    assert (await store.list_route_meta())[(1, 2)] == {A: HostMeta(0, ""), B: HostMeta(30, "eu-1")}
    assert len(open_console.notified) == 4


async def test_the_api_needs_force_to_remove_more_than_half(open_console: Console) -> None:
    store = open_console.store
    await store.add_hosts((1, 1), [A, B, C])
    async with open_console.client() as http:
        two = {"hosts": ["10.0.0.1:7001", "10.0.0.2:7002"]}
        refused = await http.request("DELETE", "/api/v1/modules/1/1/hosts", json=two)
        assert refused.status_code == 409
        assert "would lose 2 of its 3 host(s)" in refused.json()["error"]
        assert '"force": true' in refused.json()["error"]
        done = await http.request(
            "DELETE", "/api/v1/modules/1/1/hosts", json={**two, "force": True}
        )
        assert done.status_code == 200 and done.json()["removed"] == 2
        last = await http.delete("/api/v1/modules/1/1/hosts/10.0.0.3:7003")
        assert last.status_code == 409
        assert (await http.delete("/api/v1/modules/1/1/hosts/10.0.0.3:7003?force=1")).is_success
    assert await store.list_routes() == {}


async def test_export_and_import_through_the_api_carry_weights_and_policies(
    open_console: Console,
) -> None:
    store = open_console.store
    await store.change_routes(add={(1, 1): [A, B]}, meta={(1, 1): {A: HostMeta(5, "z")}})
    await store.set_policy((1, 1), PolicySpec("hash"))
    async with open_console.client() as http:
        exported = (await http.get("/api/v1/export")).text
        assert '"weight": 5' in exported and '"policy": "hash"' in exported
        await store.set_host_meta((1, 1), A, weight=100, zone="")
        await store.set_policy((1, 1), None)
        applied = await http.post("/api/v1/import", json={"data": exported})
        assert applied.status_code == 200 and applied.json()["result"]["updated"] == 1
    assert (await store.list_route_meta())[(1, 1)][A] == HostMeta(5, "z")
    assert await store.get_policy((1, 1)) == PolicySpec("hash")


async def test_a_viewer_token_cannot_set_weights_or_policies(secured_console: Console) -> None:
    store = secured_console.store
    await store.add_hosts((1, 1), [A])
    async with secured_console.client(headers=bearer("dashboard")) as http:
        weight = await http.put("/api/v1/modules/1/1/hosts/10.0.0.1:7001", json={"weight": 1})
        policy = await http.put("/api/v1/modules/1/1/policy", json={"policy": "p2c"})
        assert weight.status_code == policy.status_code == 403
        assert (await http.get("/api/v1/modules/1/1/policy")).status_code == 200
    assert await store.list_route_meta() == {(1, 1): {A: HostMeta()}}
    assert await store.get_policy((1, 1)) is None


async def test_the_module_page_shows_and_edits_weight_zone_and_policy(
    secured_console: Console, alice: tuple[httpx.AsyncClient, str]
) -> None:
    store = secured_console.store
    await store.change_routes(add={(1, 1): [A, B]}, meta={(1, 1): {A: HostMeta(0, "eu-1")}})
    http, csrf = alice
    page = await http.get("/modules/1/1")
    assert page.status_code == 200
    assert "drained" in page.text and "eu-1" in page.text
    assert "None of its own" in page.text
    done = await http.post(
        "/modules/1/1/hosts/set",
        data={"csrf": csrf, "host": "10.0.0.2:7002", "weight": "40", "zone": "eu-2"},
    )
    assert done.status_code == 303
    cleared = await http.post(
        "/modules/1/1/hosts/set",
        data={"csrf": csrf, "host": "10.0.0.1:7001", "weight": "", "zone": "", "clear_zone": "1"},
    )
    assert cleared.status_code == 303
    bad = await http.post(
        "/modules/1/1/hosts/set", data={"csrf": csrf, "host": "10.0.0.1:7001", "weight": "-3"}
    )
    assert bad.status_code == 400 and "weight" in bad.text
    assert (await store.list_route_meta())[(1, 1)] == {A: HostMeta(0, ""), B: HostMeta(40, "eu-2")}
    policy = await http.post(
        "/modules/1/1/policy",
        data={
            "csrf": csrf,
            "action": "set",
            "policy": "p2c",
            "zone_affinity": "1",
            "zone_failover": "0.6",
            "panic_threshold": "0",
            "slow_start": "30",
        },
    )
    assert policy.status_code == 303
    assert await store.get_policy((1, 1)) == PolicySpec("p2c", True, 0.6, 0.0, 30.0)
    page = await http.get("/modules/1/1")
    assert "The module&#39;s own policy" in page.text or "The module's own policy" in page.text
    assert "weight 100→40" in page.text and "policy p2c" in page.text  # the audit rows
    reset = await http.post("/modules/1/1/policy", data={"csrf": csrf, "action": "remove"})
    assert reset.status_code == 303 and await store.get_policy((1, 1)) is None
    audit = await store.list_audit(module=(1, 1))
    assert [e.actor for e in audit[:4]] == ["alice"] * 4
