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

from secfedtl.errors import ConfigError, ModelError
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


def test_scatternet_features_are_fixed_per_example_and_only_the_head_trains() -> None:
    pytest.importorskip("kymatio")
    from secfedtl.transfer import split_head

    net = source_model.ScatterNet(feature_scale=3.0)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert net.head.in_features == 81 * 7 * 7
    assert not net.head.weight.any() and not net.head.bias.any()
    images = np.random.default_rng(2).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    backbone, head = split_head(net, "head")
    backbone.eval()
    feats = backbone(source_model.to_inputs(images))
    torch.testing.assert_close(feats.norm(dim=1), torch.full((6,), 3.0))
    torch.testing.assert_close(head(feats), net(source_model.to_inputs(images)))
    # per example: an example's features do not depend on the other rows of its batch
    torch.testing.assert_close(backbone(source_model.to_inputs(images[2:3])), feats[2:3], atol=1e-5, rtol=1e-5)
    # the transform reads pixels in [0, 1]: undoing to_inputs' normalisation gives kymatio's own
    # scattering of the raw pixels, group-normalised
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    raw = torch.from_numpy(images).float().div(255).unsqueeze(1)
    s = ScatteringTorch2D(J=2, shape=(28, 28), L=8)(raw).reshape(6, 81, 7, 7)
    want = torch.nn.functional.group_norm(s, 27).flatten(1)
    torch.testing.assert_close(feats, 3.0 * want / want.norm(dim=1, keepdim=True), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="feature scale"):
        source_model.ScatterNet(feature_scale=0.0)


def test_scatternet_job_trains_a_head_on_cached_scattering_features(tmp_path: Path, monkeypatch) -> None:
    """``[model] backbone = "scatternet"`` through the generic in-process runner: the source is the
    wavelet transform (no weights file is read), the features are cached in batches of 1024,
    every round ok, every ledger certified; an unknown backbone is refused."""
    pytest.importorskip("kymatio")
    from secfedtl.privacy.audit import audit_ledger
    from secfedtl.runtime.local import run_job

    fashion_job, config = _tiny_job(tmp_path, monkeypatch)
    monkeypatch.setenv("FASHION_MNIST_WEIGHTS", str(tmp_path / "missing.pth"))  # never read
    data = config.to_dict()
    data["model"]["backbone"] = "scatternet"
    config = fashion_job.FashionConfig.from_mapping(data)
    source = fashion_job.FASHION.build_source(config)
    assert source.feature_batch_size == 1024 and source.model.head.in_features == 3969
    metrics = run_job(fashion_job.FASHION, config, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    for name in config["job"]["clients"]:
        assert audit_ledger(tmp_path / "state" / name / "ledger.jsonl").certified
    data["model"]["backbone"] = "resnet"
    with pytest.raises(ConfigError, match="backbone must be one of"):
        fashion_job.FashionConfig.from_mapping(data)


def test_scatternet_dp_centring_with_distributed_noise(tmp_path: Path, monkeypatch) -> None:
    """``[model] centre_epsilon > 0`` is FASHION_CENTRED: every client releases its noisy sum of
    unit ScatterNet features first (charged to its ledger before the training steps, which are
    calibrated after it), the source's centring layer takes the server's mean, and the training
    steps are distributed noise; every ledger certified within the budget. The centre reaches the
    model the clients train (the source info says so)."""
    pytest.importorskip("kymatio")
    from secfedtl.privacy.audit import audit_ledger
    from secfedtl.privacy.ledger import read_verified_ledger, spent_events
    from secfedtl.runtime.local import run_job

    fashion_job, config = _tiny_job(tmp_path, monkeypatch)
    data = config.to_dict()
    data["model"].update(backbone="scatternet", centre_epsilon=0.5, feature_scale=10.0)
    data["privacy"].update(noise="distributed")
    config = fashion_job.FashionConfig.from_mapping(data)
    job, code = fashion_job.job_for(config)
    assert job is fashion_job.FASHION_CENTRED and code == "fashion_job:FASHION_CENTRED"
    with pytest.raises(ConfigError, match="does not centre"):
        run_job(fashion_job.FASHION, config, tmp_path / "wrong", state_dir=tmp_path / "wrong-state", progress=False)
    metrics = run_job(job, config, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    assert metrics["server"]["preparation"]["status"] == "ok"
    assert metrics["server"]["source"]["centred"] is True
    for name in config["job"]["clients"]:
        path = tmp_path / "state" / name / "ledger.jsonl"
        report = audit_ledger(path)
        assert report.certified and 0 < report.clients[0].epsilon <= 3.0
        kinds = [type(ev).__name__ for _, ev, _ in spent_events(read_verified_ledger(path)[0])[name]]
        assert kinds[0] == "PoissonGaussianEvent" and set(kinds[1:]) == {"PoissonSkellamEvent"}
    bad = dict(data, model={**data["model"], "backbone": "mnist_cnn"})
    with pytest.raises(ConfigError, match="only the scatternet backbone"):
        fashion_job.FashionConfig.from_mapping(bad)
    bad = dict(data, model={**data["model"], "centre_epsilon": 3.0})
    with pytest.raises(ConfigError, match="part of the budget"):
        fashion_job.FashionConfig.from_mapping(bad)


def test_declared_records_are_a_round_figure_of_the_fit_size() -> None:
    run = _load("run")
    assert run.declared_records(2729, 500) == 2500
    assert run.declared_records(2751, 500) == 3000
    assert run.declared_records(120, 500) == 500  # never below one grid step
    assert run.declared_records(87, 10) == 90


def test_missing_or_wrong_data_is_one_line_before_any_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch) -> None:
    """No apt: the user points --data-dir at the four IDX files; a folder without them, or files
    that are not the published release, is one line on stderr and exit 2, before --out exists."""
    from secfedtl.data.fashion_mnist import ZALANDO_URL

    run = _load("run")
    for key in ("FASHION_MNIST_DIR", "FASHION_MNIST_WEIGHTS", "FASHION_MNIST_SKIP_CHECKSUMS", "PYTHONPATH"):
        monkeypatch.delenv(key, raising=False)  # the script sets them for its nodes; undone after the test
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    argv = ["--out", str(out), "--no-progress", "--data-dir", str(data), "--rounds", "1"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fashion_mnist: error: ") and "Traceback" not in err
    assert "train-images-idx3-ubyte" in err and ZALANDO_URL in err and "--data-dir" in err
    assert not out.exists()
    _synthetic_data(data)  # present, but not the published files
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err and not out.exists()


def test_run_end_to_end_on_synthetic_data(tmp_path: Path, capsys, monkeypatch) -> None:
    from secfedtl.privacy.audit import audit_ledger
    from secfedtl.privacy.ledger import entry_view

    run = _load("run")
    data = tmp_path / "data"
    data.mkdir()
    _synthetic_data(data)
    torch.manual_seed(0)
    torch.save(source_model.MnistCNN().state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out"
    argv = ["--rounds", "2", "--clients", "3", "--alpha", "1.0", "--epsilon", "3", "--out", str(out),
            "--no-progress", "--data-dir", str(data), "--weights", str(tmp_path / "w.pth"),
            "--batch-size", "32", "--lr", "5", "--epochs", "1", "--declared-grid", "10"]
    for key in ("FASHION_MNIST_DIR", "FASHION_MNIST_WEIGHTS", "FASHION_MNIST_SKIP_CHECKSUMS", "PYTHONPATH"):
        monkeypatch.delenv(key, raising=False)  # the script sets them for its nodes; undone after the test
    assert run.main(argv) == 2  # synthetic files are not the published ones: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256" in err[0] and not out.exists()
    argv.append("--skip-checksums")
    assert run.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    server, sim = metrics["server"], metrics["simulation_only"]
    assert len(server["rounds"]) == 2 and all(r["status"] == "ok" for r in server["rounds"])
    # What the server received carries no accuracy and no exact count: its total weight is the
    # sum of the declared (round) counts.
    assert not any("accuracy" in key for r in server["rounds"] for key in r)
    declared = metrics["declared_records"]
    assert all(r["total_weight"] == sum(declared.values()) for r in server["rounds"])
    assert all(v % 10 == 0 for v in declared.values())
    assert {n: abs(declared[n] - sim["client_sizes"][n]) <= 5 for n in declared} == {n: True for n in declared}
    assert sim["client_sizes"] != declared  # 2 of 3 synthetic clients' sizes are not multiples of 10
    # The mechanism follows the declaration, not the private size.
    for name, count in declared.items():
        assert metrics["mechanism"]["sample_rate"][name] == pytest.approx(32 / count)
    assert all(0 < e <= 3.0 for e in sim["final"]["epsilon"].values())
    assert 0.0 <= sim["final"]["test_accuracy"] <= 1.0
    assert (out / "report.png").stat().st_size > 0
    # One persistent privacy state per client (the example's throwaway folder inside --out), each
    # ledger certified by `secfedtl audit`, every entry carrying the declaration and the job id.
    assert sorted(p.name for p in (out / "privacy-state").iterdir()) == sorted(declared)
    for name, count in declared.items():
        ledger = out / "privacy-state" / name / "ledger.jsonl"
        assert sim["ledgers"][name] == str(ledger)
        assert ledger.stat().st_mode & 0o077 == 0
        report = audit_ledger(ledger)
        assert report.certified and [c.client for c in report.clients] == [name]
        assert report.clients[0].epsilon == pytest.approx(sim["final"]["epsilon"][name])
        entries = [entry_view(e) for e in verify_ledger(ledger)]
        assert len(entries) == 2 * 2  # a pending and a complete entry per round
        pending = [e for e in entries if e["status"] == "pending"]
        assert all(e["declaration"] == {"records": count, "participation": True} for e in pending)
        assert all(e["params"]["public_dataset_size"] == count and e["randomness"] == "csprng" for e in pending)
        assert {e["job_id"] for e in pending} == {metrics["job_id"]}
    # The budget belongs to the clients' data, not to one run: a second run on the same states
    # continues their budgets (the first run spent nearly all of it), so its noise is calibrated
    # for what is left and the total stays within the budget.
    assert run.main(argv) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert second["job_id"] != metrics["job_id"]
    for name in declared:
        assert second["mechanism"]["noise_multiplier"][name] > 10 * metrics["mechanism"]["noise_multiplier"][name]
        report = audit_ledger(out / "privacy-state" / name / "ledger.jsonl")
        assert report.certified and report.clients[0].entries == 4  # two jobs, two rounds each
        assert sim["final"]["epsilon"][name] < report.clients[0].epsilon <= 3.0


def _tiny_job(tmp_path: Path, monkeypatch, *, rounds: int = 2):
    """The example's FederatedJob on synthetic IDX files, and a job file for it."""
    fashion_job = _load("fashion_job")
    data = tmp_path / "data"
    data.mkdir()
    _synthetic_data(data)
    torch.manual_seed(0)
    torch.save(source_model.MnistCNN().state_dict(), tmp_path / "w.pth")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(data))
    monkeypatch.setenv("FASHION_MNIST_WEIGHTS", str(tmp_path / "w.pth"))
    monkeypatch.setenv("FASHION_MNIST_SKIP_CHECKSUMS", "1")
    names = fashion_job.client_names(3)
    config = fashion_job.FashionConfig.from_mapping({
        "job": {"dataset": "fashion_mnist", "source": "mnist", "clients": names, "rounds": rounds, "seed": 0},
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        "declared": {"records": dict.fromkeys(names, 80)},
        "model": {"alpha": 1.0},
        "training": {"lr": 5.0, "expected_batch_size": 32, "max_grad_norm": 1.0},
        "secagg": {"clip": 10.0, "max_samples": 80}})
    return fashion_job, config


def test_the_server_never_hears_an_evaluation(tmp_path: Path, monkeypatch) -> None:
    """The job's nodes keep what they evaluate: the server hears a bare status, never a score."""
    from secfedtl.runtime.local import build_job

    fashion_job, config = _tiny_job(tmp_path, monkeypatch)
    local = build_job(fashion_job.FASHION, config, tmp_path / "out", state_dir=tmp_path / "state")
    try:
        answers = local.federation.query("evaluate", round=0)
        assert {n: a["status"] for n, a in answers.items()} == dict.fromkeys(config["job"]["clients"], "done")
        assert all(set(a) == {"status"} for a in answers.values())
        assert local.federation.run_round().status == "ok"
        for name, hospital in local.hospitals.items():  # the score stayed at the client
            assert 0.0 <= hospital.reports.read("evaluate", 0)["accuracy"]["validation"] <= 1.0
    finally:
        local.close()


def test_the_example_is_a_federated_job_run_in_process(tmp_path: Path, monkeypatch) -> None:
    """The same description `secfedtl node --job fashion_job:FASHION` runs, through the generic
    in-process runner: every round ok, every ledger certified, epsilon within the budget."""
    from secfedtl.privacy.audit import audit_ledger
    from secfedtl.runtime.local import run_job

    fashion_job, config = _tiny_job(tmp_path, monkeypatch)
    metrics = run_job(fashion_job.FASHION, config, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    # the clients hold no test rows: the pooled test accuracy is null, and the files are strict JSON
    for name in ("metrics.json", "simulation_rounds.json"):
        def no_nan(token: str) -> None:
            raise AssertionError(f"{name} holds {token}")
        json.loads((tmp_path / "out" / name).read_text(), parse_constant=no_nan)
    assert metrics["simulation_only"]["final"]["pooled_test_accuracy"] is None
    final = metrics["simulation_only"]["final"]
    assert all(0 < e <= 3.0 for e in final["epsilon"].values())
    for name in config["job"]["clients"]:
        assert audit_ledger(tmp_path / "state" / name / "ledger.jsonl").certified


def test_user_errors_are_one_line_before_anything_is_created(tmp_path: Path, capsys) -> None:
    run = _load("run")
    out = tmp_path / "out"
    for extra, words in ((["--epsilon", "0"], "--epsilon"), (["--epsilon", "-1"], "--epsilon"),
                         (["--data-dir", str(tmp_path / "nowhere")], "--data-dir"),
                         (["--centre-epsilon", "0.5"], "only --backbone scatternet"),
                         (["--backbone", "scatternet", "--centre-epsilon", "3"], "part of the budget"),
                         (["--backbone", "scatternet", "--centre-epsilon", "0.5", "--flower", "local"], "--flower")):
        assert run.main(["--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not out.exists()


@pytest.mark.flower
def test_the_example_runs_on_flower(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("flwr")
    from secfedtl.runtime.deploy import run_local

    fashion_job, config = _tiny_job(tmp_path, monkeypatch)
    monkeypatch.setenv("PYTHONPATH", ":".join(filter(None, [str(EXAMPLE), *sys.path])))
    job_file = tmp_path / "job.toml"
    job_file.write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(job_file, tmp_path / "flower", simulation=True, phase_timeout=120.0,
                        job_code="fashion_job:FASHION", timeout=900)
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    for name in config["job"]["clients"]:
        ledger = tmp_path / "flower" / "hospitals" / name / "privacy" / name / "ledger.jsonl"
        assert len(verify_ledger(ledger)) == 4  # a pending and a complete entry per round


def test_whitebox_audit_of_the_example_on_synthetic_data(tmp_path: Path) -> None:
    # examples/fashion_mnist/audit.py: gradient canaries in one client's DP-SGD through the
    # example's own run, both one-run bounds next to that client's ledger epsilon.
    audit = _load("audit")
    data = tmp_path / "data"
    data.mkdir()
    _synthetic_data(data)
    torch.manual_seed(0)
    torch.save(source_model.MnistCNN().state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out"
    argv = ["--rounds", "2", "--clients", "3", "--alpha", "1.0", "--epsilon", "3", "--out", str(out),
            "--no-progress", "--data-dir", str(data), "--weights", str(tmp_path / "w.pth"), "--skip-checksums",
            "--batch-size", "32", "--lr", "5", "--epochs", "1", "--declared-grid", "10", "--no-reference",
            "--canaries", "200", "--audit-client", "client01"]
    assert audit.main(argv) == 0
    report = json.loads((out / "audit.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert report["client"] == "client01" and report["adversary"] == "whitebox" and report["canaries"] == 200
    # every DP-SGD step of that client was observed, with the ledger's public parameters
    steps = metrics["mechanism"]["local_steps"]["client01"] * 2
    assert report["steps_or_rounds_observed"] == steps
    assert report["sample_rate"] == pytest.approx(metrics["mechanism"]["sample_rate"]["client01"])
    assert report["ledger_epsilon"] == pytest.approx(metrics["simulation_only"]["final"]["epsilon"]["client01"])
    assert not report["violation"] and 0 <= report["bound"]["epsilon_lower"] <= report["ledger_epsilon"]
    assert report["fdp_gaussian"]["epsilon_lower"] >= 0 and report["fdp_gaussian"]["ledger_mu"] > 0
    assert len(report["scores"]["in"]) + len(report["scores"]["out"]) == 200
    assert (out / "audit.png").stat().st_size > 0


def test_whitebox_audit_refuses_a_privacy_state_it_would_continue(tmp_path: Path) -> None:
    # The audit compares its lower bound with this run's ledger epsilon, and its canaries must never
    # be charged to a state that outlives it: it runs only on a fresh throwaway state in <out>.
    from secfedtl.errors import ConfigError

    audit = _load("audit")
    with pytest.raises(ConfigError, match="throwaway"):
        audit.main(["--out", str(tmp_path / "a"), "--state-dir", str(tmp_path / "real-state"), "--no-progress"])
    (tmp_path / "b" / "privacy-state").mkdir(parents=True)
    with pytest.raises(ConfigError, match="earlier"):
        audit.main(["--out", str(tmp_path / "b"), "--no-progress"])


def test_central_dp_simulation_screens_settings_on_validation(tmp_path: Path, capsys) -> None:
    """The tuning script runs on cached features (synthetic here: ten separable classes) and
    reports validation accuracy; it learns the classes at a generous epsilon."""
    sim = _load("central_dp_sim")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3000) % 10
    x = torch.nn.functional.one_hot(y, 16).float() + 0.1 * torch.randn(3000, 16, generator=g)
    torch.save({"x": x / x.norm(dim=1, keepdim=True), "y": y}, tmp_path / "cache.pt")
    sim.main(["--cache", str(tmp_path / "cache.pt"), "--fit", "2500", "--batch", "500", "--epochs", "5",
              "--epsilon", "50", "--lr", "2", "--centre-epsilon", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "validation accuracy" in ln]
    assert lines and float(lines[-1].split()[-1]) > 0.9


def test_the_job_files_validation_fraction_decides_the_split(tmp_path: Path, monkeypatch) -> None:
    """``[job] validation_fraction`` is what each client holds out (it was once ignored: the data
    always held out 10 % while config.json said 20 %); a record's side depends on it alone."""
    fashion_job, config = _tiny_job(tmp_path, monkeypatch)
    sizes = {}
    for fraction in (0.1, 0.4):
        data = config.to_dict()
        data["job"]["validation_fraction"] = fraction
        shares = fashion_job.splits(fashion_job.FashionConfig.from_mapping(data))
        val = sum(len(s.y_val) for s in shares)
        sizes[fraction] = (val, val + sum(len(s.y_fit) for s in shares))
    assert sizes[0.1][1] == sizes[0.4][1] == 300
    assert 10 <= sizes[0.1][0] <= 55 and 85 <= sizes[0.4][0] <= 155
