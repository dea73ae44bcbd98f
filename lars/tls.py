"""Mutual TLS between Lars daemons: certificates that name a role, handshakes that check it.

**Identity is the role.** Every certificate carries exactly one SAN URI naming its role:
``lars://agent``, ``lars://dns``, ``lars://reporter`` or ``lars://admin`` (admins are the CLI
and the console: change notices and ``lars stats``). A peer's certificate must chain to the CA
in ``[tls] ca``; then the listener authorises by role (a DNS serves routes to agents and takes
notices from admins; a reporter takes statistics from agents).

**No hostname check**, on purpose: certificates name roles and hosts move. An agent keeps its
certificate when it is redeployed elsewhere, a DNS reached through a new address or a VIP keeps
working, and nothing is re-issued when the inventory changes. ``lars tls init --hosts`` still
writes DNS names and IP addresses into the SANs, for tools that do check them
(``openssl s_client -verify_hostname``, monitoring probes).

**Versions.** Two Lars processes always negotiate TLS 1.3. TLS 1.2 is accepted as the minimum
(ECDHE with AEAD ciphers only, no renegotiation) so that a TLS-terminating proxy, a probe or a
client on an older TLS stack can still reach a role; 1.2 with those ciphers is still sound.

**The TLS 1.3 subtlety.** In TLS 1.3 the client finishes its handshake *before* the server has
looked at the client's certificate. A server that refuses the client's certificate (unknown
CA, expired, none) drops the connection afterwards (trio does not even send the TLS alert), and
one that refuses the *role* closes the session cleanly. Either way :func:`connect` succeeds on
the client and the refusal only shows on the client's first read, as an error or as an
immediate end of stream; :func:`refusal_hint` turns that into a message saying our certificate
was likely refused. (With TLS 1.2 the refusal ends the handshake itself.)

**Rotation.** :meth:`TlsContexts.reload` (on SIGHUP, see :func:`reload_on_sighup`) builds new
``ssl.SSLContext`` objects from the files; new connections use them, established connections
keep the session they negotiated. A reload that fails keeps the previous contexts.

:func:`generate` (``lars tls init``) issues an EC P-256 CA and one certificate per role.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import re
import signal
import ssl
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lars.config import TlsConfig
from lars.errors import ConfigError, InvalidValue, LarsError

log = logging.getLogger("lars.tls")

#: Every role a certificate can name.
ROLES = ("agent", "dns", "reporter", "admin")
#: The scheme of the SAN URI that names a role: ``lars://ROLE``.
URI_PREFIX = "lars://"

#: TLS 1.3 between Lars processes; 1.2 accepted for proxies and older stacks (module docstring).
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
#: The TLS 1.2 cipher suites allowed (TLS 1.3 suites are all AEAD and are not affected).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: Seconds a refused connection may take to close (sending close_notify) before it is dropped.
CLOSE_TIMEOUT = 1.0
_LIKELY_REFUSED = "likely our certificate was refused (wrong CA, expired, or wrong role)"
#: What a session closed right after our handshake most likely means (see the module docstring).
REFUSAL_HINT = f"the peer closed the TLS session: {_LIKELY_REFUSED}"

#: OpenSSL verification errors that mean "not issued by a CA we trust".
_NOT_OUR_CA = frozenset(
    {
        2,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        7,  # X509_V_ERR_CERT_SIGNATURE_FAILURE
        18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)
#: OpenSSL reasons seen when the bytes read are not TLS at all (a plaintext peer).
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL"}
)
_HOST_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def role_uri(role: str) -> str:
    """The SAN URI that names ``role`` in a certificate: ``lars://ROLE``."""
    return URI_PREFIX + role


def role_of_uris(uris: Iterable[str]) -> str:
    """The role named by the one ``lars://`` URI among ``uris`` (other URIs are ignored).

    Raises ValueError saying what is wrong: no such URI, several, or an unknown role.
    """
    named = [uri for uri in uris if uri.startswith(URI_PREFIX)]
    if not named:
        raise ValueError("has no lars:// SAN URI naming its role")
    if len(named) > 1:
        raise ValueError(f"names several roles ({', '.join(named)}); it must name exactly one")
    role = named[0].removeprefix(URI_PREFIX)
    if role not in ROLES:
        known = ", ".join(map(role_uri, ROLES))
        raise ValueError(f"names an unknown role {named[0]} (known: {known})")
    return role


def certificate_uris(cert: x509.Certificate) -> list[str]:
    """The SAN URIs of a certificate (none without a SubjectAlternativeName extension).

    Raises ValueError if the certificate's extensions are malformed.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


class TlsRefused(LarsError):
    """A TLS connection was refused (handshake failed, timed out, or the wrong role).

    ``reason`` says why, for the log line of whoever accepted or opened the connection.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class TlsSettings:
    """Where this process's TLS files are, and how long a handshake may take.

    Plain paths: the ``[tls]`` section of the config maps onto these fields.
    """

    ca: str
    cert: str
    key: str
    handshake_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))


@attrs.frozen
class _Loaded:
    role: str
    server: ssl.SSLContext
    client: ssl.SSLContext
    not_after: datetime.datetime


class TlsContexts:
    """This process's certificate, checked, and the server and client contexts made from it.

    The constructor reads and checks everything at once and raises :class:`ConfigError` naming
    the file: unreadable, not PEM, a key that does not match the certificate, a certificate
    without exactly one ``lars://ROLE`` SAN URI of a known role, a CA that does not load, a
    certificate not issued directly by a CA in ``ca`` (intermediates are not supported), or a
    certificate (own or CA) that is expired or not yet valid.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._loaded = _load(settings)

    @property
    def role(self) -> str:
        """This process's role, from the ``lars://`` SAN URI of its own certificate."""
        return self._loaded.role

    @property
    def server(self) -> ssl.SSLContext:
        """The context for accepting: demands a client certificate issued by the CA."""
        return self._loaded.server

    @property
    def client(self) -> ssl.SSLContext:
        """The context for connecting: presents our certificate, verifies the server's chain
        against the CA and checks no hostname (certificates name roles; module docstring)."""
        return self._loaded.client

    @property
    def not_after(self) -> datetime.datetime:
        """When our own certificate expires (UTC), for a log line or a gauge."""
        return self._loaded.not_after

    def reload(self) -> bool:
        """Re-read the files. On success new connections use the new contexts (established
        ones are untouched) and True is returned; on any problem the current contexts stay,
        the problem is logged as an error, and False is returned.

        The role may not change on a reload: that takes a restart.
        """
        try:
            loaded = _load(self.settings)
            if loaded.role != self.role:
                raise ConfigError(
                    f"{self.settings.cert}: the certificate names {role_uri(loaded.role)}, "
                    f"this process is {role_uri(self.role)}; changing the role needs a restart"
                )
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the current certificates: %s", exc)
            return False
        self._loaded = loaded
        log.info(
            "TLS certificates reloaded: %s, valid until %s",
            role_uri(loaded.role),
            _when(loaded.not_after),
        )
        return True


def peer_role(stream: trio.SSLStream[Any]) -> str | None:
    """The role named by the single ``lars://`` SAN URI of the peer's verified certificate;
    None if it names none, several, or an unknown one."""
    cert = stream.getpeercert()
    if not cert:
        return None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    try:
        return role_of_uris(uris)
    except ValueError:
        return None


async def accept(
    stream: trio.abc.Stream, contexts: TlsContexts, allowed: Collection[str]
) -> tuple[trio.SSLStream[trio.abc.Stream], str]:
    """Run the server side of the handshake on an accepted ``stream``; return the TLS stream
    and the peer's role, which must be one of ``allowed``.

    Anything else (no or a bad client certificate, not TLS at all, no handshake within
    ``handshake_timeout``, a role not allowed here) closes the stream and raises
    :class:`TlsRefused`, whose ``reason`` the caller logs with the peer's address. Nothing but
    TlsRefused or a cancellation comes out of here, so one bad peer costs only its connection.
    """
    ssl_stream = trio.SSLStream(stream, contexts.server, server_side=True)
    try:
        await _handshake(ssl_stream, contexts.settings, server_side=True)
        role = peer_role(ssl_stream)
        if role is None:
            raise TlsRefused("the client certificate names no single known lars:// role")
        if role not in allowed:
            only = " or ".join(map(role_uri, sorted(allowed))) or "no role"
            raise TlsRefused(f"peer is {role_uri(role)}, only {only} may connect here")
    except BaseException:
        await _close_quietly(ssl_stream)
        raise
    return ssl_stream, role


async def connect(
    stream: trio.abc.Stream, contexts: TlsContexts, expect: str
) -> trio.SSLStream[trio.abc.Stream]:
    """Run the client side of the handshake on a connected ``stream``; the server must present
    a certificate of the role ``expect``. Raises :class:`TlsRefused` (the stream closed).

    With TLS 1.3 this succeeds even when the server then refuses *our* certificate: the
    refusal shows on the first read, as an ``ssl.SSLError`` (inside a
    ``trio.BrokenResourceError``) or as an end of stream. Log it with :func:`refusal_hint`.
    """
    ssl_stream = trio.SSLStream(stream, contexts.client, server_side=False)
    try:
        await _handshake(ssl_stream, contexts.settings, server_side=False)
        role = peer_role(ssl_stream)
        if role is None:
            raise TlsRefused("the server certificate names no single known lars:// role")
        if role != expect:
            raise TlsRefused(f"server is {role_uri(role)}, expected {role_uri(expect)}")
    except BaseException:
        await _close_quietly(ssl_stream)
        raise
    return ssl_stream


def refusal_hint(exc: BaseException | None) -> str:
    """Explain what went wrong on the first read after :func:`connect`.

    ``exc`` is the ``ssl.SSLError`` or ``trio.BrokenResourceError`` that read raised, or None
    if the read returned an end of stream. Both mean the server closed the session right after
    the handshake, which under TLS 1.3 is how a refused client certificate (or role) shows.
    A Lars (trio) server closes without sending its TLS alert; another server's alert, if it
    sent one, is appended. Any other exception is returned as its message.
    """
    if exc is not None and not isinstance(exc, ssl.SSLError | trio.BrokenResourceError):
        return str(exc) or type(exc).__name__
    error = _ssl_error(exc) if exc is not None else None
    alert = _alert(error) if error is not None else None
    return f"{REFUSAL_HINT} (the server said: {alert})" if alert else REFUSAL_HINT


async def reload_on_sighup(
    contexts: TlsContexts | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Re-read the certificates on every SIGHUP, forever (run it in the role's nursery).

    Must run in the main thread (signal handlers); several SIGHUPs in a row cause one reload.
    The outcome is logged by :meth:`TlsContexts.reload`.
    """
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        await reload_on(signals, contexts)


async def reload_on(signals: AsyncIterator[int], contexts: TlsContexts | None) -> None:
    """Re-read the certificates (``contexts``; None: TLS is off) at each of ``signals``."""
    async for _ in signals:
        if contexts is None:
            log.info("SIGHUP: nothing to re-read ([tls] is not on)")
        else:
            log.info("SIGHUP: re-reading the TLS certificates")
            contexts.reload()


def generate(
    directory: Path,
    *,
    hosts: Sequence[str] = (),
    days: int = 825,
    ca_days: int = 3650,
    force: bool = False,
) -> list[Path]:
    """Create a CA and a certificate per role in ``directory``; return the files written.

    The CA is EC P-256 (``ca.pem``, ``ca.key``); each role gets ``ROLE.pem`` / ``ROLE.key``,
    signed by it, with the SAN URI ``lars://ROLE`` plus every one of ``hosts`` as a DNS name
    or IP address. Keys are written 0600, each file atomically (a rename), and a new directory
    is created 0700.

    Nothing is overwritten unless ``force`` (which also makes a new CA, so every certificate
    in use must then be replaced): existing files raise :class:`ConfigError` naming them. If
    ``ca.pem`` and ``ca.key`` exist, they are **reused** and only the roles whose two files are
    both missing are issued, so a lost or new role certificate can be added to a running
    installation; the returned list then does not contain the CA files.
    """
    if days < 1 or ca_days < 1:
        raise InvalidValue(f"days must be at least 1, got days={days}, ca_days={ca_days}")
    names = _host_names(hosts)
    directory = Path(directory)
    ca_files = (directory / "ca.pem", directory / "ca.key")
    role_files = {role: (directory / f"{role}.pem", directory / f"{role}.key") for role in ROLES}
    now = datetime.datetime.now(datetime.UTC)

    issue = [role for role, files in role_files.items() if force or not _any_exists(files)]
    reuse_ca = not force and all(path.exists() for path in ca_files)
    if not force:
        existing = [path for path in (*ca_files, *_flat(role_files.values())) if path.exists()]
        halves = [path for path in existing if _half(path)]
        if reuse_ca and (halves or issue):
            # Reusing the CA to issue the missing roles, unless a role has one of its two
            # files: issuing it would overwrite that one.
            existing = halves
        if existing:
            shown = ", ".join(path.name for path in existing)
            raise ConfigError(
                f"{directory}: already holds {shown}; replace with --force (a new CA: "
                "every certificate in use must then be replaced)"
            )

    _make_directory(directory)
    written: list[Path] = []
    if reuse_ca:
        ca_cert, ca_key = _load_ca(*ca_files, now)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, now, now + datetime.timedelta(days=ca_days))
        written += _write_pair(*ca_files, ca_cert, ca_key)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    for role in issue:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _role_certificate(role, names, key, ca_cert, ca_key, now, not_after)
        written += _write_pair(*role_files[role], cert, key)
    return written


# --- loading -------------------------------------------------------------------------------


def _load(settings: TlsSettings) -> _Loaded:
    ca_pem = _read(settings.ca, "CA certificate")
    cert_pem = _read(settings.cert, "certificate")
    key_pem = _read(settings.key, "private key")
    cas = _parse_certificates(settings.ca, ca_pem, "CA certificate")
    cert = _parse_certificates(settings.cert, cert_pem, "certificate")[0]
    key = _parse_key(settings.key, key_pem)
    try:
        cert_public = _public_der(cert)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{settings.cert}: unsupported public key: {exc}") from None
    if _public_der(key) != cert_public:
        raise ConfigError(f"{settings.key}: the key does not match the certificate {settings.cert}")
    try:
        role = role_of_uris(certificate_uris(cert))
    except ValueError as exc:
        raise ConfigError(f"{settings.cert}: the certificate {exc}") from None
    issuer = next((ca for ca in cas if _issued_by(cert, ca)), None)
    if issuer is None:
        raise ConfigError(f"{settings.cert}: the certificate is not signed by the CA {settings.ca}")
    now = datetime.datetime.now(datetime.UTC)
    _check_validity(settings.cert, "certificate", cert, now)
    _check_validity(settings.ca, "CA certificate", issuer, now)
    _warn_if_readable(settings.key)
    server = _context(settings, ca_pem, server_side=True)
    client = _context(settings, ca_pem, server_side=False)
    # ssl reads the certificate and key again by path: make sure it read the files checked here
    # (a rotation may be replacing them right now).
    for path, what, data in (
        (settings.cert, "certificate", cert_pem),
        (settings.key, "key", key_pem),
    ):
        if _read(path, what) != data:
            raise ConfigError(f"{path}: the {what} changed while being loaded; try again")
    return _Loaded(role, server, client, cert.not_valid_after_utc)


def _context(settings: TlsSettings, ca_pem: bytes, *, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.check_hostname = False  # certificates name roles, not hosts (module docstring)
    context.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        context.options |= ssl.OP_NO_RENEGOTIATION
        # Lars clients never resume sessions: tickets would only cost work per connection.
        context.num_tickets = 0
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{settings.ca}: the CA does not load: {exc}") from None
    try:
        # An empty password: an encrypted key fails here instead of prompting on a terminal.
        context.load_cert_chain(settings.cert, settings.key, password=b"")
    except ssl.SSLError as exc:
        raise ConfigError(f"{settings.cert}: does not load with {settings.key}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read: {exc.strerror}") from None
    return context


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _parse_certificates(path: str | Path, data: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM {what}: {exc}") from None


def _parse_key(path: str | Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{path}: the private key is encrypted; Lars needs it unencrypted "
            "(protect it with its file mode, 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a PEM private key: {exc}") from None


def _public_der(holder: PrivateKeyTypes | x509.Certificate) -> bytes:
    return holder.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_validity(
    path: str | Path, what: str, cert: x509.Certificate, now: datetime.datetime
) -> None:
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{path}: the {what} is not valid before {_when(cert.not_valid_before_utc)}"
        )
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{path}: the {what} expired on {_when(cert.not_valid_after_utc)}")


def _warn_if_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s: the private key is readable by others (mode %o); chmod 600", path, mode)


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


# --- handshakes ----------------------------------------------------------------------------


async def _handshake(
    ssl_stream: trio.SSLStream[trio.abc.Stream], settings: TlsSettings, *, server_side: bool
) -> None:
    try:
        with trio.fail_after(settings.handshake_timeout):
            await ssl_stream.do_handshake()
    except trio.TooSlowError:
        hint = "" if server_side else " (is TLS on at the server?)"
        raise TlsRefused(f"handshake timed out{hint}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TlsRefused(_handshake_failure(exc, server_side=server_side)) from exc


def _handshake_failure(exc: BaseException, *, server_side: bool) -> str:
    error = _ssl_error(exc)
    if error is None or isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        if server_side:
            return "the peer closed the connection during the handshake"
        # TLS 1.2, or a server that is not Lars: a refused client certificate ends the
        # handshake itself (a trio server closes without sending its alert).
        return f"the server closed the connection during the handshake: {_LIKELY_REFUSED}"
    whose = "" if server_side else "server "
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code in _NOT_OUR_CA:
            return f"{whose}certificate not signed by our CA: {error.verify_message}"
        return f"{whose}certificate refused: {error.verify_message}"
    reason = _reason(error)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate"
    if reason in _NOT_TLS:
        if server_side:
            return f"not a TLS handshake (plaintext?): {_words(reason)}"
        return f"the server does not speak TLS (is TLS on there?): {_words(reason)}"
    alert = _alert(error)
    if alert and not server_side:
        return f"{REFUSAL_HINT} (the server said: {alert})"
    if alert:
        return f"the client aborted the handshake: {alert}"
    return f"TLS handshake failed: {_words(reason) if reason else error}"


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ssl.SSLError behind ``exc`` (trio wraps it in BrokenResourceError), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _alert(error: ssl.SSLError) -> str | None:
    """The TLS alert the peer sent, in words ("tlsv1 alert unknown ca"), if that is the error."""
    reason = _reason(error)
    return _words(reason) if "_ALERT_" in reason else None


def _reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason code ("WRONG_VERSION_NUMBER"); empty if none (or made in Python)."""
    return getattr(error, "reason", None) or ""


def _words(reason: str) -> str:
    return reason.lower().replace("_", " ")


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close a refused stream without letting its close fail the caller: shielded (the caller
    may be cancelled) and bounded (a peer that does not read cannot hold us)."""
    # The connection is being dropped anyway: a failure to close it cleanly changes nothing.
    with (
        trio.move_on_after(CLOSE_TIMEOUT, shield=True),
        contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError
        ),
    ):
        await stream.aclose()


# --- generating ----------------------------------------------------------------------------


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(host.strip() for host in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.fullmatch(host):
            raise InvalidValue(f"not a DNS name or IP address: {host!r}")
        names.append(x509.DNSName(host))
    return names


def _any_exists(paths: Iterable[Path]) -> bool:
    return any(path.exists() for path in paths)


def _flat(pairs: Iterable[tuple[Path, Path]]) -> list[Path]:
    return [path for pair in pairs for path in pair]


def _half(path: Path) -> bool:
    """Whether ``path`` exists without its partner (``x.pem`` without ``x.key`` or back)."""
    partner = path.with_suffix(".key" if path.suffix == ".pem" else ".pem")
    return path.exists() and not partner.exists()


def _make_directory(directory: Path) -> None:
    try:
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
        elif not directory.is_dir():
            raise ConfigError(f"{directory}: not a directory")
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the directory: {exc.strerror}") from None


def _load_ca(
    cert_path: Path, key_path: Path, now: datetime.datetime
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    cert = _parse_certificates(cert_path, _read(str(cert_path), "CA certificate"), "certificate")[0]
    key = _parse_key(key_path, _read(str(key_path), "CA key"))
    if _public_der(key) != _public_der(cert):
        raise ConfigError(f"{key_path}: the key does not match the CA certificate {cert_path}")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{key_path}: the CA key must be an EC or RSA key to be reused")
    _check_validity(cert_path, "CA certificate", cert, now)
    return cert, key


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, now: datetime.datetime, not_after: datetime.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lars"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Lars CA"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _role_certificate(
    role: str,
    hosts: list[x509.GeneralName],
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    now: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lars"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Lars {role}"),
        ]
    )
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role_uri(role)), *hosts]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Every role both accepts and opens connections (or may, later): both purposes.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> list[Path]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return [cert_path, key_path]


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` atomically: a reader (a SIGHUP reload) sees the
    old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # the mode of open() is masked by the umask
            file.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None


def contexts_for(config: TlsConfig, role: str) -> TlsContexts | None:
    """The TLS contexts of a process that acts as ``role`` (``agent``, ``dns``, ``reporter``
    or ``admin``) under ``[tls]``: None unless ``mode = "on"``; ConfigError if the
    certificate names another role (a DNS with an agent's certificate would be refused by
    every agent, so it is refused at start instead)."""
    if config.mode != "on":
        return None
    contexts = TlsContexts(
        TlsSettings(config.ca, config.cert, config.key, config.handshake_timeout)
    )
    if contexts.role != role:
        raise ConfigError(
            f"[tls] cert {config.cert} is a {role_uri(contexts.role)} certificate; acting as"
            f" {role} needs a {role_uri(role)} one (`lars tls init` makes one per role)"
        )
    return contexts
