"""The DNS role as real ``lars`` processes on MariaDB, watched by ``lars query --watch``."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from lars import wire
from tests.e2e.procs import LineReader, Proxy, lars_cli, lars_process, watch_process
from tests.fakes import FramedClient

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]


def dns_config(store: str, **dns: Any) -> dict[str, Any]:
    return {"store": store, "dns": {"listen": "127.0.0.1:0", **dns}}


async def next_route(reader: LineReader, timeout: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        line: dict[str, Any] = json.loads(await reader.line())
    return line


async def route(tmp_path: Path, store: str, notify: list[str], *args: str) -> float:
    """Run ``lars route ...`` notifying ``notify``; returns when it exited (trio time)."""
    config = tmp_path / "writer.toml"
    config.write_text(f"[agent]\ndns = {json.dumps(notify or ['127.0.0.1:9'])}\n")
    extra = [] if notify else ["--no-notify"]
    await lars_cli("route", *args, "--store", store, "--config", str(config), *extra)
    return trio.current_time()


async def test_add_remove_and_delete_reach_a_watching_query(tmp_path: Path, db_url: str) -> None:
    await lars_cli("route", "add", "1", "1", "10.0.0.1:7001", "--store", db_url, "--no-notify")
    async with lars_process(tmp_path, "dns", ["dns"], dns_config(db_url)) as dns:
        address = dns.addresses["dns"]
        async with watch_process(address, 1, 1) as watch:
            first = await next_route(watch)
            assert (first["modid"], first["cmdid"], first["hosts"]) == (1, 1, ["10.0.0.1:7001"])
            assert isinstance(first["ts"], float)

            done = await route(tmp_path, db_url, [address], "add", "1", "1", "10.0.0.2:7002")
            pushed = await next_route(watch)
            delay = trio.current_time() - done
            assert pushed["hosts"] == ["10.0.0.1:7001", "10.0.0.2:7002"]
            assert delay < 1.0  # notified: no poll interval waited (typically a few ms)

            await route(tmp_path, db_url, [address], "rm", "1", "1", "10.0.0.1:7001")
            assert (await next_route(watch))["hosts"] == ["10.0.0.2:7002"]

            await route(tmp_path, db_url, [address], "rm", "1", "1", "--all", "--force")
            assert (await next_route(watch))["hosts"] == []  # module gone: empty push


async def test_lost_notification_still_arrives_by_polling(tmp_path: Path, db_url: str) -> None:
    config = dns_config(db_url, check_interval=1.0, reload_interval=10.0)
    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        watching = watch_process(dns.addresses["dns"], 2, 2)
        async with watching as watch:
            assert (await next_route(watch))["hosts"] == []
            done = await route(tmp_path, db_url, [], "add", "2", "2", "10.0.0.9:80")
            pushed = await next_route(watch)
            assert pushed["hosts"] == ["10.0.0.9:80"]
            assert trio.current_time() - done <= 1.0 + 0.5  # within check_interval (+ slack)


async def test_two_dns_instances_on_one_database_both_push(tmp_path: Path, db_url: str) -> None:
    async with (
        lars_process(tmp_path, "dns1", ["dns"], dns_config(db_url)) as dns1,
        lars_process(tmp_path, "dns2", ["dns"], dns_config(db_url)) as dns2,
    ):
        a1, a2 = dns1.addresses["dns"], dns2.addresses["dns"]
        async with watch_process(a1, 3, 3) as w1, watch_process(a2, 3, 3) as w2:
            assert (await next_route(w1))["hosts"] == (await next_route(w2))["hosts"] == []
            for i in range(1, 4):
                await route(tmp_path, db_url, [a1, a2], "add", "3", "3", f"10.0.0.{i}:80")
                expected = [f"10.0.0.{j}:80" for j in range(1, i + 1)]
                assert (await next_route(w1))["hosts"] == expected
                assert (await next_route(w2))["hosts"] == expected
            # Only one instance notified: the other still pushes, by polling.
            await route(tmp_path, db_url, [a1], "rm", "3", "3", "10.0.0.1:80")
            assert (await next_route(w1))["hosts"] == ["10.0.0.2:80", "10.0.0.3:80"]
            assert (await next_route(w2))["hosts"] == ["10.0.0.2:80", "10.0.0.3:80"]


async def test_database_unreachable_then_back(tmp_path: Path, db_url: str) -> None:
    server, _, database = db_url.rpartition("/")
    host, port = server.rpartition("@")[2].split(":")
    proxy = Proxy((host, int(port)))
    await lars_cli("route", "add", "4", "4", "10.0.0.1:80", "--store", db_url, "--no-notify")
    async with trio.open_nursery() as nursery:
        proxy_port = await nursery.start(proxy.serve)
        proxied = f"{server.rpartition('@')[0]}@127.0.0.1:{proxy_port}/{database}"
        config = dns_config(proxied + "?connect_timeout=1", check_interval=0.2, retry_max=0.5)
        async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
            address = dns.addresses["dns"]
            async with watch_process(address, 4, 4) as watch:
                assert (await next_route(watch))["hosts"] == ["10.0.0.1:80"]
                proxy.disable()
                with trio.fail_after(10):
                    while "route store unavailable" not in dns.log:
                        await trio.sleep(0.05)
                # Still serving the last good map to newcomers.
                async with watch_process(address, 4, 4) as newcomer:
                    assert (await next_route(newcomer))["hosts"] == ["10.0.0.1:80"]
                # A change made while the DNS cannot see the database ...
                await lars_cli(
                    "route", "add", "4", "4", "10.0.0.2:80", "--store", db_url, "--no-notify"
                )
                await trio.sleep(1.0)
                proxy.enable()
                # ... reaches the watcher once it is back, without a restart.
                pushed = await next_route(watch, timeout=15)
                assert pushed["hosts"] == ["10.0.0.1:80", "10.0.0.2:80"]
                assert "route store is back" in dns.log
                assert dns.log.count("route store unavailable") == 1  # not once per retry
        nursery.cancel_scope.cancel()


async def test_malformed_frames_do_not_disturb_a_good_client(tmp_path: Path, db_url: str) -> None:
    async with lars_process(tmp_path, "dns", ["dns"], dns_config(db_url)) as dns:
        address = dns.addresses["dns"]
        host, port = address.split(":")
        async with watch_process(address, 5, 5) as watch:
            assert (await next_route(watch))["hosts"] == []
            for garbage in (
                b"\x00\x00\x00\x03\xc1\xc1\xc1",
                struct.pack("!I", 1 << 30) + b"x" * 100,
                b"GET / HTTP/1.1\r\n\r\n",
            ):
                async with await trio.open_tcp_stream(host, int(port)) as stream:
                    bad = FramedClient(stream)
                    await bad.send_raw(garbage)
                    with trio.fail_after(5):
                        assert await bad.closed_by_peer()
            await route(tmp_path, db_url, [address], "add", "5", "5", "10.0.0.5:80")
            assert (await next_route(watch))["hosts"] == ["10.0.0.5:80"]
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                stats = FramedClient(stream)
                await stats.send(wire.StatsRequest(1))
                with trio.fail_after(5):
                    reply = await stats.receive()
            assert isinstance(reply, wire.StatsResponse)
            assert reply.counters["malformed_frames"] == 3
        assert await dns.stop() == 0
