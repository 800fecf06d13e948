"""Score the released model's moving average (``[server] ema``) for several decays from ONE run
of an example, on the pooled VALIDATION split only (never test): training is the same for every
decay (the average is post-processing of the server's iterates), so one run records every
iterate and each decay is scored on it afterwards (docs/results.md, "Server-side post-processing").

    OMP_NUM_THREADS=1 EMA_OUT=runs/ema-10.json .venv-radiology/bin/python examples/server_average/scan_example.py \
        examples/radiology_reports/run.py --noise distributed --batch-size 512 --epochs 5 --rounds 10 \
        --lr 1.0 --centre-epsilon 0.4 --seed 10 --no-reference --no-progress --out runs/ema-10

Everything after the script's path is passed to it. Writes the scores (decay -> pooled validation
accuracy; ``tailF``: the uniform average of the last fraction F of the iterates) to ``$EMA_OUT``.
A tuning tool of the experimenter (who holds every hospital's validation rows; no ledger is
charged for it), like the examples' other tuning scripts.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Any

import numpy as np

import secfedtl.federated.run as run_module
from secfedtl.federated.federation import Federation

DECAYS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
TAILS = (0.25, 0.5)
_TRAINING: list[Federation] = []
_ITERATES: list[np.ndarray] = []


def _is_training(federation: Federation) -> bool:
    return list(federation.names) not in (["prepare"], ["selection"])


def _record(step_to: Any) -> Any:
    def wrapped(self: Federation, params: np.ndarray) -> None:
        if _is_training(self):
            _ITERATES.append(np.array(params, copy=True))
        step_to(self, params)
    return wrapped


def _remember(post_init: Any) -> Any:
    def wrapped(self: Federation) -> None:
        post_init(self)
        if _is_training(self):
            _TRAINING.append(self)
    return wrapped


def _scoring(run_federation: Any) -> Any:
    def wrapped(config: Any, source: Any, federation: Federation, out: Any, **kwargs: Any) -> Any:
        metrics = run_federation(config, source, federation, out, **kwargs)
        experimenter = kwargs["experimenter"]
        start = federation.source_params

        def score(params: np.ndarray) -> float | None:
            return run_module._pooled(experimenter.accuracy(params), "validation")[1]

        scores: dict[str, Any] = {}
        for decay in DECAYS:
            average = start.copy()
            for x in _ITERATES:
                average = decay * average + (1.0 - decay) * x
            scores[str(decay)] = score(average)
        for fraction in TAILS:
            k = max(1, int(len(_ITERATES) * fraction))
            scores[f"tail{fraction}"] = score(np.mean(_ITERATES[-k:], axis=0))
        scores["steps"] = len(_ITERATES)
        with open(os.environ["EMA_OUT"], "w", encoding="utf-8") as fh:
            json.dump(scores, fh, indent=1)
        print("validation by decay:", json.dumps(scores))
        return metrics
    return wrapped


def main() -> None:
    if len(sys.argv) < 2 or "EMA_OUT" not in os.environ:
        raise SystemExit(__doc__)
    Federation._step_to = _record(Federation._step_to)  # type: ignore[method-assign]
    Federation.__post_init__ = _remember(Federation.__post_init__)  # type: ignore[method-assign]
    run_module.run_federation = _scoring(run_module.run_federation)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
