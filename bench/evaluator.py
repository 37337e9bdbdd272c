"""The evaluation protocol: one learner recipe and one scorer for every method.

Given a method's :class:`SyntheticSet`, the evaluator trains a fresh
:class:`TextSASRec` per seed, selects the training step by validation
NDCG@10, and scores the test split once with that step's weights. Ranking is
over the full catalogue; items in the user's input history are masked except
the target itself (the convention of RecBole's full-sort evaluation, with the
target kept so that a repeated item can still be hit).

Ties count against the target: its rank is 1 plus the number of other
candidates scoring at least as high, so a constant model ranks last, not first.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from bench.config import check_range, config_dict, stable_hash
from bench.data.types import SplitData
from bench.errors import ConfigError
from bench.learner import LearnerConfig, TextSASRec, pad_sequences
from bench.metrics import metrics_from_ranks
from bench.progress import progress_bar
from bench.synthetic import SyntheticSet

if TYPE_CHECKING:
    from bench.text import EncoderConfig

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "1"


@dataclass(frozen=True)
class Protocol:
    """Learner recipe, training schedule and metrics shared by all methods.

    Attributes:
        learner: learner architecture.
        lr: Adam learning rate of the evaluation learner.
        weight_decay: Adam weight decay.
        batch_size: sequences per training step.
        max_steps: training steps at most per learner.
        eval_every: steps between validation evaluations (step selection).
        patience: validation evaluations without improvement before stopping.
        ks: cut-offs K of Recall@K, NDCG@K and MRR@K.
        select_metric: validation metric that selects the step.
        select_users: if set, step selection scores this many validation users,
            drawn once with a fixed seed from the evaluated users (the same
            users for every method); the test split always scores all users.
        eval_batch_size: users scored per matrix multiply (does not change results).
        encoder_mode: "frozen" (cached text vectors) or "tune-top-k" (the
            encoder's top ``top_k`` layers are trained with the learner, see
            ``bench.topk``).
        top_k: number of trained top encoder layers in "tune-top-k" mode.
    """

    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_steps: int = 2000
    eval_every: int = 100
    patience: int = 5
    ks: tuple[int, ...] = (10, 20, 50)
    select_metric: str = "ndcg@10"
    select_users: int | None = None
    eval_batch_size: int = 2048
    encoder_mode: str = "frozen"
    top_k: int = 1

    def __post_init__(self) -> None:
        where = "protocol"
        if self.encoder_mode not in ("frozen", "tune-top-k"):
            raise ConfigError(
                f"protocol: invalid encoder_mode={self.encoder_mode!r}; use 'frozen' or 'tune-top-k'"
            )
        check_range(where, "top_k", self.top_k, low=1)
        check_range(where, "lr", self.lr, low=0.0, low_open=True)
        check_range(where, "weight_decay", self.weight_decay, low=0.0)
        check_range(where, "batch_size", self.batch_size, low=1)
        check_range(where, "max_steps", self.max_steps, low=1)
        check_range(where, "eval_every", self.eval_every, low=1)
        check_range(where, "patience", self.patience, low=1)
        check_range(where, "eval_batch_size", self.eval_batch_size, low=1)
        if self.select_users is not None:
            check_range(where, "select_users", self.select_users, low=1)
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"protocol: ks must be positive cut-offs, got {self.ks!r}")
        valid = {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in self.ks}
        if self.select_metric not in valid:
            raise ConfigError(
                f"protocol: select_metric={self.select_metric!r} is not computed; "
                f"choose one of {sorted(valid)}"
            )

    def hash(self) -> str:
        """Hash of every field that can change a metric (eval batch size excluded)."""
        data = config_dict(self)
        data.pop("eval_batch_size")
        # These fields enter the hash only at non-default values, so records written
        # before the fields existed keep their keys.
        if data["encoder_mode"] == "frozen":
            data.pop("encoder_mode")
        if data["top_k"] == 1:
            data.pop("top_k")
        data["version"] = PROTOCOL_VERSION
        return stable_hash(data)


# Ranking ------------------------------------------------------------------


def _target_ranks(scores: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``targets`` in ``scores (B, n)`` with input items masked.

    ``inputs`` holds left-padded internal ids; ``targets`` internal ids >= 1.
    ``scores`` is overwritten. The target's own score is read before masking,
    so a target that also occurs in the history still competes.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets - 1].clone()
    # Padding (id 0) maps to column -1 after the shift; an extra column absorbs it.
    padded = torch.cat([scores, scores.new_full((scores.shape[0], 1), float("-inf"))], dim=1)
    history = torch.where(inputs > 0, inputs - 1, scores.shape[1])
    padded.scatter_(1, history, float("-inf"))
    padded[rows, targets - 1] = target_scores
    # Counting the target itself once turns "others at least as high" into a 1-based rank.
    return (padded >= target_scores[:, None]).sum(dim=1)


def rank_split(
    model: TextSASRec, data: SplitData, split: str, batch_size: int = 1024,
    users: np.ndarray | None = None,
) -> np.ndarray:
    """Return the 1-based rank of each evaluated user's target in ``split``.

    One matrix multiply per batch of users scores every item. ``users``
    restricts scoring to a subset of evaluated users (indices into them).
    """
    _, seqs, targets = data.eval_inputs(split)
    if users is not None:
        seqs = [seqs[i] for i in users]
        targets = targets[users]
    max_len = model.config.max_len
    was_training = model.training
    model.eval()
    ranks = []
    with torch.no_grad():
        item_emb = model.item_embeddings()
        for start in range(0, len(seqs), batch_size):
            batch = torch.from_numpy(pad_sequences(seqs[start:start + batch_size], max_len))
            hidden = model.last_hidden(batch, item_emb)
            scores = hidden @ item_emb.T
            target = torch.from_numpy(np.asarray(targets[start:start + batch_size], dtype=np.int64))
            ranks.append(_target_ranks(scores, batch, target))
    model.train(was_training)
    return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)


def popularity_ranks(data: SplitData, split: str) -> np.ndarray:
    """Ranks under a most-popular scorer (training counts), with the same masking."""
    counts = np.zeros(data.n_items, dtype=np.float64)
    for seq in data.train_seqs:
        np.add.at(counts, np.asarray(seq, dtype=np.int64) - 1, 1.0)
    # A tiny index-based tie-break keeps ranks deterministic without favouring the target.
    scores_row = torch.from_numpy(counts - np.arange(data.n_items) * 1e-9)
    _, seqs, targets = data.eval_inputs(split)
    ranks = []
    for start in range(0, len(seqs), 1024):
        chunk = seqs[start:start + 1024]
        width = max(1, max(len(s) for s in chunk))
        batch = torch.from_numpy(pad_sequences(chunk, width))
        scores = scores_row[None].expand(len(chunk), -1)
        target = torch.from_numpy(np.asarray(targets[start:start + 1024], dtype=np.int64))
        ranks.append(_target_ranks(scores, batch, target))
    return torch.cat(ranks).numpy()


# Training -----------------------------------------------------------------


def selection_users(data: SplitData, protocol: Protocol) -> np.ndarray | None:
    """Indices of evaluated users scored for step selection (None: all of them)."""
    n_eval = len(data.evaluated_users)
    if protocol.select_users is None or protocol.select_users >= n_eval:
        return None
    rng = np.random.default_rng(20240917)
    return np.sort(rng.choice(n_eval, protocol.select_users, replace=False))


class _BatchSource:
    """Seeded mini-batches of a SyntheticSet, hard ids or soft rows."""

    def __init__(self, synthetic: SyntheticSet, max_len: int, batch_size: int, generator: torch.Generator):
        self.kind = synthetic.kind
        if self.kind == "hard":
            ids = synthetic.hard.astype(np.int64)
            # Keep the last max_len + 1 ids so every input position has a target.
            self.data = torch.from_numpy(ids[:, -(max_len + 1):])
        else:
            self.data = synthetic.soft_probs()[:, -(max_len + 1):]
        self.batch_size = min(batch_size, len(self.data))
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(len(self.data), generator=self.generator)])
        index, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        return self.data[index]


def _warn_on_mode_mismatch(synthetic: SyntheticSet, protocol: Protocol) -> None:
    """Log a warning when a set was distilled under another encoder mode than the protocol's."""
    mode = synthetic.meta.get("encoder_mode")
    if mode is None:
        return
    top_k = synthetic.meta.get("top_k", protocol.top_k)
    if mode != protocol.encoder_mode or (mode == "tune-top-k" and top_k != protocol.top_k):
        logger.warning(
            "synthetic set was distilled with encoder_mode=%r (top_k=%s) but the protocol trains the "
            "evaluation learner with encoder_mode=%r (top_k=%d); set both to the same mode",
            mode, top_k, protocol.encoder_mode, protocol.top_k,
        )


@dataclass
class TrainResult:
    """Outcome of one evaluation learner's training."""

    model: TextSASRec
    best_step: int
    best_valid: dict[str, float]
    history: list[dict]
    train_s: float


def train_on_set(
    synthetic: SyntheticSet,
    data: SplitData,
    text_vectors: torch.Tensor,
    protocol: Protocol,
    seed: int,
    *,
    progress: bool = True,
    valid_users: np.ndarray | None = None,
    encoder: EncoderConfig | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train a fresh learner on ``synthetic`` and keep the best validation step.

    ``valid_users`` restricts step selection to a subset of evaluated users
    (used by the validation probe of methods); by default all are scored.
    ``encoder`` and ``cache_dir`` are read only in "tune-top-k" mode, where
    ``bench.topk.train_on_set_top_k`` trains the learner.
    """
    if synthetic.n_items != data.n_items:
        raise ConfigError(
            f"synthetic set covers {synthetic.n_items} items but the dataset has {data.n_items}"
        )
    if synthetic.n_sequences == 0:
        raise ConfigError("synthetic set has no sequences; nothing to train on")

    if valid_users is None:
        valid_users = selection_users(data, protocol)
    _warn_on_mode_mismatch(synthetic, protocol)
    if protocol.encoder_mode == "tune-top-k":
        from bench.topk import train_on_set_top_k

        return train_on_set_top_k(
            synthetic, data, text_vectors, protocol, seed,
            progress=progress, valid_users=valid_users, encoder=encoder, cache_dir=cache_dir,
        )

    torch.manual_seed(seed)
    model = TextSASRec(text_vectors, protocol.learner)
    generator = torch.Generator().manual_seed(seed + 1)
    source = _BatchSource(synthetic, protocol.learner.max_len, protocol.batch_size, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        batch = source.next()
        return (model.hard_loss(batch) if source.kind == "hard" else model.soft_loss(batch)), {}

    return fit_with_validation(model, optimizer, step_loss, data, protocol, seed, valid_users,
                               desc=f"train seed {seed}", progress=progress)


def fit_with_validation(
    model: TextSASRec,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[int], tuple[torch.Tensor, dict]],
    data: SplitData,
    protocol: Protocol,
    seed: int,
    valid_users: np.ndarray | None,
    *,
    desc: str,
    progress: bool,
) -> TrainResult:
    """Train ``model`` for up to ``protocol.max_steps`` steps and restore its best validation state.

    Validation is scored every ``protocol.eval_every`` steps and at the last
    step. Training stops after ``protocol.patience`` scores without a new best.

    Args:
        step_loss: maps the 1-based step to its training loss and extra fields
            that the history records at scored steps.
        valid_users: indices of evaluated users scored (None: all of them).
        desc: label of the progress bar.

    Raises:
        FloatingPointError: if a training loss is NaN or infinite.
    """
    start = time.perf_counter()
    best_state, best_step, best_valid, best_score = None, 0, {}, -1.0
    history, stale = [], 0
    bar = progress_bar(total=protocol.max_steps, desc=desc, enabled=progress)
    model.train()
    for step in range(1, protocol.max_steps + 1):
        loss, extra = step_loss(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step} (seed {seed})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        if step % protocol.eval_every and step != protocol.max_steps:
            continue
        ranks = rank_split(model, data, "valid", protocol.eval_batch_size, users=valid_users)
        valid = metrics_from_ranks(ranks, protocol.ks)
        history.append({"step": step, "loss": loss.item(), protocol.select_metric: valid[protocol.select_metric],
                        **extra})
        bar.set_postfix(loss=f"{loss.item():.3f}", valid=f"{valid[protocol.select_metric]:.4f}")
        if valid[protocol.select_metric] > best_score:
            best_state = copy.deepcopy(model.state_dict())
            best_step, best_valid, best_score, stale = step, valid, valid[protocol.select_metric], 0
        else:
            stale += 1
        if progress and bar.disable:
            # Without a terminal the bar is hidden, so a log file still shows how far training got.
            logger.info("%s: step %d/%d, loss %.4f, valid %s %.4f (best %.4f at step %d)", desc, step,
                        protocol.max_steps, loss.item(), protocol.select_metric, valid[protocol.select_metric],
                        best_score, best_step)
        if stale >= protocol.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_step, best_valid, history, time.perf_counter() - start)


def evaluate_set(
    synthetic: SyntheticSet,
    data: SplitData,
    text_vectors: torch.Tensor,
    protocol: Protocol,
    seed: int,
    *,
    progress: bool = True,
    encoder: EncoderConfig | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Train on ``synthetic`` with ``seed``, then score the test split once.

    ``encoder`` and ``cache_dir`` are passed to :func:`train_on_set` (read in
    "tune-top-k" mode only).

    Returns:
        dict with ``valid`` and ``test`` metric dicts, ``best_step``,
        ``history``, ``train_s`` and the evaluated-user description.
    """
    result = train_on_set(
        synthetic, data, text_vectors, protocol, seed, progress=progress, encoder=encoder, cache_dir=cache_dir
    )
    test = metrics_from_ranks(rank_split(result.model, data, "test", protocol.eval_batch_size), protocol.ks)
    return {
        "valid": result.best_valid,
        "test": test,
        "best_step": result.best_step,
        "history": result.history,
        "train_s": result.train_s,
        "users": data.describe_evaluation(),
    }


def evaluate_popularity(data: SplitData, protocol: Protocol) -> dict:
    """Score the most-popular reference on validation and test."""
    return {
        "valid": metrics_from_ranks(popularity_ranks(data, "valid"), protocol.ks),
        "test": metrics_from_ranks(popularity_ranks(data, "test"), protocol.ks),
        "users": data.describe_evaluation(),
    }
