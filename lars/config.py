"""Configuration: attrs classes, loaded from TOML. A typo is an error, never a silent default.

Lookup order: an explicit ``--config PATH``; else ``./lars.toml`` if it exists; else the
built-in defaults. ``lars.toml`` at the repository root documents every key with its default.
Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and file.
"""

import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import attrs

from lars.alarms.rules import Rule, parse_rule
from lars.core.balancer import BalancerParams
from lars.core.model import check_port, check_zone, ip_to_int
from lars.errors import ConfigError, InvalidValue

DEFAULT_CONFIG_NAME = "lars.toml"
STORE_ENV = "LARS_STORE"


def parse_address(text: str, *, listen: bool = False) -> tuple[str, int]:
    """Parse ``"host:port"`` into ``(host, port)``; raises InvalidValue.

    With ``listen=True`` port 0 is allowed: bind to any free port (tests do that).
    """
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise InvalidValue(f"expected HOST:PORT, got {text!r}")
    if listen and int(port) == 0:
        return host, 0
    return host, check_port(int(port))


def _address(_inst: object, attr: "attrs.Attribute[Any]", value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        parse_address(item)


def _listen_address(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    parse_address(value, listen=True)


def _http_listen(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if value:
        parse_address(value, listen=True)


def _positive(_inst: object, attr: "attrs.Attribute[Any]", value: float) -> None:
    if value <= 0:
        raise InvalidValue(f"must be greater than 0, got {value!r}")


def _rate(_inst: object, attr: "attrs.Attribute[Any]", value: float) -> None:
    if not 0 <= value <= 1:
        raise InvalidValue(f"must be between 0 and 1, got {value!r}")


def _port(_inst: object, attr: "attrs.Attribute[Any]", value: int) -> None:
    check_port(value)


def _nonempty(_inst: object, attr: "attrs.Attribute[Any]", value: list[str]) -> None:
    if not value:
        raise InvalidValue("must not be empty")


def _zone(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    check_zone(value)


def _ipv4_or_empty(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if value:
        ip_to_int(value)


_LOG_LEVELS = ("debug", "info", "warning", "error")


@attrs.frozen
class LogConfig:
    """``[log]``"""

    level: str = attrs.field(default="info", validator=attrs.validators.in_(_LOG_LEVELS))
    format: str = attrs.field(default="text", validator=attrs.validators.in_(("text", "json")))


@attrs.frozen
class MetricsConfig:
    """``[metrics]``"""

    max_module_labels: int = attrs.field(default=1000, validator=attrs.validators.ge(0))


#: ``max_connections`` unless configured.
DEFAULT_MAX_CONNECTIONS = 10_000


@attrs.frozen
class ListenerLimits:
    """The connection limits of ``[dns]`` and ``[reporter]`` (see lars.toml)."""

    #: Connections served at once (agents, admins, handshakes in progress); beyond it new
    #: ones are refused at once, save ``admin_reserve`` more for admins (see lars.toml).
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_positive)
    admin_reserve: int = attrs.field(default=16, validator=attrs.validators.ge(0))
    #: Seconds a connection accepted in a crowd may take to send its first frame.
    first_frame_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Seconds the rest of a frame may take once its first bytes arrived.
    frame_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Change notices and StatsRequests per second and connection, and the burst allowed.
    control_rate: float = attrs.field(default=20.0, validator=_positive)
    control_burst: int = attrs.field(default=50, validator=_positive)


@attrs.frozen
class DnsConfig(ListenerLimits):
    """``[dns]``: the route service."""

    listen: str = attrs.field(default="127.0.0.1:7778", validator=_listen_address)
    http_listen: str = attrs.field(default="127.0.0.1:7781", validator=_http_listen)
    check_interval: float = attrs.field(default=1.0, validator=_positive)
    reload_interval: float = attrs.field(default=10.0, validator=_positive)
    change_retention: float = attrs.field(default=86400.0, validator=_positive)
    max_frame: int = attrs.field(default=1 << 20, validator=_positive)
    retry_max: float = attrs.field(default=3.0, validator=_positive)
    #: A store URL to read routes from (a replica, a nearby Galera node); "" = ``store``.
    store_read: str = ""
    #: Seconds without a good read of the store after which agents are told this DNS is
    #: stale (and move to a fresh one if they know one).
    stale_after: float = attrs.field(default=10.0, validator=_positive)
    #: Seconds a DNS keeps re-reading when a change notice names a version it cannot see
    #: yet (a replica or a Galera node behind the writer).
    catch_up: float = attrs.field(default=5.0, validator=_positive)
    #: Share of all hosts that one reload may remove before it is held (DESIGN §13): the
    #: previous routes keep serving until the loss persists ``shrink_hold`` seconds or an
    #: admin confirms it (`lars route confirm`). 1 turns the guard off.
    shrink_guard: float = attrs.field(
        default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    shrink_hold: float = attrs.field(default=60.0, validator=attrs.validators.ge(0.0))
    #: Fewest hosts a reload must remove to be held (a small deployment's routine removal
    #: of a few hosts is not a truncated table).
    shrink_min_hosts: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    #: Self-registration (DESIGN §14): seconds between this DNS's sweeps of expired leases,
    #: each after a flush of the renewals due (one batched write).
    lease_sweep: float = attrs.field(default=0.25, validator=_positive)
    #: Registrations one agent session may hold; more are refused, one by one.
    max_leases_per_session: int = attrs.field(default=1024, validator=_positive)
    #: The fleet view (DESIGN §14), off by default: a host that at least ``demote_callers``
    #: callers, and ``demote_share`` of those reporting on it in the last ``demote_window``
    #: seconds, see overloaded is sent demoted with its route (re-read every
    #: ``fleet_interval`` seconds).
    fleet_view: bool = False
    demote_callers: int = attrs.field(default=3, validator=_positive)
    demote_share: float = attrs.field(default=0.5, validator=_rate)
    demote_window: float = attrs.field(default=30.0, validator=_positive)
    fleet_interval: float = attrs.field(default=2.0, validator=_positive)


@attrs.frozen
class ReporterConfig(ListenerLimits):
    """``[reporter]``: the statistics sink."""

    listen: str = attrs.field(default="127.0.0.1:7779", validator=_listen_address)
    http_listen: str = attrs.field(default="127.0.0.1:7782", validator=_http_listen)
    queue_size: int = attrs.field(default=1024, validator=_positive)
    batch_size: int = attrs.field(default=1000, validator=_positive)
    writers: int = attrs.field(default=2, validator=_positive)
    max_frame: int = attrs.field(default=1 << 20, validator=_positive)
    retry_max: float = attrs.field(default=3.0, validator=_positive)
    #: How long the per-minute CallHistory buckets are kept, seconds (7 days).
    history_retention: float = attrs.field(default=7 * 86400.0, validator=_positive)


@attrs.frozen
class AgentConfig:
    """``[agent]``: the per-host agent and the local UDP API."""

    host: str = "127.0.0.1"
    base_port: int = attrs.field(default=8888, validator=_port)
    ports: int = attrs.field(default=3, validator=_positive)
    dns: list[str] = attrs.field(
        factory=lambda: ["127.0.0.1:7778"], validator=[_nonempty, _address]
    )
    reporter: str = attrs.field(default="127.0.0.1:7779", validator=_address)
    report_interval: float = attrs.field(default=1.0, validator=_positive)
    route_wait: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    busy_poll: float = attrs.field(default=0.0002, validator=attrs.validators.ge(0))
    busy_poll_reply: float = attrs.field(default=0.00003, validator=attrs.validators.ge(0))
    retry_max: float = attrs.field(default=5.0, validator=_positive)
    max_frame: int = attrs.field(default=1 << 20, validator=_positive)
    ip: str = attrs.field(default="", validator=_ipv4_or_empty)
    http_listen: str = attrs.field(default="127.0.0.1:7783", validator=_http_listen)
    #: The API (get_host, report) answers only on loopback unless this says otherwise.
    allow_remote_api: bool = False
    #: This agent's availability zone ("" = none), for zone affinity (DESIGN §13).
    zone: str = attrs.field(default="", validator=_zone)
    #: Registrations of local services (DESIGN §14) held at once; 0 turns registration off.
    max_registrations: int = attrs.field(default=256, validator=attrs.validators.ge(0))
    loadbalance: BalancerParams = attrs.field(factory=BalancerParams)

    def __attrs_post_init__(self) -> None:
        if self.base_port + self.ports - 1 > 65535:
            raise InvalidValue("base_port + ports - 1 must not exceed 65535")
        if not self.ip and ":" in parse_address(self.reporter)[0]:
            raise InvalidValue(
                "the reporter is an IPv6 address: set [agent] ip to this host's IPv4"
                " address, which names it in the call statistics"
            )


@attrs.frozen
class ClientConfig:
    """``[client]``: defaults for ``lars.client`` (the agent's ports come from ``[agent]``)."""

    timeout: float = attrs.field(default=0.25, validator=_positive)
    retries: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    busy_poll: float = attrs.field(default=0.0001, validator=attrs.validators.ge(0))
    report_delay: float = attrs.field(default=0.005, validator=attrs.validators.ge(0))


_WEB_ROLES = ("viewer", "admin")


def _password_hash(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    # A bad hash is an error at start-up, not a login that can never succeed.
    from lars.web.auth import check_password_hash

    check_password_hash(value)


def _token_hash(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    from lars.web.auth import check_token_hash

    check_token_hash(value)


def _signing_secret(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if value and len(value.encode()) < 32:
        raise InvalidValue("must be empty (a random key per start) or at least 32 characters")


def _unique_names(_inst: object, attr: "attrs.Attribute[Any]", value: list[Any]) -> None:
    seen: set[str] = set()
    for item in value:
        if item.name in seen:
            raise InvalidValue(f"name {item.name!r} appears twice")
        seen.add(item.name)


def _account_name(_inst: object, attr: "attrs.Attribute[Any]", value: str) -> None:
    if not value or len(value) > 64 or not value.isprintable() or value != value.strip():
        raise InvalidValue(
            f"must be 1 to 64 printable characters without surrounding spaces, got {value!r}"
        )


@attrs.frozen
class WebUser:
    """One ``[[web.users]]`` entry: a person who logs in to the console."""

    name: str = attrs.field(validator=_account_name)
    role: str = attrs.field(validator=attrs.validators.in_(_WEB_ROLES))
    password_hash: str = attrs.field(validator=_password_hash)


@attrs.frozen
class WebToken:
    """One ``[[web.tokens]]`` entry: an API client with a bearer token."""

    name: str = attrs.field(validator=_account_name)
    role: str = attrs.field(validator=attrs.validators.in_(_WEB_ROLES))
    token_hash: str = attrs.field(validator=_token_hash)


@attrs.frozen
class WebConfig:
    """``[web]``: the console and its HTTP API."""

    listen: str = attrs.field(default="127.0.0.1:7780", validator=_listen_address)
    http_listen: str = attrs.field(default="127.0.0.1:7784", validator=_http_listen)
    users: list[WebUser] = attrs.field(factory=list, validator=_unique_names)
    tokens: list[WebToken] = attrs.field(factory=list, validator=_unique_names)
    secret: str = attrs.field(default="", validator=_signing_secret)


def _webhooks(_inst: object, attr: "attrs.Attribute[Any]", value: list[str]) -> None:
    from lars.alarms.notify import check_webhook_url

    for url in value:
        check_webhook_url(url)
    if len(set(value)) != len(value):
        raise InvalidValue("a webhook URL appears twice")


@attrs.frozen
class AlarmsConfig:
    """``[alarms]``: the alarm rules the web role evaluates (one instance at a time, under a
    lease in the store) and the webhooks it tells. Rules written in the console join these."""

    #: Seconds between evaluations; the lease lasts three of them.
    interval: float = attrs.field(default=10.0, validator=_positive)
    #: Least seconds between two notifications of one alarm (a flapping alarm is damped).
    resend_interval: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))
    webhooks: list[str] = attrs.field(factory=list, validator=_webhooks)
    webhook_timeout: float = attrs.field(default=5.0, validator=_positive)
    webhook_retries: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    #: Notifications held per webhook while it is slow or down; the oldest go first.
    webhook_queue: int = attrs.field(default=1000, validator=_positive)
    #: Seconds the alarm history (events, resolved states) is kept (30 days).
    history_retention: float = attrs.field(default=30 * 86400.0, validator=_positive)
    rules: list[Rule] = attrs.field(factory=list, validator=_unique_names)


@attrs.frozen
class TlsConfig:
    """``[tls]``: mutual TLS between the roles (see lars.tls and ``lars tls init``)."""

    #: "on": every TCP link between roles is mutual TLS; "off": plaintext, on purpose (a
    #: warning at every start when a role listens beyond loopback); "" (the default):
    #: plaintext, and only loopback listen addresses are allowed.
    mode: str = attrs.field(default="", validator=attrs.validators.in_(("", "on", "off")))
    ca: str = ""
    cert: str = ""
    key: str = ""
    #: Seconds a TLS handshake may take before the connection is dropped.
    handshake_timeout: float = attrs.field(default=5.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.mode == "on":
            missing = [k for k in ("ca", "cert", "key") if not getattr(self, k)]
            if missing:
                raise InvalidValue(
                    f'mode = "on" needs {", ".join(missing)} (files from `lars tls init DIR`)'
                )


@attrs.frozen
class Config:
    """The whole ``lars.toml``."""

    store: str = "sqlite:///lars.db"
    log: LogConfig = attrs.field(factory=LogConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    dns: DnsConfig = attrs.field(factory=DnsConfig)
    reporter: ReporterConfig = attrs.field(factory=ReporterConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    client: ClientConfig = attrs.field(factory=ClientConfig)
    web: WebConfig = attrs.field(factory=WebConfig)
    alarms: AlarmsConfig = attrs.field(factory=AlarmsConfig)
    tls: TlsConfig = attrs.field(factory=TlsConfig)
    #: Where this config came from (not a key of the file).
    source: str = attrs.field(default="<defaults>", kw_only=True)


T = TypeVar("T")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert int -> float where asked."""
    origin = typing.get_origin(tp)
    if tp is Rule:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [[{key}]] must be a table, got {value!r}")
        try:
            return parse_rule(value, f"[[{key}]]")
        except InvalidValue as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_convert(v, item_tp, key, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # not used by any key
    if tp is float and type(value) is int:
        return float(value)
    if type(value) is not tp:
        raise ConfigError(
            f"{source}: {key} must be of type {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.kw_only is False}  # type: ignore[arg-type]
    kwargs = {}
    missing = [
        name
        for name, field in fields.items()
        if field.default is attrs.NOTHING and name not in data
    ]
    if missing:
        where = prefix or "config"
        raise ConfigError(f"{source}: {where}: missing key(s) {', '.join(map(repr, missing))}")
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key {full!r} (known here: {known})")
        kwargs[key] = _convert(value, hints[key], full, source)
    try:
        return cls(**kwargs)
    except (InvalidValue, ValueError, TypeError) as exc:
        # attrs validators name the attribute in exc.args for some errors; find which key
        bad = _which_key(cls, kwargs)
        where = f"{prefix}.{bad}" if prefix and bad else (bad or prefix or "config")
        raise ConfigError(f"{source}: {where}: {exc}") from None


def _which_key(cls: type[Any], kwargs: dict[str, Any]) -> str | None:
    """Find the first key whose value alone makes ``cls`` reject the arguments."""
    for field in attrs.fields(cls):
        if field.name in kwargs and field.validator is not None:
            try:
                field.validator(None, field, kwargs[field.name])
            except (InvalidValue, ValueError, TypeError):
                return str(field.name)
    for key, value in kwargs.items():
        try:
            cls(**{key: value})
        except (InvalidValue, ValueError, TypeError):
            return key
    return None


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from parsed TOML data, validating every key."""
    config = _build(Config, data, "", source)
    return attrs.evolve(config, source=source)


def load_config(path: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> Config:
    """Load the configuration: ``path``, else ``./lars.toml`` if present, else defaults."""
    if path is None:
        candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_NAME
        if not candidate.is_file():
            return Config()
        path = candidate
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return config_from_dict(data, source)


def store_url(config: Config, override: str | None = None) -> str:
    """The store URL to use: an explicit override, else ``$LARS_STORE``, else the config's."""
    return override or os.environ.get(STORE_ENV) or config.store
