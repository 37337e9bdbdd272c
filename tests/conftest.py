"""Shared fixtures: real data locations and a small real slice of `games`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# One thread: the tests use tiny models, where a second spinning thread costs far more than it gains.
torch.set_num_threads(1)


def require_shared_data() -> Path:
    if not (SHARED_DATA / "games" / "games.inter").exists():
        pytest.skip(f"real datasets not found under {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def games_titles(shared_data) -> list[str]:
    """The first 300 real game titles."""
    with open(shared_data / "games" / "games.item", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [row[1] for _, row in zip(range(300), reader)]


@pytest.fixture(scope="session")
def games_vectors(games_titles) -> torch.Tensor:
    """Real encoder vectors of those 300 titles."""
    from bench.text import EncoderConfig, TextEncoder

    encoder = TextEncoder(EncoderConfig(max_length=32))
    return torch.from_numpy(np.asarray(encoder.encode(games_titles, progress=False), dtype=np.float32))


@pytest.fixture(scope="module")
def steam_cache(shared_data, tmp_path_factory):
    """SharedCache over a 300-user real steam slice with a tiny learner and a 2-epoch expert."""
    from bench.context import SharedCache
    from bench.data import DatasetConfig, load_dataset
    from bench.expert import ExpertConfig
    from bench.learner import LearnerConfig
    from bench.text import EncoderConfig

    data = load_dataset("steam", data_dir=shared_data, config=DatasetConfig(sample_users=300, sample_seed=0))
    return SharedCache(
        data,
        EncoderConfig(max_length=32),
        LearnerConfig(hidden=16, layers=1, max_len=20),
        ExpertConfig(epochs=2, batch_size=64),
        tmp_path_factory.mktemp("cache"),
    )


def method_context(cache, seed=0):
    """A MethodContext over ``cache`` with an uncapped CPU meter and the runner's validation probe."""
    from bench.context import MethodContext
    from bench.evaluator import Protocol
    from bench.profiling import CostMeter
    from bench.runner import make_probe

    protocol = Protocol(learner=cache.learner, max_steps=20, eval_every=10, patience=2)
    return MethodContext(seed=seed, device="cpu", meter=CostMeter(), cache=cache,
                         probe=make_probe(cache, protocol, seed))


def write_atomic(folder: Path, name: str, inter_rows, item_rows=None) -> Path:
    """Write NAME.inter (and NAME.item) under folder/NAME; return the data dir."""
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"] + ["\t".join(map(str, r)) for r in inter_rows]
    (target / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if item_rows is None:
        items = sorted({str(r[1]) for r in inter_rows})
        item_rows = [(i, f"title of {i}") for i in items]
    lines = ["item_id:token\ttitle:token_seq"] + ["\t".join(map(str, r)) for r in item_rows]
    (target / f"{name}.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
