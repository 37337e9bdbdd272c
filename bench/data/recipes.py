"""Dataset recipes, dataset name resolution and :func:`load_dataset`.

A recipe is a TOML file ``datasets/NAME.toml`` in the repository. Its keys:

``format``
    ``"atomic"`` (RecBole ``.inter``/``.item``), ``"amazon2018"``, ``"yelp"``
    or ``"ml-100k"``.
``folder``
    Folder under the data dir that contains the files; default NAME. Format
    ``ml-100k`` always uses ``DATA_HOME/ml-100k`` and downloads it when absent.
``inter_file``, ``item_file`` (atomic)
    File names inside the folder; default ``FOLDER.inter`` and ``FOLDER.item``,
    each also found with a ``.gz`` suffix.
``reviews_file``, ``meta_file`` (amazon2018, both required)
    E.g. ``Video_Games.json.gz`` and ``meta_Video_Games.json.gz``.
``reviews_file``, ``business_file`` (yelp)
    Default ``yelp_academic_dataset_review.json`` and
    ``yelp_academic_dataset_business.json``.
``description``
    One line shown to users.
``[config]``
    :class:`DatasetConfig` fields (``kcore``, ``max_seq_len``, ``text_field``,
    ``encoding``, ``missing_text``, ...) that serve as this dataset's defaults.

Precedence of options: DatasetConfig defaults, then the recipe's ``[config]``,
then every field of a caller's DatasetConfig whose value differs from the
DatasetConfig default.

A name without a recipe resolves to ``DATA_DIR/NAME/NAME.inter`` (or
``.inter.gz``) with ``NAME.item``, read as atomic files with no overrides.
The data dir is the ``data_dir`` argument, else ``$BENCH_DATA_DIR``, else the
data home. The data home is the ``data_home`` argument, else
``$BENCH_DATA_HOME``, else ``$XDG_CACHE_HOME/text-rec-distill-bench``, else
``~/.cache/text-rec-distill-bench``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import movielens
from bench.data.atomic import find_atomic_file, read_atomic_dataset
from bench.data.process import DatasetConfig, RawDataset, build_split
from bench.data.raw import YELP_BUSINESS_FILE, YELP_REVIEW_FILE, read_amazon2018, read_yelp
from bench.data.types import SplitData
from bench.errors import ConfigError, DataError, UnknownNameError, suggest, unknown_name

logger = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parents[2] / "datasets"
DATA_HOME_NAME = "text-rec-distill-bench"

# File keys that each format accepts; the default file name, or None if required.
FORMAT_FILES: dict[str, dict[str, str | None]] = {
    "atomic": {"inter_file": "{folder}.inter", "item_file": "{folder}.item"},
    "amazon2018": {"reviews_file": None, "meta_file": None},
    "yelp": {"reviews_file": YELP_REVIEW_FILE, "business_file": YELP_BUSINESS_FILE},
    "ml-100k": {},
}
COMMON_KEYS = ("format", "folder", "description", "config")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DatasetConfig))

# Dataset names are file stems: no path separators, no leading dot.
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Recipe:
    """A parsed dataset recipe.

    Attributes:
        name: dataset name.
        format: one of the keys of :data:`FORMAT_FILES`.
        folder: folder name relative to the data dir (data home for ml-100k).
        files: file key (e.g. ``inter_file``) to the file name set in the recipe.
        config: :class:`DatasetConfig` field overrides.
        description: one-line description.
        path: the TOML file, or None for a folder found without a recipe.
    """

    name: str
    format: str
    folder: str
    files: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, object] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None


def resolve_data_home(data_home: Path | str | None = None) -> Path:
    """Return the data home: the argument, ``$BENCH_DATA_HOME`` or the user cache folder."""
    if data_home is not None:
        return Path(data_home).expanduser()
    if os.environ.get("BENCH_DATA_HOME"):
        return Path(os.environ["BENCH_DATA_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / DATA_HOME_NAME
    return Path.home() / ".cache" / DATA_HOME_NAME


def resolve_data_dir(
    data_dir: Path | str | None = None, data_home: Path | str | None = None
) -> Path:
    """Return the data dir: the argument, ``$BENCH_DATA_DIR`` or the data home."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("BENCH_DATA_DIR"):
        return Path(os.environ["BENCH_DATA_DIR"]).expanduser()
    return resolve_data_home(data_home)


def recipe_names() -> list[str]:
    """Return the names of the recipes in :data:`RECIPE_DIR`, sorted."""
    if not RECIPE_DIR.is_dir():
        return []
    return sorted(path.stem for path in RECIPE_DIR.glob("*.toml") if path.is_file())


def atomic_folder_names(data_dir: Path) -> list[str]:
    """Return the names NAME of the folders ``data_dir/NAME`` with a ``NAME.inter[.gz]``."""
    if not data_dir.is_dir():
        return []
    names = []
    for folder in data_dir.iterdir():
        inter = folder / f"{folder.name}.inter"
        if inter.is_file() or inter.with_name(inter.name + ".gz").is_file():
            names.append(folder.name)
    return sorted(names)


def list_datasets(data_dir: Path | str | None = None) -> list[str]:
    """List the dataset names that :func:`load_dataset` accepts.

    Args:
        data_dir: folder searched for atomic dataset folders; default as in
            :func:`resolve_data_dir`.

    Returns:
        Sorted recipe names and atomic folder names, without repeats.
    """
    return sorted(set(recipe_names()) | set(atomic_folder_names(resolve_data_dir(data_dir))))


def load_recipe(path: Path | str) -> Recipe:
    """Parse and validate a recipe file.

    Args:
        path: a TOML file; its stem is the dataset name.

    Returns:
        The recipe.

    Raises:
        ConfigError: the file is not valid TOML, has an unknown key, a value of
            the wrong type, or a ``[config]`` value that DatasetConfig rejects.
            The message names the file and the key.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}. Fix the syntax.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8.") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}.") from exc

    format_name = table.get("format")
    if not isinstance(format_name, str) or format_name not in FORMAT_FILES:
        raise ConfigError(
            f"recipe {path}: format must be one of "
            f"{', '.join(repr(f) for f in FORMAT_FILES)}, got {format_name!r}."
        )
    allowed = set(COMMON_KEYS) | set(FORMAT_FILES[format_name])
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"recipe {path}: unknown key {key!r} for format {format_name!r}."
                f"{suggest(key, allowed)} Allowed keys: {', '.join(sorted(allowed))}."
            )

    files = {}
    for key in (*FORMAT_FILES[format_name], "folder", "description"):
        if key in table and not (isinstance(table[key], str) and table[key].strip()):
            raise ConfigError(f"recipe {path}: {key} must be a non-empty string, got {table[key]!r}.")
    for key, default in FORMAT_FILES[format_name].items():
        if key in table:
            files[key] = table[key]
        elif default is None:
            raise ConfigError(f"recipe {path}: format {format_name!r} requires the key {key!r}.")
    if format_name == "ml-100k" and table.get("folder", movielens.FOLDER) != movielens.FOLDER:
        raise ConfigError(
            f"recipe {path}: format 'ml-100k' always uses the folder {movielens.FOLDER!r} "
            f"in the data home, got folder = {table['folder']!r}. Remove the key."
        )

    return Recipe(
        name=path.stem,
        format=format_name,
        folder=table.get("folder", path.stem),
        files=files,
        config=_check_config_table(path, table.get("config", {})),
        description=table.get("description", ""),
        path=path,
    )


def _check_config_table(path: Path, config: object) -> dict[str, object]:
    if not isinstance(config, dict):
        raise ConfigError(f"recipe {path}: config must be a table ([config]), got {config!r}.")
    for key in config:
        if key not in CONFIG_FIELDS:
            raise ConfigError(
                f"recipe {path}: unknown [config] key {key!r}.{suggest(key, CONFIG_FIELDS)} "
                f"Allowed keys: {', '.join(CONFIG_FIELDS)}."
            )
    try:
        DatasetConfig(**config)
    except ConfigError as exc:
        raise ConfigError(f"recipe {path} [config]: {exc}") from None
    return dict(config)


def merge_config(recipe: Recipe, config: DatasetConfig | None) -> DatasetConfig:
    """Combine the recipe's ``[config]`` with a caller's DatasetConfig.

    A field of ``config`` overrides the recipe when its value differs from the
    DatasetConfig default.

    NOTE: a caller who passes a field's default value explicitly, e.g.
    ``DatasetConfig(kcore=5)`` for a recipe with ``kcore = 3``, gets the recipe's
    value, because a DatasetConfig does not record which fields were passed.
    """
    values = dict(recipe.config)
    if config is not None:
        defaults = DatasetConfig()
        for name in CONFIG_FIELDS:
            value = getattr(config, name)
            if value != getattr(defaults, name):
                values[name] = value
    return DatasetConfig(**values)


def resolve_recipe(name: str, data_dir: Path | str | None = None) -> Recipe:
    """Find the recipe for ``name``, or an atomic folder of that name in the data dir.

    Raises:
        UnknownNameError: neither exists; the message lists the known names
            with near matches and how to point at another data dir.
    """
    if isinstance(name, str) and _DATASET_NAME.fullmatch(name):
        recipe_path = RECIPE_DIR / f"{name}.toml"
        if recipe_path.is_file():
            return load_recipe(recipe_path)
        if name in atomic_folder_names(resolve_data_dir(data_dir)):
            return Recipe(name=name, format="atomic", folder=name)
    searched = resolve_data_dir(data_dir)
    hint = unknown_name("dataset", str(name), list_datasets(data_dir))
    raise UnknownNameError(
        f"{hint} A dataset is a recipe in {RECIPE_DIR} or a folder NAME/NAME.inter in "
        f"the data dir, which is {searched}. Pass --data-dir (or set BENCH_DATA_DIR) "
        "to use datasets from another folder."
    )


def read_raw(
    recipe: Recipe, data_dir: Path, data_home: Path, config: DatasetConfig
) -> RawDataset:
    """Read the recipe's source files into a :class:`RawDataset`.

    Raises:
        DataError: the dataset folder or a file is missing or malformed.
    """
    if recipe.format == "ml-100k":
        # A copy the user placed in the data dir is read as it is; otherwise
        # the data home's copy is used and downloaded when absent.
        folder = data_dir / movielens.FOLDER
        if not ((folder / movielens.INTER_FILE).is_file() and (folder / movielens.ITEM_FILE).is_file()):
            folder = movielens.ensure_ml100k(data_home)
        return read_atomic_dataset(
            folder / movielens.INTER_FILE, folder / movielens.ITEM_FILE, config
        )

    folder = data_dir / recipe.folder
    if not folder.is_dir():
        where = f"recipe {recipe.path}" if recipe.path else "the dataset"
        raise DataError(
            f"dataset {recipe.name!r}: folder {folder} not found ({where} reads its files "
            f"from DATA_DIR/{recipe.folder}). Pass --data-dir with the folder that "
            f"contains {recipe.folder}/, or set BENCH_DATA_DIR."
        )

    if recipe.format == "atomic":
        inter = _atomic_path(recipe, folder, "inter_file", "inter")
        item = _atomic_path(recipe, folder, "item_file", "item")
        return read_atomic_dataset(inter, item, config)
    if recipe.format == "amazon2018":
        return read_amazon2018(
            folder / recipe.files["reviews_file"], folder / recipe.files["meta_file"], config
        )
    if recipe.format == "yelp":
        return read_yelp(
            folder / recipe.files.get("reviews_file", YELP_REVIEW_FILE),
            folder / recipe.files.get("business_file", YELP_BUSINESS_FILE),
            config,
        )
    raise ConfigError(f"recipe {recipe.path}: unsupported format {recipe.format!r}.")


def _atomic_path(recipe: Recipe, folder: Path, key: str, suffix: str) -> Path:
    if key in recipe.files:
        return folder / recipe.files[key]
    return find_atomic_file(folder, recipe.folder, suffix)


def load_from_recipe(
    recipe: Recipe,
    *,
    data_dir: Path | str | None = None,
    data_home: Path | str | None = None,
    config: DatasetConfig | None = None,
) -> SplitData:
    """Read, filter and split the dataset that ``recipe`` describes.

    Args:
        recipe: from :func:`load_recipe` or :func:`resolve_recipe`.
        data_dir: folder that contains the recipe's folder.
        data_home: folder for downloaded datasets (ml-100k).
        config: options; merged with the recipe as in :func:`merge_config`.

    Returns:
        The processed dataset.

    Raises:
        DataError: a file is missing or malformed, or filtering leaves no
            usable data.
        ConfigError: the merged options are invalid.
    """
    merged = merge_config(recipe, config)
    home = resolve_data_home(data_home)
    raw = read_raw(recipe, resolve_data_dir(data_dir, home), home, merged)
    return build_split(recipe.name, raw, merged)


def load_dataset(
    name: str,
    *,
    data_dir: Path | str | None = None,
    data_home: Path | str | None = None,
    config: DatasetConfig | None = None,
) -> SplitData:
    """Load a dataset by name and return its chronological leave-one-out split.

    Args:
        name: a recipe name (``datasets/NAME.toml``) or the name of a folder
            ``DATA_DIR/NAME`` that contains ``NAME.inter`` and ``NAME.item``.
        data_dir: folder with the dataset folders; default ``$BENCH_DATA_DIR``,
            else the data home.
        data_home: folder for downloaded datasets; default ``$BENCH_DATA_HOME``,
            else ``$XDG_CACHE_HOME/text-rec-distill-bench`` or
            ``~/.cache/text-rec-distill-bench``.
        config: options; fields that differ from the DatasetConfig defaults
            override the recipe's ``[config]``.

    Returns:
        The processed dataset.

    Raises:
        UnknownNameError: no recipe and no folder has this name.
        DataError: a file is missing or malformed, or filtering leaves no
            usable data.
        ConfigError: the recipe is invalid.
    """
    recipe = resolve_recipe(name, data_dir)
    return load_from_recipe(recipe, data_dir=data_dir, data_home=data_home, config=config)
