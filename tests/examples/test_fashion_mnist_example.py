"""examples/fashion_mnist end to end on synthetic IDX files and a randomly initialised source CNN
(CI has neither the Debian data package nor digit-recognizer-py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from secfedtl.errors import ConfigError, DataError, ModelError
from secfedtl.privacy.ledger import verify_ledger

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fashion_mnist_example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
    return module


source_model = _load("source_model")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _synthetic_data(root: Path, n_train: int = 300, n_test: int = 50) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):  # a class-dependent bright square: learnable
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r: 10 + 10 * r, 2 + 5 * col: 6 + 5 * col] = 250
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)


def test_source_weights_load_safely_and_misfits_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = source_model.MnistCNN()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        got = source_model.load_mnist_cnn(tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    bad = dict(ref.state_dict())
    bad["fc_layers.2.weight"] = torch.zeros(9, 256)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="fc_layers.2.weight"):
        source_model.load_mnist_cnn(tmp_path / "bad.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError):
        source_model.load_mnist_cnn(tmp_path / "evil.pth")


def test_fashion_net_freezes_the_source_and_splits_at_the_head() -> None:
    from secfedtl.transfer import split_head

    source = source_model.MnistCNN()
    net = source_model.FashionNet(source, num_conv=2)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert all(p.requires_grad for p in source.parameters())  # the source itself is left alone
    assert net.head.in_features == 64 * 7 * 7
    x = source_model.to_inputs(np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8))
    backbone, head = split_head(net, "head")
    feats = backbone(x)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(head(feats), net(x))
    with pytest.raises(ModelError):
        source_model.FashionNet(source, num_conv=4)


def test_feature_scale_sets_the_norm_of_every_feature_vector() -> None:
    from secfedtl.transfer import split_head

    source = source_model.MnistCNN()
    x = source_model.to_inputs(np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    plain, _ = split_head(source_model.FashionNet(source), "head")
    scaled, _ = split_head(source_model.FashionNet(source, feature_scale=3.0), "head")
    torch.testing.assert_close(scaled(x).norm(dim=1), torch.full((4,), 3.0))
    torch.testing.assert_close(scaled(x), 3.0 * plain(x))  # the same direction, a fixed factor
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "3"):
        with pytest.raises(ConfigError, match="feature scale"):
            source_model.FashionNet(source, feature_scale=bad)


def test_run_end_to_end_on_synthetic_data(tmp_path: Path) -> None:
    run = _load("run")
    data = tmp_path / "data"
    data.mkdir()
    _synthetic_data(data)
    torch.manual_seed(0)
    torch.save(source_model.MnistCNN().state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out"
    argv = ["--rounds", "2", "--clients", "3", "--alpha", "1.0", "--epsilon", "3", "--out", str(out),
            "--no-progress", "--data-dir", str(data), "--weights", str(tmp_path / "w.pth"),
            "--batch-size", "32", "--lr", "5", "--epochs", "1"]
    with pytest.raises(DataError, match="SHA-256"):  # synthetic files are not the published ones
        run.main(argv)
    argv.append("--skip-checksums")
    assert run.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and all(r["status"] == "ok" for r in metrics["rounds"])
    assert all(0 < e <= 3.0 for e in metrics["final"]["epsilon"].values())
    assert 0.0 <= metrics["final"]["test_accuracy"] <= 1.0
    assert (out / "report.png").stat().st_size > 0
    entries = verify_ledger(out / "ledger.jsonl")
    assert len(entries) >= 2 * 3  # a charge per client per round, written before training
    with pytest.raises(ConfigError, match="ledger"):
        run.main(argv)  # never overwrites a ledger
