"""The HTTP listener: /metrics, /healthz and /readyz of the roles, in process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
from prometheus_client.parser import text_string_to_metric_families

from lars import wire
from lars.config import DnsConfig, ReporterConfig
from lars.roles.dns import DnsServer
from lars.roles.http import Observed, serve_http
from lars.roles.reporter import Reporter
from lars.store import open_store
from tests.fakes import FlakyStore, FramedClient, memory_store
from tests.netutil import free_udp_base
from tests.roles.test_agent import A, B, M
from tests.roles.test_agent_hardening import agent, serving


async def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    """``(status, body)`` of a plain HTTP/1.0 GET."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@asynccontextmanager
async def listening(*roles: Observed) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_http, "127.0.0.1:0", roles)
        yield address
        nursery.cancel_scope.cancel()


async def test_metrics_count_the_agent_api_exactly() -> None:
    a = agent(base_port=free_udp_base(3))
    async with serving(a), listening(a.observed()) as address:
        now = time.monotonic()
        a.table.apply_route(M, [A, B], now)
        status, before = await http_get(address, "/metrics")
        assert status == 200
        for _ in range(100):
            a.handle_datagram(_get_host(), ("127.0.0.1", 40000))
        for _ in range(20):
            a.table.report(M, A, False, now)
        _, after = await http_get(address, "/metrics")
    got, was = samples(after), samples(before)
    key = ("lars_agent_requests_total", (("kind", "get_host"), ("result", "succ")))
    assert got[key] - was.get(key, 0) == 100
    assert got["lars_agent_requests_total", (("kind", "report"), ("result", "failure"))] == 20
    transition = (
        "lars_agent_host_transitions_total",
        (("reason", "contin_err"), ("to", "overload")),
    )
    assert got[transition] == 1  # the 15th failure in a row
    assert got["lars_agent_hosts", (("state", "overload"),)] == 1
    assert got["lars_agent_hosts", (("state", "idle"),)] == 1
    labels = (("cmdid", "1"), ("modid", "1"))
    assert got["lars_agent_module_hosts", (*labels, ("state", "overload"))] == 1
    assert got["lars_agent_module_reports_total", (*labels, ("result", "failure"))] == 20
    assert got["lars_build_info", (("version", _version()),)] == 1


def _get_host() -> bytes:
    from lars import wire

    return wire.encode_get_host_request(1, *M)


def _version() -> str:
    from lars._version import __version__

    return __version__


async def test_healthz_and_agent_readiness_without_dns() -> None:
    a = agent(base_port=free_udp_base(3))
    async with serving(a), listening(a.observed()) as address:
        assert await http_get(address, "/healthz") == (200, "ok\n")
        assert await http_get(address, "/readyz") == (503, "agent: no DNS session\n")


async def test_dns_is_ready_once_routes_are_loaded(tmp_path: Path) -> None:
    inner = memory_store()
    await inner.init_schema()
    store = FlakyStore(inner)
    store.down = True
    dns = DnsServer(DnsConfig(listen="127.0.0.1:0", check_interval=0.05), store)
    async with trio.open_nursery() as nursery:
        await nursery.start(dns.serve)
        async with listening(dns.observed()) as address:
            assert await http_get(address, "/readyz") == (503, "dns: routes not loaded yet\n")
            _, text = await http_get(address, "/metrics")
            assert samples(text)["lars_dns_store_up", ()] == 0
            store.down = False
            with trio.fail_after(5):
                while dns.routes is None:
                    await trio.sleep(0.01)
            assert await http_get(address, "/readyz") == (200, "ready\n")
            _, text = await http_get(address, "/metrics")
        nursery.cancel_scope.cancel()
    got = samples(text)
    assert got["lars_dns_routes_loaded", ()] == 1
    assert got["lars_dns_store_loads_total", (("kind", "full"),)] >= 1
    assert got["lars_dns_store_errors_total", ()] >= 1
    assert got["lars_dns_store_load_seconds_count", (("kind", "full"),)] >= 1


async def test_reporter_metrics_follow_what_it_writes(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/lars.db", create=True)
    await store.init_schema()
    reporter = Reporter(ReporterConfig(listen="127.0.0.1:0"), store)
    report = wire.ReportStatusRequest(
        *M, 0x7F000001, (wire.HostResult(*A, 5, 1, False), wire.HostResult(*B, 2, 0, True)), 1, 7
    )
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(reporter.serve)
        async with listening(reporter.observed()) as address:
            assert await http_get(address, "/readyz") == (200, "ready\n")
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                client = FramedClient(stream)
                for seq in range(1, 11):
                    await client.send(attrs.evolve(report, seq=seq))
                for _ in range(10):
                    assert isinstance(await client.receive(), wire.ReportStatusAck)
            _, text = await http_get(address, "/metrics")
        nursery.cancel_scope.cancel()
    await store.aclose()
    got = samples(text)
    assert got["lars_reporter_reports_received_total", ()] == 10
    assert got["lars_reporter_results_received_total", ()] == 20
    assert got["lars_reporter_results_written_total", ()] == 20
    assert (
        got["lars_reporter_write_seconds_count", ()]
        == got["lars_reporter_batches_written_total", ()]
    )
    assert got["lars_reporter_batch_results_sum", ()] == 20
    assert got["lars_reporter_queue_capacity", ()] == 1024
    assert got["lars_reporter_store_up", ()] == 1


async def test_one_listener_serves_several_roles_and_names_the_unready() -> None:
    a = agent(base_port=free_udp_base(3))
    inner = memory_store()
    await inner.init_schema()
    dns = DnsServer(DnsConfig(listen="127.0.0.1:0"), inner)
    async with serving(a), listening(dns.observed(), a.observed()) as address:
        status, body = await http_get(address, "/readyz")
        _, text = await http_get(address, "/metrics")
    assert status == 503
    assert body == "dns: routes not loaded yet\nagent: no DNS session\n"
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"lars_build_info", "lars_dns_routes_loaded", "lars_agent_requests"} <= names
    assert not [n for n in names if n.endswith("_created")]
