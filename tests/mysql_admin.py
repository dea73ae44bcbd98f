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
from urllib.parse import urlsplit

import pytest
import trio

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


async def new_database(*statements_after: str) -> tuple[str, str]:
    """Async twin of :func:`new_database_sync` (runs it in a worker thread)."""
    return await trio.to_thread.run_sync(lambda: new_database_sync(*statements_after))


async def drop_database(name: str) -> None:
    """Async twin of :func:`drop_database_sync`."""
    await trio.to_thread.run_sync(drop_database_sync, name)


async def execute(url: str, *statements: str) -> None:
    """Run statements against the database of a store URL."""
    server, _, name = url.rpartition("/")
    await _execute(server, f"USE `{name}`", *statements)
