"""Tests of the MovieLens-100K download: the real RecBole wheel, and GroupLens from a local server.

The GroupLens tests serve a small zip in the official layout from an HTTP
server that the test starts on 127.0.0.1, so the real GroupLens host is never
contacted. The wheel tests run the real ``pip download`` and are skipped when
the package index is unreachable.
"""

from __future__ import annotations

import functools
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from bench.data import DatasetConfig, load_dataset
from bench.data import movielens
from bench.errors import DataError

U_DATA = (
    "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
    "196\t302\t4\t881250950\n196\t303\t5\t881250951\n"
)
GENRE_FLAGS_COMEDY = "|".join("1" if g == "Comedy" else "0" for g in movielens.GROUPLENS_GENRES)
GENRE_FLAGS_DRAMA = "|".join("1" if g in ("Drama", "Romance") else "0" for g in movielens.GROUPLENS_GENRES)
U_ITEM = (
    f"242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|{GENRE_FLAGS_COMEDY}\n"
    f"302|L.A. Confidential (1997)|01-Jan-1997||http://us.imdb.com/x|{GENRE_FLAGS_DRAMA}\n"
    f"303|Café au lait|01-Jan-1994||http://us.imdb.com/y|{GENRE_FLAGS_COMEDY}\n"
)


def grouplens_zip() -> bytes:
    """Return a zip laid out like ml-100k.zip, with u.item in Latin-1."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ml-100k/u.data", U_DATA.encode("ascii"))
        bundle.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
    return buffer.getvalue()


@pytest.fixture()
def local_server(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1 and yield the folder and the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def fetch_wheel_or_skip(folder: Path) -> None:
    try:
        movielens.fetch_from_recbole_wheel(folder)
    except DataError as exc:
        if "network error" in str(exc):
            pytest.skip(f"pip download could not reach the package index: {exc}")
        raise


# GroupLens conversion


def test_convert_grouplens_zip_columns():
    inter, item = movielens.convert_grouplens_zip(grouplens_zip())
    assert inter.splitlines()[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    assert inter.splitlines()[1] == "196\t242\t3\t881250949"
    assert item.splitlines()[0] == "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
    assert item.splitlines()[1] == "242\tKolya\t1996\tComedy"
    assert item.splitlines()[2] == "302\tL.A. Confidential\t1997\tDrama Romance"
    assert item.splitlines()[3] == "303\tCafé au lait\t1994\tComedy"


def test_convert_rejects_bad_u_data():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ml-100k/u.data", "196\t242\tthree\t881250949\n")
        bundle.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
    with pytest.raises(DataError) as caught:
        movielens.convert_grouplens_zip(buffer.getvalue())
    assert "u.data line 1" in str(caught.value)


def test_grouplens_fetch_from_local_server(tmp_path, local_server):
    root, base = local_server
    (root / "ml-100k.zip").write_bytes(grouplens_zip())
    folder = tmp_path / "home" / "ml-100k"
    folder.mkdir(parents=True)
    movielens.fetch_from_grouplens(folder, url=f"{base}/ml-100k.zip", expected_counts=(4, 2, 3))
    data = load_dataset("ml-100k", data_home=tmp_path / "home", config=DatasetConfig(kcore=0))
    assert data.user_ids == ("196", "186")
    assert dict(zip(data.item_ids, data.item_texts)) == {
        "242": "Kolya", "302": "L.A. Confidential", "303": "Café au lait"}


def test_grouplens_count_mismatch_raises(tmp_path, local_server):
    root, base = local_server
    (root / "ml-100k.zip").write_bytes(grouplens_zip())
    with pytest.raises(DataError) as caught:
        movielens.fetch_from_grouplens(tmp_path, url=f"{base}/ml-100k.zip")
    assert "expected (100000, 943, 1682)" in str(caught.value)
    assert not (tmp_path / movielens.INTER_FILE).exists()


def test_existing_files_are_not_downloaded(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / movielens.INTER_FILE).write_text("kept", encoding="utf-8")
    (folder / movielens.ITEM_FILE).write_text("kept", encoding="utf-8")
    assert movielens.ensure_ml100k(tmp_path, grouplens_url="http://127.0.0.1:9/unused") == folder
    assert (folder / movielens.INTER_FILE).read_text(encoding="utf-8") == "kept"


# RecBole wheel (real pip download)


@pytest.mark.network
def test_wheel_fallback_then_load(tmp_path, local_server):
    _, base = local_server
    home = tmp_path / "home"
    try:
        # The local server responds with 404, so the GroupLens step fails and the wheel is used.
        movielens.ensure_ml100k(home, grouplens_url=f"{base}/missing.zip")
    except DataError as exc:
        if "network error" in str(exc):
            pytest.skip(f"pip download could not reach the package index: {exc}")
        raise
    full = load_dataset("ml-100k", data_home=home, config=DatasetConfig(kcore=0, max_seq_len=1000))
    assert full.n_users == 943
    assert full.n_items == 1682
    assert full.stats["raw_rows"] == 100_000
    default = load_dataset("ml-100k", data_home=home)
    assert default.n_users == 943
    assert default.stats["rows_after_kcore"] == 99_287
    assert default.n_items == 1_334
    assert default.describe_evaluation() == "943 of 943 users evaluated; 0 have fewer than 3 interactions"
    assert full.item_texts[full.item_ids.index("1")] == "Toy Story"


@pytest.mark.network
def test_wheel_checksum_mismatch_raises(tmp_path, monkeypatch):
    monkeypatch.setitem(movielens.RECBOLE_SHA256, movielens.ITEM_FILE, "0" * 64)
    with pytest.raises(DataError) as caught:
        fetch_wheel_or_skip(tmp_path)
    assert "SHA-256" in str(caught.value)
    assert not (tmp_path / movielens.ITEM_FILE).exists()
    assert not (tmp_path / movielens.INTER_FILE).exists()


def test_data_dir_copy_read_first(tmp_path, local_server):
    root, base = local_server
    (root / "ml-100k.zip").write_bytes(grouplens_zip())
    placed = tmp_path / "data" / "ml-100k"
    placed.mkdir(parents=True)
    movielens.fetch_from_grouplens(placed, url=f"{base}/ml-100k.zip", expected_counts=(4, 2, 3))
    home = tmp_path / "home"
    data = load_dataset("ml-100k", data_dir=tmp_path / "data", data_home=home, config=DatasetConfig(kcore=0))
    assert data.user_ids == ("196", "186")
    # Nothing was fetched into the data home.
    assert not home.exists()
