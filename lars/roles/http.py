"""The HTTP listener of the daemons: ``/metrics``, ``/healthz`` and ``/readyz``.

Served by Hypercorn's trio worker in the roles' own trio run (no thread servers), with a
small Starlette app. One listener per process: when one ``lars run`` runs several roles,
they share it, and each role brings its own registry (``prometheus_client``) and readiness
check (a :class:`Observed`).

* ``/metrics``: the Prometheus text exposition of the process registry (``lars_build_info``,
  ``process_*``) followed by every role's registry. Role metrics are read from the roles'
  own counters at scrape time by custom collectors, so serving them costs the hot paths
  nothing.
* ``/healthz``: 200 while the process serves HTTP at all.
* ``/readyz``: 200 ``ready`` when every role is ready, else 503 with one line per role
  that is not, saying why.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import (
    CollectorRegistry,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from lars._version import __version__
from lars.config import parse_address
from lars.errors import LarsError, StoreError
from lars.store import RouteStore

log = logging.getLogger("lars.http")

# Counters and histograms would each add a ``_created`` series: a timestamp nobody charts.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds a readiness check may take before it counts as "not ready".
READY_TIMEOUT = 2.0


@attrs.frozen
class Observed:
    """What one role offers the HTTP listener: its registry, and a readiness check that
    returns None when ready, else the reason it is not."""

    role: str
    registry: CollectorRegistry
    not_ready: Callable[[], Awaitable[str | None]]


def process_registry() -> CollectorRegistry:
    """The process-wide series: ``lars_build_info{version}`` and ``process_*``."""
    registry = CollectorRegistry()
    Info("lars_build", "Version of this Lars process.", registry=registry).info(
        {"version": __version__}
    )
    ProcessCollector(registry=registry)
    return registry


def make_app(roles: Sequence[Observed]) -> Starlette:
    """The Starlette app serving the endpoints for ``roles``."""
    registries = [process_registry(), *(r.registry for r in roles)]

    async def metrics(_: Request) -> Response:
        body = b"".join(generate_latest(registry) for registry in registries)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        problems = []
        for role in roles:
            with trio.move_on_after(READY_TIMEOUT) as scope:
                reason = await role.not_ready()
            if scope.cancelled_caught:
                reason = f"readiness check took over {READY_TIMEOUT:.0f}s"
            if reason is not None:
                problems.append(f"{role.role}: {reason}\n")
        if problems:
            return PlainTextResponse("".join(problems), status_code=503)
        return PlainTextResponse("ready\n")

    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )


async def serve_http(
    address: str,
    roles: Sequence[Observed],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints of ``roles`` on ``address`` (``host:port``, port 0 for any)
    until cancelled. ``task_status.started`` gets the bound ``(host, port)``."""
    sock = bind_listener(address, "metrics")
    bound = sock.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_asgi, make_app(roles), sock, "metrics")
        log.info("metrics and health on http://%s:%d", *bound)
        task_status.started(bound)


def bind_listener(address: str, what: str) -> socket.socket:
    """A TCP socket bound and listening on ``address`` (port 0: any free port). A taken
    port or a bad address is one clear LarsError naming ``what`` listens."""
    host, port = parse_address(address, listen=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise LarsError(f"{what} cannot listen on tcp {address}: {exc.strerror or exc}") from None
    return sock


async def serve_asgi(
    app: Starlette,
    sock: socket.socket,
    what: str,
    *,
    graceful_timeout: float = 0.5,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with Hypercorn's trio worker on the listening ``sock`` (from
    :func:`bind_listener`; this takes it over) until cancelled. ``what`` names the
    server's logger. Hypercorn is handed the socket as ``fd://``."""
    config = HypercornConfig()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    sock.close()
    config.accesslog = None
    config.errorlog = logging.getLogger(f"lars.{what}.server")  # Hypercorn sets its level
    config.loglevel = "WARNING"
    config.graceful_timeout = graceful_timeout
    # Starlette is an ASGI app; Hypercorn's type for one differs from Starlette's in detail.
    asgi: Any = app
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(serve, asgi, config, shutdown_trigger=trio.sleep_forever)
        )
        task_status.started()


def store_readiness(store: RouteStore) -> Callable[[], Awaitable[str | None]]:
    """A readiness check for roles that need the store: not ready while it does not
    answer."""

    async def not_ready() -> str | None:
        try:
            await store.route_version()
        except StoreError as exc:
            return f"store unreachable: {exc}"
        return None

    return not_ready
