"""The ``web`` role: the console app served by Hypercorn's trio worker in the role's nursery.

Like the HTTP listener of the other roles (:mod:`lars.roles.http`), it binds its own socket
first (a taken port is one clear error, port 0 works) and hands Hypercorn a duplicate as
``fd://``. Writes tell the DNS instances of ``[agent] dns``, as ``lars route`` does. Beside
the console runs the alarm engine (:mod:`lars.alarms.engine`), which evaluates the rules
while this instance holds the store's alarm lease.
"""

from __future__ import annotations

import functools
import logging
import secrets
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from lars.alarms.engine import AlarmCollector, AlarmEngine
from lars.alarms.notify import WebhookNotifier
from lars.config import Config, parse_address
from lars.roles.common import notify_dns
from lars.roles.http import Observed, bind_listener, serve_asgi, store_readiness
from lars.store import RouteStore
from lars.tls import TlsContexts
from lars.web.app import make_app, requests_counter
from lars.web.auth import Accounts, check_listen
from lars.web.monitor import MonitorService
from lars.web.service import ConsoleService, FleetView

log = logging.getLogger("lars.web")

#: Seconds a DNS instance may take to accept a change notice before the write answers.
NOTIFY_WAIT = 0.5
#: Seconds in-flight requests get to finish when the role stops.
GRACEFUL_TIMEOUT = 1.0


def check_web_config(config: Config) -> Accounts:
    """The configured accounts, after refusing a listen address that needs a login when no
    user can log in (ConfigError). Run it before anything starts."""
    accounts = Accounts(config.web.users, config.web.tokens)
    host, _ = parse_address(config.web.listen, listen=True)
    check_listen(host, accounts, config.web.listen)
    return accounts


def console_url(address: tuple[str, int]) -> str:
    """``http://HOST:PORT/`` for a bound address."""
    host, port = address
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class WebServer:
    """The console and its API over ``store``."""

    def __init__(
        self, config: Config, store: RouteStore, *, tls: TlsContexts | None = None
    ) -> None:
        self.config = config
        #: The admin identity its change notices carry under TLS (None: plaintext).
        self.tls = tls
        self.store = store
        self.accounts = check_web_config(config)
        self.registry = CollectorRegistry()
        self.counter = requests_counter(self.registry)
        dns = list(config.agent.dns)
        self.service = ConsoleService(
            store, functools.partial(self._notify, dns, tls), FleetView.of(config.dns)
        )
        alarms = config.alarms
        notifier = WebhookNotifier(
            alarms.webhooks,
            timeout=alarms.webhook_timeout,
            retries=alarms.webhook_retries,
            queue_size=alarms.webhook_queue,
        )
        self.alarms = AlarmEngine(alarms, store, notifier)
        self.registry.register(AlarmCollector(self.alarms))
        self.monitor = MonitorService(store, alarms, self.alarms)
        # An empty secret: a random key per start (sessions end with the process).
        secret = config.web.secret.encode() or secrets.token_bytes(32)
        self.app: Any = make_app(
            self.service, self.accounts, secret, self.counter, monitor=self.monitor
        )

    @staticmethod
    async def _notify(addresses: list[str], tls: TlsContexts | None, version: int) -> list[str]:
        return await notify_dns(addresses, version, NOTIFY_WAIT, tls=tls)

    def observed(self) -> Observed:
        """The role's registry and readiness (the store answers) for /metrics and /readyz."""
        return Observed("web", self.registry, store_readiness(self.store))

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the console's URL."""
        sock = bind_listener(self.config.web.listen, "web")
        bound = sock.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_asgi, self.app, sock, "web", graceful_timeout=GRACEFUL_TIMEOUT
                )
            )
            await nursery.start(self.alarms.run)
            url = console_url(bound)
            if self.accounts.open:
                mode = "no users configured: no login, for this machine only"
            else:
                mode = "login required"
            log.info("console on %s (%s)", url, mode)
            task_status.started(url)
