"""Routes as files: export, strict parsing and the difference between two sets of routes.

Pure functions, text in and text out, shared by ``lars route export|import`` and the
console. Two formats:

* ``json``: ``{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", ...]}, ...]}``
  (what :func:`export_routes` writes: one module per line, sorted). A host whose weight or
  zone is not the default is an object ``{"host": "10.0.0.1:7001", "weight": 50, "zone":
  "eu-1"}``, and a module with its own policy has ``"policy": {"policy": "weighted", ...}``
  (PolicySpec's fields; those left out take their defaults) (DESIGN §13);
* ``csv``: the header ``modid,cmdid,ip,port``, then one row per host; with weights or zones,
  the header ``modid,cmdid,ip,port,weight,zone``. CSV carries no policies.

A file with no weight, zone or policy anywhere (an older export) leaves the store's as they
are; one that has some gives them to every host and module it names (the defaults where it
says nothing), and with ``--replace`` makes them exactly the file's.

:func:`parse_routes` is strict: the first thing wrong (bad JSON, an unknown key, an id out of
range, a bad ``ip:port``, a module or host given twice) raises :class:`InvalidValue` naming
the line or entry and the field, before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import attrs

from lars.core.model import (
    Host,
    HostKey,
    HostMeta,
    ModuleKey,
    PolicySpec,
    check_id,
    check_port,
    check_weight,
    check_zone,
    format_host,
    int_to_ip,
    ip_to_int,
)
from lars.errors import InvalidValue

#: The formats of :func:`export_routes` and :func:`parse_routes`.
FORMATS = ("json", "csv")
#: The header line of the CSV format, and with weights and zones.
CSV_HEADER = ("modid", "cmdid", "ip", "port")
CSV_META_HEADER = (*CSV_HEADER, "weight", "zone")


@attrs.frozen
class RouteFile:
    """What a routes file holds: the routes, and (None when the file has none at all) each
    host's weight and zone and the modules' policies."""

    routes: dict[ModuleKey, frozenset[HostKey]]
    #: Every host of every module, when the file gives any weight or zone.
    meta: dict[ModuleKey, dict[HostKey, HostMeta]] | None = None
    #: Every module with a policy, when the file gives any.
    policies: dict[ModuleKey, PolicySpec] | None = None


#: One module's change: (module, hosts added, hosts removed).
RouteDiff = tuple[ModuleKey, frozenset[HostKey], frozenset[HostKey]]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidValue(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def export_routes(
    routes: Mapping[ModuleKey, Collection[HostKey]],
    fmt: str,
    meta: Mapping[ModuleKey, Mapping[HostKey, HostMeta]] | None = None,
    policies: Mapping[ModuleKey, PolicySpec] | None = None,
) -> str:
    """``routes`` as text in ``fmt`` ("json" or "csv"), sorted by module and host; modules
    without hosts are left out. Hosts' weights and zones (``meta``) and modules'
    ``policies`` are written where they are not the defaults (CSV: no policies)."""
    _check_format(fmt)
    modules = [(module, sorted(routes[module])) for module in sorted(routes) if routes[module]]
    meta = meta or {}
    policies = policies or {}

    def meta_of(module: ModuleKey, host: HostKey) -> HostMeta:
        return meta.get(module, {}).get(host, HostMeta())

    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        with_meta = any(meta_of(m, h) != HostMeta() for m, hosts in modules for h in hosts)
        writer.writerow(CSV_META_HEADER if with_meta else CSV_HEADER)
        for module, hosts in modules:
            for ip, port in hosts:
                row: tuple[Any, ...] = (*module, int_to_ip(ip), port)
                if with_meta:
                    row += tuple(meta_of(module, (ip, port)))
                writer.writerow(row)
        return out.getvalue()

    def host_entry(module: ModuleKey, host: HostKey) -> str | dict[str, Any]:
        value = meta_of(module, host)
        if value == HostMeta():
            return format_host(host)
        entry: dict[str, Any] = {"host": format_host(host)}
        entry.update({k: v for k, v in value._asdict().items() if v != getattr(HostMeta(), k)})
        return entry

    def module_entry(module: ModuleKey, hosts: list[HostKey]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "modid": module[0],
            "cmdid": module[1],
            "hosts": [host_entry(module, h) for h in hosts],
        }
        if module in policies:
            entry["policy"] = policies[module]._asdict()
        return entry

    lines = [json.dumps(module_entry(module, hosts)) for module, hosts in modules]
    if not lines:
        return '{"routes": []}\n'
    return '{"routes": [\n' + ",\n".join(lines) + "\n]}\n"


def parse_routes(text: str, fmt: str) -> dict[ModuleKey, frozenset[HostKey]]:
    """Parse routes written in ``fmt``; :class:`InvalidValue` names the first problem."""
    return parse_route_file(text, fmt).routes


def parse_route_file(text: str, fmt: str) -> RouteFile:
    """Parse routes written in ``fmt`` with any weights, zones and policies;
    :class:`InvalidValue` names the first problem."""
    _check_format(fmt)
    text = text.removeprefix("\ufeff")  # a byte order mark, as some editors write
    return _parse_csv(text) if fmt == "csv" else _parse_json(text)


def _json_meta(host: dict[str, Any], where: str) -> tuple[str, HostMeta]:
    unknown = sorted(set(host) - {"host", "weight", "zone"})
    if unknown:
        raise InvalidValue(f"{where}: unknown key(s) {', '.join(unknown)}")
    if not isinstance(host.get("host"), str):
        raise InvalidValue(f'{where}: "host" must be "IP:PORT"')
    try:
        value = HostMeta(
            check_weight(host.get("weight", HostMeta().weight)),
            check_zone(host.get("zone", HostMeta().zone)),
        )
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None
    return host["host"], value


def _json_policy(value: object, where: str) -> PolicySpec:
    fields = PolicySpec._fields
    if not isinstance(value, dict):
        raise InvalidValue(f"{where}: policy must be an object of {', '.join(fields)}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise InvalidValue(f"{where}: policy: unknown key(s) {', '.join(unknown)}")
    try:
        return PolicySpec(**value).check()
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: policy: {exc}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing one that gives a key twice (json keeps the last silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidValue(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _json_id(value: object, where: str, field: str) -> int:
    try:
        return check_id(value, field)
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None


def _parse_json(text: str) -> RouteFile:
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise InvalidValue(f"line {exc.lineno} column {exc.colno}: bad JSON: {exc.msg}") from None
    except InvalidValue as exc:
        raise InvalidValue(f"bad JSON: {exc}") from None
    if not isinstance(document, dict) or set(document) != {"routes"}:
        raise InvalidValue('expected an object {"routes": [...]} and nothing else')
    entries = document["routes"]
    if not isinstance(entries, list):
        raise InvalidValue(f"routes must be a list, got {type(entries).__name__}")
    routes: dict[ModuleKey, frozenset[HostKey]] = {}
    meta: dict[ModuleKey, dict[HostKey, HostMeta]] = {}
    policies: dict[ModuleKey, PolicySpec] = {}
    any_meta = False
    first_seen: dict[ModuleKey, int] = {}
    for index, entry in enumerate(entries):
        where = f"routes[{index}]"
        if not isinstance(entry, dict):
            raise InvalidValue(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [key for key in ("modid", "cmdid", "hosts") if key not in entry]
        unknown = sorted(set(entry) - {"modid", "cmdid", "hosts", "policy"})
        if missing:
            raise InvalidValue(f"{where}: missing {', '.join(missing)}")
        if unknown:
            raise InvalidValue(f"{where}: unknown key(s) {', '.join(unknown)}")
        module = (
            _json_id(entry["modid"], where, "modid"),
            _json_id(entry["cmdid"], where, "cmdid"),
        )
        where = f"{where} (module {module[0]}/{module[1]})"
        if module in first_seen:
            raise InvalidValue(
                f"{where}: the module is given twice (also routes[{first_seen[module]}])"
            )
        first_seen[module] = index
        if "policy" in entry:
            policies[module] = _json_policy(entry["policy"], where)
        hosts = entry["hosts"]
        if not isinstance(hosts, list) or not hosts:
            raise InvalidValue(f'{where}: hosts must be a non-empty list of "IP:PORT" texts')
        keys: dict[HostKey, int] = {}
        for position, host in enumerate(hosts):
            value = HostMeta()
            if isinstance(host, dict):
                host, value = _json_meta(host, f"{where}: hosts[{position}]")
                any_meta = True
            if not isinstance(host, str):
                raise InvalidValue(f'{where}: hosts[{position}] must be "IP:PORT", got {host!r}')
            try:
                key = Host.parse(host).key
            except InvalidValue as exc:
                raise InvalidValue(f"{where}: hosts[{position}]: {exc}") from None
            if key in keys:
                raise InvalidValue(
                    f"{where}: hosts[{position}] {host.strip()} is given twice"
                    f" (also hosts[{keys[key]}])"
                )
            keys[key] = position
            meta.setdefault(module, {})[key] = value
        routes[module] = frozenset(keys)
    return RouteFile(routes, meta if any_meta else None, policies if policies else None)


def _decimal(value: str, name: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidValue(f"{name} must be a decimal integer, got {text!r}")
    return int(text)


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """The rows of a CSV text, each with the line it starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidValue(f"line {line}: bad CSV: {exc}") from None
        yield line, row
        line = reader.line_num + 1


def _parse_csv(text: str) -> RouteFile:
    rows = _csv_rows(text)
    header = next(rows, None)
    names = tuple(cell.strip().lower() for cell in header[1]) if header else ()
    if names not in (CSV_HEADER, CSV_META_HEADER):
        got = repr(",".join(header[1])) if header else "an empty file"
        raise InvalidValue(
            f"line 1: expected the header {','.join(CSV_HEADER)}, got {got}"
            f" (or {','.join(CSV_META_HEADER)})"
        )
    routes: dict[ModuleKey, dict[HostKey, int]] = {}
    meta: dict[ModuleKey, dict[HostKey, HostMeta]] = {}
    for line, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if len(row) != len(names):
            raise InvalidValue(
                f"line {line}: expected {len(names)} fields ({','.join(names)}), got {len(row)}"
            )
        try:
            modid = check_id(_decimal(row[0], "modid"), "modid")
            cmdid = check_id(_decimal(row[1], "cmdid"), "cmdid")
            host = (ip_to_int(row[2].strip()), check_port(_decimal(row[3], "port")))
            value = HostMeta()
            if len(names) > len(CSV_HEADER):
                weight = row[4].strip()
                value = HostMeta(
                    check_weight(_decimal(weight, "weight")) if weight else HostMeta().weight,
                    check_zone(row[5].strip()),
                )
        except InvalidValue as exc:
            raise InvalidValue(f"line {line}: {exc}") from None
        hosts = routes.setdefault((modid, cmdid), {})
        if host in hosts:
            raise InvalidValue(
                f"line {line}: host {format_host(host)} of module {modid}/{cmdid} is given"
                f" twice (also line {hosts[host]})"
            )
        hosts[host] = line
        meta.setdefault((modid, cmdid), {})[host] = value
    return RouteFile(
        {module: frozenset(hosts) for module, hosts in routes.items()},
        meta if len(names) > len(CSV_HEADER) else None,
    )


def diff_routes(
    old: Mapping[ModuleKey, Collection[HostKey]], new: Mapping[ModuleKey, Collection[HostKey]]
) -> list[RouteDiff]:
    """What turns ``old`` into ``new``: one ``(module, added, removed)`` per module that
    changes, sorted by module. A module missing from ``new`` loses every host."""
    changes = []
    for module in sorted(set(old) | set(new)):
        before = frozenset(old.get(module, ()))
        after = frozenset(new.get(module, ()))
        if before != after:
            changes.append((module, after - before, before - after))
    return changes


def merge_routes(
    old: Mapping[ModuleKey, Collection[HostKey]], add: Mapping[ModuleKey, Collection[HostKey]]
) -> dict[ModuleKey, frozenset[HostKey]]:
    """The routes after adding ``add`` to ``old`` (an import without ``--replace``)."""
    merged = {module: frozenset(hosts) for module, hosts in old.items()}
    for module, hosts in add.items():
        merged[module] = merged.get(module, frozenset()) | frozenset(hosts)
    return merged


def format_diff(changes: Collection[RouteDiff]) -> list[str]:
    """One line per module of a :func:`diff_routes` result: ``+ip:port`` added,
    ``-ip:port`` removed, in host order."""
    lines = []
    for (modid, cmdid), added, removed in changes:
        hosts = sorted([(host, "+") for host in added] + [(host, "-") for host in removed])
        lines.append(
            f"{modid}/{cmdid}: " + " ".join(f"{sign}{format_host(h)}" for h, sign in hosts)
        )
    return lines


def diff_meta(
    current: Mapping[ModuleKey, Mapping[HostKey, HostMeta]],
    policies: Mapping[ModuleKey, PolicySpec],
    file: RouteFile,
    replace: bool,
) -> list[str]:
    """What importing ``file`` changes besides hosts, one line each: ``1/1: ~IP:PORT weight
    100->50 zone ->eu-1`` (hosts kept or added with other than the defaults) and ``1/1:
    policy rr->weighted`` (with ``replace``, a module's own policy the file lacks goes:
    ``->default``)."""
    lines = []
    for module, hosts in sorted((file.meta or {}).items()):
        have = current.get(module, {})
        for host, value in sorted(hosts.items()):
            old = have.get(host, HostMeta())
            parts = [
                f"{field} {getattr(old, field)}->{getattr(value, field)}"
                for field in HostMeta._fields
                if getattr(old, field) != getattr(value, field)
            ]
            if parts:
                lines.append(f"{module[0]}/{module[1]}: ~{format_host(host)} {' '.join(parts)}")
    if file.policies is not None:
        wanted: Mapping[ModuleKey, PolicySpec | None] = file.policies
        modules = set(wanted) | (set(policies) if replace else set())
        for module in sorted(modules):
            had, gets = policies.get(module), wanted.get(module)
            if had != gets:
                before = had.policy if had else "default"
                after = gets.policy if gets else "default"
                lines.append(f"{module[0]}/{module[1]}: policy {before}->{after}")
    return lines
