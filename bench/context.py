"""What a method receives besides the training view: seeds, device, meter, cache.

Expensive shared inputs (item text vectors, the expert trajectory, sequence
representations) are built lazily, once per dataset, and their cost is
recorded as amortised, apart from the method's own cost.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.data.types import SplitData
from bench.expert import ExpertConfig, ExpertTrajectory, build_expert, train_sequences
from bench.learner import LearnerConfig, pad_sequences
from bench.profiling import CostMeter
from bench.text import EncoderConfig, encode_items

logger = logging.getLogger(__name__)


def derive_seed(seed: int, *names: str) -> int:
    """A 63-bit seed derived from ``seed`` and names, independent of call order."""
    text = "/".join([str(seed), *names]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class SharedCache:
    """Lazily built inputs shared by every method on one dataset.

    Attributes:
        data: the full split; methods never receive it, only derived values.
        encoder: text encoder config.
        learner: learner architecture (the expert uses it too).
        expert_config: schedule of the expert trajectory.
        cache_dir: folder for on-disk caches.
    """

    data: SplitData
    encoder: EncoderConfig
    learner: LearnerConfig
    expert_config: ExpertConfig
    cache_dir: Path
    amortised: dict[str, dict] = field(default_factory=dict)
    _text: torch.Tensor | None = None
    _text_report: dict | None = None
    _expert: ExpertTrajectory | None = None
    _representations: np.ndarray | None = None

    def text_vectors(self) -> torch.Tensor:
        """Item text vectors ``(n_items, d)``; row j is internal id j + 1."""
        if self._text is None:
            start = time.perf_counter()
            vectors, report = encode_items(self.data.item_texts, self.encoder, cache_dir=self.cache_dir)
            self._text = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
            self._text_report = report
            self.amortised["encode"] = {
                "wall_s": time.perf_counter() - start,
                "cache_hit": bool(report.get("cache_hit")),
                "encode_s": report.get("encode_s"),
            }
        return self._text

    @property
    def text_report(self) -> dict:
        self.text_vectors()
        return self._text_report or {}

    @property
    def text_identity(self) -> str:
        """Hash of the encoder config and the dataset content the vectors come from."""
        from bench.config import config_dict, stable_hash

        return stable_hash({"encoder": config_dict(self.encoder), "texts": self.data.fingerprint})

    def expert(self) -> ExpertTrajectory:
        """The expert trajectory (built and cached on first use)."""
        if self._expert is None:
            start = time.perf_counter()
            self._expert = build_expert(
                self.data, self.text_vectors(), self.learner, self.expert_config, self.cache_dir, self.text_identity
            )
            self.amortised["expert"] = {
                "wall_s": time.perf_counter() - start,
                "build_s": self._expert.build_s,
                "epochs": self._expert.epochs,
                "best_epoch": self._expert.best_epoch,
            }
        return self._expert

    def sequence_representations(self) -> np.ndarray:
        """Last-position hidden state of every training sequence under the best expert.

        Rows align with ``TrainView.train_seqs``; sequences of one item get
        their single-item state.
        """
        if self._representations is None:
            start = time.perf_counter()
            model = self.expert().model(self.text_vectors())
            seqs = self.data.train_seqs
            out = []
            with torch.no_grad():
                item_emb = model.item_embeddings()
                for begin in range(0, len(seqs), 2048):
                    batch = torch.from_numpy(pad_sequences(seqs[begin:begin + 2048], self.learner.max_len))
                    out.append(model.last_hidden(batch, item_emb).numpy())
            self._representations = np.concatenate(out).astype(np.float32)
            self.amortised["representations"] = {"wall_s": time.perf_counter() - start}
        return self._representations


@dataclass
class MethodContext:
    """Everything a method may use besides the training view.

    Attributes:
        seed: the cell's seed; use :meth:`torch_generator` / :meth:`numpy_rng`.
        device: torch device string.
        meter: cost meter; call ``meter.check()`` in long loops.
        cache: shared inputs (text vectors, expert trajectory, representations).
        probe: validation probe: trains and scores a short evaluation learner
            on a candidate set and returns validation NDCG@10. Its cost is
            charged to the method. None when unavailable.
    """

    seed: int
    device: str
    meter: CostMeter
    cache: SharedCache
    probe: Callable | None = None

    def torch_generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, name))

    def numpy_rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.seed, name))

    def train_matrix(self) -> np.ndarray:
        """Training sequences with at least two items, left-padded."""
        return train_sequences(self.cache.data)
