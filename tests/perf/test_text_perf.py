"""Benchmark of TextEncoder.encode on 2,000 real games titles."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bench.text import TextEncoder

GAMES_ITEMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "games" / "games.item"
N_TITLES = 2000


@pytest.fixture(scope="module")
def games_titles() -> list[str]:
    if not GAMES_ITEMS.is_file():
        pytest.skip(f"real games item file not found at {GAMES_ITEMS}")
    with GAMES_ITEMS.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        column = header.index("title:token_seq")
        titles = [row[column] for row in reader]
    return titles[:N_TITLES]


def test_encode_2000_games_titles(benchmark, games_titles):
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = TextEncoder()
        encoder.encode(games_titles[:8], progress=False)  # loads the model outside the timing

        vectors = benchmark.pedantic(
            encoder.encode, args=(games_titles,), kwargs={"progress": False}, rounds=3, iterations=1
        )
    finally:
        torch.set_num_threads(previous_threads)

    benchmark.extra_info["titles"] = len(games_titles)
    benchmark.extra_info["torch_threads"] = 1
    benchmark.extra_info["batch_size"] = encoder.config.batch_size
    assert vectors.shape == (N_TITLES, encoder.dim)
