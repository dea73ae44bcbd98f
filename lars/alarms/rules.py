"""Alarm rules: what they say, how they are written, how they are checked. Pure.

A rule is written as a flat table of keys (TOML in ``lars.toml``, JSON in the store's
``AlarmRule`` table and the console's API) and read by :func:`parse_rule` into one of four
frozen classes, one per kind. :meth:`Rule.definition` writes it back; ``parse_rule`` of a
definition gives the same rule again, and the definition of a parsed rule is its canonical
form (every key written, defaults included, so a stored rule keeps its meaning if a default
changes later).

Keys (every kind): ``name`` (1 to 64 of ``A-Z a-z 0-9 _ . -``), ``kind``, ``enabled``
(default true). Module rules take ``module``: ``""`` (every module, the default) or
``"MODID/CMDID"``.

``error_rate``
    Fires when ``err / (succ + err) > threshold`` over the last ``window`` minutes (the
    current partial minute and ``window - 1`` whole ones, see
    :func:`lars.alarms.evaluate.window_start`), but only with at least ``min_calls`` calls
    in that window: a few failures of a quiet module are noise. ``per``: ``"module"``
    (the calls of all its hosts together) or ``"host"`` (each host on its own).
``host_overloaded``
    Fires for a host of a module's route when at least ``callers`` callers flag it
    overloaded in a report of the last ``window`` minutes.
``no_healthy_host``
    Fires for a module with at least one host in its route when every one is flagged
    overloaded by at least one caller in a report of the last ``window`` minutes.
``caller_silent``
    Fires when a caller (``caller``: one dotted IPv4, or ``""`` for every caller) has not
    reported for ``silent`` minutes. A caller silent for more than ``forget`` minutes is
    taken to be retired: it is no longer watched and its alarm resolves. A caller without
    any report in the store is not watched either: there is no time to count from.

Errors name the rule and the key, and say what was expected: ``rule 'api-errors':
threshold must be a number from 0 up to (not including) 1, got 1.5``. Unknown keys, and
keys of another kind, are errors too: a typo is not a silent default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import attrs

from lars.core.model import UINT32_MAX, ModuleKey, int_to_ip, ip_to_int
from lars.errors import InvalidValue

#: Longest rule name (the store's ``AlarmRule.name`` column holds 64 characters).
NAME_MAX = 64
#: Longest error-rate or overload window, minutes (one day).
WINDOW_MAX = 1440
#: Longest ``silent`` of a caller rule, minutes (one week).
SILENT_MAX = 10080
#: Longest ``forget`` of a caller rule, minutes (one year).
FORGET_MAX = 525600

_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{NAME_MAX}}}")
_MODULE = re.compile(r"([0-9]{1,10})/([0-9]{1,10})")


# --- value checks (attrs validators: they name the key, parse_rule names the rule) -----------


def _name(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidValue(
            f"name must be 1 to {NAME_MAX} characters of A-Z a-z 0-9 _ . -, got {value!r}"
        )


def _bool(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not bool:
        raise InvalidValue(f"{attr.name} must be true or false, got {value!r}")


def _minutes(low: int, high: int) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not int or not low <= value <= high:
            raise InvalidValue(
                f"{attr.name} must be a whole number of minutes from {low} to {high}, got {value!r}"
            )

    return check


def _at_least_one(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not int or value < 1:
        raise InvalidValue(f"{attr.name} must be a whole number from 1 up, got {value!r}")


def _threshold(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    # bool is an int subclass: true is not a threshold. The range test refuses NaN (it
    # compares false to everything, so it would never fire) and the infinities.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise InvalidValue(
            f"{attr.name} must be a number from 0 up to (not including) 1, got {value!r}"
        )


def _to_float(value: Any) -> Any:
    # Accept an int for a float (``threshold = 0`` in TOML); leave anything else for the
    # validator to refuse with the value as written.
    if type(value) is int and 0 <= value < 1:
        return float(value)
    return value


def _per(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value not in ("module", "host"):
        raise InvalidValue(f'per must be "module" or "host", got {value!r}')


def _module(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(type(v) is int and 0 <= v <= UINT32_MAX for v in value)
    ):
        raise InvalidValue(
            f"module must be None (every module) or (modid, cmdid) of integers from 0 to "
            f"{UINT32_MAX}, got {value!r}"
        )


def _caller(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (type(value) is not int or not 0 <= value <= UINT32_MAX):
        raise InvalidValue(
            f"caller must be None (every caller) or an IPv4 address as an integer, got {value!r}"
        )


# --- the rules ------------------------------------------------------------------------------


def format_module(module: ModuleKey) -> str:
    """``(12, 3)`` -> ``"12/3"``: how rules, subjects and notifications write a module."""
    return f"{module[0]}/{module[1]}"


def _percent(rate: float) -> str:
    """A threshold as a percentage, as short as it can be without rounding it."""
    short = f"{rate * 100:.1f}".removesuffix(".0")
    if float(short) == round(rate * 100, 9):
        return short + "%"
    return f"{rate * 100:.6g}%"


@attrs.frozen(kw_only=True)
class Rule:
    """What every alarm rule has. The kinds are the subclasses; ``kind`` names them."""

    #: The kind's name in definitions (``"error_rate"``...); set by each subclass.
    kind: ClassVar[str] = ""

    name: str = attrs.field(validator=_name)
    enabled: bool = attrs.field(default=True, validator=_bool)

    def definition(self) -> dict[str, Any]:
        """The rule as JSON/TOML data, every key written: :func:`parse_rule` reads it back
        into an equal rule."""
        data: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for field in attrs.fields(type(self)):
            if field.name == "name":
                continue
            value = getattr(self, field.name)
            if field.name == "module":
                value = "" if value is None else format_module(value)
            elif field.name == "caller":
                value = "" if value is None else int_to_ip(value)
            data[field.name] = value
        return data

    def describe(self) -> str:
        """One line for people: what makes the rule fire, and on what."""
        text = self._describe()
        return text if self.enabled else text + " (disabled)"

    def _describe(self) -> str:
        raise NotImplementedError


@attrs.frozen(kw_only=True)
class ModuleRule(Rule):
    """A rule about modules: every module, or the one in ``module``."""

    #: ``(modid, cmdid)``, or None for every module.
    module: ModuleKey | None = attrs.field(default=None, validator=_module)

    @property
    def scope(self) -> str:
        """``"every module"`` or ``"module 12/3"``."""
        return "every module" if self.module is None else f"module {format_module(self.module)}"


@attrs.frozen(kw_only=True)
class ErrorRateRule(ModuleRule):
    """Fires when the error rate over ``window`` minutes is above ``threshold``, with at
    least ``min_calls`` calls in the window; per module or per host."""

    kind: ClassVar[str] = "error_rate"

    threshold: float = attrs.field(converter=_to_float, validator=_threshold)
    window: int = attrs.field(default=5, validator=_minutes(1, WINDOW_MAX))
    min_calls: int = attrs.field(default=100, validator=_at_least_one)
    per: str = attrs.field(default="module", validator=_per)

    def _describe(self) -> str:
        return (
            f"error rate > {_percent(self.threshold)} over {self.window} min with "
            f">= {self.min_calls:,} calls, per {self.per}, {self.scope}"
        )


@attrs.frozen(kw_only=True)
class HostOverloadedRule(ModuleRule):
    """Fires for a host in a module's route flagged overloaded by at least ``callers``
    callers in reports of the last ``window`` minutes."""

    kind: ClassVar[str] = "host_overloaded"

    callers: int = attrs.field(default=1, validator=_at_least_one)
    window: int = attrs.field(default=5, validator=_minutes(1, WINDOW_MAX))

    def _describe(self) -> str:
        callers = "1 caller" if self.callers == 1 else f"{self.callers:,} callers"
        return f"host flagged overloaded by >= {callers} within {self.window} min, {self.scope}"


@attrs.frozen(kw_only=True)
class NoHealthyHostRule(ModuleRule):
    """Fires for a module with hosts in its route when every one is flagged overloaded by
    a caller in a report of the last ``window`` minutes."""

    kind: ClassVar[str] = "no_healthy_host"

    window: int = attrs.field(default=5, validator=_minutes(1, WINDOW_MAX))

    def _describe(self) -> str:
        return (
            f"no healthy host (each flagged overloaded by a caller within {self.window} min), "
            f"{self.scope}"
        )


@attrs.frozen(kw_only=True)
class CallerSilentRule(Rule):
    """Fires when a caller has not reported for ``silent`` minutes; stops watching it (and
    resolves) once it has been silent for more than ``forget`` minutes."""

    kind: ClassVar[str] = "caller_silent"

    #: The caller's IPv4 address as an integer, or None for every caller.
    caller: int | None = attrs.field(default=None, validator=_caller)
    silent: int = attrs.field(validator=_minutes(1, SILENT_MAX))
    forget: int = attrs.field(default=1440, validator=_minutes(1, FORGET_MAX))

    @forget.validator
    def _forget_after_silent(self, attr: attrs.Attribute[int], value: int) -> None:
        if value <= self.silent:
            raise InvalidValue(
                f"forget must be more minutes than silent ({self.silent}), got {value!r}"
            )

    def _describe(self) -> str:
        who = "every caller" if self.caller is None else f"caller {int_to_ip(self.caller)}"
        return (
            f"caller silent for >= {self.silent} min (no longer watched after "
            f"{self.forget} min), {who}"
        )


#: Every kind of rule by its name in definitions.
KINDS: dict[str, type[Rule]] = {
    cls.kind: cls
    for cls in (ErrorRateRule, HostOverloadedRule, NoHealthyHostRule, CallerSilentRule)
}


# --- reading definitions --------------------------------------------------------------------


def _keys_of(cls: type[Rule]) -> tuple[str, ...]:
    return ("name", "kind", *(f.name for f in attrs.fields(cls) if f.name != "name"))


def _parse_module(value: object) -> ModuleKey | None:
    if value == "":
        return None
    match = _MODULE.fullmatch(value) if isinstance(value, str) else None
    if match is None or any(int(part) > UINT32_MAX for part in match.groups()):
        raise InvalidValue(
            f'module must be "" (every module) or "MODID/CMDID" with ids from 0 to '
            f"{UINT32_MAX}, got {value!r}"
        )
    return int(match[1]), int(match[2])


def _parse_caller(value: object) -> int | None:
    if value == "":
        return None
    try:
        if not isinstance(value, str):
            raise InvalidValue(value)
        return ip_to_int(value)
    except InvalidValue:
        raise InvalidValue(
            f'caller must be "" (every caller) or an IPv4 address, got {value!r}'
        ) from None


def _default_forget(silent: object) -> None:
    default = attrs.fields(CallerSilentRule).forget.default
    if type(silent) is int and isinstance(default, int) and default <= silent <= SILENT_MAX:
        raise InvalidValue(
            f"forget must be more minutes than silent ({silent}), and its default is "
            f"{default}: set forget"
        )


def parse_rule(data: Mapping[str, Any], where: str = "rule") -> Rule:
    """Read one rule's definition (TOML or JSON data). Raises :class:`InvalidValue` that
    names ``where``, the rule and the key: ``rule 'api-errors': threshold must be ...``."""
    if not isinstance(data, Mapping):
        raise InvalidValue(f"{where} must be a table of keys, got {data!r}")
    name = data.get("name")
    if name is None:
        raise InvalidValue(f"{where}: name is missing")
    try:
        _name(None, attrs.fields(Rule).name, name)
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None
    label = f"{where} {name!r}"

    kind = data.get("kind")
    kinds = ", ".join(KINDS)
    if kind is None:
        raise InvalidValue(f"{label}: kind is missing (one of {kinds})")
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidValue(f"{label}: kind must be one of {kinds}, got {kind!r}")
    cls = KINDS[kind]
    allowed = _keys_of(cls)
    for key in data:
        if key not in allowed:
            others = [k for k, c in KINDS.items() if key in _keys_of(c)]
            why = (
                f"{key!r} is a key of {' and '.join(others)} rules, not of {kind} rules"
                if others
                else f"unknown key {key!r}"
            )
            raise InvalidValue(f"{label}: {why} (keys of {kind} rules: {', '.join(allowed)})")

    values = {key: value for key, value in data.items() if key != "kind"}
    try:
        if "module" in values:
            values["module"] = _parse_module(values["module"])
        if "caller" in values:
            values["caller"] = _parse_caller(values["caller"])
        for field in attrs.fields(cls):
            if field.default is attrs.NOTHING and field.name not in values:
                raise InvalidValue(f"{field.name} is missing")
        if cls is CallerSilentRule and "forget" not in values:
            _default_forget(values["silent"])
        return cls(**values)
    except InvalidValue as exc:
        raise InvalidValue(f"{label}: {exc}") from None


def rules_by_name(rules: Iterable[Rule]) -> dict[str, Rule]:
    """The rules by name; :class:`InvalidValue` if two share one (an alarm is keyed by its
    rule's name, so two rules of one name would fight over the same alarms)."""
    by_name: dict[str, Rule] = {}
    for rule in rules:
        if rule.name in by_name:
            raise InvalidValue(f"two alarm rules are named {rule.name!r}")
        by_name[rule.name] = rule
    return by_name
