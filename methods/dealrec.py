"""``dealrec``: influence- and effort-scored coreset with coverage-enhanced stratified sampling.

Source: Lin, Wang, Li, Yang, Feng, Wei and Chua, "Data-efficient Fine-tuning for
LLM-based Recommendation" (SIGIR 2024). Its abstract, public summaries of it and
the authors' released pruning code were read; defaults marked "released" come
from that code.

The paper's method, in our words. A surrogate recommender is trained on all
training samples. Let ``g_s`` be the loss gradient of sample ``s`` at the
trained surrogate parameters and ``H`` the Hessian of the empirical risk. By
influence functions, removing ``s`` from ``n`` training samples moves the
parameters by about ``H^-1 g_s / n``. The empirical risk then changes by about
``I(s) = g_s^T H^-1 v / n``, with ``v`` the summed (here: mean) training gradient.
Because ``H`` is symmetric, one inverse-Hessian-vector product ``H^-1 v`` serves
every sample, so ``I(s)`` costs one dot product per sample. A large ``I(s)``
marks a sample whose removal hurts. ``H^-1 v`` is estimated with the LiSSA recursion
``h <- v + (1 - damping) h - H h / scale`` from stochastic Hessian-vector
products, which converges to ``scale (H + damping scale I)^-1 v``. The effort
score ``E(s) = ||grad L_target(s)||`` is the gradient norm of the target model's
loss on ``s``: it ranks samples by how much the target model must change to fit
them, which covers the gap between surrogate and target. Both scores are
min-max normalised and combined as ``I + lambda E``. Coverage-enhanced
selection then drops the ``hard_prune`` fraction with the highest combined
score and splits the remaining score range into ``strata`` equal-width strata.
It repeatedly visits the stratum with the fewest samples and draws
``min(size, remaining budget // strata left)`` samples from it uniformly at
random, so that every score level stays represented.

Roles here. The **surrogate** is a small :class:`TextSASRec` (hidden
``surrogate_hidden``, ``surrogate_layers`` blocks) trained inside ``distill`` for
``surrogate_steps`` Adam steps on all eligible training sequences; its cost is
this method's. The **target learner** is the evaluation learner's architecture
as stored in the expert trajectory: the expert checkpoint of ``effort_epoch``
gives the effort score.

Where this code departs from the paper:

- A sample is one user's training sequence truncated to its last ``seq_len``
  items (what the coreset would contain), and its loss is the mean next-item
  cross-entropy over the full catalogue at every position. The paper's sample
  is one history with its next item, and the target model is an LLM.
- Scores are computed for a uniform random subset of at most ``max_candidates``
  eligible sequences (the paper scores all samples), and ``v`` and the Hessian
  are estimated on that subset. Selection draws only from it.
- Both gradients are taken with respect to one weight matrix: the attention
  output projection of the last self-attention block, of the surrogate for the
  influence score and of the expert for the effort score. The released code
  also restricts the influence score to one attention output weight, and its
  effort score uses the LLM's last LoRA layer, which our learner lacks.
  Per-sequence gradients of that matrix come from one batched backward pass:
  for a linear layer, a sequence's gradient is the sum over its positions of
  the outer product of output gradient and input.
- The surrogate's loss, in training, in its per-sequence gradients and in
  LiSSA, is a sampled softmax over each position's target and
  ``surrogate_negatives`` shared uniform items (fresh per training step, fixed
  for scoring); the released surrogate also uses sampled negatives, one per
  position with a binary loss. The effort score uses the full catalogue.
- LiSSA uses mini-batches of ``lissa_batch_size`` candidate sequences per
  Hessian-vector product and ``lissa_depth`` steps (the released code uses one
  sample per step and 5,000 steps), and one repetition.
- The surrogate is trained for a fixed, small number of steps (the released
  code allows 200 epochs), so the influence estimate is taken away from a
  minimum of the training loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import check_range
from bench.context import derive_seed
from bench.errors import ConfigError
from bench.learner import LearnerConfig, TextSASRec, pad_sequences, trim_padding
from bench.method import Method
from bench.progress import progress_bar
from bench.registry import register
from methods.coresets import selected_set
from methods.random_subset import eligible_users

logger = logging.getLogger(__name__)


# Per-sequence losses and gradients ------------------------------------------


def sequence_losses(
    model: TextSASRec,
    seqs: torch.Tensor,
    item_emb: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute each sequence's mean next-item cross-entropy.

    Args:
        model: the learner.
        seqs: ``(B, L)`` left-padded internal ids; every row needs two items.
        item_emb: embeddings of all items for the full-catalogue loss
            (default: the model's); ignored when ``negatives`` is given.
        negatives: ``(K,)`` internal ids. If given, each position's softmax runs
            over its target and these shared negatives only (sampled softmax).
            A negative equal to the target is masked out. Only the embeddings
            of items in the batch and of the negatives are computed.

    Returns:
        ``(B,)`` losses, each averaged over that sequence's positions with a target.
    """
    seqs = trim_padding(seqs)
    if negatives is None:
        item_emb = model.item_embeddings() if item_emb is None else item_emb
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        hidden = model.encode(model.embed_hard(inputs, item_emb), inputs == 0)
        keep = (targets > 0) & (inputs > 0)
        losses = F.cross_entropy(hidden[keep] @ item_emb.T, targets[keep] - 1, reduction="none")
    else:
        # Map the ids in use to rows 1..U of a local embedding table (0 stays padding).
        items = torch.unique(torch.cat([seqs[seqs > 0], negatives]))
        local = torch.zeros(model.n_items + 1, dtype=torch.long)
        local[items] = torch.arange(1, len(items) + 1)
        table = model.item_embeddings(items - 1)
        inputs, targets = local[seqs[:, :-1]], seqs[:, 1:]
        hidden = model.encode(model.embed_hard(inputs, table), inputs == 0)
        keep = (targets > 0) & (inputs > 0)
        kept_hidden, kept_targets = hidden[keep], targets[keep]
        positive = (kept_hidden * table[local[kept_targets] - 1]).sum(dim=1, keepdim=True)
        negative = kept_hidden @ table[local[negatives] - 1].T
        negative = negative.masked_fill(negatives[None, :] == kept_targets[:, None], float("-inf"))
        losses = torch.logsumexp(torch.cat([positive, negative], dim=1), dim=1) - positive[:, 0]
    rows = keep.nonzero()[:, 0]
    totals = losses.new_zeros(len(seqs)).index_add(0, rows, losses)
    return totals / keep.sum(dim=1).clamp(min=1)


def gradient_layer(model: TextSASRec) -> nn.Linear:
    """Return the attention output projection of the model's last block."""
    return model.blocks[-1].out


def iter_sequence_gradients(
    model: TextSASRec,
    seqs: torch.Tensor,
    batch_size: int,
    meter=None,
    desc: str = "gradients",
    negatives: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield per-sequence gradients of :func:`gradient_layer`'s weight, one batch at a time.

    The model runs in eval mode, so sequences in a batch do not interact and
    the output gradient of the summed batch loss splits exactly by sequence.

    Args:
        model: the learner; switched to eval mode.
        seqs: ``(n, L)`` left-padded ids, each row with at least two items.
        batch_size: sequences per backward pass.
        meter: cost meter checked once per batch (None: unchecked).
        desc: progress bar label.
        negatives: shared negatives of a sampled-softmax loss (None: full
            catalogue); see :func:`sequence_losses`.

    Yields:
        ``(b, out * in)`` float tensors, the flattened weight gradient of each
        sequence's mean loss, in the order of ``seqs``.
    """
    model.eval()
    layer = gradient_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def keep_io(module, inputs, output):
        captured["input"], captured["output"] = inputs[0], output

    handle = layer.register_forward_hook(keep_io)
    bar = progress_bar(total=len(seqs), desc=desc, unit="seq")
    try:
        item_emb = None
        if negatives is None:
            with torch.no_grad():
                item_emb = model.item_embeddings()
        for begin in range(0, len(seqs), batch_size):
            if meter is not None:
                meter.check()
            losses = sequence_losses(model, seqs[begin:begin + batch_size], item_emb, negatives)
            (output_grad,) = torch.autograd.grad(losses.sum(), captured["output"])
            grads = torch.einsum("blo,bli->boi", output_grad, captured["input"].detach())
            bar.update(len(grads))
            yield grads.reshape(len(grads), -1)
    finally:
        handle.remove()
        bar.close()


def sequence_gradient_norms(model: TextSASRec, seqs: torch.Tensor, batch_size: int, meter=None) -> np.ndarray:
    """Return the L2 norm of each sequence's gradient from :func:`iter_sequence_gradients`."""
    blocks = iter_sequence_gradients(model, seqs, batch_size, meter, desc="gradient norms")
    return torch.cat([grads.norm(dim=1) for grads in blocks]).numpy().astype(np.float64)


# Influence ------------------------------------------------------------------


def lissa_inverse_hvp(
    model: TextSASRec,
    vector: torch.Tensor,
    seqs: torch.Tensor,
    *,
    depth: int,
    batch_size: int,
    damping: float,
    scale: float,
    generator: torch.Generator,
    negatives: torch.Tensor | None = None,
    meter=None,
) -> tuple[torch.Tensor, float]:
    """Estimate ``(H + damping * scale * I)^-1 vector`` by the LiSSA recursion.

    ``H`` is the Hessian, with respect to :func:`gradient_layer`'s weight, of
    the mean per-sequence loss. Each step estimates ``H h`` on a batch of
    ``seqs`` drawn with replacement, or on all of them if ``batch_size`` is at
    least ``len(seqs)``.

    Args:
        model: the trained surrogate (eval mode).
        vector: flattened ``(out * in,)`` right-hand side.
        seqs: ``(n, L)`` sequences the Hessian batches are drawn from.
        depth: recursion steps.
        batch_size: sequences per Hessian-vector product.
        damping: added to the Hessian's diagonal, relative to ``scale``.
        scale: divides the Hessian; must exceed its largest eigenvalue for convergence.
        generator: draws the batches.
        negatives: shared negatives of a sampled-softmax loss (None: full
            catalogue); see :func:`sequence_losses`.
        meter: cost meter checked once per step (None: unchecked).

    Returns:
        The estimate and the relative change of the last step (a convergence check).

    Raises:
        ConfigError: if the recursion diverges (non-finite values), with the fix.
    """
    model.eval()
    weight = gradient_layer(model).weight
    estimate = vector.clone()
    change = float("nan")
    for step in range(1, depth + 1):
        if meter is not None:
            meter.check()
        if batch_size >= len(seqs):
            batch = seqs
        else:
            batch = seqs[torch.randint(len(seqs), (batch_size,), generator=generator)]
        loss = sequence_losses(model, batch, negatives=negatives).mean()
        (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
        (hvp,) = torch.autograd.grad((grad.reshape(-1) * estimate).sum(), weight)
        with torch.no_grad():
            updated = vector + (1.0 - damping) * estimate - hvp.reshape(-1) / scale
        if not bool(torch.isfinite(updated).all()):
            raise ConfigError(
                f"dealrec: the LiSSA recursion diverged at step {step} with lissa_scale={scale}; "
                f"raise lissa_scale (it must exceed the Hessian's largest eigenvalue)"
            )
        change = float((updated - estimate).norm() / updated.norm().clamp(min=1e-12))
        estimate = updated
        if step % 25 == 0 or step == depth:
            logger.info("dealrec LiSSA step %d/%d: |h| %.4g, relative change %.3g", step, depth,
                        float(estimate.norm()), change)
    return estimate / scale, change


def influence_scores(
    surrogate: TextSASRec,
    seqs: torch.Tensor,
    config: "DEALRec.Config",
    generator: torch.Generator,
    negatives: torch.Tensor | None = None,
    meter=None,
) -> tuple[np.ndarray, float]:
    """Score each sequence by the estimated rise of the empirical risk if it were removed.

    Args:
        surrogate: the trained surrogate.
        seqs: ``(n, L)`` candidate sequences; they also define the empirical risk.
        config: LiSSA and batch settings.
        generator: draws the LiSSA batches.
        negatives: shared negatives of the surrogate's sampled-softmax loss
            (None: full catalogue).
        meter: cost meter checked in the loops (None: unchecked).

    Returns:
        ``(n,)`` scores ``g_s . (H + damping scale I)^-1 v`` and the LiSSA
        relative change of its last step.
    """
    blocks = iter_sequence_gradients(surrogate, seqs, config.gradient_batch_size, meter,
                                     desc="influence gradients", negatives=negatives)
    grads = torch.cat(list(blocks))
    mean_grad = grads.mean(dim=0)
    inverse_hvp, change = lissa_inverse_hvp(
        surrogate, mean_grad, seqs, depth=config.lissa_depth, batch_size=config.lissa_batch_size,
        damping=config.lissa_damping, scale=config.lissa_scale, generator=generator, negatives=negatives,
        meter=meter,
    )
    return (grads @ inverse_hvp).numpy().astype(np.float64), change


# Coverage-enhanced sampling --------------------------------------------------


def min_max_normalise(values: np.ndarray) -> np.ndarray:
    """Rescale values to [0, 1]. A constant array maps to zeros."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return (values - low) / (high - low)


def coverage_stratified_sample(
    scores: np.ndarray, n_select: int, strata: int, hard_prune: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``n_select`` indices by coverage-enhanced stratified sampling of ``scores``.

    Drops the ``hard_prune`` fraction with the highest scores (fewer if that
    would leave fewer than ``n_select``), splits the remaining score range
    into ``strata`` equal-width strata and repeatedly takes the non-empty
    stratum with the fewest members, drawing ``min(size, remaining // strata
    left)`` of them uniformly. This always fills the budget: the members left
    never fall below the budget left.

    Args:
        scores: ``(n,)`` combined scores.
        n_select: number of indices to draw.
        strata: number of equal-width score strata.
        hard_prune: fraction of the highest scores dropped first, in [0, 1).
        rng: generator of the draws.

    Returns:
        ``(n_select,)`` distinct indices into ``scores``.

    Raises:
        ValueError: if ``n_select`` exceeds ``len(scores)``.
    """
    n = len(scores)
    if not 1 <= n_select <= n:
        raise ValueError(f"cannot draw {n_select} of {n} scored sequences; request 1 to {n}")
    order = np.argsort(-scores, kind="stable")
    n_prune = min(math.floor(hard_prune * n), n - n_select)
    unpruned = order[n_prune:]

    low, high = float(scores[unpruned].min()), float(scores[unpruned].max())
    width = (high - low) / strata
    if width > 0:
        stratum = np.minimum(((scores[unpruned] - low) / width).astype(np.int64), strata - 1)
    else:
        stratum = np.zeros(len(unpruned), dtype=np.int64)
    groups = [unpruned[stratum == s] for s in range(strata)]
    groups = [g for g in groups if len(g)]

    chosen = []
    remaining = n_select
    while groups:
        # A stable sort by size keeps equal-size strata in score order.
        groups.sort(key=len)
        smallest = groups.pop(0)
        take = min(len(smallest), remaining // (len(groups) + 1))
        chosen.append(rng.choice(smallest, size=take, replace=False))
        remaining -= take
    picks = np.concatenate(chosen)
    assert remaining == 0, "stratified sampling left the budget unfilled"
    assert len(np.unique(picks)) == n_select, "stratified sampling drew an index twice"
    return picks


# Surrogate --------------------------------------------------------------------


def train_surrogate(
    text_vectors: torch.Tensor,
    learner: LearnerConfig,
    seqs: torch.Tensor,
    config: "DEALRec.Config",
    generator: torch.Generator,
    meter=None,
) -> tuple[TextSASRec, float]:
    """Train the small surrogate learner with Adam and a sampled softmax on random batches of ``seqs``.

    Call ``torch.manual_seed`` first: initialisation and dropout draw from the
    global generator.

    Args:
        text_vectors: ``(n_items, d)`` item text vectors.
        learner: the evaluation learner; the surrogate keeps its ``max_len``,
            ``heads`` and ``dropout`` and takes its width and depth from ``config``.
        seqs: ``(n, L)`` left-padded training sequences.
        config: surrogate size and schedule.
        generator: draws the batch order.
        meter: cost meter checked once per step (None: unchecked).

    Returns:
        The trained surrogate in eval mode and its last training loss.
    """
    heads = learner.heads if config.surrogate_hidden % learner.heads == 0 else 1
    surrogate_config = LearnerConfig(
        hidden=config.surrogate_hidden, layers=config.surrogate_layers, heads=heads,
        dropout=learner.dropout, max_len=learner.max_len,
    )
    model = TextSASRec(text_vectors, surrogate_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.surrogate_lr)
    model.train()
    order = torch.randperm(len(seqs), generator=generator)
    cursor = 0
    loss = torch.tensor(float("nan"))
    bar = progress_bar(total=config.surrogate_steps, desc="dealrec surrogate", unit="step")
    for step in range(1, config.surrogate_steps + 1):
        if meter is not None:
            meter.check()
        if cursor >= len(order):
            order, cursor = torch.randperm(len(seqs), generator=generator), 0
        batch = seqs[order[cursor:cursor + config.surrogate_batch_size]]
        cursor += config.surrogate_batch_size
        negatives = draw_negatives(model.n_items, config.surrogate_negatives, generator)
        loss = sequence_losses(model, batch, negatives=negatives).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        if step % 50 == 0 or step == config.surrogate_steps:
            logger.info("dealrec surrogate step %d/%d: loss %.4f", step, config.surrogate_steps, loss.item())
    bar.close()
    model.eval()
    return model, loss.item()


# Method -------------------------------------------------------------------------


def draw_negatives(n_items: int, count: int, generator: torch.Generator) -> torch.Tensor | None:
    """Draw ``count`` distinct internal ids uniformly; None (full catalogue) if ``count`` is 0 or covers every item."""
    if count == 0 or count >= n_items:
        return None
    return torch.randperm(n_items, generator=generator)[:count] + 1


def sample_candidates(users: np.ndarray, n_max: int, rng: np.random.Generator) -> np.ndarray:
    """Return all of ``users`` or a sorted uniform sample of ``n_max`` of them."""
    if len(users) <= n_max:
        return users
    return np.sort(rng.choice(users, size=n_max, replace=False))


def truncated_matrix(train, users: np.ndarray, length: int) -> torch.Tensor:
    """Left-padded ``(len(users), length)`` id tensor of each user's last ``length`` items."""
    return torch.from_numpy(pad_sequences([train.train_seqs[u] for u in users], length))


def target_learner(context, epoch: int, where: str) -> TextSASRec:
    """Load the expert checkpoint of ``epoch`` (0: the best epoch) as the target learner.

    Raises:
        ConfigError: if the trajectory has fewer than ``epoch`` epochs.
    """
    expert = context.cache.expert()
    if epoch > expert.epochs:
        raise ConfigError(
            f"{where}: the expert trajectory has {expert.epochs} epochs, so epoch {epoch} does not exist; "
            f"choose an epoch from 0 (best) to {expert.epochs}"
        )
    return expert.model(context.cache.text_vectors(), epoch or None)


@register("dealrec")
class DEALRec(Method):
    """Influence (surrogate) plus effort (target) scores, then coverage-enhanced stratified sampling."""

    family = "coreset"
    version = "1"
    needs_expert = True
    test_overrides = {
        "max_candidates": 60, "surrogate_steps": 3, "surrogate_hidden": 16, "lissa_depth": 3,
        "lissa_batch_size": 8, "strata": 5, "gradient_batch_size": 32,
    }

    @dataclass(frozen=True)
    class Config:
        """DEALRec settings.

        Attributes:
            max_candidates: eligible sequences scored at most, drawn uniformly
                (chosen: bounds the full-catalogue scoring passes to minutes on
                two CPU cores; the paper scores every sample).
            surrogate_hidden: surrogate width (chosen: a small learner, as the
                paper's surrogate is small next to the target; the released
                surrogate SASRec uses 64).
            surrogate_layers: surrogate self-attention blocks (chosen: 1).
            surrogate_steps: surrogate Adam steps (chosen: 500 steps of 128
                sequences are about 1.3 passes over the 50k games sequences, a
                brief run next to the released code's 200 epochs).
            surrogate_batch_size: sequences per surrogate step (chosen: the
                harness's evaluation batch size, 128).
            surrogate_lr: surrogate Adam learning rate (released code: 0.001).
            surrogate_negatives: uniformly drawn items that replace the
                catalogue in the surrogate's softmax, 0 for the full catalogue
                (chosen: the surrogate's cost then does not grow with the
                catalogue. The released surrogate also trains on sampled
                negatives, one per position with a binary loss).
            lissa_depth: LiSSA recursion steps (chosen: 200 mini-batch steps;
                ``meta["lissa_relative_change"]`` records the last step's
                relative change as a convergence check; released code: 5,000
                one-sample steps).
            lissa_batch_size: sequences per Hessian-vector product (chosen:
                64, so that 200 steps see about 12,800 sequences).
            lissa_damping: LiSSA damping (released code: 0.01).
            lissa_scale: LiSSA Hessian scale (released code: 25).
            effort_weight: lambda, weight of the normalised effort score
                (released setting for Games: 0.3).
            effort_epoch: expert epoch that gives the effort score, 0 for the
                best epoch (chosen: 1, the checkpoint least adapted to the
                data, as the paper measures effort on the target model before
                fine-tuning).
            strata: number of equal-width score strata (released setting for Games: 50).
            hard_prune: fraction of the highest combined scores dropped before
                sampling (released code default: 0.1).
            gradient_batch_size: sequences per per-sequence-gradient pass
                (chosen; does not change results).
        """

        max_candidates: int = 5000
        surrogate_hidden: int = 32
        surrogate_layers: int = 1
        surrogate_steps: int = 500
        surrogate_batch_size: int = 128
        surrogate_lr: float = 1e-3
        surrogate_negatives: int = 1024
        lissa_depth: int = 200
        lissa_batch_size: int = 64
        lissa_damping: float = 0.01
        lissa_scale: float = 25.0
        effort_weight: float = 0.3
        effort_epoch: int = 1
        strata: int = 50
        hard_prune: float = 0.1
        gradient_batch_size: int = 128

        def __post_init__(self) -> None:
            where = "dealrec"
            check_range(where, "max_candidates", self.max_candidates, low=2)
            check_range(where, "surrogate_hidden", self.surrogate_hidden, low=1)
            check_range(where, "surrogate_layers", self.surrogate_layers, low=1)
            check_range(where, "surrogate_steps", self.surrogate_steps, low=1)
            check_range(where, "surrogate_batch_size", self.surrogate_batch_size, low=1)
            check_range(where, "surrogate_lr", self.surrogate_lr, low=0.0, low_open=True)
            check_range(where, "surrogate_negatives", self.surrogate_negatives, low=0)
            check_range(where, "lissa_depth", self.lissa_depth, low=1)
            check_range(where, "lissa_batch_size", self.lissa_batch_size, low=1)
            check_range(where, "lissa_damping", self.lissa_damping, low=0.0, high=1.0)
            check_range(where, "lissa_scale", self.lissa_scale, low=0.0, low_open=True)
            check_range(where, "effort_weight", self.effort_weight, low=0.0)
            check_range(where, "effort_epoch", self.effort_epoch, low=0)
            check_range(where, "strata", self.strata, low=1)
            check_range(where, "hard_prune", self.hard_prune, low=0.0, high=0.99)
            check_range(where, "gradient_batch_size", self.gradient_batch_size, low=1)

    @classmethod
    def search_space(cls, trial):
        return {
            "effort_weight": trial.suggest_float("effort_weight", 0.0, 2.0),
            "strata": trial.suggest_int("strata", 5, 100, log=True),
            "hard_prune": trial.suggest_float("hard_prune", 0.0, 0.3),
            "surrogate_steps": trial.suggest_int("surrogate_steps", 100, 1000, log=True),
        }

    def distill(self, train, budget, context):
        config = self.config
        users = eligible_users(train)
        budget.check_against(len(users))
        text = context.cache.text_vectors()
        learner = context.cache.learner
        timings = {}

        start = time.perf_counter()
        candidates = sample_candidates(users, max(config.max_candidates, budget.n_sequences),
                                       context.numpy_rng("dealrec-candidates"))
        scored = truncated_matrix(train, candidates, budget.seq_len)

        phase = time.perf_counter()
        torch.manual_seed(derive_seed(context.seed, "dealrec-surrogate"))
        surrogate, surrogate_loss = train_surrogate(
            text, learner, truncated_matrix(train, users, learner.max_len + 1), config,
            context.torch_generator("dealrec-surrogate-batches"), context.meter,
        )
        timings["surrogate_s"] = time.perf_counter() - phase

        # NOTE: influence functions assume parameters at a minimum of the training
        # loss. The briefly trained surrogate is not at one, so the scores are a rough ranking.
        phase = time.perf_counter()
        negatives = draw_negatives(train.n_items, config.surrogate_negatives,
                                   context.torch_generator("dealrec-negatives"))
        influence, lissa_change = influence_scores(
            surrogate, scored, config, context.torch_generator("dealrec-lissa"), negatives, context.meter
        )
        timings["influence_s"] = time.perf_counter() - phase

        phase = time.perf_counter()
        target = target_learner(context, config.effort_epoch, "dealrec effort_epoch")
        effort = sequence_gradient_norms(target, scored, config.gradient_batch_size, context.meter)
        timings["effort_s"] = time.perf_counter() - phase

        combined = min_max_normalise(influence) + config.effort_weight * min_max_normalise(effort)
        picks = coverage_stratified_sample(combined, budget.n_sequences, config.strata, config.hard_prune,
                                           context.numpy_rng("dealrec-strata"))
        selection_s = time.perf_counter() - start
        logger.info(
            "dealrec selected %d of %d candidates (%d eligible) in %.1f s: surrogate loss %.4f, "
            "LiSSA relative change %.3g", len(picks), len(candidates), len(users), selection_s,
            surrogate_loss, lissa_change,
        )
        meta = {
            "selection_s": selection_s,
            **timings,
            "candidates": int(len(candidates)),
            "surrogate_loss": surrogate_loss,
            "lissa_relative_change": lissa_change,
        }
        return selected_set(train, candidates[picks], budget, meta)
