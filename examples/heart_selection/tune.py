"""Validation-only tuning of the heart job: pooled validation accuracy and loss of the source and
of the final global model, over tuning seeds (10-29 by default, apart from the reporting seeds
0-4). No test split is read.

    PYTHONPATH=. python examples/heart_selection/tune.py '{"model": {"kind": "linear"}, "training": {"lr": 0.2}}'

The argument is a JSON object of config overrides ({section: {key: value}}) on the bundled default.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secfedtl.data import validation_split
from secfedtl.runtime.job import JobConfig, _dataset, build_job


def pooled(model: nn.Module, data: dict) -> tuple[float, float]:
    correct = total = 0
    loss = 0.0
    model.eval()
    with torch.no_grad():
        for ds in data.values():
            x, y = ds.tensors
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    return correct / total, loss / total


def run(overrides: dict, seed: int) -> tuple[tuple[float, float], tuple[float, float]]:
    data = JobConfig.load(None).to_dict()
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    data["job"]["seed"] = seed
    cfg = JobConfig.from_mapping(data)
    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(cfg, Path(tmp), workers=0)
        val = {}
        for k, name in enumerate(cfg["job"]["clients"]):
            c = job.source.centres[name]
            _, _, xv, yv = validation_split(c.x_train, c.y_train, cfg["job"]["validation_fraction"], seed + k)
            val[name] = _dataset(xv, yv)
        source = pooled(job.source.model, val)
        job.federation.run(cfg["job"]["rounds"])
        final = pooled(job.global_model(), val)
        job.federation.pool.close()
    return source, final


def main() -> None:
    overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    seeds = range(*(overrides.pop("seeds", [10, 30])))
    rows = [run(overrides, s) for s in seeds]
    src = np.array([r[0] for r in rows])
    fed = np.array([r[1] for r in rows])
    print(json.dumps({"overrides": overrides, "seeds": [seeds.start, seeds.stop],
                      "source_val_acc": round(float(src[:, 0].mean()), 4),
                      "global_val_acc": round(float(fed[:, 0].mean()), 4),
                      "global_val_acc_sd": round(float(fed[:, 0].std(ddof=1)), 4),
                      "global_val_loss": round(float(fed[:, 1].mean()), 4)}))


if __name__ == "__main__":
    main()
