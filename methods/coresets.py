"""Selection coresets over real training sequences: ``head``, ``herding`` and ``kcenter``.

Each method returns ``m`` distinct training sequences with at least two items,
each truncated to its last ``L`` items, so it is compared with the distillers
at the same budget and under the same evaluation protocol.

- ``head``: the ``m`` longest training histories.
- ``herding``: the herding exemplar selection of Rebuffi et al., "iCaRL:
  Incremental Classifier and Representation Learning" (CVPR 2017). Each step
  adds the sequence that brings the mean representation of the selected set
  closest, in Euclidean distance, to the mean over all eligible sequences.
- ``kcenter``: the greedy k-center selection of Sener and Savarese, "Active
  Learning for Convolutional Neural Networks: A Core-Set Approach" (ICLR 2018).
  It starts from a random sequence, then adds the sequence whose distance to
  its nearest selected sequence is largest.

Herding and k-center run on ``phi(s)``, the best expert checkpoint's
last-position hidden state of each training sequence, which the shared cache
computes once per dataset. Every pick is one pass of vectorised array
arithmetic over all candidates, so a pick costs ``O(n d)``.

Ties are broken by a seeded random order of the candidates. A selector
therefore returns the same set for the same seed, and it takes equal candidates
(for example histories of equal length under ``head``) in an order that
depends on the seed.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from bench.method import Method
from bench.registry import register
from bench.synthetic import SyntheticSet
from methods.random_subset import eligible_users

logger = logging.getLogger(__name__)


# Selection rules ----------------------------------------------------------


def _check_request(n_points: int, n_select: int) -> None:
    if n_select < 1:
        raise ValueError(f"n_select must be >= 1, got {n_select}")
    if n_select > n_points:
        raise ValueError(f"cannot select {n_select} of {n_points} points; request at most {n_points}")


def head_select(lengths: np.ndarray, n_select: int, rng: np.random.Generator) -> np.ndarray:
    """Select the ``n_select`` longest sequences.

    Args:
        lengths: ``(n,)`` sequence lengths.
        n_select: number of sequences to select.
        rng: generator of the tie-breaking order among equal lengths.

    Returns:
        ``(n_select,)`` distinct indices into ``lengths``, longest first.

    Raises:
        ValueError: if ``n_select`` is below 1 or above ``len(lengths)``.
    """
    lengths = np.asarray(lengths)
    _check_request(len(lengths), n_select)
    order = rng.permutation(len(lengths))
    # A stable sort keeps the seeded order among sequences of equal length.
    ranked = order[np.argsort(-lengths[order], kind="stable")]
    return ranked[:n_select]


def herding_select(points: np.ndarray, n_select: int, rng: np.random.Generator) -> np.ndarray:
    """Select points greedily so that the selected mean tracks the mean of all points.

    After ``t`` picks with sum ``s``, the next pick ``x`` minimises
    ``||(s + x) / (t + 1) - mu||``, which equals minimising
    ``||x - ((t + 1) mu - s)||``: one nearest-neighbour query per pick.

    Args:
        points: ``(n, d)`` representations.
        n_select: number of points to select.
        rng: generator of the tie-breaking order.

    Returns:
        ``(n_select,)`` distinct indices into ``points`` in pick order.

    Raises:
        ValueError: if ``n_select`` is below 1 or above ``len(points)``.
    """
    _check_request(len(points), n_select)
    order = rng.permutation(len(points))
    x = np.asarray(points, dtype=np.float64)[order]
    mean = x.mean(axis=0)
    squared_norms = np.einsum("ij,ij->i", x, x)
    is_selected = np.zeros(len(x), dtype=bool)
    total = np.zeros_like(mean)
    picks = np.empty(n_select, dtype=np.int64)
    for step in range(n_select):
        target = (step + 1) * mean - total
        # ||x - target||^2 without the constant ||target||^2.
        score = squared_norms - 2.0 * (x @ target)
        score[is_selected] = np.inf
        pick = int(np.argmin(score))
        picks[step] = pick
        is_selected[pick] = True
        total += x[pick]
    return order[picks]


def kcenter_select(points: np.ndarray, n_select: int, rng: np.random.Generator) -> np.ndarray:
    """Select points by greedy farthest-point traversal from a random start.

    Args:
        points: ``(n, d)`` representations.
        n_select: number of points to select.
        rng: generator of the start point and the tie-breaking order.

    Returns:
        ``(n_select,)`` distinct indices into ``points`` in pick order.

    Raises:
        ValueError: if ``n_select`` is below 1 or above ``len(points)``.
    """
    _check_request(len(points), n_select)
    order = rng.permutation(len(points))
    x = np.asarray(points, dtype=np.float64)[order]
    picks = np.empty(n_select, dtype=np.int64)
    # The first point of the seeded order is a uniformly random start.
    picks[0] = 0
    nearest = np.full(len(x), np.inf)
    for step in range(1, n_select):
        diff = x - x[picks[step - 1]]
        np.minimum(nearest, np.einsum("ij,ij->i", diff, diff), out=nearest)
        # Selected points have distance 0; -1 keeps them out even when every
        # remaining point duplicates a selected one.
        nearest[picks[:step]] = -1.0
        picks[step] = int(np.argmax(nearest))
    return order[picks]


# Methods ------------------------------------------------------------------


def selected_set(train, users: np.ndarray, budget, meta: dict) -> SyntheticSet:
    """Build the hard set of the chosen users' last ``budget.seq_len`` items.

    Args:
        train: the training view.
        users: indices into ``train.train_seqs``, in selection order.
        budget: the budget whose ``seq_len`` truncates each sequence.
        meta: JSON-ready entries stored in ``SyntheticSet.meta``.

    Returns:
        The hard set; ``meta["users"]`` contains the raw user ids in selection order.
    """
    users = [int(u) for u in users]
    seqs = [train.train_seqs[u] for u in users]
    meta = {"users": [train.user_ids[u] for u in users], **meta}
    return SyntheticSet.from_sequences(seqs, train.n_items, budget.seq_len, meta=meta)


class _RepresentationCoreset(Method):
    """A selector that runs on the expert's sequence representations of eligible users."""

    family = "coreset"
    needs_expert = True
    needs_representations = True

    def select(self, points: np.ndarray, n_select: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def distill(self, train, budget, context) -> SyntheticSet:
        users = eligible_users(train)
        budget.check_against(len(users))
        # Shared, cached per dataset and recorded as amortised, so it is outside selection_s.
        points = context.cache.sequence_representations()[users]

        start = time.perf_counter()
        chosen = users[self.select(points, budget.n_sequences, context.numpy_rng(self.name))]
        selection_s = time.perf_counter() - start
        logger.info("%s selected %d of %d sequences in %.3f s", self.name, len(chosen), len(users), selection_s)
        return selected_set(train, chosen, budget, {"selection_s": selection_s})


@register("head")
class HeadUsers(Method):
    """The ``m`` users with the longest training histories (ties in seeded random order)."""

    family = "coreset"

    def distill(self, train, budget, context) -> SyntheticSet:
        users = eligible_users(train)
        budget.check_against(len(users))

        start = time.perf_counter()
        lengths = np.array([len(train.train_seqs[u]) for u in users])
        chosen = users[head_select(lengths, budget.n_sequences, context.numpy_rng(self.name))]
        selection_s = time.perf_counter() - start
        logger.info("head selected %d of %d sequences in %.3f s", len(chosen), len(users), selection_s)
        return selected_set(train, chosen, budget, {"selection_s": selection_s})


@register("herding")
class Herding(_RepresentationCoreset):
    """Greedy herding on expert sequence representations (see the module docstring)."""

    def select(self, points, n_select, rng):
        return herding_select(points, n_select, rng)


@register("kcenter")
class KCenter(_RepresentationCoreset):
    """Greedy k-center on expert sequence representations (see the module docstring)."""

    def select(self, points, n_select, rng):
        return kcenter_select(points, n_select, rng)
