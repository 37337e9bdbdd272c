"""Run records: one JSON file per finished cell, written atomically.

A record carries the resolved config, the dataset fingerprint, the protocol
hash, metrics, costs per phase and the environment (git commit, library
versions, hardware), so a leaderboard row can be traced to what produced it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Callable

from bench.profiling import hardware_info

logger = logging.getLogger(__name__)

RECORD_SCHEMA = 1
_LIBRARIES = ("torch", "transformers", "numpy", "pandas", "scikit-learn", "optuna", "tabulate")


def git_commit(repo: Path | None = None) -> str | None:
    """The checked-out commit of the harness, with '+dirty' for local changes."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict:
    """Git commit, Python and library versions, and hardware of this process."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    from bench import __version__

    return {
        "bench_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
        "hardware": hardware_info(),
    }


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` by calling ``write`` on a binary temp file of this process, then renaming it.

    Readers never see a partial file, and two processes writing one path
    never share a temp file. The temp file is removed when ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file as 0600, but outputs and caches are meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temp file and a rename."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


# Fields every leaderboard row reads from a record.
REQUIRED_FIELDS = ("key", "dataset", "dataset_fingerprint", "protocol_hash", "method", "outcome")


def read_records(folder: Path) -> list[dict]:
    """Every readable record under ``folder``; unreadable files are logged and skipped."""
    records = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable record %s: %s", path, exc)
            continue
        if isinstance(record, dict) and record.get("schema") == RECORD_SCHEMA:
            missing = [name for name in REQUIRED_FIELDS if name not in record]
            if missing:
                logger.warning("skipping %s: the record lacks %s; delete it so its cell runs again", path,
                               ", ".join(missing))
                continue
            records.append(record)
        else:
            found = record.get("schema") if isinstance(record, dict) else type(record).__name__
            logger.warning("skipping %s: not a record of schema %s (found %r); move it out of the runs folder "
                           "or run its cell again", path, RECORD_SCHEMA, found)
    return records
