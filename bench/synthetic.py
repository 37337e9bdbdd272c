"""The data a method returns: hard or soft user sequences.

A :class:`SyntheticSet` is either

* hard: ``m`` sequences of internal item ids, stored as an ``(m, L)`` int32
  matrix left-padded with 0 (padding), or
* soft: ``m`` sequences of ``L`` rows, each a probability vector over the
  ``n_items`` real items (column ``j`` is internal id ``j + 1``). Soft rows are
  stored dense or as factors plus the name of a registered expander that turns
  the factors into logits.

``save``/``load`` round-trip exactly. ``storage_bytes`` counts what a method
must store: the id matrix, the dense rows, or the learned factors. Factors
listed as shared (derived from public item text, such as the encoder's item
vectors) are saved but not counted.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.errors import ConfigError, DataError, unknown_name

Expander = Callable[[dict[str, torch.Tensor]], torch.Tensor]
_EXPANDERS: dict[str, Expander] = {}


def register_expander(name: str) -> Callable[[Expander], Expander]:
    """Register a function mapping factors to logits of shape ``(m, L, n_items)``."""

    def decorate(fn: Expander) -> Expander:
        _EXPANDERS[name] = fn
        return fn

    return decorate


@register_expander("logits")
def _expand_logits(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    return factors["logits"]


@dataclass
class SyntheticSet:
    """Hard or soft sequences returned by a method; see the module docstring."""

    kind: str
    n_items: int
    hard: np.ndarray | None = None
    soft: torch.Tensor | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: tuple[str, ...] = ()
    expander: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("hard", "soft"):
            raise ConfigError(f"SyntheticSet kind must be 'hard' or 'soft', got {self.kind!r}")
        if self.kind == "hard":
            if self.hard is None or self.hard.ndim != 2:
                raise ConfigError("a hard SyntheticSet needs an (m, L) id matrix")
            self.hard = np.ascontiguousarray(self.hard, dtype=np.int32)
            if self.hard.size and (self.hard.min() < 0 or self.hard.max() > self.n_items):
                raise DataError(
                    f"hard sequences contain ids outside 0..{self.n_items}: "
                    f"min {self.hard.min()}, max {self.hard.max()}"
                )
        else:
            if self.soft is None and not self.factors:
                raise ConfigError("a soft SyntheticSet needs dense rows or factors")
            if self.factors and self.expander is None:
                raise ConfigError("a factored SyntheticSet needs an expander name")
            if self.expander is not None and self.expander not in _EXPANDERS:
                raise unknown_name("expander", self.expander, _EXPANDERS)

    # Construction helpers -------------------------------------------------

    @classmethod
    def from_sequences(cls, seqs, n_items: int, max_len: int, meta: dict | None = None):
        """Build a hard set from id sequences, keeping each one's last ``max_len`` ids."""
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        matrix = np.zeros((len(seqs), max_len), dtype=np.int32)
        for row, seq in enumerate(seqs):
            tail = np.asarray(seq, dtype=np.int32)[-max_len:]
            if len(tail):
                matrix[row, max_len - len(tail):] = tail
        return cls(kind="hard", n_items=n_items, hard=matrix, meta=dict(meta or {}))

    # Views ----------------------------------------------------------------

    @property
    def n_sequences(self) -> int:
        if self.kind == "hard":
            return int(self.hard.shape[0])
        return int(self.soft_probs().shape[0]) if self.soft is not None else int(
            self.logits().shape[0]
        )

    @property
    def seq_len(self) -> int:
        if self.kind == "hard":
            return int(self.hard.shape[1])
        return int((self.soft if self.soft is not None else self.logits()).shape[1])

    def logits(self) -> torch.Tensor:
        """Expand the factors into logits ``(m, L, n_items)``."""
        if not self.factors:
            raise ConfigError("logits() needs a factored soft set")
        with torch.no_grad():
            return _EXPANDERS[self.expander](self.factors).float()

    def soft_probs(self) -> torch.Tensor:
        """Return dense probability rows ``(m, L, n_items)`` of a soft set."""
        if self.kind != "soft":
            raise ConfigError("soft_probs() is defined for soft sets only")
        if self.soft is not None:
            return self.soft.float()
        return torch.softmax(self.logits(), dim=-1)

    def hard_decoding(self) -> np.ndarray:
        """Return an ``(m, L)`` internal-id matrix: the ids, or each row's argmax + 1."""
        if self.kind == "hard":
            return self.hard.copy()
        return (self.soft_probs().argmax(dim=-1) + 1).numpy().astype(np.int32)

    def to_item_ids(self, item_ids) -> list[list[str]]:
        """Write the hard decoding back as raw item ids (padding dropped)."""
        decoded = self.hard_decoding()
        return [[item_ids[i - 1] for i in row if i > 0] for row in decoded]

    @property
    def storage_bytes(self) -> int:
        """Bytes a method must store to reproduce this set (shared factors excluded)."""
        if self.kind == "hard":
            return int(self.hard.nbytes)
        if self.soft is not None:
            return int(self.soft.element_size() * self.soft.nelement())
        return int(
            sum(t.element_size() * t.nelement() for k, t in self.factors.items() if k not in self.shared)
        )

    # Persistence ----------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the set to ``path`` atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": 1,
            "kind": self.kind,
            "n_items": self.n_items,
            "hard": None if self.hard is None else torch.from_numpy(self.hard.copy()),
            "soft": self.soft,
            "factors": {k: v.detach().cpu() for k, v in self.factors.items()},
            "shared": list(self.shared),
            "expander": self.expander,
            "meta": self.meta,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        """Read a set written by :meth:`save`."""
        try:
            payload = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise DataError(f"cannot read synthetic set {path}: {exc}") from exc
        hard = payload["hard"]
        return cls(
            kind=payload["kind"],
            n_items=payload["n_items"],
            hard=None if hard is None else hard.numpy(),
            soft=payload["soft"],
            factors=dict(payload["factors"]),
            shared=tuple(payload["shared"]),
            expander=payload["expander"],
            meta=payload["meta"],
        )
