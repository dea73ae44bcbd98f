"""The exception hierarchy: one root, :class:`LarsError`, for everything Lars raises on purpose.

Local mistakes (bad config, bad input values) and remote conditions (no route, agent gone,
store unreachable) are distinct subclasses, so callers can catch exactly what they handle.
OS and library errors are translated into these at the edge where they occur.
"""

from __future__ import annotations


class LarsError(Exception):
    """Root of every error Lars raises on purpose."""


class ConfigError(LarsError):
    """The configuration file or a command-line setting is invalid."""


class InvalidValue(LarsError, ValueError):
    """A value is out of range or badly formed (a modid over 2**32-1, port 0, a bad address)."""


class ShrinkRefused(InvalidValue):
    """A route write would remove more than half of a module's hosts, or all of them, and
    was not forced (DESIGN §13): nothing was written. ``shrinks`` holds ``(module, hosts it
    had, hosts it would lose)`` of each such module."""

    def __init__(self, message: str, shrinks: tuple[tuple[tuple[int, int], int, int], ...]):
        super().__init__(message)
        self.shrinks = shrinks


class ProtocolError(LarsError):
    """Bytes from the network could not be decoded into a valid Lars message.

    ``msg_type`` and ``seq`` are set when the frame was well formed enough to tell which
    request it was, so a server can still send an error reply to the right caller.
    """

    def __init__(self, message: str, *, msg_type: int | None = None, seq: int | None = None):
        super().__init__(message)
        self.msg_type = msg_type
        self.seq = seq


class StoreError(LarsError):
    """The route store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, lost, timed out)."""


class StoreConflict(StoreUnavailable):
    """A transaction kept losing to concurrent ones (deadlock, lock-wait timeout, a Galera
    certification failure) after its bounded re-runs: worth trying again later."""


class SchemaMissing(StoreError):
    """The store is reachable but its tables have not been created (run ``lars db init``)."""


class NoRoute(LarsError):
    """The module has no route: it does not exist, or the agent has not received it yet."""


class Overloaded(LarsError):
    """Every host of the module is overloaded; the agent gave no host this time."""


class AgentUnavailable(LarsError):
    """The local agent did not answer in time after the configured retries."""


class RequestRejected(LarsError):
    """The agent or DNS answered the request with an error (for example an invalid id)."""
