"""The released model's moving average (``[server] ema``) on the heart job's PUBLIC tuning data:
the bundled distributed settings (examples/heart_distributed/tuned_distributed.json, ``chosen``)
on the pseudo-federations of examples/heart_selection/tune_on_source.py ``--label-shift`` (cut
from Cleveland's training rows only), one run per repeat with every server iterate recorded, each
decay scored on the pooled pseudo-validation accuracy (docs/results.md, "Server-side post-processing").

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/server_average/scan_heart.py --repeats 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "heart_selection"))

import tune_on_source as tune  # noqa: E402

from secfedtl.jobs.heart import build_job  # noqa: E402

DECAYS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


def run_repeat(settings: dict, repeat: int, data: tuple) -> dict[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # insecure_reproducible: public data, on purpose
        config = tune.config_for(settings, repeat)
    x, y, names = data
    centres = tune.pseudo_centres(x, y, names, repeat=repeat, source_fraction=0.5,
                                  validation_fraction=config["job"]["validation_fraction"], label_shift=True)
    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(config, Path(tmp) / "out", workers=0, state_dir=Path(tmp) / "state", centres=centres)
        try:
            fed, ex = job.federation, job.experimenter()
            iterates: list[np.ndarray] = []
            step_to = fed._step_to

            def record(params: np.ndarray) -> None:
                iterates.append(params.copy())
                step_to(params)

            fed._step_to = record  # type: ignore[method-assign]
            fed.run(config["job"]["rounds"])
            scores = {}
            for decay in DECAYS:
                average = fed.source_params.copy()
                for x_t in iterates:
                    average = decay * average + (1.0 - decay) * x_t
                scores[decay] = tune.pooled(ex.accuracy(average))
            return scores
        finally:
            job.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--settings", type=Path, default=ROOT / "examples" / "heart_distributed" / "tuned_distributed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = json.loads(args.settings.read_text(encoding="utf-8"))["chosen"]
    data = tune.cleveland_train()
    rows = [run_repeat(settings, r, data) for r in range(args.repeats)]
    for decay in DECAYS:
        diffs = [row[decay] - row[0.0] for row in rows]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        print(f"decay {decay}: pseudo-validation {statistics.mean(r[decay] for r in rows):.4f}, "
              f"minus the last iterate {statistics.mean(diffs):+.4f} +- {se:.4f} (paired, se)")


if __name__ == "__main__":
    main()
