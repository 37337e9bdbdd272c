"""Tuned configs in leaderboard runs: summaries from real studies, provenance in records, the trials column."""

import json

import pytest

from bench.data import DatasetConfig, load_dataset
from bench.errors import ConfigError, UnknownNameError
from bench.method import Budget
from bench.records import read_records
from bench.report import render_markdown
from bench.runner import run_suite, suite_from_mapping
from bench.tune import StudySettings, load_tuned, tune

TINY = {
    "name": "tiny-tuned",
    "datasets": ["steam"],
    "methods": ["random"],
    "budgets": [10],
    "seq_len": 10,
    "seeds": [0],
    "include_pop": False,
    "protocol": {"max_steps": 20, "eval_every": 10, "patience": 2},
    "learner": {"hidden": 16, "layers": 1, "max_len": 20},
    "encoder": {"max_length": 32},
    "expert": {"epochs": 1, "batch_size": 64},
    "data": {"sample_users": 300, "sample_seed": 0},
}


@pytest.fixture(scope="module")
def fingerprint(shared_data) -> str:
    data = load_dataset("steam", data_dir=shared_data, config=DatasetConfig(sample_users=300, sample_seed=0))
    return data.fingerprint


def _summary(folder, name, *, method="goracs", config=None, trials=7, protocol=None, fingerprint="f" * 16,
             budget=(10, 10), **changes):
    suite = suite_from_mapping(TINY)
    summary = {
        "study": name, "storage": "sqlite:///unused.db", "dataset": "steam", "dataset_fingerprint": fingerprint,
        "method": method, "budget": None if budget is None else {"n_sequences": budget[0], "seq_len": budget[1]},
        "protocol_hash": protocol or suite.protocol.hash(), "trials_used": trials, "trials_failed": 0,
        "best_value": 0.05, "best_params": {}, "best_config": {} if config is None else config,
        "reproducible": True, "note": None, **changes,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(summary), encoding="utf-8")
    return path


def test_real_study_feeds_run_and_trials_column(shared_data, tmp_path):
    suite = suite_from_mapping(TINY)
    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'tune.db'}", study_name="random-10", n_trials=3)
    tune(suite, "steam", "random", Budget(10, 10), settings, data_dir=shared_data, out_dir=tmp_path)

    untuned = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    tuned = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False,
                      tuned=load_tuned([tmp_path / "tune"]))

    assert len(untuned) == 1
    assert len(tuned) == 2
    by_tuning = {r["tuning"] is None: r for r in tuned}
    # random has an empty search space, so its study runs the default config once.
    assert by_tuning[False]["tuning"]["trials_used"] == 1
    assert by_tuning[False]["tuning"]["study"] == "random-10"
    assert by_tuning[False]["key"] != by_tuning[True]["key"]
    text = render_markdown(tuned)
    assert "tuning trials" in text
    rows = [line for line in text.splitlines() if line.startswith("| random")]
    assert len(rows) == 2
    assert sorted(line.split("|")[4].strip() for line in rows) == ["0", "1"]


def test_tuned_config_replaces_suite_config(shared_data, tmp_path, fingerprint):
    config = {"grad_weight": 0.0, "target_size": 200, "max_swaps": 0}
    folder = tmp_path / "tune"
    folder.mkdir()
    _summary(folder, "goracs-10", config=config, fingerprint=fingerprint)
    suite = suite_from_mapping({**TINY, "methods": ["goracs"], "method": {"goracs": {"max_swaps": 5}}})

    record = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False, tuned=load_tuned([folder]))[0]

    assert record["outcome"] == "ok"
    assert record["method_config"]["max_swaps"] == 0
    assert record["method_config"]["target_size"] == 200
    assert record["tuning"]["trials_used"] == 7


def test_tuned_config_of_other_protocol_rejected(shared_data, tmp_path, fingerprint):
    folder = tmp_path / "tune"
    folder.mkdir()
    _summary(folder, "random-10", method="random", protocol="0123456789abcdef", fingerprint=fingerprint)
    suite = suite_from_mapping(TINY)
    with pytest.raises(ConfigError, match="protocol"):
        run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False, tuned=load_tuned([folder]))
    assert read_records(tmp_path / "runs" / "tiny-tuned") == []


def test_tuned_config_of_other_data_rejected(shared_data, tmp_path):
    folder = tmp_path / "tune"
    folder.mkdir()
    _summary(folder, "random-10", method="random", fingerprint="0" * 16)
    suite = suite_from_mapping(TINY)
    with pytest.raises(ConfigError, match="fingerprint"):
        run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False, tuned=load_tuned([folder]))


def test_load_tuned_keys_by_dataset_method_budget(tmp_path):
    _summary(tmp_path, "a", config={"max_swaps": 3})
    _summary(tmp_path, "b", method="full", budget=None)
    tuned = load_tuned([tmp_path])
    assert set(tuned) == {("steam", "goracs", (10, 10)), ("steam", "full", None)}
    assert tuned[("steam", "goracs", (10, 10))].config == {"max_swaps": 3}


def test_load_tuned_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_tuned([tmp_path / "absent.json"])


def test_load_tuned_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no .json"):
        load_tuned([tmp_path])


def test_load_tuned_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"study": ', encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_tuned([path])


def test_load_tuned_missing_fields(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"study": "s", "method": "random"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="missing fields"):
        load_tuned([path])


def test_load_tuned_study_without_completed_trial(tmp_path):
    path = _summary(tmp_path, "empty", best_config=None)
    with pytest.raises(ConfigError, match="no completed trial"):
        load_tuned([path])


def test_load_tuned_unknown_config_field(tmp_path):
    path = _summary(tmp_path, "stale", config={"no_such_field": 1})
    with pytest.raises(ConfigError, match="no_such_field"):
        load_tuned([path])


def test_load_tuned_unknown_method(tmp_path):
    path = _summary(tmp_path, "gone", method="no-such-method")
    with pytest.raises(UnknownNameError):
        load_tuned([path])


def test_load_tuned_duplicate_cell(tmp_path):
    _summary(tmp_path, "first")
    _summary(tmp_path, "second")
    with pytest.raises(ConfigError, match="Pass only one"):
        load_tuned([tmp_path])
