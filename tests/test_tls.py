"""lars.tls and ``lars tls``: real certificates, real handshakes over loopback TCP."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import ssl
import stat
import tomllib
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lars.errors import ConfigError, InvalidValue
from lars.tls import (
    REFUSAL_HINT,
    ROLES,
    TlsContexts,
    TlsRefused,
    TlsSettings,
    accept,
    connect,
    generate,
    peer_role,
    refusal_hint,
    reload_on_sighup,
    role_uri,
)
from lars.tls_cli import tls

#: Seconds any single step of a test may take on real sockets before the test fails.
DEADLINE = 10


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A CA and a certificate per role, as ``lars tls init`` makes them."""
    directory = tmp_path / "certs"
    generate(directory)
    return directory


@pytest.fixture
def other_certs(tmp_path: Path) -> Path:
    """The same, under a different CA."""
    directory = tmp_path / "other"
    generate(directory)
    return directory


def settings(directory: Path, name: str, *, timeout: float = 5.0) -> TlsSettings:
    return TlsSettings(
        ca=str(directory / "ca.pem"),
        cert=str(directory / f"{name}.pem"),
        key=str(directory / f"{name}.key"),
        handshake_timeout=timeout,
    )


def contexts(directory: Path, name: str, *, timeout: float = 5.0) -> TlsContexts:
    return TlsContexts(settings(directory, name, timeout=timeout))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def issue(
    directory: Path, name: str, uris: Sequence[str], *, valid_from: int = -1, valid_to: int = 30
) -> None:
    """Write ``name.pem`` / ``name.key`` into ``directory``, signed by its CA, with the SAN
    URIs and validity (in days from now) given: the bad certificates ``generate`` never makes."""
    ca_cert = load_cert(directory / "ca.pem")
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_from))
        .not_valid_after(now + datetime.timedelta(days=valid_to))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def reissue(certs: Path, role: str, scratch: Path, *, days: int = 825) -> x509.Certificate:
    """Replace ``role``'s certificate and key in ``certs`` by new ones from the same CA."""
    scratch.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy(certs / name, scratch / name)
    generate(scratch, days=days)
    for suffix in (".key", ".pem"):
        os.replace(scratch / f"{role}{suffix}", certs / f"{role}{suffix}")
    return load_cert(certs / f"{role}.pem")


def raw_client_context(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context that trusts ``ca`` and presents ``cert`` (any certificate at all,
    which TlsContexts would refuse to load), checking no hostname."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@attrs.define
class Server:
    port: int
    #: ("accepted", role) or ("refused", reason), one per connection, as they finish.
    results: trio.MemoryReceiveChannel[tuple[str, str]]


@asynccontextmanager
async def tls_server(tls_contexts: TlsContexts, allowed: Collection[str]) -> AsyncIterator[Server]:
    """A loopback server that accepts with ``tls_contexts``/``allowed`` and echoes."""
    send, receive = trio.open_memory_channel[tuple[str, str]](16)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            ssl_stream, role = await accept(stream, tls_contexts, allowed)
        except TlsRefused as exc:
            await send.send(("refused", exc.reason))
            return
        await send.send(("accepted", role))
        async with ssl_stream:
            try:
                async for data in ssl_stream:
                    await ssl_stream.send_all(data)
            except trio.BrokenResourceError:
                pass  # the client went away without a close_notify

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield Server(port, receive)
        nursery.cancel_scope.cancel()


async def open_tls(
    port: int, tls_contexts: TlsContexts, expect: str
) -> trio.SSLStream[trio.abc.Stream]:
    return await connect(await trio.open_tcp_stream("127.0.0.1", port), tls_contexts, expect)


async def open_raw(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """A client handshake with no Lars checks at all."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def echo(stream: trio.abc.Stream, data: bytes = b"ping") -> bytes:
    await stream.send_all(data)
    return bytes(await stream.receive_some())


async def first_read_hint(stream: trio.abc.Stream) -> str:
    """What a client learns on its first read after a handshake the server then refused
    (the stream is closed afterwards)."""
    async with stream:
        try:
            data = await stream.receive_some()
        except trio.BrokenResourceError as exc:
            return refusal_hint(exc)
        assert data == b""
        return refusal_hint(None)


def serial_of(stream: trio.SSLStream[trio.abc.Stream]) -> int:
    return int(stream.getpeercert()["serialNumber"], 16)


# --- generate ------------------------------------------------------------------------------


def test_generate_writes_a_ca_and_a_certificate_per_role(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "certs"
    written = generate(directory, hosts=["dns1.example", "10.0.0.5", "::1"], days=30)

    names = ["ca.pem", "ca.key"] + [f"{role}.{ext}" for role in ROLES for ext in ("pem", "key")]
    assert [path.name for path in written] == names
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in written:
        expected = 0o600 if path.suffix == ".key" else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    ca = load_cert(directory / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ROLES:
        cert = load_cert(directory / f"{role}.pem")
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"lars://{role}"]
        assert san.get_values_for_type(x509.DNSName) == ["dns1.example"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert datetime.timedelta(days=29) < lifetime < datetime.timedelta(days=31)
        assert contexts(directory, role).role == role


def test_generate_refuses_to_overwrite_unless_forced(certs: Path) -> None:
    before = {path.name: path.read_bytes() for path in certs.iterdir()}
    with pytest.raises(ConfigError, match=r"already holds ca\.pem, ca\.key, agent\.pem"):
        generate(certs)
    assert {path.name: path.read_bytes() for path in certs.iterdir()} == before

    written = generate(certs, force=True)
    assert len(written) == 2 + 2 * len(ROLES)
    assert (certs / "ca.pem").read_bytes() != before["ca.pem"]
    assert (certs / "dns.key").read_bytes() != before["dns.key"]


def test_generate_reuses_the_ca_to_issue_missing_roles(certs: Path) -> None:
    ca_before = (certs / "ca.pem").read_bytes()
    agent_before = (certs / "agent.pem").read_bytes()
    (certs / "admin.pem").unlink()
    (certs / "admin.key").unlink()

    written = generate(certs, hosts=["console.example"])

    assert written == [certs / "admin.pem", certs / "admin.key"]
    assert (certs / "ca.pem").read_bytes() == ca_before
    assert (certs / "agent.pem").read_bytes() == agent_before
    load_cert(certs / "admin.pem").verify_directly_issued_by(load_cert(certs / "ca.pem"))
    assert contexts(certs, "admin").role == "admin"


def test_generate_never_overwrites_half_a_pair(certs: Path) -> None:
    (certs / "dns.key").unlink()
    with pytest.raises(ConfigError, match=r"already holds dns\.pem;"):
        generate(certs)
    (certs / "ca.key").unlink()
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        generate(certs)


def test_generate_rejects_a_bad_host_or_lifetime(tmp_path: Path) -> None:
    with pytest.raises(InvalidValue, match="not a DNS name or IP address"):
        generate(tmp_path / "a", hosts=["bad host"])
    with pytest.raises(InvalidValue, match="days"):
        generate(tmp_path / "b", days=0)
    assert not (tmp_path / "a").exists()


# --- TlsContexts ---------------------------------------------------------------------------


def test_contexts_load_a_valid_certificate(certs: Path) -> None:
    loaded = contexts(certs, "dns")
    assert loaded.role == "dns"
    assert loaded.not_after == load_cert(certs / "dns.pem").not_valid_after_utc
    for context in (loaded.server, loaded.client):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert not context.check_hostname


def test_contexts_name_a_missing_file(certs: Path) -> None:
    (certs / "dns.key").unlink()
    with pytest.raises(ConfigError, match=r"dns\.key: private key file not found"):
        contexts(certs, "dns")


def test_contexts_refuse_a_key_that_does_not_match(certs: Path) -> None:
    shutil.copy(certs / "agent.key", certs / "dns.key")
    with pytest.raises(ConfigError, match=r"dns\.key: the key does not match the certificate"):
        contexts(certs, "dns")


def test_contexts_refuse_a_certificate_from_another_ca(certs: Path, other_certs: Path) -> None:
    for suffix in (".pem", ".key"):
        shutil.copy(other_certs / f"dns{suffix}", certs / f"dns{suffix}")
    with pytest.raises(ConfigError, match=r"dns\.pem: the certificate is not signed by the CA"):
        contexts(certs, "dns")


def test_contexts_refuse_a_ca_that_does_not_load(certs: Path) -> None:
    (certs / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"ca\.pem: not a PEM CA certificate"):
        contexts(certs, "dns")


@pytest.mark.parametrize(
    ("uris", "valid_from", "valid_to", "message"),
    [
        (["lars://dns"], -30, -1, "the certificate expired on"),
        (["lars://dns"], 1, 30, "the certificate is not valid before"),
        ([], -1, 30, "has no lars:// SAN URI"),
        (["spiffe://example/dns"], -1, 30, "has no lars:// SAN URI"),
        (["lars://dns", "lars://admin"], -1, 30, "names several roles"),
        (["lars://root"], -1, 30, "names an unknown role lars://root"),
    ],
)
def test_contexts_refuse_a_bad_certificate(
    certs: Path, uris: list[str], valid_from: int, valid_to: int, message: str
) -> None:
    issue(certs, "bad", uris, valid_from=valid_from, valid_to=valid_to)
    with pytest.raises(ConfigError, match=rf"bad\.pem: .*{message}"):
        contexts(certs, "bad")


def test_contexts_refuse_an_encrypted_key(certs: Path) -> None:
    key = serialization.load_pem_private_key((certs / "dns.key").read_bytes(), None)
    (certs / "dns.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"dns\.key: the private key is encrypted"):
        contexts(certs, "dns")


# --- accept and connect --------------------------------------------------------------------


async def test_an_agent_is_accepted_by_the_dns(certs: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("agent",)) as server:
            stream = await open_tls(server.port, contexts(certs, "agent"), "dns")
            assert await server.results.receive() == ("accepted", "agent")
            assert peer_role(stream) == "dns"
            assert stream.version() == "TLSv1.3"
            assert await echo(stream) == b"ping"
            await stream.aclose()


async def test_a_certificate_from_another_ca_is_refused(certs: Path, other_certs: Path) -> None:
    client = raw_client_context(
        certs / "ca.pem", other_certs / "agent.pem", other_certs / "agent.key"
    )
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("agent",)) as server:
            stream = await open_raw(server.port, client)  # TLS 1.3: the client's side succeeds
            outcome, reason = await server.results.receive()
            assert outcome == "refused"
            assert reason.startswith("certificate not signed by our CA: ")
            assert await first_read_hint(stream) == REFUSAL_HINT


async def test_an_expired_client_certificate_is_refused(certs: Path) -> None:
    issue(certs, "expired", ["lars://agent"], valid_from=-30, valid_to=-1)
    client = raw_client_context(certs / "ca.pem", certs / "expired.pem", certs / "expired.key")
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("agent",)) as server:
            stream = await open_raw(server.port, client)
            assert await server.results.receive() == (
                "refused",
                "certificate refused: certificate has expired",
            )
            assert "likely our certificate was refused" in await first_read_hint(stream)


async def test_a_role_that_is_not_allowed_is_refused(certs: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("admin",)) as server:
            stream = await open_tls(server.port, contexts(certs, "agent"), "dns")
            assert await server.results.receive() == (
                "refused",
                "peer is lars://agent, only lars://admin may connect here",
            )
            # The server checked the role after the handshake and closed the session cleanly.
            assert await first_read_hint(stream) == REFUSAL_HINT


async def test_a_client_without_a_certificate_is_refused(certs: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("agent",)) as server:
            stream = await open_raw(server.port, raw_client_context(certs / "ca.pem"))
            assert await server.results.receive() == ("refused", "no client certificate")
            assert await first_read_hint(stream) == REFUSAL_HINT


async def test_a_tls_1_2_client_sees_the_refusal_in_its_handshake(certs: Path) -> None:
    client = raw_client_context(certs / "ca.pem")
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("agent",)) as server:
            with pytest.raises(trio.BrokenResourceError):
                await open_raw(server.port, client)
            assert await server.results.receive() == ("refused", "no client certificate")


async def test_a_plaintext_client_is_refused(certs: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns"), ("agent",)) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(b"\x00\x00\x00\x0c\x01\x02plaintext!")
            outcome, reason = await server.results.receive()
            assert (outcome, reason.split(":")[0]) == (
                "refused",
                "not a TLS handshake (plaintext?)",
            )
            await stream.aclose()


async def test_a_silent_client_times_out(
    certs: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with tls_server(contexts(certs, "dns", timeout=3), ("agent",)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        start = trio.current_time()
        assert await server.results.receive() == ("refused", "handshake timed out")
        assert trio.current_time() - start == pytest.approx(3, abs=0.1)
        assert await stream.receive_some() == b""  # the server closed the connection
        await stream.aclose()


async def test_connect_refuses_a_server_of_the_wrong_role(certs: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "reporter"), ("agent",)) as server:
            with pytest.raises(TlsRefused, match="server is lars://reporter, expected lars://dns"):
                await open_tls(server.port, contexts(certs, "agent"), "dns")


async def test_connect_refuses_a_server_from_another_ca(certs: Path, other_certs: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(other_certs, "dns"), ("agent",)) as server:
            with pytest.raises(TlsRefused) as refused:
                await open_tls(server.port, contexts(certs, "agent"), "dns")
            assert refused.value.reason.startswith("server certificate not signed by our CA: ")
            assert await server.results.receive() == (
                "refused",
                "the peer closed the connection during the handshake",
            )


async def test_connect_times_out_on_a_server_that_never_answers(
    certs: Path, autojump_clock: trio.testing.MockClock
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")  # never accepts
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(TlsRefused, match=r"handshake timed out \(is TLS on at the server\?\)"):
        await open_tls(port, contexts(certs, "agent", timeout=2), "dns")
    await listeners[0].aclose()


async def test_connect_to_a_plaintext_server_says_so(certs: Path) -> None:
    async def plaintext(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"\x00\x00\x00\x0cnot tls at all")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, plaintext, listeners)
            with pytest.raises(TlsRefused, match=r"the server does not speak TLS \(is TLS on"):
                await open_tls(port, contexts(certs, "agent"), "dns")
            nursery.cancel_scope.cancel()


def test_refusal_hint_explains_the_first_read() -> None:
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    broken = trio.BrokenResourceError()
    broken.__cause__ = eof
    assert refusal_hint(broken) == REFUSAL_HINT
    assert refusal_hint(eof) == REFUSAL_HINT
    assert refusal_hint(None) == REFUSAL_HINT
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert refusal_hint(alert) == f"{REFUSAL_HINT} (the server said: tlsv1 alert unknown ca)"
    assert refusal_hint(trio.TooSlowError("slow")) == "slow"


async def test_a_failed_handshake_never_affects_another_connection(
    certs: Path, other_certs: Path
) -> None:
    wrong_ca = raw_client_context(
        certs / "ca.pem", other_certs / "agent.pem", other_certs / "agent.key"
    )
    with trio.fail_after(DEADLINE):
        async with tls_server(contexts(certs, "dns", timeout=60), ("agent",)) as server:
            silent = await trio.open_tcp_stream("127.0.0.1", server.port)  # stuck in handshake
            bad = await open_raw(server.port, wrong_ca)
            assert (await server.results.receive())[0] == "refused"
            good = await open_tls(server.port, contexts(certs, "agent"), "dns")
            assert await server.results.receive() == ("accepted", "agent")
            assert await echo(good) == b"ping"
            with pytest.raises(trio.WouldBlock):
                server.results.receive_nowait()  # the silent one is still being waited for
            for stream in (good, bad, silent):
                await stream.aclose()


# --- reload --------------------------------------------------------------------------------


async def test_reload_serves_new_connections_with_the_new_certificate(
    certs: Path, tmp_path: Path
) -> None:
    dns = contexts(certs, "dns")
    agent = contexts(certs, "agent")
    old_serial = load_cert(certs / "dns.pem").serial_number
    with trio.fail_after(DEADLINE):
        async with tls_server(dns, ("agent",)) as server:
            before = await open_tls(server.port, agent, "dns")
            assert serial_of(before) == old_serial

            new = reissue(certs, "dns", tmp_path / "scratch", days=30)
            assert dns.reload()
            assert dns.not_after == new.not_valid_after_utc

            after = await open_tls(server.port, agent, "dns")
            assert serial_of(after) == new.serial_number
            assert await echo(after, b"new") == b"new"
            assert await echo(before, b"old") == b"old"  # the established session goes on
            await after.aclose()
            await before.aclose()


async def test_reload_keeps_the_current_contexts_on_a_broken_file(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dns = contexts(certs, "dns")
    server_context = dns.server
    (certs / "dns.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    with caplog.at_level(logging.ERROR, logger="lars.tls"):
        assert not dns.reload()
    assert dns.server is server_context
    assert "TLS reload failed" in caplog.text
    assert "dns.pem" in caplog.text
    with trio.fail_after(DEADLINE):
        async with tls_server(dns, ("agent",)) as server:
            stream = await open_tls(server.port, contexts(certs, "agent"), "dns")
            assert await echo(stream) == b"ping"
            await stream.aclose()


def test_reload_refuses_a_key_from_a_half_done_rotation(certs: Path, tmp_path: Path) -> None:
    dns = contexts(certs, "dns")
    not_after = dns.not_after
    old_key = (certs / "dns.key").read_bytes()
    reissue(certs, "dns", tmp_path / "scratch", days=30)
    (certs / "dns.key").write_bytes(old_key)
    assert not dns.reload()
    assert dns.not_after == not_after


def test_reload_refuses_a_role_change(certs: Path, caplog: pytest.LogCaptureFixture) -> None:
    dns = contexts(certs, "dns")
    for suffix in (".pem", ".key"):
        shutil.copy(certs / f"reporter{suffix}", certs / f"dns{suffix}")
    with caplog.at_level(logging.ERROR, logger="lars.tls"):
        assert not dns.reload()
    assert dns.role == "dns"
    assert "changing the role needs a restart" in caplog.text


async def test_sighup_reloads_the_certificates(
    certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = contexts(certs, "dns")
    reloaded = trio.Event()
    outcomes: list[bool] = []
    reload = dns.reload

    def spy() -> bool:
        outcomes.append(reload())
        reloaded.set()
        return outcomes[-1]

    monkeypatch.setattr(dns, "reload", spy)
    new = reissue(certs, "dns", tmp_path / "scratch", days=30)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(reload_on_sighup, dns)
            os.kill(os.getpid(), signal.SIGHUP)
            await reloaded.wait()
            nursery.cancel_scope.cancel()
    assert outcomes == [True]
    assert dns.not_after == new.not_valid_after_utc


# --- lars tls ------------------------------------------------------------------------------


def test_cli_init_writes_certificates_and_config_snippets(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    runner = CliRunner()
    result = runner.invoke(tls, ["init", str(directory), "--hosts", "dns1.example, 10.0.0.5"])
    assert result.exit_code == 0, result.output
    assert f"wrote {directory / 'ca.key'}" in result.output
    snippets = result.output.split("\n# ")[1:]
    assert [snippet.splitlines()[0] for snippet in snippets] == [role_uri(r) for r in ROLES]
    agent = tomllib.loads(snippets[0].split("\n", 1)[1])["tls"]
    assert agent == {
        "mode": "on",
        "ca": str(directory.resolve() / "ca.pem"),
        "cert": str(directory.resolve() / "agent.pem"),
        "key": str(directory.resolve() / "agent.key"),
    }
    assert TlsContexts(TlsSettings(agent["ca"], agent["cert"], agent["key"])).role == "agent"

    again = runner.invoke(tls, ["init", str(directory)])
    assert again.exit_code == 1
    assert "already holds ca.pem" in again.output

    (directory / "admin.pem").unlink()
    (directory / "admin.key").unlink()
    reused = runner.invoke(tls, ["init", str(directory), "--days", "10"])
    assert reused.exit_code == 0, reused.output
    assert "reused the CA in" in reused.output
    assert [line.split()[1] for line in reused.output.splitlines() if line.startswith("wrote")] == [
        str(directory / "admin.pem"),
        str(directory / "admin.key"),
    ]


def test_cli_show_prints_role_sans_issuer_and_validity(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    generate(directory, hosts=["dns1.example", "10.0.0.5"], days=30)
    result = CliRunner().invoke(tls, ["show", str(directory / "dns.pem")])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.output.splitlines())
    assert lines["role"].strip() == "lars://dns"
    assert lines["SANs"].strip() == "URI:lars://dns, DNS:dns1.example, IP:10.0.0.5"
    assert lines["issuer"].strip() == "CN=Lars CA,O=Lars"
    assert "days left" in lines["valid"]

    ca = CliRunner().invoke(tls, ["show", str(directory / "ca.pem")])
    assert "role:    none: the certificate has no lars:// SAN URI" in ca.output
    assert "CA:      yes" in ca.output


def test_cli_show_fails_on_a_file_that_is_no_certificate(tmp_path: Path) -> None:
    (tmp_path / "x.pem").write_text("hello\n")
    result = CliRunner().invoke(tls, ["show", str(tmp_path / "x.pem")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'x.pem'}: not a PEM certificate"
    missing = CliRunner().invoke(tls, ["show", str(tmp_path / "none.pem")])
    assert missing.exit_code == 1
    assert "cannot read: No such file or directory" in missing.output
