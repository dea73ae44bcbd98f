"""Run one or more roles in this process, with signal handling and a shutdown grace period.

Layout: one nursery per role under a supervisor nursery. SIGINT/SIGTERM start a graceful
shutdown: each role gets ``GRACE_SECONDS`` to finish (the reporter flushes what it holds),
then everything is cancelled. A second signal cancels at once.

Before the DNS, reporter and web start, their store is checked once (:func:`check_role_store`).
A store that can never work -- an unknown database, refused credentials, missing tables or
columns -- stops the process with one line naming the problem. A store that cannot be
reached (connection refused, timed out) may be starting up alongside Lars: it is waited
for, with capped backoff, logged once and then at a rate limit, and no role starts until it
answers. An outage after a good start is the roles' to ride out, as they always have.
"""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack

import trio

from lars._version import __version__
from lars.config import Config, parse_address, store_url
from lars.errors import ConfigError, InvalidValue, SchemaMissing, StoreUnavailable
from lars.roles.common import RateLimitedLog, backoff, is_loopback
from lars.roles.http import Observed, serve_http
from lars.store import RouteStore, open_store
from lars.store.sql import (
    ALARM_EVENT_COLUMNS,
    ALARM_STATE_COLUMNS,
    AUDIT_COLUMNS,
    HISTORY_COLUMNS,
    HISTORY_TABLE,
    NAME_TABLES,
    POLICY_COLUMNS,
    STATUS_COLUMNS,
    STATUS_TABLE,
)
from lars.tls import TlsContexts, contexts_for, reload_on, role_uri

log = logging.getLogger("lars")

ROLES = ("dns", "reporter", "agent", "web")
#: Seconds the roles get to stop cleanly after SIGINT/SIGTERM.
GRACE_SECONDS = 5.0

#: The tables and columns a role cannot work without. An original Lars database has what
#: the DNS needs; the reporter also needs the totals that `lars db init` appends.
ROLE_SCHEMA: dict[str, dict[str, tuple[str, ...]]] = {
    "dns": {
        "RouteData": ("modid", "cmdid", "serverip", "serverport"),
        "RouteVersion": ("id", "version"),
        "RouteChange": ("modid", "cmdid", "version"),
    },
    "reporter": {
        STATUS_TABLE: STATUS_COLUMNS,
        HISTORY_TABLE: HISTORY_COLUMNS,
        "ReportBatch": ("token", "written"),
    },
    # The console reads and writes all of the above, the audit log, the names, the call
    # history and the alarms.
    "web": {
        "RouteData": ("modid", "cmdid", "serverip", "serverport", "weight", "zone"),
        "RoutePolicy": ("modid", "cmdid", *POLICY_COLUMNS),
        "RouteVersion": ("id", "version"),
        "RouteChange": ("modid", "cmdid", "version"),
        STATUS_TABLE: STATUS_COLUMNS,
        "RouteAudit": ("id", *AUDIT_COLUMNS, "changes"),
        HISTORY_TABLE: HISTORY_COLUMNS,
        "AlarmRule": ("name", "definition", "updated", "actor"),
        "AlarmState": ALARM_STATE_COLUMNS,
        "AlarmEvent": ("id", *ALARM_EVENT_COLUMNS),
        "AlarmLease": ("name", "holder", "expires"),
        **{table: (column, "content") for table, column in NAME_TABLES.values()},
    },
}
#: Longest wait between tries while the store is unreachable at start-up, seconds.
STARTUP_RETRY_MAX = 5.0
#: Seconds between the "still unreachable" lines at start-up.
STARTUP_LOG_INTERVAL = 60.0


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit (DNS holds thousands of agents)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


async def open_role_store(url: str) -> RouteStore:
    """Open the store for a daemon. SQLite is created with its tables if missing (the
    embedded store needs no setup); a MySQL schema is the operator's (`lars db init`)."""
    store = open_store(url, create=url.startswith("sqlite:"))
    if store.kind == "sqlite":
        try:
            await store.init_schema()
        except BaseException:
            await store.aclose()
            raise
    return store


async def check_role_store(store: RouteStore, roles: Sequence[str]) -> None:
    """Return once the store answers and has what ``roles`` need.

    Raises a StoreError (one line: what is wrong, with which store) if it never can: an
    unknown database, refused credentials, missing tables or columns. Waits, logging at a
    rate limit, while it cannot be reached.
    """
    required: dict[str, tuple[str, ...]] = {}
    for role in roles:
        required.update(ROLE_SCHEMA.get(role, {}))
    if not required:
        return
    waiting = RateLimitedLog(log, STARTUP_LOG_INTERVAL)
    delays = backoff(cap=STARTUP_RETRY_MAX)
    while True:
        try:
            missing = await store.missing_schema(required)
            break
        except StoreUnavailable as exc:
            waiting.warning(
                "store unreachable at start-up (%s); %s will start once it answers",
                exc,
                " and ".join(r for r in roles if r in ROLE_SCHEMA),
            )
            await trio.sleep(next(delays))
    if missing:
        raise SchemaMissing(
            f"the store {store.display_url} is not initialised (missing {', '.join(missing)});"
            " run `lars db init`"
        )


async def run_roles(
    config: Config,
    roles: Sequence[str],
    *,
    store_override: str | None = None,
    task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``roles`` and run until cancelled or signalled.

    ``task_status.started`` receives ``{role: bound address}``.
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ConfigError(f"unknown role(s): {', '.join(sorted(unknown))}")
    if "web" in roles:
        from lars.web.role import check_web_config

        check_web_config(config)  # a config that cannot work fails before anything starts
    check_transport(config, roles)
    tls = contexts_for(config.tls, tls_role(config, roles)) if config.tls.mode == "on" else None
    raise_fd_limit()
    # SIGHUP re-reads the certificates; caught from the start (a process still waiting for
    # its store, or one without TLS, must not die of it), handled once the roles run.
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        await _run_roles(config, roles, store_override, tls, hangups, task_status)


async def _run_roles(
    config: Config,
    roles: Sequence[str],
    store_override: str | None,
    tls: TlsContexts | None,
    hangups: AsyncIterator[int],
    task_status: trio.TaskStatus[dict[str, object]],
) -> None:
    addresses: dict[str, object] = {}
    #: The roles that accept connections here share the open-files limit.
    listeners = max(1, len({"dns", "reporter"} & set(roles)))
    drains: list[Callable[[], Awaitable[None]]] = []
    observed: list[Observed] = []
    async with AsyncExitStack() as stack:
        store = None
        if {"dns", "reporter", "web"} & set(roles):
            store = await open_role_store(store_url(config, store_override))
            stack.push_async_callback(store.aclose)
            await check_role_store(store, roles)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload_on, hangups, tls)
            if tls is not None:
                log.info(
                    "TLS on: this process is %s, its certificate valid until %s",
                    role_uri(tls.role),
                    tls.not_after.isoformat(timespec="seconds"),
                )
            if "dns" in roles:
                from lars.roles.dns import DnsServer

                assert store is not None
                read_store = None
                if config.dns.store_read:
                    try:
                        read_store = open_store(config.dns.store_read)
                    except (ConfigError, InvalidValue) as exc:
                        raise ConfigError(f"[dns] store_read: {exc}") from None
                    stack.push_async_callback(read_store.aclose)
                dns = DnsServer(config.dns, store, tls=tls, read_store=read_store)
                dns.gate.fd_share = listeners
                addresses["dns"] = await nursery.start(dns.serve)
                observed.append(dns.observed())
            if "reporter" in roles:
                from lars.roles.reporter import Reporter

                assert store is not None
                reporter = Reporter(config.reporter, store, tls=tls)
                reporter.gate.fd_share = listeners
                addresses["reporter"] = await nursery.start(reporter.serve)
                observed.append(reporter.observed())
                drains.append(reporter.drain)
            if "agent" in roles:
                from lars.roles.agent import Agent

                agent = Agent(config.agent, tls=tls)
                ports = await nursery.start(agent.serve)
                addresses["agent"] = f"udp {config.agent.host}:{','.join(map(str, ports))}"
                drains.insert(0, agent.drain)  # its last reports go to the reporter first
                observed.append(agent.observed(config.metrics.max_module_labels))
            if "web" in roles:
                from lars.web.role import WebServer

                assert store is not None
                web = WebServer(config, store, tls=tls)
                addresses["web"] = await nursery.start(web.serve)
                observed.append(web.observed())
            http_listen = http_address(config, roles)
            if http_listen:
                addresses["http"] = await nursery.start(serve_http, http_listen, observed)
            nursery.start_soon(_watch_signals, nursery.cancel_scope, drains)
            listening = ", ".join(f"{role} on {_fmt(a)}" for role, a in addresses.items())
            log.info("lars %s running: %s", __version__, listening)
            task_status.started(addresses)


def tls_role(config: Config, roles: Sequence[str]) -> str:
    """The one identity a process with TLS on has: its role's (``admin`` for the console,
    which sends change notices). One certificate names one role, so such a process runs one
    role."""
    if len(roles) != 1:
        raise ConfigError(
            f'[tls] mode = "on": run each role in its own process with its own certificate'
            f" (asked for {', '.join(roles)} in one)"
        )
    return "admin" if roles[0] == "web" else roles[0]


def _loopback(host: str) -> bool:
    return host == "localhost" or is_loopback(host)  # another name may resolve to anything


def check_transport(config: Config, roles: Sequence[str]) -> None:
    """Refuse what would expose a role to the network unprotected: a DNS or reporter that
    listens beyond loopback without TLS (unless ``[tls] mode = "off"`` says so on purpose,
    then warned at every start), and an agent whose local API listens beyond loopback
    without ``[agent] allow_remote_api``."""
    listens = [
        (role, section.listen)
        for role, section in (("dns", config.dns), ("reporter", config.reporter))
        if role in roles
    ]
    for role, listen in listens:
        host, _ = parse_address(listen, listen=True)
        if _loopback(host) or config.tls.mode == "on":
            continue
        if config.tls.mode == "off":
            log.warning(
                '%s listens on %s without TLS ([tls] mode = "off"): anyone who reaches it can'
                " read routes or write statistics",
                role,
                listen,
            )
            continue
        raise ConfigError(
            f"{config.source}: [{role}] listen = {listen!r} is reachable from the network and"
            f' [tls] is not on: set [tls] mode = "on" with certificates (`lars tls init DIR`),'
            f' or mode = "off" to serve plaintext on purpose'
        )
    if "agent" in roles and not _loopback(config.agent.host) and not config.agent.allow_remote_api:
        raise ConfigError(
            f"{config.source}: [agent] host = {config.agent.host!r} would open the agent's API"
            " (get_host, report) to the network; keep it on 127.0.0.1, or set [agent]"
            " allow_remote_api = true on purpose"
        )


def http_address(config: Config, roles: Sequence[str]) -> str:
    """Where this process serves /metrics, /healthz and /readyz: the ``http_listen`` of the
    first of its roles in the order dns, reporter, agent, web ("" for none)."""
    for role, section in (
        ("dns", config.dns),
        ("reporter", config.reporter),
        ("agent", config.agent),
        ("web", config.web),
    ):
        if role in roles:
            return section.http_listen
    return ""


def _fmt(address: object) -> str:
    if isinstance(address, tuple) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


async def _watch_signals(
    scope: trio.CancelScope, drains: list[Callable[[], Awaitable[None]]]
) -> None:
    """First SIGINT/SIGTERM: let the roles drain for up to GRACE_SECONDS, then stop.
    A second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if scope.cancel_called or not drains:
                log.info("%s received: stopping", name)
                scope.cancel()
                return
            log.info("%s received: stopping within %.0fs (again to stop now)", name, GRACE_SECONDS)
            scope.deadline = trio.current_time() + GRACE_SECONDS

            async def drain_all() -> None:
                async with trio.open_nursery() as nursery:
                    for drain in drains:
                        nursery.start_soon(drain)
                scope.cancel()

            # Keep listening for a second signal while the roles drain.
            async with trio.open_nursery() as waiting:
                waiting.start_soon(drain_all)
                async for _ in signals:
                    log.info("second signal: stopping now")
                    scope.cancel()
                    return
