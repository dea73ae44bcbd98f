"""Mutual TLS between real ``lars`` processes: certificates from ``lars tls init``, roles
checked on every link, refusals logged, and a network listener without TLS refused at start."""

from __future__ import annotations

import json
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio

from lars import wire, wire_original
from lars.config import TlsConfig
from lars.core.model import Host
from lars.errors import LarsError
from lars.roles.common import ask, connect_tls, notify_dns
from lars.tls import contexts_for, generate
from tests.e2e.procs import lars_cli, lars_process
from tests.netutil import free_tcp_port, free_udp_base

pytestmark = pytest.mark.e2e

H1, H2 = Host("10.0.0.1", 7001), Host("10.0.0.2", 7002)
DEADLINE = 15.0


def tls(certs: Path, role: str) -> dict[str, Any]:
    return {
        "mode": "on",
        "ca": str(certs / "ca.pem"),
        "cert": str(certs / f"{role}.pem"),
        "key": str(certs / f"{role}.key"),
        "handshake_timeout": 2.0,
    }


def contexts(certs: Path, role: str) -> Any:
    return contexts_for(TlsConfig(**tls(certs, role)), role)


async def until(check: Any, what: str) -> None:
    with trio.move_on_after(DEADLINE):
        while not await check():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {DEADLINE}s: {what}")


async def test_roles_talk_over_mutual_tls_and_refuse_the_wrong_peers(tmp_path: Path) -> None:
    certs, strangers = tmp_path / "certs", tmp_path / "strangers"
    out = await lars_cli("tls", "init", str(certs), "--hosts", "127.0.0.1")
    assert "admin.pem" in out
    generate(strangers)  # another CA: its certificates mean nothing here
    store = f"sqlite:///{tmp_path}/lars.db"
    await lars_cli("db", "init", "--store", store)
    dns_port, reporter_port, base = free_tcp_port(), free_tcp_port(), free_udp_base(3)
    dns, reporter = f"127.0.0.1:{dns_port}", f"127.0.0.1:{reporter_port}"
    agent = {"base_port": base, "dns": [dns], "reporter": reporter, "report_interval": 0.2}
    admin = tmp_path / "admin.toml"
    admin.write_text(
        f'store = "{store}"\n[agent]\ndns = ["{dns}"]\nbase_port = {base}\n[tls]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tls(certs, "admin").items())
    )
    async with (
        lars_process(
            tmp_path,
            "dns",
            ["dns"],
            {"store": store, "dns": {"listen": dns}, "tls": tls(certs, "dns")},
        ) as dns_proc,
        lars_process(
            tmp_path,
            "reporter",
            ["reporter"],
            {"store": store, "reporter": {"listen": reporter}, "tls": tls(certs, "reporter")},
        ) as reporter_proc,
        lars_process(tmp_path, "agent", ["agent"], {"agent": agent, "tls": tls(certs, "agent")}),
    ):
        # An admin's write reaches the agent through the DNS's push; the agent's statistics
        # reach the store through the reporter.
        await lars_cli("route", "add", "1", "1", str(H1), str(H2), "--config", str(admin))
        await lars_cli("simulate", "1", "1", "--count", "200", "--config", str(admin))
        answer = json.loads(await lars_cli("query", "1", "1", "--json", "--config", str(admin)))
        assert sorted(h["host"] for h in answer["hosts"]) == sorted([str(H1), str(H2)])

        async def stored() -> bool:
            rows = json.loads(
                await lars_cli("query", "1", "1", "--stats", "--json", "--store", store)
            )
            return bool(sum(r["succ_total"] + r["err_total"] for r in rows) == 200)

        await until(stored, "the statistics stored through the TLS reporter")
        routes = await lars_cli("query", "1", "1", "--dns", dns, "--config", str(admin))
        assert str(H1) in routes
        counters = json.loads(
            await lars_cli("stats", "--dns", dns, "--json", "--config", str(admin))
        )
        assert counters["change_notices"] >= 1

        # A certificate from another CA is refused, and the refusal is logged.
        assert await stranger_answer(dns_port, certs, strangers) == b""
        await until(lambda: _contains(dns_proc, "not signed by our CA"), "the stranger refused")
        # Plaintext is refused (logged at a rate limit): a client without TLS gets nothing.
        plain = await lars_cli("query", "1", "1", "--dns", dns, check=False)
        assert "closed the connection" in plain or plain == ""
        with pytest.raises(LarsError):
            await ask(dns, wire.StatsRequest(1), wait=3.0)

        # An agent's certificate may read routes but not send a change notice.
        agent_tls = contexts(certs, "agent")
        answer = await ask(dns, wire.StatsRequest(5), tls=agent_tls)  # and it is told why
        assert isinstance(answer, wire.ErrorReply) and answer.seq == 5
        assert "lars://agent may not send StatsRequest" in answer.reason
        await notify_dns([dns], 10**9, tls=agent_tls)

        async def notice_refused() -> bool:
            counters = json.loads(
                await lars_cli("stats", "--dns", dns, "--json", "--config", str(admin))
            )
            return bool(counters["forbidden_requests"] == 2)  # the StatsRequest, the notice

        await until(notice_refused, "the notice refused")
        assert "(lars://agent) may not send StatsRequest; refused" in dns_proc.log
        # A DNS certificate may not talk to the reporter at all.
        with pytest.raises(LarsError, match=r"closed the connection|refused"):
            await ask(reporter, wire.StatsRequest(1), tls=contexts(certs, "dns"), expect="reporter")
        await until(
            lambda: _contains(reporter_proc, "peer is lars://dns"), "the reporter's refusal"
        )
        # Nobody but an agent writes statistics: a forged report in plaintext, or with an
        # admin's certificate, is refused and stores nothing.
        forged = wire.ReportStatusRequest(
            1, 1, 0x0A0000FE, (wire.HostResult(H1.key[0], H1.key[1], 0, 999_999, False),), 1, 1
        )
        with pytest.raises(LarsError):
            await ask(reporter, forged, wait=3.0, expect="reporter")
        answer = await ask(reporter, forged, tls=contexts(certs, "admin"), expect="reporter")
        assert isinstance(answer, wire.ErrorReply)
        assert "lars://admin may not send ReportStatusRequest" in answer.reason
        # Nor in the original's framing, which only plaintext original agents speak.
        original = await connect_tls(
            await trio.open_tcp_stream("127.0.0.1", reporter_port),
            contexts(certs, "admin"),
            "reporter",
        )
        async with original:
            await original.send_all(wire_original.encode(forged))
            with trio.fail_after(DEADLINE):
                assert await _read_quietly(original) == b""
        refusals = json.loads(
            await lars_cli("stats", "--reporter", reporter, "--json", "--config", str(admin))
        )
        assert refusals["forbidden_requests"] == 2  # the admin's two forged reports
        assert refusals.get("original_reports_received", 0) == 0
        rows = json.loads(await lars_cli("query", "1", "1", "--stats", "--json", "--store", store))
        assert all(r["caller"] != "10.0.0.254" for r in rows)
        assert sum(r["err_total"] for r in rows) < 999_999
        # The good clients were never affected.
        counters = json.loads(
            await lars_cli("stats", "--reporter", reporter, "--json", "--config", str(admin))
        )
        assert counters["tls_refused"] >= 1


async def stranger_answer(port: int, certs: Path, strangers: Path) -> bytes:
    """What a client that trusts our CA but shows another CA's admin certificate gets back
    for a StatsRequest (the handshake ends on its side; the refusal shows on reading)."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.check_hostname = False
    context.load_cert_chain(strangers / "admin.pem", strangers / "admin.key")
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
    try:
        await stream.do_handshake()
        await stream.send_all(wire.encode_frame(wire.StatsRequest(1)))
        return bytes(await stream.receive_some(65536))
    except (trio.BrokenResourceError, ssl.SSLError):
        return b""
    finally:
        await trio.aclose_forcefully(stream)


async def _read_quietly(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(65536))
    except trio.BrokenResourceError:
        return b""


async def _contains(proc: Any, text: str) -> bool:
    return text in proc.log


@pytest.mark.parametrize("mode", ["", "off"])
async def test_a_listener_beyond_loopback_needs_tls_or_an_explicit_off(
    tmp_path: Path, mode: str
) -> None:
    store = f"sqlite:///{tmp_path}/lars.db"
    await lars_cli("db", "init", "--store", store)
    config = {"store": store, "dns": {"listen": "0.0.0.0:0"}, "tls": {"mode": mode}}
    if mode == "":
        from tests.e2e.procs import LarsProcess

        proc = LarsProcess(tmp_path, "dns", ["dns"], config)
        with pytest.raises(RuntimeError, match="exited early"):
            await proc.start()
        assert 'set [tls] mode = "on"' in proc.log
        assert "Traceback" not in proc.log
        return
    async with lars_process(tmp_path, "dns", ["dns"], config) as proc:
        assert "without TLS" in proc.log


async def test_sighup_rotates_the_certificate_without_a_restart(tmp_path: Path) -> None:
    from tests.test_tls import reissue

    certs = tmp_path / "certs"
    generate(certs)
    store = f"sqlite:///{tmp_path}/lars.db"
    await lars_cli("db", "init", "--store", store)
    port = free_tcp_port()
    config = {"store": store, "dns": {"listen": f"127.0.0.1:{port}"}, "tls": tls(certs, "dns")}
    admin = contexts(certs, "admin")

    async def served_serial() -> int:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = await connect_tls(tcp, admin, "dns")
        try:
            assert isinstance(stream, trio.SSLStream)
            return int(stream.getpeercert()["serialNumber"], 16)
        finally:
            await trio.aclose_forcefully(stream)

    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        before = await served_serial()
        # A connection made before the rotation keeps working after it.
        kept = await connect_tls(await trio.open_tcp_stream("127.0.0.1", port), admin, "dns")
        new = reissue(certs, "dns", tmp_path / "scratch")
        assert new.serial_number != before
        assert dns.process is not None
        dns.process.send_signal(signal.SIGHUP)

        async def rotated() -> bool:
            return await served_serial() == new.serial_number

        await until(rotated, "the new certificate served after SIGHUP")
        await kept.send_all(wire.encode_frame(wire.StatsRequest(7)))
        decoder = wire.FrameDecoder()
        with trio.fail_after(DEADLINE):
            while not (replies := list(_feed(decoder, await kept.receive_some(65536)))):
                pass
        assert isinstance(replies[0], wire.StatsResponse) and replies[0].seq == 7
        await kept.aclose()
        assert dns.process.poll() is None  # never restarted
        assert "Traceback" not in dns.log


def _feed(decoder: wire.FrameDecoder, data: bytes | bytearray) -> list[wire.Message]:
    assert data, "the connection made before the rotation was closed"
    decoder.feed(data)
    return list(decoder)


async def test_an_agent_whose_certificate_the_dns_refuses_says_so(tmp_path: Path) -> None:
    """An agent with a certificate from a new CA that the DNS does not trust yet: its own
    handshake succeeds (it trusts both CAs), then the DNS closes the session; the agent logs
    that its certificate was probably refused, and the DNS logs why."""
    certs, newer = tmp_path / "certs", tmp_path / "newer"
    generate(certs)
    generate(newer)
    both = tmp_path / "both-cas.pem"
    both.write_bytes((certs / "ca.pem").read_bytes() + (newer / "ca.pem").read_bytes())
    store = f"sqlite:///{tmp_path}/lars.db"
    await lars_cli("db", "init", "--store", store)
    dns = f"127.0.0.1:{free_tcp_port()}"
    agent_tls = {**tls(newer, "agent"), "ca": str(both)}
    agent = {
        "base_port": free_udp_base(3),
        "dns": [dns],
        "reporter": f"127.0.0.1:{free_tcp_port()}",
    }
    async with (
        lars_process(
            tmp_path,
            "dns",
            ["dns"],
            {"store": store, "dns": {"listen": dns}, "tls": tls(certs, "dns")},
        ) as dns_proc,
        lars_process(
            tmp_path, "agent", ["agent"], {"agent": agent, "tls": agent_tls}
        ) as agent_proc,
    ):
        await until(
            lambda: _contains(agent_proc, "likely our certificate was refused"),
            "the agent's explanation",
        )
        await until(lambda: _contains(dns_proc, "not signed by our CA"), "the DNS's refusal")


async def test_sighup_without_tls_is_logged_not_fatal(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/lars.db"
    await lars_cli("db", "init", "--store", store)
    config = {"store": store, "dns": {"listen": f"127.0.0.1:{free_tcp_port()}"}}
    async with lars_process(tmp_path, "dns", ["dns"], config) as dns:
        assert dns.process is not None
        dns.process.send_signal(signal.SIGHUP)
        await until(lambda: _contains(dns, "SIGHUP: nothing to re-read"), "the SIGHUP logged")
        assert dns.process.poll() is None
