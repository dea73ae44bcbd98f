"""Lars: service routing and client-side load balancing (L5 style) on Trio.

The public surface is this package's ``__all__`` and :mod:`lars.client`; every other module
is internal and may change.
"""

from lars._version import __version__
from lars.core.model import Host
from lars.errors import (
    AgentUnavailable,
    ConfigError,
    InvalidValue,
    LarsError,
    NoRoute,
    Overloaded,
    ProtocolError,
    RequestRejected,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "AgentUnavailable",
    "ConfigError",
    "Host",
    "InvalidValue",
    "LarsError",
    "NoRoute",
    "Overloaded",
    "ProtocolError",
    "RequestRejected",
    "SchemaMissing",
    "StoreError",
    "StoreUnavailable",
    "__version__",
]
