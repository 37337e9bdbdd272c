"""Suites and cells: expand datasets x methods x budgets x seeds and run each once.

Each cell's key is hashed from the method and its resolved config, the
budget, the seed, the dataset fingerprint and processing config, the
protocol hash, the encoder and expert configs and the harness version. A
cell whose record exists with outcome ``ok`` is skipped on rerun, and a
``capped`` one only under the same caps. A ``failed`` cell runs again.
Records are written atomically, so a run killed mid-cell leaves the finished cells untouched and no partial record.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from bench import __version__
from bench.config import build_config, check_plain_name, check_range, config_dict, record_config, stable_hash
from bench.context import MethodContext, SharedCache, derive_seed
from bench.data import DatasetConfig, load_dataset
from bench.data.recipes import resolve_recipe
from bench.errors import BenchError, CappedError, ConfigError, suggest
from bench.evaluator import Protocol, evaluate_popularity, evaluate_set, train_on_set
from bench.expert import ExpertConfig
from bench.learner import LearnerConfig
from bench.method import Budget
from bench.metrics import metrics_from_ranks
from bench.profiling import CostMeter
from bench.records import environment, read_records, write_json_atomic, RECORD_SCHEMA
from bench.registry import build_method, get_method
from bench.text import EncoderConfig

if TYPE_CHECKING:
    from bench.tune import TunedConfig

logger = logging.getLogger(__name__)

SUITE_DIR = Path(__file__).resolve().parent / "suites"
REFERENCE_POP = "pop"


@dataclass(frozen=True)
class Suite:
    """A grid of cells plus the shared protocol.

    Attributes:
        name: suite name; records go under ``OUT/runs/NAME``.
        datasets: dataset names (recipes or atomic folders).
        methods: registered method names.
        budgets: numbers of sequences per budget.
        seq_len: maximum length of every budgeted sequence (items).
        seeds: seeds; each cell uses one for distillation and its evaluation learner.
        include_pop: score the most-popular reference once per dataset.
        protocol: evaluation protocol shared by all methods.
        encoder: text encoder config.
        expert: expert trajectory schedule.
        data: dataset processing overrides applied to every dataset.
        method_configs: per-method config overrides.
        wall_cap_s: wall-time cap of one distillation, seconds (None: no cap).
        rss_cap_mib: resident-memory cap of one distillation, MiB (None: no cap).
    """

    name: str = "quickstart"
    datasets: tuple[str, ...] = ("ml-100k",)
    methods: tuple[str, ...] = ("full", "random")
    budgets: tuple[int, ...] = (20, 50)
    seq_len: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    include_pop: bool = True
    protocol: Protocol = field(default_factory=Protocol)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    data: Mapping[str, Any] = field(default_factory=dict)
    method_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    wall_cap_s: float | None = None
    rss_cap_mib: float | None = None

    def __post_init__(self) -> None:
        check_plain_name("suite", "name", self.name)
        if not self.datasets:
            raise ConfigError("suite: datasets is empty; name at least one dataset")
        if not self.methods:
            raise ConfigError("suite: methods is empty; name at least one method")
        if not self.seeds:
            raise ConfigError("suite: seeds is empty; give at least one seed")
        for key in ("datasets", "methods", "budgets", "seeds"):
            values = list(getattr(self, key))
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ConfigError(f"suite: {key} repeats {repeated}; give each value once")
        for budget in self.budgets:
            check_range("suite", "budgets", budget, low=1)
        for key, cap in (("wall_s", self.wall_cap_s), ("rss_mib", self.rss_cap_mib)):
            if cap is None:
                continue
            if isinstance(cap, bool) or not isinstance(cap, (int, float)):
                raise ConfigError(f"suite caps: invalid {key}={cap!r}; it must be a number (seconds or MiB)")
            # A cap of 0 is valid: the run is capped at its first check.
            check_range("suite caps", key, cap, low=0)
        check_range("suite", "seq_len", self.seq_len, low=2)
        for name in self.methods:
            get_method(name)
        # Configs may name registered methods outside ``methods`` so that one
        # suite file serves runs that pick methods with --methods.
        for name, values in self.method_configs.items():
            build_config(get_method(name).Config, dict(values), where=f"suite method {name!r}")
        build_config(DatasetConfig, dict(self.data), where="suite data")


_SECTIONS = {"protocol", "learner", "encoder", "expert", "data", "method", "caps"}
_TOP_KEYS = {"name", "datasets", "methods", "budgets", "seq_len", "seeds", "include_pop"}


def suite_from_mapping(mapping: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Suite:
    """Build a Suite from a TOML-like mapping, then dotted ``overrides``.

    Method configs live under ``method.NAME`` (TOML tables ``[method.NAME]``).
    Overrides use dotted keys, e.g. ``{"protocol.max_steps": 100,
    "method.foster.steps": 50, "budgets": [20]}``.

    Raises:
        ConfigError: on unknown keys or invalid values.
    """
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in mapping.items()}
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        target = merged
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        target[parts[-1]] = value

    for key in merged:
        if key not in _TOP_KEYS | _SECTIONS:
            raise ConfigError(
                f"suite: unknown key {key!r}.{suggest(key, _TOP_KEYS | _SECTIONS)} "
                f"Valid keys: {', '.join(sorted(_TOP_KEYS))}, and tables {', '.join(sorted(_SECTIONS))}."
            )
    for key in _SECTIONS & set(merged):
        if not isinstance(merged[key], Mapping):
            raise ConfigError(
                f"suite: {key!r} is a table, got {merged[key]!r}; set its keys as {key}.KEY=VALUE "
                f"(or a [{key}] table in the suite file)"
            )

    learner = build_config(LearnerConfig, merged.get("learner", {}), where="suite learner")
    protocol_values = dict(merged.get("protocol", {}))
    protocol = build_config(Protocol, protocol_values, where="suite protocol")
    protocol = dataclasses.replace(protocol, learner=learner)
    encoder = build_config(EncoderConfig, merged.get("encoder", {}), where="suite encoder")
    expert = build_config(ExpertConfig, merged.get("expert", {}), where="suite expert")
    caps = dict(merged.get("caps", {}))
    unknown_caps = set(caps) - {"wall_s", "rss_mib"}
    if unknown_caps:
        raise ConfigError(f"suite caps: unknown keys {sorted(unknown_caps)}; valid keys: wall_s, rss_mib")

    top = {k: merged[k] for k in _TOP_KEYS if k in merged}
    method_configs = merged.get("method", {})
    if not isinstance(method_configs, dict) or not all(isinstance(v, dict) for v in method_configs.values()):
        raise ConfigError("suite: method configs must be tables [method.NAME] of key = value pairs")
    kwargs = build_config(_SuiteTop, top, where="suite")
    return Suite(
        name=kwargs.name,
        datasets=kwargs.datasets,
        methods=kwargs.methods,
        budgets=kwargs.budgets,
        seq_len=kwargs.seq_len,
        seeds=kwargs.seeds,
        include_pop=kwargs.include_pop,
        protocol=protocol,
        encoder=encoder,
        expert=expert,
        data=dict(merged.get("data", {})),
        method_configs={k: dict(v) for k, v in method_configs.items()},
        wall_cap_s=caps.get("wall_s"),
        rss_cap_mib=caps.get("rss_mib"),
    )


@dataclass(frozen=True)
class _SuiteTop:
    name: str = "quickstart"
    datasets: tuple[str, ...] = ("ml-100k",)
    methods: tuple[str, ...] = ("full", "random")
    budgets: tuple[int, ...] = (20, 50)
    seq_len: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    include_pop: bool = True


def load_suite(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Suite:
    """Load a suite TOML file by path or by name from the built-in suites."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        known = sorted(p.stem for p in SUITE_DIR.glob("*.toml"))
        raise ConfigError(
            f"suite {name_or_path!r} not found.{suggest(name_or_path, known)} "
            f"Built-in suites: {', '.join(known)}; or pass the path of a TOML file."
        )
    try:
        mapping = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"suite file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"suite file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read suite file {path}: {exc.strerror or exc}; pass a TOML file") from exc
    return suite_from_mapping(mapping, overrides)


# Cells --------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (dataset, method, budget, seed) unit of work."""

    dataset: str
    method: str
    budget: Budget | None
    seed: int | None

    def label(self) -> str:
        budget = self.budget.label() if self.budget else "all"
        seed = "-" if self.seed is None else str(self.seed)
        return f"{self.dataset}/{self.method}/{budget}/seed {seed}"


def expand_cells(suite: Suite, dataset: str) -> list[Cell]:
    """List the cells of one dataset in run order: pop, then methods x budgets x seeds."""
    cells = [Cell(dataset, REFERENCE_POP, None, None)] if suite.include_pop else []
    for name in suite.methods:
        method_cls = get_method(name)
        budgets = [Budget(b, suite.seq_len) for b in suite.budgets] if method_cls.uses_budget else [None]
        if method_cls.uses_budget and not suite.budgets:
            raise ConfigError(f"suite: method {name!r} needs budgets; set budgets = [20, 50] or similar")
        for budget in budgets:
            for seed in suite.seeds:
                cells.append(Cell(dataset, name, budget, seed))
    return cells


def cell_key(
    cell: Cell, suite: Suite, fingerprint: str, method_config: dict | None, tuning: dict | None = None
) -> str:
    """Hash of everything that can change the cell's result, plus the tuning study that chose the config.

    ``tuning`` enters the hash only when given, so untuned cells keep the keys
    they had before tuned configs existed. A tuned config that equals the
    default still gets its own record, whose row shows the trials spent.
    """
    method_cls = get_method(cell.method) if cell.method != REFERENCE_POP else None
    method_version = method_cls.version if method_cls else "1"
    # The expert schedule changes only the results of methods that read the expert.
    uses_expert = bool(method_cls and method_cls.needs_expert)
    extra = {} if tuning is None else {"tuning": {"study": tuning["study"], "trials_used": tuning["trials_used"]}}
    return stable_hash(
        {
            **extra,
            "method": cell.method,
            "method_version": method_version,
            "method_config": method_config,
            "budget": dataclasses.asdict(cell.budget) if cell.budget else None,
            "seed": cell.seed,
            "data": fingerprint,
            "data_config": dict(suite.data),
            "protocol": suite.protocol.hash() if cell.method != REFERENCE_POP else list(suite.protocol.ks),
            "encoder": config_dict(suite.encoder),
            "expert": config_dict(suite.expert) if uses_expert else None,
            "bench_version": __version__,
        },
        length=20,
    )


def record_path(out_dir: Path, suite: Suite, cell: Cell, key: str) -> Path:
    budget = cell.budget.label() if cell.budget else "all"
    seed = "na" if cell.seed is None else str(cell.seed)
    return out_dir / "runs" / suite.name / cell.dataset / cell.method / f"{budget}-seed{seed}-{key}.json"


# Running ------------------------------------------------------------------


def make_probe(cache: SharedCache, protocol: Protocol, seed: int):
    """Validation probe for methods: a short training, scored on validation users only."""

    def probe(synthetic, max_steps: int = 300, n_users: int = 2000) -> float:
        data = cache.data
        n_eval = len(data.evaluated_users)
        rng = np.random.default_rng(derive_seed(seed, "probe-users"))
        users = None if n_eval <= n_users else np.sort(rng.choice(n_eval, n_users, replace=False))
        short = dataclasses.replace(protocol, max_steps=max_steps, eval_every=max(1, max_steps // 5))
        # train_on_set reseeds torch's global generator. Forking it keeps the caller's later draws
        # (dropout masks, for one) independent of how often and how long it probes.
        with torch.random.fork_rng(devices=[]):
            result = train_on_set(synthetic, data, cache.text_vectors(), short, seed, progress=False,
                                  valid_users=users, encoder=cache.encoder, cache_dir=cache.cache_dir)
        return result.best_valid[protocol.select_metric]

    return probe


def run_cell(cell: Cell, suite: Suite, cache: SharedCache, method_values: dict | None, progress: bool) -> dict:
    """Run one cell and return its record body (metrics, costs, outcome).

    ``method_values`` must name every config field: the record config leaves
    out fields at their legacy value, which need not be their default.
    """
    meter = CostMeter(device="cpu", wall_cap_s=suite.wall_cap_s, rss_cap_mib=suite.rss_cap_mib)
    body: dict[str, Any] = {"outcome": "ok", "error": None}
    try:
        if cell.method == REFERENCE_POP:
            with meter.phase("evaluate"):
                result = evaluate_popularity(cache.data, suite.protocol)
            body.update(valid=result["valid"], test=result["test"], users=result["users"])
        else:
            method = build_method(cell.method, method_values)
            text = cache.text_vectors()
            if method.needs_expert:
                cache.expert()
            if method.needs_representations:
                cache.sequence_representations()
            context = MethodContext(
                seed=cell.seed, device="cpu", meter=meter, cache=cache,
                probe=make_probe(cache, suite.protocol, cell.seed),
            )
            with meter.phase("distill", capped=True):
                synthetic = method.distill(cache.data.train_view(), cell.budget, context)
            body["synthetic"] = {
                "kind": synthetic.kind,
                "n_sequences": synthetic.n_sequences,
                "seq_len": synthetic.seq_len,
                "storage_bytes": synthetic.storage_bytes,
                "meta": synthetic.meta,
            }
            with meter.phase("evaluate"):
                result = evaluate_set(synthetic, cache.data, text, suite.protocol, cell.seed, progress=progress,
                                      encoder=cache.encoder, cache_dir=cache.cache_dir)
            body.update(
                valid=result["valid"], test=result["test"], users=result["users"],
                best_step=result["best_step"], history=result["history"],
            )
    except CappedError as exc:
        body.update(outcome="capped", error=str(exc))
    except MemoryError as exc:
        body.update(outcome="capped", error=f"out of memory: {exc}")
    except (BenchError, FloatingPointError, ValueError, RuntimeError) as exc:
        body.update(outcome="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    body["costs"] = meter.phases
    return body


def _finished(previous: dict | None, key: str, caps: dict, cell: Cell, path: Path) -> bool:
    """Return True when ``previous``, the record at the cell's path, finishes the cell.

    An ok record does. A capped record does only under the same caps, so
    raising or removing a cap runs the cell again. A capped record written
    before records stored their caps also runs again, because its caps are
    unknown. A record whose stored key differs from its file name's (a copied
    or edited file) never finishes the cell.
    """
    if not previous:
        return False
    if previous.get("key") != key:
        logger.warning("record %s contains key %r, not the cell's %r; the cell runs again", path,
                       previous.get("key"), key)
        return False
    if previous.get("outcome") == "ok":
        return True
    if previous.get("outcome") == "capped":
        if previous.get("caps") == caps:
            return True
        logger.info("%s was capped under caps %s; running it again under %s", cell.label(),
                    previous.get("caps"), caps)
    return False


def _check_writable(folder: Path) -> None:
    """Raise before any cell runs if records cannot be written under ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check", suffix=".tmp"):
            pass
    except OSError as exc:
        raise BenchError(f"cannot write records under {folder} ({exc.strerror or exc}); pass a writable --out "
                         "folder") from exc


def check_datasets(suite: Suite, data_dir: Path | str | None = None) -> None:
    """Resolve every dataset name of ``suite``, so a misspelt name stops the run before any cell.

    Raises:
        UnknownNameError: a name is neither a recipe nor an atomic folder in the data dir.
        ConfigError: a recipe file is malformed.
    """
    for dataset in suite.datasets:
        resolve_recipe(dataset, data_dir)


def run_suite(
    suite: Suite,
    *,
    data_dir: Path | str | None = None,
    data_home: Path | str | None = None,
    out_dir: Path | str = "reports",
    progress: bool = True,
    tuned: Mapping[tuple, TunedConfig] | None = None,
    cell_keys: list[str] | None = None,
) -> list[dict]:
    """Run every missing cell of ``suite`` and return all its records.

    Args:
        tuned: tuned configs from :func:`bench.tune.load_tuned`. A cell whose
            (dataset, method, budget) has one runs with that config instead of
            the suite's, and its record stores the study and trials used.
        cell_keys: if given, receives the record key of every cell of this
            call, run or skipped, so a caller can tell them from records of
            earlier calls in the same folder.

    Returns:
        The records of this suite (existing and new), read back from disk.

    Raises:
        ConfigError: when a tuned config was tuned on other data or under
            another protocol than this suite's.
    """
    out_dir = Path(out_dir)
    tuned = dict(tuned or {})
    applied: set[tuple] = set()
    cache_dir = out_dir / "cache"
    env = environment()
    data_config = build_config(DatasetConfig, dict(suite.data), where="suite data")
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    caps = {"wall_s": suite.wall_cap_s, "rss_mib": suite.rss_cap_mib}
    this_run = [] if cell_keys is None else cell_keys
    check_datasets(suite, data_dir)
    _check_writable(out_dir / "runs" / suite.name)
    for dataset in suite.datasets:
        data = load_dataset(dataset, data_dir=data_dir, data_home=data_home, config=data_config)
        cache = SharedCache(data, suite.encoder, suite.protocol.learner, suite.expert, cache_dir)
        # Reject mismatched tuned configs before any cell of this dataset runs.
        for entry in tuned.values():
            if entry.dataset == dataset:
                entry.check_matches(suite.protocol.hash(), data.fingerprint)
        for cell in expand_cells(suite, dataset):
            method_config = None
            method_values = None
            tuning = None
            if cell.method != REFERENCE_POP:
                method_cls = get_method(cell.method)
                values = suite.method_configs.get(cell.method, {})
                budget_key = (cell.budget.n_sequences, cell.budget.seq_len) if cell.budget else None
                entry = tuned.get((dataset, cell.method, budget_key))
                if entry is not None:
                    values, tuning = entry.config, entry.record()
                    applied.add(entry.key())
                config = build_config(method_cls.Config, values, where=f"method {cell.method!r}")
                method_config = record_config(config)
                method_values = config_dict(config)
            key = cell_key(cell, suite, data.fingerprint, method_config, tuning)
            path = record_path(out_dir, suite, cell, key)
            this_run.append(key)
            if path.exists() and _finished(read_records_file(path), key, caps, cell, path):
                counts["skipped"] += 1
                logger.info("skip %s (finished: %s)", cell.label(), path.name)
                continue
            start = time.perf_counter()
            body = run_cell(cell, suite, cache, method_values, progress)
            record = {
                "schema": RECORD_SCHEMA,
                "key": key,
                "suite": suite.name,
                "dataset": dataset,
                "dataset_fingerprint": data.fingerprint,
                "dataset_stats": data.stats,
                "method": cell.method,
                "family": get_method(cell.method).family if cell.method != REFERENCE_POP else "reference",
                "budget": dataclasses.asdict(cell.budget) if cell.budget else None,
                "seed": cell.seed,
                "method_config": method_config,
                "tuning": tuning,
                "protocol": config_dict(suite.protocol),
                "protocol_hash": suite.protocol.hash(),
                "encoder": config_dict(suite.encoder),
                "expert": config_dict(suite.expert),
                "amortised": dict(cache.amortised),
                "caps": caps,
                "environment": env,
                "cell_wall_s": time.perf_counter() - start,
                # Orders two records of one cell in the report (the later one is ranked).
                "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **body,
            }
            write_json_atomic(path, record)
            counts["ran"] += 1
            if record["outcome"] == "ok":
                logger.info(
                    "%s: test Recall@10 %.4f NDCG@10 %.4f (%.1f s)",
                    cell.label(), record["test"]["recall@10"], record["test"]["ndcg@10"], record["cell_wall_s"],
                )
            else:
                counts["failed"] += 1
                logger.error("%s: %s: %s", cell.label(), record["outcome"], record["error"])
    for key in sorted(set(tuned) - applied, key=str):
        logger.warning("tuned config %s matches no cell of suite %s (dataset, method, budget %s)",
                       tuned[key].path, suite.name, key)
    logger.info("suite %s: %d cells run, %d skipped, %d not ok", suite.name, counts["ran"], counts["skipped"], counts["failed"])
    return read_records(out_dir / "runs" / suite.name)


def prepare_suite(
    suite: Suite, *, data_dir: Path | str | None = None, data_home: Path | str | None = None,
    out_dir: Path | str = "reports",
) -> dict[str, dict]:
    """Build the cached text vectors and expert trajectory of every dataset in ``suite``.

    Returns:
        Per dataset, the amortised costs measured (or read from the cache).
    """
    data_config = build_config(DatasetConfig, dict(suite.data), where="suite data")
    check_datasets(suite, data_dir)
    out = {}
    for dataset in suite.datasets:
        data = load_dataset(dataset, data_dir=data_dir, data_home=data_home, config=data_config)
        cache = SharedCache(data, suite.encoder, suite.protocol.learner, suite.expert, Path(out_dir) / "cache")
        cache.expert()
        out[dataset] = dict(cache.amortised)
    return out


def read_records_file(path: Path) -> dict | None:
    """Read one record; return None if it cannot be read, so the cell runs again."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("record %s is unreadable; the cell will run again", path)
        return None
