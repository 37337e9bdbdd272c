"""Command-line interface: ``python -m bench run | list | prepare | tune | report | profile``.

``run`` with no options runs the built-in quickstart suite (MovieLens-100K:
``full`` with 3 seeds, ``random`` at 20 and 50 sequences with 3 seeds each,
and the popularity reference once) and prints the leaderboard.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from pathlib import Path

from bench.errors import BenchError

logger = logging.getLogger("bench")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")

    return parse


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise BenchError(f"--set {item!r}: expected KEY=VALUE, e.g. --set protocol.max_steps=500")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    return overrides


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with DATASET/DATASET.inter atomic folders and raw files "
                             "(default: $BENCH_DATA_DIR, else the data home)")
    parser.add_argument("--data-home", type=Path, default=None,
                        help="folder where downloaded datasets are cached "
                             "(default: $BENCH_DATA_HOME, else ~/.cache/text-rec-distill-bench)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmark harness for dataset distillation in text-based sequential recommendation: run suites, "
        "prepare shared inputs, tune methods with Optuna, rebuild leaderboards and profile costs."))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-vv adds debug output (INFO is the default level)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); use 1 per process when several "
                             "jobs share the cores, because spinning threads then waste most of the CPU")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a suite and print its leaderboard")
    run.add_argument("--suite", default="quickstart",
                     help="built-in suite name or path of a suite TOML file (default: quickstart)")
    run.add_argument("--datasets", type=_csv(str), help="comma-separated dataset names (replace the suite's)")
    run.add_argument("--methods", type=_csv(str), help="comma-separated method names (replace the suite's)")
    run.add_argument("--budgets", type=_csv(int), help="comma-separated numbers of sequences per budget")
    run.add_argument("--seq-len", type=int, help="maximum items per budgeted sequence")
    run.add_argument("--seeds", type=_csv(int), help="comma-separated seeds, e.g. 0,1,2")
    run.add_argument("--name", help="suite name used for the records folder (default: the suite's)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a suite value by dotted key, e.g. protocol.max_steps=500 or "
                          "method.foster.steps=100 or data.kcore=2; repeatable")
    run.add_argument("--no-pop", action="store_true", help="skip the most-popular reference row")
    run.add_argument("--wall-cap-s", type=float, help="wall-time cap of one distillation, seconds")
    run.add_argument("--rss-cap-mib", type=float, help="resident-memory cap of one distillation, MiB")
    run.add_argument("--tuned", type=Path, action="append", default=[], metavar="PATH",
                     help="summary JSON written by 'tune', or a folder of them (e.g. reports/tune); cells of "
                          "the same dataset, method and budget run with the study's best config, and the "
                          "leaderboard shows its trials; repeatable")
    run.add_argument("--drop-archived", action="store_true",
                     help="write the leaderboard from this output folder's records alone, dropping the rows of "
                          "the earlier cells.csv that have no record (kept by default)")
    run.add_argument("--out", type=Path, default=Path("reports"),
                     help="output folder for records, caches and leaderboards (default: reports)")
    _add_data_options(run)

    listing = sub.add_parser("list", help="print registered methods, then the datasets found")
    _add_data_options(listing)

    prepare = sub.add_parser("prepare", help="encode item texts and build the expert trajectory of a suite's datasets")
    prepare.add_argument("--suite", default="quickstart", help="built-in suite name or path of a suite TOML file")
    prepare.add_argument("--datasets", type=_csv(str), help="comma-separated dataset names (replace the suite's)")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a suite value by dotted key, e.g. expert.epochs=5; repeatable")
    prepare.add_argument("--out", type=Path, default=Path("reports"),
                         help="output folder whose cache/ receives the vectors and checkpoints (default: reports)")
    _add_data_options(prepare)

    tune = sub.add_parser("tune", help="tune one method's config with Optuna on validation NDCG@10")
    tune.add_argument("--suite", default="quickstart", help="suite whose protocol, learner and data settings apply")
    tune.add_argument("--dataset", required=True, help="dataset name")
    tune.add_argument("--method", required=True, help="registered method name")
    tune.add_argument("--budget", type=int, help="number of sequences (omit for methods without a budget)")
    tune.add_argument("--seq-len", type=int, help="maximum items per sequence (default: the suite's)")
    tune.add_argument("--trials", type=int, default=20,
                      help="finished trials (COMPLETE + PRUNED) the study must reach; equal for every method with "
                           "a search space (a method without one runs once)")
    tune.add_argument("--seed", type=int, default=0, help="sampler, distillation and learner seed")
    tune.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/studies/tune.db); "
                                        "use postgresql://... to tune one study from several machines")
    tune.add_argument("--study-name", help="study name (default: SUITE-DATASET-METHOD-BUDGET)")
    tune.add_argument("--workers", type=int, default=1,
                      help="processes you start on this study; more than 1 is recorded as not reproducible")
    tune.add_argument("--trial-wall-cap-s", type=float,
                      help="wall-time cap of one trial's distillation, seconds; a capped trial is PRUNED")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a suite value by dotted key; repeatable")
    tune.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    _add_data_options(tune)

    report = sub.add_parser("report", help="rebuild a suite's leaderboard from its records")
    report.add_argument("--suite", default="quickstart", help="suite name (records folder under OUT/runs)")
    report.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    report.add_argument("--drop-archived", action="store_true",
                        help="build the leaderboard from the records alone, dropping the rows of the earlier "
                             "cells.csv that have no record (kept by default)")

    from bench import profile

    profile.add_arguments(sub.add_parser("profile", help="time distillers side by side across catalogue sizes"))
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.INFO if verbosity < 2 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _cmd_run(args) -> int:
    from bench.report import cells_frame, read_archived_cells, render_markdown, report_lock, write_reports
    from bench.runner import load_suite, run_suite

    overrides = _parse_set(args.set)
    for option, key in (("datasets", "datasets"), ("methods", "methods"), ("budgets", "budgets"),
                        ("seq_len", "seq_len"), ("seeds", "seeds"), ("name", "name")):
        value = getattr(args, option)
        if value is not None:
            overrides[key] = value
    if args.no_pop:
        overrides["include_pop"] = False
    if args.wall_cap_s is not None:
        overrides["caps.wall_s"] = args.wall_cap_s
    if args.rss_cap_mib is not None:
        overrides["caps.rss_mib"] = args.rss_cap_mib
    suite = load_suite(args.suite, overrides)

    start = time.perf_counter()
    tuned = None
    if args.tuned:
        from bench.tune import load_tuned

        tuned = load_tuned(args.tuned)
    folder = args.out / suite.name
    if not args.drop_archived:
        # Read once before the run, so a broken table stops the command before hours of work.
        read_archived_cells(folder / "cells.csv")
    keys: list[str] = []
    records = run_suite(suite, data_dir=args.data_dir, data_home=args.data_home, out_dir=args.out, tuned=tuned,
                        cell_keys=keys)
    elapsed = time.perf_counter() - start
    with report_lock(folder):
        # Read again: another run of the suite may have rewritten the table meanwhile.
        try:
            archived = None if args.drop_archived else read_archived_cells(folder / "cells.csv")
        except BenchError as exc:
            raise BenchError(f"{exc} The run's records are saved under {args.out / 'runs' / suite.name}: after "
                             f"the repair, 'python -m bench report --suite {suite.name}' writes the leaderboard."
                             ) from exc
        frame = cells_frame(records, archived)
        try:
            paths = write_reports(frame, folder, title=f"Leaderboard: suite {suite.name}")
        except OSError as exc:
            raise BenchError(f"cannot write the leaderboard under {folder} ({exc}). The run's records are saved "
                             f"under {args.out / 'runs' / suite.name}: once the folder is writable, "
                             f"'python -m bench report --suite {suite.name}' writes the leaderboard.") from exc
    print(render_markdown(frame))
    print(f"Wrote {', '.join(str(path) for path in paths.values())}.")
    print(f"Suite {suite.name} finished in {elapsed:.1f} s.")
    # The exit status speaks for this command's cells, not for records of earlier runs in the folder.
    this_run = set(keys)
    mine = [r for r in records if r.get("key") in this_run]
    not_ok = [r for r in mine if r.get("outcome") != "ok"]
    if not_ok:
        print(f"{len(not_ok)} of {len(mine)} cells failed or were capped. The failed/capped column counts "
              f"them, and the error field of each record under {args.out / 'runs' / suite.name} says why.")
        return 1
    return 0


def _cmd_prepare(args) -> int:
    from bench.runner import load_suite, prepare_suite

    overrides = _parse_set(args.set)
    if args.datasets is not None:
        overrides["datasets"] = args.datasets
    suite = load_suite(args.suite, overrides)
    start = time.perf_counter()
    for dataset, amortised in prepare_suite(suite, data_dir=args.data_dir, data_home=args.data_home,
                                            out_dir=args.out).items():
        expert = amortised.get("expert", {})
        print(f"{dataset}: text vectors {amortised['encode']['wall_s']:.1f} s, expert trajectory of "
              f"{expert.get('epochs')} epochs (best epoch {expert.get('best_epoch')}) "
              f"built in {expert.get('build_s', 0.0):.1f} s")
    print(f"Prepared in {time.perf_counter() - start:.1f} s.")
    return 0


def _cmd_tune(args) -> int:
    from bench.method import Budget
    from bench.runner import load_suite
    from bench.tune import StudySettings, tune

    suite = load_suite(args.suite, _parse_set(args.set))
    seq_len = suite.seq_len if args.seq_len is None else args.seq_len
    budget = Budget(args.budget, seq_len) if args.budget is not None else None
    label = budget.label() if budget else "all"
    settings = StudySettings(
        storage=args.storage or f"sqlite:///{(args.out / 'studies' / 'tune.db').resolve()}",
        study_name=args.study_name or f"{suite.name}-{args.dataset}-{args.method}-{label}",
        n_trials=args.trials, seed=args.seed, workers=args.workers,
    )
    summary = tune(suite, args.dataset, args.method, budget, settings, data_dir=args.data_dir,
                   data_home=args.data_home, out_dir=args.out, trial_wall_cap_s=args.trial_wall_cap_s)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_profile(args) -> int:
    from bench.profile import run

    return run(args)


def _cmd_list(args) -> int:
    from bench.data import list_datasets
    from bench.data.recipes import resolve_data_dir
    from bench.registry import method_names

    for name in method_names():
        print(name)
    print()
    data_dir = resolve_data_dir(args.data_dir)
    if not data_dir.is_dir():
        logger.warning("data folder %s does not exist, so only the built-in recipes are listed; their files "
                       "are fetched or looked up when a run loads them", data_dir)
    for name in list_datasets(args.data_dir):
        print(name)
    return 0


def _cmd_report(args) -> int:
    from bench.config import check_plain_name
    from bench.records import read_records
    from bench.report import cells_frame, read_archived_cells, render_markdown, report_lock, write_reports

    check_plain_name("report", "--suite", args.suite)
    folder = args.out / args.suite
    # Create the folder (and lock it) only when there is something to report, so a
    # misspelt suite name leaves no empty folder behind.
    has_input = (args.out / "runs" / args.suite).is_dir() or (folder / "cells.csv").is_file()
    with report_lock(folder, create=has_input):
        records = read_records(args.out / "runs" / args.suite)
        archived = None if args.drop_archived else read_archived_cells(folder / "cells.csv")
        if not records and archived is None:
            where = "" if args.drop_archived else f" and no {folder / 'cells.csv'}"
            raise BenchError(f"no records under {args.out / 'runs' / args.suite}{where}: run the suite first")
        frame = cells_frame(records, archived)
        paths = write_reports(frame, folder, title=f"Leaderboard: suite {args.suite}")
    print(render_markdown(frame))
    print(f"Wrote {', '.join(str(path) for path in paths.values())}.")
    return 0


# Resume advice per command: the work an interrupted command keeps, and how to continue it.
_RESUME = {
    "run": "finished cells are kept and a rerun continues from the next cell",
    "prepare": "finished caches are kept and a rerun builds the rest",
    "tune": "finished trials are kept in the study and the same command resumes it; a trial cut short "
            "counts as failed and does not use the trial budget",
    "profile": "run the command again to measure every row",
    "report": "the tables are written atomically, so the earlier ones are intact",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {
        "run": _cmd_run, "list": _cmd_list, "prepare": _cmd_prepare, "tune": _cmd_tune, "report": _cmd_report,
        "profile": _cmd_profile,
    }
    try:
        return handlers[args.command](args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {_RESUME.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
