"""Reader for RecBole atomic files (``.inter`` and ``.item``).

An atomic file is tab-separated text whose first line is a typed header: each
field is written ``name:type`` with type ``token``, ``token_seq``, ``float`` or
``float_seq``. Fields are read as strings exactly as written: ids keep leading
zeros, a title ``NA`` stays ``NA`` and an empty field stays ``""``. Quotes have
no special meaning. A file may be gzip-compressed (``NAME.inter.gz``).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.data.process import DatasetConfig, RawDataset
from bench.errors import DataError

logger = logging.getLogger(__name__)

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")

INTER_FIELDS = {"user_id": "token", "item_id": "token", "timestamp": "float"}
ITEM_ID_FIELD = ("item_id", "token")

_NEWLINE = 10
_TAB = 9


@dataclass(frozen=True)
class AtomicTable:
    """Contents of one atomic file.

    Attributes:
        path: the file read.
        fields: ``(name, type)`` per column, in header order.
        frame: one string column per field, named by the field name.
        line_numbers: 1-based line number in the file of each row of ``frame``.
    """

    path: Path
    fields: tuple[tuple[str, str], ...]
    frame: pd.DataFrame
    line_numbers: np.ndarray

    def field_type(self, name: str) -> str | None:
        """Return the declared type of field ``name``, or None if the header lacks it."""
        for field_name, field_type in self.fields:
            if field_name == name:
                return field_type
        return None


def find_atomic_file(folder: Path, stem: str, suffix: str) -> Path:
    """Return ``folder/stem.suffix``, or its ``.gz`` variant if only that exists.

    Raises:
        DataError: neither file exists.
    """
    plain = folder / f"{stem}.{suffix}"
    compressed = folder / f"{stem}.{suffix}.gz"
    if plain.is_file():
        return plain
    if compressed.is_file():
        return compressed
    raise DataError(
        f"missing file {plain} (also looked for {compressed.name}). "
        f"Put the dataset's .{suffix} file there, or pass the folder that contains "
        f"{folder.name}/ as --data-dir."
    )


def read_atomic_dataset(inter_path: Path, item_path: Path, config: DatasetConfig) -> RawDataset:
    """Read an ``.inter`` and an ``.item`` file into a :class:`RawDataset`.

    Args:
        inter_path: interaction file with ``user_id:token``, ``item_id:token``
            and ``timestamp:float``. Other columns are read and ignored.
        item_path: item file with ``item_id:token`` and a text column.
        config: ``encoding`` and ``text_field`` apply here.

    Returns:
        The interactions in file order and the text of every item in the
        ``.item`` file.

    Raises:
        DataError: a file is missing, empty or malformed; the message names the
            file, the line and the fix.
    """
    interactions = read_interactions(Path(inter_path), config.encoding)
    texts, text_field = read_item_texts(Path(item_path), config.encoding, config.text_field)
    return RawDataset(
        interactions=interactions,
        item_texts=texts,
        text_source=f"{item_path} (field {text_field!r})",
        source_files=(str(inter_path), str(item_path)),
    )


def read_interactions(path: Path, encoding: str) -> pd.DataFrame:
    """Read an ``.inter`` file into columns ``user_id``, ``item_id``, ``timestamp``.

    Raises:
        DataError: the file is missing or malformed, has no rows, or has a
            timestamp that is not a finite number.
    """
    table = read_atomic_table(path, encoding, required=INTER_FIELDS)
    if len(table.frame) == 0:
        raise DataError(
            f"{path} has a header but no interaction rows. "
            "Add rows of user_id, item_id and timestamp separated by tabs."
        )
    for field in ("user_id", "item_id"):
        _reject_empty_ids(table, field)
    raw_timestamps = table.frame["timestamp"].to_numpy(dtype=object)
    timestamps = _parse_timestamps(table, raw_timestamps)
    return pd.DataFrame(
        {
            "user_id": table.frame["user_id"],
            "item_id": table.frame["item_id"],
            "timestamp": timestamps,
        }
    )


def _reject_empty_ids(table: AtomicTable, field: str) -> None:
    """Raise on an empty or blank id, which would merge all such rows into one user or item."""
    empty = (table.frame[field].str.strip() == "").to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(
            f"{table.path} line {table.line_numbers[row]}: {field} is empty "
            f"({int(empty.sum())} such row(s)). Fix or remove the row."
        )


def _parse_timestamps(table: AtomicTable, raw_timestamps: np.ndarray) -> np.ndarray:
    try:
        timestamps = np.asarray(raw_timestamps, dtype=np.float64)
        invalid = ~np.isfinite(timestamps)
    except ValueError:
        timestamps = pd.to_numeric(pd.Series(raw_timestamps), errors="coerce").to_numpy(
            dtype=np.float64
        )
        invalid = ~np.isfinite(timestamps)
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise DataError(
            f"{table.path} line {table.line_numbers[row]}: timestamp "
            f"{raw_timestamps[row]!r} is not a finite number "
            f"({int(invalid.sum())} invalid timestamp(s) in the file). "
            "Timestamps are Unix seconds, e.g. 1419897600; fix or remove the row."
        )
    return timestamps


def read_item_texts(
    path: Path, encoding: str, text_field: str | None
) -> tuple[dict[str, str], str]:
    """Read the text of each item from an ``.item`` file.

    Args:
        path: the ``.item`` file.
        encoding: its text encoding.
        text_field: column that contains the text; None selects the first
            ``token_seq`` column.

    Returns:
        A dict from raw item id to text, and the name of the text column.

    Raises:
        DataError: the file is missing or malformed, has no text column, or
            lists an item id twice.
    """
    table = read_atomic_table(path, encoding, required=dict([ITEM_ID_FIELD]))
    text_field = _select_text_field(table, text_field)
    _reject_empty_ids(table, "item_id")
    ids = table.frame["item_id"]
    duplicated = ids.duplicated(keep=False).to_numpy()
    if duplicated.any():
        rows = np.flatnonzero(duplicated)
        first_id = ids.iloc[rows[0]]
        lines = table.line_numbers[rows[(ids.iloc[rows] == first_id).to_numpy()]][:2]
        raise DataError(
            f"{path}: item id {first_id!r} appears on lines {lines[0]} and {lines[1]} "
            f"({int(ids.duplicated().sum())} duplicate row(s) in the file). "
            "Keep one row per item id."
        )
    texts = dict(zip(ids.tolist(), table.frame[text_field].tolist()))
    return texts, text_field


def _select_text_field(table: AtomicTable, text_field: str | None) -> str:
    header = "\t".join(f"{name}:{kind}" for name, kind in table.fields)
    if text_field is not None:
        if table.field_type(text_field) is None:
            raise DataError(
                f"{table.path} line 1: no text column {text_field!r} in the header "
                f"({header}). Set text_field in the recipe or DatasetConfig to one of "
                f"the header's field names."
            )
        return text_field
    for name, kind in table.fields:
        if kind == "token_seq":
            return name
    raise DataError(
        f"{table.path} line 1: missing text column: the header ({header}) has no "
        "token_seq field. Add a column such as title:token_seq, or set text_field "
        "in the recipe or DatasetConfig to the column that holds the text."
    )


def read_atomic_table(path: Path, encoding: str, required: Mapping[str, str]) -> AtomicTable:
    """Read and validate one atomic file.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.
        encoding: text encoding. Undecodable bytes raise, never get replaced.
        required: field name to type that the header must contain.

    Returns:
        The parsed table with every field as a string column.

    Raises:
        DataError: the file is missing, empty, not decodable, has a malformed
            header or a row whose number of fields differs from the header.
    """
    text = _read_text(path, encoding)
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if "\r" in text and "\n" not in text.rstrip("\n"):
        # The whole file would read as one header line and fail with a header error.
        raise DataError(
            f"{path} separates lines with a bare carriage return (CR, classic Mac OS). "
            "Convert it to LF or CRLF line endings, e.g. tr '\\r' '\\n' < OLD > NEW."
        )
    line_starts, line_ends, tab_counts = _scan_lines(text)
    non_blank = line_ends > line_starts
    if not non_blank.any():
        raise DataError(
            f"{path} is empty. An atomic file starts with a tab-separated typed header, "
            "e.g. user_id:token<TAB>item_id:token<TAB>timestamp:float."
        )
    if not non_blank[0]:
        raise DataError(
            f"{path} line 1 is blank, but it must be the typed header "
            "(e.g. user_id:token<TAB>item_id:token<TAB>timestamp:float). Remove the blank line."
        )

    fields = _parse_header(path, text.partition("\n")[0], required)
    row_lines = np.flatnonzero(non_blank[1:]) + 1
    wrong_width = row_lines[tab_counts[row_lines] != len(fields) - 1]
    if len(wrong_width):
        line = int(wrong_width[0])
        raise DataError(
            f"{path} line {line + 1} has {int(tab_counts[line]) + 1} tab-separated "
            f"field(s), but the header has {len(fields)} "
            f"({len(wrong_width)} such line(s) in the file). "
            "Fix the row; a title must not contain a tab character."
        )

    names = [name for name, _ in fields]
    # Every non-blank line was checked to have len(fields) values, so the C
    # parser returns one row per such line. It skips blank lines, as the check does.
    frame = pd.read_csv(
        io.StringIO(text),
        sep="\t",
        header=None,
        names=names,
        skiprows=1,
        index_col=False,
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
        lineterminator="\n",
        skip_blank_lines=True,
        engine="c",
    )
    if len(frame) != len(row_lines):
        raise DataError(
            f"{path}: parsed {len(frame)} rows but the file has {len(row_lines)} data lines. "
            "The file may contain NUL bytes or other control characters; remove them."
        )
    return AtomicTable(path=path, fields=fields, frame=frame, line_numbers=row_lines + 1)


def _read_text(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise DataError(f"missing file {path}. Check the path and the --data-dir folder.")
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        else:
            reject_gzip_bytes(path, data[:2])
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read {path}: {exc}. If the file is meant to be gzip-compressed, "
            "recompress it; otherwise remove the .gz suffix."
        ) from exc
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise decode_error(path, data, exc, encoding) from None


GZIP_MAGIC = b"\x1f\x8b"


def reject_gzip_bytes(path: Path, head: bytes) -> None:
    """Raise when a file without the ``.gz`` suffix starts with the gzip signature.

    Without this, such a file fails later as undecodable text, or, under a
    single-byte encoding, as a malformed header, and neither message points
    at the compression.
    """
    if head[:2] == GZIP_MAGIC:
        raise DataError(
            f"{path} is gzip-compressed but its name does not end in .gz. Rename it to {path.name}.gz "
            "(the recipe's file name too) or decompress it."
        )


def decode_error(
    path: Path, data: bytes, exc: UnicodeDecodeError, encoding: str, first_line: int = 1
) -> DataError:
    """Build the error for bytes that ``encoding`` cannot decode.

    Args:
        path: the file, named in the message.
        data: the bytes that failed, starting at line ``first_line``.
        exc: the decoder's error; its ``start`` indexes ``data``.
        encoding: the codec that failed.
        first_line: line number of the first byte of ``data``.

    Returns:
        A DataError naming the file, line and byte value, and how to set the encoding.
    """
    line = first_line + data.count(b"\n", 0, exc.start)
    byte = data[exc.start]
    return DataError(
        f"{path} line {line}: byte 0x{byte:02X} is not valid {encoding}. "
        "If the file uses another encoding, set it: --set data.encoding=latin-1 on the command line, "
        "encoding = \"latin-1\" in the recipe's [config] table, or DatasetConfig(encoding=\"latin-1\")."
    )


def _scan_lines(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return start and end offsets and the number of tabs of each line.

    Offsets index the UTF-8 encoding of ``text``. A final line break does not
    start another line.
    """
    buffer = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    newlines = np.flatnonzero(buffer == _NEWLINE)
    tabs = np.flatnonzero(buffer == _TAB)
    ends = np.r_[newlines, len(buffer)]
    starts = np.r_[0, newlines + 1]
    if len(buffer) and buffer[-1] == _NEWLINE:
        starts, ends = starts[:-1], ends[:-1]
    tab_counts = np.searchsorted(tabs, ends) - np.searchsorted(tabs, starts)
    return starts, ends, tab_counts


def _parse_header(path: Path, header: str, required: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    fields = []
    for column, field in enumerate(header.split("\t"), start=1):
        name, sep, kind = field.partition(":")
        if not sep or not name:
            raise DataError(
                f"{path} line 1: header field {column} {field!r} is not of the form "
                f"name:type. Write it as e.g. {(name or 'field') + ':token'!r}; "
                f"types are {', '.join(FIELD_TYPES)}."
            )
        if kind not in FIELD_TYPES:
            raise DataError(
                f"{path} line 1: header field {field!r} has unknown type {kind!r}. "
                f"Use one of {', '.join(FIELD_TYPES)}."
            )
        if any(name == seen for seen, _ in fields):
            raise DataError(
                f"{path} line 1: header field name {name!r} appears twice. "
                "Rename or remove one of the columns."
            )
        fields.append((name, kind))

    declared = dict(fields)
    for name, kind in required.items():
        if name not in declared:
            raise DataError(
                f"{path} line 1: header lacks the required field {name}:{kind} "
                f"(header: {header!r}). Add the column."
            )
        if declared[name] != kind:
            raise DataError(
                f"{path} line 1: field {name!r} has type {declared[name]!r} but must be "
                f"{name}:{kind}. Fix the header."
            )
    return tuple(fields)
