"""examples/radiology_reports' federation on synthetic reports and features (CI has neither MiniLM
nor the report archive): declared counts, persistent privacy states, charged centring, nothing
evaluated over the wire, ledgers certified, and the same mechanisms on neighbouring datasets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from secfedtl.data.radiology import Hospital, RadiologyData, TextSplit
from secfedtl.privacy.audit import audit_ledger
from secfedtl.privacy.ledger import entry_view, verify_ledger

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "radiology_reports"
DIM = 8


def _load_run():
    spec = importlib.util.spec_from_file_location("radiology_example_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
    return module


run = _load_run()


def _synthetic(sizes: dict[str, int], extra: int = 0) -> tuple[RadiologyData, dict[str, np.ndarray]]:
    """Four hospitals of reports ``CXR<n>`` with unit-norm features that carry the label along
    one direction (plus a common offset, as sentence embeddings have). ``extra`` more training
    reports for hospital_1: its neighbouring dataset."""
    rng = np.random.default_rng(0)
    features: dict[str, np.ndarray] = {}
    hospitals: dict[str, Hospital] = {}
    n = 0
    for h, (name, size) in enumerate(sizes.items()):
        splits = {}
        for split, count in (("train", size + (extra if h == 0 else 0)), ("validation", 20), ("test", 20)):
            ids, labels = [], []
            for _ in range(count):
                n += 1
                label = int(rng.random() < 0.6)
                v = rng.normal(0.0, 0.3, DIM) + np.eye(DIM)[0] * 2.0 + np.eye(DIM)[1] * (1.0 if label else -1.0)
                features[f"CXR{n}"] = (v / np.linalg.norm(v)).astype(np.float32)
                ids.append(f"CXR{n}")
                labels.append(label)
            splits[split] = TextSplit(texts=tuple(f"report {i}" for i in ids), labels=np.array(labels, dtype=np.int64),
                                      report_ids=tuple(ids))
        hospitals[name] = Hospital(name=name, **splits)
    data = RadiologyData(hospitals=hospitals, archive_sha256="0" * 64, num_reports=n, excluded={}, seed=0)
    return data, features


SIZES = {"hospital_1": 62, "hospital_2": 58, "hospital_3": 71, "hospital_4": 49}


def _args(out: Path, *extra: str):
    return run.parse_args(["--out", str(out), "--no-progress", "--no-reference", "--rounds", "2", "--epochs", "1",
                           "--batch-size", "16", "--declared-grid", "10", "--epsilon", "2", "--lr", "0.5", *extra])


@pytest.fixture
def synthetic_reports(monkeypatch):
    """run.py's job reads ``sizes``' synthetic reports and features (CI has neither the archive
    nor MiniLM); the node settings run.py exports are restored afterwards."""
    for key in ("PYTHONPATH", "RADIOLOGY_CACHE_DIR", "RADIOLOGY_ARCHIVE"):
        monkeypatch.setenv(key, "")

    def use(sizes: dict[str, int] = SIZES, extra: int = 0) -> None:
        synthetic = _synthetic(sizes, extra=extra)
        monkeypatch.setattr(run.radiology_job, "reports_and_features", lambda config: synthetic)

    return use


def test_declared_records_are_a_round_figure() -> None:
    assert run.declared_records(623, 50) == 600
    assert run.declared_records(626, 50) == 650
    assert run.declared_records(12, 50) == 50


def test_federation_on_synthetic_features(tmp_path: Path, synthetic_reports) -> None:
    """run.py's in-process default runs the job (radiology_job.py) through secfedtl.runtime.local."""
    synthetic_reports()
    metrics = run.run(_args(tmp_path / "out"))
    assert metrics["job_code"] == "radiology_job:RADIOLOGY" and metrics["transport"] == "in process"
    declared = metrics["declared_records"]
    assert declared == {"hospital_1": 60, "hospital_2": 60, "hospital_3": 70, "hospital_4": 50}
    # The server's view: round outcomes over masked sums, weights the declared counts, no accuracy.
    server_rounds = metrics["server"]["rounds"]
    assert [r["status"] for r in server_rounds] == ["ok", "ok"]
    assert all(r["total_weight"] == sum(declared.values()) for r in server_rounds)
    assert not any("accuracy" in key or "epsilon" in key for r in server_rounds for key in r)
    assert metrics["server"]["preparation"]["status"] == "ok"
    assert metrics["server"]["preparation"]["prepared"] == sorted(SIZES)
    # The experimenter's view (simulation only): exact accuracy, computed outside the protocol.
    sim = metrics["simulation_only"]
    last = sim["rounds"][-1]
    assert set(last["test_accuracy"]) == set(SIZES) and 0.0 <= last["pooled_test_accuracy"] <= 1.0
    assert sim["final"]["pooled_test_accuracy"] == pytest.approx(last["pooled_test_accuracy"])
    # The mechanism follows the declaration: sample rate 16 / declared, steps ceil(declared / 16).
    mechanism = metrics["mechanism"]
    for name in SIZES:
        assert mechanism["sample_rate"][name] == pytest.approx(16 / declared[name])
        assert mechanism["local_steps_per_round"][name] == -(-declared[name] // 16)
        assert mechanism["weight"][name] == declared[name]
    # One persistent state per hospital (the throwaway folder in --out), its ledger certified.
    assert metrics["privacy_state"]["directory"] == str(tmp_path / "out" / "privacy-state")
    for name, path in sim["ledgers"].items():
        assert Path(path) == tmp_path / "out" / "privacy-state" / name / "ledger.jsonl"
        report = audit_ledger(path)
        assert report.certified and sim["audit"][name]["certified"]
        assert [r.release for r in report.clients[0].releases] == ["feature_mean", "dpsgd_update", "dpsgd_update"]
        assert report.clients[0].epsilon <= 2.0 and sim["final"]["epsilon"][name] <= 2.0
        pending = [entry_view(e) for e in verify_ledger(path) if e["status"] == "pending"]
        assert all(e["declaration"] == {"records": declared[name], "participation": True} for e in pending)
        assert {e["job_id"] for e in pending} == {metrics["job_id"]}
    assert (tmp_path / "out" / "metrics.json").exists() and (tmp_path / "out" / "report.png").exists()


def test_an_evaluation_query_gets_no_score_back(tmp_path: Path, synthetic_reports) -> None:
    """A hospital scores its own splits and keeps the report: asked to evaluate, it answers the
    server with a status only."""
    from secfedtl.runtime.local import build_job

    synthetic_reports()
    args = _args(tmp_path / "out")
    config = run.job_config(args, {"hospital_1": 60, "hospital_2": 60, "hospital_3": 70, "hospital_4": 50}, DIM,
                            "radiology-test")
    job, _ = run.radiology_job.job_for(config)
    local = build_job(job, config, tmp_path / "run", workers=0, state_dir=tmp_path / "state")
    try:
        answers = local.federation.query("evaluate", round=5)
    finally:
        local.close()
    assert set(answers) == set(SIZES)
    assert not any("accuracy" in key or "loss" in key for a in answers.values() for key in a), answers


def test_the_same_mechanisms_on_neighbouring_datasets(tmp_path: Path, synthetic_reports) -> None:
    """hospital_1 with one training report more (add/remove neighbours): its declaration is the
    same round figure, so every ledger entry's mechanism is the same."""
    def mechanisms(extra: int, out: Path) -> list[dict]:
        synthetic_reports(extra=extra)
        metrics = run.run(_args(out))
        ledger = metrics["simulation_only"]["ledgers"]["hospital_1"]
        entries = [entry_view(e) for e in verify_ledger(ledger) if e["status"] == "pending"]
        return [{k: e[k] for k in ("sample_rate", "noise_multiplier", "steps", "delta", "release", "params",
                                   "declaration", "randomness")} for e in entries]

    assert mechanisms(0, tmp_path / "a") == mechanisms(1, tmp_path / "b")


def test_a_second_job_continues_the_hospitals_budgets(tmp_path: Path, synthetic_reports) -> None:
    """The states persist in --out: a second job on the same hospitals continues their budgets. At
    epsilon 2 the first job (one round) spent nearly all of it, so the second one is refused before
    anything runs or is charged."""
    from secfedtl.errors import ConfigError

    synthetic_reports()
    first = run.run(_args(tmp_path / "out", "--rounds", "1"))
    with pytest.raises(ConfigError, match="too little privacy budget left"):
        run.run(_args(tmp_path / "out"))
    for name in SIZES:  # the refused job charged nothing
        assert len(audit_ledger(first["simulation_only"]["ledgers"][name]).clients[0].releases) == 2


def test_distributed_noise_on_synthetic_features(tmp_path: Path, synthetic_reports) -> None:
    """``--noise distributed``: the centring release first, then one secure aggregation per DP-SGD
    step across hospitals (``--batch-size`` the expected batch across them), every step's Skellam
    share the one plan's, charged in every ledger; the ledgers compose within the budget."""
    synthetic_reports()
    metrics = run.run(_args(tmp_path / "out", "--noise", "distributed", "--batch-size", "40", "--bits", "24"))
    assert metrics["noise"] == "distributed" and metrics["job_code"] == "radiology_job:RADIOLOGY"
    declared = metrics["declared_records"]
    mechanism = metrics["mechanism"]
    steps = mechanism["steps_per_round"]
    assert mechanism["sample_rate"] == pytest.approx(40 / sum(declared.values()))  # the batch across hospitals
    assert steps == -(-sum(declared.values()) // 40) and mechanism["bits"] == 24
    assert mechanism["prior_events"] and mechanism["prior_events"][0]["mechanism"] == "poisson_gaussian"
    assert metrics["server"]["preparation"]["status"] == "ok"
    assert [(r["status"], r["steps_ok"]) for r in metrics["server"]["rounds"]] == [("ok", steps), ("ok", steps)]
    sim = metrics["simulation_only"]
    assert sim["final"]["epsilon_prv"] is None  # PRV has no figure for Skellam steps
    for name, path in sim["ledgers"].items():
        report = audit_ledger(path)
        assert report.certified and sim["audit"][name]["certified"]
        assert [r.release for r in report.clients[0].releases] == ["feature_mean"] + ["distributed_share"] * 2 * steps
        assert 1.9 < report.clients[0].epsilon <= 2.0 and sim["final"]["epsilon"][name] <= 2.0
        pending = [e for e in verify_ledger(path) if e["status"] == "pending"]
        assert all(e["event"]["share_variance"] == mechanism["event_per_step"]["share_variance"] for e in pending[1:])
        assert all(e["declaration"] == {"records": declared[name], "participation": True} for e in pending)


@pytest.mark.parametrize("extra,flag", [(["--epsilon", "0"], "--epsilon"), (["--epsilon", "-1"], "--epsilon"),
                                        (["--centre-epsilon", "2"], "--centre-epsilon"),
                                        (["--archive", "nowhere.tgz"], "--archive"),
                                        (["--colluders", "1"], "--colluders"),
                                        (["--noise", "distributed", "--accountant", "prv"], "--accountant"),
                                        (["--noise", "distributed", "--optimizer", "adam"], "--optimizer")])
def test_user_errors_name_the_flag_at_fault_in_one_line(tmp_path: Path, capsys, extra, flag) -> None:
    """Bad settings are one line naming the flag the user set (``--epsilon 0`` used to blame
    ``--centre-epsilon``, which the user never set), exit 2, and nothing is created."""
    out = tmp_path / "out"
    assert run.main(["--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run.py: error: " + flag), err
    assert not out.exists()


def _load_job():
    spec = importlib.util.spec_from_file_location("radiology_example_job", EXAMPLE / "radiology_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job_config(job_module, *, centre_epsilon: float = 0.25):
    declared = {"hospital_1": 60, "hospital_2": 60, "hospital_3": 70, "hospital_4": 50}
    return job_module.RadiologyConfig.from_mapping({
        "job": {"dataset": "iu_xray_reports", "source": "minilm", "clients": list(declared), "rounds": 2, "seed": 0},
        "privacy": {"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
        "declared": {"records": declared},
        "model": {"dim": DIM, "centre_epsilon": centre_epsilon},
        "training": {"lr": 0.5, "expected_batch_size": 16, "max_grad_norm": 1.0},
        "secagg": {"clip": 1.0, "max_samples": 100},
    })


def test_the_radiology_job_centres_with_dp_then_trains_in_process(tmp_path: Path, monkeypatch) -> None:
    """The example as a FederatedJob (the description a node agent runs): the centring release is
    the job's preparation, charged first in every ledger, then two DP-SGD rounds; the budget holds."""
    from secfedtl.runtime.local import run_job

    job_module = _load_job()
    synthetic = _synthetic(SIZES)
    monkeypatch.setattr(job_module, "reports_and_features", lambda config: synthetic)
    config = _job_config(job_module)
    job, ref = job_module.job_for(config)
    assert ref == "radiology_job:RADIOLOGY" and job.prepare is not None
    metrics = run_job(job, config, tmp_path / "out", state_dir=tmp_path / "state", progress=False)
    assert metrics["server"]["preparation"]["status"] == "ok"
    assert metrics["server"]["preparation"]["prepared"] == sorted(SIZES)
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    final = metrics["simulation_only"]["final"]
    assert 0.0 <= final["pooled_test_accuracy"] <= 1.0
    for name in SIZES:
        report = audit_ledger(tmp_path / "state" / name / "ledger.jsonl")
        assert report.certified and report.clients[0].epsilon <= 2.0
        assert [r.release for r in report.clients[0].releases] == ["feature_mean", "dpsgd_update", "dpsgd_update"]
    uncentred, ref = job_module.job_for(_job_config(job_module, centre_epsilon=0.0))
    assert ref == "radiology_job:RADIOLOGY_UNCENTRED" and uncentred.prepare is None
    with pytest.raises(Exception, match="centre_epsilon"):
        _job_config(job_module, centre_epsilon=2.0)


@pytest.mark.flower
def test_the_radiology_job_runs_on_flower(tmp_path: Path, monkeypatch) -> None:
    """The same job on Flower's simulation engine: every node agent runs it from a module on its
    own path (here a test module that gives radiology_job.py synthetic reports and features)."""
    import inspect

    pytest.importorskip("flwr")
    from secfedtl.runtime.deploy import run_local

    module = tmp_path / "synthetic_radiology.py"
    module.write_text("\n".join([
        "import sys", f"sys.path.insert(0, {str(EXAMPLE)!r})",
        "import numpy as np", "from secfedtl.data.radiology import Hospital, RadiologyData, TextSplit",
        "import radiology_job", f"DIM = {DIM}", f"SIZES = {SIZES!r}", inspect.getsource(_synthetic),
        "_DATA = _synthetic(SIZES)", "radiology_job.reports_and_features = lambda config: _DATA",
        "RADIOLOGY = radiology_job.RADIOLOGY", ""]), encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", ":".join(filter(None, [str(tmp_path), *sys.path])))
    monkeypatch.syspath_prepend(str(tmp_path))  # run_local reads the job file through the job here too
    config = _job_config(_load_job())
    (tmp_path / "job.toml").write_text(config.to_toml(), encoding="utf-8")
    metrics = run_local(tmp_path / "job.toml", tmp_path / "flower", simulation=True, phase_timeout=120.0,
                        job_code="synthetic_radiology:RADIOLOGY", timeout=900)
    assert metrics["server"]["preparation"]["status"] == "ok"
    assert [r["status"] for r in metrics["server"]["rounds"]] == ["ok", "ok"]
    for name in SIZES:
        ledger = tmp_path / "flower" / "hospitals" / name / "privacy" / name / "ledger.jsonl"
        assert [r.release for r in audit_ledger(ledger).clients[0].releases] == ["feature_mean", "dpsgd_update",
                                                                                 "dpsgd_update"]
