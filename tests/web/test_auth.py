"""Who may do what: hashes, signed sessions, login, CSRF, viewers, bearer tokens, open mode."""

from __future__ import annotations

import re

import pytest
from starlette.routing import Route

from lars.config import WebUser
from lars.errors import ConfigError, InvalidValue
from lars.web.app import routes
from lars.web.auth import (
    Accounts,
    Session,
    Signer,
    bearer_token,
    check_listen,
    check_password_hash,
    check_token_hash,
    csrf_matches,
    hash_password,
    hash_token,
    loopback_host_header,
    verify_password,
)
from tests.web.conftest import (
    PASSWORDS,
    SECRET,
    TEST_N,
    USERS,
    Console,
    bearer,
    csrf_of,
    login,
)

# --- hashes ----------------------------------------------------------------------------------


def test_password_hashes_are_self_describing_salted_and_verify() -> None:
    first = hash_password("s3cret pass", n=TEST_N)
    second = hash_password("s3cret pass", n=TEST_N)
    assert first != second  # a random salt each time
    assert re.fullmatch(r"scrypt\$1024\$8\$1\$[\w-]{22}\$[\w-]{43}", first)
    assert verify_password("s3cret pass", first)
    assert not verify_password("s3cret pasS", first)
    check_password_hash(first)


def test_the_default_cost_is_the_documented_one() -> None:
    assert hash_password("x").startswith("scrypt$32768$8$1$")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("plain text", "scrypt$N$r$p$SALT$KEY"),
        ("scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "power of 2"),
        ("scrypt$2097152$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "power of 2"),
        ("scrypt$1024$99$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "r must be"),
        ("scrypt$1024$8$1$AA$" + "A" * 43, "too short"),
        ("scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "integers"),
    ],
)
def test_bad_password_hashes_are_refused(text: str, needle: str) -> None:
    with pytest.raises(InvalidValue) as info:
        check_password_hash(text)
    assert needle in str(info.value)


def test_token_hashes() -> None:
    encoded = hash_token("abc")
    check_token_hash(encoded)
    assert encoded == "sha256$ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    for bad in ("sha256$xyz", "md5$" + "0" * 32, hash_password("x", n=TEST_N)):
        with pytest.raises(InvalidValue, match="lars web token"):
            check_token_hash(bad)


def test_accounts_log_in_look_up_and_know_tokens() -> None:
    accounts = Accounts(USERS, [])
    alice = accounts.login("alice", PASSWORDS["alice"])
    assert alice is not None and alice.can_write
    victor = accounts.login("victor", PASSWORDS["victor"])
    assert victor is not None and not victor.can_write
    assert accounts.login("alice", PASSWORDS["victor"]) is None
    assert accounts.login("mallory", "anything") is None
    assert accounts.user("victor") == victor
    assert accounts.user("mallory") is None
    assert not accounts.open and accounts.has_users
    assert Accounts([], []).open


# --- sessions and CSRF -----------------------------------------------------------------------


def test_sessions_are_signed_and_expire() -> None:
    signer = Signer(SECRET, "session")
    session = Session.new("alice", now=1000.0)
    value = session.encode(signer)
    assert Session.decode(value, signer, now=1000.0) == session
    assert Session.decode(value, signer, now=1000.0 + 12 * 3600 + 1) is None
    assert Session.decode(value, Signer(b"another secret, 32 bytes long ok", "session")) is None
    assert Session.decode(value, Signer(SECRET, "flash"), now=1000.0) is None
    payload, mac = value.split(".")
    forged = Session("mallory", session.csrf, 1000.0).encode(signer).split(".")[0] + "." + mac
    assert Session.decode(forged, signer, now=1000.0) is None
    for junk in ("", ".", "x.y", payload, "é.é"):
        assert Session.decode(junk, signer, now=1000.0) is None


def test_csrf_tokens_must_match_their_session() -> None:
    session = Session.new()
    assert csrf_matches(session, session.csrf)
    assert not csrf_matches(session, None)
    assert not csrf_matches(session, "")
    assert not csrf_matches(session, Session.new().csrf)


def test_bearer_headers() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_without_users_the_console_listens_on_loopback_only() -> None:
    nobody = Accounts([], [])
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        check_listen(host, nobody)
    for host in ("0.0.0.0", "192.0.2.1", "::", "example.com"):
        with pytest.raises(ConfigError, match="loopback"):
            check_listen(host, nobody)
    check_listen("0.0.0.0", Accounts(USERS, []))


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:7780", True),
        ("localhost", True),
        ("[::1]:7780", True),
        ("127.0.0.1", True),
        ("app.localhost:80", True),
        ("evil.example:7780", False),
        ("10.0.0.1", False),
        ("", False),
    ],
)
def test_loopback_host_headers(host: str, ok: bool) -> None:
    assert loopback_host_header(host) is ok


# --- the app ---------------------------------------------------------------------------------


def _write_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the app that changes something, with sample path values."""
    sample = {"{modid}": "1", "{cmdid}": "1", "{kind}": "mod", "{ident}": "1", "{host}": "x"}
    found = []
    for route in routes():
        if not isinstance(route, Route):
            continue
        for method in sorted(route.methods or ()):
            if method in ("GET", "HEAD"):
                continue
            path = route.path
            for key, value in sample.items():
                path = path.replace(key, value)
            found.append((method, path))
    return found


WRITES = _write_routes()
PAGE_WRITES = [(m, p) for m, p in WRITES if not p.startswith("/api/") and p != "/login"]
API_WRITES = [(m, p) for m, p in WRITES if p.startswith("/api/")]


def test_every_change_is_a_post_put_or_delete() -> None:
    assert {m for m, _ in WRITES} <= {"POST", "PUT", "DELETE"}
    assert len(PAGE_WRITES) >= 9 and len(API_WRITES) >= 8  # the enumeration found them


async def test_a_get_of_any_write_path_changes_nothing(open_console: Console) -> None:
    store = open_console.store
    await store.add_hosts((1, 1), [(167772161, 7001)])
    await store.set_name("mod", 1, "user")
    async with open_console.client() as http:
        for _, path in WRITES:
            query = "?modid=1&cmdid=1&hosts=10.0.0.2:1&host=10.0.0.1:7001&kind=mod&id=1"
            response = await http.get(path + query)
            assert response.status_code in (200, 303, 401, 404, 405), (path, response.status_code)
    assert await store.list_routes() == {(1, 1): [(167772161, 7001)]}
    assert await store.list_names("mod") == {1: "user"}
    assert open_console.notified == []


async def test_login_sets_a_session_and_logout_ends_it(secured_console: Console) -> None:
    async with secured_console.client() as http:
        first = await http.get("/")
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=%2F"
        page = await http.get("/login")
        assert page.status_code == 200
        wrong = await http.post(
            "/login",
            data={"csrf": csrf_of(page.text), "name": "alice", "password": "nope", "next": "/"},
        )
        assert wrong.status_code == 401
        assert "unknown user or wrong password" in wrong.text
        csrf = await login(http, "alice")
        assert csrf != csrf_of(page.text)  # a new session (and token) after login
        overview = await http.get("/")
        assert overview.status_code == 200
        assert ">alice<" in overview.text
        out = await http.post("/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert (await http.get("/")).status_code == 303


async def test_login_goes_back_where_it_was_asked_but_never_off_site(
    secured_console: Console,
) -> None:
    async with secured_console.client() as http:
        to = await http.get("/status?overloaded=1")
        assert to.headers["location"] == "/login?next=%2Fstatus%3Foverloaded%3D1"
        page = await http.get(to.headers["location"])
        assert 'value="/status?overloaded=1"' in page.text
    targets = [
        ("/status?overloaded=1", "/status?overloaded=1"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
    ]
    for target, expected in targets:
        async with secured_console.client() as http:
            page = await http.get("/login")
            response = await http.post(
                "/login",
                data={
                    "csrf": csrf_of(page.text),
                    "name": "victor",
                    "password": PASSWORDS["victor"],
                    "next": target,
                },
            )
            assert response.headers["location"] == expected


@pytest.mark.parametrize(("method", "path"), PAGE_WRITES)
async def test_every_form_without_its_csrf_token_is_refused(
    secured_console: Console, method: str, path: str
) -> None:
    async with secured_console.client() as http:
        await login(http, "alice")
        response = await http.request(
            method, path, data={"modid": "1", "cmdid": "1", "hosts": "10.0.0.1:1"}
        )
        assert response.status_code == 403, response.text
        assert "security token" in response.text
        wrong = await http.request(method, path, data={"csrf": "forged", "hosts": "10.0.0.1:1"})
        assert wrong.status_code == 403
    assert await secured_console.store.list_routes() == {}
    assert secured_console.notified == []


async def test_the_login_form_needs_its_csrf_token_too(secured_console: Console) -> None:
    async with secured_console.client() as http:
        await http.get("/login")
        response = await http.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
        assert response.status_code == 403


async def test_a_csrf_token_of_another_session_is_refused(secured_console: Console) -> None:
    async with secured_console.client() as one, secured_console.client() as other:
        await login(one, "alice")
        foreign = await login(other, "alice")
        response = await one.post(
            "/modules", data={"csrf": foreign, "modid": "1", "cmdid": "1", "hosts": "10.0.0.1:1"}
        )
        assert response.status_code == 403


@pytest.mark.parametrize(("method", "path"), PAGE_WRITES)
async def test_a_viewer_cannot_change_anything_on_the_pages(
    secured_console: Console, method: str, path: str
) -> None:
    await secured_console.store.add_hosts((1, 1), [(167772161, 7001)])
    async with secured_console.client() as http:
        csrf = await login(http, "victor")
        if path == "/logout":
            return  # a viewer may log out
        response = await http.request(
            method,
            path,
            data={
                "csrf": csrf,
                "modid": "1",
                "cmdid": "1",
                "hosts": "10.0.0.2:1",
                "host": "10.0.0.1:7001",
                "kind": "mod",
                "id": "1",
                "name": "x",
            },
        )
        assert response.status_code == 403, response.text
        assert "viewer" in response.text
    assert await secured_console.store.list_routes() == {(1, 1): [(167772161, 7001)]}
    assert await secured_console.store.list_names("mod") == {}


async def test_a_viewer_sees_the_pages_without_their_forms(secured_console: Console) -> None:
    await secured_console.store.add_hosts((1, 1), [(167772161, 7001)])
    async with secured_console.client() as http:
        await login(http, "victor")
        for path in ("/", "/modules/1/1", "/names", "/import", "/status", "/changes"):
            page = await http.get(path)
            assert page.status_code == 200, path
            assert "Add a module" not in page.text and "Remove module" not in page.text
            assert 'action="/names"' not in page.text and "Preview changes" not in page.text


@pytest.mark.parametrize(("method", "path"), API_WRITES)
async def test_a_viewer_token_cannot_change_anything_through_the_api(
    secured_console: Console, method: str, path: str
) -> None:
    async with secured_console.client(headers=bearer("dashboard")) as http:
        response = await http.request(
            method,
            path,
            json={"hosts": ["10.0.0.1:1"], "modid": 1, "cmdid": 1, "name": "x", "data": "{}"},
        )
    assert response.status_code == 403
    assert response.json() == {"error": "dashboard is a viewer: viewers cannot change anything"}


async def test_the_api_wants_a_valid_bearer_token(secured_console: Console) -> None:
    async with secured_console.client() as http:
        missing = await http.get("/api/v1/modules")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in missing.json()["error"]
        wrong = await http.get("/api/v1/modules", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        # A logged-in browser session is no API credential (so the API needs no CSRF token).
        await login(http, "alice")
        assert (await http.get("/api/v1/modules")).status_code == 401
    async with secured_console.client(headers=bearer("deployer")) as http:
        me = await http.get("/api/v1/whoami")
        assert me.json() == {"name": "deployer", "role": "admin", "can_write": True}
        created = await http.post(
            "/api/v1/modules", json={"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001"]}
        )
        assert created.status_code == 201
    (entry,) = await secured_console.store.list_audit()
    assert (entry.actor, entry.source) == ("deployer", "192.0.2.7")


async def test_a_session_of_a_user_removed_from_the_config_is_over(
    secured_console: Console,
) -> None:
    from tests.web.conftest import make_console

    async with secured_console.client() as http:
        await login(http, "victor")
        cookies = http.cookies
    fewer = make_console(secured_console.store, users=[u for u in USERS if u.name != "victor"])
    async with fewer.client(cookies=cookies) as http:
        assert (await http.get("/")).status_code == 303


async def test_open_mode_needs_no_login_but_only_answers_loopback_names(
    open_console: Console,
) -> None:
    async with open_console.client() as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert ">anonymous<" in page.text
        assert "Log out" not in page.text
        assert (await http.get("/api/v1/whoami")).json()["name"] == "anonymous"
        # Forms still carry their CSRF token: another site's page must not post them.
        response = await http.post(
            "/modules", data={"modid": "1", "cmdid": "1", "hosts": "10.0.0.1:1"}
        )
        assert response.status_code == 403
        # A JSON API write cannot come from another site's form: it needs a JSON body.
        form = await http.post("/api/v1/modules", data={"modid": "1"})
        assert form.status_code == 400
        assert "application/json" in form.json()["error"]
    async with open_console.client(host="rebound.example:7780") as http:
        for path in ("/", "/api/v1/modules", "/static/console.css"):
            response = await http.get(path)
            assert response.status_code == 403
            assert "loopback" in response.text
    assert await open_console.store.list_routes() == {}


async def test_pages_carry_security_headers_and_no_cache(open_console: Console) -> None:
    async with open_console.client() as http:
        page = await http.get("/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_config_users_are_checked_at_load(tmp_path: object) -> None:
    from pathlib import Path

    from lars.config import load_config

    path = Path(str(tmp_path)) / "lars.toml"
    path.write_text('[[web.users]]\nname = "alice"\nrole = "root"\npassword_hash = "x"\n')
    with pytest.raises(ConfigError, match=r"web\.users\.role"):
        load_config(path)
    path.write_text('[[web.users]]\nname = "alice"\nrole = "admin"\npassword_hash = "x"\n')
    with pytest.raises(ConfigError, match=r"web.users.password_hash.*lars web passwd"):
        load_config(path)
    path.write_text('[[web.users]]\nname = "alice"\nrole = "admin"\n')
    with pytest.raises(ConfigError, match=r"web.users: missing key\(s\) 'password_hash'"):
        load_config(path)
    good = USERS[0]
    entry = f'name = "alice"\nrole = "admin"\npassword_hash = "{good.password_hash}"\n'
    path.write_text(f"[[web.users]]\n{entry}[[web.users]]\n{entry}")
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(path)
    path.write_text(f"[[web.users]]\n{entry}")
    assert load_config(path).web.users == [WebUser("alice", "admin", good.password_hash)]
    path.write_text('[web]\nsecret = "short"\n')
    with pytest.raises(ConfigError, match=r"web\.secret"):
        load_config(path)


async def test_refused_requests_are_counted_under_their_route(secured_console: Console) -> None:
    async with secured_console.client() as http:
        await http.get("/api/v1/modules/1/1")
        await http.get("/status")
    value = secured_console.registry.get_sample_value
    name = "lars_web_http_requests_total"
    assert value(name, {"route": "/api/v1/modules/{modid}/{cmdid}", "status": "401"}) == 1
    assert value(name, {"route": "/status", "status": "303"}) == 1
