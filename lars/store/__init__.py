"""Route stores: one interface (:class:`RouteStore`), SQLite and MySQL implementations.

``open_store(url)`` picks the implementation from the URL:

* ``sqlite:///lars.db`` -- a file relative to the working directory;
* ``sqlite:////var/lib/lars/lars.db`` -- an absolute path; ``sqlite:///:memory:`` for tests;
* ``mysql://user:password@host:port/database?pool_size=4`` -- MySQL, MariaDB and friends;
  ``mysql://user:password@h1:3306,h2:3306,h3:3306/database`` -- several hosts (a Galera
  cluster, a primary and its replicas): the first healthy one serves, the others take over.
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
    EXPIRE_BATCH,
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
    LeaseBatch,
    LeaseDrop,
    LeaseExpiry,
    LeaseGrant,
    LeaseRenewal,
    MetaMap,
    ModuleSummary,
    PolicyMap,
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
    "EXPIRE_BATCH",
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
    "LeaseBatch",
    "LeaseDrop",
    "LeaseExpiry",
    "LeaseGrant",
    "LeaseRenewal",
    "MetaMap",
    "ModuleSummary",
    "PolicyMap",
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

_MYSQL_OPTIONS = {
    "pool_size": int,
    "connect_timeout": float,
    "query_timeout": float,
    "retries": int,
}
#: Most hosts one store URL may list.
MAX_STORE_HOSTS = 16


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


def _masked(url: str) -> str:
    """``url`` with its password replaced by ``***``, for error messages."""
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}://{userinfo}{at}{hosts}{slash}{tail}"


def parse_store_hosts(text: str, url: str) -> list[tuple[str, int]]:
    """The ``host[:port]`` list of a MySQL store URL (``h1:3306,h2,[::1]:3307``); a
    ConfigError naming the faulty entry otherwise. The port defaults to 3306."""
    shown = _masked(url)
    entries = text.split(",")
    if len(entries) > MAX_STORE_HOSTS:
        raise ConfigError(
            f"store URL {shown} lists {len(entries)} hosts; at most {MAX_STORE_HOSTS}"
        )
    hosts: list[tuple[str, int]] = []
    for n, entry in enumerate(entries, 1):
        which = f"host {n} of {len(entries)}" if len(entries) > 1 else "the host"
        entry = entry.strip()
        if not entry:
            if len(entries) == 1:
                return [("127.0.0.1", 3306)]
            raise ConfigError(f"store URL {shown}: {which} is empty (h1:3306,h2:3306,...)")
        if entry.startswith("["):
            host, close, after = entry[1:].partition("]")
            if not close or (after and not after.startswith(":")):
                raise ConfigError(f"store URL {shown}: {which} {entry!r} is not [ipv6]:port")
            port_text = after[1:] if after else ""
        elif entry.count(":") > 1:
            raise ConfigError(
                f"store URL {shown}: {which} {entry!r}: write an IPv6 address as [addr]:port"
            )
        else:
            host, _, port_text = entry.partition(":")
            if ":" in entry and not port_text:
                raise ConfigError(f"store URL {shown}: {which} {entry!r} has an empty port")
        if not host:
            raise ConfigError(f"store URL {shown}: {which} {entry!r} has no host name")
        port = 3306
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ConfigError(
                    f"bad port {port_text!r} for {which} ({host}) in store URL {shown}:"
                    " a port is 1 to 65535"
                )
            port = int(port_text)
        if (host, port) in hosts:
            raise ConfigError(f"store URL {shown}: {which} {host}:{port} is listed twice")
        hosts.append((host, port))
    return hosts


def _open_mysql(url: str) -> RouteStore:
    from lars.store.mysql import MysqlStore

    shown = _masked(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced [ or ]
        raise ConfigError(f"store URL {shown}: {exc}; a host is name:port or [ipv6]:port") from None
    database = parts.path.lstrip("/")
    if not database or "/" in database:
        raise ConfigError(
            f"MySQL URL must name a database: mysql://user@host:port/db, got {shown!r}"
        )
    userinfo, _, host_text = parts.netloc.rpartition("@")
    hosts = parse_store_hosts(host_text, url)
    user, _, password = userinfo.partition(":")
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
        if options[key] < (0 if key == "retries" else 1e-9):
            raise ConfigError(f"store URL option {key} must be positive, got {values[-1]!r}")
    return MysqlStore(
        hosts=hosts,
        user=unquote(user or "root"),
        password=unquote(password),
        database=unquote(database),
        **options,  # type: ignore[arg-type]
    )
