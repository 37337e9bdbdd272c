"""Processed dataset containers: the full split and the training-only view.

Item ids are remapped to internal ids ``1..n_items`` in first-seen order of the
interaction file; internal id 0 is reserved for padding and never names a real
item. Raw ids are kept as strings and written back unchanged in every output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from bench.errors import LeakageError


@dataclass(frozen=True)
class SplitData:
    """A dataset after filtering and the chronological leave-one-out split.

    Attributes:
        name: dataset name as used in records and reports.
        item_ids: raw item ids; ``item_ids[i]`` has internal id ``i + 1``.
        item_texts: item text (title) aligned with ``item_ids``.
        user_ids: raw user ids, one per kept user, aligned with the arrays below.
        train_seqs: per user, the internal ids of the training history in time
            order. For an evaluated user it excludes the validation and test
            targets; a user with fewer than 3 interactions keeps its whole
            sequence here and is never evaluated.
        valid_targets: per user, the validation target's internal id, 0 if the
            user is not evaluated.
        test_targets: per user, the test target's internal id, 0 if not evaluated.
        fingerprint: SHA-256 over the processed content (ids, texts, sequences).
        stats: counts describing the processing (users, items, dropped rows).
    """

    name: str
    item_ids: tuple[str, ...]
    item_texts: tuple[str, ...]
    user_ids: tuple[str, ...]
    train_seqs: tuple[np.ndarray, ...]
    valid_targets: np.ndarray
    test_targets: np.ndarray
    fingerprint: str
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        """Number of real items (the embedding table has ``n_items + 1`` rows)."""
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def evaluated_users(self) -> np.ndarray:
        """Indices of users that have validation and test targets."""
        return np.flatnonzero(self.test_targets > 0)

    def eval_inputs(self, split: str) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Return (user indices, input sequences, targets) for 'valid' or 'test'.

        The validation input is the training history; the test input appends
        the validation target to it, so both follow the time order.
        """
        users = self.evaluated_users
        if split == "valid":
            return users, [self.train_seqs[u] for u in users], self.valid_targets[users]
        if split == "test":
            seqs = [np.append(self.train_seqs[u], self.valid_targets[u]) for u in users]
            return users, seqs, self.test_targets[users]
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def train_view(self) -> "TrainView":
        """Return the view handed to methods: training sequences and item texts only."""
        return TrainView(
            name=self.name,
            item_ids=self.item_ids,
            item_texts=self.item_texts,
            user_ids=self.user_ids,
            train_seqs=self.train_seqs,
            fingerprint=self.fingerprint,
        )

    def describe_evaluation(self) -> str:
        """Return e.g. '1 of 3 users evaluated; 2 have fewer than 3 interactions'."""
        n_eval = int(len(self.evaluated_users))
        short = self.n_users - n_eval
        return (
            f"{n_eval} of {self.n_users} users evaluated; "
            f"{short} have fewer than 3 interactions"
        )


_HIDDEN = ("valid_targets", "test_targets", "eval_inputs", "evaluated_users")


@dataclass(frozen=True)
class TrainView:
    """Training-only view of a :class:`SplitData`, the only data a method sees.

    Reading validation or test attributes raises :class:`LeakageError` so that
    leakage fails loudly instead of silently improving a method.
    """

    name: str
    item_ids: tuple[str, ...]
    item_texts: tuple[str, ...]
    user_ids: tuple[str, ...]
    train_seqs: tuple[np.ndarray, ...]
    fingerprint: str

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def __getattr__(self, name: str):
        if name in _HIDDEN:
            raise LeakageError(
                f"{name!r} is not available to methods: they receive training "
                "sequences only. Use the context's validation probe instead."
            )
        raise AttributeError(name)


def fingerprint_content(
    item_ids, item_texts, user_ids, train_seqs, valid_targets, test_targets
) -> str:
    """Hash the processed dataset content into a hex SHA-256 digest."""
    h = hashlib.sha256()
    for value in item_ids:
        h.update(value.encode("utf-8") + b"\x1f")
    h.update(b"\x1e")
    for value in item_texts:
        h.update(value.encode("utf-8") + b"\x1f")
    h.update(b"\x1e")
    for value in user_ids:
        h.update(value.encode("utf-8") + b"\x1f")
    h.update(b"\x1e")
    for seq in train_seqs:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"\x1f")
    h.update(np.asarray(valid_targets, dtype=np.int64).tobytes())
    h.update(np.asarray(test_targets, dtype=np.int64).tobytes())
    return h.hexdigest()
