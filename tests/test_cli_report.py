"""Command line and leaderboard rendering."""

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.report import (cells_frame, leaderboards, pooled_leaderboards, read_archived_cells, render_markdown,
                          render_pooled_markdown, write_reports)

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_list_prints_methods_then_datasets(shared_data):
    result = _cli("list", "--data-dir", str(shared_data))
    assert result.returncode == 0
    methods, _, datasets = result.stdout.partition("\n\n")
    assert "random" in methods.split()
    assert "full" in methods.split()
    assert "games" in datasets.split()


@pytest.mark.parametrize("command", ["run", "list", "report"])
def test_help_describes_options(command):
    result = _cli(command, "--help")
    assert result.returncode == 0
    assert "usage" in result.stdout


def test_run_help_gives_units():
    assert "seconds" in _cli("run", "--help").stdout


def test_unknown_dataset_exits_2_with_hint(shared_data, tmp_path):
    result = _cli("run", "--datasets", "gmaes", "--data-dir", str(shared_data), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "games" in result.stderr


def test_misspelt_second_dataset_stops_before_any_cell(shared_data, tmp_path):
    # The first dataset is valid; its cells must not run when a later name is wrong.
    code = main(["run", "--datasets", "steam,gmaes", "--methods", "random", "--budgets", "2", "--seeds", "0",
                 "--no-pop", "--data-dir", str(shared_data), "--out", str(tmp_path)])
    assert code == 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, expected", [
    (b'name = "caf\xe9"\n', "is not UTF-8 text"),
    (None, "cannot read suite file"),
])
def test_unreadable_suite_file_exits_2(tmp_path, capsys, content, expected):
    path = tmp_path / "s.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["run", "--suite", str(path), "--out", str(tmp_path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_suite_name_must_be_plain(tmp_path, capsys, name):
    assert main(["run", "--name", name, "--out", str(tmp_path / "out")]) == 2
    assert f"invalid name={name!r}" in capsys.readouterr().err
    assert main(["report", "--suite", name, "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_nan_wall_cap_rejected(tmp_path, capsys):
    # NaN compares false with everything, so a NaN cap would never fire.
    assert main(["run", "--wall-cap-s", "nan", "--out", str(tmp_path)]) == 2
    assert "must be a finite number" in capsys.readouterr().err


def test_unknown_method_exits_2_with_hint(tmp_path):
    assert main(["run", "--methods", "fostr", "--out", str(tmp_path)]) == 2


def _record(method, budget, seed, recall, protocol="p1", cpu="cpu A"):
    return {
        "schema": 1, "dataset": "games", "dataset_fingerprint": "f" * 64, "protocol_hash": protocol,
        "environment": {"hardware": {"cpu": cpu}}, "method": method,
        "family": "reference" if method == "full" else "coreset",
        "budget": None if budget is None else {"n_sequences": budget, "seq_len": 20}, "seed": seed,
        "outcome": "ok", "test": {"recall@10": recall, "ndcg@10": recall / 2},
        "costs": {"distill": {"wall_s": 1.0, "peak_rss_mib": 10.0}}, "synthetic": {"storage_bytes": 100},
    }


RECORDS = [
    _record("full", None, 0, 0.10), _record("full", None, 1, 0.12),
    _record("random", 20, 0, 0.04), _record("random", 20, 1, 0.06),
]


def test_leaderboard_relative_columns():
    (_, table), = leaderboards(RECORDS)
    random_row = table[table["method"] == "random"].iloc[0]
    assert random_row["recall@10_mean"] == pytest.approx(0.05)
    assert random_row["recall@10_vs_full"] == pytest.approx(0.05 / 0.11)
    assert random_row["recall@10_vs_random"] == pytest.approx(1.0)
    assert random_row["recall@10_std"] == pytest.approx(0.014142, abs=1e-6)


def test_leaderboard_splits_differing_protocols():
    other = [dict(copy.deepcopy(r), protocol_hash="p2") for r in RECORDS]
    assert len(leaderboards(RECORDS + other)) == 2
    assert "ranked separately" in render_markdown(RECORDS + other)


def test_leaderboard_splits_differing_hardware():
    other = [_record("random", 20, 2, 0.5, cpu="cpu B")]
    assert len(leaderboards(RECORDS + other)) == 2


def test_failed_cells_counted_not_ranked(tmp_path):
    failed = dict(_record("random", 20, 2, 0.0), outcome="failed", test=None)
    (_, table), = leaderboards(RECORDS + [failed])
    row = table[table["method"] == "random"].iloc[0]
    assert row["seeds"] == 2
    assert row["not_ok"] == 1
    paths = write_reports(RECORDS + [failed], tmp_path)
    assert paths["markdown"].read_text(encoding="utf-8").count("| random ") == 1
    assert paths["csv"].exists()


def test_pareto_front_keeps_undominated_points():
    import numpy as np

    from bench.plots import pareto_front

    cost = np.array([1.0, 2.0, 3.0, 0.5])
    accuracy = np.array([0.2, 0.1, 0.3, 0.05])
    assert pareto_front(cost, accuracy).tolist() == [3, 0, 2]


def test_write_reports_draws_both_plots(tmp_path):
    paths = write_reports(RECORDS, tmp_path)
    assert (tmp_path / "games-accuracy-vs-cost.png").stat().st_size > 0
    assert (tmp_path / "games-accuracy-vs-budget.png").stat().st_size > 0


def test_config_variants_are_separate_rows():
    variant = [dict(copy.deepcopy(r), method_config={"steps": 5}) for r in RECORDS if r["method"] == "random"]
    (_, table), = leaderboards(RECORDS + variant)
    random_rows = table[table["method"] == "random"]
    assert len(random_rows) == 2
    assert set(random_rows["seeds"]) == {2}


def test_failed_only_budget_keeps_its_row():
    failed = dict(_record("random", 50, 0, 0.0), outcome="failed", test=None)
    (_, table), = leaderboards(RECORDS + [failed])
    row = table[(table["method"] == "random") & (table["budget"] == 50)].iloc[0]
    assert row["seeds"] == 0
    assert row["not_ok"] == 1
    assert pd.isna(row["recall@10_mean"])
    other = table[(table["method"] == "random") & (table["budget"] == 20)].iloc[0]
    assert other["not_ok"] == 0


def test_one_seed_shows_mean_without_spread():
    (_, table), = leaderboards([_record("random", 20, 0, 0.04)])
    assert pd.isna(table.iloc[0]["recall@10_std"])
    text = render_markdown([_record("random", 20, 0, 0.04)])
    assert "0.0400 ±" not in text
    assert " 0.0400 |" in text


def test_run_exits_one_when_a_cell_fails(shared_data, tmp_path, capsys):
    code = main([
        "--threads", "1", "run", "--datasets", "steam", "--methods", "random", "--budgets", "100000",
        "--seeds", "0", "--no-pop", "--set", "data.sample_users=50", "--data-dir", str(shared_data),
        "--out", str(tmp_path), "--name", "too-large",
    ])
    assert code == 1
    assert "1 of 1 cells failed or were capped" in capsys.readouterr().out
    # A later command whose own cell is ok exits 0, though the folder keeps the failed record.
    code = main([
        "--threads", "1", "run", "--datasets", "steam", "--methods", "random", "--budgets", "5",
        "--seeds", "0", "--no-pop", "--set", "data.sample_users=50", "--set", "protocol.max_steps=10",
        "--set", "protocol.eval_every=5", "--data-dir", str(shared_data), "--out", str(tmp_path),
        "--name", "too-large",
    ])
    assert code == 0


def test_rewrite_keeps_archived_cells_without_records(tmp_path):
    # A fresh clone has the committed cells.csv but none of the ignored records.
    write_reports(RECORDS, tmp_path)
    before = pd.read_csv(tmp_path / "cells.csv")
    new = [_record("random", 20, 2, 0.08)]
    write_reports(new, tmp_path, archived=read_archived_cells(tmp_path / "cells.csv"))
    after = pd.read_csv(tmp_path / "cells.csv")
    assert len(after) == len(before) + 1
    (_, table), = leaderboards(new, archived=read_archived_cells(tmp_path / "cells.csv"))
    random_row = table[table["method"] == "random"].iloc[0]
    assert random_row["seeds"] == 3
    assert random_row["recall@10_mean"] == pytest.approx(0.06)


def test_record_replaces_archived_row(tmp_path):
    write_reports(RECORDS, tmp_path)
    rerun = [_record("random", 20, 0, 0.10)]
    archived = read_archived_cells(tmp_path / "cells.csv")
    (_, table), = leaderboards(rerun, archived=archived)
    random_row = table[table["method"] == "random"].iloc[0]
    assert random_row["seeds"] == 2
    assert random_row["recall@10_mean"] == pytest.approx(0.08)


def test_archive_on_other_hardware_ranks_apart(tmp_path):
    write_reports(RECORDS, tmp_path)
    other = [_record("random", 20, 0, 0.5, cpu="cpu B")]
    assert len(leaderboards(other, archived=read_archived_cells(tmp_path / "cells.csv"))) == 2


def test_digit_labels_survive_archive(tmp_path):
    # A config hash made of digits must not be read back as a number.
    record = dict(copy.deepcopy(RECORDS[2]), method_config={"steps": 5})
    write_reports([record], tmp_path)
    frame = pd.read_csv(tmp_path / "cells.csv", dtype=str)
    frame["config"] = "012345"
    frame.to_csv(tmp_path / "cells.csv", index=False)
    assert read_archived_cells(tmp_path / "cells.csv")["config"].tolist() == ["012345"]


def test_broken_archive_names_file_and_fix(tmp_path):
    (tmp_path / "cells.csv").write_text("method,seed\nrandom,0\n", encoding="utf-8")
    with pytest.raises(BenchError, match="cells.csv lacks the columns.*--drop-archived"):
        read_archived_cells(tmp_path / "cells.csv")
    assert read_archived_cells(tmp_path / "missing.csv") is None


@pytest.mark.parametrize("cut", [200, 3])
def test_truncated_archive_is_refused(tmp_path, cut):
    # Cutting 200 bytes leaves a short last row (empty metrics); 3 bytes only lose the final digits and newline.
    write_reports(RECORDS, tmp_path)
    path = tmp_path / "cells.csv"
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(BenchError, match="may be (truncated|cut short).*--drop-archived"):
        read_archived_cells(path)


def test_report_rebuilds_from_archive_alone(tmp_path, capsys):
    write_reports(RECORDS, tmp_path / "games-suite")
    (tmp_path / "games-suite" / "leaderboard.md").unlink()
    assert main(["report", "--suite", "games-suite", "--out", str(tmp_path)]) == 0
    assert "| random " in (tmp_path / "games-suite" / "leaderboard.md").read_text(encoding="utf-8")
    assert main(["report", "--suite", "games-suite", "--out", str(tmp_path), "--drop-archived"]) == 2
    assert "no records under" in capsys.readouterr().err


def test_unbudgeted_rows_match_records(tmp_path):
    pop = dict(_record("pop", None, None, 0.03), family="reference")
    write_reports(RECORDS + [pop], tmp_path)
    archived = read_archived_cells(tmp_path / "cells.csv")
    rerun = [_record("full", None, 0, 0.20), dict(_record("pop", None, None, 0.05), family="reference")]
    (_, table), = leaderboards(rerun, archived=archived)
    full = table[table["method"] == "full"].iloc[0]
    assert full["seeds"] == 2
    assert full["recall@10_mean"] == pytest.approx(0.16)
    assert table[table["method"] == "pop"].iloc[0]["recall@10_mean"] == pytest.approx(0.05)


def test_failed_rerun_keeps_archived_result(tmp_path, caplog):
    write_reports(RECORDS, tmp_path)
    failed = dict(_record("random", 20, 0, 0.0), outcome="capped", error="wall cap", test=None)
    with caplog.at_level(logging.WARNING, logger="bench.report"):
        (_, table), = leaderboards([failed], archived=read_archived_cells(tmp_path / "cells.csv"))
    row = table[table["method"] == "random"].iloc[0]
    assert row["seeds"] == 2
    assert row["not_ok"] == 0
    assert "archived ok result is kept" in caplog.text


def test_report_files_written_without_leftovers(tmp_path):
    write_reports(RECORDS, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "cells.csv").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("table", sorted(Path(__file__).resolve().parents[1].glob("reports/*/cells.csv")),
                         ids=lambda path: path.parent.name)
def test_committed_tables_read_as_archives(table):
    archived = read_archived_cells(table)
    boards = leaderboards([], archived=archived)
    assert boards
    assert sum(int(board["seeds"].sum()) for _, board in boards) == int((archived["outcome"] == "ok").sum())


def test_run_keeps_archive_unless_dropped(shared_data, tmp_path):
    folder = tmp_path / "too-large"
    write_reports(RECORDS, folder)
    args = ["--threads", "1", "run", "--datasets", "steam", "--methods", "random", "--budgets", "100000",
            "--seeds", "0", "--no-pop", "--set", "data.sample_users=50", "--data-dir", str(shared_data),
            "--out", str(tmp_path), "--name", "too-large"]
    assert main(args) == 1
    cells = pd.read_csv(folder / "cells.csv")
    assert len(cells) == len(RECORDS) + 1
    assert main(args + ["--drop-archived"]) == 1
    assert len(pd.read_csv(folder / "cells.csv")) == 1


def test_hardware_groups_get_own_plots(tmp_path):
    other = [dict(copy.deepcopy(r), environment={"hardware": {"cpu": "cpu B"}}) for r in RECORDS]
    paths = write_reports(RECORDS + other, tmp_path)
    plots = sorted(path.name for path in tmp_path.glob("*-accuracy-vs-cost.png"))
    assert len(plots) == 2
    assert any(name.endswith("-cpu-b-accuracy-vs-cost.png") for name in plots)
    assert len([key for key in paths if key.endswith("-cost-plot")]) == 2


def test_config_labels_agree_across_groups():
    # The other machine ran random with another config only, so both tables must name their config.
    other = [dict(copy.deepcopy(r), method_config={"steps": 5}, environment={"hardware": {"cpu": "cpu B"}})
             for r in RECORDS if r["method"] == "random"]
    boards = leaderboards(RECORDS + other)
    labels = [set(table.loc[table["method"] == "random", "label"]) for _, table in boards]
    assert len(labels) == 2
    assert all(len(group) == 1 and next(iter(group)).startswith("random [") for group in labels)
    assert labels[0] != labels[1]


def test_pooled_counts_shared_cell_once(tmp_path, caplog):
    # Seed 1 of random ran on both machines; seed 2 only on the second one.
    other = [_record("random", 20, 1, 0.06, cpu="cpu B"), _record("random", 20, 2, 0.08, cpu="cpu B")]
    (info, table), = pooled_leaderboards(RECORDS + other)
    assert info["hardware"] == ["cpu A", "cpu B"]
    assert info["shared_cells"] == 1
    assert info["max_abs_diff"] == 0.0
    row = table[table["method"] == "random"].iloc[0]
    assert row["seeds"] == 3
    assert row["recall@10_mean"] == pytest.approx(0.06)
    assert row["machines"] == 2
    assert pd.isna(row["distill_wall_s"])
    full = table[table["method"] == "full"].iloc[0]
    assert full["machines"] == 1
    assert full["distill_wall_s"] == pytest.approx(1.0)
    paths = write_reports(RECORDS + other, tmp_path)
    text = paths["pooled"].read_text(encoding="utf-8")
    assert "cpu A; cpu B" in text
    assert "1 cells ran on more than one machine" in text
    assert "their test recall@10, ndcg@10 differ by at most 0," in text


def test_pooled_warns_when_copies_differ(caplog):
    other = [_record("random", 20, 1, 0.07, cpu="cpu B")]
    with caplog.at_level(logging.WARNING):
        (info, table), = pooled_leaderboards(RECORDS + other)
    assert info["max_abs_diff"] == pytest.approx(0.01)
    assert info["differing"] == ["random 20 seed 1"]
    assert "differ by up to 0.01 in test metrics: random 20 seed 1 (0.01)" in caplog.text
    # The copy of the machine named first counts ("cpu A", recall 0.06), not the mean of both copies.
    row = table[table["method"] == "random"].iloc[0]
    assert row["recall@10_mean"] == pytest.approx(0.05)


def test_pooled_markdown_names_differing_cells():
    other = [_record("random", 20, 1, 0.07, cpu="cpu B"), _record("full", None, 0, 0.10, cpu="cpu B")]
    text = render_pooled_markdown(pooled_leaderboards(RECORDS + other))
    assert "Cells whose copies differ, largest difference first: random 20 seed 1." in text
    assert "full all seed 0" not in text


def test_pooled_only_for_several_machines(tmp_path):
    assert pooled_leaderboards(RECORDS) == []
    other = [_record("random", 20, 2, 0.08, cpu="cpu B")]
    write_reports(RECORDS + other, tmp_path)
    assert (tmp_path / "accuracy-across-hardware.md").exists()
    # Rewritten from one machine's cells, the earlier pooled table is stale and goes.
    paths = write_reports(RECORDS, tmp_path)
    assert "pooled" not in paths
    assert not (tmp_path / "accuracy-across-hardware.md").exists()


def test_pooled_keeps_lone_failed_cell():
    failed = dict(_record("random", 20, 3, 0.0, cpu="cpu B"), outcome="failed", test=None)
    rerun_failed = dict(_record("random", 20, 0, 0.0, cpu="cpu B"), outcome="failed", test=None)
    (_, table), = pooled_leaderboards(RECORDS + [failed, rerun_failed])
    row = table[table["method"] == "random"].iloc[0]
    # Seed 0 finished on cpu A, so only seed 3's failure is counted.
    assert row["seeds"] == 2
    assert row["not_ok"] == 1


def test_mixed_setups_warned_in_one_row(caplog):
    # Labels must not depend on which setups have records, so mixed setups share a row and get a warning.
    records = [_record("random", 20, 0, 0.04), _record("random", 20, 1, 0.06)]
    for record in records:
        record.update(key=f"k{record['seed']}", encoder={"model": "m"})
    records[1]["encoder"] = {"model": "other"}
    with caplog.at_level(logging.WARNING, logger="bench.report"):
        frame = cells_frame(records)
    assert frame["config"].nunique() == 1
    assert "2 encoder/expert/harness setups" in caplog.text


def test_repeated_record_of_one_cell_counted_once(caplog):
    # The later ok record is ranked, whatever the order the records were read in.
    old, new, failed = (_record("random", 20, 0, 0.04), _record("random", 20, 0, 0.08),
                        _record("random", 20, 0, 0.0))
    old.update(key="old-key", written_at="2026-01-01T00:00:00+00:00")
    new.update(key="new-key", written_at="2026-02-01T00:00:00+00:00")
    failed.update(key="failed-key", written_at="2026-03-01T00:00:00+00:00", outcome="failed")
    for order in ([old, new, failed], [failed, new, old]):
        with caplog.at_level(logging.WARNING, logger="bench.report"):
            frame = cells_frame(order)
        assert len(frame) == 1
        assert frame["test_recall@10"].iloc[0] == 0.08
    assert "only new-key is ranked" in caplog.text


def test_archive_with_two_protocols_is_accepted(tmp_path):
    # Cells of a protocol with fewer cut-offs leave some metric columns empty; that is no truncation.
    short = _record("random", 20, 2, 0.05, protocol="p2")
    short["test"] = {"recall@10": 0.05, "ndcg@10": 0.02}
    write_reports([*RECORDS, short], tmp_path)
    wider = copy.deepcopy(RECORDS)
    for record in wider:
        record["test"]["recall@50"] = 0.2
    write_reports([short, *wider], tmp_path / "other")
    for folder in (tmp_path, tmp_path / "other"):
        assert len(read_archived_cells(folder / "cells.csv")) == len(RECORDS) + 1
