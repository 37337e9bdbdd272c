"""Benchmark of herding and k-center selecting 50 of 50,000 random 64-d representations.

Under ``--benchmark-disable`` (CI) each selection runs once as a plain test.
Every run prints its own wall time, so the figure shows up in CI logs too.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from methods.coresets import herding_select, kcenter_select

N_SEQUENCES = 50_000
HIDDEN = 64
N_SELECT = 50
SELECTORS = {"herding": herding_select, "kcenter": kcenter_select}


@pytest.fixture(scope="module")
def representations() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N_SEQUENCES, HIDDEN)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_select_50_of_50k(benchmark, representations, name, capsys):
    select = SELECTORS[name]
    seconds = []

    def run():
        start = time.perf_counter()
        picks = select(representations, N_SELECT, np.random.default_rng(1))
        seconds.append(time.perf_counter() - start)
        return picks

    picks = benchmark.pedantic(run, rounds=3, iterations=1)

    benchmark.extra_info.update({"sequences": N_SEQUENCES, "hidden": HIDDEN, "selected": N_SELECT})
    with capsys.disabled():
        print(f"\n{name}: {N_SELECT} of {N_SEQUENCES:,} {HIDDEN}-d points in {min(seconds):.3f} s "
              f"(fastest of {len(seconds)} runs)")
    assert len(np.unique(picks)) == N_SELECT
