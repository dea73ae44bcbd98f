"""The ``web`` role: the console app served by Hypercorn's trio worker in the role's nursery.

Like the HTTP listener of the other roles (:mod:`lars.roles.http`), it binds its own socket
first (a taken port is one clear error, port 0 works) and hands Hypercorn a duplicate as
``fd://``. Writes tell the DNS instances of ``[agent] dns``, as ``lars route`` does.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CollectorRegistry

from lars.config import Config, parse_address
from lars.errors import LarsError, StoreError
from lars.roles.common import notify_dns
from lars.roles.http import Observed
from lars.store import RouteStore
from lars.web.app import make_app, requests_counter
from lars.web.auth import Accounts, check_listen
from lars.web.service import ConsoleService

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

    def __init__(self, config: Config, store: RouteStore) -> None:
        self.config = config
        self.store = store
        self.accounts = check_web_config(config)
        self.registry = CollectorRegistry()
        self.counter = requests_counter(self.registry)
        dns = list(config.agent.dns)
        self.service = ConsoleService(store, functools.partial(self._notify, dns))
        # An empty secret: a random key per start (sessions end with the process).
        secret = config.web.secret.encode() or secrets.token_bytes(32)
        self.app: Any = make_app(self.service, self.accounts, secret, self.counter)

    @staticmethod
    async def _notify(addresses: list[str], version: int) -> list[str]:
        return await notify_dns(addresses, version, NOTIFY_WAIT)

    def observed(self) -> Observed:
        """The role's registry and readiness (the store answers) for /metrics and /readyz."""

        async def not_ready() -> str | None:
            try:
                await self.store.route_version()
            except StoreError as exc:
                return f"store unreachable: {exc}"
            return None

        return Observed("web", self.registry, not_ready)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the console's URL."""
        host, port = parse_address(self.config.web.listen, listen=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise LarsError(
                f"web cannot listen on tcp {self.config.web.listen}: {exc.strerror or exc}"
            ) from None
        bound = sock.getsockname()[:2]
        hypercorn = HypercornConfig()
        hypercorn.bind = [f"fd://{os.dup(sock.fileno())}"]
        sock.close()
        hypercorn.accesslog = None
        hypercorn.errorlog = logging.getLogger("lars.web.server")
        hypercorn.loglevel = "WARNING"
        hypercorn.graceful_timeout = GRACEFUL_TIMEOUT
        url = console_url(bound)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(serve, self.app, hypercorn, shutdown_trigger=trio.sleep_forever)
            )
            if self.accounts.open:
                mode = "no users configured: no login, for this machine only"
            else:
                mode = "login required"
            log.info("console on %s (%s)", url, mode)
            task_status.started(url)
