from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lars.store import RouteStore, open_store
from tests import mysql_admin


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
