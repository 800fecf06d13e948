"""The Fashion-MNIST example as a :class:`~secfedtl.federated.job.FederatedJob`: a frozen feature
extractor, either an MNIST CNN (digit-recognizer-py's weights) transferred to Fashion-MNIST or
the handcrafted ScatterNet features of Tramer and Boneh (kymatio's wavelet scattering); each
client caches the frozen features once and trains a new linear head with DP-SGD.

``run.py`` runs it in process or on Flower; a node agent runs it with
``secfedtl node JOB.toml --job fashion_job:FASHION ...`` (this folder on ``PYTHONPATH``).

Public settings (the job file): ``[model]`` ``backbone`` (``"mnist_cnn"``, the default, or
``"scatternet"``), ``num_conv`` (the CNN's frozen conv blocks below the head; unused by ScatterNet),
``centre_epsilon`` (ScatterNet only: the part of ``[privacy] epsilon`` spent on DP centring of the
features before training, :data:`FASHION_CENTRED`; 0, the default, is no centring),
``feature_scale`` (norm of every feature vector), ``alpha`` (the simulation's Dirichlet label
skew: which share of Fashion-MNIST's training split each simulated client holds). Each node's
own settings (never in the job file, never from the server): ``FASHION_MNIST_DIR`` (the IDX
files; default Debian's dataset-fashion-mnist), ``FASHION_MNIST_WEIGHTS`` (the source weights;
default digit-recognizer-py's), ``FASHION_MNIST_SKIP_CHECKSUMS=1`` (accept IDX files other than
the published release).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # source_model.py beside this file

from source_model import FashionNet, ScatterNet, load_mnist_cnn, to_inputs  # noqa: E402

from secfedtl.data.fashion_mnist import FashionMNIST, client_splits, load_fashion_mnist  # noqa: E402
from secfedtl.errors import ConfigError  # noqa: E402
from secfedtl.federated import FederatedJob, HospitalData, JobConfig, SourceModel  # noqa: E402
from secfedtl.federated.centring import centring  # noqa: E402
from secfedtl.transfer.caching import iter_batches  # noqa: E402
from secfedtl.transfer.centring import MeanMechanism  # noqa: E402
from secfedtl.privacy.state import data_fingerprint  # noqa: E402


class FashionConfig(JobConfig):
    MODEL_SCHEMA: ClassVar[dict[str, type] | None] = {"backbone": str, "num_conv": int, "feature_scale": float,
                                                      "alpha": float, "centre_epsilon": float}
    MODEL_OPTIONAL: ClassVar[dict[str, Any]] = {"backbone": "mnist_cnn", "num_conv": 2, "feature_scale": 3.0,
                                                "alpha": 0.5, "centre_epsilon": 0.0}
    BACKBONES: ClassVar[tuple[str, ...]] = ("mnist_cnn", "scatternet")
    DATASETS: ClassVar[tuple[str, ...]] = ("fashion_mnist",)

    @classmethod
    def check_model(cls, model: dict[str, Any]) -> None:
        if model["backbone"] not in cls.BACKBONES:
            raise ConfigError(f"[model] backbone must be one of {', '.join(cls.BACKBONES)}, got {model['backbone']!r}")
        if model["num_conv"] not in (1, 2, 3):
            raise ConfigError("[model] num_conv must be 1, 2 or 3")
        for key in ("feature_scale", "alpha"):
            if not (math.isfinite(model[key]) and model[key] > 0):
                raise ConfigError(f"[model] {key} must be a finite number > 0")
        if model["centre_epsilon"] != 0 and model["backbone"] != "scatternet":
            raise ConfigError("[model] centre_epsilon: only the scatternet backbone has a centring layer")

    @classmethod
    def _check(cls, sections: dict[str, dict[str, Any]]) -> None:
        super()._check(sections)
        centre, epsilon = sections["model"]["centre_epsilon"], sections["privacy"]["epsilon"]
        if not (math.isfinite(centre) and 0 <= centre < epsilon):
            raise ConfigError(f"[model] centre_epsilon ({centre:g}) is part of the budget: it must be >= 0 and below "
                              f"[privacy] epsilon ({epsilon:g})")


class Images(Dataset):
    """uint8 images and their labels, each image made a model input (:func:`to_inputs`) only when
    read: the frozen layers see the same inputs, without a float copy of a whole split in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_inputs(self.images[i : i + 1])[0], int(self.labels[i])


def client_names(count: int) -> list[str]:
    return [f"client{k:02d}" for k in range(count)]


def _dataset(root: str | None, checksums: bool) -> FashionMNIST:
    return load_fashion_mnist(root, **({} if checksums else {"checksums": None}))


def _settings() -> tuple[str | None, bool]:
    return (os.environ.get("FASHION_MNIST_DIR") or None, os.environ.get("FASHION_MNIST_SKIP_CHECKSUMS", "") != "1")


def load_data() -> FashionMNIST:
    """Fashion-MNIST from this machine's own settings (see the module docstring)."""
    return _dataset(*_settings())


@functools.lru_cache(maxsize=2)
def _splits(root: str | None, checksums: bool, num_clients: int, alpha: float, seed: int,
            validation_fraction: float) -> tuple[Any, ...]:
    data = _dataset(root, checksums)  # not kept: the shares are copies (the whole split is not held twice)
    return tuple(client_splits(data.x_train, data.y_train, num_clients=num_clients, alpha=alpha, seed=seed,
                               validation_fraction=validation_fraction))


def splits(config: JobConfig) -> list[Any]:
    """Every simulated client's share (the public partition seed and alpha decide who holds what);
    computed once per setting, so the hospitals of one process and the experimenter share the
    same arrays instead of each holding a copy of the training images."""
    return list(_splits(*_settings(), len(config["job"]["clients"]), config["model"]["alpha"], config["job"]["seed"],
                        config["job"]["validation_fraction"]))


def source(config: JobConfig, spec: Any) -> SourceModel:
    if spec["backbone"] == "scatternet":
        return SourceModel(model=ScatterNet(feature_scale=spec["feature_scale"]), head="head", cache_features=True,
                           info={"backbone": "scatternet", "feature_scale": spec["feature_scale"]},
                           feature_batch_size=1024)  # kymatio's transform has a large fixed cost per call
    weights = os.environ.get("FASHION_MNIST_WEIGHTS") or None
    model = FashionNet(load_mnist_cnn(weights), num_conv=spec["num_conv"], feature_scale=spec["feature_scale"])
    return SourceModel(model=model, head="head", cache_features=True,
                       info={"backbone": "mnist_cnn", "num_conv": spec["num_conv"],
                             "feature_scale": spec["feature_scale"]})


def hospital_data(config: JobConfig, name: str) -> HospitalData:
    split = splits(config)[config["job"]["clients"].index(name)]
    return HospitalData(train=Images(split.x_fit, split.y_fit),
                        evaluation={"validation": Images(split.x_val, split.y_val)},
                        fingerprint=data_fingerprint([split.x_fit, split.y_fit, split.x_val, split.y_val]))


def _uncentred(config: JobConfig, name: str) -> HospitalData:
    if config["model"]["centre_epsilon"] > 0:
        raise ConfigError("fashion_job:FASHION does not centre: [model] centre_epsilon > 0 is fashion_job:FASHION_CENTRED")
    return hospital_data(config, name)


def _centred(config: JobConfig, name: str) -> HospitalData:
    if config["model"]["backbone"] != "scatternet" or config["model"]["centre_epsilon"] <= 0:
        raise ConfigError("fashion_job:FASHION_CENTRED needs [model] backbone = \"scatternet\" and centre_epsilon > 0")
    return hospital_data(config, name)


def centre_mechanism(config: JobConfig) -> MeanMechanism:
    """DP centring's mechanism, public, from the job file: the Gaussian mean of unit vectors."""
    priv = config["privacy"]
    return MeanMechanism.calibrate(dim=ScatterNet.dim_of(), target_epsilon=config["model"]["centre_epsilon"],
                                   target_delta=priv["delta"], accountant=priv["accountant"])


@functools.lru_cache(maxsize=1)
def _scatter() -> ScatterNet:
    return ScatterNet().eval()


@torch.no_grad()
def unit_feature_rows(data: HospitalData) -> np.ndarray:
    """What a hospital's DP centring averages: the unit ScatterNet features of its training rows,
    computed at the hospital (1,024 images per call)."""
    net, rows = _scatter(), []
    for x, _ in iter_batches(data.train, 1024):
        rows.append(net.unit_features(x).numpy())
    return np.concatenate(rows)


#: Without DP centring (``[model] centre_epsilon = 0``).
FASHION = FederatedJob(name="fashion_mnist", source=source, data=_uncentred, config_type=FashionConfig)
#: ScatterNet features centred on the hospitals' DP mean first (``[model] centre_epsilon > 0``).
FASHION_CENTRED = FederatedJob(name="fashion_mnist", source=source, data=_centred, config_type=FashionConfig,
                               prepare=centring(centre_mechanism, unit_feature_rows, layer="centring"))


def job_for(config: JobConfig) -> tuple[FederatedJob, str]:
    """The job (and its ``MODULE:ATTR`` for a node agent) the config's ``centre_epsilon`` asks for."""
    if config["model"]["centre_epsilon"] > 0:
        return FASHION_CENTRED, "fashion_job:FASHION_CENTRED"
    return FASHION, "fashion_job:FASHION"
