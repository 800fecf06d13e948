"""How often does DP source selection pick the best candidate on the heart job's hospitals?

    PYTHONPATH=. python examples/heart_selection/reliability.py [CONFIG.toml] --seeds 0 1 2 3 4

For each seed: train the candidates of CONFIG's [selection] section (default: the example
selection.toml next to this file) on Cleveland, compute every hospital's exact clipped loss sums
on its validation split (what the `select` task computes before noise), then draw the noise of
the mechanism 20,000 times (each hospital its own full noise, summed) and count how often the
server's argmin is the candidate with the lowest exact pooled validation loss. Also prints the
number of validation records a 90% pick rate would need, from the observed loss gaps.
Validation data only; no test split is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import norm

from secfedtl.data import validation_split
from secfedtl.runtime.job import JobConfig, _dataset, build_source
from secfedtl.transfer.selection import SelectionMechanism, clipped_loss_sums

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", type=Path, default=HERE / "selection.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.2, 0.5, 0.9])
    parser.add_argument("--draws", type=int, default=20_000)
    args = parser.parse_args()
    base = JobConfig.load(args.config)
    sel = base["selection"]
    rng = np.random.default_rng(0)
    rates: dict[float, list[float]] = {e: [] for e in args.epsilons}
    needed = []
    for seed in args.seeds:
        data = base.to_dict()
        data["job"]["seed"] = seed
        cfg = JobConfig.from_mapping(data)
        sources = [build_source(cfg, spec) for spec in cfg.source_specs()]
        models = [s.model for s in sources]
        stats = []
        for k, name in enumerate(cfg["job"]["clients"]):
            c = sources[0].centres[name]
            _, _, xv, yv = validation_split(c.x_train, c.y_train, cfg["job"]["validation_fraction"], seed + k)
            stats.append(clipped_loss_sums(models, _dataset(xv, yv), loss_clip=sel["loss_clip"]))
        total = np.sum(stats, axis=0)
        n = total[-1]
        means = total[:-1] / n
        best = int(np.argmin(means))
        row = {"seed": seed, "records": int(n), "mean_losses": [round(float(m), 4) for m in means], "best": best}
        for eps in args.epsilons:
            mech = SelectionMechanism.calibrate(num_candidates=len(models), loss_clip=sel["loss_clip"],
                                                target_epsilon=eps, target_delta=cfg["privacy"]["delta"])
            noise = rng.standard_normal((args.draws, len(stats), len(models))).sum(axis=1) * mech.loss_noise_std
            picks = np.argmin(total[:-1] + noise, axis=1)
            rate = float(np.mean(picks == best))
            rates[eps].append(rate)
            row[f"p_best@{eps}"] = round(rate, 3)
            # records needed so that the best beats the runner-up with probability 0.9, at this gap
            gap = float(np.sort(means)[1] - means[best])
            std_diff = mech.loss_noise_std * np.sqrt(2 * len(stats))
            row[f"records_for_90%@{eps}"] = int(np.ceil(norm.ppf(0.9) * std_diff / gap)) if gap > 0 else None
        needed.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({f"mean p_best@{e}": round(float(np.mean(v)), 3) for e, v in rates.items()}
                     | {"chance": round(1 / len(base.source_specs()), 3)}))


if __name__ == "__main__":
    main()
