"""Tests of the Amazon Reviews 2018 and Yelp readers on small files in the release formats."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.data import DatasetConfig
from bench.data.raw import read_yelp
from bench.data.recipes import load_from_recipe, load_recipe
from bench.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
NO_FILTER = DatasetConfig(kcore=0)


def write_lines(path: Path, lines: list[str]) -> None:
    """Write text lines as UTF-8, gzip-compressed when the name ends in .gz."""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def review(user: str, asin: str, time: int) -> str:
    return json.dumps({"overall": 5.0, "verified": True, "reviewTime": "01 1, 2015",
                       "reviewerID": user, "asin": asin, "unixReviewTime": time,
                       "reviewText": "Fine.", "summary": "ok"})


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture()
def amazon(tmp_path):
    """An Amazon 2018 category folder with reviews and metadata, and its recipe."""
    folder = tmp_path / "amazon"
    folder.mkdir()
    write_lines(folder / "Toys.json.gz", [
        review("A1", "0001388703", 1_400_000_300),
        review("A1", "B00002", 1_400_000_100),
        review("A1", "B00003", 1_400_000_200),
        review("A2", "B00002", 1_400_000_000),
        review("A2", "0001388703", 1_400_000_050),
        review("A2", "B00003", 1_400_000_090),
    ])
    write_lines(folder / "meta_Toys.json.gz", [
        json.dumps({"asin": "0001388703", "title": "Retro Arcade Pack", "brand": "X"}),
        # A metadata line in Python dict-literal form, which the reader also accepts.
        "{'asin': 'B00002', 'title': 'Rubik\\'s Cube', 'price': '$9.99'}",
        json.dumps({"asin": "B00003", "title": "Puzzle Box"}),
        json.dumps({"asin": "B00003", "title": "Puzzle Box (repeat line)"}),
    ])
    recipe = write_recipe(tmp_path / "toys.toml", (
        'format = "amazon2018"\nfolder = "amazon"\n'
        'reviews_file = "Toys.json.gz"\nmeta_file = "meta_Toys.json.gz"\n'
    ))
    return tmp_path, load_recipe(recipe)


def test_amazon_reads_reviews_and_titles(amazon):
    data_dir, recipe = amazon
    data = load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    titles = dict(zip(data.item_ids, data.item_texts))
    assert titles == {"B00002": "Rubik's Cube", "B00003": "Puzzle Box", "0001388703": "Retro Arcade Pack"}
    assert data.user_ids == ("A1", "A2")


def test_amazon_orders_by_review_time(amazon):
    data_dir, recipe = amazon
    data = load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    a1 = data.user_ids.index("A1")
    assert data.item_ids[data.test_targets[a1] - 1] == "0001388703"
    assert data.item_ids[data.valid_targets[a1] - 1] == "B00003"
    assert data.stats["source_files"][0].endswith("Toys.json.gz")


def test_amazon_missing_title_follows_missing_text(amazon):
    data_dir, recipe = amazon
    meta = data_dir / "amazon" / "meta_Toys.json.gz"
    write_lines(meta, [json.dumps({"asin": "0001388703", "title": "Retro Arcade Pack"}),
                       json.dumps({"asin": "B00002"}),
                       json.dumps({"asin": "B00003", "title": ""})])
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert "'B00002'" in str(caught.value)
    data = load_from_recipe(recipe, data_dir=data_dir, config=DatasetConfig(kcore=0, missing_text="empty"))
    assert dict(zip(data.item_ids, data.item_texts))["B00002"] == ""
    assert data.stats["items_without_text"] == 2


def test_amazon_bad_meta_line_named(amazon):
    data_dir, recipe = amazon
    meta = data_dir / "amazon" / "meta_Toys.json.gz"
    write_lines(meta, [json.dumps({"asin": "B00002", "title": "T"}), "{'asin': 'B00003', 'title': "])
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    message = str(caught.value)
    assert "meta_Toys.json.gz line 2" in message
    assert "neither JSON" in message


def test_amazon_review_without_time_named(amazon):
    data_dir, recipe = amazon
    reviews = data_dir / "amazon" / "Toys.json.gz"
    write_lines(reviews, [review("A1", "B00002", 1), json.dumps({"reviewerID": "A1", "asin": "B00003"})])
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert "Toys.json.gz line 2: unixReviewTime None" in str(caught.value)


def test_amazon_numeric_asin_rejected(amazon):
    data_dir, recipe = amazon
    reviews = data_dir / "amazon" / "Toys.json.gz"
    write_lines(reviews, ['{"reviewerID": "A1", "asin": 1388703, "unixReviewTime": 5}'])
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert "'asin' is 1388703, not a string" in str(caught.value)


def test_amazon_misspelt_text_field_named(amazon):
    # No metadata record has the field, so it is a wrong name, not missing text;
    # even missing_text="empty" must not turn every title into "".
    data_dir, recipe = amazon
    config = DatasetConfig(kcore=0, text_field="titel", missing_text="empty")
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=config)
    message = str(caught.value)
    assert "no record has the text field 'titel'" in message
    assert "asin, brand, title" in message


@pytest.mark.parametrize("digits", [401, 5001])
def test_amazon_huge_integer_time_named(amazon, digits):
    # 401 digits overflow a float; 5001 exceed Python's integer-string limit inside json.
    data_dir, recipe = amazon
    reviews = data_dir / "amazon" / "Toys.json.gz"
    huge = "9" * digits
    write_lines(reviews, [review("A1", "B00002", 1),
                          '{"reviewerID": "A1", "asin": "B00003", "unixReviewTime": ' + huge + "}"])
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert "Toys.json.gz line 2" in str(caught.value)


def test_amazon_empty_reviewer_rejected(amazon):
    data_dir, recipe = amazon
    reviews = data_dir / "amazon" / "Toys.json.gz"
    write_lines(reviews, [review("A1", "B00002", 1), review("", "B00003", 2)])
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert "Toys.json.gz line 2: 'reviewerID' is empty" in str(caught.value)


def test_gzip_data_without_suffix_named(amazon):
    data_dir, recipe = amazon
    folder = data_dir / "amazon"
    (folder / "Toys.json.gz").rename(folder / "Toys.json")
    plain = load_recipe(write_recipe(data_dir / "plain.toml", (
        'format = "amazon2018"\nfolder = "amazon"\n'
        'reviews_file = "Toys.json"\nmeta_file = "meta_Toys.json.gz"\n'
    )))
    with pytest.raises(DataError) as caught:
        load_from_recipe(plain, data_dir=data_dir, config=NO_FILTER)
    assert "Toys.json is gzip-compressed but its name does not end in .gz" in str(caught.value)


def test_amazon_recipe_requires_files(tmp_path):
    path = write_recipe(tmp_path / "toys.toml", 'format = "amazon2018"\nreviews_file = "Toys.json.gz"\n')
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert "requires the key 'meta_file'" in str(caught.value)


# Yelp


def write_yelp(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    reviews = [
        {"review_id": "r1", "user_id": "U1", "business_id": "b1", "stars": 5, "date": "2019-03-02 10:00:00"},
        {"review_id": "r2", "user_id": "U1", "business_id": "b2", "stars": 4, "date": "2019-01-02 10:00:00"},
        {"review_id": "r3", "user_id": "U1", "business_id": "b3", "stars": 3, "date": "2019-02-02 10:00:00"},
        {"review_id": "r4", "user_id": "U2", "business_id": "b1", "stars": 2, "date": "2018-12-31 23:59:59"},
    ]
    businesses = [
        {"business_id": "b1", "name": "Café Olé", "categories": "Coffee & Tea"},
        {"business_id": "b2", "name": "Noodle Bar", "categories": None},
        {"business_id": "b3", "name": "Bäckerei", "categories": "Bakeries, Food"},
    ]
    write_lines(folder / "yelp_academic_dataset_review.json", [json.dumps(r) for r in reviews])
    # ensure_ascii=False writes the accents as UTF-8 bytes, as the release files do.
    write_lines(folder / "yelp_academic_dataset_business.json",
                [json.dumps(b, ensure_ascii=False) for b in businesses])


@pytest.fixture()
def yelp(tmp_path):
    write_yelp(tmp_path / "yelp")
    recipe = write_recipe(tmp_path / "yelp.toml", 'format = "yelp"\n')
    return tmp_path, load_recipe(recipe)


def test_yelp_text_is_name(yelp):
    data_dir, recipe = yelp
    data = load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    u1 = data.user_ids.index("U1")
    assert data.item_ids[data.test_targets[u1] - 1] == "b1"
    assert dict(zip(data.item_ids, data.item_texts)) == {"b1": "Café Olé", "b2": "Noodle Bar", "b3": "Bäckerei"}


def test_yelp_text_with_categories(yelp):
    data_dir, recipe = yelp
    config = DatasetConfig(kcore=0, text_field="name,categories")
    data = load_from_recipe(recipe, data_dir=data_dir, config=config)
    texts = dict(zip(data.item_ids, data.item_texts))
    assert texts["b1"] == "Café Olé, Coffee & Tea"
    assert texts["b2"] == "Noodle Bar"


def test_yelp_misspelt_text_field_named(yelp):
    data_dir, recipe = yelp
    config = DatasetConfig(kcore=0, text_field="name,categorys", missing_text="empty")
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=config)
    assert "no record has the text field 'categorys'" in str(caught.value)


def test_yelp_bad_date_named(yelp):
    data_dir, recipe = yelp
    path = data_dir / "yelp" / "yelp_academic_dataset_review.json"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"user_id": "U3", "business_id": "b1", "date": "03/02/2019"}) + "\n")
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert "yelp_academic_dataset_review.json line 5: date '03/02/2019'" in str(caught.value)


def test_yelp_invalid_utf8_named(yelp):
    data_dir, recipe = yelp
    path = data_dir / "yelp" / "yelp_academic_dataset_business.json"
    path.write_bytes(path.read_bytes() + b'{"business_id": "b4", "name": "Caf\xe9"}\n')
    with pytest.raises(DataError) as caught:
        load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    message = str(caught.value)
    assert "line 4" in message
    assert "0xE9" in message


def test_yelp_decodes_utf8_under_c_locale(tmp_path):
    folder = tmp_path / "yelp"
    folder.mkdir()
    write_lines(folder / "yelp_academic_dataset_review.json", [
        json.dumps({"user_id": "U1", "business_id": "b1", "date": "2019-01-01 00:00:00"})])
    (folder / "yelp_academic_dataset_business.json").write_bytes(
        '{"business_id": "b1", "name": "Café Olé", "categories": "Coffee & Tea"}\n'.encode("utf-8"))
    script = (
        "import sys; from pathlib import Path; from bench.data import DatasetConfig; "
        "from bench.data.raw import read_yelp; f = Path(sys.argv[1]); "
        "raw = read_yelp(f / 'yelp_academic_dataset_review.json', "
        "f / 'yelp_academic_dataset_business.json', DatasetConfig()); "
        "print(ascii(raw.item_texts['b1']))"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ascii("Café Olé")


def test_yelp_reader_returns_utc_seconds(tmp_path):
    write_yelp(tmp_path / "yelp")
    raw = read_yelp(tmp_path / "yelp" / "yelp_academic_dataset_review.json",
                    tmp_path / "yelp" / "yelp_academic_dataset_business.json", DatasetConfig())
    assert raw.interactions["timestamp"].iloc[3] == 1_546_300_799.0
    assert raw.interactions["user_id"].tolist() == ["U1", "U1", "U1", "U2"]


def test_yelp_repeated_business_logged(yelp, caplog):
    data_dir, recipe = yelp
    path = data_dir / "yelp" / "yelp_academic_dataset_business.json"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"business_id": "b1", "name": "Other Name"}) + "\n")
    with caplog.at_level("INFO", logger="bench.data.raw"):
        data = load_from_recipe(recipe, data_dir=data_dir, config=NO_FILTER)
    assert dict(zip(data.item_ids, data.item_texts))["b1"] == "Café Olé"
    assert "1 repeated business_id line(s) ignored" in caplog.text
