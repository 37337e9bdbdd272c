"""Benchmark of one FOSTER distillation step: ``foster`` vs ``foster-no-subset``, frozen vs tune-top-k.

A third case, ``foster-paper-subset``, is ``foster`` with ``subset_row_tops``
off, the subset of the paper, so the cost of the tracked row tops shows.

By default the cases run on a 40-user steam slice, small enough for CI (also
under ``--benchmark-disable``, where each case runs once). With
``BENCH_PERF_FULL=1`` they run on the full games dataset (16,874 items) with
the games suite's learner and encoder settings, 50 synthetic sequences of
length 20 and FOSTER's default real batch and subset size:

    BENCH_PERF_FULL=1 python -m pytest tests/perf/test_foster_perf.py \\
        -o log_cli=true --log-cli-level=INFO

Environment variables:
    BENCH_PERF_FULL: "1" selects the full games size.
    BENCH_PERF_CACHE: cache folder for text vectors and lower-layer token
        states (default ``reports/cache``, the runner's cache, so games vectors
        computed by a suite run are reused).
    BENCH_PERF_THREADS: torch threads during the measurement (default 1).

Figures: the benchmark table gives the step wall time. ``extra_info`` and one
INFO log line per case give the peak RSS in MiB during the measured steps
(``bench.profiling``), its growth over the RSS before them, and the items per
step.

NOTE: all cases share one process, so a case's peak can be hidden by memory
the allocator kept from an earlier case (the growth then reads near 0). For
a clean memory figure run one case per process, e.g. ``-k
"foster-no-subset and tune-top-k"``.

The learners start from a stand-in expert trajectory with one untrained
checkpoint, because a step's cost does not depend on the checkpoint's values
and training the games expert takes far longer than this benchmark. The
tune-top-k cases first compute or load the lower-layer token states of every
title (about 830 MB for games, cached under ``BENCH_PERF_CACHE``).
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import pytest
import torch

from bench.context import MethodContext, SharedCache
from bench.data import DatasetConfig, load_dataset
from bench.expert import ExpertConfig, ExpertTrajectory
from bench.learner import LearnerConfig, TextSASRec
from bench.method import Budget
from bench.profiling import CostMeter, current_rss_mib, peak_rss_mib, reset_peak_rss
from bench.registry import build_method, get_method
from bench.runner import load_suite
from bench.text import EncoderConfig
from methods.foster import FosterRun

logger = logging.getLogger(__name__)

FULL = os.environ.get("BENCH_PERF_FULL") == "1"
THREADS = int(os.environ.get("BENCH_PERF_THREADS", "1"))
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]


class UntrainedExpertCache(SharedCache):
    """Test stand-in: a SharedCache whose expert trajectory is one untrained learner checkpoint.

    The checkpoint goes to ``stand_in_dir`` (set after construction), never to the shared cache.
    """

    stand_in_dir: Path

    def expert(self) -> ExpertTrajectory:
        if self._expert is None:
            folder = self.stand_in_dir
            folder.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            torch.save(TextSASRec(self.text_vectors(), self.learner).state_dict(), folder / "epoch_001.pt")
            self._expert = ExpertTrajectory(folder, self.learner, 1, [0.0], 0.0)
        return self._expert


@pytest.fixture(scope="module")
def perf_cache(tmp_path_factory):
    if not (DATA_DIR / "games" / "games.inter").exists():
        pytest.skip(f"real datasets not found under {DATA_DIR}")
    if FULL:
        suite = load_suite("games")
        data = load_dataset("games", data_dir=DATA_DIR)
        encoder, learner = suite.encoder, suite.protocol.learner
        cache_dir = Path(os.environ.get("BENCH_PERF_CACHE", REPO / "reports" / "cache"))
    else:
        data = load_dataset("steam", data_dir=DATA_DIR, config=DatasetConfig(sample_users=40, sample_seed=0))
        encoder, learner = EncoderConfig(max_length=32), LearnerConfig(hidden=16, layers=1, max_len=20)
        cache_dir = Path(os.environ.get("BENCH_PERF_CACHE", tmp_path_factory.mktemp("foster-perf-cache")))
    cache = UntrainedExpertCache(data, encoder, learner, ExpertConfig(epochs=1), cache_dir)
    cache.stand_in_dir = tmp_path_factory.mktemp("untrained-expert")
    cache.text_vectors()
    return cache


# Case id: (registered method, config overrides).
CASES = {
    "foster": ("foster", {}),
    "foster-paper-subset": ("foster", {"subset_row_tops": False}),
    "foster-no-subset": ("foster-no-subset", {}),
}


def _overrides(name: str, encoder_mode: str, changes: dict) -> dict:
    if FULL:
        return {**changes, "encoder_mode": encoder_mode}
    fast = dict(get_method(name).test_overrides)
    if name == "foster-no-subset":
        fast.pop("subset_size")
    return {**fast, **changes, "encoder_mode": encoder_mode}


@pytest.mark.parametrize("encoder_mode", ["frozen", "tune-top-k"])
@pytest.mark.parametrize("case", list(CASES))
def test_foster_step(benchmark, perf_cache, case, encoder_mode):
    name, changes = CASES[case]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        method = build_method(name, _overrides(name, encoder_mode, changes))
        budget = Budget(50, 20) if FULL else Budget(5, 10)
        context = MethodContext(seed=0, device="cpu", meter=CostMeter(), cache=perf_cache)
        run = FosterRun(method.config, perf_cache.data.train_view(), budget, context)
        run.step(1)  # the first step allocates optimiser state; keep it out of the timing
        steps = itertools.count(2)
        rss_before = current_rss_mib()
        reset_peak_rss()
        losses = benchmark.pedantic(lambda: run.step(next(steps)), rounds=2, iterations=1)
        peak = peak_rss_mib()
    finally:
        torch.set_num_threads(previous_threads)

    benchmark.extra_info.update(
        case=case,
        method=name,
        encoder_mode=encoder_mode,
        n_items=perf_cache.data.n_items,
        items_per_step=losses["subset_items"],
        peak_rss_mib=round(peak, 1),
        rss_growth_mib=round(peak - rss_before, 1),
        torch_threads=THREADS,
        full_size=FULL,
    )
    stats = getattr(benchmark, "stats", None)
    mean_s = stats.stats.mean if stats is not None else float("nan")
    logger.info(
        "%s %s on %s (%d items): %.3f s/step, peak RSS %.0f MiB (+%.0f MiB during steps), %d items per step",
        case, encoder_mode, perf_cache.data.name, perf_cache.data.n_items, mean_s, peak, peak - rss_before,
        losses["subset_items"],
    )
    assert losses["subset_items"] <= perf_cache.data.n_items
    if name == "foster-no-subset":
        assert losses["subset_items"] == perf_cache.data.n_items
