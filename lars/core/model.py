"""Modules and hosts: the value types of Lars and their validation.

A *module* is a ``(modid, cmdid)`` pair of unsigned 32-bit integers. A host is an IPv4 address
and a TCP/UDP port. Inside Lars (the wire, the store, the load balancer) a host is the pair
``(ip, port)`` with ``ip`` as the unsigned integer stored in ``RouteData.serverip``
(10.0.0.1 = 167772161); the public :class:`Host` carries the dotted form for people.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from lars.errors import InvalidValue

UINT32_MAX = 0xFFFF_FFFF
PORT_MIN = 1
PORT_MAX = 65535

#: ``(modid, cmdid)``
ModuleKey = tuple[int, int]
#: ``(ip as uint32, port)``
HostKey = tuple[int, int]

_pack_ip = struct.Struct("!I").pack
_unpack_ip = struct.Struct("!I").unpack


def check_id(value: object, name: str = "id") -> int:
    """Return ``value`` if it is an unsigned 32-bit integer, else raise :class:`InvalidValue`."""
    if type(value) is not int or not 0 <= value <= UINT32_MAX:
        raise InvalidValue(f"{name} must be an integer from 0 to {UINT32_MAX}, got {value!r}")
    return value


def check_port(value: object) -> int:
    """Return ``value`` if it is a port number from 1 to 65535, else raise :class:`InvalidValue`."""
    if type(value) is not int or not PORT_MIN <= value <= PORT_MAX:
        raise InvalidValue(f"port must be an integer from {PORT_MIN} to {PORT_MAX}, got {value!r}")
    return value


def ip_to_int(address: str) -> int:
    """Convert dotted IPv4 text (``"10.0.0.1"``) to its unsigned integer (167772161)."""
    parts = address.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise InvalidValue(f"not an IPv4 address: {address!r}")
    value = 0
    for part in parts:
        octet = int(part)
        if octet > 255:
            raise InvalidValue(f"not an IPv4 address: {address!r}")
        value = value << 8 | octet
    return value


def int_to_ip(value: int) -> str:
    """Convert an unsigned 32-bit integer to dotted IPv4 text."""
    check_id(value, "ip")
    return socket.inet_ntoa(_pack_ip(value))


def parse_module(modid: object, cmdid: object) -> ModuleKey:
    """Validate a module's ids and return the ``(modid, cmdid)`` key."""
    return check_id(modid, "modid"), check_id(cmdid, "cmdid")


class Host(NamedTuple):
    """One node of a route: dotted IPv4 address and port, as business code sees it."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Host:
        """Parse ``"IP:PORT"`` text, validating both parts."""
        ip, sep, port = text.strip().rpartition(":")
        if not sep or not port.isascii() or not port.isdigit():
            raise InvalidValue(f"expected IP:PORT, got {text!r}")
        ip_to_int(ip)
        return cls(ip, check_port(int(port)))

    @classmethod
    def from_key(cls, key: HostKey) -> Host:
        """Build a host from its internal ``(ip as uint32, port)`` form."""
        return cls(int_to_ip(key[0]), check_port(key[1]))

    @property
    def key(self) -> HostKey:
        """The internal ``(ip as uint32, port)`` form."""
        return ip_to_int(self.ip), check_port(self.port)


def host_key(ip: object, port: object) -> HostKey:
    """Validate an ``(ip, port)`` pair from the wire or the store and return it as a key."""
    return check_id(ip, "ip"), check_port(port)


def format_host(key: HostKey) -> str:
    """``(167772161, 7001)`` -> ``"10.0.0.1:7001"``."""
    return f"{socket.inet_ntoa(_pack_ip(key[0]))}:{key[1]}"


# --- scheduling (DESIGN §13) ---------------------------------------------------------------

#: Weight of a host that has none set; 0 drains a host (never chosen).
DEFAULT_WEIGHT = 100
WEIGHT_MAX = 1_000_000
ZONE_MAX_LENGTH = 64
#: The scheduling policies a module may use.
POLICIES = ("rr", "weighted", "p2c", "hash")


class HostMeta(NamedTuple):
    """What a route says about one host besides its address: its ``weight`` (0 = drained)
    and its availability ``zone`` ("" = none)."""

    weight: int = DEFAULT_WEIGHT
    zone: str = ""


def check_weight(value: object) -> int:
    """Return ``value`` if it is a weight from 0 to WEIGHT_MAX, else raise InvalidValue."""
    if type(value) is not int or not 0 <= value <= WEIGHT_MAX:
        raise InvalidValue(f"weight must be an integer from 0 to {WEIGHT_MAX}, got {value!r}")
    return value


def check_zone(value: object) -> str:
    """Return ``value`` if it is a zone label (printable ASCII, at most ZONE_MAX_LENGTH
    characters, "" for none), else raise InvalidValue."""
    if (
        type(value) is not str
        or len(value) > ZONE_MAX_LENGTH
        or not (value.isascii() and (value.isprintable() or not value))
        or value != value.strip()
    ):
        raise InvalidValue(
            f"zone must be printable ASCII of at most {ZONE_MAX_LENGTH} characters"
            f" without surrounding spaces, got {value!r}"
        )
    return value


class PolicySpec(NamedTuple):
    """How one module's healthy hosts share its traffic (DESIGN §13); the agent's
    ``[agent.loadbalance]`` gives the default of modules without their own."""

    #: rr (the §6 round robin), weighted, p2c or hash.
    policy: str = "rr"
    #: Prefer hosts in the agent's own zone while enough of them are healthy.
    zone_affinity: bool = False
    #: Healthy share of the local zone below which traffic spills to other zones.
    zone_failover: float = 0.7
    #: Idle share of all hosts below which all hosts serve (0 = off).
    panic_threshold: float = 0.0
    #: Seconds over which a host that became idle ramps up from 10% of its weight (0 = off).
    slow_start: float = 0.0

    def check(self) -> PolicySpec:
        """Return self if every field is valid, else raise InvalidValue naming it."""
        if self.policy not in POLICIES:
            raise InvalidValue(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if type(self.zone_affinity) is not bool:
            raise InvalidValue("zone_affinity must be true or false")
        for name in ("zone_failover", "panic_threshold"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
                raise InvalidValue(f"{name} must be a number from 0 to 1, got {value!r}")
        if type(self.slow_start) not in (int, float) or not 0.0 <= self.slow_start <= 3600.0:
            raise InvalidValue(f"slow_start must be 0 to 3600 seconds, got {self.slow_start!r}")
        return self


# --- self-registration (DESIGN §14) ---------------------------------------------------------

#: A registration's lease, in whole seconds.
TTL_MIN = 1
TTL_MAX = 3600
#: Longest drain a deregistration may ask for, in milliseconds.
DRAIN_MAX_MS = 3_600_000


def check_ttl(value: object) -> int:
    """Return ``value`` if it is a lease TTL from TTL_MIN to TTL_MAX seconds, else raise
    InvalidValue."""
    if type(value) is not int or not TTL_MIN <= value <= TTL_MAX:
        raise InvalidValue(
            f"ttl must be an integer from {TTL_MIN} to {TTL_MAX} seconds, got {value!r}"
        )
    return value
