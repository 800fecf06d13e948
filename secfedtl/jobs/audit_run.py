"""`secfedtl audit-run JOB.toml`: an empirical lower bound on one hospital's epsilon, in one run.

The auditor inserts ``M`` canaries into one hospital's private training, each included
independently with probability 1/2 by a coin drawn from ``os.urandom`` and kept by the auditor,
runs the job otherwise unchanged on a throwaway privacy state, scores every canary from what the
chosen adversary sees, and turns the guesses into two lower bounds at 95% confidence
(:mod:`secfedtl.privacy.empirical`): the (epsilon, delta) bound of Steinke, Nasr and Jagielski
(2023), and the f-DP (Gaussian) bound of Mahloujifar, Melis and Chaudhuri (2025) with the
epsilon a Gaussian mechanism of that ``mu`` has at the ledger's delta. The report puts both next
to the epsilon the hospital's ledger certifies; an (epsilon, delta) lower bound above it is a
**violation** (exit status 4): the implementation does not deliver what the ledger claims. (The
f-DP number is a bound on epsilon only for a Gaussian-shaped privacy curve, so it is reported,
never a violation.)

Adversaries (``--adversary``), each stated in the report:

* ``whitebox`` (default): sees every noisy DP-SGD step of the hospital (the noisy sum of clipped
  gradients, before normalisation) and every public value (the ledger's mechanisms, the job seed,
  the hospital's other records). Canaries are **gradient (Dirac) canaries**: canary ``j`` is a
  gradient of norm ``max_grad_norm`` on a coordinate of its own, in a block of coordinates that the
  DP optimizer noises like every trained parameter and that no real record touches (so it does not
  change the model). Each included canary is Poisson-sampled every step with the hospital's sample
  rate, from the hospital's own :class:`~secfedtl.privacy.randomness.Randomness`. Scores: the
  likelihood ratio of "sampled with the ledger's rate, noised with the ledger's noise multiplier"
  against "absent"; and, for each public seed the job has, the score of an adversary that predicts
  the sampling from that seed (a run whose sampling follows a public value loses its subsampling
  amplification; the secure one draws from ``os.urandom`` and those scores are noise). The bound
  is the best of these scorers, at 95% confidence split over them (Bonferroni).
* ``server``: sees only what the server receives: the global model after every round (the decoded
  secure sums) and public values. Canaries are **input-space canaries**: out-of-distribution,
  mislabelled records (``x = +-scale * e_i`` on feature ``i``, labelled against the public
  source model), added to the hospital's
  training rows when included. Score: the largest one-round increase of the global model's margin
  for the canary's label on the canary (the source model is round 0). The server does
  not see personalisation, so its bound is compared with an epsilon that covers more than it sees.
* ``server-replicas`` (:func:`run_replica_audit`): the server reading everything hospitals send
  outside the masked sums (task replies' status and info), one canary record in each of ``M``
  replicas of the hospital; catches any value computed from the rows and sent in the clear.

What a lower bound means and does not mean: docs/privacy.md, "Empirical auditing".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError
from secfedtl.privacy.empirical import EmpiricalBound, GDPBound, audit_scores, audit_scores_gdp, gdp_mu_for_epsilon
from secfedtl.privacy.ledger import read_verified_ledger, spent_events
from secfedtl.privacy.accountants import compute_epsilon
from secfedtl.privacy.randomness import Randomness

__all__ = ["GradientCanaries", "VIOLATION_EXIT", "analyse", "draw_coins", "plot_report", "public_steps", "run_audit",
           "run_replica_audit", "whitebox_scores"]

#: Exit status of ``secfedtl audit-run`` when the lower bound is above the ledger's epsilon.
VIOLATION_EXIT = 4
ADVERSARIES = ("whitebox", "server", "server-replicas")
#: Where a replica hospital's canary record goes: its training (fit) rows, or its held-out test rows.
REPLICA_KINDS = ("fit", "test")


def draw_coins(m: int) -> np.ndarray:
    """``m`` fair coins from ``os.urandom`` (the auditor's secret: never seeded)."""
    raw = np.frombuffer(os.urandom(m), dtype=np.uint8)
    return (raw & 1).astype(bool)


class GradientCanaries:
    """Dirac gradient canaries for the white-box audit (:class:`secfedtl.training.dpsgd.AuditHook`).

    ``parameter`` is the canaries' own block of ``m`` coordinates; each step the hook samples the
    canary slots with the step's sample rate from the hospital's randomness (every slot, so the
    draw does not depend on the coins), adds ``clip_norm`` on the coordinate of every sampled
    *included* canary, and records the noisy block the optimizer produced."""

    def __init__(self, included: np.ndarray) -> None:
        self._included = np.asarray(included, dtype=bool)
        self.parameter = torch.zeros(len(self._included), requires_grad=True)
        self.observed: list[np.ndarray] = []

    def clipped_sum(self, randomness: Randomness, sample_rate: float, clip_norm: float) -> torch.Tensor:
        chosen = randomness.poisson_indices(len(self._included), sample_rate)
        g = torch.zeros(len(self._included))
        g[torch.from_numpy(chosen[self._included[chosen]])] = float(clip_norm)
        return g

    def observe(self, noisy_sums: list[torch.Tensor]) -> None:
        self.observed.append(noisy_sums[-1].detach().cpu().numpy().astype(np.float64).copy())


def public_steps(ledger_path: Path, client: str, job_id: str) -> list[tuple[float, float]]:
    """``(sample_rate, noise_multiplier)`` of every DP-SGD step this job charged to ``client``, in
    order, as the ledger records them (what the adversary knows)."""
    entries, _ = read_verified_ledger(ledger_path)
    steps: list[tuple[float, float]] = []
    pending = [e for e in entries if e.get("status") == "pending" and e.get("client") == client
               and e.get("job_id") == job_id and e.get("release") in ("dpsgd_update", "local_model")]
    for e in pending:
        steps += [(float(e["sample_rate"]), float(e["noise_multiplier"]))] * int(e["steps"])
    return steps


def whitebox_scores(observed: np.ndarray, public: list[tuple[float, float]], clip_norm: float) -> np.ndarray:
    """Per canary, the log likelihood ratio over every observed step of "included: sampled with
    rate q, shifted by clip_norm, noise sigma * clip_norm" against "absent" (q, sigma from the
    ledger). ``observed`` has shape (steps, m)."""
    n = min(len(observed), len(public))
    x = observed[:n] / clip_norm
    q = np.array([p[0] for p in public[:n]])[:, None]
    sigma = np.array([p[1] for p in public[:n]])[:, None]
    z = (x - 0.5) / sigma**2
    with np.errstate(divide="ignore"):
        per_step = np.logaddexp(np.log1p(-np.minimum(q, 1.0)), np.log(q) + z)
    return per_step.sum(axis=0)


def predicted_sampling_scores(observed: np.ndarray, *, seed: int, data_size: int, sample_rate: float,
                              clip_norm: float) -> np.ndarray:
    """The score of an adversary who predicts the Poisson sampling from a public ``seed`` (as if
    the hospital's randomness were ``Randomness.insecure_seeded(seed)``): the sum of the canary's
    coordinate over the steps it predicts the canary was sampled in."""
    rnd = Randomness.insecure_seeded(seed)
    m = observed.shape[1]
    scores = np.zeros(m)
    for row in observed:
        rnd.poisson_indices(data_size, sample_rate)  # the hospital's own records, then the canaries
        chosen = rnd.poisson_indices(m, sample_rate)
        scores[chosen] += row[chosen] / clip_norm - 0.5
    return scores


def canary_features(num_features: int, *, scale: float, source: torch.nn.Module) -> list[int]:
    """The features an input-space canary may sit on: those where the public source model predicts
    different classes for ``+scale`` and ``-scale`` (0 elsewhere). Only there does the canary's label
    (the class the source rejects) depend on its secret sign; on a feature the source ignores, both
    signs get the same label, and the hospital's own rows can teach the model that label before the
    canary does, which leaves an included canary with nothing to move."""
    x = np.zeros((2 * num_features, num_features), dtype=np.float32)
    x[np.arange(num_features), np.arange(num_features)] = scale
    x[num_features + np.arange(num_features), np.arange(num_features)] = -scale
    with torch.no_grad():
        predicted = source(torch.as_tensor(x)).argmax(dim=1).numpy()
    return [j for j in range(num_features) if predicted[j] != predicted[num_features + j]]


def input_canaries(num: int, num_features: int, *, scale: float, source: torch.nn.Module,
                   features: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``num`` out-of-distribution, mislabelled records, public (only their coins are secret):
    canary ``j`` is ``+-scale`` (sign from ``os.urandom``) on the ``j``-th of
    :func:`canary_features` and 0 elsewhere, labelled with the class the public source model does
    *not* predict for it. One canary per feature: two on one feature would move each other's
    margin, so more canaries than such features is refused. ``features``: those features, when
    the caller has already computed them for this ``source`` and ``scale``."""
    usable = canary_features(num_features, scale=scale, source=source) if features is None else features
    if num > len(usable):
        raise ConfigError(f"the server adversary places one canary per feature on which the source model's "
                          f"prediction follows the sign; this job has {len(usable)} such features, "
                          f"so at most {len(usable)} canaries, not {num}")
    signs = np.where(draw_coins(num), 1.0, -1.0)
    x = np.zeros((num, num_features), dtype=np.float32)
    x[np.arange(num), np.asarray(usable[:num], dtype=np.int64)] = scale * signs
    with torch.no_grad():
        predicted = source(torch.as_tensor(x)).argmax(dim=1).numpy()
    return x, (1 - predicted).astype(np.int64)


def _margins(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.as_tensor(x)).double().numpy()
    own = logits[np.arange(len(y)), y]
    other = logits[np.arange(len(y)), 1 - y]
    return own - other


def analyse(scorers: dict[str, np.ndarray], included: np.ndarray, *, delta: float, k: int | None = None,
            confidence: float = 0.95) -> tuple[str, EmpiricalBound, dict[str, EmpiricalBound], str, GDPBound,
                                                dict[str, GDPBound]]:
    """Both one-run bounds for every scorer, at ``confidence`` split over the scorers (Bonferroni):
    ``(best scorer, its (epsilon, delta) bound, every scorer's, best f-DP scorer, its Gaussian
    f-DP bound, every scorer's)``."""
    each = 1 - (1 - confidence) / len(scorers)
    results = {s: audit_scores(v, included, delta=delta, confidence=each, k=k) for s, v in scorers.items()}
    best_name = max(results, key=lambda s: results[s].epsilon_lower)
    gdp_results = {s: audit_scores_gdp(v, included, delta=delta, confidence=each, k=k) for s, v in scorers.items()}
    gdp_name = max(gdp_results, key=lambda s: gdp_results[s].mu_lower)
    return best_name, results[best_name], results, gdp_name, gdp_results[gdp_name], gdp_results


def _replica_canary(kind: str, num_features: int, *, validation_fraction: float, key: bytes) -> tuple[np.ndarray, int]:
    """The public canary record of a replica kind: ``+-5`` on one feature, 0 elsewhere, label 1;
    a ``fit`` canary is one the job's public split key sends to the fit rows."""
    from secfedtl.data import in_validation

    for j in range(4 * num_features):
        x = np.zeros(num_features, dtype=np.float64)
        x[j % num_features] = 5.0 if (j // num_features) % 2 == 0 else -5.0
        x = x.astype(np.float32)
        if kind == "test" or not in_validation(x, 1, validation_fraction, key):
            return x, 1
    raise ConfigError("no canary record lands in the fit rows")  # pragma: no cover (probability ~ 0.1^52)


def _clear_view(replies: list[bytes]) -> list[Any]:
    """What a server reads from a node's replies without any key: task replies' status and info in
    full, and only the kind of every secure-aggregation frame (their payloads are masked or
    fresh key material, different in every run)."""
    from secfedtl.federated import wire
    from secfedtl.secagg import codec

    view: list[Any] = []
    for blob in replies:
        msg = wire.decode(blob)
        if isinstance(msg, wire.TaskReply):
            view.append(("reply", msg.status, json.dumps(dict(msg.info), sort_keys=True)))
        else:
            view.append(("frame", type(codec.decode(msg.data)).__name__))
    return view


def _audited_client(config: Any, client: str | None, out: Path) -> str:
    """The audited hospital (default: the job's first), checked, and ``out`` made, refusing one
    that holds an earlier audit's throwaway privacy state (it would continue that budget)."""
    name = client or config["job"]["clients"][0]
    if name not in config["job"]["clients"]:
        raise ConfigError(f"{name!r} is not one of the job's clients {config['job']['clients']}")
    if (out / "privacy-state").exists():
        raise ConfigError(f"{out} holds an earlier audit (its throwaway privacy state would continue): "
                          "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    return name


def run_replica_audit(config: Any, out: Path, *, canaries: int | None = None, client: str | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """The server adversary against everything a hospital sends outside the masked sums.

    One canary record per hospital, in ``canaries`` (default 32) replicas of ``client`` (same rows, same
    declaration, each its own node, privacy state and ledger), in one run of the job on those
    replicas: replica ``i``'s canary is a training record for even ``i`` and a held-out test
    record for odd ``i`` (public), present when its secret coin says so. Four more replicas with
    publicly known canaries (in and out, of each kind) are the adversary's references; it may
    know every record but the canaries' coins, so it may hold such twins. The replicas' job plans
    personalisation (``[privacy] personalise = true``); the server runs the training rounds and
    spends that last task slot on an ``evaluate`` request. Its score for replica ``i``: +1 when the clear part of everything ``i`` sent (task
    replies' status and info; which secure-aggregation frames) equals the known-in reference's of
    the same kind, -1 when it equals the known-out one's, 0 otherwise. A correct pipeline sends
    the same data-free replies whatever the rows, so every score is 0 and no bound follows; a
    pipeline that puts anything computed from the rows in the clear (a count, an evaluation
    answer) splits the replicas by their coins."""
    from secfedtl.data import in_validation, split_key
    from secfedtl.jobs.heart import build_centres, build_job, job_id

    canaries = 32 if canaries is None else canaries
    if canaries < 4:
        raise ConfigError("need at least 4 replica canaries")
    name = _audited_client(config, client, out)
    included = draw_coins(canaries)
    centres = build_centres(config)
    base = centres[name]
    jcfg = config["job"]
    canary = {k: _replica_canary(k, base.x_train.shape[1], validation_fraction=jcfg["validation_fraction"],
                                 key=split_key(jcfg["seed"])) for k in REPLICA_KINDS}

    fit_key = split_key(jcfg["seed"])

    def with_canary(kind: str, present: bool, index: int) -> Any:
        # Every replica also gets a public filler row of its own in its fit rows, so that no two
        # hold the same data (a privacy state refuses data another hospital name protects).
        filler = np.zeros(base.x_train.shape[1], dtype=np.float32)
        j = 0
        while True:
            filler[0] = np.float32(1e-3 * (index + 1) + 1e-6 * j)
            if not in_validation(filler, 0, jcfg["validation_fraction"], fit_key):
                break
            j += 1
        c = dataclasses.replace(base, x_train=np.concatenate([base.x_train, filler[None]]),
                                y_train=np.concatenate([base.y_train, np.array([0], dtype=base.y_train.dtype)]))
        if not present:
            return c
        x, y = canary[kind]
        if kind == "fit":
            return dataclasses.replace(c, x_train=np.concatenate([c.x_train, x[None]]),
                                       y_train=np.concatenate([c.y_train, np.array([y], dtype=c.y_train.dtype)]))
        return dataclasses.replace(c, x_test=np.concatenate([c.x_test, x[None]]),
                                   y_test=np.concatenate([c.y_test, np.array([y], dtype=c.y_test.dtype)]))

    kinds = [REPLICA_KINDS[i % 2] for i in range(canaries)]
    names = [f"{name}-r{i:03d}" for i in range(canaries)]
    refs = {(k, present): f"{name}-{'in' if present else 'out'}-{k}" for k in REPLICA_KINDS for present in (True, False)}
    replica_centres = {jcfg["source"]: centres[jcfg["source"]]}
    replica_centres.update({n: with_canary(k, bool(b), i) for i, (n, k, b) in enumerate(zip(names, kinds, included))})
    replica_centres.update({n: with_canary(k, present, canaries + i) for i, ((k, present), n) in enumerate(refs.items())})
    all_names = names + list(refs.values())
    declared = config["declared"]["records"][name]
    cfg = config.updated({("job", "clients"): all_names, ("job", "id"): "audit-" + os.urandom(8).hex(),
                          ("declared", "records"): dict.fromkeys(all_names, declared),
                          ("privacy", "personalise"): True})
    t0, c0 = time.perf_counter(), time.process_time()
    job = build_job(cfg, out / "job", workers=0, state_dir=out / "privacy-state", centres=replica_centres)
    try:
        pool = job.federation.pool
        views: dict[str, list[Any]] = {n: [] for n in all_names}
        exchange = pool.exchange

        def recorded(requests: dict[str, list[bytes]], *, phase: str) -> dict[str, list[bytes]]:
            replies = exchange(requests, phase=phase)
            for n, blobs in replies.items():
                views[n].extend(_clear_view(blobs))
            return replies

        pool.exchange = recorded  # type: ignore[method-assign]
        rounds = cfg["job"]["rounds"]
        for _ in tqdm_range(rounds, progress, "training rounds (replicas)"):
            job.federation.run_round()
        job.federation.query("evaluate", round=rounds)
        scores = np.array([float(views[n] == views[refs[(k, True)]]) - float(views[n] == views[refs[(k, False)]])
                           for n, k in zip(names, kinds)])
        delta = float(cfg["privacy"]["delta"])
        eps_ledger = 0.0
        for n in all_names:
            entries, _ = read_verified_ledger(job.states[n].ledger.path)
            events = [ev for _, ev, _ in spent_events(entries).get(n, [])]
            if events:
                eps_ledger = max(eps_ledger, compute_epsilon(events, delta, accountant=cfg["privacy"]["accountant"]))
        jid = job_id(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        job.close()
    k_fixed = max(1, canaries // 4)
    scorer = "clear replies equal to the known-in (+1) or known-out (-1) twin of the same canary kind"
    best_name, bound, _, _, gdp, _ = analyse({scorer: scores}, included, delta=delta, k=k_fixed)
    differing = sorted({repr(v) for n in names for v in views[n]} - {repr(v) for v in views[refs[("fit", False)]]})
    report: dict[str, Any] = {
        "client": name, "adversary": "server-replicas",
        "adversary_sees": ("everything each replica sent the server outside the masked sums (task replies' status "
                           "and info; the kind of each secure-aggregation frame), after the job's training rounds "
                           "and one evaluate request; every public value and every record but the canaries' coins"),
        "canary_kind": "one record per replica hospital (even: a training row, odd: a held-out test row)",
        "canaries": canaries, "canaries_in": int(included.sum()), "coins": "os.urandom (secret to the auditor)",
        "confidence": 0.95, "scorer": best_name, "bound": bound.to_dict(),
        "fdp_gaussian": {**gdp.to_dict(), "ledger_mu": gdp_mu_for_epsilon(eps_ledger, delta),
                         "ratio": (gdp.epsilon_lower / eps_ledger) if eps_ledger > 0 else None},
        "per_scorer": {best_name: bound.epsilon_lower},
        "ledger_epsilon": eps_ledger, "ledger_accountant": cfg["privacy"]["accountant"], "ledger_epsilon_prv": None,
        "delta": delta, "ledger": "max over the replicas' ledgers",
        "violation": bool(bound.epsilon_lower > eps_ledger),
        "ratio": (bound.epsilon_lower / eps_ledger) if eps_ledger > 0 else None,
        "steps_or_rounds_observed": rounds, "job_id": jid, "wall_seconds": wall, "cpu_seconds": cpu,
        "pooled_test_accuracy": None,
        "clear_values_not_in_the_known_out_view": differing[:20],
        "scores": {"in": scores[included].tolist(), "out": scores[~included].tolist()},
    }
    (out / "audit.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_report(scores, included, report, out / "audit.png")
    return report


def tqdm_range(n: int, progress: bool, desc: str) -> Any:
    if not progress:
        return range(n)
    from tqdm import tqdm

    return tqdm(range(n), desc=desc)


def plot_report(scores: np.ndarray, included: np.ndarray, report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=min(60, max(10, len(scores) // 20)))
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"out ({int((~included).sum())})")
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"in ({int(included.sum())})")
    b = report["bound"]
    g = report["fdp_gaussian"]
    ax.set_title(f"{report['client']}, {report['adversary']} adversary (95%): eps >= {b['epsilon_lower']:.3f} "
                 f"[(eps, delta) test]; not {g['mu_lower']:.3f}-GDP (eps {g['epsilon_lower']:.3f}) [f-DP]; "
                 f"ledger {report['ledger_epsilon']:.3f}", fontsize=8)
    ax.set_xlabel(f"canary score ({report['scorer']})")
    ax.set_ylabel("canaries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_audit(config: Any, out: Path, *, canaries: int | None = None, client: str | None = None,
              adversary: str = "whitebox", scale: float = 100.0, baseline: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Run the job once with ``canaries`` canaries in ``client``'s training (default: its first
    hospital; default canaries: 1000 white-box, one per :func:`canary_features` for the server),
    on a throwaway privacy state in ``out/privacy-state``; write ``out/audit.json`` and
    ``out/audit.png``; return the report. ``baseline`` also runs the job without canaries (another
    throwaway state) to report the audit's extra time and the canaries' accuracy cost."""
    from secfedtl.jobs.heart import build_job, job_id, prepare_run, run_federation

    if adversary not in ADVERSARIES:
        raise ConfigError(f"adversary must be one of {ADVERSARIES}")
    if canaries is not None and canaries < 2:
        raise ConfigError("need at least 2 canaries")
    name = _audited_client(config, client, out)
    pc = None
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = prepare_run(config, out / "job", resume=False)
    job = build_job(cfg, out / "job", workers=0, state_dir=out / "privacy-state")
    try:
        hospital = job.hospitals[name]
        pc = hospital.client
        clip = float(cfg["training"]["max_grad_norm"])
        k = cfg["job"]["clients"].index(name)
        hook: GradientCanaries | None = None
        if adversary == "whitebox":
            canaries = 1000 if canaries is None else canaries
            included = draw_coins(canaries)
            hook = GradientCanaries(included)
            pc.audit_hook = hook
            data_size = len(pc._data)  # type: ignore[arg-type]
        else:
            num_features = job.source.centres[name].x_train.shape[1]
            usable = canary_features(num_features, scale=scale, source=job.source.model)
            if canaries is None:
                canaries = len(usable)
                if canaries < 2:
                    raise ConfigError(f"the source model's prediction follows the sign of only {canaries} "
                                      "feature(s): the server adversary needs at least 2")
            included = draw_coins(canaries)
            x_c, y_c = input_canaries(canaries, num_features, scale=scale, source=job.source.model, features=usable)
            backbone = job.source.model.backbone
            with torch.no_grad():
                f_c = backbone(torch.as_tensor(x_c)).float()
            data = pc._data
            assert isinstance(data, TensorDataset)
            inc = torch.from_numpy(included)
            pc._data = TensorDataset(torch.cat([data.tensors[0], f_c[inc]]),
                                     torch.cat([data.tensors[1], torch.as_tensor(y_c)[inc]]))
            # The server's view: the global model after every round (the decoded secure sums).
            snapshots = [job.federation.global_params.copy()]
            server_round = job.federation.run_round

            def observed_round() -> Any:
                report = server_round()
                snapshots.append(job.federation.global_params.copy())
                return report

            job.federation.run_round = observed_round  # type: ignore[method-assign]
        metrics = run_federation(cfg, job.source, job.federation, out / "job", progress=progress,
                                 experimenter=job.experimenter())
        job_cpu = time.process_time() - c0  # the job with its canaries, before any scoring
        ledger_path = job.states[name].ledger.path
        jid = job_id(cfg)
        scorers: dict[str, np.ndarray] = {}
        if hook is not None:
            observed = np.stack(hook.observed) if hook.observed else np.zeros((0, canaries))
            public = public_steps(ledger_path, name, jid)
            scorers["likelihood ratio (ledger q, sigma)"] = whitebox_scores(observed, public, clip)
            seeds = sorted({cfg["job"]["seed"], cfg["job"]["seed"] * 1000 + k})
            for s in seeds:
                scorers[f"sampling predicted from public seed {s}"] = predicted_sampling_scores(
                    observed, seed=s, data_size=data_size, sample_rate=public[0][0] if public else 0.0,
                    clip_norm=clip)
            steps_seen = int(len(observed))
        else:
            margins = np.stack([_margins(job.model_with(p), x_c, y_c) for p in snapshots])
            # The L2-SP pull towards the source undoes an early round's movement later, so the
            # score is the largest one-round increase, not the change over the whole job.
            scorers["largest one-round increase of the global model's margin on the canary"] = (
                np.diff(margins, axis=0).max(axis=0))
            steps_seen = len(metrics["server"]["rounds"])
        delta = float(cfg["privacy"]["delta"])
        # The server's few canaries cannot pay for a search over k: it guesses the top and bottom
        # quarter, fixed up front. The white-box audit searches the public grid (Bonferroni).
        k_fixed = max(1, (canaries + 2) // 4) if adversary == "server" else None  # a quarter, to the nearest
        best_name, bound, results, gdp_name, gdp, gdp_results = analyse(scorers, included, delta=delta, k=k_fixed)
        entries, _ = read_verified_ledger(ledger_path)
        events = [ev for _, ev, _ in spent_events(entries).get(name, [])]
        eps_ledger = compute_epsilon(events, delta, accountant=cfg["privacy"]["accountant"]) if events else 0.0
        eps_prv = compute_epsilon(events, delta, accountant="prv") if events else 0.0
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if pc is not None:
            pc.audit_hook = None
        job.close()
    sim = metrics.get("simulation_only", {}).get("final", {})
    report: dict[str, Any] = {
        "client": name, "adversary": adversary,
        "adversary_sees": ("every noisy DP-SGD step of the hospital (noisy clipped-gradient sums) and public values"
                           if adversary == "whitebox" else
                           "the global model after every round (decoded secure sums) and public values"),
        "canary_kind": "gradient (Dirac)" if adversary == "whitebox" else f"input-space (out-of-distribution, +-{scale:g} on one feature, mislabelled)",
        "canaries": canaries, "canaries_in": int(included.sum()), "coins": "os.urandom (secret to the auditor)",
        "confidence": 0.95, "scorer": best_name,
        "bound": bound.to_dict(),
        "per_scorer": {s: r.epsilon_lower for s, r in results.items()},
        # Mahloujifar et al.: the run is not mu_lower-GDP; epsilon_lower is what a mu_lower-GDP
        # mechanism has at delta (a bound on the run's epsilon only if its trade-off curve is
        # Gaussian), so it is reported next to the ledger, not used for the violation.
        "fdp_gaussian": {**gdp.to_dict(), "scorer": gdp_name,
                         "ledger_mu": gdp_mu_for_epsilon(eps_ledger, delta),
                         "ratio": (gdp.epsilon_lower / eps_ledger) if eps_ledger > 0 else None,
                         "per_scorer": {s: r.mu_lower for s, r in gdp_results.items()}},
        "ledger_epsilon": eps_ledger, "ledger_accountant": cfg["privacy"]["accountant"],
        "ledger_epsilon_prv": eps_prv, "delta": delta, "ledger": os.fspath(ledger_path),
        "violation": bool(bound.epsilon_lower > eps_ledger),
        "ratio": (bound.epsilon_lower / eps_ledger) if eps_ledger > 0 else None,
        "steps_or_rounds_observed": steps_seen,
        "job_id": jid, "wall_seconds": wall, "cpu_seconds": cpu, "job_cpu_seconds": job_cpu,
        "pooled_test_accuracy": sim.get("pooled_test_accuracy"),
        "scores": {"in": scorers[best_name][included].tolist(), "out": scorers[best_name][~included].tolist()},
    }
    if baseline:
        t1, c1 = time.perf_counter(), time.process_time()
        from secfedtl.jobs.heart import run_job

        base_cfg = prepare_run(config, out / "baseline", resume=False)
        base = run_job(base_cfg, out / "baseline", progress=False, workers=0, state_dir=out / "baseline-privacy-state")
        report["baseline"] = {"wall_seconds": time.perf_counter() - t1, "cpu_seconds": time.process_time() - c1,
                              "pooled_test_accuracy": base["simulation_only"]["final"]["pooled_test_accuracy"]}
    (out / "audit.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_report(scorers[best_name], included, report, out / "audit.png")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="job TOML file (schema: docs/config.md)")
    parser.add_argument("--canaries", type=int, default=None, metavar="M",
                        help="number of canaries (default: 1000 white-box, 32 server-replicas, and for the server one per "
                             "feature on which the source's prediction follows the sign: 13 for the heart job)")
    parser.add_argument("--client", default=None, help="the hospital to audit (default: the job's first)")
    parser.add_argument("--adversary", choices=ADVERSARIES, default="whitebox")
    parser.add_argument("--out", type=Path, default=Path("runs/audit"), help="output directory (audit.json, audit.png)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the job's public seed (overrides [job] seed); the canary coins are never seeded")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the job without canaries: extra time and accuracy cost of the audit")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from secfedtl.jobs.heart import HeartConfig

    config = HeartConfig.load(args.config).updated({("job", "seed"): args.seed})
    if args.adversary == "server-replicas":
        report = run_replica_audit(config, args.out, canaries=args.canaries, client=args.client,
                                   progress=not args.no_progress)
    else:
        report = run_audit(config, args.out, canaries=args.canaries, client=args.client, adversary=args.adversary,
                           baseline=args.baseline, progress=not args.no_progress)
    b = report["bound"]
    print(f"{report['client']}: {report['adversary']} adversary, {report['canaries']} {report['canary_kind']} canaries "
          f"({report['canaries_in']} in)")
    print(f"  empirical lower bound: epsilon >= {b['epsilon_lower']:.4f} at 95% confidence "
          f"(k+ = {b['k_plus']}, k- = {b['k_minus']}: {b['correct']}/{b['guesses']} right; scorer: {report['scorer']})")
    g = report["fdp_gaussian"]
    print(f"  f-DP (Gaussian) bound: not {g['mu_lower']:.4f}-GDP at 95% confidence, which is epsilon {g['epsilon_lower']:.4f} "
          f"at delta {report['delta']:g} for a Gaussian trade-off curve (k+ = {g['k_plus']}, k- = {g['k_minus']}: "
          f"{g['correct']}/{g['guesses']} right; the ledger's epsilon is mu {g['ledger_mu']:.4f})")
    prv = report["ledger_epsilon_prv"]
    print(f"  ledger epsilon ({report['ledger_accountant']}): {report['ledger_epsilon']:.4f}"
          + (f" (prv {prv:.4f})" if prv is not None else "") + f", delta {report['delta']:g}")
    if "baseline" in report:
        print(f"  time {report['wall_seconds']:.1f} s vs {report['baseline']['wall_seconds']:.1f} s without canaries; "
              f"pooled test accuracy {report['pooled_test_accuracy']:.3f} vs {report['baseline']['pooled_test_accuracy']:.3f}")
    print(f"wrote {args.out / 'audit.json'}, {args.out / 'audit.png'}")
    if report["violation"]:
        print("VIOLATION: the empirical lower bound is above the ledger's epsilon", file=sys.stderr)
        return VIOLATION_EXIT
    return 0
