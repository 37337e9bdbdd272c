"""Shared fixtures: real data locations and a small real slice of `games`."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
