"""TD3: Tucker expander, inner losses, differentiable Adam, and the method on real data."""

import pytest
import torch

from bench.context import MethodContext
from bench.errors import CappedError, ConfigError
from bench.functional import AdamSettings, FunctionalLearner, adam_init, adam_step, run_adam
from bench.learner import LearnerConfig, TextSASRec
from bench.method import Budget
from bench.profiling import CostMeter
from bench.registry import build_method
from bench.synthetic import SyntheticSet
from methods.td3 import TD3, expand_tucker, last_and_cut_loss

N_ITEMS = 30


def _learner(vectors, dtype=torch.float32):
    torch.manual_seed(0)
    learner = TextSASRec(vectors[:N_ITEMS], LearnerConfig(hidden=8, layers=1, max_len=10, dropout=0.0))
    return learner.to(dtype).eval()


# Factors and losses -------------------------------------------------------------


def test_tucker_expander_matches_explicit_sum():
    generator = torch.Generator().manual_seed(0)
    factors = {
        "core": torch.randn(2, 3, 4, generator=generator),
        "user": torch.randn(5, 2, generator=generator),
        "position": torch.randn(6, 3, generator=generator),
        "item": torch.randn(7, 4, generator=generator),
    }
    expected = torch.zeros(5, 6, 7)
    for p in range(2):
        for q in range(3):
            for r in range(4):
                expected += (
                    factors["core"][p, q, r]
                    * factors["user"][:, p, None, None]
                    * factors["position"][None, :, q, None]
                    * factors["item"][None, None, :, r]
                )
    assert torch.allclose(expand_tucker(factors), expected, atol=1e-5)


def _soft_cross_entropy_of_prefix(learner, probs, rows, target):
    # The reference: encode the prefix as a sequence of its own and predict one row.
    item_emb = learner.item_embeddings()
    inputs = learner.embed_soft(probs[None, :rows], item_emb)
    hidden = learner.encode(inputs, torch.zeros(1, rows, dtype=torch.bool))[:, -1]
    return -(probs[target] * torch.log_softmax(hidden @ item_emb.T, dim=-1)).sum()


def test_cut_loss_encodes_prefix_as_own_sequence(games_vectors):
    learner = _learner(games_vectors)
    probs = torch.softmax(torch.randn(2, 6, N_ITEMS, generator=torch.Generator().manual_seed(1)), dim=-1)
    cuts = torch.tensor([2, 4])
    expected = torch.stack([
        _soft_cross_entropy_of_prefix(learner, probs[0], 5, 5),
        _soft_cross_entropy_of_prefix(learner, probs[1], 5, 5),
        _soft_cross_entropy_of_prefix(learner, probs[0], 2, 2),
        _soft_cross_entropy_of_prefix(learner, probs[1], 4, 4),
    ]).mean()
    assert torch.allclose(last_and_cut_loss(learner, probs, cuts), expected, atol=1e-5)


def test_last_row_loss_without_cuts(games_vectors):
    learner = _learner(games_vectors)
    probs = torch.softmax(torch.randn(2, 6, N_ITEMS, generator=torch.Generator().manual_seed(1)), dim=-1)
    expected = torch.stack([
        _soft_cross_entropy_of_prefix(learner, probs[0], 5, 5),
        _soft_cross_entropy_of_prefix(learner, probs[1], 5, 5),
    ]).mean()
    assert torch.allclose(last_and_cut_loss(learner, probs, None), expected, atol=1e-5)


# Differentiable Adam ------------------------------------------------------------


def test_adam_step_matches_torch_adam():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(20, generator=generator)
    target = torch.randn(20, generator=generator)
    reference = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([reference], lr=0.05)
    params, state = (start.clone(),), adam_init((start,))
    settings = AdamSettings(lr=0.05)
    for _ in range(25):
        optimizer.zero_grad()
        ((reference - target) ** 2).sum().backward()
        optimizer.step()
        params, state = adam_step(params, (2 * (params[0] - target),), state, settings)
    assert torch.allclose(params[0], reference.detach(), atol=1e-6)


def test_window_gradient_matches_finite_difference(games_vectors):
    # Differentiating through 3 differentiable Adam steps, checked in float64
    # against a central difference along one random direction of the rows.
    functional = FunctionalLearner(_learner(games_vectors, torch.float64))
    params = functional.parameters_from()
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, N_ITEMS, generator=generator, dtype=torch.float64)
    direction = torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    real = torch.randint(1, N_ITEMS + 1, (6, 6), generator=generator)
    cuts = torch.tensor([1, 2, 3])
    settings = AdamSettings(lr=0.01)

    def outer(rows_logits):
        probs = torch.softmax(rows_logits, dim=-1)
        final, _ = run_adam(
            lambda p, s, t: functional.call(p, last_and_cut_loss, s[0], cuts),
            params, (probs,), adam_init(params), 3, settings, differentiable=True,
        )
        return functional.call(final, lambda learner, seqs: learner.hard_loss(seqs), real)

    leaf = logits.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(outer(leaf), leaf)
    step = 1e-5
    numeric = (outer(logits + step * direction) - outer(logits - step * direction)).detach() / (2 * step)
    assert float((gradient * direction).sum()) == pytest.approx(float(numeric), rel=1e-5)


def test_ordinary_steps_carry_no_graph(games_vectors):
    functional = FunctionalLearner(_learner(games_vectors))
    params = functional.parameters_from()
    probs = torch.softmax(torch.randn(2, 5, N_ITEMS), dim=-1).requires_grad_()
    final, _ = run_adam(
        lambda p, s, t: functional.call(p, last_and_cut_loss, s[0], None),
        params, (probs,), adam_init(params), 2, AdamSettings(lr=0.01), differentiable=False,
    )
    assert all(p.grad_fn is None for p in final)


# Config -------------------------------------------------------------------------


def test_config_rejects_window_longer_than_inner_run():
    with pytest.raises(ConfigError, match="window"):
        TD3.Config(inner_steps=5, window=6)


def test_config_rejects_inverted_expert_range():
    with pytest.raises(ConfigError, match="expert_epoch_max"):
        TD3.Config(expert_epoch_min=10, expert_epoch_max=5)


# The method on a real data slice ------------------------------------------------


def _context(cache, meter=None, probe=None, seed=0):
    return MethodContext(seed=seed, device="cpu", meter=meter or CostMeter(), cache=cache, probe=probe)


@pytest.fixture(scope="module")
def distilled(steam_cache):
    method = build_method("td3", TD3.test_overrides)
    return method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache))


def test_distill_returns_tucker_factors(distilled):
    assert distilled.factors["core"].shape == (4, 4, 16)
    assert distilled.factors["user"].shape == (5, 4)
    assert distilled.factors["position"].shape == (10, 4)


def test_item_factor_is_expert_item_embeddings(distilled, steam_cache):
    expert = steam_cache.expert().model(steam_cache.text_vectors())
    with torch.no_grad():
        expected = expert.item_embeddings()
    assert torch.equal(distilled.factors["item"], expected)


def test_storage_counts_learned_factors_only(distilled):
    learned = sum(distilled.factors[name].numel() for name in ("core", "user", "position"))
    assert distilled.shared == ("item",)
    assert distilled.storage_bytes == 4 * learned


def test_save_load_keeps_factors_exactly(distilled, tmp_path):
    distilled.save(tmp_path / "td3.pt")
    loaded = SyntheticSet.load(tmp_path / "td3.pt")
    for name, tensor in distilled.factors.items():
        assert torch.equal(loaded.factors[name], tensor)
    assert torch.equal(loaded.soft_probs(), distilled.soft_probs())


def test_meta_has_cost_profile_fields(distilled):
    for key in ("steps", "step_wall_s", "real_batch", "probe_history", "best_step", "final_losses"):
        assert key in distilled.meta


def test_expert_range_is_clipped_to_trajectory(distilled):
    assert distilled.meta["expert_epochs"] == [2, 2]


def test_factors_move_from_initialisation(steam_cache):
    short = build_method("td3", {**TD3.test_overrides, "steps": 1})
    longer = build_method("td3", {**TD3.test_overrides, "steps": 3})
    after_one = short.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache))
    after_three = longer.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache))
    assert not torch.equal(after_one.factors["user"], after_three.factors["user"])


class ScriptedProbe:
    """Test double of the validation probe: returns fixed scores in call order and keeps each candidate."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.candidates = []

    def __call__(self, synthetic, max_steps=300, n_users=2000):
        self.candidates.append(synthetic.soft_probs().clone())
        return self.scores[len(self.candidates) - 1]


def test_probe_selects_best_candidate(steam_cache):
    probe = ScriptedProbe([0.2, 0.5, 0.1])
    method = build_method("td3", {**TD3.test_overrides, "steps": 3})
    out = method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache, probe=probe))
    assert out.meta["best_step"] == 2
    assert [entry["ndcg@10"] for entry in out.meta["probe_history"]] == [0.2, 0.5, 0.1]
    assert torch.equal(out.soft_probs(), probe.candidates[1])


def test_wall_cap_raises_capped_error(steam_cache):
    meter = CostMeter(wall_cap_s=0.0)
    method = build_method("td3", TD3.test_overrides)
    with pytest.raises(CappedError, match="wall time"):
        with meter.phase("distill", capped=True):
            method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache, meter=meter))


def test_memory_cap_raises_capped_error(steam_cache):
    meter = CostMeter(rss_cap_mib=1.0)
    method = build_method("td3", TD3.test_overrides)
    with pytest.raises(CappedError, match="resident memory"):
        with meter.phase("distill", capped=True):
            method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache, meter=meter))


def test_runner_records_capped_outcome(steam_cache):
    from bench.runner import Cell, run_cell, suite_from_mapping

    suite = suite_from_mapping({
        "name": "capped", "datasets": ["steam"], "methods": ["td3"], "budgets": [5], "seq_len": 10,
        "seeds": [0], "learner": {"hidden": 16, "layers": 1, "max_len": 20},
        "method": {"td3": TD3.test_overrides}, "caps": {"wall_s": 0.0},
    })
    cell = Cell("steam", "td3", Budget(5, 10), 0)
    body = run_cell(cell, suite, steam_cache, dict(TD3.test_overrides), progress=False)
    assert body["outcome"] == "capped"
