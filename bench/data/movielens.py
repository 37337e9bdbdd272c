"""Download of MovieLens-100K into the data home as RecBole atomic files.

The dataset lives in ``DATA_HOME/ml-100k/ml-100k.inter`` and ``ml-100k.item``.
When they are absent, :func:`ensure_ml100k` obtains them in this order:

1. GroupLens' official ``ml-100k.zip``, converting ``u.data`` and ``u.item``
   to atomic files in the column layout of RecBole's copy.
2. The RecBole 1.2.1 wheel from the package index (``pip download``, not
   installed), which ships both atomic files; their SHA-256 digests are
   checked against the constants below.

Each file is written to a temporary name and renamed, so an interrupted
download never leaves a partial file behind.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from bench.errors import DataError

logger = logging.getLogger(__name__)

FOLDER = "ml-100k"
INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_TIMEOUT_S = 10.0
# Size of ml-100k as (ratings, users, movies). The RecBole copy checked by
# RECBOLE_SHA256 has the same counts.
GROUPLENS_COUNTS = (100_000, 943, 1_682)
# Genre flag columns of u.item, in the order of u.genre.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
PIP_TIMEOUT_S = 300
# SHA-256 of the two files inside recbole-1.2.1-py3-none-any.whl, computed
# from the wheel on PyPI.
RECBOLE_SHA256 = {
    INTER_FILE: "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    ITEM_FILE: "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
# Output fragments by which pip reports that no package index could serve the
# wheel. "(from versions: none)" also appears when a reachable index lacks recbole.
_PIP_NETWORK_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Connection refused",
    "(from versions: none)",
)


def ensure_ml100k(
    data_home: Path,
    *,
    grouplens_url: str = GROUPLENS_URL,
    timeout: float = GROUPLENS_TIMEOUT_S,
) -> Path:
    """Return the MovieLens-100K folder under ``data_home``, downloading it if absent.

    Args:
        data_home: folder that contains downloaded datasets.
        grouplens_url: address of GroupLens' ``ml-100k.zip``.
        timeout: socket timeout in seconds for the GroupLens download.

    Returns:
        ``data_home/ml-100k``, which contains ``ml-100k.inter`` and ``ml-100k.item``.

    Raises:
        DataError: both sources failed, or the RecBole files have the wrong
            checksum. The message lists each failure and how to place the files
            by hand.
    """
    folder = Path(data_home) / FOLDER
    if (folder / INTER_FILE).is_file() and (folder / ITEM_FILE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("MovieLens-100K not found in %s; downloading it", folder)

    try:
        fetch_from_grouplens(folder, url=grouplens_url, timeout=timeout)
        return folder
    except DataError as exc:
        grouplens_failure = str(exc)
        logger.warning("GroupLens download failed, trying the RecBole wheel: %s", exc)

    try:
        fetch_from_recbole_wheel(folder)
    except DataError as exc:
        raise DataError(
            f"could not obtain MovieLens-100K. GroupLens: {grouplens_failure} "
            f"RecBole wheel: {exc} To install it by hand, put {INTER_FILE} and {ITEM_FILE} "
            f"(RecBole atomic format) in {folder}."
        ) from exc
    return folder


def fetch_from_grouplens(
    folder: Path,
    *,
    url: str = GROUPLENS_URL,
    timeout: float = GROUPLENS_TIMEOUT_S,
    expected_counts: tuple[int, int, int] | None = GROUPLENS_COUNTS,
) -> None:
    """Download GroupLens' ``ml-100k.zip`` and write the atomic files into ``folder``.

    Args:
        folder: destination folder; it must exist.
        url: address of the zip file.
        timeout: socket timeout in seconds.
        expected_counts: (ratings, users, movies) that the converted files must
            have, or None to skip the check.

    Raises:
        DataError: the download failed, the zip is malformed, or the counts differ.
    """
    logger.info("downloading %s (timeout %.0f s)", url, timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            archive = response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DataError(f"download of {url} failed: {exc}.") from exc

    # NOTE: the zip itself has no pinned checksum because the GroupLens host was
    # unreachable when this module was written. The converted files are checked
    # against the published counts instead.
    inter_text, item_text = convert_grouplens_zip(archive, source=url)
    if expected_counts is not None:
        _check_counts(inter_text, item_text, expected_counts, source=url)
    write_atomically(folder / ITEM_FILE, item_text.encode("utf-8"))
    write_atomically(folder / INTER_FILE, inter_text.encode("utf-8"))
    logger.info("wrote %s and %s from %s", INTER_FILE, ITEM_FILE, url)


def convert_grouplens_zip(archive: bytes, source: str = "ml-100k.zip") -> tuple[str, str]:
    """Convert ``u.data`` and ``u.item`` of the GroupLens zip to atomic file texts.

    Args:
        archive: bytes of ``ml-100k.zip``, whose members are ``ml-100k/u.data``
            (tab-separated user, item, rating, timestamp) and ``ml-100k/u.item``
            (pipe-separated, Latin-1: id, title with year, release date, video
            release date, IMDb URL, 19 genre flags).
        source: name of the archive used in messages.

    Returns:
        The ``.inter`` text (``user_id``, ``item_id``, ``rating``, ``timestamp``)
        and the ``.item`` text (``item_id``, ``movie_title`` without the year,
        ``release_year``, ``class`` as space-separated genres).

    Raises:
        DataError: the archive or a line of either file is malformed.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
            data_bytes = bundle.read(f"{FOLDER}/u.data")
            item_bytes = bundle.read(f"{FOLDER}/u.item")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{source} is not the expected ml-100k zip: {exc}.") from exc

    inter_lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for number, line in enumerate(data_bytes.decode("latin-1").splitlines(), start=1):
        values = line.split("\t")
        if len(values) != 4 or not all(value.strip().isdigit() for value in values):
            raise DataError(
                f"{source} u.data line {number}: expected 4 tab-separated integers, got {line!r}."
            )
        inter_lines.append("\t".join(value.strip() for value in values))

    item_lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for number, line in enumerate(item_bytes.decode("latin-1").splitlines(), start=1):
        item_lines.append(_convert_item_line(source, number, line))
    return "\n".join(inter_lines) + "\n", "\n".join(item_lines) + "\n"


def _convert_item_line(source: str, number: int, line: str) -> str:
    values = line.split("|")
    if len(values) != 5 + len(GROUPLENS_GENRES):
        raise DataError(
            f"{source} u.item line {number}: expected {5 + len(GROUPLENS_GENRES)} "
            f"pipe-separated fields, got {len(values)}."
        )
    item_id, full_title, release_date = values[0], values[1], values[2]
    match = _TITLE_YEAR.match(full_title)
    if match:
        title, year = match.group(1), match.group(2)
    else:
        # Release dates look like 01-Jan-1995; some movies have none.
        title, year = full_title.strip(), release_date[-4:] if release_date else ""
    genres = [name for name, flag in zip(GROUPLENS_GENRES, values[5:]) if flag.strip() == "1"]
    return "\t".join((item_id, title.replace("\t", " "), year, " ".join(genres)))


def _check_counts(
    inter_text: str, item_text: str, expected: tuple[int, int, int], source: str
) -> None:
    rows = [line.split("\t") for line in inter_text.splitlines()[1:]]
    counts = (len(rows), len({row[0] for row in rows}), len(item_text.splitlines()) - 1)
    if counts != tuple(expected):
        raise DataError(
            f"{source}: converted files have (ratings, users, movies) = {counts}, "
            f"expected {tuple(expected)}. The download may be truncated or not ml-100k."
        )


def fetch_from_recbole_wheel(folder: Path) -> None:
    """Download the RecBole wheel with pip and extract the ml-100k atomic files.

    The wheel is only downloaded into a temporary folder, never installed.

    Args:
        folder: destination folder; it must exist.

    Raises:
        DataError: pip failed (the message contains "network error" when
            the package index was unreachable), the wheel lacks the files, or a
            file's SHA-256 differs from :data:`RECBOLE_SHA256`.
    """
    with tempfile.TemporaryDirectory(prefix="ml-100k-") as temp_dir:
        wheel = _pip_download(Path(temp_dir))
        logger.info("extracting ml-100k from %s", wheel.name)
        extracted = {}
        try:
            with zipfile.ZipFile(wheel) as bundle:
                for name in (INTER_FILE, ITEM_FILE):
                    extracted[name] = bundle.read(RECBOLE_MEMBER_DIR + name)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheel.name} does not contain the ml-100k files: {exc}.") from exc

    for name, data in extracted.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != RECBOLE_SHA256[name]:
            raise DataError(
                f"{name} from {RECBOLE_REQUIREMENT} has SHA-256 {digest}, expected "
                f"{RECBOLE_SHA256[name]}. The package index served a different file; "
                "do not use it. Download ml-100k from GroupLens instead."
            )
        logger.info("checksum of %s verified", name)
    write_atomically(folder / ITEM_FILE, extracted[ITEM_FILE])
    write_atomically(folder / INTER_FILE, extracted[INTER_FILE])
    logger.info("wrote %s and %s from %s", INTER_FILE, ITEM_FILE, RECBOLE_REQUIREMENT)


def _pip_download(destination: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        RECBOLE_REQUIREMENT, "-d", str(destination),
    ]
    logger.info("running %s", " ".join(command))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DataError(
            f"pip download of {RECBOLE_REQUIREMENT} failed with a network error: "
            f"timed out after {PIP_TIMEOUT_S} s."
        ) from exc
    output = (result.stdout or "") + (result.stderr or "")
    if result.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        kind = "a network error" if any(m in output for m in _PIP_NETWORK_MARKERS) else "an error"
        raise DataError(
            f"pip download of {RECBOLE_REQUIREMENT} failed with {kind} "
            f"(exit status {result.returncode}): {tail}"
        )
    wheels = sorted(destination.glob("recbole-*.whl"))
    if not wheels:
        raise DataError(f"pip download of {RECBOLE_REQUIREMENT} produced no wheel in {destination}.")
    return wheels[0]


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it to ``path``."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # NamedTemporaryFile creates mode 0600; datasets are shared read-only data.
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
