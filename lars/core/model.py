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
