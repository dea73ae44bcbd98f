"""Fixtures of the role tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lars.roles import agent as agent_module


@pytest.fixture(params=["compiled", "pure"])
def api_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with the agent's compiled API loop (lars/_udploop.c), then with the
    Python one (LARS_PURE_API_LOOP)."""
    if request.param == "pure":
        monkeypatch.setenv("LARS_PURE_API_LOOP", "1")
    else:
        monkeypatch.delenv("LARS_PURE_API_LOOP", raising=False)
        if not agent_module.COMPILED_LOOP:
            pytest.fail("lars._udploop is not built: `pip install -e .` needs a C compiler")
    yield request.param
