"""Typed configuration: frozen dataclasses built from plain mappings.

Config flow: dataclass defaults, then a suite file, then command-line
overrides. :func:`build_config` validates keys and types once and returns a
frozen instance; unknown keys are errors with a near-match hint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from typing import Any, Mapping, TypeVar

from bench.errors import ConfigError, suggest

C = TypeVar("C")


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Coerce ``value`` to the annotated type, raising ConfigError on mismatch."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid {key}={value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: invalid {key}={value!r}; expected one of {list(args)}"
            )
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            # One number stands for a list of one, e.g. --set budgets=20.
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key, where) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
        # NaN fails every range comparison and inf silently disables caps, so
        # neither may reach a config (TOML and float() both accept them).
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    return value


def build_config(cls: type[C], values: Mapping[str, Any], *, where: str = "config") -> C:
    """Build frozen config ``cls`` from defaults updated by ``values``.

    Raises:
        ConfigError: on an unknown key (with a near-match hint) or a value of
            the wrong type; the dataclass's own ``__post_init__`` checks ranges.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            valid = f"Valid keys: {', '.join(sorted(fields))}." if fields else "It takes no config keys."
            raise ConfigError(f"{where}: unknown key {key!r}.{suggest(key, fields)} {valid}")
        kwargs[key] = _coerce(value, hints[key], key, where)
    return cls(**kwargs)


def config_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# Metadata keys of a config field added after records existed (see :func:`added_field`).
ADDED_FIELD = "added_after_records"
LEGACY_VALUE = "legacy_value"


def added_field(default: Any, *, reason: str, legacy: Any = dataclasses.MISSING) -> Any:
    """Declare a config field that was added after run records of its method existed.

    While such a field has its legacy value, :func:`record_config` leaves it out,
    so the records made before the field existed keep their cell keys and are
    neither run again nor split into a second leaderboard row. The legacy value
    must therefore reproduce the behaviour from before the field was added.

    Args:
        default: the field's default.
        reason: one line on what the field adds (kept in the field's metadata).
        legacy: the value that keeps the earlier behaviour, when the default
            differs from it. A default other than the legacy value enters every
            record key, so records made with the field set to that value
            explicitly keep their keys when it becomes the default.
    """
    legacy = default if legacy is dataclasses.MISSING else legacy
    return dataclasses.field(default=default, metadata={ADDED_FIELD: reason, LEGACY_VALUE: legacy})


def record_config(config: Any) -> dict[str, Any]:
    """Return the config as it enters run records and cell keys.

    This is :func:`config_dict` without the fields declared by
    :func:`added_field` that are set to their legacy value.
    """
    data = config_dict(config)
    for field in dataclasses.fields(config):
        if ADDED_FIELD in field.metadata and getattr(config, field.name) == field.metadata[LEGACY_VALUE]:
            data.pop(field.name, None)
    return data


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash a JSON-serialisable object with sorted keys into a hex string."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


# A name that becomes one path component under an output folder: no separator,
# no leading dot, so it can neither climb out of the folder nor hide a file.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_plain_name(where: str, key: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is a plain name (see ``PLAIN_NAME``)."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        raise ConfigError(
            f"{where}: invalid {key}={value!r}; use letters, digits, '.', '_' or '-', starting with a letter "
            "or digit and without a folder, e.g. games-tuned"
        )


def check_range(where: str, key: str, value: Any, *, low=None, high=None, low_open=False) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (``low < value`` if low_open).

    NaN and infinite values always fail: comparisons with NaN are false, so a
    plain range test would let them through.
    """
    finite = not isinstance(value, float) or math.isfinite(value)
    bad = not finite
    if low is not None and (value <= low if low_open else value < low):
        bad = True
    if high is not None and value > high:
        bad = True
    if bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        if not finite:
            rng = f"a finite number {rng}".rstrip()
        raise ConfigError(f"{where}: invalid {key}={value!r}; it must be {rng}")
