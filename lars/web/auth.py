"""Who is asking, and what they may do: password and token hashes, signed cookies, CSRF.

No HTTP here: the app (:mod:`lars.web.app`) reads a cookie or an ``Authorization`` header
and asks this module who that is.

* **Passwords** (``[[web.users]]``) are stored as ``scrypt$N$r$p$SALT$KEY`` (salt and key
  in unpadded base64url), made by ``lars web passwd`` with :func:`hash_password`. The
  parameters travel with the hash, so stronger settings later need no migration.
* **API tokens** (``[[web.tokens]]``) are 256 random bits (``lars web token``), stored as
  ``sha256$HEX``. A fast hash is enough for a secret nobody can guess, and an API call
  must not cost a 50 ms scrypt.
* **Sessions** are a signed cookie (:class:`Signer`: JSON, base64url, HMAC-SHA256 with a
  purpose tag), written with the standard library rather than itsdangerous: it is thirty
  lines, and one dependency fewer. The cookie holds the user's name, the session's CSRF
  token and when it was issued; the role is looked up in the config on every request, so
  a user removed from the config is logged out at the next restart.
* **CSRF**: every visitor has a session, logged in or not, and every form carries its
  token (:func:`csrf_matches`), the login form included.
* **Open mode**: with neither users nor tokens configured there is nothing to log in
  with, and every request acts as the admin ``anonymous``. The role then only listens on
  loopback (:func:`check_listen`), so that means "anyone who can run ``lars route`` on
  this machine", the same trust as the CLI.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from lars.errors import ConfigError, InvalidValue

#: scrypt cost of new password hashes: 32 MiB and about 0.1 s per check.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: Largest parameters accepted from the config: room for stronger settings, and a bound on
#: the memory one login can ask for.
SCRYPT_MAX_N = 2**20
SCRYPT_MAX_R = 32
SCRYPT_MAX_P = 16
#: Bytes of entropy of a new API token.
TOKEN_BYTES = 32
#: Seconds a session cookie is valid after login.
SESSION_MAX_AGE = 12 * 3600.0
#: The user every request acts as in open mode.
ANONYMOUS = "anonymous"
ROLES = ("viewer", "admin")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidValue("not base64url") from None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem: scrypt needs 128 * r * n bytes, above OpenSSL's 32 MiB default at our cost.
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=length,
        maxmem=256 * r * n + (1 << 20),
    )


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The ``scrypt$N$r$p$SALT$KEY`` hash of ``password`` with a new random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, n, r, p, KEY_BYTES)
    return f"scrypt${n}${r}${p}${_b64encode(salt)}${_b64encode(key)}"


def _parse_password_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise InvalidValue(
            "expected scrypt$N$r$p$SALT$KEY as printed by `lars web passwd`, "
            f"got {text[:16]!r}{'...' if len(text) > 16 else ''}"
        )
    try:
        n, r, p = (int(part, 10) for part in parts[1:4])
    except ValueError:
        raise InvalidValue("scrypt hash: N, r and p must be integers") from None
    if n < 2 or n & (n - 1) or n > SCRYPT_MAX_N:
        raise InvalidValue(f"scrypt hash: N must be a power of 2 up to {SCRYPT_MAX_N}, got {n}")
    if not (1 <= r <= SCRYPT_MAX_R and 1 <= p <= SCRYPT_MAX_P):
        raise InvalidValue(f"scrypt hash: r must be 1..{SCRYPT_MAX_R}, p 1..{SCRYPT_MAX_P}")
    salt, key = _b64decode(parts[4]), _b64decode(parts[5])
    if len(salt) < 8 or len(key) < 16:
        raise InvalidValue("scrypt hash: salt or key too short")
    return n, r, p, salt, key


def check_password_hash(text: str) -> None:
    """Raise InvalidValue unless ``text`` is a well-formed ``scrypt$...`` hash."""
    _parse_password_hash(text)


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches the ``scrypt$...`` hash. Slow on purpose (~0.1 s)."""
    n, r, p, salt, key = _parse_password_hash(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(key)), key)


def new_token() -> str:
    """A new random API token (what a client sends as ``Authorization: Bearer ...``)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The ``sha256$HEX`` hash of an API token, as ``[[web.tokens]] token_hash`` stores it."""
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_token_hash(text: str) -> None:
    """Raise InvalidValue unless ``text`` is a well-formed ``sha256$HEX`` hash."""
    kind, _, digest = text.partition("$")
    if kind != "sha256" or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise InvalidValue(
            "expected sha256$HEX as printed by `lars web token` (64 lowercase hex digits)"
        )


@attrs.frozen
class Principal:
    """Who a request acts as: a console user, an API token, or ``anonymous`` in open mode."""

    name: str
    role: str

    @property
    def can_write(self) -> bool:
        """Admins change routes and names; viewers only look."""
        return self.role == "admin"


class _Account(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...


class _User(_Account, Protocol):
    @property
    def password_hash(self) -> str: ...


class _Token(_Account, Protocol):
    @property
    def token_hash(self) -> str: ...


class Accounts:
    """The users and tokens of ``[web]``: checks a login, a session's user, a bearer token."""

    def __init__(self, users: Sequence[_User], tokens: Sequence[_Token]) -> None:
        self._users = {u.name: (Principal(u.name, u.role), u.password_hash) for u in users}
        self._tokens = {t.token_hash: Principal(t.name, t.role) for t in tokens}
        self._decoy: str | None = None

    @property
    def open(self) -> bool:
        """True when nothing is configured to log in with: every request is an admin."""
        return not self._users and not self._tokens

    @property
    def has_users(self) -> bool:
        """True when people can log in to the pages."""
        return bool(self._users)

    def login(self, name: str, password: str) -> Principal | None:
        """The user if ``password`` is theirs, else None. Slow (scrypt): run it in a thread."""
        entry = self._users.get(name)
        if entry is None:
            # An unknown name costs a check all the same, so that a login's time does not
            # tell which user names exist.
            if self._decoy is None:
                self._decoy = hash_password(secrets.token_hex(8))
            verify_password(password, self._decoy)
            return None
        principal, encoded = entry
        return principal if verify_password(password, encoded) else None

    def user(self, name: str) -> Principal | None:
        """The configured user of that name (a session names its user), if any."""
        entry = self._users.get(name)
        return entry[0] if entry else None

    def bearer(self, token: str) -> Principal | None:
        """The API client whose token this is, if any."""
        return self._tokens.get(hash_token(token))


def check_listen(host: str, accounts: Accounts, address: str | None = None) -> None:
    """Refuse to serve without users on anything but a loopback address (``address``: the
    configured ``host:port``, for the message)."""
    if accounts.has_users:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"[web] listen = {address or host!r}: with no [[web.users]] configured the console"
            " has no login and serves only on a loopback address (127.0.0.1 or ::1); add users "
            "(`lars web passwd` makes their hashes) to serve on other addresses"
        )


def loopback_host_header(host_header: str) -> bool:
    """True if a ``Host`` header names this machine by a loopback name or address.

    In open mode the console refuses other names: a web page whose domain an attacker
    points at 127.0.0.1 (DNS rebinding) must not reach it with the browser's help.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Signer:
    """Signs small JSON values for cookies: ``BASE64URL(JSON).BASE64URL(HMAC-SHA256)``.

    ``purpose`` is mixed into the MAC, so a value signed for one cookie is no good in
    another.
    """

    def __init__(self, secret: bytes, purpose: str) -> None:
        if len(secret) < 16:
            raise ValueError("the signing secret must be at least 16 bytes")
        self._key = hmac.new(secret, b"lars-web\0" + purpose.encode(), hashlib.sha256).digest()

    def _mac(self, payload: str) -> str:
        return _b64encode(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def sign(self, data: dict[str, Any]) -> str:
        """The signed cookie value for ``data``."""
        payload = _b64encode(json.dumps(data, separators=(",", ":")).encode("utf-8"))
        return f"{payload}.{self._mac(payload)}"

    def unsign(self, value: str) -> dict[str, Any] | None:
        """The data of a value this signer made, or None if it is forged or mangled."""
        payload, _, mac = value.partition(".")
        if not payload.isascii() or not hmac.compare_digest(
            mac.encode(), self._mac(payload).encode()
        ):
            return None
        try:
            data = json.loads(_b64decode(payload))
        except (InvalidValue, ValueError):
            return None
        return data if isinstance(data, dict) else None


@attrs.frozen
class Session:
    """What the session cookie holds: the logged-in user (None before login), the CSRF
    token every form of this session carries, and when it was issued (epoch seconds)."""

    user: str | None
    csrf: str
    issued: float

    @classmethod
    def new(cls, user: str | None = None, now: float | None = None) -> Session:
        """A fresh session with a new CSRF token."""
        return cls(user, secrets.token_urlsafe(24), time.time() if now is None else now)

    def encode(self, signer: Signer) -> str:
        """The cookie value."""
        return signer.sign({"u": self.user, "c": self.csrf, "t": self.issued})

    @classmethod
    def decode(
        cls,
        value: str,
        signer: Signer,
        *,
        now: float | None = None,
        max_age: float = SESSION_MAX_AGE,
    ) -> Session | None:
        """The session of a cookie value: None if forged, mangled or expired."""
        data = signer.unsign(value)
        if data is None:
            return None
        user, csrf, issued = data.get("u"), data.get("c"), data.get("t")
        if not (user is None or isinstance(user, str)) or not isinstance(csrf, str):
            return None
        if not isinstance(issued, int | float):
            return None
        now = time.time() if now is None else now
        if not issued <= now + 60 or now - issued > max_age:  # 60 s of clock skew
            return None
        return cls(user, csrf, float(issued))


def csrf_matches(session: Session, submitted: str | None) -> bool:
    """True if a form's CSRF field carries its session's token (compared in constant time)."""
    if not submitted:
        return False
    return hmac.compare_digest(session.csrf.encode(), submitted.encode("utf-8", "replace"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, if that is what it is."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
