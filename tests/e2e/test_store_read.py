"""``[dns] store_read``: a DNS that reads its routes from a replica (issue 18)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.e2e.procs import LARS, lars_cli, lars_process, watch_process
from tests.e2e.test_dns_e2e import dns_config, next_route

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]


async def test_a_dns_serves_the_routes_of_its_read_store(tmp_path: Path, db_url: str) -> None:
    # The "primary" (MariaDB) has one route, the "replica" (SQLite) another: the DNS must
    # serve the replica's, and follow changes made there.
    replica = f"sqlite:///{tmp_path}/replica.db"
    await lars_cli("db", "init", "--store", replica)
    await lars_cli("route", "add", "1", "1", "10.0.0.1:7001", "--store", db_url, "--no-notify")
    await lars_cli("route", "add", "1", "1", "10.0.0.9:7009", "--store", replica, "--no-notify")
    config = dns_config(db_url, store_read=replica, check_interval=0.1)
    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        address = dns.addresses["dns"]
        async with watch_process(address, 1, 1) as watch:
            assert (await next_route(watch))["hosts"] == ["10.0.0.9:7009"]
            await lars_cli(
                "route", "add", "1", "1", "10.0.0.8:7008", "--store", replica, "--no-notify"
            )
            pushed = await next_route(watch)  # found by polling the replica
            assert pushed["hosts"] == ["10.0.0.8:7008", "10.0.0.9:7009"]


async def test_a_malformed_read_store_url_is_named_at_start(tmp_path: Path, db_url: str) -> None:
    config = tmp_path / "dns.toml"
    config.write_text(
        f'store = "{db_url}"\n[dns]\nlisten = "127.0.0.1:0"\nhttp_listen = ""\n'
        'store_read = "mysql://root@127.0.0.1:x/lars"\n'
    )
    with trio.fail_after(20):
        out = await trio.run_process(
            [*LARS, "run", "--role", "dns", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert out.returncode != 0
    assert "[dns] store_read" in out.stderr.decode() and "bad port 'x'" in out.stderr.decode()
