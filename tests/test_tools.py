"""``lars bench`` and ``lars simulate`` (lars.tools) without an agent: a quick, clear failure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lars.cli import main
from tests.netutil import free_udp_base

TIMEOUT = 0.1
RETRIES = 2
#: Generous: the client gives up after (1 + RETRIES) * TIMEOUT = 0.3 s.
BOUND = 3.0


@pytest.fixture
def no_agent_config(tmp_path: Path) -> str:
    """A config whose agent ports are free: nothing answers there."""
    path = tmp_path / "lars.toml"
    path.write_text(
        f"[agent]\nbase_port = {free_udp_base(3)}\n"
        f"[client]\ntimeout = {TIMEOUT}\nretries = {RETRIES}\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "1", "1", "--count", "10"],
        ["bench", "--duration", "0.5"],
        ["bench", "--workers", "2", "--duration", "0.5"],
    ],
    ids=["simulate", "bench", "bench-2-workers"],
)
def test_without_an_agent_fails_fast_with_one_line(
    argv: list[str], no_agent_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code = main([*argv, "--config", no_agent_config])
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "no answer from the agent" in lines[0]
    assert f"after {RETRIES + 1} attempts of {TIMEOUT}s" in lines[0]
    assert elapsed < BOUND
