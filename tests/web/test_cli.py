"""``lars web passwd`` and ``lars web token``: what they print is what the config accepts."""

from __future__ import annotations

import tomllib

from click.testing import CliRunner

from lars.config import config_from_dict
from lars.web.auth import Accounts, verify_password
from lars.web.cli import web


def test_passwd_prints_a_hash_of_the_password_typed_twice() -> None:
    result = CliRunner().invoke(web, ["passwd"], input="a long passphrase\na long passphrase\n")
    assert result.exit_code == 0, result.output
    encoded = result.stdout.strip().splitlines()[-1]
    assert encoded.startswith("scrypt$32768$8$1$")
    assert verify_password("a long passphrase", encoded)
    assert "a long passphrase" not in result.output  # never echoed


def test_passwd_insists_on_the_same_password_twice() -> None:
    result = CliRunner().invoke(
        web,
        ["passwd"],
        input="a long passphrase\nanother one\na long passphrase\na long passphrase\n",
    )
    assert result.exit_code == 0
    assert verify_password("a long passphrase", result.stdout.strip().splitlines()[-1])


def test_passwd_from_stdin_and_too_short() -> None:
    result = CliRunner().invoke(web, ["passwd", "--stdin"], input="from a script\n")
    assert result.exit_code == 0
    encoded = result.stdout.strip()
    assert verify_password("from a script", encoded)
    data = {"web": {"users": [{"name": "ops", "role": "admin", "password_hash": encoded}]}}
    accounts = Accounts(config_from_dict(data).web.users, [])
    assert accounts.login("ops", "from a script") is not None
    short = CliRunner().invoke(web, ["passwd", "--stdin"], input="short\n")
    assert short.exit_code == 1
    assert "at least 8 characters" in short.output


def test_token_prints_the_token_and_a_config_entry_that_accepts_it() -> None:
    result = CliRunner().invoke(web, ["token", 'deploy "bot"', "--role", "admin"])
    assert result.exit_code == 0, result.output
    token = result.stderr.strip().removeprefix("token: ")
    config = config_from_dict(tomllib.loads(result.stdout))  # appends to lars.toml as is
    (configured,) = config.web.tokens
    assert (configured.name, configured.role) == ('deploy "bot"', "admin")
    who = Accounts([], config.web.tokens).bearer(token)
    assert who is not None and who.name == 'deploy "bot"'
