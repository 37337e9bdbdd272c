"""Selection coresets: head, herding and k-center on hand-made points and a real steam slice."""

import numpy as np
import pytest
import torch

from bench.errors import BudgetError
from bench.method import Budget
from bench.registry import build_method
from methods.coresets import head_select, herding_select, kcenter_select
from methods.random_subset import eligible_users
from tests.conftest import method_context

SELECTORS = {"head": None, "herding": herding_select, "kcenter": kcenter_select}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _min_distance(points, selected, index):
    return min(np.linalg.norm(points[index] - points[s]) for s in selected)


# head ----------------------------------------------------------------------


def test_head_picks_longest():
    picks = head_select(np.array([3, 9, 5, 8, 2]), 2, _rng())
    assert sorted(picks.tolist()) == [1, 3]


def test_head_orders_longest_first():
    picks = head_select(np.array([3, 9, 5, 8, 2]), 3, _rng())
    assert picks.tolist() == [1, 3, 2]


def test_head_ties_same_seed_same_picks():
    lengths = np.full(40, 7)
    assert head_select(lengths, 5, _rng(3)).tolist() == head_select(lengths, 5, _rng(3)).tolist()


def test_head_ties_depend_on_seed():
    lengths = np.full(40, 7)
    picks = {tuple(sorted(head_select(lengths, 5, _rng(seed)).tolist())) for seed in range(5)}
    assert len(picks) > 1


def test_head_ties_never_displace_longer():
    lengths = np.array([4, 4, 4, 9, 4, 4])
    for seed in range(5):
        assert 3 in head_select(lengths, 2, _rng(seed)).tolist()


# herding -------------------------------------------------------------------


def test_herding_hand_made_picks():
    # Mean 2.5: 1 is nearest; then {1, 0} has mean 0.5, closer than {1, -1} (0) or {1, 10} (5.5).
    points = np.array([[0.0], [1.0], [10.0], [-1.0]])
    assert herding_select(points, 2, _rng()).tolist() == [1, 0]


def test_herding_each_pick_moves_mean_closest():
    points = _rng(1).normal(size=(60, 5))
    picks = herding_select(points, 12, _rng(2))
    mean = points.mean(axis=0)
    for step in range(len(picks)):
        chosen = list(picks[:step])
        gaps = {
            c: np.linalg.norm(points[chosen + [c]].mean(axis=0) - mean)
            for c in range(len(points)) if c not in chosen
        }
        assert gaps[picks[step]] == pytest.approx(min(gaps.values()), abs=1e-12)


def test_herding_mean_gap_below_random():
    points = _rng(4).normal(size=(500, 8))
    herded = points[herding_select(points, 20, _rng())].mean(axis=0)
    drawn = points[_rng(5).choice(500, 20, replace=False)].mean(axis=0)
    mean = points.mean(axis=0)
    assert np.linalg.norm(herded - mean) < np.linalg.norm(drawn - mean)


# k-center ------------------------------------------------------------------


def test_kcenter_second_pick_is_farthest():
    points = np.array([[0.0], [1.0], [10.0]])
    for seed in range(6):
        first, second = kcenter_select(points, 2, _rng(seed)).tolist()
        expected = 0 if first == 2 else 2
        assert second == expected


def test_kcenter_each_pick_is_farthest():
    points = _rng(6).normal(size=(80, 4))
    picks = kcenter_select(points, 10, _rng(7))
    for step in range(1, len(picks)):
        chosen = list(picks[:step])
        gaps = [_min_distance(points, chosen, c) for c in range(len(points)) if c not in chosen]
        assert _min_distance(points, chosen, picks[step]) == pytest.approx(max(gaps))


def test_kcenter_start_depends_on_seed():
    points = _rng(8).normal(size=(50, 3))
    starts = {int(kcenter_select(points, 1, _rng(seed))[0]) for seed in range(6)}
    assert len(starts) > 1


# shared rules ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["herding", "kcenter"])
def test_selector_same_seed_same_picks(name):
    points = _rng(9).normal(size=(100, 6))
    select = SELECTORS[name]
    assert select(points, 10, _rng(11)).tolist() == select(points, 10, _rng(11)).tolist()


@pytest.mark.parametrize("name", ["herding", "kcenter"])
def test_selector_ties_depend_on_seed(name):
    # Four copies of one point: every pick is a tie that the seeded order breaks.
    points = np.zeros((4, 2))
    select = SELECTORS[name]
    firsts = {int(select(points, 1, _rng(seed))[0]) for seed in range(8)}
    assert len(firsts) > 1


@pytest.mark.parametrize("name", ["head", "herding", "kcenter"])
def test_selector_never_repeats_with_duplicates(name):
    # Three distinct points, each four times; selecting 10 must still give 10 indices.
    points = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]), 4, axis=0)
    if name == "head":
        picks = head_select(np.repeat([5, 6, 7], 4), 10, _rng())
    else:
        picks = SELECTORS[name](points, 10, _rng())
    assert len(set(picks.tolist())) == 10


@pytest.mark.parametrize("name", ["herding", "kcenter"])
def test_selector_selects_all_points(name):
    points = _rng(12).normal(size=(7, 3))
    picks = SELECTORS[name](points, 7, _rng())
    assert sorted(picks.tolist()) == list(range(7))


@pytest.mark.parametrize("name", ["head", "herding", "kcenter"])
def test_selector_too_many_raises(name):
    with pytest.raises(ValueError, match="cannot select 6 of 5"):
        if name == "head":
            head_select(np.arange(5), 6, _rng())
        else:
            SELECTORS[name](np.zeros((5, 2)), 6, _rng())


# registered methods on a real slice ---------------------------------------------


@pytest.mark.parametrize("name", ["head", "herding", "kcenter"])
def test_method_budget_above_eligible_raises(name, steam_cache):
    train = steam_cache.data.train_view()
    too_many = len(eligible_users(train)) + 1
    with pytest.raises(BudgetError, match="exceeds"):
        build_method(name).distill(train, Budget(too_many, 10), method_context(steam_cache))


@pytest.mark.parametrize("name", ["head", "herding", "kcenter"])
def test_method_truncates_chosen_sequences(name, steam_cache):
    train = steam_cache.data.train_view()
    out = build_method(name).distill(train, Budget(6, 4), method_context(steam_cache))
    by_user = dict(zip(train.user_ids, train.train_seqs))
    for row, user in zip(out.hard, out.meta["users"]):
        expected = by_user[user][-4:]
        assert row[row > 0].tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["head", "herding", "kcenter"])
def test_method_records_selection_seconds(name, steam_cache):
    out = build_method(name).distill(steam_cache.data.train_view(), Budget(5, 10), method_context(steam_cache))
    assert out.meta["selection_s"] >= 0.0


@pytest.mark.parametrize("name", ["herding", "kcenter"])
def test_method_matches_selector_on_representations(name, steam_cache):
    train = steam_cache.data.train_view()
    context = method_context(steam_cache, seed=4)
    out = build_method(name).distill(train, Budget(8, 10), context)
    users = eligible_users(train)
    points = steam_cache.sequence_representations()[users]
    expected = users[SELECTORS[name](points, 8, context.numpy_rng(name))]
    assert out.meta["users"] == [train.user_ids[u] for u in expected]


def test_head_method_picks_longest_histories(steam_cache):
    train = steam_cache.data.train_view()
    out = build_method("head").distill(train, Budget(10, 10), method_context(steam_cache))
    lengths = dict(zip(train.user_ids, (len(s) for s in train.train_seqs)))
    chosen = sorted(lengths[u] for u in out.meta["users"])
    longest = sorted(len(train.train_seqs[u]) for u in eligible_users(train))[-10:]
    assert chosen == longest
