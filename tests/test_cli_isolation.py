"""The guard in tests/conftest.py: no test reads the working directory's lars.toml or lars.db,
the developer's $LARS_CONFIG or $LARS_STORE, or connects to a default port of a real Lars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from lars.cli import main
from lars.config import STORE_ENV, Config, load_config, parse_address
from lars.roles.common import notify_dns

REPOSITORY = Path(__file__).resolve().parent.parent
_seen_workdirs: set[Path] = set()


@pytest.mark.parametrize("attempt", [1, 2])
def test_every_test_runs_in_an_empty_directory_of_its_own(attempt: int) -> None:
    cwd = Path.cwd()
    assert cwd != REPOSITORY and REPOSITORY not in cwd.parents
    assert list(cwd.iterdir()) == []
    assert cwd not in _seen_workdirs
    _seen_workdirs.add(cwd)


def test_the_config_comes_from_the_defaults_not_a_local_file() -> None:
    assert (REPOSITORY / "lars.toml").is_file()  # what a test run from the repository would see
    assert load_config() == Config()
    assert "LARS_CONFIG" not in os.environ and STORE_ENV not in os.environ


def test_the_default_store_is_looked_for_in_the_tests_own_directory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["route", "ls"]) == 1
    err = capsys.readouterr().err
    assert f"no SQLite database at {Path.cwd() / 'lars.db'}" in err
    assert not (Path.cwd() / "lars.db").exists()


async def test_default_ports_are_refused_in_process() -> None:
    defaults = Config()
    for address in (defaults.dns.listen, defaults.reporter.listen):
        with pytest.raises(OSError, match="tests must not connect to a default port"):
            await trio.open_tcp_stream(*parse_address(address))
    (failure,) = await notify_dns([defaults.dns.listen], version=1)
    assert "default port" in failure
