"""``lars tls``: issue the certificates for mutual TLS between roles, and inspect one.

``lars tls init DIR`` makes a CA and a certificate per role (:func:`lars.tls.generate`) and
prints the ``[tls]`` section each role's config needs; ``lars tls show FILE`` prints what a
certificate says: its role, SANs, issuer and validity.

Errors print one line and exit 1, as everywhere in ``lars`` (click.ClickException; this module
cannot import ``lars.cli.fail``, which imports this group).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from lars.errors import LarsError
from lars.tls import ROLES, certificate_uris, generate, role_of_uris, role_uri


@click.group()
def tls() -> None:
    """Certificates for mutual TLS between Lars roles (each names its role: lars://ROLE)."""


@tls.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--hosts",
    default="",
    metavar="H1,H2,...",
    help="DNS names or IP addresses to add to every certificate's SANs, for tools that check "
    "hostnames (Lars itself authorises by role, not by host).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=825,
    show_default=True,
    help="How long the role certificates are valid.",
)
@click.option(
    "--force", is_flag=True, help="Replace existing files, including the CA (re-issue all)."
)
def init(directory: Path, hosts: str, days: int, force: bool) -> None:
    """Create a CA and one certificate per role in DIRECTORY.

    If DIRECTORY already holds ca.pem and ca.key, that CA is reused and only the missing role
    certificates are issued. Keys are written with mode 0600.
    """
    names = [host.strip() for host in hosts.split(",") if host.strip()]
    try:
        written = generate(directory, hosts=names, days=days, force=force)
    except LarsError as exc:
        raise click.ClickException(str(exc)) from None
    base = directory.resolve()
    ca = base / "ca.pem"
    wrote = {path.resolve() for path in written}
    for path in written:
        click.echo(f"wrote {path}")
    if ca not in wrote:
        click.echo(f"reused the CA in {ca}")
    click.echo(
        f"Keep {base / 'ca.key'} off the servers; give each host only its role's .pem and .key."
    )
    for role in ROLES:
        cert, key = base / f"{role}.pem", base / f"{role}.key"
        if cert in wrote:
            click.echo(
                f'\n# {role_uri(role)}\n[tls]\nmode = "on"\nca = {_toml(ca)}\n'
                f"cert = {_toml(cert)}\nkey = {_toml(key)}"
            )


@tls.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def show(file: Path) -> None:
    """Print a certificate's role, SANs, issuer and validity."""
    try:
        certificates = x509.load_pem_x509_certificates(file.read_bytes())
    except OSError as exc:
        raise click.ClickException(f"{file}: cannot read: {exc.strerror}") from None
    except ValueError:
        raise click.ClickException(f"{file}: not a PEM certificate") from None
    cert = certificates[0]
    try:
        uris = certificate_uris(cert)
        names = _san_names(cert)
    except ValueError as exc:
        raise click.ClickException(f"{file}: malformed extensions: {exc}") from None
    try:
        role = role_uri(role_of_uris(uris))
    except ValueError as exc:
        role = f"none: the certificate {exc}"
    now = datetime.datetime.now(datetime.UTC)
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < before:
        status = "NOT YET VALID"
    elif now > after:
        status = "EXPIRED"
    else:
        status = f"valid, {(after - now).days} days left"
    lines = [
        ("file", str(file)),
        ("role", role),
        ("SANs", ", ".join(names) or "none"),
        ("subject", cert.subject.rfc4514_string()),
        ("issuer", cert.issuer.rfc4514_string()),
        ("CA", "yes" if _is_ca(cert) else "no"),
        ("valid", f"{_when(before)} to {_when(after)} ({status})"),
        ("serial", f"{cert.serial_number:x}"),
        ("sha256", cert.fingerprint(hashes.SHA256()).hex(":")),
    ]
    if len(certificates) > 1:
        lines.append(("chain", f"{len(certificates) - 1} more certificate(s) in the file"))
    for label, value in lines:
        click.echo(f"{label + ':':<9}{value}")


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = []
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            names.append(f"URI:{name.value}")
        elif isinstance(name, x509.DNSName):
            names.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            names.append(f"IP:{name.value}")
        else:
            names.append(str(name))
    return names


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _toml(path: Path) -> str:
    """``path`` as a TOML basic string."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
