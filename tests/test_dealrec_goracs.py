"""DEALRec and GORACS components on hand-made cases and a real steam slice."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from bench.errors import BudgetError, ConfigError
from bench.learner import LearnerConfig, TextSASRec
from bench.method import Budget
from bench.registry import build_method, get_method
from methods.dealrec import (
    coverage_stratified_sample,
    gradient_layer,
    iter_sequence_gradients,
    lissa_inverse_hvp,
    min_max_normalise,
    sequence_losses,
    truncated_matrix,
)
from methods.goracs import (
    exchange_refinement,
    greedy_initialisation,
    target_count,
    transport_cost_matrix,
    transport_distance,
    transport_duals,
)
from methods.random_subset import eligible_users
from tests.conftest import method_context


@pytest.fixture(scope="module")
def small_model(steam_cache):
    """An untrained 8-wide learner on the slice's real text vectors (dropout off)."""
    torch.manual_seed(0)
    model = TextSASRec(steam_cache.text_vectors(), LearnerConfig(hidden=8, layers=1, dropout=0.0, max_len=20))
    return model.eval()


@pytest.fixture(scope="module")
def slice_seqs(steam_cache):
    """The last 10 items of 24 eligible real sequences."""
    train = steam_cache.data.train_view()
    return truncated_matrix(train, eligible_users(train)[:24], 10)


# Per-sequence losses and gradients --------------------------------------------


def test_sequence_losses_weighted_mean_equals_hard_loss(small_model, slice_seqs):
    losses = sequence_losses(small_model, slice_seqs)
    counts = ((slice_seqs[:, 1:] > 0) & (slice_seqs[:, :-1] > 0)).sum(dim=1)
    weighted = ((losses * counts).sum() / counts.sum()).item()
    assert weighted == pytest.approx(small_model.hard_loss(slice_seqs).item(), rel=1e-5)


def test_sampled_loss_with_every_item_equals_full(small_model, slice_seqs):
    every_item = torch.arange(1, small_model.n_items + 1)
    sampled = sequence_losses(small_model, slice_seqs, negatives=every_item)
    assert torch.allclose(sampled, sequence_losses(small_model, slice_seqs), atol=1e-5)


def test_sampled_loss_below_full(small_model, slice_seqs):
    negatives = torch.arange(1, 51)
    sampled = sequence_losses(small_model, slice_seqs, negatives=negatives)
    assert bool((sampled < sequence_losses(small_model, slice_seqs)).all())


@pytest.mark.parametrize("sampled", [False, True])
def test_batched_gradients_match_one_by_one(small_model, slice_seqs, sampled):
    negatives = torch.arange(1, 41) if sampled else None
    seqs = slice_seqs[:6]
    batched = torch.cat(list(iter_sequence_gradients(small_model, seqs, 4, negatives=negatives)))
    weight = gradient_layer(small_model).weight
    for row in range(len(seqs)):
        loss = sequence_losses(small_model, seqs[row:row + 1], negatives=negatives)[0]
        (expected,) = torch.autograd.grad(loss, weight)
        assert torch.allclose(batched[row], expected.reshape(-1), atol=1e-6)


def test_lissa_matches_exact_damped_solve(small_model, slice_seqs):
    seqs = slice_seqs[:12]
    negatives = torch.arange(1, 31)
    weight = gradient_layer(small_model).weight
    shape = weight.shape

    def loss_at(flat_weight):
        # A plain tensor in place of the parameter makes the loss a function of it for autograd.
        layer = gradient_layer(small_model)
        saved = layer.weight
        del layer.weight
        layer.weight = flat_weight.reshape(shape)
        try:
            return sequence_losses(small_model, seqs, negatives=negatives).mean()
        finally:
            del layer.weight
            layer.weight = saved

    flat = weight.detach().reshape(-1).clone()
    hessian = torch.autograd.functional.hessian(loss_at, flat, vectorize=True)
    vector = torch.randn(len(flat), generator=torch.Generator().manual_seed(0))
    damping, scale = 0.1, 10.0
    exact = torch.linalg.solve(hessian + damping * scale * torch.eye(len(flat)), vector)
    estimate, change = lissa_inverse_hvp(
        small_model, vector, seqs, depth=200, batch_size=len(seqs), damping=damping, scale=scale,
        generator=torch.Generator().manual_seed(0), negatives=negatives,
    )
    assert torch.allclose(estimate, exact, rtol=1e-3, atol=1e-4)
    assert change < 1e-6


def test_lissa_divergence_raises_config_error(small_model, slice_seqs):
    vector = torch.ones(gradient_layer(small_model).weight.numel())
    with pytest.raises(ConfigError, match="raise lissa_scale"):
        lissa_inverse_hvp(small_model, vector * 1e30, slice_seqs, depth=50, batch_size=8, damping=0.0,
                          scale=1e-6, generator=torch.Generator().manual_seed(0))


# Coverage-enhanced sampling ----------------------------------------------------


def test_stratified_sample_covers_sparse_stratum():
    # 100 scores in the low stratum, 10 in the high one: the fewest-first rule
    # gives the high stratum min(10, 10 // 2) = 5 draws and the low one the rest.
    scores = np.concatenate([np.linspace(0.0, 0.1, 100), np.linspace(0.9, 1.0, 10)])
    picks = coverage_stratified_sample(scores, 10, strata=2, hard_prune=0.0, rng=np.random.default_rng(0))
    assert int((scores[picks] >= 0.9).sum()) == 5


def test_stratified_sample_drops_hardest():
    scores = np.linspace(0.0, 1.0, 100)
    picks = coverage_stratified_sample(scores, 30, strata=4, hard_prune=0.2, rng=np.random.default_rng(1))
    assert scores[picks].max() < scores[80]


def test_stratified_sample_prunes_less_to_fill_budget():
    scores = np.linspace(0.0, 1.0, 10)
    picks = coverage_stratified_sample(scores, 9, strata=3, hard_prune=0.5, rng=np.random.default_rng(2))
    assert sorted(picks.tolist()) == list(range(9))


@pytest.mark.parametrize("seed", range(5))
def test_stratified_sample_fills_budget_without_repeats(seed):
    rng = np.random.default_rng(seed)
    scores = rng.exponential(size=200)
    picks = coverage_stratified_sample(scores, 37, strata=25, hard_prune=0.1, rng=rng)
    assert len(set(picks.tolist())) == 37


def test_stratified_sample_same_seed_same_picks():
    scores = np.random.default_rng(3).random(80)
    first = coverage_stratified_sample(scores, 12, 6, 0.1, np.random.default_rng(9))
    second = coverage_stratified_sample(scores, 12, 6, 0.1, np.random.default_rng(9))
    assert first.tolist() == second.tolist()


def test_stratified_sample_too_many_raises():
    with pytest.raises(ValueError, match="cannot draw 6 of 5"):
        coverage_stratified_sample(np.zeros(5), 6, 2, 0.0, np.random.default_rng(0))


def test_min_max_normalise_constant_gives_zeros():
    assert min_max_normalise(np.full(4, 3.0)).tolist() == [0.0] * 4


# Transport ------------------------------------------------------------------------


def _linprog_transport(rows):
    k, n = rows.shape
    equalities = []
    for i in range(k):
        row = np.zeros((k, n))
        row[i] = 1
        equalities.append(row.ravel())
    for j in range(n):
        col = np.zeros((k, n))
        col[:, j] = 1
        equalities.append(col.ravel())
    masses = [1 / k] * k + [1 / n] * n
    return linprog(rows.ravel(), A_eq=np.array(equalities), b_eq=masses, bounds=(0, None), method="highs").fun


def test_transport_distance_matches_dense_linprog():
    rows = np.random.default_rng(0).random((3, 12))
    assert transport_distance(rows) == pytest.approx(_linprog_transport(rows), abs=1e-9)


def test_transport_distance_hand_made():
    # Row 0 is cheap for columns 0-1 and row 1 for columns 2-3: each row serves its own pair.
    rows = np.array([[0.0, 0.2, 1.0, 1.0], [1.0, 1.0, 0.4, 0.0]])
    assert transport_distance(rows) == pytest.approx((0.0 + 0.2 + 0.4 + 0.0) / 4)


def test_transport_distance_rejects_uneven_split():
    with pytest.raises(ValueError, match="not a multiple"):
        transport_distance(np.zeros((3, 4)))


def test_transport_duals_are_feasible():
    rows = np.random.default_rng(1).random((4, 20))
    u, v = transport_duals(rows)
    assert (rows - u[:, None] - v[None, :]).min() >= -1e-9


def test_transport_duals_give_distance():
    rows = np.random.default_rng(2).random((4, 20))
    u, v = transport_duals(rows)
    assert u.mean() + v.mean() == pytest.approx(transport_distance(rows), abs=1e-9)


def test_cost_matrix_in_unit_range():
    rng = np.random.default_rng(3)
    cost = transport_cost_matrix(rng.normal(size=(30, 4)), rng.normal(size=(10, 4)), rng.random(30), 0.5)
    assert cost.min() == pytest.approx(0.0)
    assert cost.max() == pytest.approx(1.0)


def test_cost_matrix_gradient_lowers_cost():
    # Two identical representations; the one with the larger gradient norm is cheaper everywhere.
    pool = np.array([[0.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    targets = np.array([[0.0, 0.0], [1.0, 1.0]])
    cost = transport_cost_matrix(pool, targets, np.array([0.1, 0.9, 0.5]), 0.3)
    assert bool((cost[1] < cost[0]).all())


def test_greedy_initialisation_hand_made():
    # Row 1 has the smallest total; then row 0 covers column 0 best.
    cost = np.array([[0.0, 0.9, 0.9], [0.5, 0.1, 0.1], [0.9, 0.2, 0.0]])
    assert greedy_initialisation(cost, 2).tolist() == [1, 0]


def test_greedy_initialisation_never_repeats():
    cost = np.zeros((5, 4))
    assert sorted(greedy_initialisation(cost, 5).tolist()) == [0, 1, 2, 3, 4]


def test_refinement_never_raises_distance():
    rng = np.random.default_rng(4)
    cost = rng.random((40, 12))
    start = greedy_initialisation(cost, 3)
    chosen, history, _ = exchange_refinement(cost, start, max_swaps=20, exchange_candidates=5)
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    assert transport_distance(cost[chosen]) == pytest.approx(history[-1])


def test_refinement_reaches_swap_local_optimum():
    rng = np.random.default_rng(5)
    cost = rng.random((10, 6))
    start = greedy_initialisation(cost, 2)
    chosen, history, _ = exchange_refinement(cost, start, max_swaps=50, exchange_candidates=10)
    best_swap = min(
        transport_distance(cost[np.where(chosen == out, into, chosen)])
        for out, into in itertools.product(chosen, set(range(10)) - set(chosen.tolist()))
    )
    assert best_swap >= history[-1] - 1e-12


def test_target_count_rounds_to_budget_multiple():
    assert target_count(20, 500, 10_000) == 500
    assert target_count(30, 500, 10_000) == 510
    assert target_count(30, 500, 200) == 180


# Registered methods on a real slice ----------------------------------------------


@pytest.mark.parametrize("name", ["dealrec", "goracs"])
def test_method_selects_distinct_eligible_users(name, steam_cache):
    train = steam_cache.data.train_view()
    method = build_method(name, get_method(name).test_overrides)
    out = method.distill(train, Budget(7, 10), method_context(steam_cache))
    eligible = {train.user_ids[u] for u in eligible_users(train)}
    assert len(set(out.meta["users"])) == 7
    assert set(out.meta["users"]) <= eligible


@pytest.mark.parametrize("name", ["dealrec", "goracs"])
def test_method_records_phase_seconds(name, steam_cache):
    method = build_method(name, get_method(name).test_overrides)
    meta = method.distill(steam_cache.data.train_view(), Budget(5, 10), method_context(steam_cache)).meta
    assert meta["selection_s"] >= 0.0
    assert meta["candidates"] == 60


@pytest.mark.parametrize("name", ["dealrec", "goracs"])
def test_method_budget_above_eligible_raises(name, steam_cache):
    train = steam_cache.data.train_view()
    too_many = len(eligible_users(train)) + 1
    with pytest.raises(BudgetError, match="exceeds"):
        build_method(name, get_method(name).test_overrides).distill(train, Budget(too_many, 10),
                                                                    method_context(steam_cache))


@pytest.mark.parametrize("name,key", [("dealrec", "effort_epoch"), ("goracs", "grad_epoch")])
def test_method_epoch_beyond_expert_raises(name, key, steam_cache):
    method = build_method(name, {**get_method(name).test_overrides, key: 3})
    with pytest.raises(ConfigError, match="has 2 epochs"):
        method.distill(steam_cache.data.train_view(), Budget(5, 10), method_context(steam_cache))


def test_goracs_refinement_lowers_transport(steam_cache):
    method = build_method("goracs", {**get_method("goracs").test_overrides, "max_swaps": 10})
    meta = method.distill(steam_cache.data.train_view(), Budget(5, 10), method_context(steam_cache)).meta
    assert meta["transport_final"] <= meta["transport_initial"]


@pytest.mark.parametrize("name,key,value", [
    ("dealrec", "hard_prune", 1.0), ("dealrec", "lissa_scale", 0.0), ("dealrec", "strata", 0),
    ("goracs", "exchange_candidates", 0), ("goracs", "grad_weight", -0.1),
])
def test_config_out_of_range_raises(name, key, value):
    with pytest.raises(ConfigError, match=key):
        build_method(name, {key: value})
