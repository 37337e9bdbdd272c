"""Leaderboards from run records: pandas for grouping, tabulate for rendering.

Rows are (method, budget) aggregated over seeds: mean and standard deviation
of test metrics, the mean relative to full data and to the random subset of
the same budget, costs, and the tuning trials spent on the row's config (0
for a default or suite config). Records that differ in protocol, dataset
fingerprint or hardware are never ranked in one table: each combination gets
its own table, and a note explains why there are several.

Most runs of one seed give the same metrics on different CPUs (FOSTER,
random subsets, full data and the popularity list did on two machines),
so accuracy can be pooled across machines where costs cannot. TD3 and
Farzi may not, because their unrolled inner loops can grow rounding
differences into different results. The pooled table therefore names each
cell whose copies differ.
When a dataset has cells from more than one machine,
``accuracy-across-hardware.md`` ranks them in one table per (dataset,
fingerprint, protocol): a cell run on several machines counts once, the
largest difference between its copies is printed, and costs are shown only
for rows run on one machine.

Records live under an ignored folder, while the generated ``cells.csv`` is
committed beside each leaderboard. When a leaderboard is rewritten, the rows
of the earlier ``cells.csv`` whose cell has no record (for instance on a fresh
clone, or on another machine) are kept as archived cells, so extending a
leaderboard keeps the results measured elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.config import stable_hash
from bench.errors import BenchError
from bench.records import write_atomic

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("recall@10", "ndcg@10")

# Columns that identify one cell. A record and an archived row with equal values are the same cell.
CELL_KEY = ("dataset", "fingerprint", "protocol", "hardware", "method", "config", "budget", "seq_len", "seed")
_TEXT_COLUMNS = ("dataset", "fingerprint", "protocol", "hardware", "method", "config", "family", "outcome", "error",
                 "users")


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Flatten records into one row per cell."""
    rows = []
    for r in records:
        costs = r.get("costs") or {}
        synthetic = r.get("synthetic") or {}
        budget = r.get("budget")
        row = {
            "dataset": r["dataset"],
            "fingerprint": r["dataset_fingerprint"][:12],
            "protocol": r["protocol_hash"],
            "hardware": (r.get("environment") or {}).get("hardware", {}).get("cpu"),
            "method": r["method"],
            "config": _config_label(r),
            "family": r.get("family"),
            "budget": budget["n_sequences"] if budget else None,
            "seq_len": budget["seq_len"] if budget else None,
            "seed": r.get("seed"),
            "outcome": r["outcome"],
            "error": r.get("error"),
            "distill_wall_s": (costs.get("distill") or {}).get("wall_s"),
            "distill_peak_rss_mib": (costs.get("distill") or {}).get("peak_rss_mib"),
            "evaluate_wall_s": (costs.get("evaluate") or {}).get("wall_s"),
            "storage_bytes": synthetic.get("storage_bytes"),
            "users": r.get("users"),
            # Untuned cells ran the default or suite config: zero tuning trials.
            "trials": (r.get("tuning") or {}).get("trials_used", 0),
        }
        for split in ("valid", "test"):
            for name, value in (r.get(split) or {}).items():
                row[f"{split}_{name}"] = value
        row["_key"] = r.get("key")
        row["_setup"] = _setup_hash(r)
        row["_written"] = r.get("written_at")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    _warn_mixed_setups(frame)
    frame = _drop_repeated_cells(frame)
    return frame.drop(columns=["_key", "_setup", "_written"])


def _setup_hash(record: dict) -> str:
    """Hash what changes a result beside the method config and the protocol: encoder, expert, harness version."""
    from bench.registry import get_method

    method = record.get("method")
    try:
        reads_expert = method != "pop" and bool(get_method(method).needs_expert)
    except BenchError:
        reads_expert = True  # a method no longer registered: keep its expert in the hash
    return stable_hash({
        "encoder": record.get("encoder") if method != "pop" else None,
        "expert": record.get("expert") if reads_expert else None,
        "bench_version": (record.get("environment") or {}).get("bench_version"),
    }, length=4)


def _warn_mixed_setups(frame: pd.DataFrame) -> None:
    """Warn when records of one config differ in encoder, expert schedule or harness version.

    Such records share a leaderboard row and are averaged as seeds.
    NOTE: they are not split into rows of their own, because a label that
    depends on which setups have records would change as records arrive and
    leave the earlier rows of ``cells.csv`` behind as duplicates. Give such
    runs their own suite name (``--name``) to rank them apart.
    """
    group_columns = [name for name in CELL_KEY if name not in ("seed", "budget", "seq_len")]
    keys = frame[group_columns].fillna("").astype(str).agg("|".join, axis=1)
    for _, part in frame.groupby(keys, sort=False):
        setups = sorted(part["_setup"].unique())
        if len(setups) > 1:
            logger.warning("%s/%s config %s: records of %d encoder/expert/harness setups (%s) share one row; "
                           "run them under separate suite names (--name) to rank them apart",
                           part["dataset"].iloc[0], part["method"].iloc[0], part["config"].iloc[0], len(setups),
                           ", ".join(setups))


def _drop_repeated_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one record per cell, warning about the others, so no seed is averaged twice.

    Two records of one cell key (for instance, from before and after a method
    version change) are different runs of the same seed. The ok one is
    kept over one that failed or was capped, then the one written last
    (records written before ``written_at`` existed count as oldest).
    """
    frame = frame.copy()
    frame["_rank_ok"] = frame["outcome"] == "ok"
    frame["_rank_time"] = frame["_written"].fillna("")
    order = frame.sort_values(["_rank_ok", "_rank_time"], ascending=False, kind="stable").index
    frame = frame.loc[order]
    keys = pd.Series(_cell_keys(frame), index=frame.index)
    repeated = keys.duplicated(keep="first")
    for index in frame.index[repeated]:
        ranked = frame.index[(keys == keys[index]) & ~repeated][0]
        logger.warning("%s/%s budget %s seed %s has two records (keys %s and %s); only %s is ranked. "
                       "Move the other out of the runs folder.", frame.at[index, "dataset"],
                       frame.at[index, "method"], frame.at[index, "budget"], frame.at[index, "seed"],
                       frame.at[ranked, "_key"], frame.at[index, "_key"], frame.at[ranked, "_key"])
    unique = frame.loc[~repeated].sort_index()
    return unique.drop(columns=["_rank_ok", "_rank_time"]).reset_index(drop=True)


def read_archived_cells(path: Path) -> pd.DataFrame | None:
    """Read the ``cells.csv`` an earlier report wrote, or return None if there is none.

    Hashes are read as text, so a label made only of digits keeps its leading
    zeros. A table written before the ``trials`` column existed gets 0 there,
    the value of every untuned cell.

    Raises:
        BenchError: if the file cannot be parsed, lacks a cell-key column,
            or has a row without dataset, method or outcome. Also if it looks
            cut short: it has no final line break, or its ok last row lacks
            metrics that the other rows of its protocol have.
    """
    path = Path(path)
    if not path.is_file():
        return None
    fix = "Repair or delete it, or pass --drop-archived to write the leaderboard from the records alone."
    try:
        frame = pd.read_csv(path, dtype={name: str for name in _TEXT_COLUMNS})
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read the earlier per-cell table {path}: {exc}. {fix}") from exc
    missing = [name for name in (*CELL_KEY, "outcome") if name not in frame.columns]
    if missing:
        raise BenchError(f"the earlier per-cell table {path} lacks the columns {missing}. {fix}")
    incomplete = frame[frame[["dataset", "method", "outcome"]].isna().any(axis=1)]
    if len(incomplete):
        lines = ", ".join(str(index + 2) for index in incomplete.index[:5])
        raise BenchError(f"the earlier per-cell table {path} has rows without dataset, method or outcome "
                         f"(lines {lines}). {fix}")
    # A cut-short file loses the end of its last row. Other rows may lack some
    # metrics legitimately (a protocol with other cut-offs), so the last row
    # is compared with the rows of its own protocol.
    metric_columns = [name for name in frame.columns if name.startswith("test_")]
    if len(frame) > 1 and metric_columns and frame["outcome"].iloc[-1] == "ok":
        last = frame.iloc[-1]
        peers = frame.iloc[:-1]
        peers = peers[(peers["protocol"] == last["protocol"]) & (peers["outcome"] == "ok")]
        expected = [name for name in metric_columns if peers[name].notna().any()]
        if len(peers) and last[expected].isna().any():
            raise BenchError(f"the earlier per-cell table {path} has an ok last row (line {len(frame) + 1}) "
                             f"with empty test metrics that other rows of its protocol have; the file may be "
                             f"truncated. {fix}")
    if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        raise BenchError(f"the earlier per-cell table {path} does not end with a line break, so its last row "
                         f"may be cut short. {fix}")
    if "trials" not in frame.columns:
        frame["trials"] = 0
    return frame


def _cell_keys(frame: pd.DataFrame) -> list[tuple]:
    """Return one hashable key per row. Numbers become floats, and a missing budget or seed becomes -1."""
    columns = []
    for name in CELL_KEY:
        values = frame[name] if name in frame.columns else pd.Series([None] * len(frame), index=frame.index)
        if name in ("budget", "seq_len", "seed"):
            columns.append(pd.to_numeric(values, errors="coerce").fillna(-1).astype(float).tolist())
        else:
            columns.append(values.fillna("").astype(str).tolist())
    return list(zip(*columns))


def cells_frame(records: list[dict], archived: pd.DataFrame | None = None) -> pd.DataFrame:
    """Return the per-cell rows of ``records`` plus the archived rows whose cell has no record.

    A record replaces the archived row of the same cell, so a cell that is run
    again shows its new result. The exception is a failed or capped record of a
    cell whose archived row is ``ok``: the archived result stays, and a warning
    names the cell.
    """
    frame = records_frame(records)
    if archived is None or archived.empty:
        return frame
    archived = archived.reset_index(drop=True)
    archived_keys = _cell_keys(archived)
    archived_ok = {key for key, outcome in zip(archived_keys, archived["outcome"]) if outcome == "ok"}
    record_keys = _cell_keys(frame)
    outcomes = frame["outcome"] if len(frame) else []
    superseded = np.array([outcome != "ok" and key in archived_ok for key, outcome in zip(record_keys, outcomes)],
                          dtype=bool)
    for _, row in frame.loc[superseded].iterrows():
        logger.warning("%s/%s budget %s seed %s: the new record is %s (%s), so the archived ok result is kept",
                       row["dataset"], row["method"], row["budget"], row["seed"], row["outcome"], row["error"])
    have = {key for key, dropped in zip(record_keys, superseded) if not dropped}
    keep = archived.loc[[key not in have for key in archived_keys]]
    if len(keep):
        logger.info("kept %d archived cells without a record (hardware: %s)", len(keep),
                    ", ".join(sorted(keep["hardware"].fillna("unknown").astype(str).unique())))
    # concat warns about empty parts, and a frame of no records has no columns at all.
    parts = [part for part in (frame.loc[~superseded], keep) if len(part)]
    return pd.concat(parts, ignore_index=True) if parts else frame


def _as_frame(records, archived: pd.DataFrame | None) -> pd.DataFrame:
    """Return ``records`` if it is already a cells frame, else :func:`cells_frame` of it."""
    if isinstance(records, pd.DataFrame):
        return records
    return cells_frame(records, archived)


def config_label(method_config: dict | None) -> str:
    """Return the label leaderboards give an untuned record of ``method_config`` (a record config)."""
    return stable_hash(method_config, length=6)


def _config_label(record: dict) -> str:
    """Return a short hash of the method config, and of its tuning study when it came from one.

    A tuned config equal to the default still forms its own row, so its
    tuning trials are never averaged with untuned seeds.
    """
    tuning = record.get("tuning")
    if tuning is None:
        return config_label(record.get("method_config"))
    return stable_hash([record.get("method_config"), tuning.get("study")], length=6)


def _sample_std(values: pd.Series) -> float:
    """Return the sample standard deviation, or NaN with fewer than two values (the spread is unknown)."""
    values = values.dropna()
    return float(np.std(values, ddof=1)) if len(values) > 1 else np.nan


def _aggregate(frame: pd.DataFrame, metrics, variants: pd.Series | None = None) -> pd.DataFrame:
    """Aggregate one group's cells into leaderboard rows.

    ``variants`` counts the configs per method over every group of the
    report, so a config keeps the same label in all of its tables.
    """
    frame = frame.copy()
    frame["budget_key"] = frame["budget"].fillna(-1)
    frame["ok"] = frame["outcome"] == "ok"
    # Metrics and costs of failed or capped cells are never averaged into a row.
    for column in [f"test_{m}" for m in metrics] + ["distill_wall_s", "distill_peak_rss_mib", "storage_bytes"]:
        if column not in frame:
            frame[column] = np.nan
        frame.loc[~frame["ok"], column] = np.nan
    # Records of one method with different configs are variants, never seeds of one row.
    if variants is None:
        variants = frame.groupby("method")["config"].nunique()
    frame["label"] = _labels(frame, variants)
    # Every (label, budget) gets a row, so a cell that only failed still shows up with its count.
    grouped = frame.groupby(["label", "budget_key"], dropna=False)
    table = grouped.agg(
        method=("method", "first"),
        family=("family", "first"),
        budget=("budget", "first"),
        seeds=("ok", "sum"),
        not_ok=("ok", lambda s: int((~s).sum())),
        trials=("trials", "max"),
        **{f"{m}_mean": (f"test_{m}", "mean") for m in metrics},
        **{f"{m}_std": (f"test_{m}", _sample_std) for m in metrics},
        distill_wall_s=("distill_wall_s", "mean"),
        distill_peak_rss_mib=("distill_peak_rss_mib", "max"),
        storage_bytes=("storage_bytes", "mean"),
    ).reset_index()
    table["seeds"] = table["seeds"].astype(int)
    table["not_ok"] = table["not_ok"].astype(int)

    primary = metrics[0]
    # With several configs of a reference method, the variant with the most seeds is the reference.
    by_seeds = table.sort_values("seeds", ascending=False, kind="stable")
    full = by_seeds.loc[by_seeds["method"] == "full", f"{primary}_mean"]
    full_mean = float(full.iloc[0]) if len(full) else np.nan
    table[f"{primary}_vs_full"] = table[f"{primary}_mean"] / full_mean
    random_rows = by_seeds[by_seeds["method"] == "random"].drop_duplicates("budget_key")
    random_by_budget = random_rows.set_index("budget_key")[f"{primary}_mean"]
    table[f"{primary}_vs_random"] = table[f"{primary}_mean"] / table["budget_key"].map(random_by_budget)
    order = {"reference": 0, "coreset": 1, "distill": 2}
    table["_family_order"] = table["family"].map(order).fillna(3)
    table = table.sort_values(["budget_key", "_family_order", "label"]).drop(columns=["_family_order", "budget_key"])
    return table


def leaderboards(records, metrics=DEFAULT_METRICS,
                 archived: pd.DataFrame | None = None) -> list[tuple[dict, pd.DataFrame]]:
    """Aggregate cells into one table per (dataset, fingerprint, protocol, hardware) group.

    ``records`` is a list of run records (joined with ``archived``) or a frame
    that :func:`cells_frame` returned.
    """
    frame = _as_frame(records, archived)
    if frame.empty:
        return []
    out = []
    variants = frame.groupby("method")["config"].nunique()
    keys = ["dataset", "fingerprint", "protocol", "hardware"]
    for values, group in frame.groupby(keys, dropna=False, sort=True):
        out.append((dict(zip(keys, values)), _aggregate(group, metrics, variants)))
    return out


# Copies of one cell whose test metrics differ by more than this are named as differing.
_COPY_TOLERANCE = 1e-9
_COST_COLUMNS = ("distill_wall_s", "distill_peak_rss_mib")


def pooled_leaderboards(records, metrics=DEFAULT_METRICS,
                        archived: pd.DataFrame | None = None) -> list[tuple[dict, pd.DataFrame]]:
    """Rank accuracy across machines: one table per (dataset, fingerprint, protocol) with cells of several.

    Groups whose cells all ran on one machine are left to :func:`leaderboards`.
    A cell with ok copies on several machines counts once (the copy of the
    first machine in name order). ``info`` of each table names the machines,
    the number of such cells and the largest absolute difference of their test
    metrics. Each row's ``machines`` counts the machines of its cells, and
    its cost columns are NaN when that is more than one, because the same
    work takes different times on different machines.
    """
    frame = _as_frame(records, archived)
    if frame.empty:
        return []
    variants = frame.groupby("method")["config"].nunique()
    keys = ["dataset", "fingerprint", "protocol"]
    out = []
    for values, group in frame.groupby(keys, dropna=False, sort=True):
        hardware = group["hardware"].fillna("unknown").astype(str)
        if hardware.nunique() < 2:
            continue
        group = group.assign(hardware=hardware).sort_values("hardware", kind="stable")
        ok = group[group["outcome"] == "ok"]
        cell = pd.Series(_pooled_keys(ok), index=ok.index)
        copies = cell[cell.duplicated(keep=False)]
        diff = 0.0
        # (difference, "method budget seed") of each copied cell whose copies differ.
        differing: list[tuple[float, str]] = []
        columns = [f"test_{m}" for m in metrics if f"test_{m}" in ok]
        for _, index in copies.groupby(copies).groups.items():
            spread = ok.loc[index, columns].astype(float)
            cell_diff = float((spread.max() - spread.min()).max())
            diff = max(diff, cell_diff)
            if cell_diff > _COPY_TOLERANCE:
                differing.append((cell_diff, _cell_name(ok.loc[index[0]])))
        differing.sort(key=lambda item: -item[0])
        shared = int(copies.nunique())
        if differing:
            logger.warning("%s: cells run on several machines differ by up to %.3g in test metrics: %s",
                           values[0], diff, ", ".join(f"{name} ({d:.2g})" for d, name in differing))
        # Failed copies of a cell that finished elsewhere are dropped; the ok copy stands for the cell.
        failed = group[group["outcome"] != "ok"]
        failed = failed[~pd.Series(_pooled_keys(failed), index=failed.index).isin(set(cell))]
        counted = pd.concat([ok.loc[~cell.duplicated(keep="first")], failed])
        table = _aggregate(counted, metrics, variants)
        labels = _labels(group, variants)
        machines = group.assign(label=labels, budget_key=group["budget"].fillna(-1)).groupby(
            ["label", "budget_key"], dropna=False)["hardware"].nunique()
        table["machines"] = [int(machines.get((label, -1 if pd.isna(budget) else budget), 1))
                             for label, budget in zip(table["label"], table["budget"])]
        for column in _COST_COLUMNS:
            table.loc[table["machines"] > 1, column] = np.nan
        info = dict(zip(keys, values))
        info.update(hardware=sorted(hardware.unique()), shared_cells=shared, max_abs_diff=diff,
                    differing=[name for _, name in differing])
        out.append((info, table))
    return out


def _cell_name(row: pd.Series) -> str:
    """Return a cell's short name for messages: method, budget (or "all") and seed."""
    budget = "all" if pd.isna(row.get("budget")) else f"{int(row['budget'])}"
    seed = "" if pd.isna(row.get("seed")) else f" seed {int(row['seed'])}"
    return f"{row['method']} {budget}{seed}"


def _pooled_keys(frame: pd.DataFrame) -> list[tuple]:
    """Return :func:`_cell_keys` without the hardware entry, so copies of a cell on two machines match."""
    drop = CELL_KEY.index("hardware")
    return [key[:drop] + key[drop + 1:] for key in _cell_keys(frame)]


def _labels(frame: pd.DataFrame, variants: pd.Series) -> list[str]:
    """Return each row's leaderboard label: the method, with its config when the method has several."""
    return [m if variants[m] == 1 else f"{m} [{c}]" for m, c in zip(frame["method"], frame["config"])]


def render_pooled_markdown(boards, metrics=DEFAULT_METRICS) -> str:
    """Render :func:`pooled_leaderboards` output as Markdown text."""
    parts = ["# Accuracy across machines\n",
             "Most runs of one seed give the same metrics on different CPUs, so accuracy is ranked over cells "
             "from several machines. Long chains of dependent updates, such as the unrolled inner loops of TD3 "
             "and Farzi, can grow rounding differences between CPUs into different results, so the line under "
             "each heading names the cells whose copies differ. A cell run on several machines counts once, "
             "with the copy of the machine named first. "
             "Costs differ between machines: `leaderboard.md` ranks each machine apart, and here a row "
             "shows costs only when all its cells ran on one machine.\n"]
    headers = _headers(metrics)
    headers.insert(3, "machines")
    for info, table in boards:
        parts.append(f"## {info['dataset']}\n")
        agreement = ("" if not info["shared_cells"] else
                     f" {info['shared_cells']} cells ran on more than one machine; their test "
                     f"{', '.join(metrics)} differ by at most {info['max_abs_diff']:.2g}, and each counts once.")
        if info.get("differing"):
            agreement += f" Cells whose copies differ, largest difference first: {', '.join(info['differing'])}."
        parts.append(f"Dataset fingerprint `{info['fingerprint']}`, protocol `{info['protocol']}`, machines: "
                     f"{'; '.join(info['hardware'])}.{agreement}\n")
        rows = _fmt_table(table, metrics)
        for row, machines in zip(rows, table["machines"]):
            row.insert(3, int(machines))
        parts.append(tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True,
                              colalign=_alignment(metrics) + ["right"]))
        parts.append("")
    return "\n".join(parts) + "\n"


def _fmt_table(table: pd.DataFrame, metrics) -> list[list]:
    rows = []
    primary = metrics[0]
    for _, r in table.iterrows():
        row = [r["label"], "all" if pd.isna(r["budget"]) else int(r["budget"]), int(r["seeds"]), int(r["trials"])]
        for m in metrics:
            row.append(_mean_std(r[f"{m}_mean"], r[f"{m}_std"]))
        row.append("" if pd.isna(r[f"{primary}_vs_full"]) else f"{100 * r[f'{primary}_vs_full']:.1f}%")
        row.append("" if pd.isna(r[f"{primary}_vs_random"]) else f"{r[f'{primary}_vs_random']:.2f}x")
        row.append("" if pd.isna(r["distill_wall_s"]) else f"{r['distill_wall_s']:.1f}")
        row.append("" if pd.isna(r["distill_peak_rss_mib"]) else f"{r['distill_peak_rss_mib']:.0f}")
        row.append("" if pd.isna(r["storage_bytes"]) else f"{int(r['storage_bytes']):,}")
        row.append(int(r["not_ok"]))
        rows.append(row)
    return rows


def _mean_std(mean: float, std: float) -> str:
    """Format ``mean ± std``: the mean alone for one seed, and empty when no seed finished."""
    if pd.isna(mean):
        return ""
    if pd.isna(std):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def _alignment(metrics) -> list[str]:
    """Return column alignments: the method name left, every figure right.

    The cells are preformatted strings, so tabulate cannot infer that they are numbers.
    """
    return ["left"] + ["right"] * (len(_headers(metrics)) - 1)


def _headers(metrics) -> list[str]:
    primary = metrics[0]
    return (
        ["method", "budget", "seeds", "tuning trials"]
        + [f"{m} (mean ± std)" for m in metrics]
        + [f"{primary} vs full", f"{primary} vs random", "distill wall s", "distill peak RSS MiB",
           "stored bytes", "failed/capped"]
    )


def render_markdown(records, metrics=DEFAULT_METRICS, title: str | None = None,
                    archived: pd.DataFrame | None = None) -> str:
    """Render the leaderboard of every group as Markdown text (``records`` as in :func:`leaderboards`)."""
    boards = leaderboards(_as_frame(records, archived), metrics)
    if not boards:
        return "No records yet.\n"
    parts = [f"# {title}\n"] if title else []
    datasets = [info["dataset"] for info, _ in boards]
    for info, table in boards:
        heading = f"## {info['dataset']}"
        if datasets.count(info["dataset"]) > 1:
            heading += " (records differ in protocol, data or hardware; ranked separately)"
        parts.append(heading + "\n")
        parts.append(
            f"Dataset fingerprint `{info['fingerprint']}`, protocol `{info['protocol']}`, "
            f"hardware: {info['hardware']}. Test metrics, mean ± sample std over seeds (the mean alone for one "
            "seed); a row without metrics has only failed or capped cells.\n"
        )
        parts.append(tabulate(_fmt_table(table, metrics), headers=_headers(metrics), tablefmt="pipe",
                              disable_numparse=True, colalign=_alignment(metrics)))
        parts.append("")
    return "\n".join(parts) + "\n"


def write_reports(records, folder: Path, metrics=DEFAULT_METRICS, title: str | None = None,
                  archived: pd.DataFrame | None = None) -> dict:
    """Write leaderboard.md, leaderboard.csv (per-cell rows: cells.csv) and leaderboard.tex.

    Where a dataset has cells from several machines, also write
    ``accuracy-across-hardware.md`` (see :func:`pooled_leaderboards`).

    ``records`` is as in :func:`leaderboards`. ``archived`` is usually
    :func:`read_archived_cells` of ``folder / "cells.csv"``, read before this
    call overwrites it. Each table is written to a temporary file and renamed,
    so a reader never sees a half-written one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = _as_frame(records, archived)
    paths = {"markdown": folder / "leaderboard.md", "csv": folder / "leaderboard.csv",
             "cells": folder / "cells.csv", "latex": folder / "leaderboard.tex"}
    _write_text_atomic(paths["markdown"], render_markdown(frame, metrics, title))
    boards = leaderboards(frame, metrics)
    tables = []
    latex = []
    for info, table in boards:
        tables.append(table.assign(**info))
        latex.append(f"% {info['dataset']} protocol {info['protocol']}")
        latex.append(tabulate(_fmt_table(table, metrics), headers=_headers(metrics), tablefmt="latex_booktabs",
                              disable_numparse=True, colalign=_alignment(metrics)))
    if tables:
        _write_text_atomic(paths["csv"], pd.concat(tables).to_csv(index=False))
        _write_text_atomic(paths["cells"], frame.to_csv(index=False))
    _write_text_atomic(paths["latex"], "\n\n".join(latex) + "\n")
    pooled = pooled_leaderboards(frame, metrics)
    pooled_path = folder / "accuracy-across-hardware.md"
    if pooled:
        _write_text_atomic(pooled_path, render_pooled_markdown(pooled, metrics))
        paths["pooled"] = pooled_path
    elif pooled_path.exists():
        # The cells no longer span several machines, so an earlier pooled table would be stale.
        pooled_path.unlink()
    paths.update(_write_plots(boards, folder, metrics[0]))
    return paths


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 through a temporary file in the same folder and a rename."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


@contextlib.contextmanager
def report_lock(folder: Path, create: bool = True):
    """Hold an exclusive lock on ``folder`` while a report reads its archive and rewrites its tables.

    Two runs of one suite that finish together then write one after the
    other, and the second keeps the first one's cells. The lock file
    ``.report.lock`` stays in ``folder``. With ``create`` the folder is made
    first, so two runs that write a new suite's first tables are serialised
    too; without it a missing folder (nothing to protect) is not locked.
    NOTE: without ``fcntl`` (Windows) this lock does nothing.
    """
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if create and fcntl is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None or not folder.is_dir():
        yield
        return
    with open(folder / ".report.lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_plots(boards, folder: Path, metric: str) -> dict:
    from bench.plots import plot_accuracy_vs_budget, plot_accuracy_vs_cost

    out = {}
    for index, (info, table) in enumerate(boards):
        suffix = info["dataset"]
        if index > 0 and boards[index - 1][0]["dataset"] == info["dataset"]:
            # Groups of one dataset differ in protocol, data or hardware, so the file names all three.
            hardware = re.sub(r"[^a-z0-9]+", "-", str(info["hardware"]).lower()).strip("-")
            suffix = f"{info['dataset']}-{info['protocol']}-{info['fingerprint']}-{hardware}"
        title = f"{info['dataset']} ({info['hardware']})"
        cost = plot_accuracy_vs_cost(table, folder / f"{suffix}-accuracy-vs-cost.png", metric, title)
        budget = plot_accuracy_vs_budget(table, folder / f"{suffix}-accuracy-vs-budget.png", metric, title)
        if cost:
            out[f"{suffix}-cost-plot"] = cost
        if budget:
            out[f"{suffix}-budget-plot"] = budget
    return out
