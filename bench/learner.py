"""Text-based SASRec: the learner every method's data is judged by.

Item ``j`` has a frozen text vector ``t_j``. A trainable adapter (linear map and
layer norm) gives its embedding ``e_j``, used both as input embedding and as
output scoring vector: ``score(j) = <h_t, e_j>`` (tied embeddings). A stack of
causal self-attention blocks with learned positions maps the input sequence to
hidden states ``h_t``.

Sequences are left-padded with internal id 0, which is never a real item, so
the last column always holds the most recent item. Hard input looks up
``e_j``; a soft row ``p`` enters as ``sum_j p(j) e_j``. Both go through the same
encoder and scoring code, so real and distilled data share one path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import check_range

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerConfig:
    """Architecture of the text-based SASRec learner.

    Attributes:
        hidden: width of item embeddings and hidden states (SASRec uses 50-64).
        layers: number of self-attention blocks (1-2 in SASRec).
        heads: attention heads per block.
        dropout: dropout rate on embeddings, attention and feed-forward output.
        max_len: longest input sequence; longer inputs keep their last items.
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50

    def __post_init__(self) -> None:
        where = "learner"
        check_range(where, "hidden", self.hidden, low=1)
        check_range(where, "layers", self.layers, low=1)
        check_range(where, "heads", self.heads, low=1)
        check_range(where, "dropout", self.dropout, low=0.0, high=0.9)
        check_range(where, "max_len", self.max_len, low=2)
        if self.hidden % self.heads:
            from bench.errors import ConfigError

            raise ConfigError(
                f"learner: hidden={self.hidden} must be divisible by heads={self.heads}"
            )


class _Block(nn.Module):
    """Pre-norm self-attention block with a position-wise feed-forward layer."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        shape = (b, length, self.heads, hidden // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, length, hidden)))
        return x + self.drop(self.ff(self.norm2(x)))


class TextSASRec(nn.Module):
    """SASRec over adapted text vectors with tied input and output embeddings.

    Args:
        text_vectors: ``(n_items, d_text)`` float tensor; row ``j`` belongs to
            internal id ``j + 1``. Stored as a buffer and never trained here.
        config: the architecture.
    """

    def __init__(self, text_vectors: torch.Tensor, config: LearnerConfig = LearnerConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("text", torch.as_tensor(text_vectors, dtype=torch.float32))
        hidden = config.hidden
        self.adapter = nn.Sequential(nn.Linear(self.text.shape[1], hidden), nn.LayerNorm(hidden))
        self.positions = nn.Embedding(config.max_len, hidden)
        self.blocks = nn.ModuleList(
            _Block(hidden, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(config.dropout)

    @property
    def n_items(self) -> int:
        return int(self.text.shape[0])

    # Item side ------------------------------------------------------------

    def item_embeddings(self, items: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """Return ``e_j`` for 0-based item indices ``items`` (all items if None).

        ``text`` replaces the stored text vectors, for encoders whose top
        layers are trained.
        """
        source = self.text if text is None else text
        if items is not None and text is None:
            source = source[items]
        return self.adapter(source)

    # Sequence side --------------------------------------------------------

    def _attention_mask(self, pad: torch.Tensor) -> torch.Tensor:
        """Causal mask that also hides padded keys; each query sees itself."""
        length = pad.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=pad.device).tril()
        keys = ~pad[:, None, None, :]
        eye = torch.eye(length, dtype=torch.bool, device=pad.device)
        return (causal & keys) | eye

    def encode(self, inputs: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Map input embeddings ``(B, L, H)`` to hidden states ``(B, L, H)``.

        ``pad`` is True at padded positions; their inputs are zeroed and their
        outputs are meaningless.
        """
        length = inputs.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        position_ids = torch.arange(self.config.max_len - length, self.config.max_len, device=inputs.device)
        x = inputs * math.sqrt(self.config.hidden) + self.positions(position_ids)[None]
        x = self.drop(x) * (~pad)[..., None]
        mask = self._attention_mask(pad)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def embed_hard(self, seqs: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """Look up inputs for internal ids ``(B, L)``; id 0 maps to a zero vector."""
        table = torch.cat([item_emb.new_zeros(1, item_emb.shape[1]), item_emb], dim=0)
        return table[seqs]

    def embed_soft(self, probs: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """Mix item embeddings by probability rows ``(B, L, K)`` over ``K`` items."""
        return probs @ item_emb

    def hidden_hard(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of left-padded id sequences."""
        item_emb = self.item_embeddings() if item_emb is None else item_emb
        seqs = trim_padding(seqs)
        return self.encode(self.embed_hard(seqs, item_emb), seqs == 0)

    def last_hidden(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position hidden state ``(B, H)`` of left-padded id sequences."""
        return self.hidden_hard(seqs, item_emb)[:, -1]

    # Losses ---------------------------------------------------------------

    def hard_loss(self, seqs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-item cross-entropy over non-padded positions of ``(B, L)`` ids.

        Input is ``seqs[:, :-1]`` and the target ``seqs[:, 1:]``. Only positions
        with a real target are scored, which keeps the full-catalogue output
        layer (the dominant cost on CPU) off padding.
        """
        item_emb = self.item_embeddings() if item_emb is None else item_emb
        seqs = trim_padding(seqs)
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        hidden = self.encode(self.embed_hard(inputs, item_emb), inputs == 0)
        keep = (targets > 0) & (inputs > 0)
        if not bool(keep.any()):
            return hidden.sum() * 0.0
        logits = hidden[keep] @ item_emb.T
        return F.cross_entropy(logits, targets[keep].long() - 1)

    def soft_loss(self, probs: torch.Tensor, item_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Mean soft cross-entropy of next rows for probability sequences ``(B, L, K)``."""
        item_emb = self.item_embeddings() if item_emb is None else item_emb
        inputs, targets = probs[:, :-1], probs[:, 1:]
        pad = torch.zeros(inputs.shape[:2], dtype=torch.bool, device=probs.device)
        hidden = self.encode(self.embed_soft(inputs, item_emb), pad)
        log_probs = torch.log_softmax(hidden @ item_emb.T, dim=-1)
        return -(targets * log_probs).sum(-1).mean()


def trim_padding(seqs: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row.

    Positions are counted from the right, so the result encodes identically
    and costs less attention and feed-forward work.
    """
    used = (seqs > 0).any(dim=0).nonzero()
    first = int(used[0]) if len(used) else seqs.shape[1] - 1
    return seqs[:, first:]


def pad_sequences(seqs, max_len: int) -> np.ndarray:
    """Left-pad id sequences into an ``(n, max_len)`` int64 matrix, keeping the last ids."""
    matrix = np.zeros((len(seqs), max_len), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = np.asarray(seq, dtype=np.int64)[-max_len:]
        if len(tail):
            matrix[row, max_len - len(tail):] = tail
    return matrix
