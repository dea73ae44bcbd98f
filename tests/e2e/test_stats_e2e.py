"""The statistics path with real processes on MariaDB: agent -> reporter -> ServerCallStatus."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from lars import wire
from lars.client import LarsClient
from lars.core.model import Host
from lars.store import open_store
from tests.e2e.procs import LarsProcess, Proxy, lars_cli, lars_process, memory_mb
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

H1, H2, H3 = (Host(f"10.0.0.{i}", 7000 + i) for i in (1, 2, 3))


@pytest.fixture
async def db_url(db_url: str) -> str:
    """The conftest database, with module 1/1 routed to H1, H2, H3. (Not autouse:
    pytest-trio only sets up async fixtures that a test requests.)"""
    async with open_store(db_url) as store:
        await store.add_hosts((1, 1), [h.key for h in (H1, H2, H3)])
    return db_url


def configs(db_url: str, dns: int, reporter: int, base: int) -> dict[str, dict[str, Any]]:
    agent = {
        "base_port": base,
        "dns": [f"127.0.0.1:{dns}"],
        "reporter": f"127.0.0.1:{reporter}",
        "report_interval": 0.2,
        "retry_max": 0.3,
    }
    return {
        "dns": {"store": db_url, "dns": {"listen": f"127.0.0.1:{dns}"}},
        "reporter": {"store": db_url, "reporter": {"listen": f"127.0.0.1:{reporter}"}},
        "agent": {"agent": agent},
    }


async def stats(db_url: str) -> dict[str, dict[str, Any]]:
    out = await lars_cli("query", "1", "1", "--stats", "--json", "--store", db_url)
    return {row["host"]: row for row in json.loads(out)}


async def totals_become(db_url: str, expected: dict[Host, tuple[int, int]]) -> dict[str, Any]:
    """Wait until the stored totals equal ``expected``; return the rows."""
    want = {str(h): counts for h, counts in expected.items()}
    rows: dict[str, Any] = {}
    with trio.move_on_after(15):
        while True:
            rows = await stats(db_url)
            got = {h: (r["succ_total"], r["err_total"]) for h, r in rows.items()}
            if got == want:
                return rows
            await trio.sleep(0.2)
    raise AssertionError(f"stored totals {rows} never became {want}")


def script(client: LarsClient, sequence: list[tuple[Host, bool]]) -> None:
    for host, ok in sequence:
        client.report(1, 1, host, ok=ok)


async def test_scripted_reports_arrive_with_exact_counts(tmp_path: Path, db_url: str) -> None:
    dns, reporter, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    c = configs(db_url, dns, reporter, base)
    async with (
        lars_process(tmp_path, "dns", ["dns"], c["dns"]),
        lars_process(tmp_path, "reporter", ["reporter"], c["reporter"]),
        lars_process(tmp_path, "agent", ["agent"], c["agent"]),
    ):
        with LarsClient(base_port=base, timeout=0.5) as client:
            client.get_host(1, 1)  # the agent learns the route
            script(client, [(H1, True)] * 7 + [(H1, False)] * 2 + [(H2, False)] * 3)
            script(client, [(H3, True)] * 5)
            rows = await totals_become(db_url, {H1: (7, 2), H2: (0, 3), H3: (5, 0)})
            assert {row["caller"] for row in rows.values()} == {"127.0.0.1"}
            assert not any(row["overload"] for row in rows.values())
            # The next interval carries only what happened since: totals add up.
            script(client, [(H2, False)] * 15)  # 15 failures in a row: H2 is overloaded
            rows = await totals_become(db_url, {H1: (7, 2), H2: (0, 18), H3: (5, 0)})
            assert rows[str(H2)]["overload"] is True
            assert rows[str(H2)]["err_cnt"] == 15  # the latest report's own count


async def test_reporter_outage_loses_no_counts(tmp_path: Path, db_url: str) -> None:
    dns, reporter_port, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    c = configs(db_url, dns, reporter_port, base)
    async with (
        lars_process(tmp_path, "dns", ["dns"], c["dns"]),
        lars_process(tmp_path, "agent", ["agent"], c["agent"]) as agent,
    ):
        reporter = LarsProcess(tmp_path, "reporter", ["reporter"], c["reporter"])
        await reporter.start()
        with LarsClient(base_port=base, timeout=0.5) as client:
            client.get_host(1, 1)
            script(client, [(H1, True)] * 10)
            await totals_become(db_url, {H1: (10, 0)})
            await reporter.stop(signal.SIGKILL)  # a crash, not a clean stop
            script(client, [(H1, True)] * 20 + [(H2, False)] * 4 + [(H3, True)] * 6)
            await trio.sleep(1.5)  # several report intervals with no reporter
            again = LarsProcess(tmp_path, "reporter2", ["reporter"], c["reporter"])
            await again.start()
            try:
                await totals_become(db_url, {H1: (30, 0), H2: (0, 4), H3: (6, 0)})
                await trio.sleep(1.0)  # and nothing is counted twice afterwards
                await totals_become(db_url, {H1: (30, 0), H2: (0, 4), H3: (6, 0)})
            finally:
                await again.stop()
        assert "lost the reporter" in agent.log


async def test_a_flood_while_the_store_is_down_keeps_memory_bounded(
    tmp_path: Path, db_url: str
) -> None:
    server, _, database = db_url.rpartition("/")
    host, port = server.rpartition("@")[2].split(":")
    proxy = Proxy((host, int(port)))
    async with trio.open_nursery() as nursery:
        proxy_port = await nursery.start(proxy.serve)
        proxied = f"{server.rpartition('@')[0]}@127.0.0.1:{proxy_port}/{database}"
        config = {
            "store": proxied + "?connect_timeout=1",
            "reporter": {"listen": "127.0.0.1:0", "queue_size": 64, "retry_max": 0.5},
        }
        async with lars_process(tmp_path, "reporter", ["reporter"], config) as reporter:
            assert reporter.process is not None
            proxy.disable()  # the store is unreachable: nothing drains the queue
            address = reporter.addresses["reporter"]
            sent = [0]
            acked = [0]
            start_rss = memory_mb(reporter.process.pid)[0]
            async with trio.open_nursery() as flooders:
                for conn in range(4):
                    flooders.start_soon(flood, address, conn, sent, acked)
                await trio.sleep(4)
                peak = memory_mb(reporter.process.pid)[0]
                assert acked[0] == 0
                # Far more was offered than the bounded queue can hold; TCP pushed back.
                queued_bound = 64 + 4 * 2
                assert sent[0] > queued_bound
                assert peak - start_rss < 40, (start_rss, peak)
                proxy.enable()  # the store returns: the backlog is written and acknowledged
                with trio.fail_after(30):
                    while acked[0] < 64:
                        await trio.sleep(0.1)
                flooders.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def flood(address: str, conn: int, sent: list[int], acked: list[int]) -> None:
    """Send 200-result reports as fast as the reporter lets us; count acknowledgements."""
    results = tuple(
        wire.HostResult(0x0A000000 + conn * 1000 + i, 80, 1, 0, False) for i in range(200)
    )
    frames = [
        wire.encode_frame(wire.ReportStatusRequest(1, conn, 0x7F000001, results, 1, seq))
        for seq in range(50)
    ]
    host, port = address.split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:

        async def receive() -> None:
            decoder = wire.FrameDecoder()
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                acked[0] += sum(isinstance(m, wire.ReportStatusAck) for m in decoder)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            seq = 0
            while True:
                await stream.send_all(frames[seq % len(frames)])
                sent[0] += 1
                seq += 1
