"""``lars web ...``: make the password hashes and API tokens that ``[web]`` holds.

``lars.cli`` registers the group: ``from lars.web.cli import web; cli.add_command(web)``.
"""

from __future__ import annotations

import json
import sys

import click

from lars.web.auth import hash_password, hash_token, new_token

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: Shortest password accepted.
PASSWORD_MIN = 8


@click.group(context_settings=CONTEXT)
def web() -> None:
    """Console accounts: password hashes and API tokens for [web] in lars.toml."""


@web.command("passwd", context_settings=CONTEXT)
@click.option(
    "--stdin",
    "from_stdin",
    is_flag=True,
    help="Read the password from the first line of standard input (for scripts).",
)
def passwd(from_stdin: bool) -> None:
    """Print the scrypt hash of a password, for a [[web.users]] password_hash.

    The password is asked twice without echo (or read from stdin with --stdin); the hash
    has a random salt, so the same password hashes differently every time.

    \b
    Example:
      lars web passwd
      # then in lars.toml:
      [[web.users]]
      name = "alice"
      role = "admin"            # or "viewer"
      password_hash = "scrypt$32768$8$1$..."
    """
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Again", err=True)
    if len(password) < PASSWORD_MIN:
        raise click.ClickException(f"the password must have at least {PASSWORD_MIN} characters")
    click.echo(hash_password(password))


@web.command("token", context_settings=CONTEXT)
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "admin"]), default="viewer", show_default=True)
def token(name: str, role: str) -> None:
    """Make a new API token for NAME: prints the token (give it to the client, it is not
    stored anywhere) and the [[web.tokens]] entry holding its hash.

    \b
    Example:
      lars web token deploy-bot --role admin
      curl -H "Authorization: Bearer TOKEN" http://127.0.0.1:7780/api/v1/modules
    """
    secret = new_token()
    click.echo(f"token: {secret}", err=True)
    click.echo(
        f"[[web.tokens]]\nname = {json.dumps(name)}\nrole = {json.dumps(role)}\n"
        f"token_hash = {json.dumps(hash_token(secret))}"
    )
