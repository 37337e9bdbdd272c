"""``random``: a uniform random subset of real training sequences.

Every leaderboard shows it at each budget: a distiller that does not beat it
under the same protocol has not condensed anything.
"""

from __future__ import annotations

import numpy as np

from bench.method import Method
from bench.registry import register
from bench.synthetic import SyntheticSet


def eligible_users(train) -> np.ndarray:
    """Indices of training sequences with at least two items (one training pair)."""
    return np.flatnonzero([len(s) >= 2 for s in train.train_seqs])


@register("random")
class RandomSubset(Method):
    """``m`` sequences drawn uniformly without replacement, each truncated to its last ``L`` items."""

    family = "coreset"

    def distill(self, train, budget, context) -> SyntheticSet:
        users = eligible_users(train)
        budget.check_against(len(users))
        chosen = np.sort(context.numpy_rng("random-subset").choice(users, budget.n_sequences, replace=False))
        seqs = [train.train_seqs[u] for u in chosen]
        return SyntheticSet.from_sequences(
            seqs, train.n_items, budget.seq_len, meta={"users": [train.user_ids[u] for u in chosen]}
        )
