"""Cost profile: ``python -m bench profile`` times distillers side by side across catalogue sizes.

For each dataset and method the command runs the method's ``distill`` with a
short schedule (``--steps`` outer steps) under :class:`bench.profiling.CostMeter`
and reads the timing the method records in ``synthetic.meta``:

* ``steps``, ``step_wall_s`` (mean wall seconds of one distillation update,
  validation probes excluded) and ``real_batch`` (real sequences per update);
* ``probe_history``: ``{"step", "elapsed_s", "ndcg@10"}`` per validation probe.

From them it reports, per (dataset, method):

* ``epoch_s``: wall time of one distillation epoch, one pass over the real
  training sequences with at least two items:
  ``step_wall_s * n_train_sequences / real_batch``;
* ``best_s``: wall time until the best validation NDCG@10 was reached, from
  the probe history. A short profile run does not probe unless ``--probe``
  is given, so this is NA by default. With ``--records-suite``, the value
  comes from run records instead: the mean over seeds at the same budget of
  their full-length probe histories. Only untuned records of the config the
  profile times (the method's defaults under the ``--suite`` settings) count,
  so control runs with other settings never enter the mean;
* ``distill_s``: wall time of the whole ``distill`` call. For a selection
  method (a coreset, which has no distillation steps) this is its selection
  time, so ``--methods head,herding,kcenter,dealrec,goracs`` profiles how
  selection time grows with the dataset;
* ``peak_rss_mib``: the resident-set high-water mark during ``distill``, and
  ``distill_rss_mib``: its growth over the RSS when ``distill`` started
  (the memory the method itself added on top of data, text vectors and
  expert);
* ratios of ``epoch_s``, ``best_s`` and ``distill_rss_mib`` to FOSTER's on the
  same dataset, when ``foster`` is among the methods.

By default each (dataset, method) runs in a fresh Python process, so memory
the allocator kept from one method cannot hide another's peak; shared inputs
(text vectors, the expert trajectory) are built once per dataset first and
loaded from the cache by every run. Sequence representations live only in
memory, so each run computes them before the meter starts. Learner, encoder, expert and protocol
settings come from one suite (``--suite``, default ``games``), the same for
every dataset, so the catalogue size is the only thing that changes between
rows of one method.

Outputs: a table on stdout, and ``OUT/profile/TABLE.csv`` and
``OUT/profile/TABLE.md`` (``--table``, default ``profile``), so profiles of
several machines can sit side by side. The Markdown note names the CPU, the
torch threads and the load average when the profile started.

``--from-table CSV`` times nothing: it reads a table an earlier profile wrote,
fills ``best_s`` from the records again and rewrites that table and its
Markdown twin. Records finished after the profile then reach the table
without timing the methods again, possibly on a busier machine. The records
must have the table's budget and sequence length (columns of tables written
since those columns exist; older tables need ``--budget``). Rows without a
matching record keep their value.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.config import PLAIN_NAME
from bench.errors import BenchError, CappedError, ConfigError

logger = logging.getLogger(__name__)

REFERENCE = "foster"
DEFAULT_BUDGET = 50
DEFAULT_SEQ_LEN = 20
COLUMNS = [
    "dataset", "n_items", "method", "outcome", "steps", "step_s", "epoch_s", "best_s", "distill_s",
    "peak_rss_mib", "distill_rss_mib", "epoch_vs_foster", "best_vs_foster", "memory_vs_foster",
]
# Last sentence of the note above a profile table.
LEGEND = (
    "epoch_s = step_s x training sequences / real batch; distill_rss_mib = peak RSS during distill minus RSS "
    "at its start; *_vs_foster = value / FOSTER's value.\n"
)


def _table_name(text: str) -> str:
    """Parse ``--table``: a plain file name, so the tables stay under OUT/profile."""
    if not PLAIN_NAME.fullmatch(text) or text.endswith((".csv", ".md")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain table name: use letters, digits, '.', '_' or '-', without a folder "
            "or extension, e.g. profile-xeon")
    return text


def _machine_note(threads: int | None) -> str:
    """Describe the machine the timings come from: CPU, torch threads and load average at the start."""
    from bench.profiling import hardware_info

    info = hardware_info()
    try:
        load = ", load average {:.1f} at the start".format(os.getloadavg()[0])
    except (AttributeError, OSError):
        load = ""
    if threads is None:
        threads = info["torch_threads"]
    return f"Machine: {info.get('cpu')} ({info.get('cpu_count')} cores), {threads} torch threads{load}. "


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``profile`` command's options to ``parser``.

    Torch threads are not an option here: :func:`run` reads ``args.threads``
    when the namespace has it (the CLI's top-level ``--threads``) and applies
    it in every run, isolated ones included.

    Args:
        parser: the (sub)parser of the command.
    """
    parser.add_argument("--methods", type=_names, default=["foster", "td3", "farzi"],
                        help="comma-separated registered method names (default: foster,td3,farzi)")
    parser.add_argument("--datasets", type=_names, default=["steam", "games", "food"],
                        help="comma-separated dataset names (default: steam,games,food)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with DATASET/DATASET.inter atomic folders (default: $BENCH_DATA_DIR, "
                             "else the data home)")
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="output folder: caches under OUT/cache, tables under OUT/profile (default: reports)")
    parser.add_argument("--steps", type=int, default=5,
                        help="distillation steps to time per method; sets the method's 'steps' field (default: 5)")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"synthetic sequences (default: {DEFAULT_BUDGET}; with --from-table, the table's)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"items per synthetic sequence (default: {DEFAULT_SEQ_LEN}; with --from-table, "
                             "the table's)")
    parser.add_argument("--suite", default="games",
                        help="suite name or TOML path whose learner, encoder, expert, protocol, data and "
                             "[method.NAME] settings apply to every dataset (default: games)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    parser.add_argument("--probe", action="store_true",
                        help="pass the validation probe to the methods, as the runner does (default: off, "
                             "so the timed steps contain no probe)")
    parser.add_argument("--records-suite", type=_names, default=None,
                        help="comma-separated record folders under OUT/runs (suite names) that supply the "
                             "time to the best validation NDCG@10 (mean over seeds at --budget)")
    parser.add_argument("--table", type=_table_name, default="profile",
                        help="file name, without extension, of the tables under OUT/profile (default: profile)")
    parser.add_argument("--from-table", type=Path, default=None,
                        help="profile.csv of an earlier profile: time nothing, refill best_s from "
                             "--records-suite and rewrite that table and its .md")
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process instead of a fresh one each (faster; "
                             "peak memory may then be hidden by memory kept from an earlier run)")
    parser.add_argument("--wall-cap-s", type=float, default=None,
                        help="wall-time cap of one distillation, seconds; a run over it is reported as capped")
    parser.add_argument("--rss-cap-mib", type=float, default=None,
                        help="resident-memory cap of one distillation, MiB; a run over it is reported as capped")


@dataclasses.dataclass(frozen=True)
class ProfileSpec:
    """One (dataset, method) run of the profile; plain data so it can cross a process boundary."""

    dataset: str
    method: str
    data_dir: str | None
    out: str
    suite: str
    steps: int
    budget: int
    seq_len: int
    seed: int
    threads: int | None
    probe: bool
    wall_cap_s: float | None
    rss_cap_mib: float | None
    log_level: int = logging.WARNING


def _shared_cache(spec: ProfileSpec):
    """Load the suite, the dataset and a shared cache as the runner would build them."""
    from bench.config import build_config
    from bench.context import SharedCache
    from bench.data import DatasetConfig, load_dataset
    from bench.runner import load_suite

    suite = load_suite(spec.suite)
    data_config = build_config(DatasetConfig, dict(suite.data), where="suite data")
    data = load_dataset(spec.dataset, data_dir=spec.data_dir, config=data_config)
    cache = SharedCache(data, suite.encoder, suite.protocol.learner, suite.expert, Path(spec.out) / "cache")
    return suite, cache


def has_steps(name: str) -> bool:
    """Return whether method ``name`` has a ``steps`` config field that sets its schedule's length."""
    from bench.registry import get_method

    return "steps" in {field.name for field in dataclasses.fields(get_method(name).Config)}


def method_overrides(name: str, suite, steps: int) -> dict[str, Any]:
    """Return the suite's config overrides for ``name`` with ``steps`` set, if the method has that field.

    Args:
        name: registered method name.
        suite: the loaded suite (its ``method_configs`` apply first).
        steps: the short schedule's step count.

    Returns:
        The overrides for :func:`bench.registry.build_method`.
    """
    overrides = dict(suite.method_configs.get(name, {}))
    if has_steps(name):
        overrides["steps"] = steps
    else:
        logger.info("method %s has no 'steps' field; its whole distill call is timed", name)
    return overrides


def profile_cell(spec: ProfileSpec) -> dict[str, Any]:
    """Run one method's ``distill`` under the cost meter and return its raw measurements.

    Args:
        spec: what to run.

    Returns:
        ``outcome`` ("ok", "capped" or "failed"), ``error``, the ``distill``
        phase of the meter, ``rss_start_mib``, ``n_items``,
        ``n_train_sequences`` and the method's ``meta``.
    """
    import torch

    from bench.context import MethodContext
    from bench.method import Budget
    from bench.profiling import CostMeter, current_rss_mib
    from bench.registry import build_method
    from bench.runner import make_probe

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if not logging.getLogger().handlers:
        # A spawned worker starts without handlers; it logs at the parent's level.
        logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    suite, cache = _shared_cache(spec)
    method = build_method(spec.method, method_overrides(spec.method, suite, spec.steps))
    cache.text_vectors()
    if method.needs_expert:
        cache.expert()
    if method.needs_representations:
        cache.sequence_representations()
    meter = CostMeter(device="cpu", wall_cap_s=spec.wall_cap_s, rss_cap_mib=spec.rss_cap_mib)
    probe = make_probe(cache, suite.protocol, spec.seed) if spec.probe else None
    context = MethodContext(seed=spec.seed, device="cpu", meter=meter, cache=cache, probe=probe)
    budget = Budget(spec.budget, spec.seq_len) if method.uses_budget else None

    result: dict[str, Any] = {"outcome": "ok", "error": None, "meta": {}}
    rss_start = current_rss_mib()
    try:
        with meter.phase("distill", capped=True):
            synthetic = method.distill(cache.data.train_view(), budget, context)
        result["meta"] = synthetic.meta
    except CappedError as exc:
        result.update(outcome="capped", error=str(exc))
    except MemoryError as exc:
        result.update(outcome="capped", error=f"out of memory: {exc}")
    except (BenchError, FloatingPointError, ValueError, RuntimeError) as exc:
        logger.error("profile %s/%s failed: %s: %s", spec.dataset, spec.method, type(exc).__name__, exc)
        result.update(outcome="failed", error=f"{type(exc).__name__}: {exc}")
    result.update(
        distill=meter.phases.get("distill", {}),
        rss_start_mib=rss_start,
        n_items=cache.data.n_items,
        n_train_sequences=int(sum(len(s) >= 2 for s in cache.data.train_seqs)),
    )
    return result


def _run_isolated(spec: ProfileSpec) -> dict[str, Any]:
    """Run :func:`profile_cell` in a fresh spawned process, so nothing is inherited.

    A worker that dies (for example killed by the kernel for memory) gives a
    ``failed`` result instead of a hang.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(profile_cell, spec).result()
        except BrokenProcessPool as exc:
            logger.error("profile %s/%s: the worker process died: %s", spec.dataset, spec.method, exc)
            return {"outcome": "failed", "error": f"worker process died: {exc}", "meta": {}, "distill": {},
                    "rss_start_mib": math.nan, "n_items": None, "n_train_sequences": 0}


def summarise(spec: ProfileSpec, raw: dict[str, Any]) -> dict[str, Any]:
    """Turn one run's raw measurements into a profile row (ratios are added later).

    Args:
        spec: the run.
        raw: what :func:`profile_cell` returned.

    Returns:
        A row with the keys of :data:`COLUMNS` except the ratios.
    """
    meta = raw.get("meta") or {}
    distill = raw.get("distill") or {}
    step_s = meta.get("step_wall_s")
    real_batch = meta.get("real_batch")
    epoch_s = None
    if step_s is not None and real_batch:
        epoch_s = step_s * raw["n_train_sequences"] / real_batch
    history = meta.get("probe_history") or []
    best_s = max(history, key=lambda entry: entry["ndcg@10"])["elapsed_s"] if history else None
    peak = distill.get("peak_rss_mib")
    return {
        "dataset": spec.dataset,
        "n_items": raw.get("n_items"),
        "method": spec.method,
        "outcome": raw["outcome"],
        "error": raw.get("error"),
        "steps": meta.get("steps"),
        "step_s": step_s,
        "epoch_s": epoch_s,
        "best_s": best_s,
        "peak_rss_mib": peak,
        "distill_rss_mib": None if peak is None else max(0.0, peak - raw["rss_start_mib"]),
        "distill_s": distill.get("wall_s"),
        # Kept in the CSV so that --from-table can read records of the same budget.
        "budget": spec.budget,
        "seq_len": spec.seq_len,
    }


def profiled_configs(suite_name: str) -> dict[str, dict]:
    """Return ``{method: record config}`` of the configs the profile times under suite ``suite_name``."""
    from bench.config import build_config, record_config
    from bench.registry import get_method, method_names
    from bench.runner import load_suite

    suite = load_suite(suite_name)
    configs = {}
    for name in method_names():
        values = suite.method_configs.get(name, {})
        configs[name] = record_config(build_config(get_method(name).Config, values, where=f"method {name!r}"))
    return configs


def profiled_labels(suite_name: str) -> dict[str, str]:
    """Return ``{method: config label}`` of :func:`profiled_configs`, the labels leaderboards show."""
    from bench.report import config_label

    return {name: config_label(config) for name, config in profiled_configs(suite_name).items()}


def best_times_from_records(
    out: Path, suite_names: list[str], budget: int, labels: dict[str, str] | None = None,
    seq_len: int | None = None,
) -> dict[tuple[str, str], float]:
    """Mean wall time to the best validation NDCG@10 per (dataset, method) from run records.

    Args:
        out: the output folder (records under ``OUT/runs/SUITE``).
        suite_names: the record folders to read.
        budget: only records of this number of sequences count.
        seq_len: when given, only records of this sequence length count.
        labels: ``{method: config label}``. When given, only untuned records
            whose config has that label count (see :func:`profiled_labels`).

    Returns:
        ``{(dataset, method): seconds}`` over records with a probe history.
    """
    from bench.records import read_records
    from bench.report import config_label

    times: dict[tuple[str, str], list[float]] = {}
    records = [record for name in suite_names for record in read_records(out / "runs" / name)]
    for record in records:
        cell_budget = record.get("budget") or {}
        if record.get("outcome") != "ok" or cell_budget.get("n_sequences") != budget:
            continue
        if seq_len is not None and cell_budget.get("seq_len") != seq_len:
            continue
        if labels is not None and (
            record.get("tuning") is not None
            or config_label(record.get("method_config")) != labels.get(record.get("method"))
        ):
            continue
        history = ((record.get("synthetic") or {}).get("meta") or {}).get("probe_history") or []
        if history:
            best = max(history, key=lambda entry: entry["ndcg@10"])
            times.setdefault((record["dataset"], record["method"]), []).append(best["elapsed_s"])
    return {key: float(np.mean(values)) for key, values in times.items()}


def add_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Add each row's ratio to the FOSTER row of the same dataset (NA without one)."""
    frame = frame.copy()
    for column, source in (("epoch_vs_foster", "epoch_s"), ("best_vs_foster", "best_s"),
                           ("memory_vs_foster", "distill_rss_mib")):
        ratios = []
        for _, row in frame.iterrows():
            reference = frame[(frame["dataset"] == row["dataset"]) & (frame["method"] == REFERENCE)]
            base = reference[source].iloc[0] if len(reference) else None
            value = row[source]
            usable = base is not None and value is not None and not pd.isna(base) and not pd.isna(value)
            ratios.append(value / base if usable and base > 0 else None)
        frame[column] = ratios
    return frame


def render(frame: pd.DataFrame) -> str:
    """Render the profile table as GitHub Markdown (NA for missing values)."""
    # None, not the string "NA", marks a gap, so tabulate still formats the column's numbers.
    cells = frame[COLUMNS].astype(object).where(frame[COLUMNS].notna(), None)
    return tabulate(cells.values.tolist(), headers=COLUMNS, tablefmt="github", floatfmt=".3g", missingval="NA")


def run(args: argparse.Namespace) -> int:
    """Run the cost profile described by ``args`` and write its tables.

    Args:
        args: parsed options from :func:`add_arguments`.

    Returns:
        0 when every run finished ``ok``, 1 when some were capped or failed.

    Raises:
        ConfigError: on a non-positive ``--steps``, ``--budget`` or ``--seq-len``.
        UnknownNameError: on an unknown method or suite name.
    """
    from bench.registry import get_method

    for option in ("steps", "budget", "seq_len"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.records_suite:
        check_record_folders(args.out, args.records_suite)
    if args.from_table is not None:
        return rebuild(args)
    budget = DEFAULT_BUDGET if args.budget is None else args.budget
    seq_len = DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len
    needs_expert = any(get_method(name).needs_expert for name in args.methods)
    # Read before any work, so the load average is that of the other jobs, not of this profile.
    machine = _machine_note(getattr(args, "threads", None))
    if REFERENCE not in args.methods:
        logger.warning("%s is not among the methods; the ratio columns will be NA", REFERENCE)

    # Each row names the config it timed, so a later --from-table matches records of that config only.
    labels = profiled_labels(args.suite)
    rows = []
    for dataset in args.datasets:
        spec_base = ProfileSpec(
            dataset=dataset, method="", data_dir=None if args.data_dir is None else str(args.data_dir),
            out=str(args.out), suite=str(args.suite), steps=args.steps, budget=budget,
            seq_len=seq_len, seed=args.seed, threads=getattr(args, "threads", None), probe=args.probe,
            wall_cap_s=args.wall_cap_s, rss_cap_mib=args.rss_cap_mib,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        # Shared inputs first, so every timed run only loads them from the cache.
        started = time.perf_counter()
        _, cache = _shared_cache(spec_base)
        cache.text_vectors()
        if needs_expert:
            cache.expert()
        logger.info("profile %s: shared inputs ready in %.1f s (amortised, not profiled)", dataset,
                    time.perf_counter() - started)
        del cache

        for name in args.methods:
            spec = dataclasses.replace(spec_base, method=name)
            if has_steps(name):
                logger.info("profile %s/%s: %d steps", dataset, name, args.steps)
            else:
                logger.info("profile %s/%s: one distill call (the method has no steps)", dataset, name)
            raw = profile_cell(spec) if args.in_process else _run_isolated(spec)
            row = summarise(spec, raw)
            row["config"] = labels.get(name)
            logger.info("profile %s/%s: %s, %s s/step, peak RSS %s MiB", dataset, name, row["outcome"],
                        _format(row["step_s"]), _format(row["peak_rss_mib"]))
            rows.append(row)

    frame = pd.DataFrame(rows)
    if args.records_suite:
        frame, _ = fill_best_times(frame, args, budget, seq_len)
    frame = add_ratios(frame)
    note = (
        f"Cost profile: {args.steps} distillation steps per method, budget {budget}x{seq_len}, "
        f"suite {args.suite} settings, seed {args.seed}. " + machine
    )
    write_tables(frame, args.out / "profile" / f"{args.table}.csv",
                 note + _records_note(args, budget, seq_len) + LEGEND)
    return 0 if (frame["outcome"] == "ok").all() else 1


# The sentence of a table's Markdown note that names the records behind best_s.
_BEST_NOTE = re.compile(r"best_s: mean over .*? with the profiled config(?: \(column config\))?"
                        r"(?:, by row: [^.]*)?\. ?")


def _records_note(args: argparse.Namespace, budget: int, seq_len: int) -> str:
    if not args.records_suite:
        return ""
    return (f"best_s: mean over the untuned {budget}x{seq_len} records of suite(s) "
            f"{', '.join(args.records_suite)} with the profiled config (column config). ")


def check_record_folders(out: Path, suite_names: list[str]) -> None:
    """Raise ConfigError, before anything is timed, when a named record folder does not exist."""
    runs = out / "runs"
    for name in suite_names:
        if not (runs / name).is_dir():
            present = sorted(path.name for path in runs.iterdir() if path.is_dir()) if runs.is_dir() else []
            raise ConfigError(
                f"--records-suite {name}: no record folder {runs / name}; "
                f"folders there: {', '.join(present) or 'none'} (or set --out to the folder with runs/)"
            )


def table_labels(frame: pd.DataFrame, suite_name: str) -> dict[str, str]:
    """Return ``{method: config label}`` of the configs a profile table timed.

    A table's ``config`` column names them. Tables written before that column
    existed get the labels of today's profiled configs, which differ where a
    default changed after the table was timed.

    Raises:
        ConfigError: if the table gives one method two labels.
    """
    labels = profiled_labels(suite_name)
    if "config" not in frame.columns:
        logger.warning("the profile table has no config column, so best_s comes from records of today's "
                       "profiled configs (%s)", ", ".join(f"{m} {labels[m]}" for m in sorted(set(frame["method"]))
                                                          if m in labels))
        return labels
    for method, group in frame.groupby("method"):
        named = sorted({str(label) for label in group["config"].dropna()})
        if len(named) > 1:
            raise ConfigError(f"the profile table gives {method} several config labels {named}: "
                              "profile one config per method and table")
        if named:
            labels[method] = named[0]
    return labels


def fill_best_times(
    frame: pd.DataFrame, args: argparse.Namespace, budget: int, seq_len: int
) -> tuple[pd.DataFrame, list[str]]:
    """Return ``frame`` with ``best_s`` taken from the records of ``args.records_suite`` where they have it.

    Rows that no record matches keep their value, and a warning names them.
    The second value lists the ``dataset/method`` rows that got a new ``best_s``.
    """
    best = best_times_from_records(args.out, args.records_suite, budget, table_labels(frame, args.suite), seq_len)
    frame = frame.copy()
    keys = list(zip(frame["dataset"], frame["method"]))
    unmatched = [f"{d}/{m}" for d, m in keys if (d, m) not in best]
    if unmatched:
        logger.warning("no finished %dx%d records with the profiled config for %s; their best_s is unchanged",
                       budget, seq_len, ", ".join(unmatched))
    frame["best_s"] = [best.get(key, value) for key, value in zip(keys, frame["best_s"])]
    return frame, [f"{d}/{m}" for d, m in keys if (d, m) in best]


def write_tables(frame: pd.DataFrame, csv_path: Path, note: str) -> None:
    """Write ``frame`` to ``csv_path`` and its Markdown table beside it, and print the table."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table = render(frame)
    frame.to_csv(csv_path, index=False)
    markdown = csv_path.with_suffix(".md")
    markdown.write_text(f"# Cost profile\n\n{note}\n{table}\n", encoding="utf-8")
    print(table)
    print(f"Wrote {markdown} and {csv_path}.")


def rebuild(args: argparse.Namespace) -> int:
    """Refill ``best_s`` of an earlier profile table from run records and rewrite it; time nothing.

    Raises:
        ConfigError: without ``--records-suite``, or when the table is missing or lacks profile columns.
    """
    path = args.from_table
    if not args.records_suite:
        raise ConfigError("--from-table needs --records-suite: name the record folders that supply best_s")
    frame = _read_table(path)
    budget = _table_value(frame, "budget", args.budget, None, path)
    seq_len = _table_value(frame, "seq_len", args.seq_len, DEFAULT_SEQ_LEN, path)
    frame, refilled = fill_best_times(frame, args, budget, seq_len)
    frame = add_ratios(frame)
    # The table's own Markdown twin states how it was measured; keep that paragraph without its old best_s note.
    markdown = path.with_suffix(".md")
    paragraphs = markdown.read_text(encoding="utf-8").split("\n\n") if markdown.is_file() else []
    measured = ""
    earlier = ""
    if len(paragraphs) > 2 and paragraphs[0] == "# Cost profile":
        measured = _BEST_NOTE.sub("", paragraphs[1].strip()) + "\n\n"
        found = _BEST_NOTE.search(" ".join(paragraphs[1:3]))
        earlier = found.group(0) if found else ""
    keys = [f"{d}/{m}" for d, m in zip(frame["dataset"], frame["method"])]
    # Each row's records suite(s): the new ones where refilled, else the earlier note's.
    sources = _best_sources(earlier, [k for k, value in zip(keys, frame["best_s"]) if pd.notna(value)])
    sources.update({key: ", ".join(args.records_suite) for key in refilled})
    rebuilt = f"Rebuilt from {path.name}: the timing and memory columns are as measured then. "
    if len(set(sources.values())) > 1:
        by_suite: dict[str, list[str]] = {}
        for key in keys:
            if key in sources:
                by_suite.setdefault(sources[key], []).append(key)
        rows = "; ".join(f"suite(s) {suite} for {', '.join(names)}" for suite, names in by_suite.items())
        rebuilt += (f"best_s: mean over the untuned {budget}x{seq_len} records with the profiled config "
                    f"(column config), by row: {rows}.")
    else:
        rebuilt += _records_note(args, budget, seq_len)
    write_tables(frame, path, f"{measured}{rebuilt.rstrip()}\n")
    return 0 if (frame["outcome"] == "ok").all() else 1


def _best_sources(note: str, rows: list[str]) -> dict[str, str]:
    """Map each ``dataset/method`` row with a best_s to the records suite(s) an earlier note names for it."""
    by_row = re.search(r"by row: ([^.]*)\.", note)
    if by_row:
        sources = {}
        for part in by_row.group(1).split("; "):
            suite, _, names = part.removeprefix("suite(s) ").partition(" for ")
            sources.update({name: suite for name in names.split(", ") if name in rows})
        return sources
    whole = re.search(r"records of suite\(s\) (.*?) with the profiled config", note)
    return {row: whole.group(1) for row in rows} if whole else {}


def _read_table(path: Path) -> pd.DataFrame:
    """Read a profile CSV, raising ConfigError when it is missing, unreadable or lacks profile columns."""
    if not path.is_file():
        raise ConfigError(f"--from-table {path}: no such file; give the profile.csv an earlier profile wrote")
    try:
        # Config labels are hashes, so one made only of digits must stay text.
        frame = pd.read_csv(path, dtype={"config": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"--from-table {path}: cannot read it as CSV ({exc}); give a profile.csv") from exc
    # Tables written before the column was renamed call the selection time distill_wall_s.
    frame = frame.rename(columns={"distill_wall_s": "distill_s"})
    if "distill_s" not in frame.columns:
        frame["distill_s"] = np.nan
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ConfigError(f"--from-table {path}: not a profile table, it lacks the columns {', '.join(missing)}")
    return frame


def _table_value(
    frame: pd.DataFrame, column: str, option_value: int | None, default: int | None, path: Path
) -> int:
    """Return the table's ``column`` value, checked against the option ``option_value``.

    Tables written before the column existed use ``option_value``, else ``default``.
    """
    option = f"--{column.replace('_', '-')}"
    if column in frame.columns:
        values = sorted({int(v) for v in frame[column].dropna()})
        if len(values) > 1:
            raise ConfigError(
                f"the table {path} mixes {column} values {values}; profile one {column} per table"
            )
        if len(values) == 1:
            if option_value is not None and option_value != values[0]:
                raise ConfigError(
                    f"{option} {option_value} does not match the table {path}, timed at {column} {values[0]}; "
                    f"drop {option} or profile again at {option_value}"
                )
            return values[0]
    if option_value is not None:
        return option_value
    if default is None:
        raise ConfigError(f"the table {path} does not record its {column}; pass {option} as stated in its .md note")
    return default


def _format(value) -> str:
    return "NA" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"
