"""Raw SQL reads for tests, through a store's own connection (there is no public API)."""

from __future__ import annotations

from typing import Any

from lars.store import RouteStore, sql


async def fetch(store: RouteStore, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one ``?``-placeholder query and return its rows."""

    def op() -> sql.Op[list[tuple[Any, ...]]]:
        return (yield (query, args)).rows

    return await store._run(op)  # type: ignore[attr-defined,no-any-return]


async def change_rows(store: RouteStore) -> list[tuple[int, int, int]]:
    """Every RouteChange row as ``(modid, cmdid, version)``, oldest first."""
    rows = await fetch(store, "SELECT modid, cmdid, version FROM RouteChange ORDER BY id")
    return [(int(m), int(c), int(v)) for m, c, v in rows]
