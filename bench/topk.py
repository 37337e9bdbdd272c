"""Item text for learners whose encoder's top k layers are trained (``tune-top-k``).

This module owns the item side of the two encoder modes:

* ``FrozenItemText``: the cached text vectors, read by index (``frozen``).
* ``TunedItemText``: cached lower-layer token states finished by trainable
  copies of the encoder's top k layers (``tune-top-k``). A training step encodes
  only the items it requests, and ``all_vectors`` encodes the catalogue in chunks.
* ``sample_items`` and ``local_ids``: the item subset of one training step
  (the step's own items united with uniformly drawn ones) and the remapping of
  internal ids to columns of that subset.
* ``TunedTextSASRec`` and ``train_on_set_top_k``: the evaluation learner of the
  ``tune-top-k`` protocol. Training steps compute item vectors only for a
  sampled subset, so that a step costs the same on any catalogue size.
  Validation and test scoring encode every item once per evaluation, without
  gradients.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from bench.config import config_dict
from bench.errors import ConfigError
from bench.learner import LearnerConfig, TextSASRec
from bench.text import EncoderConfig, LowerLayerCache, TopLayers, encode_lower_layers

if TYPE_CHECKING:
    from bench.data.types import SplitData
    from bench.evaluator import Protocol, TrainResult
    from bench.synthetic import SyntheticSet

logger = logging.getLogger(__name__)

ENCODER_MODES = ("frozen", "tune-top-k")

# Uniformly drawn items added to each training step's own items (chosen: the
# 512 of the FOSTER paper's subset sampling, so both sides use the same size).
TRAIN_SUBSET_SIZE = 512
# A soft training row contributes its most probable items to the step's subset
# (chosen: enough to carry most of the mass of a peaked row while keeping the
# subset of a 128-sequence batch near a few thousand items).
SOFT_ROW_ITEMS = 8
# Adam learning rate of the trained encoder layers (chosen: the usual range of
# BERT fine-tuning is 1e-5 to 5e-5; the protocol's 1e-3 would overwrite them).
TOP_LAYER_LR = 2e-5
# Titles per TopLayers forward pass when every item is encoded. It changes
# memory, not results.
ENCODE_CHUNK = 512
# A request for more items than this is encoded in chunks whose activations are
# recomputed in the backward pass (about 22 KB per token and layer otherwise, so
# 12 GB for all 16,874 games titles at 32 tokens). Same gradients, one more forward.
CHECKPOINT_ABOVE = 2048

_LOWER_MEMO: OrderedDict[tuple, LowerLayerCache] = OrderedDict()
_LOWER_MEMO_SIZE = 2


def check_encoder_mode(where: str, mode: str, top_k: int) -> None:
    """Raise ConfigError for an unknown encoder mode or a top_k below 1.

    Args:
        where: name of the config, used in the message.
        mode: "frozen" or "tune-top-k".
        top_k: number of trained top encoder layers (checked against the model
            by ``TopLayers``).

    Raises:
        ConfigError: on an unknown mode or a top_k that is not a positive integer.
    """
    if mode not in ENCODER_MODES:
        raise ConfigError(
            f"{where}: invalid encoder_mode={mode!r}; use one of {', '.join(repr(m) for m in ENCODER_MODES)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"{where}: invalid top_k={top_k!r}; it must be an integer >= 1")


# Item text ------------------------------------------------------------------


class FrozenItemText:
    """Cached text vectors ``(n_items, d)``; row ``j`` is internal id ``j + 1``."""

    def __init__(self, text_vectors: torch.Tensor) -> None:
        self.text = torch.as_tensor(text_vectors, dtype=torch.float32)

    @property
    def n_items(self) -> int:
        return int(self.text.shape[0])

    def vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Return the text vectors of 0-based item indices ``items``."""
        return self.text[items]

    def all_vectors(self) -> torch.Tensor:
        """Return every item's text vector (the cached tensor itself)."""
        return self.text


class TunedItemText(torch.nn.Module):
    """Item vectors from cached lower-layer token states and trainable top layers.

    Args:
        lower: token states of every item after the lower encoder layers.
        top_layers: trainable copies of the top k layers, built for the same
            top_k and encoder config as ``lower``.

    Raises:
        ConfigError: if ``lower`` was built for another top_k.
    """

    def __init__(self, lower: LowerLayerCache, top_layers: TopLayers) -> None:
        super().__init__()
        if lower.top_k and lower.top_k != top_layers.top_k:
            raise ConfigError(
                f"lower-layer cache was built for top_k={lower.top_k} but the top layers have "
                f"top_k={top_layers.top_k}; build both with the same top_k"
            )
        # A plain attribute: the cache is input data, not state to save or copy.
        self.lower = lower
        self.top_layers = top_layers

    @property
    def n_items(self) -> int:
        return int(self.lower.hidden.shape[0])

    def vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Encode 0-based item indices ``items`` through the top layers.

        Gradients flow to the top layers when grad mode is on. Requests above
        ``CHECKPOINT_ABOVE`` items run in chunks of ``ENCODE_CHUNK`` with
        activation checkpointing, so memory stays bounded on a full catalogue.
        """
        if len(items) <= CHECKPOINT_ABOVE or not torch.is_grad_enabled():
            return self._encode(items)
        chunks = [
            checkpoint(self._encode, items[start:start + ENCODE_CHUNK], use_reentrant=False)
            for start in range(0, len(items), ENCODE_CHUNK)
        ]
        return torch.cat(chunks)

    def _encode(self, items: torch.Tensor) -> torch.Tensor:
        return self.top_layers(self.lower.hidden[items], self.lower.attention_mask[items])

    def all_vectors(self, chunk: int = ENCODE_CHUNK) -> torch.Tensor:
        """Encode every item in chunks of ``chunk`` titles, without gradients."""
        out = []
        with torch.no_grad():
            for start in range(0, self.n_items, chunk):
                out.append(self._encode(torch.arange(start, min(start + chunk, self.n_items))))
        return torch.cat(out) if out else torch.zeros(0, 0)


def _texts_key(texts) -> str:
    digest = hashlib.sha256(len(texts).to_bytes(8, "little"))
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def lower_layers(
    texts, top_k: int, config: EncoderConfig, *, max_tokens: int = 32, cache_dir: Path | None = None
) -> LowerLayerCache:
    """Return the lower-layer token states of ``texts``, memoised within the process.

    The memo key is the titles, top_k, the effective token cap
    ``min(config.max_length, max_tokens)`` and the other encoder settings, so a
    method and the evaluation learner of one run share one cache. At most two
    caches are kept (each is about 830 MB for the 16,874 games titles).

    Args:
        texts: one title per item, in item order.
        top_k: number of top layers left to ``TopLayers``.
        config: encoder settings.
        max_tokens: cap on tokens per title.
        cache_dir: on-disk cache root passed to ``encode_lower_layers`` (None: no file).

    Returns:
        The cache, tensors on the CPU.

    Raises:
        ConfigError: invalid top_k, max_tokens or encoder settings.
    """
    settings = config_dict(config)
    settings["max_length"] = min(config.max_length, max_tokens)
    settings.pop("batch_size")
    key = (_texts_key(list(texts)), top_k, tuple(sorted(settings.items())))
    if key in _LOWER_MEMO:
        _LOWER_MEMO.move_to_end(key)
        return _LOWER_MEMO[key]
    start = time.perf_counter()
    cache = encode_lower_layers(texts, top_k, config, max_tokens=max_tokens, cache_dir=cache_dir)
    logger.info(
        "lower-layer token states of %d items for top_k=%d ready in %.1f s",
        len(cache.hidden), top_k, time.perf_counter() - start,
    )
    _LOWER_MEMO[key] = cache
    while len(_LOWER_MEMO) > _LOWER_MEMO_SIZE:
        _LOWER_MEMO.popitem(last=False)
    return cache


# Item subsets ---------------------------------------------------------------


def sample_items(
    n_items: int, n_random: int, required: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``n_random`` distinct items uniformly and unite them with ``required``.

    While ``n_random`` is at most half the catalogue, the draw repeats
    ``randint`` and drops duplicates, so its cost does not grow with
    ``n_items``. Larger draws take the head of one permutation.

    Args:
        n_items: catalogue size.
        n_random: items to draw uniformly without replacement, 0..n_items.
        required: 0-based item indices that must be in the subset.
        generator: source of the draw.

    Returns:
        Sorted unique 0-based item indices (int64).

    Raises:
        ConfigError: if ``n_random`` is outside 0..n_items.
    """
    if not 0 <= n_random <= n_items:
        raise ConfigError(
            f"cannot draw {n_random} distinct items from a catalogue of n_items={n_items}; "
            f"use a subset size of at most {n_items}"
        )
    if 2 * n_random <= n_items:
        drawn = torch.zeros(0, dtype=torch.long)
        while len(drawn) < n_random:
            extra = torch.randint(0, n_items, (2 * (n_random - len(drawn)),), generator=generator)
            # unique() sorts; keep the first-drawn order so the draw stays uniform.
            merged = torch.cat([drawn, extra])
            _, first = np.unique(merged.numpy(), return_index=True)
            drawn = merged[torch.from_numpy(np.sort(first))][:n_random]
    else:
        drawn = torch.randperm(n_items, generator=generator)[:n_random]
    return torch.unique(torch.cat([drawn, required.reshape(-1).long()]))


def local_ids(seqs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Map internal ids (0 = padding) to 1-based columns of the sorted subset ``items``.

    Every non-padding id must be in ``items``; padding stays 0.
    """
    positions = torch.searchsorted(items, (seqs - 1).clamp_min(0)) + 1
    return torch.where(seqs > 0, positions, torch.zeros_like(positions))


# Evaluation learner ---------------------------------------------------------


class TunedTextSASRec(TextSASRec):
    """``TextSASRec`` whose item text comes from trainable top encoder layers.

    ``item_embeddings(items)`` encodes only the given items; with no items it
    encodes the whole catalogue in chunks (call it under ``torch.no_grad``).
    The inherited ``text`` buffer keeps the frozen vectors and is not read.

    Args:
        text_vectors: frozen text vectors ``(n_items, d)``.
        config: learner architecture.
        item_text: the trainable item encoder; it becomes a submodule, so its
            layers are saved, copied and trained with the learner.
    """

    def __init__(self, text_vectors: torch.Tensor, config: LearnerConfig, item_text: TunedItemText) -> None:
        super().__init__(text_vectors, config)
        self.item_text = item_text

    def item_embeddings(self, items: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """Return ``e_j`` of 0-based ``items`` (all items if None), or of the given ``text``."""
        if text is not None:
            return self.adapter(text)
        if items is None:
            return self.adapter(self.item_text.all_vectors())
        return self.adapter(self.item_text.vectors(items))


def _step_loss(model: TunedTextSASRec, batch: torch.Tensor, kind: str, generator: torch.Generator):
    """Loss of one training batch over the step's item subset."""
    n_items = model.n_items
    if kind == "hard":
        used = batch[batch > 0] - 1
        items = sample_items(n_items, min(TRAIN_SUBSET_SIZE, n_items), used, generator)
        return model.hard_loss(local_ids(batch, items), model.item_embeddings(items)), len(items)
    top = batch.topk(min(SOFT_ROW_ITEMS, n_items), dim=-1).indices
    items = sample_items(n_items, min(TRAIN_SUBSET_SIZE, n_items), top, generator)
    rows = batch[..., items]
    # NOTE: rows are renormalised over the subset, so mass on items outside it
    # is dropped; this approximates the full-catalogue soft loss.
    rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)
    return model.soft_loss(rows, model.item_embeddings(items)), len(items)


def train_on_set_top_k(
    synthetic: "SyntheticSet",
    data: "SplitData",
    text_vectors: torch.Tensor,
    protocol: "Protocol",
    seed: int,
    *,
    progress: bool = True,
    valid_users: np.ndarray | None = None,
    encoder: EncoderConfig | None = None,
    cache_dir: Path | None = None,
) -> "TrainResult":
    """Train a fresh ``TunedTextSASRec`` on ``synthetic`` and keep the best validation step.

    Step selection, patience and scoring follow ``bench.evaluator.train_on_set``.
    Each step encodes only its subset: the batch's items (hard batches) or each
    row's ``SOFT_ROW_ITEMS`` most probable items (soft batches), united with
    ``TRAIN_SUBSET_SIZE`` uniformly drawn items. The top layers train with Adam
    at ``TOP_LAYER_LR``, the rest of the learner at ``protocol.lr``.

    Args:
        synthetic: the set to train on.
        data: the full split (validation users select the step).
        text_vectors: frozen text vectors, kept in the learner's ``text`` buffer.
        protocol: the evaluation protocol with ``encoder_mode="tune-top-k"``.
        seed: seed of the learner's initialisation and batch order.
        progress: show a progress bar on a terminal.
        valid_users: indices of evaluated users scored for step selection.
        encoder: encoder settings of the lower-layer cache (default ``EncoderConfig()``).
        cache_dir: on-disk cache root of the lower-layer token states.

    Returns:
        The trained learner (best validation step), its step, metrics and history.

    Raises:
        ConfigError: on a protocol not in tune-top-k mode or an invalid top_k.
        FloatingPointError: if a training loss is NaN or infinite.
    """
    from bench.evaluator import _BatchSource, fit_with_validation

    if protocol.encoder_mode != "tune-top-k":
        raise ConfigError(
            f"train_on_set_top_k needs protocol encoder_mode='tune-top-k', got {protocol.encoder_mode!r}"
        )
    encoder = encoder or EncoderConfig()
    lower = lower_layers(data.item_texts, protocol.top_k, encoder, cache_dir=cache_dir)

    torch.manual_seed(seed)
    item_text = TunedItemText(lower, TopLayers(protocol.top_k, encoder))
    model = TunedTextSASRec(text_vectors, protocol.learner, item_text)
    generator = torch.Generator().manual_seed(seed + 1)
    subset_generator = torch.Generator().manual_seed(seed + 2)
    source = _BatchSource(synthetic, protocol.learner.max_len, protocol.batch_size, generator)
    encoder_params = list(item_text.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    other_params = [p for p in model.parameters() if id(p) not in encoder_ids]
    optimizer = torch.optim.Adam(
        [{"params": other_params, "lr": protocol.lr}, {"params": encoder_params, "lr": TOP_LAYER_LR}],
        weight_decay=protocol.weight_decay,
    )

    subset_total = 0

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        nonlocal subset_total
        loss, n_subset = _step_loss(model, source.next(), source.kind, subset_generator)
        subset_total += n_subset
        return loss, {"mean_subset_items": subset_total / step}

    return fit_with_validation(model, optimizer, step_loss, data, protocol, seed, valid_users,
                               desc=f"train top-{protocol.top_k} seed {seed}", progress=progress)
