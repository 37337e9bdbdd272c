"""Expert trajectory: the learner trained on full data, one checkpoint per epoch.

TD3, Farzi and FOSTER start their inner learners from points of this
trajectory, and coresets read sequence representations from its best
checkpoint. It is built once per (dataset fingerprint, text vectors, learner
and expert config), cached on disk, and its cost is reported as amortised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.config import check_range, config_dict, stable_hash
from bench.data.types import SplitData
from bench.errors import DataError
from bench.learner import LearnerConfig, TextSASRec, pad_sequences
from bench.metrics import metrics_from_ranks
from bench.progress import progress_bar
from bench.records import write_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertConfig:
    """Schedule of the expert run.

    Attributes:
        epochs: passes over all training sequences; one checkpoint after each.
        lr: Adam learning rate.
        batch_size: sequences per step.
        seed: seed of initialisation and batch order.
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("expert", "epochs", self.epochs, low=1)
        check_range("expert", "lr", self.lr, low=0.0, low_open=True)
        check_range("expert", "batch_size", self.batch_size, low=1)


@dataclass
class ExpertTrajectory:
    """Checkpoint paths by epoch (1-based) plus validation NDCG@10 per epoch."""

    folder: Path
    learner: LearnerConfig
    epochs: int
    valid_ndcg10: list[float]
    build_s: float

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.valid_ndcg10)) + 1

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:03d}.pt"

    def state(self, epoch: int) -> dict[str, torch.Tensor]:
        """Load the learner state dict saved after ``epoch``.

        Raises:
            DataError: the checkpoint cannot be read; the message names it.
        """
        if not 1 <= epoch <= self.epochs:
            raise ValueError(f"expert epoch {epoch} outside 1..{self.epochs}")
        path = self.path(epoch)
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            # torch's own message may advise weights_only=False, which is not the fix here.
            raise DataError(f"expert checkpoint {path} cannot be read: it is damaged or not a checkpoint "
                            f"({type(exc).__name__}). Delete the folder {self.folder} and it is built again") from exc

    def model(self, text_vectors: torch.Tensor, epoch: int | None = None) -> TextSASRec:
        """A learner loaded with the checkpoint of ``epoch`` (default: best)."""
        model = TextSASRec(text_vectors, self.learner)
        model.load_state_dict(self.state(epoch or self.best_epoch))
        model.eval()
        return model


def train_sequences(data) -> np.ndarray:
    """Training sequences with at least two items, as a left-padded id matrix."""
    seqs = [s for s in data.train_seqs if len(s) >= 2]
    width = max(len(s) for s in seqs)
    return pad_sequences(seqs, width)


def build_expert(
    data: SplitData,
    text_vectors: torch.Tensor,
    learner: LearnerConfig,
    config: ExpertConfig,
    cache_dir: Path,
    text_identity: str,
) -> ExpertTrajectory:
    """Load the cached trajectory or train it and save a checkpoint per epoch."""
    key = stable_hash(
        {
            "data": data.fingerprint,
            "text": text_identity,
            "learner": config_dict(learner),
            "expert": config_dict(config),
            "version": 1,
        }
    )
    folder = Path(cache_dir) / "expert" / f"{data.name}-{key}"
    meta_path = folder / "trajectory.json"
    if meta_path.exists():
        try:
            trajectory = _load_cached(folder, meta_path, learner, key)
            if trajectory is not None:
                logger.info("expert trajectory for %s loaded from %s", data.name, folder)
                return trajectory
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("expert cache %s is unreadable (%s); rebuilding it", folder, exc)
    folder.mkdir(parents=True, exist_ok=True)

    from bench.evaluator import rank_split

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = TextSASRec(text_vectors, learner)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ids = torch.from_numpy(train_sequences(data)[:, -(learner.max_len + 1):])
    generator = torch.Generator().manual_seed(config.seed + 1)
    valid = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(ids), generator=generator)
        bar = progress_bar(total=len(order), desc=f"expert epoch {epoch}", unit="seq")
        for begin in range(0, len(order), config.batch_size):
            batch = ids[order[begin:begin + config.batch_size]]
            loss = model.hard_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(len(batch))
        bar.close()
        # A temp name of this process alone: two processes may build one expert at once.
        write_atomic(folder / f"epoch_{epoch:03d}.pt", lambda handle: torch.save(model.state_dict(), handle))
        ndcg = metrics_from_ranks(rank_split(model, data, "valid"), (10,))["ndcg@10"]
        valid.append(ndcg)
        logger.info("expert %s epoch %d/%d: loss %.4f, valid NDCG@10 %.4f", data.name, epoch, config.epochs, loss.item(), ndcg)
    build_s = time.perf_counter() - start
    trajectory = ExpertTrajectory(folder, learner, config.epochs, valid, build_s)
    _write_meta(meta_path, {"key": key, "epochs": config.epochs, "valid_ndcg10": valid, "build_s": build_s,
                            "sha256": _digests(trajectory)})
    return trajectory


def _digests(trajectory: ExpertTrajectory) -> list[str]:
    digests = []
    for epoch in range(1, trajectory.epochs + 1):
        digest = hashlib.sha256()
        with open(trajectory.path(epoch), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests.append(digest.hexdigest())
    return digests


def _write_meta(meta_path: Path, meta: dict) -> None:
    write_atomic(meta_path, lambda handle: handle.write(json.dumps(meta).encode("utf-8")))


def _load_cached(folder: Path, meta_path: Path, learner: LearnerConfig, key: str) -> ExpertTrajectory | None:
    """Return the cached trajectory if its key and checkpoint digests match, else None (rebuild).

    The folder name already carries the key. The stored key and the SHA-256
    of every checkpoint also catch files copied in from another expert, and
    truncated or emptied checkpoints. A cache written before the digests
    existed gets them now, from its files as they are.
    """
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    trajectory = ExpertTrajectory(folder, learner, meta["epochs"], meta["valid_ndcg10"], meta["build_s"])
    if not all(trajectory.path(e).exists() for e in range(1, trajectory.epochs + 1)):
        return None
    if meta.get("key", key) != key:
        logger.warning("expert cache %s was written for key %s, not %s; rebuilding it", folder, meta.get("key"), key)
        return None
    digests = _digests(trajectory)
    if "sha256" not in meta:
        try:
            _write_meta(meta_path, {**meta, "key": key, "sha256": digests})
        except OSError as exc:
            # A read-only cache still loads; it only stays without digests.
            logger.info("expert cache %s: cannot store checkpoint digests (%s)", folder, exc)
    elif meta["sha256"] != digests:
        changed = [e + 1 for e, (a, b) in enumerate(zip(meta["sha256"], digests)) if a != b]
        logger.warning("expert cache %s: checkpoint(s) of epoch %s changed since they were written; rebuilding it",
                       folder, changed)
        return None
    return trajectory
