"""The route store interface and its records."""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from lars.core.model import HostKey, ModuleKey
from lars.errors import StoreError

if TYPE_CHECKING:
    from lars.store.schema import ColumnLimits, UpgradePlan, UpgradeStep

#: Module -> its hosts.
RouteMap = dict[ModuleKey, frozenset[HostKey]]


@attrs.frozen
class RouteSnapshot:
    """All routes at one store version, read in one consistent transaction.

    ``changed`` holds the modules with a ``RouteChange`` row newer than the version asked
    about (empty when no version was given).
    """

    version: int
    routes: RouteMap
    changed: frozenset[ModuleKey] = frozenset()


@attrs.frozen
class RouteDelta:
    """The routes of the modules changed since a version, read in one transaction.

    ``routes`` holds the current hosts of every module in ``changed``; a changed module
    missing from it has no hosts any more. ``changed`` is empty when the version moved
    without any ``RouteChange`` row, in which case only a full load can tell what changed.
    """

    version: int
    changed: frozenset[ModuleKey]
    routes: RouteMap


@attrs.frozen
class CallStatus:
    """One ``ServerCallStatus`` row: one node's call counts as seen from one caller."""

    modid: int
    cmdid: int
    ip: int
    port: int
    caller: int
    succ: int
    err: int
    ts: int
    overload: bool
    succ_total: int = 0
    err_total: int = 0

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """The row's primary key."""
        return (self.modid, self.cmdid, self.ip, self.port, self.caller)


@attrs.frozen
class RouteWrite:
    """Outcome of a route write: the new version, or ``None`` if nothing changed."""

    version: int | None
    #: Modules whose host set changed.
    modules: frozenset[ModuleKey] = frozenset()
    #: Hosts added and removed, over all modules.
    added: int = 0
    removed: int = 0

    @property
    def changed(self) -> bool:
        """True if the write changed anything."""
        return self.version is not None


class RouteStore(abc.ABC):
    """Where routes and call statistics live. Every method may raise :class:`StoreError`."""

    #: ``"sqlite"`` or ``"mysql"``
    kind: str
    #: The URL with any password hidden, for logs and messages.
    display_url: str

    @abc.abstractmethod
    async def init_schema(self) -> list[str]:
        """Create missing tables and columns, never dropping anything. Returns what it did."""

    async def missing_schema(self, required: Mapping[str, Collection[str]]) -> list[str]:
        """What the store lacks of the ``required`` tables and columns (table -> columns), as
        ``"table X"`` and ``"column X.c"``; empty when nothing is missing (or the store has
        no schema to check)."""
        return []

    async def plan_upgrade(self) -> UpgradePlan:
        """What ``lars db upgrade`` would change (reads only)."""
        raise StoreError(f"the store {self.display_url} cannot be upgraded")

    async def apply_upgrade(self, step: UpgradeStep) -> None:
        """Apply one step of :meth:`plan_upgrade`'s plan."""
        raise StoreError(f"the store {self.display_url} cannot be upgraded")

    async def call_status_limits(self) -> ColumnLimits | None:
        """The values ``ServerCallStatus``'s integer columns hold as the database declares
        them, so that the reporter drops a row that does not fit before writing its batch;
        None when unknown (nothing to check)."""
        return None

    @abc.abstractmethod
    async def route_version(self) -> int:
        """The current ``RouteVersion.version`` (0 if the row is missing)."""

    @abc.abstractmethod
    async def load_routes(self, changes_since: int | None = None) -> RouteSnapshot:
        """Read the version, every route and (optionally) the modules changed since a version."""

    @abc.abstractmethod
    async def load_changes(self, since: int) -> RouteDelta:
        """Read the version and the routes of the modules changed after version ``since``."""

    @abc.abstractmethod
    async def change_routes(
        self,
        add: Mapping[ModuleKey, Collection[HostKey]] | None = None,
        remove: Mapping[ModuleKey, Collection[HostKey] | None] | None = None,
    ) -> RouteWrite:
        """Add and remove hosts in one transaction.

        ``remove[module] = None`` removes every host of the module. If anything changes, the
        version is raised once and one ``RouteChange`` row is written per module changed;
        a write that changes nothing raises nothing.
        """

    async def add_hosts(self, module: ModuleKey, hosts: Collection[HostKey]) -> RouteWrite:
        """Add hosts to a module's route (hosts already there are left alone)."""
        return await self.change_routes(add={module: hosts})

    async def remove_hosts(
        self, module: ModuleKey, hosts: Collection[HostKey] | None
    ) -> RouteWrite:
        """Remove hosts from a module's route; ``None`` removes them all."""
        return await self.change_routes(remove={module: hosts})

    @abc.abstractmethod
    async def list_routes(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> dict[ModuleKey, list[HostKey]]:
        """Routes sorted by module and host, optionally only one modid or one module."""

    @abc.abstractmethod
    async def purge_changes(self, older_than: float) -> int:
        """Delete ``RouteChange`` rows written more than ``older_than`` seconds ago."""

    @abc.abstractmethod
    async def upsert_call_status(self, rows: Sequence[CallStatus]) -> None:
        """Store call statistics: latest counts replace, totals accumulate, one transaction."""

    @abc.abstractmethod
    async def read_call_status(
        self, modid: int | None = None, cmdid: int | None = None
    ) -> list[CallStatus]:
        """Read ``ServerCallStatus`` rows, sorted by key."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and threads."""

    async def __aenter__(self) -> RouteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
