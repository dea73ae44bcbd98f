"""The web role: served by Hypercorn's trio worker on a real socket, inside ``run_roles``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from lars import wire
from lars.config import AgentConfig, Config, WebConfig
from lars.errors import ConfigError, LarsError
from lars.roles.run import run_roles
from lars.store import RouteStore, open_store
from lars.web.role import WebServer, check_web_config, console_url
from tests.netutil import free_tcp_port
from tests.web.conftest import USERS


def web_config(**changes: Any) -> Config:
    """Defaults with the console and its metrics on free ports, and DNS notices to a port
    nothing listens on (never the default 7778)."""
    web = attrs.evolve(WebConfig(listen="127.0.0.1:0", http_listen="127.0.0.1:0"), **changes)
    agent = AgentConfig(dns=[f"127.0.0.1:{free_tcp_port()}"])
    return Config(web=web, agent=agent)


async def fake_dns(
    notices: list[int], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A TCP listener that records the versions of RouteChangeNotice frames."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        decoder = wire.FrameDecoder()
        async with stream:
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                notices.extend(m.version for m in decoder if isinstance(m, wire.RouteChangeNotice))

    await trio.serve_listeners(handle, listeners)


async def test_the_console_is_served_over_http_and_writes_tell_dns(
    sqlite_store: RouteStore,
) -> None:
    notices: list[int] = []
    async with trio.open_nursery() as nursery:
        dns_port = await nursery.start(fake_dns, notices)
        config = web_config()
        config = attrs.evolve(
            config, agent=attrs.evolve(config.agent, dns=[f"127.0.0.1:{dns_port}"])
        )
        web = WebServer(config, sqlite_store)
        url = await nursery.start(web.serve)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        async with httpx.AsyncClient(base_url=url) as http:
            page = await http.get("/")
            assert page.status_code == 200 and "Modules" in page.text
            created = await http.post(
                "/api/v1/modules", json={"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001"]}
            )
            assert created.status_code == 201
        with trio.fail_after(5):
            while not notices:
                await trio.sleep(0.01)
        assert notices == [created.json()["version"]]
        assert created.json()["warnings"] == []
        value = web.registry.get_sample_value
        assert value("lars_web_http_requests_total", {"route": "/", "status": "200"}) == 1
        assert await web.observed().not_ready() is None
        nursery.cancel_scope.cancel()


async def test_a_taken_port_is_one_clear_error(sqlite_store: RouteStore) -> None:
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    web = WebServer(web_config(listen=f"127.0.0.1:{port}"), sqlite_store)
    with pytest.raises(LarsError, match=f"web cannot listen on tcp 127.0.0.1:{port}"):
        await web.serve()
    taken.close()


def test_without_users_only_a_loopback_address_is_allowed() -> None:
    with pytest.raises(ConfigError, match="serves only on a loopback address"):
        check_web_config(web_config(listen="0.0.0.0:7780"))
    check_web_config(web_config(listen="0.0.0.0:7780", users=USERS))
    check_web_config(web_config(listen="[::1]:7780"))
    assert console_url(("::1", 7780)) == "http://[::1]:7780/"


async def test_run_refuses_a_public_console_without_users_before_anything_starts(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path}/never-created.db"
    with pytest.raises(ConfigError, match="loopback"):
        await run_roles(web_config(listen="0.0.0.0:0"), ["web"], store_override=store)
    assert not (tmp_path / "never-created.db").exists()


async def test_run_roles_serves_the_console_and_its_metrics(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/lars.db"
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(
            lambda task_status: run_roles(
                web_config(), ["web"], store_override=store, task_status=task_status
            )
        )
        url = addresses["web"]
        host, port = addresses["http"]
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}api/v1/whoami")).json()["name"] == "anonymous"
            ready = await http.get(f"http://{host}:{port}/readyz")
            assert ready.status_code == 200, ready.text
            metrics = (await http.get(f"http://{host}:{port}/metrics")).text
            assert (
                'lars_web_http_requests_total{route="/api/v1/whoami",status="200"} 1.0' in metrics
            )
            # The alarm engine runs beside the console: it takes the lease at start.
            with trio.fail_after(10):
                while "lars_alarms_rounds_total 0.0" in metrics:
                    await trio.sleep(0.05)
                    metrics = (await http.get(f"http://{host}:{port}/metrics")).text
        assert "lars_alarms_leader 1.0" in metrics
        nursery.cancel_scope.cancel()
    # Stopping gave the lease up, so another instance takes over at once.
    async with open_store(store) as opened:
        lease = await opened.alarm_lease()
        assert lease is not None and lease.expires == 0
