"""``full``: every training sequence, the full-data reference.

It goes through the same evaluator path as every other method, so its row
is the accuracy an equally trained learner reaches on all the data.
"""

from __future__ import annotations

from bench.method import Method
from bench.registry import register
from bench.synthetic import SyntheticSet


@register("full")
class FullData(Method):
    """All training sequences with at least two items, each cut to the learner's input length."""

    family = "reference"
    uses_budget = False

    def distill(self, train, budget, context) -> SyntheticSet:
        seqs = [s for s in train.train_seqs if len(s) >= 2]
        max_len = context.cache.learner.max_len + 1
        return SyntheticSet.from_sequences(seqs, train.n_items, max_len, meta={"selected": len(seqs)})
