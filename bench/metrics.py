"""Ranking metrics for one held-out target per user.

With 1-based rank ``r`` of the target among all candidate items:
Recall@K = 1 if r <= K (equal to HR@K under leave-one-out),
NDCG@K = 1 / log2(r + 1) if r <= K (the ideal DCG of one relevant item is 1),
MRR@K = 1 / r if r <= K. Every metric here is higher-is-better.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("recall", "ndcg", "mrr")
HIGHER_IS_BETTER = {name: True for name in METRIC_NAMES}


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k from 1-based ranks."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k from 1-based ranks (log base 2, rank offset +1)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def mrr_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user reciprocal rank truncated at k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / ranks, 0.0)


_FUNCS = {"recall": recall_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k}


def metrics_from_ranks(ranks: np.ndarray, ks=(10, 20, 50)) -> dict[str, float]:
    """Mean of every metric at every k, keyed like ``'ndcg@10'``.

    Raises:
        ValueError: if ``ranks`` is empty, because a mean over no users is
            undefined and must not be reported as 0.
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no evaluated users: metrics are undefined")
    if ranks.min() < 1:
        raise ValueError(f"ranks are 1-based; got minimum {ranks.min()}")
    out = {}
    for k in ks:
        for name in METRIC_NAMES:
            out[f"{name}@{k}"] = float(_FUNCS[name](ranks, k).mean())
    return out
