"""Exception types of the harness.

Every error raised for bad input names the offending value and the fix in its
message, so the command-line interface can print it without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """Base class of every error the harness raises on purpose."""


class ConfigError(BenchError, ValueError):
    """An invalid configuration value or an unknown configuration key."""


class DataError(BenchError, ValueError):
    """A missing, malformed or unusable data file."""


class UnknownNameError(BenchError, KeyError):
    """An unknown method, dataset or component name."""

    def __str__(self) -> str:  # KeyError quotes its message; plain text reads better.
        return str(self.args[0]) if self.args else ""


class BudgetError(BenchError, ValueError):
    """A budget that the data cannot satisfy."""


class CappedError(BenchError, RuntimeError):
    """A run that exceeded its configured wall-time or memory cap."""


class LeakageError(BenchError, AttributeError):
    """Raised when a method reaches for validation or test data."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return a ' Did you mean ...?' hint for the closest choices, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build the error for an unknown registry name, with near-match hints."""
    choices = sorted(choices)
    return UnknownNameError(
        f"unknown {kind} {name!r}.{suggest(name, choices)} "
        f"Known {kind}s: {', '.join(choices) if choices else '(none)'}."
    )
