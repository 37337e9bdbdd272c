"""Ranking metrics against hand-computed values and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from bench.metrics import metrics_from_ranks, mrr_at_k, ndcg_at_k, recall_at_k

RANKS = np.array([1, 2, 3, 10, 11])


def test_ndcg_hand_computed_ranks():
    expected = [1.0, 0.630930, 0.5, 0.289065, 0.0]
    np.testing.assert_allclose(ndcg_at_k(RANKS, 10), expected, atol=1e-6)


def test_ndcg_mean_hand_computed():
    assert metrics_from_ranks(RANKS, (10,))["ndcg@10"] == pytest.approx(0.483999, abs=1e-6)


def test_recall_mean_hand_computed():
    assert metrics_from_ranks(RANKS, (10,))["recall@10"] == pytest.approx(0.8)


def test_mrr_hand_computed():
    np.testing.assert_allclose(mrr_at_k(RANKS, 10), [1, 0.5, 1 / 3, 0.1, 0], atol=1e-6)
    assert metrics_from_ranks(RANKS, (10,))["mrr@10"] == pytest.approx(0.386667, abs=1e-6)


def test_ndcg_rank_one_is_one_not_natural_log():
    assert ndcg_at_k(np.array([1]), 10)[0] == 1.0


def test_ndcg_matches_sklearn():
    n_items = 30
    rng = np.random.default_rng(0)
    for rank in range(1, 25):
        # A score vector that puts the single relevant item at 1-based ``rank``, no ties.
        scores = np.linspace(1.0, 0.0, n_items)
        relevance = np.zeros(n_items)
        relevance[rank - 1] = 1.0
        perm = rng.permutation(n_items)
        expected = ndcg_score(relevance[perm][None], scores[perm][None], k=10)
        assert ndcg_at_k(np.array([rank]), 10)[0] == pytest.approx(expected, abs=1e-12)


def test_recall_cutoff_inclusive():
    assert recall_at_k(np.array([10, 11]), 10).tolist() == [1.0, 0.0]


def test_metrics_reject_empty_ranks():
    with pytest.raises(ValueError, match="no evaluated users"):
        metrics_from_ranks(np.array([], dtype=int))


def test_metrics_reject_zero_rank():
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks(np.array([0, 1]))
