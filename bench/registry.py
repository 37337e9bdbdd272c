"""Method registry: decorator registration and lookup with near-match errors.

Methods live in the top-level ``methods`` package; importing
:mod:`methods` registers every built-in method. A method is a class with a
``name``, a frozen ``Config`` dataclass and ``distill(train_view, budget,
context) -> SyntheticSet``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from bench.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    from bench.method import Method

logger = logging.getLogger(__name__)

_METHODS: dict[str, type["Method"]] = {}
_LOADED = False

T = TypeVar("T")


def register(name: str) -> Callable[[type[T]], type[T]]:
    """Register a method class under ``name`` (lowercase, unique).

    Raises:
        ConfigError: if the name is not lowercase or is already taken.
    """

    def decorate(cls: type[T]) -> type[T]:
        if name != name.lower() or not name:
            raise ConfigError(f"method name {name!r} must be non-empty lowercase")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ConfigError(
                f"method name {name!r} is already registered by {_METHODS[name].__qualname__}"
            )
        cls.name = name  # type: ignore[attr-defined]
        _METHODS[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("methods")
        _LOADED = True


def method_names() -> list[str]:
    """Return the registered method names, sorted."""
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> type["Method"]:
    """Return the method class registered as ``name``.

    Raises:
        UnknownNameError: with the closest registered names.
    """
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise unknown_name("method", name, _METHODS) from None


def build_method(name: str, overrides: dict[str, Any] | None = None) -> "Method":
    """Instantiate method ``name`` with its config built from ``overrides``."""
    from bench.config import build_config

    cls = get_method(name)
    config = build_config(cls.Config, overrides or {}, where=f"method {name!r}")
    return cls(config)
