"""Finding free loopback ports for tests that need fixed ones."""

from __future__ import annotations

import random
import socket


def free_udp_base(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that ``base .. base + count - 1`` are all free for UDP right now.

    Drawn below the kernel's ephemeral range, so client sockets do not take them meanwhile.
    """
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError("no free UDP port range found")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (below the ephemeral range)."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found")
