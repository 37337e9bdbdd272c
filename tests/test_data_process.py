"""Tests of filtering, splitting, name resolution and recipes, on small files and real data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from bench.data import DatasetConfig, list_datasets, load_dataset
from bench.data.recipes import Recipe, load_recipe, merge_config, resolve_data_dir, resolve_data_home
from bench.errors import ConfigError, DataError, LeakageError, UnknownNameError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NO_FILTER = DatasetConfig(kcore=0)


def write_inter(root: Path, name: str, rows: list[tuple[str, str, int]]) -> None:
    """Write DATA_DIR/name from (user, item, time) rows. Each title is the item id upper-cased."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{user}\t{item}\t{time}" for user, item, time in rows]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = sorted({item for _, item, _ in rows})
    item_lines = ["item_id:token\ttitle:token_seq", *(f"{i}\t{i.upper()}" for i in items)]
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")


def raw_sequence(data, user: str) -> list[str]:
    """Return a user's whole processed sequence as raw item ids."""
    index = data.user_ids.index(user)
    ids = list(data.train_seqs[index])
    if data.test_targets[index]:
        ids += [data.valid_targets[index], data.test_targets[index]]
    return [data.item_ids[i - 1] for i in ids]


SHORT_USERS = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "b", 2), ("u3", "c", 5)]


# Leave-one-out and short users


def test_split_short_users_train_only(tmp_path):
    write_inter(tmp_path, "short", SHORT_USERS)
    data = load_dataset("short", data_dir=tmp_path, config=NO_FILTER)
    u1, u2, u3 = (data.user_ids.index(u) for u in ("u1", "u2", "u3"))
    a, b, c = (data.item_ids.index(i) + 1 for i in ("a", "b", "c"))
    assert data.train_seqs[u1].tolist() == [a]
    assert data.valid_targets[u1] == b
    assert data.test_targets[u1] == c
    assert data.train_seqs[u2].tolist() == [a, b]
    assert data.train_seqs[u3].tolist() == [c]
    assert data.valid_targets[[u2, u3]].tolist() == [0, 0]
    assert data.test_targets[[u2, u3]].tolist() == [0, 0]
    assert data.describe_evaluation() == "1 of 3 users evaluated; 2 have fewer than 3 interactions"
    assert data.stats["short_users"] == 2


def test_split_no_long_user_raises(tmp_path):
    write_inter(tmp_path, "tiny", [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1)])
    with pytest.raises(DataError) as caught:
        load_dataset("tiny", data_dir=tmp_path, config=NO_FILTER)
    assert "no user has 3 or more interactions" in str(caught.value)


def test_split_eval_inputs_follow_time(tmp_path):
    write_inter(tmp_path, "short", SHORT_USERS)
    data = load_dataset("short", data_dir=tmp_path, config=NO_FILTER)
    users, inputs, targets = data.eval_inputs("test")
    assert [data.user_ids[u] for u in users] == ["u1"]
    assert [data.item_ids[i - 1] for i in inputs[0]] == ["a", "b"]
    assert data.item_ids[targets[0] - 1] == "c"


def test_item_ids_first_seen_order(tmp_path):
    write_inter(tmp_path, "order", [("u1", "z", 3), ("u1", "y", 1), ("u1", "x", 2), ("u2", "w", 1),
                                    ("u2", "z", 2), ("u2", "v", 3)])
    data = load_dataset("order", data_dir=tmp_path, config=NO_FILTER)
    assert data.item_ids == ("y", "x", "z", "w", "v")
    assert data.item_texts == ("Y", "X", "Z", "W", "V")
    assert data.user_ids == ("u1", "u2")


# Filters


def test_kcore_removes_iteratively(tmp_path):
    # c has one event, so u3 drops to one event, so d drops to one event.
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "d", 3), ("u1", "b", 4),
            ("u2", "a", 1), ("u2", "b", 2), ("u3", "d", 1), ("u3", "c", 2)]
    write_inter(tmp_path, "core", rows)
    data = load_dataset("core", data_dir=tmp_path, config=DatasetConfig(kcore=2))
    assert data.user_ids == ("u1", "u2")
    assert data.item_ids == ("a", "b")
    assert raw_sequence(data, "u1") == ["a", "b", "b"]
    assert data.stats["rows_after_kcore"] == 5


def test_kcore_too_high_raises(tmp_path):
    write_inter(tmp_path, "short", SHORT_USERS)
    with pytest.raises(DataError) as caught:
        load_dataset("short", data_dir=tmp_path, config=DatasetConfig(kcore=10))
    message = str(caught.value)
    assert "kcore=10" in message
    assert "lower kcore" in message


def test_duplicate_events_dropped(tmp_path):
    write_inter(tmp_path, "dups", [("u1", "a", 1), ("u1", "a", 1), ("u1", "b", 2), ("u1", "a", 3),
                                   ("u1", "c", 4)])
    data = load_dataset("dups", data_dir=tmp_path, config=NO_FILTER)
    assert data.stats["raw_rows"] == 5
    assert data.stats["rows_after_dedup"] == 4
    assert raw_sequence(data, "u1") == ["a", "b", "a", "c"]


def test_max_seq_len_keeps_recent(tmp_path):
    write_inter(tmp_path, "long", [("u1", f"i{t}", t) for t in range(10)])
    data = load_dataset("long", data_dir=tmp_path, config=DatasetConfig(kcore=0, max_seq_len=4))
    assert raw_sequence(data, "u1") == ["i6", "i7", "i8", "i9"]
    assert data.item_ids == ("i6", "i7", "i8", "i9")


def test_sample_users_seeded(tmp_path):
    rows = [(f"u{u:02d}", f"i{t}", t) for u in range(20) for t in range(3)]
    write_inter(tmp_path, "crowd", rows)
    first = load_dataset("crowd", data_dir=tmp_path, config=DatasetConfig(kcore=0, sample_users=5, sample_seed=3))
    again = load_dataset("crowd", data_dir=tmp_path, config=DatasetConfig(kcore=0, sample_users=5, sample_seed=3))
    other = load_dataset("crowd", data_dir=tmp_path, config=DatasetConfig(kcore=0, sample_users=5, sample_seed=4))
    assert first.n_users == 5
    assert first.user_ids == again.user_ids
    assert first.user_ids != other.user_ids
    assert list(first.user_ids) == sorted(first.user_ids)
    assert first.stats["sample_users"] == 5


def test_sample_users_above_count_keeps_all(tmp_path):
    write_inter(tmp_path, "short", SHORT_USERS)
    data = load_dataset("short", data_dir=tmp_path, config=DatasetConfig(kcore=0, sample_users=50))
    assert data.n_users == 3


def test_info_log_reports_counts(tmp_path, caplog):
    write_inter(tmp_path, "short", SHORT_USERS)
    with caplog.at_level(logging.INFO, logger="bench.data.process"):
        load_dataset("short", data_dir=tmp_path, config=NO_FILTER)
    assert "3 users (1 evaluated), 3 items" in caplog.text


# Configuration


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kcore": -1}, "kcore"),
        ({"kcore": True}, "kcore"),
        ({"max_seq_len": 2}, "max_seq_len"),
        ({"sample_users": 0}, "sample_users"),
        ({"sample_seed": -5}, "sample_seed"),
        ({"text_field": " "}, "text_field"),
        ({"encoding": "klingon-8"}, "encoding"),
        ({"missing_text": "skip"}, "missing_text"),
    ],
)
def test_config_rejects_invalid(changes, field):
    with pytest.raises(ConfigError) as caught:
        DatasetConfig(**changes)
    assert f"DatasetConfig.{field}" in str(caught.value)
    assert repr(next(iter(changes.values()))) in str(caught.value)


def test_merge_config_precedence():
    recipe = Recipe(name="toy", format="atomic", folder="toy", config={"kcore": 3, "text_field": "title"})
    assert merge_config(recipe, None) == DatasetConfig(kcore=3, text_field="title")
    merged = merge_config(recipe, DatasetConfig(kcore=0, max_seq_len=20))
    assert merged == DatasetConfig(kcore=0, max_seq_len=20, text_field="title")


def test_recipe_unknown_key_suggests(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text('format = "atomic"\nfolder = "toy"\n[config]\nkcroe = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert "unknown [config] key 'kcroe'" in str(caught.value)
    assert "'kcore'" in str(caught.value)


def test_recipe_invalid_value_names_file(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text('format = "atomic"\n[config]\nmax_seq_len = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert "toy.toml" in str(caught.value)
    assert "max_seq_len" in str(caught.value)


def test_shipped_recipes_parse():
    names = {"games", "food", "steam", "ml-100k"}
    recipes_dir = Path(__file__).resolve().parents[1] / "datasets"
    parsed = {name: load_recipe(recipes_dir / f"{name}.toml") for name in names}
    assert {r.format for n, r in parsed.items() if n != "ml-100k"} == {"atomic"}
    assert parsed["ml-100k"].config["text_field"] == "movie_title"


# Name resolution


def test_unknown_name_suggests_match(tmp_path):
    with pytest.raises(UnknownNameError) as caught:
        load_dataset("gmaes", data_dir=tmp_path)
    message = str(caught.value)
    assert "Did you mean 'games'" in message
    assert "--data-dir" in message


def test_recipe_folder_missing_hints_data_dir(tmp_path):
    with pytest.raises(DataError) as caught:
        load_dataset("steam", data_dir=tmp_path)
    assert "--data-dir" in str(caught.value)
    assert str(tmp_path / "steam") in str(caught.value)


def test_list_datasets_has_recipes_and_folders(tmp_path):
    write_inter(tmp_path, "short", SHORT_USERS)
    (tmp_path / "stray").mkdir()
    names = list_datasets(tmp_path)
    assert {"games", "food", "steam", "ml-100k", "short"} <= set(names)
    assert "stray" not in names


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_inter(tmp_path, "short", SHORT_USERS)
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert load_dataset("short", config=NO_FILTER).n_users == 3


def test_data_home_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA_HOME", raising=False)
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_data_home() == tmp_path / "text-rec-distill-bench"
    assert resolve_data_dir() == tmp_path / "text-rec-distill-bench"
    monkeypatch.setenv("BENCH_DATA_HOME", str(tmp_path / "home"))
    assert resolve_data_home() == tmp_path / "home"
    assert resolve_data_home(tmp_path / "arg") == tmp_path / "arg"


# Real data


@pytest.fixture(scope="module")
def steam():
    if not (REAL_DATA / "steam" / "steam.inter").is_file():
        pytest.skip(f"real dataset folder {REAL_DATA / 'steam'} is absent")
    return load_dataset("steam", data_dir=REAL_DATA)


def test_steam_counts(steam):
    assert steam.n_users == 10_369
    assert steam.n_items == 3_593
    assert steam.stats["raw_rows"] == 126_824


def test_steam_every_user_evaluated(steam):
    assert len(steam.evaluated_users) == steam.n_users
    assert steam.stats["short_users"] == 0


def test_steam_sequences_capped(steam):
    lengths = np.array([len(s) + 2 for s in steam.train_seqs])
    assert lengths.max() == 50
    assert lengths.min() >= 3


def test_steam_fingerprint_stable(steam):
    again = load_dataset("steam", data_dir=REAL_DATA)
    assert again.fingerprint == steam.fingerprint
    shorter = load_dataset("steam", data_dir=REAL_DATA, config=DatasetConfig(max_seq_len=20))
    assert shorter.fingerprint != steam.fingerprint


def test_steam_train_view_hides_targets(steam):
    view = steam.train_view()
    with pytest.raises(LeakageError):
        view.test_targets
    assert view.n_users == steam.n_users
