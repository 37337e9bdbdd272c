"""Cost profile command: rows, epoch-time formula, ratios to FOSTER, caps, isolation, on a steam slice."""

import argparse
import json
import math

import pandas as pd
import pytest

from bench.errors import ConfigError
from bench.config import build_config, record_config, stable_hash
from bench.profile import (
    ProfileSpec,
    add_arguments,
    add_ratios,
    best_times_from_records,
    profiled_labels,
    run,
    summarise,
)
from bench.records import RECORD_SCHEMA
from bench.registry import get_method

METHODS = ("foster", "td3", "farzi")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory) -> str:
    """A suite file with a tiny learner, a 2-epoch expert, 300 steam users and fast method configs."""
    lines = [
        'name = "profile-tiny"', 'datasets = ["steam"]', f"methods = {_toml_value(list(METHODS))}",
        "budgets = [5]", "seq_len = 10", "seeds = [0]",
        "[protocol]", "max_steps = 20", "eval_every = 10", "patience = 2",
        "[learner]", "hidden = 16", "layers = 1", "max_len = 20",
        "[encoder]", "max_length = 32",
        "[expert]", "epochs = 2", "batch_size = 64",
        "[data]", "sample_users = 300", "sample_seed = 0",
    ]
    for name in METHODS:
        lines.append(f"[method.{name}]")
        for key, value in get_method(name).test_overrides.items():
            lines.append(f"{key} = {_toml_value(value)}")
    path = tmp_path_factory.mktemp("suite") / "tiny.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _args(shared_data, out, suite, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--methods", ",".join(METHODS), "--datasets", "steam", "--data-dir", str(shared_data),
        "--out", str(out), "--suite", suite, "--steps", "2", "--budget", "5", "--seq-len", "10", *extra,
    ])
    # The CLI's top-level --threads option lands on the same namespace.
    args.threads = 1
    return args


@pytest.fixture(scope="module")
def profile_run(shared_data, tiny_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    code = run(_args(shared_data, out, tiny_suite, "--in-process"))
    return code, out, pd.read_csv(out / "profile" / "profile.csv")


def test_profile_exits_zero_when_all_ok(profile_run):
    assert profile_run[0] == 0


def test_profile_has_one_row_per_method(profile_run):
    assert list(profile_run[2]["method"]) == list(METHODS)


def test_profile_rows_are_ok(profile_run):
    assert set(profile_run[2]["outcome"]) == {"ok"}


def test_profile_times_every_method(profile_run):
    frame = profile_run[2]
    assert (frame["step_s"] > 0).all()
    assert (frame["epoch_s"] > frame["step_s"]).all()
    assert (frame["peak_rss_mib"] > 0).all()


def test_profile_foster_ratio_is_one(profile_run):
    foster = profile_run[2].set_index("method").loc["foster"]
    assert foster["epoch_vs_foster"] == pytest.approx(1.0)


def test_profile_best_time_is_na_without_probe(profile_run):
    assert profile_run[2]["best_s"].isna().all()


def test_profile_writes_markdown(profile_run):
    text = (profile_run[1] / "profile" / "profile.md").read_text(encoding="utf-8")
    assert "epoch_vs_foster" in text
    assert "| td3" in text
    # The note names the machine, so tables from two machines can be distinguished.
    assert "Machine: " in text
    assert "1 torch threads" in text


def test_profile_table_name_option(shared_data, tiny_suite, tmp_path):
    args = _args(shared_data, tmp_path, tiny_suite, "--in-process", "--table", "profile-second")
    args.methods = ["head"]
    assert run(args) == 0
    assert (tmp_path / "profile" / "profile-second.csv").exists()
    assert (tmp_path / "profile" / "profile-second.md").exists()
    assert not (tmp_path / "profile" / "profile.csv").exists()


@pytest.mark.parametrize("name", ["../elsewhere", "profile.csv", "", "a/b"])
def test_profile_table_name_rejects_paths(name, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--table", name])
    assert "plain table name" in capsys.readouterr().err


def test_summarise_epoch_time_formula():
    spec = ProfileSpec("steam", "td3", None, "reports", "games", 2, 5, 10, 0, None, False, None, None)
    raw = {
        "outcome": "ok", "n_items": 100, "n_train_sequences": 1000, "rss_start_mib": 500.0,
        "distill": {"peak_rss_mib": 650.0, "wall_s": 3.0},
        "meta": {"steps": 2, "step_wall_s": 0.5, "real_batch": 250,
                 "probe_history": [{"step": 1, "elapsed_s": 4.0, "ndcg@10": 0.1},
                                   {"step": 2, "elapsed_s": 9.0, "ndcg@10": 0.3}]},
    }
    row = summarise(spec, raw)
    assert row["epoch_s"] == pytest.approx(2.0)
    assert row["best_s"] == pytest.approx(9.0)
    assert row["distill_rss_mib"] == pytest.approx(150.0)
    assert row["distill_s"] == pytest.approx(3.0)


def test_summarise_without_step_timing_gives_na():
    spec = ProfileSpec("steam", "random", None, "reports", "games", 2, 5, 10, 0, None, False, None, None)
    raw = {"outcome": "ok", "n_items": 100, "n_train_sequences": 1000, "rss_start_mib": 500.0,
           "distill": {"peak_rss_mib": 510.0}, "meta": {}}
    row = summarise(spec, raw)
    assert row["epoch_s"] is None
    assert row["best_s"] is None


def test_ratios_divide_by_foster_of_same_dataset():
    frame = pd.DataFrame([
        {"dataset": "a", "method": "foster", "epoch_s": 2.0, "best_s": None, "distill_rss_mib": 10.0},
        {"dataset": "a", "method": "td3", "epoch_s": 50.0, "best_s": 7.0, "distill_rss_mib": 300.0},
        {"dataset": "b", "method": "td3", "epoch_s": 80.0, "best_s": 7.0, "distill_rss_mib": 300.0},
    ])
    out = add_ratios(frame)
    assert out.loc[1, "epoch_vs_foster"] == pytest.approx(25.0)
    assert out.loc[1, "memory_vs_foster"] == pytest.approx(30.0)
    assert pd.isna(out.loc[1, "best_vs_foster"])
    assert pd.isna(out.loc[2, "epoch_vs_foster"])


def _write_record(folder, name, dataset, method, elapsed, method_config=None, n_sequences=50, seq_len=20,
                  tuning=None):
    """Write a minimal finished run record whose probe peaked ``elapsed`` seconds into the run."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "schema": RECORD_SCHEMA, "key": name, "dataset_fingerprint": "f" * 64, "protocol_hash": "p",
        "outcome": "ok", "dataset": dataset, "method": method, "tuning": tuning,
        "method_config": method_config, "budget": {"n_sequences": n_sequences, "seq_len": seq_len},
        "synthetic": {"meta": {"probe_history": [{"step": 5, "elapsed_s": elapsed, "ndcg@10": 0.2},
                                                 {"step": 10, "elapsed_s": 99.0, "ndcg@10": 0.1}]}},
    }
    (folder / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")


def test_best_times_read_from_run_records(tmp_path):
    folder = tmp_path / "runs" / "games"
    _write_record(folder, "r0", "games", "td3", 10.0)
    _write_record(folder, "r1", "games", "td3", 20.0)
    _write_record(folder, "r2", "games", "td3", 70.0, n_sequences=20)
    assert best_times_from_records(tmp_path, ["games"], 50) == {("games", "td3"): pytest.approx(15.0)}


def _tiny_config(method, **changes):
    """Return the record config of ``method`` under the tiny suite (its test overrides) plus ``changes``."""
    suite_values = dict(get_method(method).test_overrides)
    return record_config(build_config(get_method(method).Config, {**suite_values, **changes}))


def test_best_times_count_only_the_profiled_config(tmp_path, tiny_suite):
    folder = tmp_path / "runs" / "a"
    _write_record(folder, "r0", "steam", "foster", 10.0, _tiny_config("foster"))
    # A control run with another config at the same budget must not enter the mean.
    _write_record(folder, "r1", "steam", "foster", 90.0, _tiny_config("foster", lr_data=1e-12))
    # So must a tuned run, even when the study picked the profiled config.
    _write_record(folder, "r3", "steam", "foster", 70.0, _tiny_config("foster"), tuning={"study": "s"})
    _write_record(folder, "r4", "steam", "foster", 80.0, _tiny_config("foster"), seq_len=10)
    _write_record(tmp_path / "runs" / "b", "r2", "steam", "foster", 30.0, _tiny_config("foster"))
    best = best_times_from_records(tmp_path, ["a", "b"], 50, profiled_labels(tiny_suite), seq_len=20)
    assert best == {("steam", "foster"): pytest.approx(20.0)}


def _copy_table(profile_run, folder):
    """Copy the profile run's CSV and Markdown tables into ``folder``; return the CSV path."""
    table = folder / "profile.csv"
    for suffix in (".csv", ".md"):
        source = profile_run[1] / "profile" / f"profile{suffix}"
        table.with_suffix(suffix).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return table


def _rebuild_args(tiny_suite, out, table, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # No --data-dir: a run that tried to time anything could not load the dataset.
    return parser.parse_args(["--suite", tiny_suite, "--out", str(out), "--from-table", str(table), *extra])


def test_from_table_refills_best_times_without_timing(profile_run, tiny_suite, tmp_path):
    table = _copy_table(profile_run, tmp_path)
    records = tmp_path / "runs" / "tiny"
    _write_record(records, "f", "steam", "foster", 4.0, _tiny_config("foster"), n_sequences=5, seq_len=10)
    _write_record(records, "t", "steam", "td3", 12.0, _tiny_config("td3"), n_sequences=5, seq_len=10)
    # The table records its budget (5x10), so --budget may be left out.
    assert run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny")) == 0
    frame = pd.read_csv(table).set_index("method")
    before = profile_run[2].set_index("method")
    assert frame.loc["foster", "best_s"] == pytest.approx(4.0)
    assert frame.loc["td3", "best_vs_foster"] == pytest.approx(3.0)
    assert pd.isna(frame.loc["farzi", "best_s"])
    assert frame.loc["td3", "step_s"] == pytest.approx(before.loc["td3", "step_s"])
    text = table.with_suffix(".md").read_text(encoding="utf-8")
    assert "Rebuilt from profile.csv" in text
    assert "2 distillation steps per method" in text, "the note on how the table was measured was lost"
    assert run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny")) == 0
    text = table.with_suffix(".md").read_text(encoding="utf-8")
    assert text.count("best_s: mean over") == 1, "a second rebuild kept the first one's best_s note"


def test_partial_refill_keeps_earlier_provenance(profile_run, tiny_suite, tmp_path):
    table = _copy_table(profile_run, tmp_path)
    _write_record(tmp_path / "runs" / "tiny", "t", "steam", "td3", 12.0, _tiny_config("td3"), n_sequences=5,
                  seq_len=10)
    _write_record(tmp_path / "runs" / "later", "f", "steam", "foster", 4.0, _tiny_config("foster"),
                  n_sequences=5, seq_len=10)
    _write_record(tmp_path / "runs" / "last", "z", "steam", "farzi", 8.0, _tiny_config("farzi"),
                  n_sequences=5, seq_len=10)
    assert run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny")) == 0
    # Later refills from other folders fill one row each; every row keeps naming its own source.
    for suite in ("later", "later", "last"):
        assert run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", suite)) == 0
    text = table.with_suffix(".md").read_text(encoding="utf-8")
    assert ("by row: suite(s) later for steam/foster; suite(s) tiny for steam/td3; "
            "suite(s) last for steam/farzi.") in text
    assert text.count("best_s: mean over") == 1
    best = pd.read_csv(table).set_index("method")["best_s"]
    assert best.to_dict() == pytest.approx({"foster": 4.0, "td3": 12.0, "farzi": 8.0})


def test_profile_rows_name_their_config(profile_run, tiny_suite):
    frame = pd.read_csv(profile_run[1] / "profile" / "profile.csv", dtype={"config": str}).set_index("method")
    assert frame.loc["foster", "config"] == profiled_labels(tiny_suite)["foster"]


def test_from_table_uses_timed_config(profile_run, tiny_suite, tmp_path):
    # A default that changed after the table was timed must not supply best_s for the old rows.
    table = _copy_table(profile_run, tmp_path)
    old = _tiny_config("foster", subset_row_tops=False)
    frame = pd.read_csv(table, dtype={"config": str})
    frame.loc[frame["method"] == "foster", "config"] = stable_hash(old, length=6)
    frame.to_csv(table, index=False)
    records = tmp_path / "runs" / "tiny"
    _write_record(records, "new", "steam", "foster", 4.0, _tiny_config("foster"), n_sequences=5, seq_len=10)
    _write_record(records, "old", "steam", "foster", 6.0, old, n_sequences=5, seq_len=10)
    assert run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny")) == 0
    rebuilt = pd.read_csv(table, dtype={"config": str}).set_index("method")
    assert rebuilt.loc["foster", "best_s"] == pytest.approx(6.0)
    assert rebuilt.loc["foster", "config"] == stable_hash(old, length=6)


def test_from_table_rejects_two_labels(profile_run, tiny_suite, tmp_path):
    table = _copy_table(profile_run, tmp_path)
    frame = pd.read_csv(table, dtype={"config": str})
    frame = pd.concat([frame, frame[frame["method"] == "foster"].assign(config="000000", dataset="other")])
    frame.to_csv(table, index=False)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    with pytest.raises(ConfigError, match="several config labels"):
        run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny"))


def test_from_table_rejects_other_budget(profile_run, tiny_suite, tmp_path):
    table = _copy_table(profile_run, tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    args = _rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny", "--budget", "20")
    with pytest.raises(ConfigError, match="--budget 20 does not match .* budget 5"):
        run(args)


def test_from_table_rejects_mixed_budgets(profile_run, tiny_suite, tmp_path):
    table = _copy_table(profile_run, tmp_path)
    frame = pd.read_csv(table)
    frame.loc[0, "budget"] = 20
    frame.to_csv(table, index=False)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"mixes budget values \[5, 20\]"):
        run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny"))


def test_from_table_unknown_records_folder(profile_run, tiny_suite, tmp_path):
    table = _copy_table(profile_run, tmp_path)
    (tmp_path / "runs" / "games").mkdir(parents=True)
    before = table.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="--records-suite gmaes: no record folder .*folders there: games"):
        run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "gmaes"))
    assert table.read_text(encoding="utf-8") == before


def test_from_table_unreadable_file(tiny_suite, tmp_path):
    table = tmp_path / "profile.csv"
    table.write_text("", encoding="utf-8")
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot read it as CSV"):
        run(_rebuild_args(tiny_suite, tmp_path, table, "--records-suite", "tiny"))


def test_from_table_needs_records_suite(tiny_suite, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--suite", tiny_suite, "--out", str(tmp_path),
                              "--from-table", str(tmp_path / "missing.csv")])
    with pytest.raises(ConfigError, match="--records-suite"):
        run(args)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    args.records_suite = ["tiny"]
    with pytest.raises(ConfigError, match="missing.csv: no such file"):
        run(args)


def test_profile_rejects_zero_steps(shared_data, tiny_suite, tmp_path):
    args = _args(shared_data, tmp_path, tiny_suite, "--in-process")
    args.steps = 0
    with pytest.raises(ConfigError, match="--steps"):
        run(args)


def test_profile_reports_capped_run(shared_data, tiny_suite, tmp_path):
    args = _args(shared_data, tmp_path, tiny_suite, "--in-process", "--wall-cap-s", "0")
    args.methods = ["td3"]
    assert run(args) == 1
    frame = pd.read_csv(tmp_path / "profile" / "profile.csv")
    assert frame.loc[0, "outcome"] == "capped"


def test_profile_isolated_run_is_timed(shared_data, tiny_suite, tmp_path):
    args = _args(shared_data, tmp_path, tiny_suite)
    args.methods = ["farzi"]
    assert run(args) == 0
    frame = pd.read_csv(tmp_path / "profile" / "profile.csv")
    assert frame.loc[0, "step_s"] > 0
    assert not math.isnan(frame.loc[0, "distill_rss_mib"])


def test_profile_times_coreset_selection(shared_data, tiny_suite, tmp_path):
    args = _args(shared_data, tmp_path, tiny_suite, "--in-process")
    args.methods = ["kcenter", "head"]
    assert run(args) == 0
    frame = pd.read_csv(tmp_path / "profile" / "profile.csv").set_index("method")
    assert (frame["distill_s"] > 0).all()
    # Selection has no distillation steps, so the per-step columns stay empty.
    assert frame["step_s"].isna().all()
    assert frame["epoch_vs_foster"].isna().all()
