"""Create and drop throw-away MySQL databases for tests.

``LARS_TEST_MYSQL`` names the server (default ``mysql://root@127.0.0.1:3306``). The MySQL
tests are not optional: when the server cannot be reached they fail, with a message saying
how to start it. ``LARS_TEST_MYSQL=off`` skips them explicitly on a machine without MySQL;
CI never sets it.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import trio

from lars.store import open_store
from lars.store.mysql import _Connection

ENV = "LARS_TEST_MYSQL"
DEFAULT = "mysql://root@127.0.0.1:3306"
_counter = itertools.count()


def server_url() -> str:
    """The MySQL server URL (no database), or skip when explicitly turned off."""
    url = os.environ.get(ENV, DEFAULT).rstrip("/")
    if url.lower() == "off":
        pytest.skip(f"MySQL tests turned off ({ENV}=off)")
    return url


async def _execute(server: str, *statements: str) -> None:
    parts = urlsplit(server)
    conn = _Connection(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        autocommit=True,
    )
    try:
        await conn.connect()
    except Exception as exc:
        pytest.fail(
            f"MySQL tests need a server at {server} ({exc}). Start MariaDB "
            f"(start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd) "
            f"or set {ENV}=off to skip them on purpose.",
            pytrace=False,
        )
    try:
        async with conn.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
    finally:
        await conn.aclose()


def new_database_sync(*statements_after: str) -> tuple[str, str]:
    """Create a fresh database; returns ``(store URL, database name)``. Sync: uses trio.run."""
    server = server_url()
    name = f"lars_test_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    trio.run(_execute, server, f"CREATE DATABASE `{name}`")
    if statements_after:
        trio.run(_execute, f"{server}", f"USE `{name}`", *statements_after)
    return f"{server}/{name}", name


def drop_database_sync(name: str) -> None:
    """Drop a database made by :func:`new_database_sync`."""
    trio.run(_execute, server_url(), f"DROP DATABASE IF EXISTS `{name}`")


@asynccontextmanager
async def fresh_database(server: str | None = None, *, init: bool = False) -> AsyncIterator[str]:
    """A new, empty database (with Lars's tables if ``init``), dropped afterwards; yields its
    store URL. ``server`` defaults to the test server (``LARS_TEST_MYSQL``)."""
    server = (server or server_url()).rstrip("/")
    name = f"lars_test_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    await _execute(server, f"CREATE DATABASE `{name}`")
    url = f"{server}/{name}"
    try:
        if init:
            async with open_store(url) as store:
                await store.init_schema()
        yield url
    finally:
        with trio.CancelScope(shield=True):
            await _execute(server, f"DROP DATABASE IF EXISTS `{name}`")


async def execute(url: str, *statements: str) -> None:
    """Run statements against the database of a store URL."""
    server, _, name = url.rpartition("/")
    await _execute(server, f"USE `{name}`", *statements)
