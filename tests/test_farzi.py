"""Farzi: reverse-mode Adam meta-gradient, its drift guard and memory, and the method on real data."""

import math

import pytest
import torch

from bench.context import MethodContext
from bench.errors import CappedError
from bench.functional import (
    AdamSettings,
    FunctionalLearner,
    SavedTensorMeter,
    parameter_bytes,
    reverse_meta_gradient,
    unrolled_meta_gradient,
)
from bench.learner import LearnerConfig, TextSASRec
from bench.method import Budget
from bench.profiling import CostMeter
from bench.registry import build_method
from bench.synthetic import SyntheticSet
from methods.farzi import Farzi, expand_latent

N_ITEMS, LENGTH, N_SYNTHETIC, LATENT = 40, 6, 4, 3

# Tolerances of the gradient-agreement tests: the largest absolute difference
# between the reverse-mode and the unrolled meta-gradient, divided by the
# largest absolute entry of the unrolled one. Measured on this problem: up to
# 1e-8 in float64 (the recovered second moment loses digits where a gradient
# grows sharply between steps) and 2e-7 in float32 with float64 optimiser state.
TOLERANCE_FLOAT64 = 1e-7
TOLERANCE_FLOAT32 = 1e-5


class TinyProblem:
    """A 40-item Farzi problem on real game-title vectors: learner, latent factors, batches."""

    def __init__(self, vectors: torch.Tensor, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        learner = TextSASRec(vectors[:N_ITEMS], LearnerConfig(hidden=8, layers=1, max_len=10)).to(dtype)
        self.functional = FunctionalLearner(learner)
        self.params = self.functional.parameters_from()
        generator = torch.Generator().manual_seed(1)
        self.latent = torch.randn(N_SYNTHETIC, LENGTH, LATENT, generator=generator).to(dtype).requires_grad_()
        self.decoder = torch.randn(LATENT, N_ITEMS, generator=generator).to(dtype).requires_grad_()
        self.real = torch.randint(1, N_ITEMS + 1, (8, 7), generator=generator)
        self.plan = [torch.randperm(N_SYNTHETIC, generator=generator)[:3] for _ in range(200)]

    @property
    def synthetic(self):
        return (self.latent, self.decoder)

    def inner_loss(self, params, synthetic, t):
        latent, decoder = synthetic
        probs = torch.softmax(latent[self.plan[t - 1]] @ decoder, dim=-1)
        return self.functional.call(params, lambda learner, rows: learner.soft_loss(rows), probs)

    def outer_loss(self, params):
        return self.functional.call(params, lambda learner, seqs: learner.hard_loss(seqs), self.real)


def _relative_difference(got, expected) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, expected))


@pytest.mark.parametrize("n_steps,checkpoint_every", [(5, None), (12, None), (12, 4)])
def test_reverse_gradient_matches_unrolled_float64(games_vectors, n_steps, checkpoint_every):
    problem = TinyProblem(games_vectors, torch.float64)
    settings = AdamSettings(lr=0.01)
    expected = unrolled_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, n_steps, settings
    )
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, n_steps, settings,
        checkpoint_every=checkpoint_every,
    )
    assert _relative_difference(got.grads, expected.grads) < TOLERANCE_FLOAT64
    assert got.outer_loss == pytest.approx(expected.outer_loss, rel=1e-12)


@pytest.mark.parametrize("n_steps,checkpoint_every", [(6, None), (16, 5)])
def test_reverse_gradient_matches_unrolled_float32(games_vectors, n_steps, checkpoint_every):
    # Both keep Adam's state in float64 while the learner runs in float32, so they
    # follow the same inner trajectory and differ only in backward-pass rounding.
    problem = TinyProblem(games_vectors, torch.float32)
    settings = AdamSettings(lr=0.01)
    expected = unrolled_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, n_steps, settings,
        state_dtype=torch.float64,
    )
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, n_steps, settings,
        checkpoint_every=checkpoint_every,
    )
    assert _relative_difference(got.grads, expected.grads) < TOLERANCE_FLOAT32


def test_reverse_gradient_is_nonzero_for_both_factors(games_vectors):
    problem = TinyProblem(games_vectors, torch.float64)
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 5, AdamSettings(lr=0.01)
    )
    assert float(got.grads[0].abs().max()) > 0.0
    assert float(got.grads[1].abs().max()) > 0.0


def test_checkpoints_report_small_reconstruction_error(games_vectors):
    problem = TinyProblem(games_vectors, torch.float32)
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 12, AdamSettings(lr=0.01),
        checkpoint_every=4,
    )
    assert got.reconstruction_error < 1e-9


def test_no_checkpoint_reports_nan_reconstruction_error(games_vectors):
    problem = TinyProblem(games_vectors, torch.float32)
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 5, AdamSettings(lr=0.01),
        checkpoint_every=None,
    )
    assert math.isnan(got.reconstruction_error)


def test_float32_state_drifts_without_guard(games_vectors):
    # Why the state is float64: recovering float32 iterates loses the forward
    # trajectory within a few steps on this very problem.
    problem = TinyProblem(games_vectors, torch.float32)
    settings = AdamSettings(lr=0.01)
    expected = unrolled_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 6, settings
    )
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 6, settings,
        checkpoint_every=None, state_dtype=None,
    )
    assert _relative_difference(got.grads, expected.grads) > 1e-3


def test_checkpoint_bytes_follow_steps_over_interval(games_vectors):
    problem = TinyProblem(games_vectors, torch.float32)
    got = reverse_meta_gradient(
        problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 12, AdamSettings(lr=0.01),
        checkpoint_every=4,
    )
    # Steps 4 and 8 are stored, and step 12 is the final state itself. Each copy
    # contains parameters and both moments in float64, twice the float32 parameter bytes.
    assert got.checkpoint_bytes == 2 * 3 * 2 * parameter_bytes(problem.params)


def _saved_peak(run) -> int:
    with SavedTensorMeter() as meter:
        run()
    return meter.peak_bytes


def test_reverse_graph_memory_is_flat_in_steps(games_vectors):
    problem = TinyProblem(games_vectors, torch.float32)
    settings = AdamSettings(lr=0.01)
    peaks = [
        _saved_peak(lambda: reverse_meta_gradient(
            problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, n, settings,
            checkpoint_every=4,
        ))
        for n in (4, 12)
    ]
    assert peaks[1] == peaks[0]


def test_unrolled_graph_memory_grows_with_steps(games_vectors):
    problem = TinyProblem(games_vectors, torch.float32)
    settings = AdamSettings(lr=0.01)
    peaks = [
        _saved_peak(lambda: unrolled_meta_gradient(
            problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, n, settings
        ))
        for n in (4, 12)
    ]
    # Linear growth triples the per-step part; the fixed part (text vectors, outer loss) dilutes it.
    assert peaks[1] > 1.5 * peaks[0]


def test_reverse_rejects_zero_steps(games_vectors):
    problem = TinyProblem(games_vectors, torch.float32)
    with pytest.raises(ValueError, match="n_steps"):
        reverse_meta_gradient(
            problem.inner_loss, problem.outer_loss, problem.params, problem.synthetic, 0, AdamSettings(lr=0.01)
        )


def test_expander_is_latent_times_decoder():
    latent = torch.tensor([[[1.0, 2.0]]])
    decoder = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    logits = expand_latent({"latent": latent, "decoder": decoder})
    assert torch.equal(logits, torch.tensor([[[2.0, 4.0, -1.0]]]))


# The method on a real data slice -----------------------------------------------


def _context(cache, meter=None, probe=None, seed=0):
    return MethodContext(seed=seed, device="cpu", meter=meter or CostMeter(), cache=cache, probe=probe)


@pytest.fixture(scope="module")
def distilled(steam_cache):
    method = build_method("farzi", Farzi.test_overrides)
    return method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache))


def test_distill_returns_latent_factors(distilled):
    assert distilled.factors["latent"].shape == (5, 10, 4)
    assert distilled.factors["decoder"].shape[0] == 4


def test_storage_counts_both_factors(distilled):
    expected = 4 * (distilled.factors["latent"].numel() + distilled.factors["decoder"].numel())
    assert distilled.storage_bytes == expected


def test_save_load_keeps_factors_exactly(distilled, tmp_path):
    distilled.save(tmp_path / "farzi.pt")
    loaded = SyntheticSet.load(tmp_path / "farzi.pt")
    for name, tensor in distilled.factors.items():
        assert torch.equal(loaded.factors[name], tensor)
    assert torch.equal(loaded.soft_probs(), distilled.soft_probs())


def test_meta_has_cost_profile_fields(distilled):
    for key in ("steps", "step_wall_s", "real_batch", "probe_history", "best_step", "final_losses"):
        assert key in distilled.meta


def test_meta_reconstruction_error_is_small(distilled):
    assert distilled.meta["reconstruction_error"] < 1e-9


class ScriptedProbe:
    """Test double of the validation probe: returns fixed scores in call order and keeps each candidate."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.candidates = []

    def __call__(self, synthetic, max_steps=300, n_users=2000):
        self.candidates.append(synthetic.soft_probs().clone())
        return self.scores[len(self.candidates) - 1]


def test_probe_selects_best_candidate(steam_cache):
    probe = ScriptedProbe([0.1, 0.3, 0.2])
    method = build_method("farzi", {**Farzi.test_overrides, "steps": 3})
    out = method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache, probe=probe))
    assert out.meta["best_step"] == 2
    assert [entry["ndcg@10"] for entry in out.meta["probe_history"]] == [0.1, 0.3, 0.2]
    assert torch.equal(out.soft_probs(), probe.candidates[1])


def test_wall_cap_raises_capped_error(steam_cache):
    meter = CostMeter(wall_cap_s=0.0)
    method = build_method("farzi", Farzi.test_overrides)
    with pytest.raises(CappedError, match="wall time"):
        with meter.phase("distill", capped=True):
            method.distill(steam_cache.data.train_view(), Budget(5, 10), _context(steam_cache, meter=meter))


def test_runner_records_capped_outcome(steam_cache):
    from bench.runner import Cell, run_cell, suite_from_mapping

    suite = suite_from_mapping({
        "name": "capped", "datasets": ["steam"], "methods": ["farzi"], "budgets": [5], "seq_len": 10,
        "seeds": [0], "learner": {"hidden": 16, "layers": 1, "max_len": 20},
        "method": {"farzi": Farzi.test_overrides}, "caps": {"wall_s": 0.0},
    })
    cell = Cell("steam", "farzi", Budget(5, 10), 0)
    body = run_cell(cell, suite, steam_cache, dict(Farzi.test_overrides), progress=False)
    assert body["outcome"] == "capped"
