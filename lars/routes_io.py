"""Routes as files: export, strict parsing and the difference between two sets of routes.

Pure functions, text in and text out, shared by ``lars route export|import`` and the
console. Two formats:

* ``json``: ``{"routes": [{"modid": 1, "cmdid": 1, "hosts": ["10.0.0.1:7001", ...]}, ...]}``
  (what :func:`export_routes` writes: one module per line, sorted);
* ``csv``: the header ``modid,cmdid,ip,port``, then one row per host.

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

from lars.core.model import (
    Host,
    HostKey,
    ModuleKey,
    check_id,
    check_port,
    format_host,
    int_to_ip,
    ip_to_int,
)
from lars.errors import InvalidValue

#: The formats of :func:`export_routes` and :func:`parse_routes`.
FORMATS = ("json", "csv")
#: The header line of the CSV format.
CSV_HEADER = ("modid", "cmdid", "ip", "port")

#: One module's change: (module, hosts added, hosts removed).
RouteDiff = tuple[ModuleKey, frozenset[HostKey], frozenset[HostKey]]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidValue(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def export_routes(routes: Mapping[ModuleKey, Collection[HostKey]], fmt: str) -> str:
    """``routes`` as text in ``fmt`` ("json" or "csv"), sorted by module and host; modules
    without hosts are left out."""
    _check_format(fmt)
    modules = [(module, sorted(routes[module])) for module in sorted(routes) if routes[module]]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for (modid, cmdid), hosts in modules:
            for ip, port in hosts:
                writer.writerow((modid, cmdid, int_to_ip(ip), port))
        return out.getvalue()
    lines = [
        json.dumps({"modid": m, "cmdid": c, "hosts": [format_host(h) for h in hosts]})
        for (m, c), hosts in modules
    ]
    if not lines:
        return '{"routes": []}\n'
    return '{"routes": [\n' + ",\n".join(lines) + "\n]}\n"


def parse_routes(text: str, fmt: str) -> dict[ModuleKey, frozenset[HostKey]]:
    """Parse routes written in ``fmt``; :class:`InvalidValue` names the first problem."""
    _check_format(fmt)
    text = text.removeprefix("\ufeff")  # a byte order mark, as some editors write
    return _parse_csv(text) if fmt == "csv" else _parse_json(text)


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


def _parse_json(text: str) -> dict[ModuleKey, frozenset[HostKey]]:
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
    first_seen: dict[ModuleKey, int] = {}
    for index, entry in enumerate(entries):
        where = f"routes[{index}]"
        if not isinstance(entry, dict):
            raise InvalidValue(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [key for key in ("modid", "cmdid", "hosts") if key not in entry]
        unknown = sorted(set(entry) - {"modid", "cmdid", "hosts"})
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
        hosts = entry["hosts"]
        if not isinstance(hosts, list) or not hosts:
            raise InvalidValue(f'{where}: hosts must be a non-empty list of "IP:PORT" texts')
        keys: dict[HostKey, int] = {}
        for position, host in enumerate(hosts):
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
        routes[module] = frozenset(keys)
    return routes


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


def _parse_csv(text: str) -> dict[ModuleKey, frozenset[HostKey]]:
    rows = _csv_rows(text)
    header = next(rows, None)
    if header is None or tuple(cell.strip().lower() for cell in header[1]) != CSV_HEADER:
        got = repr(",".join(header[1])) if header else "an empty file"
        raise InvalidValue(f"line 1: expected the header {','.join(CSV_HEADER)}, got {got}")
    routes: dict[ModuleKey, dict[HostKey, int]] = {}
    for line, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if len(row) != len(CSV_HEADER):
            raise InvalidValue(
                f"line {line}: expected {len(CSV_HEADER)} fields ({','.join(CSV_HEADER)}),"
                f" got {len(row)}"
            )
        try:
            modid = check_id(_decimal(row[0], "modid"), "modid")
            cmdid = check_id(_decimal(row[1], "cmdid"), "cmdid")
            host = (ip_to_int(row[2].strip()), check_port(_decimal(row[3], "port")))
        except InvalidValue as exc:
            raise InvalidValue(f"line {line}: {exc}") from None
        hosts = routes.setdefault((modid, cmdid), {})
        if host in hosts:
            raise InvalidValue(
                f"line {line}: host {format_host(host)} of module {modid}/{cmdid} is given"
                f" twice (also line {hosts[host]})"
            )
        hosts[host] = line
    return {module: frozenset(hosts) for module, hosts in routes.items()}


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
