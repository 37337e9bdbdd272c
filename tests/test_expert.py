"""Tests of the expert trajectory cache on a real steam slice."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from bench.errors import DataError
from bench.expert import build_expert


def _build(cache):
    return build_expert(cache.data, cache.text_vectors(), cache.learner, cache.expert_config, cache.cache_dir,
                        cache.text_identity)


def test_cache_stores_key_and_digests(steam_cache):
    trajectory = steam_cache.expert()
    meta = json.loads((trajectory.folder / "trajectory.json").read_text(encoding="utf-8"))
    assert trajectory.folder.name.endswith(meta["key"])
    assert len(meta["sha256"]) == trajectory.epochs == 2
    assert not list(trajectory.folder.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "empty", "swap"])
def test_damaged_checkpoint_is_rebuilt(steam_cache, damage, caplog):
    trajectory = steam_cache.expert()
    path = trajectory.path(2)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        # A checkpoint from another point of the trajectory: readable, but not the one recorded.
        path.write_bytes(trajectory.path(1).read_bytes())
    with caplog.at_level(logging.WARNING, logger="bench.expert"):
        rebuilt = _build(steam_cache)
    assert "changed since they were written" in caplog.text
    assert path.read_bytes() == good  # the build is deterministic for its seed
    assert torch.equal(rebuilt.state(2)["text"], trajectory.state(2)["text"])


def test_foreign_key_is_rebuilt(steam_cache, caplog):
    trajectory = steam_cache.expert()
    meta_path = trajectory.folder / "trajectory.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({**meta, "key": "another-expert"}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bench.expert"):
        _build(steam_cache)
    assert "was written for key another-expert" in caplog.text
    assert json.loads(meta_path.read_text(encoding="utf-8"))["key"] == meta["key"]


def test_unreadable_checkpoint_named(steam_cache):
    trajectory = steam_cache.expert()
    good = trajectory.path(1).read_bytes()
    trajectory.path(1).write_bytes(b"not a checkpoint")
    try:
        with pytest.raises(DataError, match=r"epoch_001.pt cannot be read: it is damaged.*Delete the folder"):
            trajectory.state(1)
    finally:
        trajectory.path(1).write_bytes(good)
