"""Runner: skipping finished cells, resuming after a kill, recording failures."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config import added_field
from bench.errors import BenchError, ConfigError, UnknownNameError
from bench.records import read_records
from bench.runner import load_suite, make_probe, run_suite, suite_from_mapping
from methods.random_subset import RandomSubset

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "datasets": ["steam"],
    "methods": ["full", "random"],
    "budgets": [10],
    "seq_len": 10,
    "seeds": [0],
    "protocol": {"max_steps": 20, "eval_every": 10, "patience": 2},
    "learner": {"hidden": 16, "layers": 1, "max_len": 20},
    "encoder": {"max_length": 32},
    "data": {"sample_users": 400, "sample_seed": 0},
}


def _records_by_key(out):
    return {r["key"]: r for r in read_records(out / "runs" / "tiny")}


def test_rerun_skips_every_finished_cell(shared_data, tmp_path):
    suite = suite_from_mapping(TINY)
    first = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert len(first) == 3
    assert all(r["outcome"] == "ok" for r in first)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    second = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert {r["key"] for r in second} == {r["key"] for r in first}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")} == mtimes


def test_added_config_field_keeps_record_keys(shared_data, tmp_path, monkeypatch):
    suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False})
    before = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)[0]

    @dataclasses.dataclass(frozen=True)
    class Config(RandomSubset.Config):
        extra: bool = added_field(False, reason="a field added after records existed")

    monkeypatch.setattr(RandomSubset, "Config", Config)
    path = next((tmp_path / "runs").rglob("*.json"))
    mtime = path.stat().st_mtime_ns
    again = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)[0]
    assert again["key"] == before["key"]
    assert path.stat().st_mtime_ns == mtime, "the finished cell ran again"
    changed_suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False,
                                        "method": {"random": {"extra": True}}})
    records = run_suite(changed_suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert before["key"] in {r["key"] for r in records}
    changed = [r for r in records if r["key"] != before["key"]]
    assert len(changed) == 1, "setting the added field did not give the cell a new key"
    assert changed[0]["method_config"] == {"extra": True}


def test_legacy_value_reaches_the_method(shared_data, tmp_path, monkeypatch):
    # The record leaves a field out at its legacy value; the method must still get that value, not the default.
    @dataclasses.dataclass(frozen=True)
    class Config(RandomSubset.Config):
        extra: bool = added_field(True, legacy=False, reason="a field whose default left the legacy value")

    seen = []
    original = RandomSubset.distill

    def spy(self, train, budget, context):
        seen.append(self.config.extra)
        return original(self, train, budget, context)

    monkeypatch.setattr(RandomSubset, "Config", Config)
    monkeypatch.setattr(RandomSubset, "distill", spy)
    suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False,
                                "method": {"random": {"extra": False}}})
    record = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)[0]
    assert seen == [False]
    assert record["method_config"] == {}
    default_suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False})
    records = run_suite(default_suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert seen == [False, True]
    assert {"extra": True} in [r["method_config"] for r in records]


def test_budget_too_large_is_recorded_failure(shared_data, tmp_path):
    suite = suite_from_mapping({**TINY, "budgets": [100_000], "methods": ["random"], "include_pop": False})
    records = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert records[0]["outcome"] == "failed"
    assert "exceeds" in records[0]["error"]


def test_records_carry_environment_and_costs(shared_data, tmp_path):
    suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False})
    record = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)[0]
    assert record["environment"]["libraries"]["torch"].startswith("2.13")
    assert record["costs"]["distill"]["wall_s"] >= 0
    assert record["costs"]["evaluate"]["peak_rss_mib"] > 0
    assert record["costs"]["evaluate"]["gpu_peak_allocated_bytes"] is None
    assert record["synthetic"]["storage_bytes"] == 10 * 10 * 4


def test_killed_run_resumes_without_touching_finished(shared_data, tmp_path):
    suite_file = tmp_path / "tiny.toml"
    seeds = "[0, 1, 2, 3]"
    suite_file.write_text(
        'name = "tiny"\ndatasets = ["steam"]\nmethods = ["full"]\nbudgets = [10]\nseq_len = 10\n'
        f"seeds = {seeds}\ninclude_pop = false\n"
        "[protocol]\nmax_steps = 60\neval_every = 20\npatience = 2\n"
        "[learner]\nhidden = 16\nlayers = 1\nmax_len = 20\n[encoder]\nmax_length = 32\n"
        "[data]\nsample_users = 1500\nsample_seed = 0\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench", "run", "--suite", str(suite_file), "--data-dir", str(shared_data),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs" / "tiny"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(runs.rglob("*.json"))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.read_bytes() for p in runs.rglob("*.json")}
    assert 1 <= len(finished) < 4
    assert not list(runs.rglob("*.tmp"))

    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    after = {p: p.read_bytes() for p in runs.rglob("*.json")}
    assert len(after) == 4
    for path, content in finished.items():
        assert after[path] == content


def test_suite_unknown_method_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'random'"):
        suite_from_mapping({**TINY, "methods": ["randon"]})


def test_suite_unknown_key_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'budgets'"):
        suite_from_mapping({**TINY, "budget": [1]})


def test_suite_invalid_protocol_value_names_it():
    with pytest.raises(ConfigError, match="max_steps"):
        suite_from_mapping({**TINY, "protocol": {"max_steps": 0}})


def test_builtin_quickstart_loads():
    suite = load_suite("quickstart")
    assert suite.datasets == ("ml-100k",)


@pytest.mark.parametrize("name", ["steam", "games", "food"])
def test_dataset_suites_share_one_protocol(name):
    # The cost profile compares time to best across these three suites, which
    # holds only while everything but the dataset is the same.
    suite, games = load_suite(name), load_suite("games")
    assert suite.datasets == (name,)
    for field in ("methods", "budgets", "seq_len", "seeds", "protocol",
                  "encoder", "expert", "method_configs"):
        assert getattr(suite, field) == getattr(games, field), field


def test_unknown_suite_name_lists_builtin():
    with pytest.raises(ConfigError, match="quickstart"):
        load_suite("quickstrat")


@pytest.mark.parametrize("section", ["protocol", "caps", "data", "learner"])
def test_section_given_a_plain_value_rejected(section):
    with pytest.raises(ConfigError, match=f"'{section}' is a table"):
        suite_from_mapping({**TINY, section: 5})


@pytest.mark.parametrize("cap", [-1, -0.5, "abc"])
def test_invalid_wall_cap_rejected(cap):
    with pytest.raises(ConfigError, match="wall_s"):
        suite_from_mapping(TINY, {"caps.wall_s": cap})


def test_repeated_seeds_rejected():
    with pytest.raises(ConfigError, match=r"seeds repeats \[0\]"):
        suite_from_mapping({**TINY, "seeds": [0, 0]})


def test_unknown_top_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="Valid keys: budgets"):
        suite_from_mapping({**TINY, "foo": 1})


def test_method_without_config_says_so():
    with pytest.raises(ConfigError, match="takes no config keys"):
        suite_from_mapping({**TINY, "method": {"random": {"nosuch": 1}}})


def test_probe_leaves_global_rng_alone(steam_cache):
    import torch

    from bench.evaluator import Protocol
    from bench.synthetic import SyntheticSet

    data = steam_cache.data
    probe = make_probe(steam_cache, Protocol(learner=steam_cache.learner), seed=0)
    synthetic = SyntheticSet.from_sequences(list(data.train_seqs[:10]), data.n_items, 10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe(synthetic, max_steps=4, n_users=50)
    assert torch.equal(torch.rand(3), expected)


def test_read_records_names_files_of_another_schema(tmp_path, caplog):
    (tmp_path / "a.json").write_text('[1, 2]', encoding="utf-8")
    (tmp_path / "b.json").write_text('{"schema": 0}', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bench.records"):
        assert read_records(tmp_path) == []
    assert "a.json: not a record of schema" in caplog.text
    assert "(found 'list')" in caplog.text
    assert "(found 0)" in caplog.text


def test_capped_cell_runs_again_when_the_cap_changes(shared_data, tmp_path, caplog):
    base = {**TINY, "methods": ["foster"], "include_pop": False,
            "method": {"foster": {"steps": 2, "probe_every": 1, "probe_steps": 2, "subset_size": 64}}}
    capped = run_suite(suite_from_mapping({**base, "caps": {"wall_s": 0}}), data_dir=shared_data,
                       out_dir=tmp_path, progress=False)
    assert [r["outcome"] for r in capped] == ["capped"]
    assert capped[0]["caps"] == {"wall_s": 0, "rss_mib": None}
    # Same caps: the capped record finishes the cell.
    again = run_suite(suite_from_mapping({**base, "caps": {"wall_s": 0}}), data_dir=shared_data,
                      out_dir=tmp_path, progress=False)
    assert [r["outcome"] for r in again] == ["capped"]
    # No cap: the cell runs again under the same key.
    with caplog.at_level(logging.INFO, logger="bench.runner"):
        uncapped = run_suite(suite_from_mapping(base), data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert [r["outcome"] for r in uncapped] == ["ok"]
    assert uncapped[0]["key"] == capped[0]["key"]
    assert "running it again under" in caplog.text


def test_record_with_another_key_is_not_trusted(shared_data, tmp_path, caplog):
    suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False})
    first = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)[0]
    path = next((tmp_path / "runs").rglob("*.json"))
    path.write_text(json.dumps({**first, "key": "copied-from-elsewhere"}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bench.runner"):
        again = run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
    assert "contains key 'copied-from-elsewhere'" in caplog.text
    assert [r["key"] for r in again] == [first["key"]]


def test_unwritable_records_folder_stops_before_any_cell(shared_data, tmp_path):
    # A file in place of the runs folder: root ignores permission bits, so this replaces a read-only folder.
    (tmp_path / "runs").write_text("not a folder", encoding="utf-8")
    suite = suite_from_mapping({**TINY, "methods": ["random"], "include_pop": False})
    with pytest.raises(BenchError, match="cannot write records under .*pass a writable --out"):
        run_suite(suite, data_dir=shared_data, out_dir=tmp_path, progress=False)
