"""Tests of the RecBole atomic-file reader through load_dataset on small files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bench.data import DatasetConfig, load_dataset
from bench.data.atomic import read_atomic_table
from bench.errors import DataError

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token_seq"
NO_FILTER = DatasetConfig(kcore=0)


def write_dataset(root: Path, name: str, inter_rows, item_rows, *,
                  inter_header=INTER_HEADER, item_header=ITEM_HEADER) -> Path:
    """Write DATA_DIR/name/name.inter and name.item from rows given as tuples of str."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    inter = "\n".join([inter_header, *("\t".join(row) for row in inter_rows)]) + "\n"
    item = "\n".join([item_header, *("\t".join(row) for row in item_rows)]) + "\n"
    (folder / f"{name}.inter").write_text(inter, encoding="utf-8")
    (folder / f"{name}.item").write_text(item, encoding="utf-8")
    return folder


def text_of(data, user_index: int, target: str) -> tuple[str, str]:
    """Return (raw id, title) of a user's 'valid' or 'test' target."""
    internal = int(getattr(data, f"{target}_targets")[user_index])
    return data.item_ids[internal - 1], data.item_texts[internal - 1]


# Leading zeros and all-digit ids


def test_ids_keep_leading_zeros(tmp_path):
    write_dataset(
        tmp_path, "zeros",
        [("u1", "1388703", "1"), ("u1", "0001388703", "2"), ("u1", "0000031852", "3"),
         ("u2", "0000031852", "1"), ("u2", "1388703", "2"), ("u2", "0001388703", "3")],
        [("0001388703", "Retro Arcade Pack"), ("1388703", "Star Blaster"),
         ("0000031852", "Puzzle Box")],
    )
    data = load_dataset("zeros", data_dir=tmp_path, config=NO_FILTER)
    assert data.n_items == 3
    assert sorted(data.item_ids) == ["0000031852", "0001388703", "1388703"]
    assert text_of(data, data.user_ids.index("u1"), "test") == ("0000031852", "Puzzle Box")
    assert text_of(data, data.user_ids.index("u2"), "test") == ("0001388703", "Retro Arcade Pack")


def test_item_id_zero_is_not_padding(tmp_path):
    write_dataset(
        tmp_path, "zeroid",
        [("u1", "0", "1"), ("u1", "1", "2"), ("u1", "2", "3"), ("u1", "3", "4"),
         ("u2", "1", "1"), ("u2", "2", "2"), ("u2", "0", "3")],
        [("0", "zero"), ("1", "one"), ("2", "two"), ("3", "three")],
    )
    data = load_dataset("zeroid", data_dir=tmp_path, config=NO_FILTER)
    used = np.concatenate([*data.train_seqs, data.valid_targets, data.test_targets])
    assert data.n_items == 4
    assert set(used.tolist()) == {1, 2, 3, 4}
    assert data.item_ids[0] == "0"
    assert data.item_texts[0] == "zero"
    assert text_of(data, data.user_ids.index("u2"), "test") == ("0", "zero")


# Encoding


def test_latin1_byte_error_names_line_and_fix(tmp_path):
    folder = write_dataset(tmp_path, "latin", [("u1", "a", "1"), ("u1", "a", "2"), ("u1", "a", "3")], [])
    (folder / "latin.item").write_bytes(ITEM_HEADER.encode() + b"\na\tCaf\xe9 Racer\n")
    with pytest.raises(DataError) as caught:
        load_dataset("latin", data_dir=tmp_path, config=NO_FILTER)
    message = str(caught.value)
    assert "latin.item" in message
    assert "line 2" in message
    assert "0xE9" in message
    assert 'encoding = "latin-1"' in message


def test_latin1_encoding_reads_accent(tmp_path):
    folder = write_dataset(tmp_path, "latin", [("u1", "a", "1"), ("u1", "a", "2"), ("u1", "a", "3")], [])
    (folder / "latin.item").write_bytes(ITEM_HEADER.encode() + b"\na\tCaf\xe9 Racer\n")
    data = load_dataset("latin", data_dir=tmp_path, config=DatasetConfig(kcore=0, encoding="latin-1"))
    assert data.item_texts == ("Café Racer",)


def test_utf8_bom_is_ignored(tmp_path):
    folder = write_dataset(tmp_path, "bom", [("u1", "a", "1"), ("u1", "b", "2"), ("u1", "c", "3")],
                           [("a", "A"), ("b", "B"), ("c", "C")])
    inter = folder / "bom.inter"
    inter.write_bytes(b"\xef\xbb\xbf" + inter.read_bytes())
    data = load_dataset("bom", data_dir=tmp_path, config=NO_FILTER)
    assert data.user_ids == ("u1",)


# Titles


def test_blank_titles_kept_and_counted(tmp_path):
    write_dataset(
        tmp_path, "titles",
        [("u1", "t1", "1"), ("u1", "t2", "2"), ("u1", "t3", "3"), ("u1", "t4", "4")],
        [("t1", ""), ("t2", "\u200b\u200b"), ("t3", "   "), ("t4", "NA")],
    )
    data = load_dataset("titles", data_dir=tmp_path, config=NO_FILTER)
    texts = dict(zip(data.item_ids, data.item_texts))
    assert texts == {"t1": "", "t2": "\u200b\u200b", "t3": "   ", "t4": "NA"}
    assert "nan" not in data.item_texts
    assert data.stats["items_without_text"] == 3


def test_item_without_row_raises(tmp_path):
    write_dataset(tmp_path, "gap", [("u1", "a", "1"), ("u1", "b", "2"), ("u1", "ghost", "3")],
                  [("a", "A"), ("b", "B")])
    with pytest.raises(DataError) as caught:
        load_dataset("gap", data_dir=tmp_path, config=NO_FILTER)
    message = str(caught.value)
    assert "'ghost'" in message
    assert "1 item(s)" in message
    assert 'missing_text = "empty"' in message


def test_item_without_row_lists_ten(tmp_path):
    rows = [("u1", f"i{n:02d}", str(n)) for n in range(12)]
    write_dataset(tmp_path, "gaps", rows, [])
    with pytest.raises(DataError) as caught:
        load_dataset("gaps", data_dir=tmp_path, config=NO_FILTER)
    message = str(caught.value)
    assert "12 item(s)" in message
    assert "'i09'" in message
    assert "'i10'" not in message
    assert "and 2 more" in message


def test_missing_text_empty_loads(tmp_path):
    write_dataset(tmp_path, "gap", [("u1", "a", "1"), ("u1", "b", "2"), ("u1", "ghost", "3")],
                  [("a", "A"), ("b", "B")])
    data = load_dataset("gap", data_dir=tmp_path, config=DatasetConfig(kcore=0, missing_text="empty"))
    assert dict(zip(data.item_ids, data.item_texts))["ghost"] == ""
    assert data.stats["items_without_text"] == 1


def test_text_field_selects_column(tmp_path):
    write_dataset(
        tmp_path, "cols", [("u1", "a", "1"), ("u1", "b", "2"), ("u1", "c", "3")],
        [("a", "A", "alpha"), ("b", "B", "beta"), ("c", "C", "gamma")],
        item_header="item_id:token\ttitle:token_seq\tblurb:token_seq",
    )
    default = load_dataset("cols", data_dir=tmp_path, config=NO_FILTER)
    chosen = load_dataset("cols", data_dir=tmp_path, config=DatasetConfig(kcore=0, text_field="blurb"))
    assert default.item_texts == ("A", "B", "C")
    assert chosen.item_texts == ("alpha", "beta", "gamma")


def test_quotes_and_extra_columns_read_literally(tmp_path):
    write_dataset(
        tmp_path, "quotes",
        [("u1", "a", "1", "5"), ("u1", "b", "2", "4"), ("u1", "c", "3", "3")],
        [("a", '"Quoted" title'), ("b", "it's"), ("c", 'half " quote')],
        inter_header=INTER_HEADER + "\trating:float",
    )
    data = load_dataset("quotes", data_dir=tmp_path, config=NO_FILTER)
    assert data.item_texts == ('"Quoted" title', "it's", 'half " quote')


# Ordering and compressed files


def test_equal_timestamps_keep_file_order(tmp_path):
    write_dataset(
        tmp_path, "ties",
        [("u1", "c", "5"), ("u1", "a", "7"), ("u1", "b", "7"), ("u1", "d", "1")],
        [(i, i.upper()) for i in "abcd"],
    )
    data = load_dataset("ties", data_dir=tmp_path, config=NO_FILTER)
    assert [data.item_ids[i - 1] for i in data.train_seqs[0]] == ["d", "c"]
    assert text_of(data, 0, "valid") == ("a", "A")
    assert text_of(data, 0, "test") == ("b", "B")


def test_gzip_inter_is_read(tmp_path):
    folder = write_dataset(tmp_path, "packed", [("u1", "a", "1"), ("u1", "b", "2"), ("u1", "c", "3")],
                           [("a", "A"), ("b", "B"), ("c", "C")])
    inter = folder / "packed.inter"
    (folder / "packed.inter.gz").write_bytes(gzip.compress(inter.read_bytes()))
    inter.unlink()
    data = load_dataset("packed", data_dir=tmp_path, config=NO_FILTER)
    assert data.stats["source_files"][0].endswith("packed.inter.gz")
    assert data.stats["interactions"] == 3


def test_crlf_and_blank_lines(tmp_path):
    folder = tmp_path / "crlf"
    folder.mkdir()
    (folder / "crlf.inter").write_bytes(
        (INTER_HEADER + "\r\nu1\ta\t1\r\n\r\nu1\tb\t2\r\nu1\tc\t3\r\n").encode()
    )
    (folder / "crlf.item").write_bytes((ITEM_HEADER + "\r\na\tA\r\nb\tB\r\nc\tC").encode())
    data = load_dataset("crlf", data_dir=tmp_path, config=NO_FILTER)
    assert data.item_texts == ("A", "B", "C")
    assert data.item_ids == ("a", "b", "c")


# Header and row errors


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("user_id\titem_id:token\ttimestamp:float", "not of the form name:type"),
        ("user_id:token\titem_id:tok\ttimestamp:float", "unknown type 'tok'"),
        ("user_id:token\titem_id:token", "lacks the required field timestamp:float"),
        ("user_id:token\titem_id:token\ttimestamp:token", "must be timestamp:float"),
        ("user_id:token\tuser_id:token\titem_id:token\ttimestamp:float", "appears twice"),
    ],
    ids=["no-type", "unknown-type", "missing-field", "wrong-type", "duplicate"],
)
def test_malformed_header_raises(tmp_path, header, expected):
    path = tmp_path / "bad.inter"
    path.write_text(header + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_atomic_table(path, "utf-8", {"user_id": "token", "timestamp": "float"})
    assert expected in str(caught.value)
    assert "line 1" in str(caught.value)


def test_row_width_error_names_line(tmp_path):
    write_dataset(tmp_path, "wide", [("u1", "a", "1"), ("u1", "b", "2", "extra"), ("u1", "c")],
                  [("a", "A")])
    with pytest.raises(DataError) as caught:
        load_dataset("wide", data_dir=tmp_path, config=NO_FILTER)
    message = str(caught.value)
    assert "wide.inter line 3 has 4" in message
    assert "2 such line(s)" in message


def test_bad_timestamp_names_line(tmp_path):
    write_dataset(tmp_path, "clock", [("u1", "a", "1"), ("u1", "b", "2"), ("u1", "c", "soon")],
                  [("a", "A"), ("b", "B"), ("c", "C")])
    with pytest.raises(DataError) as caught:
        load_dataset("clock", data_dir=tmp_path, config=NO_FILTER)
    assert "clock.inter line 4: timestamp 'soon'" in str(caught.value)


def test_missing_text_column_raises(tmp_path):
    write_dataset(tmp_path, "notext", [("u1", "a", "1")], [("a", "2001")],
                  item_header="item_id:token\tyear:token")
    with pytest.raises(DataError) as caught:
        load_dataset("notext", data_dir=tmp_path, config=NO_FILTER)
    assert "missing text column" in str(caught.value)


def test_unknown_text_field_raises(tmp_path):
    write_dataset(tmp_path, "named", [("u1", "a", "1")], [("a", "A")])
    with pytest.raises(DataError) as caught:
        load_dataset("named", data_dir=tmp_path, config=DatasetConfig(kcore=0, text_field="name"))
    assert "no text column 'name'" in str(caught.value)


def test_duplicate_item_row_raises(tmp_path):
    write_dataset(tmp_path, "twice", [("u1", "a", "1")], [("a", "A"), ("b", "B"), ("a", "A2")])
    with pytest.raises(DataError) as caught:
        load_dataset("twice", data_dir=tmp_path, config=NO_FILTER)
    assert "'a' appears on lines 2 and 4" in str(caught.value)


def test_empty_file_raises(tmp_path):
    folder = write_dataset(tmp_path, "hollow", [], [("a", "A")])
    (folder / "hollow.inter").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        load_dataset("hollow", data_dir=tmp_path, config=NO_FILTER)
    assert "hollow.inter is empty" in str(caught.value)


def test_header_only_file_raises(tmp_path):
    write_dataset(tmp_path, "headonly", [], [("a", "A")])
    with pytest.raises(DataError) as caught:
        load_dataset("headonly", data_dir=tmp_path, config=NO_FILTER)
    assert "no interaction rows" in str(caught.value)


def test_missing_item_file_raises(tmp_path):
    folder = write_dataset(tmp_path, "lonely", [("u1", "a", "1")], [])
    (folder / "lonely.item").unlink()
    with pytest.raises(DataError) as caught:
        load_dataset("lonely", data_dir=tmp_path, config=NO_FILTER)
    assert "missing file" in str(caught.value)
    assert "lonely.item" in str(caught.value)


@pytest.mark.parametrize("inter_rows, item_rows, expected", [
    ([("u1", "a", "1"), ("", "b", "2")], [("a", "A"), ("b", "B")], "line 3: user_id is empty (1 such row(s))"),
    ([("u1", "a", "1"), ("u1", " ", "2")], [("a", "A"), ("b", "B")], "line 3: item_id is empty"),
    ([("u1", "a", "1")], [("a", "A"), ("", "B")], "e.item line 3: item_id is empty"),
])
def test_empty_id_raises(tmp_path, inter_rows, item_rows, expected):
    # Every row with an empty id would otherwise merge into one user or item.
    write_dataset(tmp_path, "e", inter_rows, item_rows)
    with pytest.raises(DataError) as caught:
        load_dataset("e", data_dir=tmp_path, config=NO_FILTER)
    assert expected in str(caught.value)


def test_gzip_bytes_without_suffix_named(tmp_path):
    folder = write_dataset(tmp_path, "z", [("u1", "a", "1"), ("u1", "b", "2")], [("a", "A"), ("b", "B")])
    inter = folder / "z.inter"
    inter.write_bytes(gzip.compress(inter.read_bytes()))
    # latin-1 decodes any byte, so only the signature check can name the cause.
    with pytest.raises(DataError) as caught:
        load_dataset("z", data_dir=tmp_path, config=DatasetConfig(kcore=0, encoding="latin-1"))
    assert "z.inter is gzip-compressed but its name does not end in .gz" in str(caught.value)


def test_cr_only_line_endings_named(tmp_path):
    folder = write_dataset(tmp_path, "mac", [("u1", "a", "1"), ("u1", "b", "2")], [("a", "A"), ("b", "B")])
    inter = folder / "mac.inter"
    inter.write_bytes(inter.read_bytes().replace(b"\n", b"\r"))
    with pytest.raises(DataError) as caught:
        load_dataset("mac", data_dir=tmp_path, config=NO_FILTER)
    assert "mac.inter separates lines with a bare carriage return" in str(caught.value)
