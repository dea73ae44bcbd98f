from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lars.config import STORE_ENV, Config, parse_address
from lars.store import RouteStore, open_store
from tests import mysql_admin

#: Environment variables that would point a test at the developer's own config or store.
LARS_ENVIRONMENT = ("LARS_CONFIG", STORE_ENV)
#: The TCP ports a real Lars on this machine listens on by default (DNS, reporter).
DEFAULT_TCP_PORTS = frozenset(
    parse_address(address)[1] for address in (Config().dns.listen, Config().reporter.listen)
)


@pytest.fixture(autouse=True)
def isolated_from_the_working_directory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run every test in an empty directory of its own, without $LARS_CONFIG or $LARS_STORE,
    so that no test reads (or writes) the ./lars.toml and ./lars.db of wherever pytest runs.
    In process, connections to the default DNS and reporter ports are refused, as if nothing
    listened there, so a test never talks to a Lars the developer is running."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    for name in LARS_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    open_tcp_stream = trio.open_tcp_stream

    async def guarded(host: Any, port: int, **kwargs: Any) -> trio.SocketStream:
        if port in DEFAULT_TCP_PORTS:
            raise OSError(
                errno.ECONNREFUSED, f"tests must not connect to a default port ({host}:{port})"
            )
        return await open_tcp_stream(host, port, **kwargs)

    monkeypatch.setattr(trio, "open_tcp_stream", guarded)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty, initialised store of each kind: SQLite in tmp_path, a fresh MySQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/lars.db"
        async with open_store(url, create=True) as store:
            await store.init_schema()
        yield url
        return
    async with mysql_admin.fresh_database(init=True) as url:
        yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RouteStore]:
    """An open store on :func:`store_url`."""
    async with open_store(store_url) as opened:
        yield opened


@pytest.fixture
def mysql_db() -> Iterator[tuple[str, str]]:
    """A fresh, empty MySQL database for sync tests: ``(url, name)``, dropped afterwards."""
    url, name = mysql_admin.new_database_sync()
    try:
        yield url, name
    finally:
        mysql_admin.drop_database_sync(name)


@pytest.fixture
async def db_url() -> AsyncIterator[str]:
    """A fresh MySQL database with Lars's tables, dropped afterwards."""
    async with mysql_admin.fresh_database(init=True) as url:
        yield url
