"""The ``lars`` command line. ``main(argv)`` is the testable entry point.

A user mistake (bad address, id out of range, unreachable database, missing tables, bad
config) prints one line on stderr and exits with status 1; click's usage errors exit 2.
Tracebacks are for bugs only.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
import trio

from lars._version import __version__
from lars.config import Config, load_config, store_url
from lars.core.model import UINT32_MAX, Host, HostKey, ModuleKey, format_host
from lars.errors import LarsError
from lars.store import RouteStore, open_store

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _uint32(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Click callback: a decimal unsigned 32-bit id."""
    if value is None:
        return None
    try:
        number = int(value, 10)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an integer") from None
    if not 0 <= number <= UINT32_MAX:
        raise click.BadParameter(f"{number} is out of range (0 to {UINT32_MAX})")
    return number


def _hosts(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[Host]:
    """Click callback: ``IP:PORT`` texts into hosts."""
    try:
        return [Host.parse(value) for value in values]
    except LarsError as exc:
        raise click.BadParameter(str(exc)) from None


def id_argument(name: str, required: bool = True) -> Callable[[F], F]:
    """A MODID/CMDID positional argument."""
    return click.argument(name, required=required, callback=_uint32, metavar=name.upper())


def hosts_argument(required: bool = True) -> Callable[[F], F]:
    """Any number of IP:PORT positional arguments."""
    return click.argument(
        "hosts", nargs=-1, required=required, callback=_hosts, metavar="IP:PORT..."
    )


def fail(message: str) -> NoReturn:
    """Stop with one clear line on stderr and exit status 1."""
    raise click.ClickException(message)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function under trio, turning LarsError into a one-line failure."""
    try:
        return trio.run(fn)
    except LarsError as exc:
        fail(str(exc))


def config_option(fn: F) -> F:
    """``--config PATH``: the config file (default ``./lars.toml`` if present)."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar="LARS_CONFIG",
        help="Config file (default: ./lars.toml if present, else built-in defaults).",
    )(fn)


def store_option(fn: F) -> F:
    """``--store URL``: overrides the config's store (also ``$LARS_STORE``)."""
    return click.option(
        "--store",
        "store_override",
        metavar="URL",
        help="Route store URL, e.g. sqlite:///lars.db or mysql://user:pw@host:3306/lars "
        "(overrides the config and $LARS_STORE).",
    )(fn)


def get_config(config_path: str | None) -> Config:
    """Load the config or fail with one line."""
    try:
        return load_config(config_path)
    except LarsError as exc:
        fail(str(exc))


async def with_store(
    url: str, action: Callable[[RouteStore], Awaitable[T]], *, create: bool = False
) -> T:
    """Open the store, run ``action`` on it, close it."""
    async with open_store(url, create=create) as store:
        return await action(store)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="lars")
def cli() -> None:
    """Lars: service routing and client-side load balancing.

    \b
    Quick start (everything in one process, on ./lars.db):
      lars run
      lars route add 1 1 10.0.0.1:7001 10.0.0.2:7002
      lars query 1 1

    Run `lars COMMAND --help` for the details and examples of each command.
    """


# --- db ------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def db() -> None:
    """Manage the route store's schema."""


@db.command("init", context_settings=CONTEXT)
@config_option
@store_option
def db_init(config_path: str | None, store_override: str | None) -> None:
    """Create the tables and columns Lars needs. Idempotent; never drops data.

    Works on an existing database of the original Lars too: missing tables are created and
    the columns Lars adds are appended.

    \b
    Examples:
      lars db init
      lars db init --store mysql://root@127.0.0.1:3306/lars_dns
    """
    url = store_url(get_config(config_path), store_override)
    done = run_async(functools.partial(with_store, url, lambda s: s.init_schema(), create=True))
    for line in done:
        click.echo(line)
    click.echo(f"store {_display(url)} is ready" + ("" if done else " (nothing to do)"))


def _display(url: str) -> str:
    return open_store(url).display_url


# --- route ---------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def route() -> None:
    """Add, remove and list the hosts of modules in the route store."""


def _keys(hosts: Sequence[Host]) -> list[HostKey]:
    return [h.key for h in hosts]


def _report_write(verb: str, module: ModuleKey, count: int, version: int | None) -> None:
    modid, cmdid = module
    if version is None:
        click.echo(f"module {modid}/{cmdid}: nothing to change")
    else:
        click.echo(f"module {modid}/{cmdid}: {verb} {count} host(s), route version {version}")


@route.command("add", context_settings=CONTEXT)
@id_argument("modid")
@id_argument("cmdid")
@hosts_argument()
@config_option
@store_option
def route_add(
    modid: int,
    cmdid: int,
    hosts: list[Host],
    config_path: str | None,
    store_override: str | None,
) -> None:
    """Add hosts (IP:PORT) to module MODID/CMDID. Hosts already present are left alone.

    \b
    Example:
      lars route add 1 1 10.0.0.1:7001 10.0.0.2:7001
    """
    url = store_url(get_config(config_path), store_override)
    module = (modid, cmdid)

    result = run_async(
        functools.partial(with_store, url, lambda s: s.add_hosts(module, _keys(hosts)))
    )
    _report_write("added", module, result.added, result.version)


@route.command("rm", context_settings=CONTEXT)
@id_argument("modid")
@id_argument("cmdid")
@hosts_argument(required=False)
@click.option("--all", "remove_all", is_flag=True, help="Remove every host of the module.")
@config_option
@store_option
def route_rm(
    modid: int,
    cmdid: int,
    hosts: list[Host],
    remove_all: bool,
    config_path: str | None,
    store_override: str | None,
) -> None:
    """Remove hosts (IP:PORT) from module MODID/CMDID, or all of them with --all.

    \b
    Examples:
      lars route rm 1 1 10.0.0.2:7001
      lars route rm 1 1 --all
    """
    if remove_all == bool(hosts):
        raise click.UsageError("give the hosts to remove, or --all (not both)")
    url = store_url(get_config(config_path), store_override)
    module = (modid, cmdid)

    targets = None if remove_all else _keys(hosts)
    result = run_async(
        functools.partial(with_store, url, lambda s: s.remove_hosts(module, targets))
    )
    _report_write("removed", module, result.removed, result.version)


@route.command("ls", context_settings=CONTEXT)
@id_argument("modid", required=False)
@id_argument("cmdid", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of modules.")
@config_option
@store_option
def route_ls(
    modid: int | None,
    cmdid: int | None,
    as_json: bool,
    config_path: str | None,
    store_override: str | None,
) -> None:
    """List routes: every module, one MODID, or one module MODID CMDID.

    \b
    Examples:
      lars route ls
      lars route ls 1 --json
    JSON: [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", ...]}, ...]
    """
    url = store_url(get_config(config_path), store_override)
    routes = run_async(functools.partial(with_store, url, lambda s: s.list_routes(modid, cmdid)))
    if as_json:
        out = [
            {"modid": m, "cmdid": c, "hosts": [format_host(h) for h in hosts]}
            for (m, c), hosts in routes.items()
        ]
        click.echo(json.dumps(out))
        return
    if not routes:
        click.echo("no routes")
        return
    click.echo(f"{'MODID':>10} {'CMDID':>10}  HOSTS")
    for (m, c), hosts in routes.items():
        click.echo(f"{m:>10} {c:>10}  {' '.join(format_host(h) for h in hosts)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="lars", standalone_mode=False
        )
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
