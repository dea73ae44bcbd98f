"""The ``lars`` command line. ``main(argv)`` is the testable entry point.

A user mistake (bad address, id out of range, unreachable database, missing tables, bad
config) prints one line on stderr and exits with status 1; click's usage errors exit 2.
Tracebacks are for bugs only.
"""

from __future__ import annotations

import datetime
import functools
import getpass
import json
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio

from lars import routes_io, tools, wire
from lars._version import __version__
from lars.client import AsyncLarsClient
from lars.config import Config, load_config, parse_address, store_url
from lars.core.model import (
    POLICIES,
    UINT32_MAX,
    WEIGHT_MAX,
    Host,
    HostKey,
    HostMeta,
    ModuleKey,
    PolicySpec,
    check_weight,
    check_zone,
    format_host,
    int_to_ip,
)
from lars.errors import AgentUnavailable, InvalidValue, LarsError, ShrinkRefused
from lars.registry import RegistrationSpec, drain_ms, registration_spec, renew_interval
from lars.roles.common import RECEIVE_SIZE, ask, connect_tls, notify_dns
from lars.roles.run import ROLES
from lars.store import (
    ACTOR_NAME_MAX,
    PAGE_MAX,
    Actor,
    CallStatus,
    RouteStore,
    RouteWrite,
    open_store,
)
from lars.tls import TlsContexts, TlsRefused, contexts_for, refusal_hint
from lars.tls_cli import tls as tls_group
from lars.web.cli import web as web_group

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


_NEGATIVE_NUMBER = re.compile(r"-\d+")


class IdCommand(click.Command):
    """A command with MODID/CMDID arguments. Click takes an argument such as ``-1`` for an
    option and would say "No such option"; here it reaches the id's own check, which says
    that it is out of range."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, list(args))  # a copy: the parser consumes it
        except click.NoSuchOption as exc:
            if not _NEGATIVE_NUMBER.fullmatch(exc.option_name):
                raise
        # Parse again with unknown options left in place as arguments: the negative number
        # lands in its argument, whose callback refuses it by name.
        ctx.ignore_unknown_options = True
        return super().parse_args(ctx, args)


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
    """Run a coroutine function under trio, turning LarsError into a one-line failure
    (also when it comes out of a nursery, wrapped in exception groups)."""
    try:
        return trio.run(fn)
    except LarsError as exc:
        fail(str(exc))
    except BaseExceptionGroup as group:
        error = _only_lars_error(group)
        if error is None:
            raise
        fail(str(error))


def _only_lars_error(group: BaseExceptionGroup[BaseException]) -> LarsError | None:
    """The first LarsError of a group whose every leaf is a LarsError (else None)."""
    rest = group.split(LarsError)[1]
    if rest is not None:
        return None
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, LarsError) else None


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

    async def init(store: RouteStore) -> tuple[list[str], int]:
        done = await store.init_schema()
        plan = await store.plan_upgrade()
        return done, len(plan.steps) + len(plan.blockers)

    done, more = run_async(functools.partial(with_store, url, init, create=True))
    for line in done:
        click.echo(line)
    click.echo(f"store {_display(url)} is ready" + ("" if done else " (nothing to do)"))
    if more:
        click.echo(
            f"note: {more} more change(s), such as wider columns or keys, would bring it to"
            " Lars's schema: see `lars db upgrade --dry-run`"
        )


@db.command("upgrade", context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@config_option
@store_option
def db_upgrade(config_path: str | None, store_override: str | None, dry_run: bool) -> None:
    """Bring an existing database to Lars's schema, printing every statement as it runs.

    Creates missing tables, appends missing columns (with their defaults), widens the
    integer columns of the original Lars schema that are too narrow for Lars's values
    (signed ServerCallStatus.modid/cmdid/ip cannot hold ids above 2147483647 or addresses
    such as 192.168.1.177) and adds missing keys, among them the unique key on a route's
    (modid, cmdid, serverip, serverport): repeated rows, identical to the one kept, are
    removed first. Never drops data: if a column holds a value its wider type cannot, nothing
    is changed and the values are named. Idempotent: a second run has nothing to do.

    \b
    Examples:
      lars db upgrade --store mysql://root@127.0.0.1:3306/lars_dns --dry-run
      lars db upgrade --store mysql://root@127.0.0.1:3306/lars_dns
    """
    url = store_url(get_config(config_path), store_override)

    async def upgrade(store: RouteStore) -> int:
        plan = await store.plan_upgrade()
        if plan.blockers:
            fail(
                f"cannot upgrade {store.display_url}, nothing was changed: "
                + "; ".join(plan.blockers)
            )
        for step in plan.steps:
            click.echo(f"-- {step.description}")
            for statement in step.statements:
                click.echo(f"{statement};")
            if not dry_run:
                await store.apply_upgrade(step)
        return len(plan.steps)

    changes = run_async(functools.partial(with_store, url, upgrade))
    if not changes:
        click.echo(f"store {_display(url)} is up to date (nothing to do)")
    elif dry_run:
        click.echo(f"dry run: store {_display(url)} would get {changes} change(s); none was made")
    else:
        click.echo(f"store {_display(url)} upgraded ({changes} change(s))")


def _display(url: str) -> str:
    return open_store(url).display_url


# --- route ---------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def route() -> None:
    """Add, remove, list, export and import the hosts of modules in the route store.

    Every write is recorded in the audit log (RouteAudit) as made by cli:USER@HOST.
    """


def _keys(hosts: Sequence[Host]) -> list[HostKey]:
    return [h.key for h in hosts]


def cli_actor() -> Actor:
    """Who a route write made with this command line is recorded as: ``cli:USER@HOST``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment and no passwd entry
        user = "unknown"
    return Actor(f"cli:{user}@{socket.gethostname()}"[:ACTOR_NAME_MAX], "cli")


def admin_tls(config: Config) -> TlsContexts | None:
    """The CLI's TLS identity (an ``admin`` certificate) under ``[tls] mode = "on"``."""
    try:
        return contexts_for(config.tls, "admin")
    except LarsError as exc:
        fail(str(exc))


def notify_after_write(config: Config, version: int) -> None:
    """Tell the DNS instances of a committed write (best effort: DNS polls as a fallback)."""
    try:
        tls = contexts_for(config.tls, "admin")
    except LarsError as exc:  # the write is committed: say so, and that DNS will poll
        click.echo(f"warning: cannot notify DNS ({exc}); it will notice by polling", err=True)
        return
    notify = functools.partial(notify_dns, tls=tls)
    for failure in trio.run(notify, config.agent.dns, version):
        click.echo(f"warning: could not notify DNS {failure}; it will notice by polling", err=True)


def write_routes(
    config_path: str | None,
    store_override: str | None,
    notify: bool,
    verb: str,
    module: ModuleKey,
    write: Callable[[RouteStore], Awaitable[RouteWrite]],
) -> None:
    """Run a route write, say what it did, then tell the DNS instances (best effort)."""
    config = get_config(config_path)
    url = store_url(config, store_override)
    result = run_async(functools.partial(with_store, url, refuse_shrink(write)))
    modid, cmdid = module
    if result.version is None:
        click.echo(f"module {modid}/{cmdid}: nothing to change")
        return
    count = {"added": result.added, "removed": result.removed}.get(verb, result.updated)
    also = f", updated {result.updated}" if result.updated and verb != "updated" else ""
    click.echo(
        f"module {modid}/{cmdid}: {verb} {count} host(s){also}, route version {result.version}"
    )
    if notify:
        notify_after_write(config, result.version)


def refuse_shrink(
    write: Callable[[RouteStore], Awaitable[T]],
) -> Callable[[RouteStore], Awaitable[T]]:
    """``write``, whose refusal for removing too many hosts says how to force it."""

    async def guarded(store: RouteStore) -> T:
        try:
            return await write(store)
        except ShrinkRefused as exc:
            raise LarsError(f"{exc}; add --force to write it anyway") from None

    return guarded


def force_option(fn: F) -> F:
    """``--force``: let a write remove more than half of a module's hosts (DESIGN §13)."""
    return click.option(
        "--force",
        is_flag=True,
        help="Write even if it removes more than half of a module's hosts, or all of them "
        "(refused without it, and nothing is written).",
    )(fn)


def meta_options(fn: F) -> F:
    """``--weight N`` and ``--zone Z`` of a host (DESIGN §13)."""
    fn = click.option(
        "--zone",
        metavar="Z",
        help='Availability zone of the hosts ("" for none; printable ASCII, at most 64).',
    )(fn)
    return click.option(
        "--weight",
        type=int,
        metavar="N",
        help=f"Weight of the hosts, 0 (drained: never chosen) to {WEIGHT_MAX}; default 100.",
    )(fn)


def _checked_meta(weight: int | None, zone: str | None) -> tuple[int | None, str | None]:
    try:
        return (
            None if weight is None else check_weight(weight),
            None if zone is None else check_zone(zone),
        )
    except InvalidValue as exc:
        raise click.BadParameter(str(exc)) from None


def notify_option(fn: F) -> F:
    """``--notify/--no-notify``: tell the configured DNS instances after a write."""
    return click.option(
        "--notify/--no-notify",
        default=True,
        help="After the write, tell the DNS instances of [agent] dns to check now "
        "(default: on; DNS also polls, so a DNS that is down does not fail the write).",
    )(fn)


@route.command("add", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@hosts_argument()
@meta_options
@config_option
@store_option
@notify_option
def route_add(
    modid: int,
    cmdid: int,
    hosts: list[Host],
    weight: int | None,
    zone: str | None,
    config_path: str | None,
    store_override: str | None,
    notify: bool,
) -> None:
    """Add hosts (IP:PORT) to module MODID/CMDID. Hosts already present are left alone,
    but take the --weight and --zone given.

    \b
    Examples:
      lars route add 1 1 10.0.0.1:7001 10.0.0.2:7001
      lars route add 1 1 10.0.0.3:7001 --weight 50 --zone eu-1
    """
    module = (modid, cmdid)
    weight, zone = _checked_meta(weight, zone)
    keys = _keys(hosts)

    async def write(store: RouteStore) -> RouteWrite:
        meta = None
        if weight is not None or zone is not None:
            current = (await store.list_route_meta(modid, cmdid)).get(module, {})
            meta = {}
            for key in keys:
                old = current.get(key, HostMeta())
                meta[key] = HostMeta(
                    old.weight if weight is None else weight, old.zone if zone is None else zone
                )
        return await store.add_hosts(module, keys, meta=meta, actor=cli_actor())

    write_routes(config_path, store_override, notify, "added", module, write)


@route.command("set", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@click.argument("host", callback=lambda c, p, v: _hosts(c, p, (v,))[0], metavar="IP:PORT")
@meta_options
@config_option
@store_option
@notify_option
def route_set(
    modid: int,
    cmdid: int,
    host: Host,
    weight: int | None,
    zone: str | None,
    config_path: str | None,
    store_override: str | None,
    notify: bool,
) -> None:
    """Set the weight and/or the zone of host IP:PORT of module MODID/CMDID (DESIGN §13).

    A change is a route change: the version rises, DNS pushes it, the audit log has it.

    \b
    Examples:
      lars route set 1 1 10.0.0.1:7001 --weight 0        # drain it
      lars route set 1 1 10.0.0.1:7001 --weight 200 --zone eu-2
    """
    if weight is None and zone is None:
        raise click.UsageError("give --weight, --zone or both")
    weight, zone = _checked_meta(weight, zone)
    module = (modid, cmdid)
    write_routes(
        config_path,
        store_override,
        notify,
        "updated",
        module,
        lambda store: store.set_host_meta(
            module, host.key, weight=weight, zone=zone, actor=cli_actor()
        ),
    )


@route.command("rm", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@hosts_argument(required=False)
@click.option("--all", "remove_all", is_flag=True, help="Remove every host of the module.")
@force_option
@config_option
@store_option
@notify_option
def route_rm(
    modid: int,
    cmdid: int,
    hosts: list[Host],
    remove_all: bool,
    force: bool,
    config_path: str | None,
    store_override: str | None,
    notify: bool,
) -> None:
    """Remove hosts (IP:PORT) from module MODID/CMDID, or all of them with --all.

    Removing more than half of the module's hosts, or all of them, needs --force.

    \b
    Examples:
      lars route rm 1 1 10.0.0.2:7001
      lars route rm 1 1 --all --force
    """
    if remove_all == bool(hosts):
        raise click.UsageError("give the hosts to remove, or --all (not both)")
    module = (modid, cmdid)
    targets = None if remove_all else _keys(hosts)
    write_routes(
        config_path,
        store_override,
        notify,
        "removed",
        module,
        lambda store: store.remove_hosts(module, targets, actor=cli_actor(), force=force),
    )


@route.command("ls", context_settings=CONTEXT, cls=IdCommand)
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


@route.command("export", context_settings=CONTEXT)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(routes_io.FORMATS),
    default="json",
    show_default=True,
    help='json: {"routes": [{"modid", "cmdid", "hosts": ["IP:PORT", ...]}]};'
    " csv: modid,cmdid,ip,port, one row per host.",
)
@config_option
@store_option
def route_export(fmt: str, config_path: str | None, store_override: str | None) -> None:
    """Print every route, sorted, in a file format `lars route import` reads back.

    \b
    Examples:
      lars route export > routes.json
      lars route export --format csv > routes.csv
    """
    url = store_url(get_config(config_path), store_override)

    async def read(store: RouteStore) -> str:
        meta = await store.list_route_meta()
        policies = await store.list_policies()
        return routes_io.export_routes(meta, fmt, meta, policies)

    click.echo(run_async(functools.partial(with_store, url, read)), nl=False)


def _read_routes(path: str, fmt: str | None) -> routes_io.RouteFile:
    """Parse a routes file (``-`` for stdin), or fail with one line naming the problem."""
    if fmt is None:
        fmt = Path(path).suffix.lower().lstrip(".")
        if fmt not in routes_io.FORMATS:
            raise click.UsageError(
                f"cannot tell the format of {path!r} from its name: give --format json or csv"
            )
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                data = file.read()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    try:
        return routes_io.parse_route_file(data.decode("utf-8"), fmt)
    except UnicodeDecodeError as exc:
        fail(f"{path}: not UTF-8 text (byte {exc.start}); nothing was written")
    except LarsError as exc:
        fail(f"{path}: {exc}; nothing was written")


@route.command("import", context_settings=CONTEXT)
@click.argument("path", metavar="FILE")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(routes_io.FORMATS),
    help="The file's format (default: from its extension, .json or .csv).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Make the store's routes exactly the file's: hosts and modules not in the file are "
    "removed. Without it, the file's hosts are added and nothing is removed.",
)
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@force_option
@config_option
@store_option
@notify_option
def route_import(
    path: str,
    fmt: str | None,
    replace: bool,
    dry_run: bool,
    force: bool,
    config_path: str | None,
    store_override: str | None,
    notify: bool,
) -> None:
    """Add the routes of FILE (- for stdin), as `lars route export` writes them, in one
    transaction; with --replace, make the routes exactly FILE's.

    The whole file is checked first: a malformed file (bad IP:PORT, an id out of range, a
    missing field, a module or host given twice, a bad weight, zone or policy) is one error
    naming the line or entry, and nothing is written. Weights, zones and policies in the
    file are written too; a file without any (an older export) leaves the store's alone. A
    --replace that removes more than half of a module's hosts, or all, needs --force.

    \b
    Examples:
      lars route import routes.json --dry-run     # +IP:PORT added, -IP:PORT removed
      lars route import routes.json
      lars route export > backup.json && lars route import new.csv --replace
    """
    parsed = _read_routes(path, fmt)
    routes = parsed.routes
    config = get_config(config_path)
    url = store_url(config, store_override)

    if dry_run:

        async def plan(store: RouteStore) -> tuple[list[routes_io.RouteDiff], list[str]]:
            current = await store.list_routes()
            wanted = routes if replace else routes_io.merge_routes(current, routes)
            other: list[str] = []
            if parsed.meta is not None or parsed.policies is not None:
                meta, policies = await store.list_route_meta(), await store.list_policies()
                other = routes_io.diff_meta(meta, policies, parsed, replace)
            return routes_io.diff_routes(current, wanted), other

        changes, other = run_async(functools.partial(with_store, url, plan))
        for line in [*routes_io.format_diff(changes), *other]:
            click.echo(line)
        added = sum(len(a) for _, a, _ in changes)
        removed = sum(len(r) for _, _, r in changes)
        more = f", {len(other)} weight, zone or policy change(s)" if other else ""
        click.echo(
            f"dry run: {len(changes)} module(s) would change, {added} host(s) added,"
            f" {removed} removed{more}; nothing was written"
        )
        return

    async def write(store: RouteStore) -> RouteWrite:
        if replace:
            return await store.replace_routes(
                routes,
                meta=parsed.meta,
                policies=parsed.policies,
                actor=cli_actor(),
                force=force,
            )
        return await store.change_routes(
            add=routes, meta=parsed.meta, policies=parsed.policies, actor=cli_actor()
        )

    result = run_async(functools.partial(with_store, url, refuse_shrink(write)))
    if result.version is None:
        click.echo(f"imported {path}: nothing to change")
        return
    updated = f", {result.updated} updated" if result.updated else ""
    click.echo(
        f"imported {path}: {len(result.modules)} module(s) changed, {result.added} host(s)"
        f" added, {result.removed} removed{updated}, route version {result.version}"
    )
    if notify:
        notify_after_write(config, result.version)


@route.command("confirm", context_settings=CONTEXT)
@click.option(
    "--dns",
    "dns_addresses",
    multiple=True,
    metavar="HOST:PORT",
    help="The DNS to confirm at; repeat for several (default: every one of [agent] dns).",
)
@click.option(
    "--version",
    "held_version",
    type=int,
    default=0,
    help="Release only if this is the route version held (default: whatever is held).",
)
@config_option
def route_confirm(
    dns_addresses: tuple[str, ...], held_version: int, config_path: str | None
) -> None:
    """Serve a route reload a DNS holds back now (DESIGN §13).

    A DNS whose reload would remove more than [dns] shrink_guard of all hosts at once
    (a truncated table, a bad import) keeps serving the previous routes until the loss has
    persisted [dns] shrink_hold seconds; this confirms the loss is meant. An admin request
    (TLS on: the CLI's admin certificate). `lars stats --dns ADDR` shows shrink_held.

    \b
    Example:
      lars route confirm --dns 10.0.0.5:7778
    """
    config = get_config(config_path)
    tls = admin_tls(config)
    addresses = list(dns_addresses) or config.agent.dns
    if held_version < 0:
        raise click.BadParameter("the version must be 0 or more", param_hint="--version")

    async def confirm() -> list[tuple[str, wire.Message]]:
        replies = []
        for address in addresses:
            msg = wire.ShrinkConfirm(1, held_version)
            replies.append((address, await ask(address, msg, tls=tls, expect="dns")))
        return replies

    failed = False
    for address, reply in run_async(confirm):
        if not isinstance(reply, wire.StatsResponse):
            reason = reply.reason if isinstance(reply, wire.ErrorReply) else type(reply).__name__
            click.echo(f"dns {address}: refused: {reason}", err=True)
            failed = True
            continue
        counters = reply.counters
        version = int(counters.get("route_version", 0))
        if counters.get("shrink_held"):
            held = int(counters.get("held_version", 0))
            click.echo(
                f"dns {address}: still holding route version {held} (not version"
                f" {held_version}); serving {version}"
            )
        else:
            click.echo(f"dns {address}: nothing held; serving route version {version}")
    if failed:
        sys.exit(1)


# --- policy ----------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def policy() -> None:
    """Give modules their own scheduling policy (DESIGN §13), show it, remove it.

    A module without one uses the agents' [agent.loadbalance]. A change is a route change:
    the version rises, DNS pushes it to the agents, the audit log has it.
    """


def _policy_json(module: ModuleKey, spec: PolicySpec | None) -> dict[str, Any]:
    return {
        "modid": module[0],
        "cmdid": module[1],
        "policy": None if spec is None else spec._asdict(),
    }


def _policy_text(spec: PolicySpec | None) -> str:
    if spec is None:
        return "none (the agents' [agent.loadbalance] applies)"
    parts = [spec.policy]
    if spec.zone_affinity:
        parts.append(f"zone affinity (failover below {spec.zone_failover:g})")
    if spec.panic_threshold:
        parts.append(f"panic below {spec.panic_threshold:g}")
    if spec.slow_start:
        parts.append(f"slow start {spec.slow_start:g} s")
    return ", ".join(parts)


@policy.command("set", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@click.option("--policy", "name", type=click.Choice(POLICIES), help="The policy (default rr).")
@click.option(
    "--zone-affinity/--no-zone-affinity",
    default=None,
    help="Prefer hosts in the agent's own zone.",
)
@click.option("--zone-failover", type=float, metavar="F", help="0 to 1 (default 0.7).")
@click.option("--panic-threshold", type=float, metavar="F", help="0 (off) to 1.")
@click.option("--slow-start", type=float, metavar="S", help="Seconds, 0 (off) to 3600.")
@config_option
@store_option
@notify_option
def policy_set(
    modid: int,
    cmdid: int,
    name: str | None,
    zone_affinity: bool | None,
    zone_failover: float | None,
    panic_threshold: float | None,
    slow_start: float | None,
    config_path: str | None,
    store_override: str | None,
    notify: bool,
) -> None:
    """Set the policy of module MODID/CMDID: the options given change the module's policy
    (or the defaults, if it has none); the others stay.

    \b
    Examples:
      lars policy set 1 1 --policy weighted
      lars policy set 1 1 --zone-affinity --zone-failover 0.5 --panic-threshold 0.3
    """
    module = (modid, cmdid)
    given = {
        "policy": name,
        "zone_affinity": zone_affinity,
        "zone_failover": zone_failover,
        "panic_threshold": panic_threshold,
        "slow_start": slow_start,
    }
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if not changes:
        raise click.UsageError("give at least one of the policy's options")
    config = get_config(config_path)

    async def write(store: RouteStore) -> tuple[PolicySpec, RouteWrite]:
        spec = (await store.get_policy(module) or PolicySpec())._replace(**changes)
        return spec, await store.set_policy(module, spec, actor=cli_actor())

    url = store_url(config, store_override)
    spec, result = run_async(functools.partial(with_store, url, write))
    if result.version is None:
        click.echo(f"module {modid}/{cmdid}: policy unchanged: {_policy_text(spec)}")
        return
    click.echo(
        f"module {modid}/{cmdid}: policy {_policy_text(spec)}, route version {result.version}"
    )
    if notify:
        notify_after_write(config, result.version)


@policy.command("show", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid", required=False)
@id_argument("cmdid", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@store_option
def policy_show(
    modid: int | None,
    cmdid: int | None,
    as_json: bool,
    config_path: str | None,
    store_override: str | None,
) -> None:
    """Show the policy of module MODID/CMDID with its hosts' weights and zones, or every
    module's own policy.

    \b
    Examples:
      lars policy show 1 1
      lars policy show --json
    JSON of one module: {"modid", "cmdid", "policy": {...} or null,
    "hosts": [{"host": "IP:PORT", "weight": 100, "zone": ""}, ...]}
    """
    if (modid is None) != (cmdid is None):
        raise click.UsageError("give MODID and CMDID, or neither")
    url = store_url(get_config(config_path), store_override)
    if modid is None or cmdid is None:
        policies = run_async(functools.partial(with_store, url, lambda s: s.list_policies()))
        if as_json:
            click.echo(json.dumps([_policy_json(m, p) for m, p in sorted(policies.items())]))
        elif not policies:
            click.echo("no module has its own policy")
        for (m, c), own in sorted(policies.items()):
            if not as_json:
                click.echo(f"{m}/{c}: {_policy_text(own)}")
        return
    module = (modid, cmdid)

    async def read(store: RouteStore) -> tuple[PolicySpec | None, dict[HostKey, HostMeta]]:
        spec = await store.get_policy(module)
        hosts = (await store.list_route_meta(modid, cmdid)).get(module, {})
        return spec, hosts

    spec, hosts = run_async(functools.partial(with_store, url, read))
    if as_json:
        out = _policy_json(module, spec)
        out["hosts"] = [
            {"host": format_host(h), "weight": m.weight, "zone": m.zone} for h, m in hosts.items()
        ]
        click.echo(json.dumps(out))
        return
    click.echo(f"module {modid}/{cmdid}: policy {_policy_text(spec)}")
    for host, meta in hosts.items():
        zone = f" zone {meta.zone}" if meta.zone else ""
        drained = " (drained)" if meta.weight == 0 else ""
        click.echo(f"  {format_host(host)} weight {meta.weight}{drained}{zone}")


@policy.command("rm", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@config_option
@store_option
@notify_option
def policy_rm(
    modid: int,
    cmdid: int,
    config_path: str | None,
    store_override: str | None,
    notify: bool,
) -> None:
    """Remove the module's own policy: the agents' [agent.loadbalance] applies again."""
    module = (modid, cmdid)
    config = get_config(config_path)
    url = store_url(config, store_override)
    result = run_async(
        functools.partial(with_store, url, lambda s: s.set_policy(module, None, actor=cli_actor()))
    )
    if result.version is None:
        click.echo(f"module {modid}/{cmdid}: has no policy of its own")
        return
    click.echo(f"module {modid}/{cmdid}: policy removed, route version {result.version}")
    if notify:
        notify_after_write(config, result.version)


# --- run -----------------------------------------------------------------------------------


@cli.command("run", context_settings=CONTEXT)
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLES),
    help="Role to run; repeat for several. Default: every role, in this process.",
)
@config_option
@store_option
def run_command(
    roles: tuple[str, ...], config_path: str | None, store_override: str | None
) -> None:
    """Run Lars daemons: dns, reporter, agent and/or web (the console).

    With no --role, every role runs in one process on the configured store (the embedded
    SQLite ./lars.db by default, created with its tables if missing). Ctrl-C stops cleanly.

    \b
    Examples:
      lars run                                   # everything, one process, ./lars.db
      lars run --role dns --role reporter --store mysql://root@db:3306/lars_dns
      lars run --role agent --config /etc/lars.toml   # on every host
    """
    config = get_config(config_path)
    setup_logging(config.log.level, config.log.format)
    from lars.roles.run import run_roles

    run_async(functools.partial(run_roles, config, roles or ROLES, store_override=store_override))


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr with a timestamp, the level and the logger's name: one line per
    record (``text``), or one JSON object per line with the same fields (``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, and ``exception`` when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


# --- query ---------------------------------------------------------------------------------


def _route_line(msg: wire.GetRouteResponse, as_json: bool) -> str:
    hosts = [format_host(h) for h in sorted(msg.hosts)]
    now = time.time()
    if as_json:
        return json.dumps({"ts": now, "modid": msg.modid, "cmdid": msg.cmdid, "hosts": hosts})
    stamp = datetime.datetime.fromtimestamp(now).isoformat(timespec="milliseconds")
    return f"{stamp} {msg.modid}/{msg.cmdid} {' '.join(hosts) if hosts else '(no hosts)'}"


async def query_dns(
    address: str,
    module: ModuleKey,
    watch: bool,
    as_json: bool,
    tls: TlsContexts | None = None,
) -> None:
    """Ask a DNS for a module's route; with ``watch``, print every push until interrupted."""
    host, port = parse_address(address)
    try:
        stream = await connect_tls(await trio.open_tcp_stream(host, port), tls, "dns")
    except OSError as exc:
        fail(f"cannot reach DNS at {address}: {exc}")
    except TlsRefused as exc:
        fail(f"DNS at {address} refused TLS: {exc.reason}")
    async with stream:
        await stream.send_all(wire.encode_frame(wire.GetRouteRequest(*module)))
        decoder = wire.FrameDecoder()
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError as exc:
                fail(f"DNS at {address} closed the connection: {refusal_hint(exc)}")
            if not data:
                hint = f": {refusal_hint(None)}" if tls is not None else ""
                fail(f"DNS at {address} closed the connection{hint}")
            decoder.feed(data)
            for msg in decoder:
                if isinstance(msg, wire.ErrorReply):
                    fail(f"DNS at {address} refused: {msg.reason}")
                if isinstance(msg, wire.GetRouteResponse) and (msg.modid, msg.cmdid) == module:
                    click.echo(_route_line(msg, as_json))
                    if not watch:
                        return


@cli.command("query", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@click.option(
    "--dns",
    "dns_address",
    metavar="HOST:PORT",
    help="Ask this DNS instead of the local agent: the route as it serves it.",
)
@click.option("--watch", is_flag=True, help="With --dns: stay subscribed, print every push.")
@click.option(
    "--stats",
    is_flag=True,
    help="Print the module's latest call statistics (ServerCallStatus) from the store.",
)
@click.option(
    "--explain",
    is_flag=True,
    help="With the agent's view: how it schedules the module (policy, weights, zones, "
    "shares, latencies, panic, zone spill, the last choices and why).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per line).")
@config_option
@store_option
def query_command(
    modid: int,
    cmdid: int,
    dns_address: str | None,
    watch: bool,
    stats: bool,
    explain: bool,
    as_json: bool,
    config_path: str | None,
    store_override: str | None,
) -> None:
    """Show module MODID/CMDID as Lars sees it: by default the local agent's view (route
    status and every host's state and counters), with --dns the route a DNS serves.

    \b
    Examples:
      lars query 1 1                                # the local agent's balancer
      lars query 1 1 --json
      lars query 1 1 --dns 127.0.0.1:7778           # the route a DNS serves
      lars query 1 1 --dns 127.0.0.1:7778 --watch   # and every change, as it is pushed
      lars query 1 1 --stats                        # call statistics the reporter stored
      lars query 1 1 --explain                      # how the agent schedules it
    \b
    --json with --dns: one line per route, {"ts", "modid", "cmdid", "hosts": [...]};
    without: {"modid", "cmdid", "status", "last_update", "hosts": [{"host", "state",
    "since", "vsucc", "verr", "rsucc", "rerr", "contin_succ", "contin_err", "demoted"}]}
    ("demoted": the DNS's fleet view has enough callers seeing the host overloaded; an agent
    starts such a host overloaded, and probes it);
    with --stats: a list of {"modid", "cmdid", "host", "caller", "succ_cnt", "err_cnt",
    "succ_total", "err_total", "overload", "ts"}.
    --explain adds "policy" {"policy", "zone_affinity", "zone_failover", "panic_threshold",
    "slow_start"}, "agent_zone", "panic", "zone_spill" (share sent out of the zone),
    "drained", "choices" [{"at", "host", "reason"}] (recorded from the first --explain on,
    for a minute), and per host "weight", "effective_weight", "zone", "share",
    "latency_ms", "overload_rule", "overloaded_at".
    """
    if explain and (dns_address or stats):
        raise click.UsageError("--explain asks the local agent: not with --dns or --stats")
    if watch and not dns_address:
        raise click.UsageError("--watch needs --dns HOST:PORT")
    if stats:
        if dns_address:
            raise click.UsageError("--stats reads the store; it does not go with --dns")
        url = store_url(get_config(config_path), store_override)
        rows = run_async(
            functools.partial(with_store, url, lambda s: s.read_call_status(modid, cmdid))
        )
        click.echo(_format_stats(rows, as_json))
        return
    if dns_address:
        try:
            parse_address(dns_address)
        except LarsError as exc:
            raise click.BadParameter(str(exc), param_hint="--dns") from None
        tls = admin_tls(get_config(config_path))
        run_async(functools.partial(query_dns, dns_address, (modid, cmdid), watch, as_json, tls))
        return
    config = get_config(config_path)
    run_async(functools.partial(query_agent, config, (modid, cmdid), as_json, explain))


def local_agent_client(config: Config) -> AsyncLarsClient:
    """A client of the configured local agent, patient enough for an operator's tool."""
    a = config.agent
    timeout = max(config.client.timeout, 0.5)
    return AsyncLarsClient(
        a.host, a.base_port, a.ports, timeout=timeout, retries=config.client.retries
    )


async def query_agent(
    config: Config, module: ModuleKey, as_json: bool, explain: bool = False
) -> None:
    """Ask the local agent for a module's state and print it."""
    a = config.agent
    async with local_agent_client(config) as client:
        try:
            state = await client.agent_state(*module, explain=explain) or {}
        except AgentUnavailable:
            port = client.core.port(*module)
            fail(
                f"no answer from the agent at {a.host}:{port} (is `lars run --role agent` running?)"
            )
    status = state.get("status", "unknown")
    hosts = [dict(h) for h in state.get("hosts", ())]
    if as_json:
        out = {
            "modid": module[0],
            "cmdid": module[1],
            "status": status,
            "last_update": state.get("last_update"),
            "hosts": hosts,
        }
        if explain:
            for name in ("policy", "agent_zone", "panic", "zone_spill", "drained", "choices"):
                out[name] = state.get(name)
        click.echo(json.dumps(out))
        return
    click.echo(_describe_module(module, status, state.get("last_update"), hosts))
    if explain and status == "ready":
        click.echo(_explain_module(state, hosts))


def _at(stamp: object) -> str:
    if not isinstance(stamp, (int, float)):
        return ""
    return " at " + datetime.datetime.fromtimestamp(stamp).isoformat(timespec="milliseconds")


def _explain_module(state: dict[str, Any], hosts: list[dict[str, Any]]) -> str:
    """The --explain part of `lars query`, for people."""
    spec = state.get("policy")
    if not isinstance(spec, dict):
        return "scheduling: this agent does not explain (it predates api_level 3)"
    zone = state.get("agent_zone") or "(none)"
    lines = [
        f"policy {spec.get('policy')}: zone affinity "
        f"{'on' if spec.get('zone_affinity') else 'off'} (failover below "
        f"{spec.get('zone_failover')}), panic threshold {spec.get('panic_threshold')}, "
        f"slow start {spec.get('slow_start')}s; agent zone {zone}",
        f"panic {'ACTIVE: all hosts serve' if state.get('panic') else 'off'}; zone spill "
        f"{float(state.get('zone_spill') or 0):.0%} of requests leave the zone",
        f"{'HOST':<22} {'STATE':<9} {'WEIGHT':>7} {'EFFECTIVE':>9} {'ZONE':<10} {'SHARE':>6} "
        f"{'EWMA':>9} OVERLOADED BY",
    ]
    for h in hosts:
        latency = h.get("latency_ms")
        lines.append(
            f"{h.get('host', ''):<22} {h.get('state', ''):<9} {h.get('weight', ''):>7} "
            f"{h.get('effective_weight', ''):>9} {h.get('zone') or '-':<10} "
            f"{float(h.get('share') or 0):>6.1%} "
            f"{'-' if latency is None else f'{latency:.1f}ms':>9} "
            f"{h.get('overload_rule') or '-'}{_at(h.get('overloaded_at'))}"
        )
    choices = state.get("choices") or []
    if not choices:
        lines.append("last choices: none recorded yet (recording runs for a minute from now)")
    else:
        lines.append("last choices (oldest first):")
        for c in choices:
            stamp = _at(c.get("at"))[4:] or "?"
            lines.append(f"  {stamp} {c.get('host') or '(none)':<22} {c.get('reason')}")
    return "\n".join(lines)


def _format_stats(rows: list[CallStatus], as_json: bool) -> str:
    out = [r.as_json() for r in rows]
    if as_json:
        return json.dumps(out)
    if not out:
        return "no statistics stored for this module"
    lines = [
        f"{'HOST':<22} {'CALLER':<16} {'SUCC':>8} {'ERR':>8} {'SUCC TOTAL':>12} "
        f"{'ERR TOTAL':>12} {'OVERLOAD':<8} REPORTED"
    ]
    for r, row in zip(rows, out, strict=True):
        stamp = datetime.datetime.fromtimestamp(r.ts).isoformat(timespec="seconds")
        lines.append(
            f"{row['host']:<22} {row['caller']:<16} {r.succ:>8} {r.err:>8} "
            f"{r.succ_total:>12} {r.err_total:>12} {'yes' if r.overload else 'no':<8} {stamp}"
        )
    return "\n".join(lines)


def _describe_module(
    module: ModuleKey, status: str, last_update: float | None, hosts: list[dict[str, Any]]
) -> str:
    now = time.time()
    head = f"module {module[0]}/{module[1]}: {status}"
    if status == "unknown":
        return head + " (the agent has not been asked for it)"
    if last_update is not None:
        head += f", route refreshed {now - last_update:.1f}s ago"
    if not hosts:
        return head + ", no hosts"
    lines = [
        head,
        f"{'HOST':<22} {'STATE':<9} {'FOR':>8} {'VSUCC':>6} {'VERR':>5} "
        f"{'RSUCC':>6} {'RERR':>5} {'C.SUCC':>6} {'C.ERR':>5} DEMOTED",
    ]
    for h in hosts:
        # Demoted: enough callers see the host overloaded (the DNS's fleet view, DESIGN §14).
        lines.append(
            f"{h['host']:<22} {h['state']:<9} {now - h['since']:>7.1f}s {h['vsucc']:>6} "
            f"{h['verr']:>5} {h['rsucc']:>6} {h['rerr']:>5} {h['contin_succ']:>6} "
            f"{h['contin_err']:>5} {'yes' if h.get('demoted') else '-'}"
        )
    return "\n".join(lines)


# --- register --------------------------------------------------------------------------------


@cli.command("register", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid")
@id_argument("cmdid")
@click.argument("address", metavar="IP:PORT")
@click.option(
    "--ttl",
    type=int,
    default=10,
    show_default=True,
    help="Seconds (1 to 3600) the host stays in the route after the last renewal, should "
    "this process die without deregistering; renewed every ttl/3.",
)
@click.option("--weight", type=int, help="The host's weight (default: the route's, or 100).")
@click.option("--zone", help="The host's availability zone (default: the route's, or none).")
@click.option(
    "--drain",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds between the deregistration (no new calls) and the host's removal, "
    "waited before exiting.",
)
@config_option
def register_command(
    modid: int,
    cmdid: int,
    address: str,
    ttl: int,
    weight: int | None,
    zone: str | None,
    drain: float,
    config_path: str | None,
) -> None:
    """Register IP:PORT as a host of module MODID/CMDID through the local agent and keep it
    registered until SIGTERM or SIGINT (Ctrl-C): a sidecar for services that do not use
    lars.client themselves. On the signal it deregisters (the host drains: no new calls
    go to it), waits --drain seconds for the calls in flight, and exits 0 (a second signal
    cuts the wait short). A registration the agent or the DNS refuses exits 1 with the
    reason. IP may be left out (":7001"): this host, as the agent knows it.

    \b
    Examples:
      lars register 1 1 10.0.0.1:7001               # until SIGTERM or Ctrl-C
      lars register 1 1 :7001 --ttl 5 --drain 30    # this host; a 30 s drain
      lars register 1 1 10.0.0.1:7001 --weight 50 --zone eu-1
    """
    ip, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise click.BadParameter(
            f"expected IP:PORT or :PORT, got {address!r}", param_hint="IP:PORT"
        )
    try:
        spec = registration_spec(modid, cmdid, int(port), ip or None, weight, zone, ttl)
        drain_ms(drain)
    except InvalidValue as exc:
        raise click.UsageError(str(exc)) from None
    config = get_config(config_path)
    setup_logging(config.log.level, config.log.format)
    run_async(functools.partial(register_sidecar, config, spec, drain))


async def register_sidecar(config: Config, spec: RegistrationSpec, drain: float) -> None:
    """`lars register`: register, keep it renewed until SIGTERM or SIGINT, deregister,
    wait the drain."""
    ip = int_to_ip(spec.ip) if spec.ip else None
    weight = None if spec.weight < 0 else spec.weight
    module = f"{spec.modid}/{spec.cmdid}"
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with local_agent_client(config) as client:
            try:
                async with client.register(
                    spec.modid, spec.cmdid, spec.port, ip, weight, spec.zone, spec.ttl
                ) as registration:
                    click.echo(
                        f"registered {registration.host} for module {module} (ttl {spec.ttl}s,"
                        f" renewed every {renew_interval(spec.ttl):.3g}s); SIGTERM or Ctrl-C"
                        " deregisters"
                    )
                    async for _ in signals:
                        break
                    await registration.aclose(drain=drain)
                    click.echo(
                        f"deregistered {registration.host} from module {module};"
                        f" draining {drain:g}s"
                    )
            except AgentUnavailable:
                port = client.core.port(spec.modid, spec.cmdid)
                fail(
                    f"no answer from the agent at {config.agent.host}:{port}"
                    " (is `lars run --role agent` running?)"
                )
        with trio.move_on_after(drain):
            async for _ in signals:  # a second signal: stop waiting
                break


# --- stats -----------------------------------------------------------------------------------


@cli.command("stats", context_settings=CONTEXT)
@click.option("--dns", "dns_address", metavar="HOST:PORT", help="A DNS's counters.")
@click.option("--reporter", "reporter_address", metavar="HOST:PORT", help="A reporter's.")
@click.option("--agent", "local_agent", is_flag=True, help="The local agent's (from the config).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
def stats_command(
    dns_address: str | None,
    reporter_address: str | None,
    local_agent: bool,
    as_json: bool,
    config_path: str | None,
) -> None:
    """Print a role's counters and gauges: requests served, malformed input dropped,
    store errors, connections, whether the store is reachable (store_ok), ...

    \b
    Examples:
      lars stats --dns 127.0.0.1:7778
      lars stats --reporter 127.0.0.1:7779 --json
      lars stats --agent
    """
    if sum(map(bool, (dns_address, reporter_address, local_agent))) != 1:
        raise click.UsageError("give exactly one of --dns, --reporter or --agent")
    config = get_config(config_path)

    async def counters() -> dict[str, Any]:
        if local_agent:
            async with local_agent_client(config) as client:
                return await client.agent_stats()
        address = dns_address or reporter_address
        assert address is not None
        expect = "dns" if dns_address else "reporter"
        reply = await ask(address, wire.StatsRequest(1), tls=admin_tls(config), expect=expect)
        if not isinstance(reply, wire.StatsResponse):
            raise LarsError(f"{address} answered {type(reply).__name__}, not its counters")
        return dict(reply.counters)

    result = run_async(counters)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    for name in sorted(result):
        click.echo(f"{name:<28} {result[name]}")


# --- bench and simulate ------------------------------------------------------------------


def _simulate_scenario(
    name: str,
    policy: str,
    zone_affinity: bool | None,
    duration: float,
    seed: int | None,
    as_json: bool,
) -> None:
    """`lars simulate --scenario`: see lars.scenarios."""
    from lars import scenarios  # it starts an agent: only loaded when asked for

    sc = scenarios.scenario(name, duration)
    policies = ["rr", "weighted", "p2c", "hash"] if policy == "all" else [policy]
    results = []
    for p in policies:
        changes = {} if zone_affinity is None else {"zone_affinity": zone_affinity}
        params = scenarios.sim_params(p, sc, **changes)
        try:
            result = scenarios.run(sc, p, seed if seed is not None else 1, params)
        except LarsError as exc:
            fail(str(exc))
        if as_json:
            click.echo(json.dumps(result.as_json()))
        results.append(result)
    if not as_json:
        click.echo(f"scenario {name}: {sc.summary} ({duration:g}s per policy)")
        click.echo(scenarios.format_results(results))


def _agent_address(config: Config) -> tools.AgentAddress:
    a, c = config.agent, config.client
    return tools.AgentAddress(
        a.host, a.base_port, a.ports, c.timeout, c.retries, c.busy_poll, c.report_delay
    )


@cli.command("bench", context_settings=CONTEXT)
@click.option("--modid", default="1", callback=_uint32, show_default=True)
@click.option(
    "--cmdid",
    default="1",
    callback=_uint32,
    show_default=True,
    help="Worker i uses module MODID/CMDID+i; each needs a route.",
)
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 256), help="Client processes."
)
@click.option(
    "--duration",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds to run.",
)
@click.option("--keys", is_flag=True, help="Each get_host with a hash key (the hash policy).")
@click.option("--latency", is_flag=True, help="Each report with a latency (the p2c policy).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
def bench_command(
    modid: int,
    cmdid: int,
    workers: int,
    duration: float,
    keys: bool,
    latency: bool,
    as_json: bool,
    config_path: str | None,
) -> None:
    """Load the local agent like the original qps tool: each worker process loops
    get_host + report on its own module for --duration seconds.

    Prints loops/s in total and per worker, and get_host latency percentiles.

    \b
    Example:
      lars route add 1 1 10.0.0.1:80 10.0.0.2:80 && lars route add 1 2 10.0.0.1:80
      lars bench --workers 2 --duration 10
    JSON: {"workers", "duration", "loops_per_s", "per_worker": [{"modid", "cmdid",
    "loops", "loops_per_s", "errors"}], "p50_us", "p99_us"}
    """
    agent = _agent_address(get_config(config_path))
    try:
        result = tools.bench(agent, modid, cmdid, workers, duration, keys, latency)
    except LarsError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    for w in result.per_worker:
        click.echo(
            f"worker module {w.modid}/{w.cmdid}: {w.loops_per_s:>10,.0f} loops/s "
            f"({w.loops:,} loops, {w.errors} errors)"
        )
    click.echo(
        f"total: {result.loops_per_s:,.0f} loops/s with {workers} worker(s) over "
        f"{duration:g}s; get_host latency p50 {result.p50_us:.0f} us, "
        f"p99 {result.p99_us:.0f} us"
    )


@cli.command("simulate", context_settings=CONTEXT, cls=IdCommand)
@id_argument("modid", required=False)
@id_argument("cmdid", required=False)
@click.option(
    "--scenario",
    type=click.Choice(["zone-outage", "slow-host", "flapping", "error-burst", "scale-out"]),
    help="Run synthetic hosts through an agent started here instead (no MODID CMDID).",
)
@click.option(
    "--policy",
    type=click.Choice(["rr", "weighted", "p2c", "hash", "all"]),
    default="all",
    show_default=True,
    help="With --scenario: the scheduling policy, or each in turn.",
)
@click.option(
    "--zone-affinity/--no-zone-affinity",
    default=None,
    help="With --scenario: override the scenario's zone affinity (zone-outage: on).",
)
@click.option(
    "--duration",
    default=6.0,
    show_default=True,
    type=click.FloatRange(1, 600),
    help="With --scenario: seconds per policy.",
)
@click.option(
    "--err-rate",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Probability that a call to a failing host fails.",
)
@click.option(
    "--count", default=1000, show_default=True, type=click.IntRange(1), help="Calls to make."
)
@click.option(
    "--fail",
    "failing",
    multiple=True,
    metavar="IP:PORT",
    help="A failing host (repeatable). Default: the route's first host.",
)
@click.option("--seed", type=int, help="Random seed, for a repeatable run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
def simulate_command(
    modid: int | None,
    cmdid: int | None,
    scenario: str | None,
    policy: str,
    zone_affinity: bool | None,
    duration: float,
    err_rate: float,
    count: int,
    failing: tuple[str, ...],
    seed: int | None,
    as_json: bool,
    config_path: str | None,
) -> None:
    """Call module MODID/CMDID through the agent COUNT times with some hosts failing, and
    show how the load balancer steers traffic away from them (the original simulator).

    With --scenario, it runs synthetic hosts whose error rate and latency change over time
    through a real agent started in this process (on a free loopback port, with a tiny DNS
    of its own: nothing else is needed), once per policy, and prints for each the error
    rate callers saw, p50/p99 latency, the seconds to eject the faulty hosts and to
    recover them, and each host's share. Scenarios: zone-outage (the agent's zone fails;
    zone affinity on), slow-host (one host 10x slower), flapping (one host fails on and
    off), error-burst (one host fails half its calls for a while), scale-out (two hosts
    join two, with slow start).

    \b
    Example:
      lars route add 1 1 10.0.0.1:80 10.0.0.2:80 10.0.0.3:80
      lars simulate 1 1 --err-rate 0.5 --count 2000
      lars simulate --scenario zone-outage                 # every policy in turn
      lars simulate --scenario slow-host --policy p2c --json
    """
    if scenario is not None:
        _simulate_scenario(scenario, policy, zone_affinity, duration, seed, as_json)
        return
    if modid is None or cmdid is None:
        raise click.UsageError("simulate needs MODID CMDID, or --scenario")
    config = get_config(config_path)
    bad = _hosts(click.get_current_context(), click.Option(["--fail"]), failing)
    try:
        result = tools.simulate(_agent_address(config), modid, cmdid, count, err_rate, bad, seed)
    except LarsError as exc:
        fail(str(exc))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "modid": modid,
                    "cmdid": cmdid,
                    "count": count,
                    "err_rate": err_rate,
                    "overloaded": result.overloaded,
                    "hosts": [
                        {
                            "host": str(t.host),
                            "failing": t.failing,
                            "calls": t.calls,
                            "succ": t.succ,
                            "err": t.err,
                        }
                        for t in result.hosts
                    ],
                }
            )
        )
        return
    click.echo(f"{'HOST':<22} {'FAILING':<8} {'CALLS':>7} {'SHARE':>7} {'SUCC':>7} {'ERR':>7}")
    total = sum(t.calls for t in result.hosts) or 1
    for t in result.hosts:
        click.echo(
            f"{t.host!s:<22} {'yes' if t.failing else 'no':<8} {t.calls:>7} "
            f"{t.calls / total:>6.1%} {t.succ:>7} {t.err:>7}"
        )
    if result.overloaded:
        click.echo(f"{result.overloaded} call(s) answered OVERLOAD (every host overloaded)")
    click.echo(
        f"failing hosts got {result.failing_share:.1%} of the calls; "
        f"an even spread would give them {result.even_share:.1%}"
    )


# --- alarms ----------------------------------------------------------------------------------


@cli.command("alarms", context_settings=CONTEXT)
@click.option("--firing", is_flag=True, help="Only the alarms firing now.")
@click.option("--history", is_flag=True, help="The transitions instead, newest first.")
@click.option("--rule", metavar="NAME", help="Only this rule's alarms or transitions.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, PAGE_MAX),
    help="Most transitions shown with --history.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of objects.")
@config_option
@store_option
def alarms_command(
    firing: bool,
    history: bool,
    rule: str | None,
    limit: int,
    as_json: bool,
    config_path: str | None,
    store_override: str | None,
) -> None:
    """Show the alarms the web role evaluates (from the store): each alarm's state
    (firing or resolved), since when, and the value that made it; or with --history, the
    transitions.

    \b
    Examples:
      lars alarms
      lars alarms --firing --json
      lars alarms --history --rule api-errors
    JSON: [{"alarm": "api-errors", "subject": "12/3", "state": "firing", "since": ...,
            "value": 0.52, "threshold": 0.2, "module": "12/3", "host": null, ...}, ...]
    """
    url = store_url(get_config(config_path), store_override)

    async def read(store: RouteStore) -> list[dict[str, Any]]:
        if history:
            events = await store.list_alarm_events(rule=rule, limit=limit)
            return [e.as_json() for e in events]
        states = await store.list_alarm_states(firing=True if firing else None)
        return [s.as_json() for s in states if rule is None or s.rule == rule]

    try:
        rows = run_async(functools.partial(with_store, url, read))
    except LarsError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no alarm transitions" if history else "no alarms")
        return
    if history:
        click.echo(
            f"{'TIME':<19}  {'STATE':<8} {'ALARM':<20} {'VALUE':>10} {'THRESHOLD':>10}  SUBJECT"
        )
    else:
        click.echo(
            f"{'SINCE':<19}  {'STATE':<8} {'ALARM':<20} {'VALUE':>10} {'THRESHOLD':>10}  SUBJECT"
        )
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts" if history else "since"]))
        click.echo(
            f"{when:<19}  {row['state'].upper() if row['state'] == 'firing' else row['state']:<8}"
            f" {row['alarm']:<20} {_number(row['value']):>10} {_number(row['threshold']):>10}"
            f"  {row['subject']}"
        )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


cli.add_command(web_group)
cli.add_command(tls_group)


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
