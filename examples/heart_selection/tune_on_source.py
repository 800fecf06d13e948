"""Choose the heart job's defaults on PUBLIC data only: Cleveland's training split.

    PYTHONPATH=. python examples/heart_selection/tune_on_source.py --out runs/tune_on_source

(800 pseudo-federated jobs: about 17 minutes on 2 busy cores; ``--repeats 8 --passes 1`` takes a
few minutes, with noisier scores.)

How the bundled defaults of ``secfedtl/configs/heart.toml`` were chosen (docs/results.md). No
private hospital's row (Hungary, Switzerland, VA Long Beach) and no test split (not even
Cleveland's) is read: the script loads the bundled data, keeps Cleveland's *training* rows and
drops everything else before it does anything.

Each repeat ``r`` (a tuning seed, also the job seed) cuts Cleveland's training rows as follows
(:func:`pseudo_centres`). The job splits a hospital's rows into fit and validation by a keyed
hash of each row under the job seed's public key, so every row's side is known in advance.

* The validation-side rows (about 40 of 199) are shared out among three **pseudo-hospitals** in
  proportion to the real hospitals' declared counts (140 : 25 : 70): the pseudo-validation data.
* Of the fit-side rows, ``--source-fraction`` of all rows (100) form the **pseudo-source**, which
  trains the source model exactly as the job trains it on Cleveland (same ``train_source``: epochs
  chosen on a validation split of the source's own rows, constant inputs zeroed); the rest (about
  60) are the pseudo-hospitals' fit pools, in the same proportion.
* Cleveland has fewer training rows than the private hospitals together (199 against 287), so a
  pseudo-hospital's fit part is its real declared count (140, 25, 70) of rows drawn *with
  replacement* from its pool, and it declares that count: its sample rate, steps and noise
  multiplier, i.e. its whole DP mechanism, are the real hospital's, and an expected batch really
  holds about ``expected_batch_size`` rows. Duplicates hash alike, so the job's own split gives
  it exactly these fit and validation rows.

The job then runs through the library's own code path (``build_job`` with these centres: the
same record-stable fit/validation split, the same DP-SGD client and budget calibration for
epsilon 1 / delta 1e-5, secure aggregation, the server optimizer, and personalisation), and the
score is the **pooled pseudo-validation
accuracy** over the three pseudo-hospitals: of the final global model, and of the personalised
models (each pseudo-hospital's own). A configuration's score is the mean over the repeats of
``(global + personalised) / 2``. The repeats use the same partitions for every configuration
(common random numbers), and the job runs with ``insecure_reproducible`` (batches and noise from
the seed, the only difference from a real job: this is public data, and it makes the table
reproducible and the comparison paired).

The search is greedy, one setting at a time, in the order of ``SEARCH``, for ``--passes`` passes
(2 by default): each setting takes the value with the best mean score given the values chosen so
far (an exact tie keeps the current value). It starts from ``START``, the middle of every
candidate list, which is the previous default (that one was chosen on the private hospitals'
validation data; the start only fixes the other settings while the first ones are searched, and
the second pass searches every setting again from the first pass's result). Each row of the
output table also gives its paired difference from the value chosen in that step (same
partitions and seeds), with its standard error: differences within about two standard errors are
noise, and the choice between such values is a coin toss that costs little either way.

What this cannot see: the real hospitals' distribution shift (their label rates and features
differ from Cleveland's; the pseudo-hospitals are random draws from one centre), and their
number of *distinct* records (a resampled pool holds fewer distinct rows than a real hospital).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfedtl.data import load_fed_heart_disease, split_key, standardize
from secfedtl.data.heart import Center
from secfedtl.jobs.heart import HeartConfig, build_job

#: The pseudo-hospitals: name -> the real hospital's declared record count (heart.toml).
PSEUDO = {"pseudo_hungary": ("hungary", 140), "pseudo_switzerland": ("switzerland", 25), "pseudo_va": ("va", 70)}

#: Where the search starts: the middle of each candidate list below (= the defaults before this
#: procedure, which the old private-validation tuning chose; see the module docstring).
START: dict[str, dict[str, Any]] = {
    "model": {"kind": "linear", "source_weight_decay": 0.1, "hidden": 32},
    "training": {"lr": 0.2, "epochs": 2, "l2sp": 0.05, "expected_batch_size": 16},
    "server": {"optimizer": "fedavg", "lr": 1.0},
    "job": {"rounds": 3},
}

#: The settings searched, in order, and their candidate values. A value is a {section: {key:
#: value}} override (several keys change together for the server optimizer).
SEARCH: list[tuple[str, list[dict[str, dict[str, Any]]]]] = [
    ("model kind", [{"model": {"kind": "linear"}}, {"model": {"kind": "mlp"}}]),
    ("source weight decay", [{"model": {"source_weight_decay": v}} for v in (0.01, 0.1, 0.3)]),
    ("hidden (mlp only)", [{"model": {"hidden": v}} for v in (16, 32, 64)]),
    ("training lr", [{"training": {"lr": v}} for v in (0.05, 0.1, 0.2, 0.5, 1.0)]),
    ("epochs", [{"training": {"epochs": v}} for v in (1, 2, 4)]),
    ("expected_batch_size", [{"training": {"expected_batch_size": v}} for v in (8, 16, 24)]),
    ("l2sp", [{"training": {"l2sp": v}} for v in (0.0, 0.05, 0.5)]),
    ("server", [{"server": {"optimizer": "fedavg", "lr": 1.0}}, {"server": {"optimizer": "fedavg", "lr": 0.5}},
                {"server": {"optimizer": "fedavgm", "lr": 1.0}}, {"server": {"optimizer": "fedadam", "lr": 0.03}}]),
    ("rounds", [{"job": {"rounds": v}} for v in (1, 3, 5)]),
]


#: ``--noise distributed``: where the search starts (the bundled job file's values, with the keys a
#: distributed-noise job refuses switched off: no personalisation, no L2-SP), and what it searches.
#: The source model's settings are the bundled ones (the same source model in both modes); only
#: the DP-SGD and server settings, which the noise mode changes the meaning of, are searched.
START_DISTRIBUTED: dict[str, dict[str, Any]] = {
    "model": {"kind": "mlp", "source_weight_decay": 0.01, "hidden": 32},
    "training": {"lr": 0.05, "epochs": 1, "l2sp": 0.0, "expected_batch_size": 24},
    "server": {"optimizer": "fedavg", "lr": 1.0},
    "privacy": {"noise": "distributed", "personalise": False},
    "job": {"rounds": 3},
}
SEARCH_DISTRIBUTED: list[tuple[str, list[dict[str, dict[str, Any]]]]] = [
    ("training lr", [{"training": {"lr": v}} for v in (0.05, 0.2, 0.5, 1.0, 2.0, 4.0)]),
    ("expected_batch_size", [{"training": {"expected_batch_size": v}} for v in (24, 48, 96)]),
    ("epochs", [{"training": {"epochs": v}} for v in (1, 2, 4)]),
    ("l2sp", [{"training": {"l2sp": v}} for v in (0.0, 0.01, 0.05, 0.2)]),  # the server's pull toward the source
    ("server", [{"server": {"optimizer": "fedavg", "lr": 1.0}}, {"server": {"optimizer": "fedavgm", "lr": 1.0}}]
     + [{"server": {"optimizer": "fedadam", "lr": v}} for v in (0.01, 0.03, 0.1)]),
    ("rounds", [{"job": {"rounds": v}} for v in (1, 3, 5, 8, 12)]),
]


def cleveland_train() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Cleveland's training rows, standardised with Cleveland's own training statistics (as the
    job does); every other centre and every test split is dropped here, unread."""
    centres = load_fed_heart_disease()
    c = centres["cleveland"]
    del centres
    public = Center(name="cleveland", x_train=c.x_train, y_train=c.y_train, x_test=c.x_train[:1],
                    y_test=c.y_train[:1], feature_names=c.feature_names)  # test: a placeholder, never read
    scaled, _ = standardize({"cleveland": public}, stats_from="cleveland")
    s = scaled["cleveland"]
    return np.array(s.x_train), np.array(s.y_train), s.feature_names


def pseudo_centres(x: np.ndarray, y: np.ndarray, names: tuple[str, ...], *, repeat: int, source_fraction: float,
                   validation_fraction: float, label_shift: bool = False) -> dict[str, Center]:
    """One repeat's pseudo-source and pseudo-hospitals (see the module docstring).

    The job splits a hospital's rows into fit and validation by a keyed hash of each row (the key
    follows from the job seed, here ``repeat``), so the split of every Cleveland row is known in
    advance: rows on the validation side go to the pseudo-hospitals' validation parts (each
    once), rows on the fit side to the pseudo-source or to the pseudo-hospitals' fit pools. A
    pseudo-hospital's fit part is its declared count of rows drawn with replacement from its pool,
    so the job's own split gives it exactly that many fit rows. Its "test" split is a copy of its
    validation rows (the job evaluates both; only validation is scored)."""
    rng = np.random.default_rng([20261128, repeat])
    key = split_key(repeat)
    # The job's split of one row, without calling record_split on a single row (it refuses a
    # one-sided split): the same HMAC the job computes.
    side = np.array([_is_validation(x[i], y[i], validation_fraction, key) for i in range(len(y))], dtype=bool)
    fit_rows, val_rows = rng.permutation(np.flatnonzero(~side)), rng.permutation(np.flatnonzero(side))
    n_source = round(source_fraction * len(y))
    source = fit_rows[:n_source]
    centres = {"pseudo_source": Center(name="pseudo_source", x_train=x[source], y_train=y[source],
                                       x_test=x[source[:1]], y_test=y[source[:1]], feature_names=names)}
    declared = np.array([d for _, d in PSEUDO.values()], dtype=float)

    def parts(rows: np.ndarray) -> list[np.ndarray]:
        cuts = np.round(np.cumsum(declared) / declared.sum() * len(rows)).astype(int)
        return np.split(rows, cuts[:-1])

    for (name, (_, count)), pool, val in zip(PSEUDO.items(), parts(fit_rows[n_source:]), parts(val_rows)):
        if len(pool) == 0 or len(val) == 0:
            raise ValueError(f"{name}: empty pool; use a smaller --source-fraction")
        if label_shift:
            # A public prior over how far a hospital's case mix may be from the source's: its
            # positive rate is drawn from LABEL_SHIFT_PRIOR, fit and validation rows alike
            # (resampled with replacement; duplicates hash alike, so they stay on their side).
            rate = rng.uniform(*LABEL_SHIFT_PRIOR)
            fit, val = _with_rate(pool, y, count, rate, rng), _with_rate(val, y, len(val), rate, rng)
        else:
            fit = rng.choice(pool, size=count, replace=True)
        rows = np.concatenate([fit, val])
        centres[name] = Center(name=name, x_train=x[rows], y_train=y[rows], x_test=x[val], y_test=y[val],
                               feature_names=names)
    return centres


#: ``--label-shift``: each pseudo-hospital's positive rate is drawn uniformly from this range (a
#: public, data-independent prior; Cleveland's own rate is about 0.46).
LABEL_SHIFT_PRIOR = (0.2, 0.9)


def _with_rate(rows: np.ndarray, y: np.ndarray, size: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` of ``rows`` drawn with replacement so that a draw is positive with probability
    ``rate`` (uniform within each label; one label missing: uniform over ``rows``)."""
    positive = y[rows] == 1
    if positive.all() or not positive.any():
        return rng.choice(rows, size=size, replace=True)
    weights = np.where(positive, rate / positive.sum(), (1.0 - rate) / (~positive).sum())
    return rng.choice(rows, size=size, replace=True, p=weights / weights.sum())


def _is_validation(x_row: np.ndarray, y_row: Any, fraction: float, key: bytes) -> bool:
    """Whether :func:`secfedtl.data.record_split` puts this row in validation (same HMAC)."""
    from secfedtl.data.splits import _record_bytes

    digest = hmac.new(key, _record_bytes(x_row, y_row), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < int(fraction * (1 << 64))


def config_for(settings: dict[str, dict[str, Any]], repeat: int) -> HeartConfig:
    data = HeartConfig.load(None).to_dict()
    for section, values in settings.items():
        data[section].update(values)
    data.pop("selection", None)
    data["job"].update(source="pseudo_source", clients=list(PSEUDO), seed=repeat, id=f"tune-{repeat}", workers=0)
    data["declared"] = {"records": {name: count for name, (_, count) in PSEUDO.items()}}
    # Public data: reproducible batches and noise (the mechanism is the same; see the docstring).
    data["privacy"].update(secure_mode=False, insecure_reproducible=True)
    return HeartConfig.from_mapping(data)


def pooled(infos: dict[str, dict[str, Any]]) -> float:
    correct = sum(round(i["accuracy"]["validation"] * i["samples"]["validation"]) for i in infos.values())
    return correct / sum(i["samples"]["validation"] for i in infos.values())


def run_once(settings: dict[str, dict[str, Any]], repeat: int, data: tuple, source_fraction: float,
             label_shift: bool = False) -> dict[str, float]:
    """One pseudo-federated job: pooled pseudo-validation accuracy of the source, the global and
    the personalised models, and the largest epsilon spent."""
    x, y, names = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # insecure_reproducible's warning: public data, on purpose
        config = config_for(settings, repeat)
    centres = pseudo_centres(x, y, names, repeat=repeat, source_fraction=source_fraction,
                             validation_fraction=config["job"]["validation_fraction"], label_shift=label_shift)
    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(config, Path(tmp) / "out", workers=0, state_dir=Path(tmp) / "state", centres=centres)
        try:
            ex = job.experimenter()
            source = pooled(ex.accuracy(job.federation.global_params))
            rounds = config["job"]["rounds"]
            job.federation.run(rounds)
            final = ex.accuracy(job.federation.released_params)
            if config["privacy"]["personalise"]:
                answers = job.federation.query("personalise", round=rounds)
                reports = ex.local_reports("personalise", rounds)
                personal = {n: reports[n] if answers.get(n, {}).get("status") == "done"
                            and reports[n].get("status") == "done" else final[n] for n in final}
            else:  # nothing to personalise: the global model is every hospital's model
                personal = final
            eps = max(ex.epsilon().values())
        finally:
            job.close()
    glob, pers = pooled(final), pooled(personal)
    return {"source": source, "global": glob, "personalised": pers, "score": (glob + pers) / 2, "epsilon": eps}


_DATA: tuple | None = None  # Cleveland's training rows, set by main() before the workers fork
_DISTRIBUTED = False  # --noise distributed, set by main()
_SIDE_BY_SIDE = False  # --noise local --side-by-side, set by main()


def _worker(task: tuple[dict[str, dict[str, Any]], int, float, bool]) -> dict[str, float]:
    settings, repeat, source_fraction, label_shift = task
    torch.set_num_threads(1)
    assert _DATA is not None
    return run_once(settings, repeat, _DATA, source_fraction, label_shift)


class _Serial:
    """The part of a multiprocessing pool main() uses, in this process (``--jobs 1``)."""

    def imap(self, fn: Any, tasks: list[Any]) -> Any:
        return map(fn, tasks)

    def close(self) -> None:
        pass


def merged(*overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if _SIDE_BY_SIDE:  # the distributed search space, with local noise
        out = copy.deepcopy(START_DISTRIBUTED)
        out["privacy"]["noise"] = "local"
    else:
        out = copy.deepcopy(START_DISTRIBUTED if _DISTRIBUTED else START)
    for o in overrides:
        for section, values in o.items():
            out.setdefault(section, {}).update(values)
    return out


def label(override: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k}={v}" for values in override.values() for k, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="tuning seeds (partitions of Cleveland's train split)")
    parser.add_argument("--passes", type=int, default=2, help="greedy passes over every setting")
    parser.add_argument("--source-fraction", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("runs/tune_on_source"))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--noise", choices=("local", "distributed"), default="local",
                        help="tune the local-noise defaults (heart.toml) or a distributed-noise job "
                             "(START_DISTRIBUTED / SEARCH_DISTRIBUTED: the score is the global model's, no personalisation)")
    parser.add_argument("--label-shift", action="store_true",
                        help="each pseudo-hospital's positive rate drawn from LABEL_SHIFT_PRIOR (a public prior), "
                             "so the search sees hospitals whose case mix differs from the source's")
    parser.add_argument("--side-by-side", action="store_true",
                        help="with --noise local: search SEARCH_DISTRIBUTED from START_DISTRIBUTED (same source "
                             "model, no personalisation) with local noise, for a like-for-like comparison")
    args = parser.parse_args()
    if args.side_by_side and args.noise != "local":
        parser.error("--side-by-side goes with --noise local")
    from tqdm import tqdm

    global _DATA, _DISTRIBUTED, _SIDE_BY_SIDE
    _DISTRIBUTED, _SIDE_BY_SIDE = args.noise == "distributed", args.side_by_side
    search = SEARCH_DISTRIBUTED if _DISTRIBUTED or _SIDE_BY_SIDE else SEARCH
    _DATA = cleveland_train()
    torch.set_num_threads(1)  # tiny models: one thread per job, --jobs jobs side by side
    pool: Any = multiprocessing.get_context("fork").Pool(args.jobs) if args.jobs > 1 else _Serial()
    total = args.passes * sum(len(values) for _, values in search) * args.repeats
    bar = tqdm(total=total, disable=args.no_progress, desc="pseudo-federated jobs (cached ones skipped)",
               file=sys.stderr)
    cache: dict[str, dict[str, Any]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    table: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for npass in range(1, args.passes + 1):
        for setting, values in search:
            rows = []
            for value in values:
                settings = merged(chosen, value)
                key = json.dumps(settings, sort_keys=True)
                if key not in cache:
                    runs = []
                    for run in pool.imap(_worker, [(settings, r, args.source_fraction, args.label_shift)
                                                         for r in range(args.repeats)]):
                        runs.append(run)
                        bar.update(1)
                    cache[key] = {m: float(np.mean([run[m] for run in runs])) for m in runs[0]}
                    cache[key]["score_sd"] = float(np.std([run["score"] for run in runs], ddof=1))
                    cache[key]["scores"] = [run["score"] for run in runs]
                    cache[key]["runs"] = runs
                else:
                    bar.update(args.repeats)
                rows.append((value, cache[key]))
            # The best mean score wins; an exact tie keeps the current value.
            current = merged(chosen)
            best_value, best_row = max(rows, key=lambda vr: (vr[1]["score"], merged(chosen, vr[0]) == current))
            for section, vals in best_value.items():
                chosen.setdefault(section, {}).update(vals)
            for value, row in rows:
                diff = np.array(row["scores"]) - np.array(best_row["scores"])  # paired: same partitions
                table.append({"pass": npass, "setting": setting, "value": label(value), "chosen": value is best_value,
                              **{m: round(row[m], 4) for m in ("source", "global", "personalised", "score",
                                                                "score_sd", "epsilon")},
                              "minus_chosen": round(float(diff.mean()), 4),
                              "minus_chosen_se": round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4)})
            bar.write(f"pass {npass}, {setting}: " + "; ".join(f"{label(v)} {row['score']:.3f}" for v, row in rows)
                      + f"  -> {label(best_value)}")
    bar.close()
    pool.close()
    result = {"repeats": args.repeats, "passes": args.passes, "source_fraction": args.source_fraction,
              "noise": args.noise, "label_shift": args.label_shift, "side_by_side": args.side_by_side, "start": merged(), "chosen": merged(chosen), "table": table, "jobs_run": len(cache) * args.repeats,
              "seconds": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count(), "worker_processes": args.jobs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_on_source.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("| pass | setting | value | source | global | personalised | score (mean ± sd) | minus chosen (± se) | chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['pass']} | {row['setting']} | {row['value']} | {row['source']:.3f} | {row['global']:.3f} | "
              f"{row['personalised']:.3f} | {row['score']:.3f} ± {row['score_sd']:.3f} | "
              f"{row['minus_chosen']:+.3f} ± {row['minus_chosen_se']:.3f} | {'**yes**' if row['chosen'] else ''} |")
    print(json.dumps({"chosen": result["chosen"], "jobs_run": result["jobs_run"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
