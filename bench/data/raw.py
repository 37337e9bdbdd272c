"""Readers for the raw release formats of Amazon Reviews 2018 and the Yelp Open Dataset.

Both readers return a :class:`RawDataset`, the same intermediate as the atomic
reader, so the filters and the split in :mod:`bench.data.process` apply
unchanged. Files are JSON lines, optionally gzip-compressed, and are always
decoded with the configured encoding (UTF-8 by default), never with the
locale's.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from bench.data.atomic import decode_error, reject_gzip_bytes
from bench.data.process import DatasetConfig, RawDataset
from bench.errors import DataError

logger = logging.getLogger(__name__)

AMAZON_REVIEW_KEYS = ("reviewerID", "asin", "unixReviewTime")
AMAZON_TEXT_FIELD = "title"

YELP_REVIEW_FILE = "yelp_academic_dataset_review.json"
YELP_BUSINESS_FILE = "yelp_academic_dataset_business.json"
YELP_REVIEW_KEYS = ("user_id", "business_id", "date")
YELP_TEXT_FIELD = "name"
YELP_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Separator between the business fields named in text_field, e.g. "name,categories".
YELP_TEXT_JOINER = ", "


def iter_json_lines(
    path: Path, encoding: str, python_literals: bool = False
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for each non-blank line of a JSON-lines file.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.
        encoding: text encoding. Undecodable bytes raise, never get replaced.
        python_literals: when a line is not valid JSON, also accept it as a
            Python dict literal (single quotes), a form that Amazon metadata
            dumps may use.

    Raises:
        DataError: the file is missing or unreadable, or a line is not
            decodable, not a JSON object, or (with ``python_literals``) not a
            dict literal either. The message names the file and line.
    """
    if not path.is_file():
        raise DataError(f"missing file {path}. Check the recipe's file names and --data-dir.")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        if opener is open:
            with open(path, "rb") as handle:
                reject_gzip_bytes(path, handle.read(2))
        with opener(path, "rb") as handle:
            for line_number, raw_line in enumerate(handle, start=1):
                record = _parse_line(path, line_number, raw_line, encoding, python_literals)
                if record is not None:
                    yield line_number, record
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read {path}: {exc}. If the file is meant to be gzip-compressed, "
            "download it again; otherwise remove the .gz suffix."
        ) from exc


def _parse_line(
    path: Path, line_number: int, raw_line: bytes, encoding: str, python_literals: bool
) -> dict | None:
    try:
        line = raw_line.decode(encoding)
    except UnicodeDecodeError as exc:
        raise decode_error(path, raw_line, exc, encoding, first_line=line_number) from None
    line = line.strip()
    if line_number == 1:
        line = line.removeprefix("\ufeff")
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError as json_exc:
        # JSONDecodeError, or the ValueError json raises for an integer
        # literal beyond Python's digit limit.
        if not python_literals:
            raise DataError(
                f"{path} line {line_number} is not valid JSON: {json_exc}. "
                "Each line must be one JSON object."
            ) from None
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as literal_exc:
            raise DataError(
                f"{path} line {line_number} is neither JSON ({json_exc}) nor a Python dict "
                f"literal ({type(literal_exc).__name__}: {literal_exc}). Fix or remove the line."
            ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{path} line {line_number} is a JSON {type(record).__name__}, not an object. "
            "Each line must be one record such as {\"asin\": ...}."
        )
    return record


def _require_string(path: Path, line_number: int, record: dict, key: str) -> str:
    if key not in record:
        raise DataError(
            f"{path} line {line_number}: the record lacks the key {key!r}. "
            "Check that the file is the one the recipe names."
        )
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"{path} line {line_number}: {key!r} is {value!r:.60}, not a string. "
            "Ids and dates must be JSON strings; ids stay strings so leading zeros survive."
        )
    if not value.strip():
        # An empty id would merge every such line into one user or item.
        raise DataError(f"{path} line {line_number}: {key!r} is empty. Fix or remove the line.")
    return value


def read_amazon2018(
    reviews_path: Path, meta_path: Path, config: DatasetConfig
) -> RawDataset:
    """Read an Amazon Reviews 2018 per-category review file and its metadata file.

    Args:
        reviews_path: e.g. ``Video_Games.json.gz``; JSON lines with
            ``reviewerID``, ``asin`` and ``unixReviewTime`` (int seconds).
            Other keys (``overall``, ``reviewText``, ...) are ignored.
        meta_path: e.g. ``meta_Video_Games.json.gz``; JSON lines, or Python
            dict literals, with ``asin`` and the text field.
        config: ``encoding`` and ``text_field`` (default ``title``) apply here.

    Returns:
        The reviews as interactions in file order and the title of each
        product that has one. When an asin occurs on several metadata lines,
        the first line with a title wins.

    Raises:
        DataError: a file is missing or a line is malformed; the message names
            the file and line.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    users, items, times = [], [], []
    for line_number, record in iter_json_lines(reviews_path, config.encoding):
        users.append(_require_string(reviews_path, line_number, record, "reviewerID"))
        items.append(_require_string(reviews_path, line_number, record, "asin"))
        times.append(_unix_time(reviews_path, line_number, record.get("unixReviewTime")))

    text_field = config.text_field or AMAZON_TEXT_FIELD
    texts: dict[str, str] = {}
    duplicate_lines = 0
    fields = _FieldCheck(meta_path, (text_field,))
    for line_number, record in iter_json_lines(meta_path, config.encoding, python_literals=True):
        asin = _require_string(meta_path, line_number, record, "asin")
        fields.see(record)
        title = _optional_text(meta_path, line_number, record, text_field)
        if asin in texts:
            duplicate_lines += 1
        elif title is not None:
            texts[asin] = title
    fields.check()
    if duplicate_lines:
        logger.info("%s: %d repeated asin line(s) ignored; the first title wins", meta_path, duplicate_lines)

    return RawDataset(
        interactions=_interaction_frame(users, items, np.asarray(times, dtype=np.float64)),
        item_texts=texts,
        text_source=f"{meta_path} (field {text_field!r})",
        source_files=(str(reviews_path), str(meta_path)),
    )


def _unix_time(path: Path, line_number: int, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(
            f"{path} line {line_number}: unixReviewTime {value!r} is missing or not a number. "
            "It must be Unix seconds, e.g. 1419897600."
        )
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        seconds = float("nan")
    if not np.isfinite(seconds):
        raise DataError(
            f"{path} line {line_number}: unixReviewTime {value!r:.60} is not a finite number. "
            "It must be Unix seconds, e.g. 1419897600."
        )
    return seconds


class _FieldCheck:
    """Track which text fields occur in a metadata file, to catch a misspelt ``text_field``.

    A field that no record carries is a wrong name, not missing text: without
    this check it would surface later as "no text row" for every item, or
    as empty texts under ``missing_text = "empty"``.
    """

    def __init__(self, path: Path, names) -> None:
        self.path = path
        self.missing = list(names)
        self.example: list[str] = []

    def see(self, record: dict) -> None:
        if not self.example:
            self.example = sorted(map(str, record))
        if self.missing:
            self.missing = [name for name in self.missing if name not in record]

    def check(self) -> None:
        if self.missing and self.example:
            names = ", ".join(repr(name) for name in self.missing)
            raise DataError(
                f"{self.path}: no record has the text field {names}. The first record's keys are "
                f"{', '.join(self.example[:20])}. Set text_field (--set data.text_field=NAME) to one of them."
            )


def _optional_text(path: Path, line_number: int, record: dict, key: str) -> str | None:
    """Return the string under ``key``, None when the key is absent or null."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DataError(
        f"{path} line {line_number}: field {key!r} is a {type(value).__name__} "
        f"({value!r:.60}), not a string. Set text_field to a string field."
    )


def read_yelp(
    review_path: Path, business_path: Path, config: DatasetConfig
) -> RawDataset:
    """Read the Yelp Open Dataset review and business files.

    Args:
        review_path: ``yelp_academic_dataset_review.json``; JSON lines with
            ``user_id``, ``business_id`` and ``date`` (``YYYY-MM-DD HH:MM:SS``).
        business_path: ``yelp_academic_dataset_business.json``; JSON lines
            with ``business_id`` and the text fields.
        config: ``encoding`` and ``text_field`` apply here. ``text_field``
            lists business fields separated by commas (default ``name``); e.g.
            ``"name,categories"`` gives "Café Olé, Coffee & Tea".

    Returns:
        The reviews as interactions in file order, with dates read as UTC
        because the files carry no time zone, and the text of each business
        that has at least one of the text fields. When a business_id repeats,
        the first line with text wins, and the log counts the repeats.

    Raises:
        DataError: a file is missing or a line or date is malformed; the
            message names the file and line.
    """
    review_path, business_path = Path(review_path), Path(business_path)
    users, items, dates, lines = [], [], [], []
    for line_number, record in iter_json_lines(review_path, config.encoding):
        users.append(_require_string(review_path, line_number, record, "user_id"))
        items.append(_require_string(review_path, line_number, record, "business_id"))
        dates.append(_require_string(review_path, line_number, record, "date"))
        lines.append(line_number)
    timestamps = _parse_yelp_dates(review_path, dates, lines)

    text_fields = [field.strip() for field in (config.text_field or YELP_TEXT_FIELD).split(",")]
    if not all(text_fields):
        raise DataError(
            f"text_field {config.text_field!r} has an empty entry; list business fields "
            "separated by commas, e.g. \"name,categories\"."
        )
    texts: dict[str, str] = {}
    fields = _FieldCheck(business_path, text_fields)
    duplicate_lines = 0
    for line_number, record in iter_json_lines(business_path, config.encoding):
        business_id = _require_string(business_path, line_number, record, "business_id")
        fields.see(record)
        parts = [_optional_text(business_path, line_number, record, field) for field in text_fields]
        present = [part for part in parts if part is not None]
        if business_id in texts:
            duplicate_lines += 1
        elif present:
            texts[business_id] = YELP_TEXT_JOINER.join(part for part in present if part)
    fields.check()
    if duplicate_lines:
        logger.info("%s: %d repeated business_id line(s) ignored; the first line with text wins", business_path,
                    duplicate_lines)

    return RawDataset(
        interactions=_interaction_frame(users, items, timestamps),
        item_texts=texts,
        text_source=f"{business_path} (fields {', '.join(text_fields)})",
        source_files=(str(review_path), str(business_path)),
    )


def _parse_yelp_dates(path: Path, dates: list[str], lines: list[int]) -> np.ndarray:
    parsed = pd.to_datetime(pd.Series(dates, dtype=object), format=YELP_DATE_FORMAT, errors="coerce", utc=True)
    invalid = parsed.isna().to_numpy()
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise DataError(
            f"{path} line {lines[row]}: date {dates[row]!r} does not match "
            f"{YELP_DATE_FORMAT!r} ({int(invalid.sum())} such line(s)). Fix the date."
        )
    epoch = pd.Timestamp(0, tz="UTC")
    return ((parsed - epoch) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def _interaction_frame(users: list[str], items: list[str], timestamps: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=str),
            "item_id": pd.Series(items, dtype=str),
            "timestamp": timestamps,
        }
    )
