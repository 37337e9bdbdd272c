"""Peak memory of Farzi's reverse-mode meta-gradient against plain autograd, for 10, 50 and 200 inner steps.

The problem is small: the first 300 real games titles as the catalogue, a
learner with hidden size 16 and one layer, 8 synthetic sequences of length 10
per inner step, and Adam with learning rate 0.01. For each inner-step count
``T`` and each mode (``reverse``: :func:`bench.functional.reverse_meta_gradient`
with a checkpoint every 25 steps; ``unrolled``:
:func:`bench.functional.unrolled_meta_gradient`), two figures are printed:

* ``graph MiB``: the peak bytes of tensors autograd holds for backward,
  counted in this process by :class:`bench.functional.SavedTensorMeter`;
* ``RSS MiB``: the growth of the resident-set high-water mark over the RSS
  before the call. Each case runs in a fresh Python process, after a 2-step
  warm-up of the same mode, so memory the allocator kept from an earlier
  case cannot hide a later one.

``checkpoint MiB`` is the reverse mode's stored copies of the inner state,
which grow by one parameter-sized triple every 25 steps. The benchmark table
times the reverse mode at ``T = 50`` (one round). Under
``--benchmark-disable`` every case still runs once.

Run it alone with the table visible:

    python -m pytest tests/perf/test_farzi_memory.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.functional import (  # noqa: E402
    AdamSettings,
    FunctionalLearner,
    SavedTensorMeter,
    reverse_meta_gradient,
    unrolled_meta_gradient,
)
from bench.learner import LearnerConfig, TextSASRec  # noqa: E402

MIB = 1024 * 1024
STEPS = (10, 50, 200)
CHECKPOINT_EVERY = 25
N_SYNTHETIC, BATCH, LENGTH, LATENT = 16, 8, 10, 8


def build_problem(vectors: torch.Tensor):
    """Return ``(run, params_bytes)`` where ``run(mode, steps)`` computes one meta-gradient."""
    torch.manual_seed(0)
    n_items = vectors.shape[0]
    functional = FunctionalLearner(TextSASRec(vectors, LearnerConfig(hidden=16, layers=1, max_len=LENGTH)))
    params = functional.parameters_from()
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(N_SYNTHETIC, LENGTH, LATENT, generator=generator).requires_grad_()
    decoder = torch.randn(LATENT, n_items, generator=generator).requires_grad_()
    real = torch.randint(1, n_items + 1, (32, LENGTH), generator=generator)
    plan = [torch.randperm(N_SYNTHETIC, generator=generator)[:BATCH] for _ in range(max(STEPS))]

    def inner_loss(p, synthetic, t):
        rows = torch.softmax(synthetic[0][plan[t - 1]] @ synthetic[1], dim=-1)
        return functional.call(p, lambda learner, probs: learner.soft_loss(probs), rows)

    def outer_loss(p):
        return functional.call(p, lambda learner, seqs: learner.hard_loss(seqs), real)

    settings = AdamSettings(lr=0.01)

    def run(mode: str, steps: int):
        if mode == "reverse":
            return reverse_meta_gradient(
                inner_loss, outer_loss, params, (latent, decoder), steps, settings,
                checkpoint_every=CHECKPOINT_EVERY,
            )
        return unrolled_meta_gradient(inner_loss, outer_loss, params, (latent, decoder), steps, settings)

    return run


def measure_rss_growth(vectors_path: str, mode: str, steps: int) -> float:
    """Return the RSS high-water growth in MiB of one meta-gradient (call in a fresh process)."""
    from bench.profiling import current_rss_mib, peak_rss_mib, reset_peak_rss

    torch.set_num_threads(1)
    run = build_problem(torch.load(vectors_path, weights_only=True))
    # A 2-step warm-up takes one-time allocations (kernel and autograd-engine set-up) out of the figure.
    run(mode, 2)
    before = current_rss_mib()
    reset_peak_rss()
    run(mode, steps)
    return peak_rss_mib() - before


def _rss_in_fresh_process(vectors_path: Path, mode: str, steps: int) -> float:
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    output = subprocess.run(
        [sys.executable, __file__, str(vectors_path), mode, str(steps)],
        check=True, capture_output=True, text=True, env=environment, cwd=REPO, timeout=600,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])["rss_mib"]


def test_reverse_mode_memory_against_unrolled(benchmark, games_vectors, tmp_path, capsys):
    torch.set_num_threads(1)
    vectors_path = tmp_path / "vectors.pt"
    torch.save(games_vectors, vectors_path)
    run = build_problem(games_vectors)

    rows, graph_peaks = [], {}
    for steps in STEPS:
        for mode in ("reverse", "unrolled"):
            with SavedTensorMeter() as meter:
                result = run(mode, steps)
            graph_peaks[mode, steps] = meter.peak_bytes
            rows.append([
                steps, mode, meter.peak_bytes / MIB, _rss_in_fresh_process(vectors_path, mode, steps),
                result.checkpoint_bytes / MIB,
            ])
    benchmark.extra_info["memory"] = [
        {"steps": r[0], "mode": r[1], "graph_mib": r[2], "rss_mib": r[3], "checkpoint_mib": r[4]} for r in rows
    ]
    benchmark.pedantic(run, args=("reverse", 50), rounds=1, iterations=1)

    with capsys.disabled():
        print()
        print(tabulate(rows, headers=["inner steps", "mode", "graph MiB", "RSS MiB", "checkpoint MiB"],
                       floatfmt=".2f"))
    # The per-step index tensors of the batch plan stay alive once saved: a few bytes per step.
    assert graph_peaks["reverse", 200] < 1.01 * graph_peaks["reverse", 10]
    assert graph_peaks["unrolled", 200] > 10 * graph_peaks["reverse", 200]


if __name__ == "__main__":
    print(json.dumps({"rss_mib": measure_rss_growth(sys.argv[1], sys.argv[2], int(sys.argv[3]))}))
