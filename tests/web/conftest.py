"""The console in process: the app over a real store, driven by httpx through ASGI.

httpx's ASGITransport runs the app in the test's own trio run, next to the store the test
opened (Starlette's TestClient would run it in an event loop of its own, in another thread,
away from that store).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from prometheus_client import CollectorRegistry

from lars.config import WebToken, WebUser
from lars.store import RouteStore, open_store
from lars.web.app import make_app, requests_counter
from lars.web.auth import Accounts, hash_password, hash_token
from lars.web.service import ConsoleService

#: Cheap scrypt for tests (the format allows any power of 2).
TEST_N = 2**10
PASSWORDS = {"alice": "alice's password", "victor": "victor's password"}
USERS = [
    WebUser("alice", "admin", hash_password(PASSWORDS["alice"], n=TEST_N)),
    WebUser("victor", "viewer", hash_password(PASSWORDS["victor"], n=TEST_N)),
]
TOKENS = {"deployer": "deployer-token-0123456789", "dashboard": "dashboard-token-0123456789"}
TOKEN_ENTRIES = [
    WebToken("deployer", "admin", hash_token(TOKENS["deployer"])),
    WebToken("dashboard", "viewer", hash_token(TOKENS["dashboard"])),
]
SECRET = b"a test secret of at least 32 bytes!!"
CLIENT = "192.0.2.7"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@attrs.define
class Console:
    """A console app over a store, with what it told "DNS" and its request counter."""

    store: RouteStore
    app: Any
    registry: CollectorRegistry
    notified: list[int] = attrs.Factory(list)

    @asynccontextmanager
    async def client(
        self, host: str = "127.0.0.1", client: str = CLIENT, **kwargs: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        """An HTTP client of the app, as if from ``client``, asking for ``host``."""
        transport = httpx.ASGITransport(app=self.app, client=(client, 40000))
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://{host}", **kwargs
        ) as http:
            yield http


def make_console(
    store: RouteStore,
    *,
    users: Sequence[WebUser] = (),
    tokens: Sequence[WebToken] = (),
    notify_failures: Sequence[str] = (),
) -> Console:
    """The console app over ``store``; its DNS notices are recorded, not sent."""
    registry = CollectorRegistry()
    console = Console(store, None, registry)

    async def notify(version: int) -> list[str]:
        console.notified.append(version)
        return list(notify_failures)

    console.app = make_app(
        ConsoleService(store, notify),
        Accounts(users, tokens),
        SECRET,
        requests_counter(registry),
    )
    return console


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[RouteStore]:
    """An initialised SQLite store (the HTTP layer's tests; the service's run on both)."""
    async with open_store(f"sqlite:///{tmp_path}/console.db", create=True) as store:
        await store.init_schema()
        yield store


@pytest.fixture
def open_console(sqlite_store: RouteStore) -> Console:
    """No users, no tokens: open mode (every request is the admin ``anonymous``)."""
    return make_console(sqlite_store)


@pytest.fixture
def secured_console(sqlite_store: RouteStore) -> Console:
    """Users alice (admin) and victor (viewer), tokens deployer (admin) and dashboard."""
    return make_console(sqlite_store, users=USERS, tokens=TOKEN_ENTRIES)


def csrf_of(page: str) -> str:
    """The CSRF token in a page's forms."""
    match = _CSRF.search(page)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def login(http: httpx.AsyncClient, name: str, password: str | None = None) -> str:
    """Log in through the form; returns the new session's CSRF token."""
    page = await http.get("/login")
    response = await http.post(
        "/login",
        data={
            "csrf": csrf_of(page.text),
            "name": name,
            "password": PASSWORDS[name] if password is None else password,
            "next": "/",
        },
    )
    assert response.status_code == 303, response.text
    return csrf_of((await http.get("/")).text)


def bearer(name: str) -> dict[str, str]:
    """The Authorization header of a test token."""
    return {"Authorization": f"Bearer {TOKENS[name]}"}
