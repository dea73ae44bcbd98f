"""Alarms end to end with real processes on MariaDB: ``lars simulate`` drives a failing host,
the reporter writes the history, two web instances share the alarm lease, and a local
webhook receiver counts the POSTs: exactly one per transition."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from lars.core.model import Host
from lars.store import open_store
from tests.e2e.procs import lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

H1, H2, H3 = (Host(f"10.0.0.{i}", 7000 + i) for i in (1, 2, 3))
#: Seconds between two evaluations of the alarms in this test.
INTERVAL = 1.0


class Receiver:
    """A webhook receiver on a free port: keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, dict[str, Any]]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((time.monotonic(), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def of(self, alarm: str, state: str) -> list[dict[str, Any]]:
        return [p for _, p in self.posts if p["alarm"] == alarm and p["state"] == state]


@contextmanager
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


async def posts_arrive(r: Receiver, alarm: str, state: str, timeout: float) -> float:
    """Wait for a POST of ``alarm`` in ``state``; returns when it arrived (monotonic)."""
    with trio.move_on_after(timeout):
        while not r.of(alarm, state):
            await trio.sleep(0.05)
        return next(t for t, p in r.posts if p["alarm"] == alarm and p["state"] == state)
    raise AssertionError(f"no {state} POST for {alarm} in {timeout}s; got {r.posts}")


RULES = [
    {
        "name": "host-errors",
        "kind": "error_rate",
        "module": "1/1",
        "per": "host",
        "threshold": 0.5,
        "window": 2,
        "min_calls": 5,
    },
    {"name": "host-overloaded", "kind": "host_overloaded", "callers": 1, "window": 1},
]


async def test_a_failing_host_fires_once_and_resolves_once_with_two_web_instances(
    tmp_path: Path, db_url: str
) -> None:
    async with open_store(db_url) as store:
        await store.add_hosts((1, 1), [h.key for h in (H1, H2, H3)])
    dns, reporter, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    agent = {
        "base_port": base,
        "dns": [f"127.0.0.1:{dns}"],
        "reporter": f"127.0.0.1:{reporter}",
        "report_interval": 0.2,
    }
    with receiver() as hook:
        web = {
            "store": db_url,
            "agent": {"dns": [f"127.0.0.1:{dns}"]},
            "alarms": {
                "interval": INTERVAL,
                "resend_interval": 0.0,
                "webhooks": [hook.url],
                "webhook_timeout": 2.0,
                "rules": RULES,
            },
        }
        async with (
            lars_process(
                tmp_path, "dns", ["dns"], {"store": db_url, "dns": {"listen": f"127.0.0.1:{dns}"}}
            ),
            lars_process(
                tmp_path,
                "reporter",
                ["reporter"],
                {"store": db_url, "reporter": {"listen": f"127.0.0.1:{reporter}"}},
            ),
            lars_process(tmp_path, "agent", ["agent"], {"agent": agent}),
            lars_process(tmp_path, "web1", ["web"], web) as web1,
            lars_process(tmp_path, "web2", ["web"], web) as web2,
        ):
            config = tmp_path / "client.toml"
            config.write_text(f"[agent]\nbase_port = {base}\n")
            await lars_cli(
                "simulate", "1", "1", "--fail", str(H1), "--err-rate", "1",
                "--count", "600", "--seed", "1", "--config", str(config),
            )  # fmt: skip
            failed = time.monotonic()
            # The agent reports within 0.2 s and the reporter writes at once: the alarms fire
            # within one evaluation interval of that (and a little for the POST).
            for alarm in ("host-errors", "host-overloaded"):
                arrived = await posts_arrive(hook, alarm, "firing", 10)
                assert arrived - failed < INTERVAL + 2.0, (alarm, arrived - failed)
            (fired,) = hook.of("host-errors", "firing")
            assert fired["module"] == "1/1" and fired["host"] == str(H1)
            assert fired["threshold"] == 0.5 and fired["value"] > 0.5
            (overloaded,) = hook.of("host-overloaded", "firing")
            assert overloaded["host"] == str(H1) and overloaded["value"] >= 1
            assert overloaded["threshold"] == 1

            out = json.loads(await lars_cli("alarms", "--firing", "--json", "--store", db_url))
            assert {(a["alarm"], a["host"]) for a in out} == {
                ("host-errors", str(H1)),
                ("host-overloaded", str(H1)),
            }

            # The host recovers: plenty of successful calls bring its error rate down and the
            # agent takes it back into rotation.
            await lars_cli(
                "simulate", "1", "1", "--fail", str(H1), "--err-rate", "0",
                "--count", "3000", "--seed", "2", "--config", str(config),
            )  # fmt: skip
            for alarm in ("host-errors", "host-overloaded"):
                await posts_arrive(hook, alarm, "resolved", 15)
            # A few more rounds by both instances: nothing is sent again.
            await trio.sleep(3 * INTERVAL)
            for alarm in ("host-errors", "host-overloaded"):
                assert len(hook.of(alarm, "firing")) == 1, hook.posts
                assert len(hook.of(alarm, "resolved")) == 1, hook.posts
            (resolved,) = hook.of("host-errors", "resolved")
            assert resolved["host"] == str(H1) and resolved["value"] <= 0.5

            history = json.loads(await lars_cli("alarms", "--history", "--json", "--store", db_url))
            assert sorted((e["alarm"], e["state"]) for e in history) == [
                ("host-errors", "firing"),
                ("host-errors", "resolved"),
                ("host-overloaded", "firing"),
                ("host-overloaded", "resolved"),
            ]
            # One instance evaluated and sent; the other never did.
            senders = [w for w in (web1, web2) if "alarm host-errors FIRING" in w.log]
            assert len(senders) == 1, [w.log for w in (web1, web2)]
