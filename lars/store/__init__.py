"""Route stores: one interface (:class:`RouteStore`), SQLite and MySQL implementations.

``open_store(url)`` picks the implementation from the URL:

* ``sqlite:///lars.db`` -- a file relative to the working directory;
* ``sqlite:////var/lib/lars/lars.db`` -- an absolute path; ``sqlite:///:memory:`` for tests;
* ``mysql://user:password@host:port/database?pool_size=4`` -- MySQL, MariaDB and friends.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from lars.errors import ConfigError
from lars.store.base import (
    ACTOR_NAME_MAX,
    ACTOR_SOURCE_MAX,
    ALARM_NAME_MAX,
    ALARM_RULE_MAX_BYTES,
    ALARM_SUBJECT_MAX,
    CALL_STATUS_SORTS,
    HISTORY_STEP,
    NAME_KINDS,
    NAME_MAX,
    PAGE_MAX,
    Actor,
    AlarmDecision,
    AlarmEvent,
    AlarmState,
    AuditEntry,
    CallPoint,
    CallStatus,
    HistoryRow,
    HostCalls,
    HostStatus,
    Lease,
    ModuleSummary,
    RouteDelta,
    RouteMap,
    RouteSnapshot,
    RouteStore,
    RouteWrite,
    StoredRule,
)
from lars.store.schema import ColumnLimits, UpgradePlan, UpgradeStep

__all__ = [
    "ACTOR_NAME_MAX",
    "ACTOR_SOURCE_MAX",
    "ALARM_NAME_MAX",
    "ALARM_RULE_MAX_BYTES",
    "ALARM_SUBJECT_MAX",
    "CALL_STATUS_SORTS",
    "HISTORY_STEP",
    "NAME_KINDS",
    "NAME_MAX",
    "PAGE_MAX",
    "Actor",
    "AlarmDecision",
    "AlarmEvent",
    "AlarmState",
    "AuditEntry",
    "CallPoint",
    "CallStatus",
    "ColumnLimits",
    "HistoryRow",
    "HostCalls",
    "HostStatus",
    "Lease",
    "ModuleSummary",
    "RouteDelta",
    "RouteMap",
    "RouteSnapshot",
    "RouteStore",
    "RouteWrite",
    "StoredRule",
    "UpgradePlan",
    "UpgradeStep",
    "open_store",
]

_MYSQL_OPTIONS = {"pool_size": int, "connect_timeout": float, "query_timeout": float}


def open_store(url: str, *, create: bool = False) -> RouteStore:
    """Open the store named by ``url`` (no I/O happens until the first operation).

    ``create`` allows a new SQLite file to be created; without it a missing file is an error.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"store URL must look like sqlite:///path or mysql://...: {url!r}")
    if scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigError(f"SQLite URL must be sqlite:///relative or sqlite:////abs: {url!r}")
        from lars.store.sqlite import SqliteStore

        return SqliteStore(unquote(rest[1:]), create=create)
    if scheme in ("mysql", "mariadb"):
        return _open_mysql(url)
    raise ConfigError(f"unsupported store {scheme!r} in {url!r} (use sqlite or mysql)")


def _open_mysql(url: str) -> RouteStore:
    from lars.store.mysql import MysqlStore

    parts = urlsplit(url)
    database = parts.path.lstrip("/")
    if not database or "/" in database:
        raise ConfigError(f"MySQL URL must name a database: mysql://user@host:port/db, got {url!r}")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ConfigError(f"bad port in store URL {url!r}") from None
    options: dict[str, float] = {}
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        if key not in _MYSQL_OPTIONS:
            known = ", ".join(sorted(_MYSQL_OPTIONS))
            raise ConfigError(f"unknown store URL option {key!r} (known: {known})")
        try:
            options[key] = _MYSQL_OPTIONS[key](values[-1])
        except ValueError:
            raise ConfigError(
                f"store URL option {key} must be a number, got {values[-1]!r}"
            ) from None
    return MysqlStore(
        host=parts.hostname or "127.0.0.1",
        port=port,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=unquote(database),
        **options,  # type: ignore[arg-type]
    )
