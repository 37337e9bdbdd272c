"""Hyperparameter tuning with Optuna under equal budgets for every method.

One study per (suite, dataset, method, budget). Rules that keep the comparison
fair and the studies resumable:

* every method with a search space gets the same number of finished trials
  (COMPLETE or PRUNED), and a method without one runs its config once; a
  resumed study runs only the missing ones;
* the method's default config, with the suite's values for it, is enqueued
  as the first trial, and again if that trial failed;
* the TPE sampler is seeded from the study name and the seed, and each
  process runs one trial at a time. A single worker therefore proposes the
  same parameters on every run. Several workers are not reproducible, and the
  study's user attributes say so;
* a per-trial wall-time cap is enforced inside the trial: a capped trial is
  PRUNED with the reason kept in its user attributes;
* the objective is validation NDCG@10 only; the test split is never read;
* SQLite storage gets a long busy timeout and a file lock on trial claims so
  several worker processes can share one file. Heartbeats mark trials of
  killed workers FAIL after a grace period, and every start sweeps such stale
  trials first.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bench.config import build_config, check_range, config_dict
from bench.context import MethodContext, SharedCache, derive_seed
from bench.data import DatasetConfig, load_dataset
from bench.errors import CappedError, ConfigError
from bench.evaluator import train_on_set
from bench.method import Budget
from bench.profiling import CostMeter
from bench.records import write_json_atomic
from bench.registry import build_method, get_method
from bench.runner import Suite, make_probe

logger = logging.getLogger(__name__)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SQLITE_BUSY_TIMEOUT_S = 120


@dataclass(frozen=True)
class StudySettings:
    """Storage and budget of one study.

    Attributes:
        storage: Optuna storage URL; ``sqlite:///PATH`` by default, or an RDB
            URL such as ``postgresql://...`` for several machines.
        study_name: unique study name in the storage.
        n_trials: finished trials (COMPLETE + PRUNED) the study must reach.
        seed: sampler seed (combined with the study name).
        heartbeat_s: heartbeat interval of running trials, seconds.
        grace_s: a RUNNING trial without heartbeat for this long is failed.
        workers: number of processes expected on this study (1 = reproducible).
    """

    storage: str
    study_name: str
    n_trials: int = 20
    seed: int = 0
    heartbeat_s: int = 60
    grace_s: int = 180
    workers: int = 1

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ConfigError(f"tune: n_trials={self.n_trials} must be >= 1")
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise ConfigError(
                f"tune: heartbeat_s={self.heartbeat_s} must be >= 1 and grace_s={self.grace_s} larger than it"
            )
        if self.workers < 1:
            raise ConfigError(f"tune: workers={self.workers} must be >= 1 (the processes you start on this study)")
        try:
            make_url(self.storage)
        except ArgumentError:
            raise ConfigError(
                f"tune: storage {self.storage!r} is not a database URL; use sqlite:///PATH/tune.db or "
                "postgresql://USER@HOST/DB"
            ) from None


@contextmanager
def _heartbeat_api():
    """Silence Optuna's ExperimentalWarning for the heartbeat calls made here only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _fail_stale(study: optuna.Study) -> None:
    with _heartbeat_api():
        optuna.storages.fail_stale_trials(study)


class SQLiteFileStorage(optuna.storages.RDBStorage):
    """RDB storage on one SQLite file, with the claim of a queued trial made atomic.

    Optuna claims a WAITING trial (an enqueued config) by reading its state and
    writing RUNNING in one transaction, relying on ``SELECT ... FOR UPDATE``.
    SQLite ignores that clause and its reads take no lock. Two processes can
    therefore both read WAITING and both run the same trial, and the slower one
    fails with "Cannot tell a COMPLETE trial". An exclusive ``flock`` on a file
    beside the database makes the read and the write one step for every process
    that opens the file through this class, which all harness workers do.
    Server databases honour ``FOR UPDATE`` and need no such lock.
    """

    def __init__(self, url: str, lock_path: Path, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.lock_path = lock_path

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState, values=None) -> bool:
        """Set a trial's state and values, holding the claim lock when the new state is RUNNING."""
        if state != optuna.trial.TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        with open(self.lock_path, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                return super().set_trial_state_values(trial_id, state, values)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def make_storage(settings: StudySettings) -> optuna.storages.BaseStorage:
    """Open an RDB storage with heartbeats, adding a busy timeout and a claim lock for a SQLite file."""
    engine_kwargs: dict[str, Any] = {}
    lock_path: Path | None = None
    if settings.storage.startswith("sqlite:"):
        path = settings.storage.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            lock_path = Path(path + ".claim-lock")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    storage_kwargs = dict(
        engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat_s, grace_period=settings.grace_s
    )
    for attempt in range(5):
        try:
            with _heartbeat_api():
                if lock_path is not None:
                    return SQLiteFileStorage(settings.storage, lock_path, **storage_kwargs)
                return optuna.storages.RDBStorage(settings.storage, **storage_kwargs)
        except Exception as exc:  # sqlalchemy raises OperationalError while another worker creates tables
            if "locked" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def finished_trials(study: optuna.Study) -> int:
    """Count the trials that use up the budget: COMPLETE and PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def open_study(settings: StudySettings, default_params: dict[str, Any] | None = None) -> optuna.Study:
    """Create or load the study, sweep stale trials and enqueue the default once."""
    storage = make_storage(settings)
    sampler = optuna.samplers.TPESampler(seed=derive_seed(settings.seed, settings.study_name) % (2**32))
    study = optuna.create_study(
        study_name=settings.study_name, storage=storage, sampler=sampler,
        direction="maximize", load_if_exists=True,
    )
    _fail_stale(study)
    if settings.workers > 1:
        study.set_user_attr("reproducible", False)
        study.set_user_attr("note", "tuning not reproducible (parallel workers)")
    elif "reproducible" not in study.user_attrs:
        study.set_user_attr("reproducible", True)
    if default_params is not None and _needs_default(study):
        study.set_user_attr("default_enqueued", True)
        study.enqueue_trial(default_params, user_attrs={"default": True})
    return study


def _needs_default(study: optuna.Study) -> bool:
    """True until the default config has a trial that is queued, running, finished or raised.

    A default trial whose process was killed or interrupted ends FAIL and is
    queued again, so the study scores the default once. One whose objective
    raised (user attribute ``raised``) would raise again, so it is not.
    """
    for trial in study.get_trials(deepcopy=False):
        if not trial.user_attrs.get("default"):
            continue
        if trial.state != optuna.trial.TrialState.FAIL or trial.user_attrs.get("raised"):
            return False
    return True


class SurplusTrial(Exception):
    """A trial started after the study's budget was already taken by other workers."""


def run_study(
    settings: StudySettings,
    objective: Callable[[optuna.Trial], float],
    default_params: dict[str, Any] | None = None,
) -> optuna.Study:
    """Run trials one at a time until the study has ``n_trials`` finished trials.

    Several processes may call this on one study. Trial numbers are assigned
    atomically by the storage, so a trial whose number comes after
    ``n_trials`` earlier non-failed trials is a surplus: it ends FAIL with
    the user attribute ``surplus`` and never runs the objective. The count of
    COMPLETE and PRUNED trials is therefore exactly ``n_trials``.
    """
    study = open_study(settings, default_params)
    failed = optuna.trial.TrialState.FAIL

    def guarded(trial: optuna.Trial) -> float:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != failed]
        if len(earlier) >= settings.n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} exceeds the budget of {settings.n_trials} trials")
        try:
            return objective(trial)
        except Exception as exc:
            # Marks a failure of the config itself, as opposed to a killed process (see _needs_default).
            trial.set_user_attr("raised", type(exc).__name__)
            raise

    waiting = False
    while finished_trials(study) < settings.n_trials:
        running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if running and finished_trials(study) + running >= settings.n_trials:
            # Other workers hold the remaining trials; wait for them or for their heartbeats to go stale.
            if not waiting:
                logger.info("study %s: waiting for %d running trial(s) of another process; a trial whose "
                            "process was killed is failed after %d s without a heartbeat, then rerun",
                            settings.study_name, running, settings.grace_s)
                waiting = True
            time.sleep(min(1.0, settings.heartbeat_s))
            _fail_stale(study)
            continue
        study.optimize(guarded, n_trials=1, n_jobs=1, catch=(FloatingPointError, SurplusTrial))
    return study


# The harness objective ------------------------------------------------------


def method_objective(
    suite: Suite, cache: SharedCache, method: str, budget: Budget | None, seed: int, trial_wall_cap_s: float | None
) -> Callable[[optuna.Trial], float]:
    """Objective: distill with the trial's config, train the evaluation learner, return validation NDCG@10."""
    method_cls = get_method(method)
    base = dict(suite.method_configs.get(method, {}))

    def objective(trial: optuna.Trial) -> float:
        overrides = {**base, **method_cls.search_space(trial)}
        config = build_config(method_cls.Config, overrides, where=f"method {method!r}")
        trial.set_user_attr("config", config_dict(config))
        meter = CostMeter(wall_cap_s=trial_wall_cap_s, rss_cap_mib=suite.rss_cap_mib)
        # The same validation probe as in 'run', so a trial scores the set the
        # method would select there, not its last step.
        context = MethodContext(seed=seed, device="cpu", meter=meter, cache=cache,
                                probe=make_probe(cache, suite.protocol, seed))
        start = time.perf_counter()
        try:
            with meter.phase("distill", capped=True):
                synthetic = method_cls(config).distill(cache.data.train_view(), budget, context)
        except CappedError as exc:
            trial.set_user_attr("capped", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        result = train_on_set(synthetic, cache.data, cache.text_vectors(), suite.protocol, seed, progress=False,
                              encoder=cache.encoder, cache_dir=cache.cache_dir)
        value = result.best_valid[suite.protocol.select_metric]
        trial.set_user_attr("distill_wall_s", meter.phases["distill"]["wall_s"])
        trial.set_user_attr("trial_wall_s", time.perf_counter() - start)
        logger.info("trial %d of %s: %s=%.4f with %s", trial.number, method, suite.protocol.select_metric, value, overrides)
        return value

    return objective


def default_params(method: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the config the first trial scores, restricted to the parameters the search space suggests.

    Args:
        method: registered method name.
        base: the suite's values for the method (``[method.NAME]`` and
            ``--set method.NAME.KEY=VALUE``). They replace the class defaults.
            The first trial therefore scores the config that 'run' would use.
    """
    method_cls = get_method(method)
    defaults = config_dict(build_config(method_cls.Config, dict(base or {}), where=f"suite method {method!r}"))
    # Ask with the defaults fixed, so a conditional parameter (one the space
    # suggests only for some values of another) follows the default's branch.
    probe_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    probe_study.enqueue_trial(defaults)
    trial = probe_study.ask()
    with warnings.catch_warnings():
        # Optuna warns about fixed values outside a numeric range; the trial still scores them.
        warnings.simplefilter("ignore", UserWarning)
        try:
            names = set(method_cls.search_space(trial))
        except ValueError as exc:
            raise ConfigError(
                f"tune: the suite's config of {method!r} has a value the search space cannot take as its "
                f"first trial ({exc}); use one of the searched choices or drop the value"
            ) from exc
    return {k: v for k, v in defaults.items() if k in names}


def tune(
    suite: Suite,
    dataset: str,
    method: str,
    budget: Budget | None,
    settings: StudySettings,
    *,
    data_dir=None,
    data_home=None,
    out_dir: Path | str = "reports",
    trial_wall_cap_s: float | None = None,
) -> dict:
    """Tune ``method`` on ``dataset`` at ``budget`` and write a summary JSON.

    Returns:
        The summary: best params and value, trials used (COMPLETE + PRUNED),
        failed trials, and whether the run is reproducible.

    Raises:
        ConfigError: on an unknown method or a trial wall cap that is not a
            positive finite number, before the dataset loads.
    """
    get_method(method)
    # Before the data loads: a suite value the search space rejects stops here.
    defaults = default_params(method, suite.method_configs.get(method))
    if trial_wall_cap_s is not None:
        check_range("tune", "trial_wall_cap_s", float(trial_wall_cap_s), low=0, low_open=True)
    data = load_dataset(dataset, data_dir=data_dir, data_home=data_home,
                        config=build_config(DatasetConfig, dict(suite.data), where="suite data"))
    cache = SharedCache(data, suite.encoder, suite.protocol.learner, suite.expert, Path(out_dir) / "cache")
    if get_method(method).needs_expert:
        cache.expert()
    objective = method_objective(suite, cache, method, budget, settings.seed, trial_wall_cap_s)
    if not defaults:
        # Nothing to search: every trial would repeat the default config.
        logger.info("method %s has an empty search space; running its default config once", method)
        settings = dataclasses.replace(settings, n_trials=1)
    study = run_study(settings, objective, defaults or None)

    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary = {
        "study": settings.study_name,
        "storage": settings.storage,
        "dataset": dataset,
        "dataset_fingerprint": data.fingerprint,
        "method": method,
        "budget": dataclasses.asdict(budget) if budget else None,
        "protocol_hash": suite.protocol.hash(),
        "trials_used": finished_trials(study),
        "trials_failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        "best_value": study.best_value if completed else None,
        "best_params": study.best_params if completed else None,
        "best_config": study.best_trial.user_attrs.get("config") if completed else None,
        "reproducible": bool(study.user_attrs.get("reproducible", True)),
        "note": study.user_attrs.get("note"),
    }
    write_json_atomic(Path(out_dir) / "tune" / f"{settings.study_name}.json", summary)
    return summary


# Tuned configs in leaderboard runs -----------------------------------------

_SUMMARY_FIELDS = ("study", "dataset", "dataset_fingerprint", "method", "budget", "protocol_hash", "trials_used",
                   "best_value", "best_config")


@dataclass(frozen=True)
class TunedConfig:
    """The best config of one finished study, read from its ``tune`` summary file.

    Attributes:
        dataset: dataset the study tuned on.
        method: registered method name.
        budget: ``(n_sequences, seq_len)``, or None for a method without a budget.
        config: the best trial's resolved method config.
        trials_used: finished trials (COMPLETE + PRUNED) of the study.
        best_value: the study's best validation NDCG@10.
        study: study name.
        protocol_hash: hash of the protocol the trials were scored under.
        dataset_fingerprint: fingerprint of the processed dataset of the study.
        path: the summary file.
    """

    dataset: str
    method: str
    budget: tuple[int, int] | None
    config: dict[str, Any]
    trials_used: int
    best_value: float
    study: str
    protocol_hash: str
    dataset_fingerprint: str
    path: str

    def key(self) -> tuple[str, str, tuple[int, int] | None]:
        """Return the (dataset, method, budget) this config applies to."""
        return (self.dataset, self.method, self.budget)

    def check_matches(self, protocol_hash: str, dataset_fingerprint: str) -> None:
        """Raise ConfigError unless the study used this protocol and this processed dataset.

        A config tuned under another protocol or on other data would make the
        comparison unfair, so it is rejected rather than applied.
        """
        if dataset_fingerprint != self.dataset_fingerprint:
            raise ConfigError(
                f"tuned config {self.path}: study {self.study!r} ran on {self.dataset} with fingerprint "
                f"{self.dataset_fingerprint[:12]}, but this run's data has fingerprint {dataset_fingerprint[:12]}. "
                "Tune again on the same data and processing settings, or drop this --tuned file."
            )
        if protocol_hash != self.protocol_hash:
            raise ConfigError(
                f"tuned config {self.path}: study {self.study!r} scored trials under protocol {self.protocol_hash}, "
                f"but this suite's protocol is {protocol_hash}. Tune again with this suite's protocol, learner "
                "and seq_len, or drop this --tuned file."
            )

    def record(self) -> dict[str, Any]:
        """Return the tuning provenance stored in a run record."""
        return {"study": self.study, "trials_used": self.trials_used, "best_valid": self.best_value,
                "summary": self.path}


def _read_summary(path: Path) -> TunedConfig:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"tuned config {path}: could not be read ({exc})") from exc
    except ValueError as exc:
        raise ConfigError(f"tuned config {path}: invalid JSON ({exc}). Pass a summary written by "
                          "'python -m bench tune'") from exc
    if not isinstance(summary, dict):
        raise ConfigError(f"tuned config {path}: expected a JSON object written by 'python -m bench tune'")
    missing = [name for name in _SUMMARY_FIELDS if name not in summary]
    if missing:
        raise ConfigError(f"tuned config {path}: missing fields {missing}. Pass a summary written by "
                          "'python -m bench tune'")
    if summary["best_config"] is None:
        raise ConfigError(
            f"tuned config {path}: study {summary['study']!r} has no completed trial, so there is no best config. "
            "Run more trials, or drop this file."
        )
    method_cls = get_method(summary["method"])
    # Resolving the config here rejects fields the method no longer has before any cell runs.
    build_config(method_cls.Config, dict(summary["best_config"]), where=f"tuned config {path}")
    budget = summary["budget"]
    return TunedConfig(
        dataset=summary["dataset"],
        method=summary["method"],
        budget=None if budget is None else (int(budget["n_sequences"]), int(budget["seq_len"])),
        config=dict(summary["best_config"]),
        trials_used=int(summary["trials_used"]),
        best_value=float(summary["best_value"]),
        study=str(summary["study"]),
        protocol_hash=str(summary["protocol_hash"]),
        dataset_fingerprint=str(summary["dataset_fingerprint"]),
        path=str(path),
    )


def load_tuned(paths: list[Path | str]) -> dict[tuple, TunedConfig]:
    """Read ``tune`` summary files into tuned configs keyed by (dataset, method, budget).

    Args:
        paths: summary JSON files, or folders whose ``*.json`` files are all
            summaries (such as ``OUT/tune``).

    Returns:
        ``{(dataset, method, (n_sequences, seq_len) or None): TunedConfig}``.

    Raises:
        ConfigError: on a missing path, an empty folder, a file that is not a
            summary, a study without a completed trial, or two summaries for
            the same (dataset, method, budget).
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise ConfigError(f"--tuned {path}: the folder contains no .json summary files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"--tuned {path}: no such file or folder. Pass a summary written by "
                              "'python -m bench tune' (under OUT/tune/)")
    tuned: dict[tuple, TunedConfig] = {}
    for path in files:
        entry = _read_summary(path)
        if entry.key() in tuned:
            raise ConfigError(
                f"tuned configs {tuned[entry.key()].path} and {path} both tune {entry.method} on {entry.dataset} "
                f"at budget {entry.budget}. Pass only one of them."
            )
        tuned[entry.key()] = entry
    return tuned
