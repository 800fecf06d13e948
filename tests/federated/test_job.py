"""The job description API: loading a job by its operator-given name, the generic job file, and
what a description's functions must return."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError
from secfedtl.federated.config import JobConfig
from secfedtl.federated.job import DEFAULT_JOB, FederatedJob, HospitalData, SourceModel, load_job
from secfedtl.training import flatten_params

MINIMAL = {
    "job": {"dataset": "mine", "source": "public", "clients": ["a", "b", "c"], "rounds": 2, "seed": 0},
    "privacy": {"epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"},
    "declared": {"records": {"a": 10, "b": 10, "c": 10}},
    "training": {"lr": 0.1, "expected_batch_size": 4, "max_grad_norm": 1.0},
    "secagg": {"clip": 1.0, "max_samples": 100},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_load_job_takes_module_colon_attr_and_refuses_anything_else():
    from secfedtl.jobs.heart import HEART

    assert load_job(DEFAULT_JOB) is HEART and load_job(None) is HEART
    for bad in ("secfedtl.jobs.heart", ":HEART", "secfedtl.jobs.heart:", "secfedtl.nowhere:JOB",
                "secfedtl.jobs.heart:nothing", "secfedtl.jobs.heart:HeartConfig"):
        with pytest.raises(ConfigError):
            load_job(bad)


def test_a_generic_job_file_keeps_model_open_and_fills_the_documented_defaults():
    config = JobConfig.from_mapping({**MINIMAL, "model": {"hidden": 8, "weights": "w.safetensors"}})
    assert config["model"] == {"hidden": 8, "weights": "w.safetensors"}
    assert config.source_specs() == [{"hidden": 8, "weights": "w.safetensors"}]
    assert config["training"]["epochs"] == 1 and config["server"] == {"optimizer": "fedavg", "lr": 1.0}
    assert "momentum" not in config["server"]  # left out stays out (the job id hashes the file)
    with_momentum = JobConfig.from_mapping({**MINIMAL, "server": {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.5}})
    assert with_momentum["server"]["momentum"] == 0.5
    assert JobConfig.from_mapping(with_momentum.to_dict()).to_dict() == with_momentum.to_dict()
    for change in ({"job": {**MINIMAL["job"], "clients": ["a", "a", "b"]}},
                   {"server": {"momentum": "high"}},
                   {"job": {**MINIMAL["job"], "source": "a"}},
                   {"nonsense": {}}):
        with pytest.raises(ConfigError):
            JobConfig.from_mapping({**MINIMAL, **change})
    with pytest.raises(ConfigError, match="no job file"):
        JobConfig.load(None)


def test_hospital_data_and_source_model_check_what_a_job_returns():
    x, y = np.zeros((5, 3), dtype=np.float32), np.array([0, 1, 0, 1, 0])
    data = HospitalData.from_tensors(x, y, evaluation={"test": (x, y)})
    assert len(data.train) == 5 and data.fingerprint == HospitalData.from_tensors(x, y, evaluation={"test": (x, y)}).fingerprint
    assert data.fingerprint != HospitalData.from_tensors(x, 1 - y, evaluation={"test": (x, y)}).fingerprint
    with pytest.raises(ConfigError):
        HospitalData.from_tensors(x[:0], y[:0])
    source = SourceModel(model=Net(), head="head")
    assert list(source.head_state) == ["head.weight", "head.bias"]
    assert not any(p.requires_grad for p in source.model.backbone.parameters())
    params = np.arange(10, dtype=np.float64)
    moved = source.with_params(params)
    assert np.array_equal(flatten_params(SourceModel(model=moved).head_state), params)
    assert not np.array_equal(flatten_params(source.head_state), params)  # a copy: the source is unchanged
    assert torch.equal(moved.backbone.weight, source.model.backbone.weight)
    with pytest.raises(ConfigError):
        SourceModel(model="not a module")  # type: ignore[arg-type]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="feature_batch_size"):
            SourceModel(model=Net(), head="head", feature_batch_size=bad)  # type: ignore[arg-type]

    job = FederatedJob(name="bad", source=lambda c, s: Net(), data=lambda c, n: (x, y))  # type: ignore[arg-type,return-value]
    config = JobConfig.from_mapping(MINIMAL)
    with pytest.raises(ConfigError, match="SourceModel"):
        job.build_source(config)
    with pytest.raises(ConfigError, match="HospitalData"):
        job.load_data(config, "a")
    with pytest.raises(ConfigError, match="not one of the job's clients"):
        job.load_data(config, "z")


def test_feature_buffers_hold_the_clients_caches_and_experimenter_features_score_like_the_model(tmp_path):
    """A simulation's shared feature buffer: each hospital caches its training features into its
    row slice (the client trains on that storage); an Experimenter given the evaluation splits'
    features scores the head on them exactly as the whole model on the inputs."""
    from secfedtl.federated.run import Experimenter
    from secfedtl.runtime.local import build_job
    from secfedtl.transfer import cache_features, split_head

    torch.manual_seed(0)
    net = Net()
    rng = np.random.default_rng(0)
    xs = {n: rng.normal(size=(10, 3)).astype(np.float32) for n in "abc"}
    ys = {n: rng.integers(0, 2, size=10) for n in "abc"}
    buffer = torch.full((30, 4), float("nan"))
    rows = {n: buffer[10 * i : 10 * (i + 1)] for i, n in enumerate("abc")}

    def data(config, name):
        return HospitalData(train=HospitalData.from_tensors(xs[name], ys[name]).train,
                            evaluation={"test": HospitalData.from_tensors(xs[name], ys[name]).train},
                            feature_buffer=rows[name])

    job = FederatedJob(name="buffered", source=lambda config, spec: SourceModel(model=net, head="head"), data=data)
    local = build_job(job, JobConfig.from_mapping({**MINIMAL, "job": {**MINIMAL["job"], "id": "buf-1"}}),
                      tmp_path / "out", workers=0, state_dir=tmp_path / "state")
    try:
        backbone, _ = split_head(local.source.model, "head")
        expected = torch.cat([backbone(torch.from_numpy(xs[n])) for n in "abc"]).detach()
        assert torch.allclose(buffer, expected, atol=1e-6)  # every row written, by its own hospital
        for name, client in local.clients.items():
            assert client._data.tensors[0].data_ptr() == rows[name].data_ptr()  # no per-client copy
        features = {n: {"test": cache_features(backbone.eval(), local.hospitals[n].evaluation["test"], batch_size=4)}
                    for n in "abc"}
        params = rng.normal(size=10)
        plain = local.experimenter().accuracy(params)
        cached = local.experimenter(features).accuracy(params)
        assert cached == plain and {i["accuracy"]["test"] for i in plain.values()} != {1.0}
        with pytest.raises(ConfigError):
            local.experimenter({"a": {"test": TensorDataset(torch.zeros(3, 4), torch.zeros(3))}})
        with pytest.raises(ConfigError):
            local.experimenter({"a": {"validation": features["a"]["test"]}})
    finally:
        local.close()
