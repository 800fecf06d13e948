"""Choose run.py's defaults on the pooled *validation* splits (test splits are never looked at).

Runs the real pipeline (client nodes, DP-SGD, secure aggregation) for every setting of a small
grid, `--repeats` times each (the DP noise differs between repeats), and prints the mean pooled
validation accuracy of the final global model, best first.

    .venv-radiology/bin/python examples/radiology_reports/tune.py --no-progress
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as radiology  # noqa: E402  (the example's run.py, beside this file)

from secfedtl.data.radiology import load_radiology_reports  # noqa: E402

GRID = {"lr": [0.5, 1.0, 2.0], "batch_size": [64, 128], "epochs": [3, 5], "rounds": [3, 5, 10]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--unfreeze-last-block", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    p.add_argument("--no-progress", action="store_true")
    cli = p.parse_args()
    flags = ["--seed", str(cli.seed), "--epsilon", str(cli.epsilon), "--no-progress"]
    if cli.unfreeze_last_block:
        flags.append("--unfreeze-last-block")
    base = radiology.parse_args(flags)
    data = load_radiology_reports(seed=cli.seed)
    features, _, head, digest = radiology.compute_features(data, base)
    results = []
    combos = list(itertools.product(*GRID.values()))
    for values in radiology._progress(combos, "grid", argparse.Namespace(no_progress=cli.no_progress)):
        setting = dict(zip(GRID, values))
        scores = []
        for _ in range(cli.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                args = radiology.parse_args(flags + ["--out", tmp] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in setting.items()])
                rows, _, _ = radiology.train_federated(data, features, head, digest, args)
                scores.append(rows[-1]["pooled_validation_accuracy"])
        results.append({**setting, "validation_mean": float(np.mean(scores)), "validation": scores})
        print(f"  {setting}: {np.mean(scores):.4f}", file=sys.stderr, flush=True)
    results.sort(key=lambda r: -r["validation_mean"])
    for r in results:
        print(f"lr={r['lr']:<4} batch={r['batch_size']:<4} epochs={r['epochs']} rounds={r['rounds']:<3} "
              f"validation {r['validation_mean']:.4f}  {['%.3f' % s for s in r['validation']]}")
    if cli.out is not None:
        cli.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
