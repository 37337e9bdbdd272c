"""Processing from raw interactions to a :class:`SplitData`.

This module owns the dataset options (:class:`DatasetConfig`) and the
format-independent intermediate that every reader returns
(:class:`RawDataset`). It also owns the processing steps, which run in this
order: duplicate removal, iterative k-core, optional user sampling, truncation
to the most recent ``max_seq_len`` events, item id remapping and the
chronological leave-one-out split.
"""

from __future__ import annotations

import codecs
import logging
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.data.types import SplitData, fingerprint_content
from bench.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MISSING_TEXT_CHOICES = ("error", "empty")

# Characters that render as nothing. A title made only of these and whitespace
# carries no text for an encoder, so it counts as an item without text.
ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\ufeff"
_DELETE_ZERO_WIDTH = str.maketrans("", "", ZERO_WIDTH_CHARS)

# Leave-one-out needs one training event plus the validation and test targets.
MIN_EVALUATED_LENGTH = 3

# Maximum number of missing item ids that an error message lists.
MAX_LISTED_IDS = 10


@dataclass(frozen=True)
class DatasetConfig:
    """Options for reading and filtering a dataset.

    Attributes:
        kcore: minimum number of interactions per user and per item, applied
            iteratively until both hold; 0 or 1 disables the filter.
        max_seq_len: number of most recent interactions kept per user, after
            the k-core filter.
        sample_users: if set, the number of users drawn uniformly without
            replacement after the k-core filter, with ``sample_seed``.
        sample_seed: seed of ``numpy.random.default_rng`` for the user sample.
        text_field: the item field that contains the text. ``None`` selects the
            format's default: the first ``token_seq`` column of an atomic
            ``.item`` file, ``title`` for Amazon metadata, ``name`` for Yelp.
        encoding: text encoding of the data files. Undecodable bytes raise
            :class:`DataError` and are never replaced.
        missing_text: what happens to items that occur in the interactions but
            have no text row: ``"error"`` raises :class:`DataError`,
            ``"empty"`` gives them the empty text.
    """

    kcore: int = 5
    max_seq_len: int = 50
    sample_users: int | None = None
    sample_seed: int = 0
    text_field: str | None = None
    encoding: str = "utf-8"
    missing_text: str = "error"

    def __post_init__(self) -> None:
        _check_int("kcore", self.kcore, 0, "0 or 1 disables the k-core filter")
        _check_int(
            "max_seq_len",
            self.max_seq_len,
            MIN_EVALUATED_LENGTH,
            "leave-one-out needs a training event, a validation and a test target",
        )
        if self.sample_users is not None:
            _check_int("sample_users", self.sample_users, 1, "None keeps every user")
        _check_int("sample_seed", self.sample_seed, 0, "numpy seeds are non-negative")
        if self.text_field is not None and (
            not isinstance(self.text_field, str) or not self.text_field.strip()
        ):
            raise ConfigError(
                f"DatasetConfig.text_field must be None or a non-empty field name, "
                f"got {self.text_field!r}."
            )
        self._check_encoding()
        if self.missing_text not in MISSING_TEXT_CHOICES:
            raise ConfigError(
                f"DatasetConfig.missing_text must be one of "
                f"{', '.join(repr(c) for c in MISSING_TEXT_CHOICES)}, "
                f"got {self.missing_text!r}."
            )

    def _check_encoding(self) -> None:
        if not isinstance(self.encoding, str):
            raise ConfigError(
                f"DatasetConfig.encoding must be a codec name such as 'utf-8' or "
                f"'latin-1', got {self.encoding!r}."
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"DatasetConfig.encoding {self.encoding!r} is not a known Python codec; "
                "use a name such as 'utf-8' or 'latin-1'."
            ) from None


def _check_int(name: str, value, minimum: int, note: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(
            f"DatasetConfig.{name} must be an integer >= {minimum} ({note}), got {value!r}."
        )


@dataclass(frozen=True)
class RawDataset:
    """Interactions and item texts as read from the source files, before processing.

    Every reader (atomic files, Amazon 2018, Yelp, MovieLens) returns this type,
    so the same filters and split apply to every format.

    Attributes:
        interactions: one row per event in file order, with columns ``user_id``
            and ``item_id`` (str) and ``timestamp`` (float64, Unix seconds).
        item_texts: text per raw item id. Items without an entry have no text
            row in the source.
        text_source: file and field that supply the texts, used in messages.
        source_files: paths of the files read.
    """

    interactions: pd.DataFrame
    item_texts: dict[str, str]
    text_source: str
    source_files: tuple[str, ...]


def has_no_usable_text(text: str) -> bool:
    """Return True when ``text`` is empty after removing whitespace and zero-width characters."""
    return not text.translate(_DELETE_ZERO_WIDTH).strip()


def build_split(name: str, raw: RawDataset, config: DatasetConfig) -> SplitData:
    """Filter the raw interactions and split them chronologically leave-one-out.

    Args:
        name: dataset name stored in the result.
        raw: interactions and item texts from a reader.
        config: filter options. ``config.missing_text`` decides what happens to
            items without a text row.

    Returns:
        The processed dataset. Each user's last event is the test target, the
        one before it the validation target, and the rest the training
        history. Users with fewer than 3 events keep their whole sequence for
        training and have targets 0.

    Raises:
        DataError: items lack text and ``missing_text`` is ``"error"``, no
            interactions remain after filtering, or no user has 3 events.
    """
    frame = raw.interactions
    if len(frame) == 0:
        source = raw.source_files[0] if raw.source_files else "the interaction file"
        raise DataError(
            f"dataset {name!r}: {source} contains no interactions. "
            "Check that the recipe names the dataset's interaction file."
        )
    item_texts = _complete_item_texts(raw, config)

    user_codes, user_names = pd.factorize(frame["user_id"], sort=False)
    item_codes, item_names = pd.factorize(frame["item_id"], sort=False)
    timestamps = frame["timestamp"].to_numpy(dtype=np.float64)
    raw_rows = len(frame)

    unique_rows = ~pd.DataFrame(
        {"user": user_codes, "item": item_codes, "timestamp": timestamps}
    ).duplicated().to_numpy()
    rows = np.flatnonzero(unique_rows)
    rows_after_dedup = len(rows)

    rows = _sort_by_user_then_time(rows, user_codes, timestamps)
    rows = _kcore(rows, user_codes, item_codes, config.kcore)
    rows_after_kcore = len(rows)
    if rows_after_kcore == 0:
        raise DataError(
            f"dataset {name!r}: no interactions remain after the k-core filter "
            f"(kcore={config.kcore}, max_seq_len={config.max_seq_len}, "
            f"{rows_after_dedup} rows before the filter). "
            "Use a lower kcore (--set data.kcore=2 on the command line, or DatasetConfig(kcore=2)), "
            "or 0 to disable the filter."
        )
    rows = _sample_users(rows, user_codes, config.sample_users, config.sample_seed)
    rows = _keep_recent(rows, user_codes, config.max_seq_len)

    # Internal ids follow the first occurrence in the processed, user-then-time
    # ordered interactions. Adding 1 keeps 0 free for padding.
    new_item_codes, kept_items = pd.factorize(item_codes[rows], sort=False)
    internal_ids = (new_item_codes + 1).astype(np.int64)
    item_ids = tuple(map(str, np.asarray(item_names, dtype=object)[kept_items]))
    texts = tuple(item_texts[item_id] for item_id in item_ids)

    row_users = user_codes[rows]
    starts = np.flatnonzero(np.r_[True, row_users[1:] != row_users[:-1]])
    user_ids = tuple(map(str, np.asarray(user_names, dtype=object)[row_users[starts]]))
    train_seqs, valid_targets, test_targets = _leave_one_out(internal_ids, starts)

    n_evaluated = int(np.count_nonzero(test_targets))
    if n_evaluated == 0:
        raise DataError(
            f"dataset {name!r}: no user has {MIN_EVALUATED_LENGTH} or more interactions "
            f"after filtering (kcore={config.kcore}, max_seq_len={config.max_seq_len}, "
            f"sample_users={config.sample_users}), so nothing can be evaluated. "
            "Leave-one-out needs a training event plus a validation and a test target per "
            "user, so use data with longer user histories or a lower kcore."
        )

    fingerprint = fingerprint_content(
        item_ids, texts, user_ids, train_seqs, valid_targets, test_targets
    )
    stats = {
        "raw_rows": raw_rows,
        "rows_after_dedup": rows_after_dedup,
        "rows_after_kcore": rows_after_kcore,
        "users": len(user_ids),
        "items": len(item_ids),
        "interactions": int(len(rows)),
        "evaluated_users": n_evaluated,
        "short_users": len(user_ids) - n_evaluated,
        "items_without_text": sum(has_no_usable_text(text) for text in texts),
        "kcore": config.kcore,
        "max_seq_len": config.max_seq_len,
        "sample_users": config.sample_users,
        "source_files": list(raw.source_files),
    }
    logger.info(
        "dataset %s: %d raw rows, %d after dedup, %d after k-core=%d; "
        "%d users (%d evaluated), %d items (%d without text), %d interactions",
        name, raw_rows, rows_after_dedup, rows_after_kcore, config.kcore,
        stats["users"], n_evaluated, stats["items"], stats["items_without_text"],
        stats["interactions"],
    )
    return SplitData(
        name=name,
        item_ids=item_ids,
        item_texts=texts,
        user_ids=user_ids,
        train_seqs=train_seqs,
        valid_targets=valid_targets,
        test_targets=test_targets,
        fingerprint=fingerprint,
        stats=stats,
    )


def _complete_item_texts(raw: RawDataset, config: DatasetConfig) -> dict[str, str]:
    """Return a text for every interacted item, or raise for items without one."""
    interacted = pd.unique(raw.interactions["item_id"])
    missing = [item for item in interacted if item not in raw.item_texts]
    if not missing:
        return raw.item_texts
    if config.missing_text == "error":
        listed = ", ".join(repr(str(item)) for item in missing[:MAX_LISTED_IDS])
        more = f" and {len(missing) - MAX_LISTED_IDS} more" if len(missing) > MAX_LISTED_IDS else ""
        raise DataError(
            f"{len(missing)} item(s) in the interactions have no text row in "
            f"{raw.text_source}: {listed}{more}. Add their rows, or give them empty text with "
            "--set data.missing_text=empty, missing_text = \"empty\" in the recipe, or "
            'DatasetConfig(missing_text="empty").'
        )
    logger.warning(
        "%d item(s) have no text row in %s and get empty text (missing_text='empty')",
        len(missing), raw.text_source,
    )
    completed = dict(raw.item_texts)
    completed.update((str(item), "") for item in missing)
    return completed


def _sort_by_user_then_time(
    rows: np.ndarray, user_codes: np.ndarray, timestamps: np.ndarray
) -> np.ndarray:
    """Order rows by user (first-seen order), then by timestamp.

    Both sorts are stable, so events with equal timestamps keep their file order.
    """
    by_time = rows[np.argsort(timestamps[rows], kind="stable")]
    return by_time[np.argsort(user_codes[by_time], kind="stable")]


def _kcore(rows: np.ndarray, user_codes: np.ndarray, item_codes: np.ndarray, k: int) -> np.ndarray:
    """Drop users and items with fewer than ``k`` interactions until none is left."""
    if k <= 1:
        return rows
    n_users = int(user_codes.max()) + 1 if len(user_codes) else 0
    n_items = int(item_codes.max()) + 1 if len(item_codes) else 0
    while len(rows):
        users = user_codes[rows]
        items = item_codes[rows]
        user_counts = np.bincount(users, minlength=n_users)
        item_counts = np.bincount(items, minlength=n_items)
        keep = (user_counts[users] >= k) & (item_counts[items] >= k)
        if keep.all():
            break
        rows = rows[keep]
    return rows


def _sample_users(
    rows: np.ndarray, user_codes: np.ndarray, sample_users: int | None, seed: int
) -> np.ndarray:
    """Keep a uniform sample of ``sample_users`` users; keep all when there are fewer."""
    if sample_users is None:
        return rows
    users = pd.unique(user_codes[rows])
    if sample_users >= len(users):
        logger.info(
            "sample_users=%d is not below the %d users left; keeping all of them",
            sample_users, len(users),
        )
        return rows
    rng = np.random.default_rng(seed)
    chosen = users[np.sort(rng.choice(len(users), size=sample_users, replace=False))]
    return rows[np.isin(user_codes[rows], chosen)]


def _keep_recent(rows: np.ndarray, user_codes: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Keep the last ``max_seq_len`` rows of each user; rows are grouped by user."""
    users = user_codes[rows]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, len(rows)])
    ends = np.repeat(starts + lengths, lengths)
    position_from_end = ends - np.arange(len(rows)) - 1
    return rows[position_from_end < max_seq_len]


def _leave_one_out(
    internal_ids: np.ndarray, starts: np.ndarray
) -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray]:
    """Split each user's sequence into training history, validation and test target."""
    internal_ids = internal_ids.copy()
    internal_ids.setflags(write=False)
    bounds = np.r_[starts, len(internal_ids)]
    n_users = len(starts)
    valid_targets = np.zeros(n_users, dtype=np.int64)
    test_targets = np.zeros(n_users, dtype=np.int64)
    train_seqs = []
    for user in range(n_users):
        sequence = internal_ids[bounds[user]:bounds[user + 1]]
        if len(sequence) >= MIN_EVALUATED_LENGTH:
            train_seqs.append(sequence[:-2])
            valid_targets[user] = sequence[-2]
            test_targets[user] = sequence[-1]
        else:
            # As in SASRec's data_partition (util.py), short users train only.
            train_seqs.append(sequence)
    return tuple(train_seqs), valid_targets, test_targets
