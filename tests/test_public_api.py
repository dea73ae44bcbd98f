"""The deliberate public surface: ``lars`` and ``lars.client``. Changing it is a decision."""

from __future__ import annotations

import lars


def test_lars_exports_exactly_the_public_names() -> None:
    assert sorted(lars.__all__) == [
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
    for name in lars.__all__:
        assert hasattr(lars, name)


def test_every_error_has_one_root() -> None:
    for name in lars.__all__:
        obj = getattr(lars, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, lars.LarsError)


def test_lars_client_exports_exactly_the_public_names() -> None:
    import lars.client

    assert sorted(lars.client.__all__) == [
        "AsyncLarsClient",
        "AsyncRegistration",
        "Host",
        "LarsClient",
        "Registration",
    ]
    for name in lars.client.__all__:
        assert hasattr(lars.client, name)
