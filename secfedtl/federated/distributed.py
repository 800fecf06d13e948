"""Distributed-noise jobs (``[privacy] noise = "distributed"``): one aggregation is one DP-SGD step.

In this mode a training round is ``steps_per_round`` *steps*; each step is one secure round of the
``"step"`` task (docs/privacy.md, "Distributed noise"; docs/config.md):

1. the server sends every hospital the global trainable weights and announces the integer field
   (``options["integer"]``: bits, vector length, cohort size) and the encoding it will decode with
   (``options["distributed"]``);
2. each hospital checks the announcement against the plan it computes *itself* from its own job
   file (:func:`plan_for`), refuses a cohort smaller than its policy's ``min_survivors`` before
   anything is charged (status ``refused``, reason ``policy``), charges one step of the
   :class:`~secfedtl.privacy.events.PoissonSkellamEvent` to its ledger, Poisson-samples its records
   at the public rate (secretly), encodes the per-example gradients to integers, adds its Skellam
   share and wraps modulo ``2**bits`` (:meth:`~secfedtl.training.PrivateClient.distributed_share`);
3. secure aggregation sums the field vectors (the integer input path: no fixed-point encoding, no
   weight word); each hospital joins only a session whose ``min_survivors`` is at least its own, so
   it never helps unmask a sum with fewer parties than its noise share assumes, and that tolerates
   its ``colluders`` against an active server (``2t - k - 1 >= colluders``);
4. the server decodes the noisy sum of clipped gradients, divides by the public normaliser (the
   expected batch across hospitals, from the declared counts) and applies its optimiser to
   ``-lr * gradient`` (FedAvg with server lr 1 is plain DP-SGD with step size ``[training] lr``).

Everything in :class:`DistributedSettings` and the plan is a function of the job file alone, so
the server and every hospital compute the same encoding and the same per-party noise share. The
share is sized so that the noise of ``min_survivors - colluders`` honest hospitals alone reaches
the job's epsilon over every planned step (:func:`secfedtl.privacy.distributed.plan_distributed`),
after the job's own releases before training (a preparation such as DP centring: the same public
mechanism at every hospital, charged and released before the first step; ``prior_events`` of
:func:`plan_for`); each hospital charges its steps with that honest count, and its budget guard
refuses a step that would take it over its budget (e.g. a hospital that spent some of it in other
jobs: it never adds less noise than the plan, it takes fewer steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secfedtl.encoding.distributed import DistributedEncoding, EncodingPlan, step_rotation_seed
from secfedtl.errors import AccountingError, ConfigError, PolicyError, RemoteProtocolError, TooFewSurvivorsError
from secfedtl.federated import wire
from secfedtl.federated.config import JobConfig
from secfedtl.privacy.discrete_noise import MAX_SKELLAM_MU
from secfedtl.privacy.distributed import CollusionPolicy, calibrate_distributed, plan_distributed
from secfedtl.privacy.events import DpEvent, PoissonSkellamEvent
from secfedtl.secagg.session import SessionParams
from secfedtl.training import PrivateClient, unflatten_params

__all__ = ["RELEASE", "STEP_TASK", "DistributedPlan", "DistributedSettings", "DistributedStepTask",
           "integer_spec", "plan_for", "settings_for"]

#: The task name of one distributed step, and the ledger's ``release`` for its output.
STEP_TASK = "step"
RELEASE = "distributed_share"
#: Wrap-around probability bound of one step's sum (utility only: wrapping never costs privacy).
WRAP_PROBABILITY = 1e-6


@dataclass(frozen=True, kw_only=True)
class DistributedSettings:
    """The public parameters of a distributed job, from its job file (:func:`settings_for`)."""

    policy: CollusionPolicy
    num_parties: int
    sample_rate: float  # every hospital samples each of its records with this probability
    normaliser: float  # expected records per step across hospitals: expected_batch_size
    steps_per_round: int
    rounds: int
    max_batch: int  # public high-probability bound on the records of one step (wrap rule)
    clip_norm: float
    bits: int
    lr: float
    epsilon: float
    delta: float
    job_seed: int
    #: ``[training] l2sp``: the server's step adds the L2-SP pull ``2 * l2sp * (w - w_source)`` to
    #: the noisy mean gradient (data-independent: post-processing, never announced or charged)
    l2sp: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def split(self, step: int) -> tuple[int, int]:
        """``(round, step within the round)`` of global step ``step``."""
        return divmod(step, self.steps_per_round)


@dataclass(frozen=True, kw_only=True)
class DistributedPlan:
    """The encoding every party uses and the one-step event every hospital charges."""

    settings: DistributedSettings
    encoding_plan: EncodingPlan
    event: PoissonSkellamEvent  # one step (steps=1)
    job_id: str
    #: What every hospital spends in this job before its steps (public, from the job file), which
    #: the share was calibrated after: the steps' event composed with these is within epsilon.
    prior_events: tuple[DpEvent, ...] = ()

    @property
    def encoding(self) -> DistributedEncoding:
        return self.encoding_plan.encoding

    def rotation_seed(self, step: int) -> bytes:
        r, s = self.settings.split(step)
        return step_rotation_seed(job_seed=self.settings.job_seed, job_id=self.job_id, round=r, step=s)

    def announcement(self) -> dict[str, Any]:
        """What a step request announces (``options["distributed"]``); nodes compare it with their own plan."""
        enc = self.encoding
        return {"scale": float(enc.scale), "dimension": enc.dimension, "rotate": enc.rotate,
                "share_variance": float(self.event.share_variance), "sample_rate": self.settings.sample_rate,
                # what every step's public rotation seed comes from: a server whose job file names
                # another job (e.g. a hashed id over a file that differs in a server-only key) is
                # refused here, instead of un-rotating every step's sum with the wrong seed
                "job_id": self.job_id, "job_seed": self.settings.job_seed}

    def check_session(self, step: int, session: SessionParams) -> None:
        """What a hospital checks before it sets up a pre-keyed step session (the keys of step
        ``step``'s secure aggregation, set up before the step's request exists; docs/protocol.md,
        "Pre-keyed steps"): a step of this job, this job's field and vector length, and a session
        that never unmasks a sum of fewer parties than the noise share assumes and tolerates as
        many colluders as it assumes. Raises :class:`PolicyError` / :class:`RemoteProtocolError`."""
        cfg, settings = session.config, self.settings
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < settings.total_steps:
            raise RemoteProtocolError(f"step {step!r} is not one of the job's {settings.total_steps} steps")
        if cfg.bits != self.encoding.bits or session.vector_length != self.encoding.padded_dimension:
            raise RemoteProtocolError("the session's field or vector length is not this job's")
        needed = settings.policy.min_survivors
        if cfg.num_clients < needed or cfg.min_survivors < needed:
            raise PolicyError(f"the session may unmask a sum of {cfg.min_survivors} parties; this hospital's "
                              f"noise share needs at least {needed}")
        if cfg.tolerated_colluders < settings.policy.colluders:
            raise PolicyError(f"the session tolerates {max(0, cfg.tolerated_colluders)} colluders; this "
                              f"hospital's noise share assumes {settings.policy.colluders}")

    def ledger_params(self) -> dict[str, Any]:
        """The public parameters recorded with each step beyond its event."""
        s, enc = self.settings, self.encoding
        return {"clip_norm": s.clip_norm, "normaliser": s.normaliser, "rotate": enc.rotate,
                "min_survivors": s.policy.min_survivors, "colluders": s.policy.colluders,
                "num_parties": s.num_parties, "planned_steps": s.total_steps,
                "wrap_probability": self.encoding_plan.wrap_probability}


def settings_for(config: JobConfig) -> DistributedSettings:
    """The distributed job's public parameters (:class:`ConfigError` for a local-noise job)."""
    if config.noise() != "distributed":
        raise ConfigError("this job adds its noise locally ([privacy] noise = \"local\")")
    job, priv, tcfg = config["job"], config["privacy"], config["training"]
    clients = job["clients"]
    policy = CollusionPolicy(min_survivors=priv.get("min_survivors", len(clients)), colluders=priv.get("colluders", 0))
    total = sum(config["declared"]["records"][n] for n in clients)
    batch = tcfg["expected_batch_size"]
    if not 1 <= batch <= total:
        raise ConfigError(f"[training] expected_batch_size must be between 1 and the declared {total} records")
    rate = batch / total
    steps = max(1, math.ceil(tcfg["epochs"] / rate - 1e-9))
    return DistributedSettings(policy=policy, num_parties=len(clients), sample_rate=rate, normaliser=float(batch),
                               steps_per_round=steps, rounds=job["rounds"],
                               max_batch=math.ceil(batch + 6.0 * math.sqrt(batch) + 1), clip_norm=tcfg["max_grad_norm"],
                               bits=config["secagg"]["bits"], lr=tcfg["lr"], epsilon=priv["epsilon"],
                               delta=priv["delta"], job_seed=job["seed"], l2sp=tcfg["l2sp"])


@functools.lru_cache(maxsize=16)
def _plan(settings: DistributedSettings, dimension: int,
          prior_events: tuple[DpEvent, ...]) -> tuple[EncodingPlan, PoissonSkellamEvent]:
    """:func:`plan_distributed` at the job's bit width, after the job's ``prior_events``, with the scale lowered (if needed) until
    one party's share is within what the exact sampler draws (``MAX_SKELLAM_MU``). A lower scale
    only leaves more of the field unused (the wrap probability can only fall) and costs rounding
    precision, which at that scale is far below the noise (a rounding error under ``1 / scale``
    per coordinate and example against a noise standard deviation of about ``noise_multiplier *
    clip_norm``)."""
    calibrate = dict(policy=settings.policy, target_epsilon=settings.epsilon, target_delta=settings.delta,
                     sample_rate=settings.sample_rate, steps=settings.total_steps, prior_events=prior_events)
    plan, event = plan_distributed(dimension=dimension, clip_norm=settings.clip_norm, bits=settings.bits,
                                   num_parties=settings.num_parties, max_batch=settings.max_batch,
                                   wrap_probability=WRAP_PROBABILITY, **calibrate)  # type: ignore[arg-type]
    for _ in range(20):
        if event.share_variance / 2.0 <= MAX_SKELLAM_MU:
            return plan, event
        shrink = 0.95 * math.sqrt(MAX_SKELLAM_MU / (event.share_variance / 2.0))
        encoding = dataclasses.replace(plan.encoding, scale=plan.encoding.scale * shrink)
        event = calibrate_distributed(encoding=encoding, **calibrate)  # type: ignore[arg-type]
        plan = dataclasses.replace(plan, encoding=encoding, share_variance=event.share_variance,
                                   noise_multiplier=math.sqrt(2.0 * event.total_mu) / event.l2_bound)
    raise ConfigError("no scale keeps one party's Skellam share within the exact sampler's range")


def plan_for(config: JobConfig, dimension: int, *, job_id: str,
             prior_events: Sequence[DpEvent] = ()) -> DistributedPlan:
    """The encoding and the one-step event of a distributed job whose global model has
    ``dimension`` trainable weights (the same on the server and at every hospital).

    ``prior_events``: what every hospital of this job spends before its steps, *from the job file
    alone* (a preparation's public mechanism: :meth:`~secfedtl.federated.job.FederatedJob.prior_events`);
    the share is calibrated so that they and every planned step compose to at most the job's
    epsilon. Never a hospital's own earlier spending: every party must compute the same plan, and
    a hospital that spent more elsewhere must not add less noise (its budget guard refuses the
    steps it cannot afford instead).

    Raises:
        ConfigError: a prior event that is not a public DP event, or no share meets the budget.
    """
    settings = settings_for(config)
    prior = tuple(prior_events)
    if not all(isinstance(e, DpEvent) for e in prior):
        raise ConfigError("prior_events must be DP events (the job's public mechanisms before training)")
    try:
        plan, event = _plan(settings, int(dimension), prior)
    except AccountingError as exc:
        raise ConfigError(f"no distributed noise share fits the budget after the {len(prior)} releases planned "
                          f"before training: {exc}") from exc
    return DistributedPlan(settings=settings, encoding_plan=plan, event=dataclasses.replace(event, steps=1),
                           job_id=job_id, prior_events=prior)


def integer_spec(options: Mapping[str, Any]) -> dict[str, int]:
    """The integer field a secure task's request announces (``options["integer"]``): ``bits``,
    ``length`` (words) and ``num_clients`` (the cohort)."""
    spec = options.get("integer")
    if not isinstance(spec, Mapping) or set(spec) != {"bits", "length", "num_clients"}:
        raise RemoteProtocolError("an integer task must announce its field (bits, length, num_clients)")
    for key, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RemoteProtocolError(f"the announced {key} is not a positive integer")
    return {k: int(v) for k, v in spec.items()}


class DistributedStepTask:
    """The ``"step"`` task of a hospital (module docstring, step 2). Everything it acts on comes
    from its own ``plan`` (computed from its own job file); the request only names the step and
    carries the global weights, and anything else it announces must match."""

    def __init__(self, client: PrivateClient, plan: DistributedPlan, *, frozen_hash: str | None = None) -> None:
        if not isinstance(plan, DistributedPlan):
            raise ConfigError("plan must be a DistributedPlan")
        if plan.encoding.dimension != sum(t.numel() for t in client.trainable_state().values()):
            raise ConfigError("the plan is for another model (its dimension differs)")
        self._client = client
        self._plan = plan
        self._template = client.trainable_state()
        self._frozen_hash = frozen_hash

    @property
    def min_survivors(self) -> int:
        return self._plan.settings.policy.min_survivors

    def check(self, request: wire.TaskRequest) -> dict[str, Any]:
        opts = request.options
        if opts.get("names") != self._client.trainable_names:
            raise RemoteProtocolError("the request trains other parameters than this client's model")
        if self._frozen_hash is not None and opts.get("frozen_hash") != self._frozen_hash:
            raise RemoteProtocolError("the request is for another source model (frozen weights differ)")
        plan = self._plan
        spec = integer_spec(opts)
        if spec["bits"] != plan.encoding.bits or spec["length"] != plan.encoding.padded_dimension:
            raise RemoteProtocolError("the announced field is not this job's")
        announced = opts.get("distributed")
        own = plan.announcement()
        if not isinstance(announced, Mapping) or set(announced) != set(own) or any(
                not _same(announced[k], v) for k, v in own.items()):
            raise RemoteProtocolError("the announced encoding is not the one this hospital's job file gives")
        if request.round >= plan.settings.total_steps:
            raise RemoteProtocolError(f"step {request.round} is beyond the job's {plan.settings.total_steps} steps")
        if spec["num_clients"] < self.min_survivors:
            # Refused before anything is charged: a smaller sum would carry less noise than assumed.
            raise TooFewSurvivorsError(f"a cohort of {spec['num_clients']}; this hospital's noise share assumes "
                                       f"at least {self.min_survivors} parties")
        return unflatten_params(request.weights(), self._template)

    def __call__(self, request: wire.TaskRequest, digest: str) -> Any:
        from secfedtl.federated.node import TaskOutput  # noqa: PLC0415 - node imports this module

        state = self.check(request)
        plan = self._plan
        r, s = plan.settings.split(request.round)
        field = self._client.distributed_share(
            global_state=state, round=request.round, model_hash=digest, encoding=plan.encoding, event=plan.event,
            rotation_seed=plan.rotation_seed(request.round),
            params={**plan.ledger_params(), "training_round": r, "step": s}, release=RELEASE)
        return TaskOutput(field=field, min_survivors=self.min_survivors, colluders=plan.settings.policy.colluders)


def _same(announced: Any, own: Any) -> bool:
    if isinstance(own, bool) or isinstance(announced, bool):
        return announced is own
    if isinstance(own, float):
        return isinstance(announced, (int, float)) and math.isclose(float(announced), own, rel_tol=1e-12)
    return bool(announced == own)


def decode_step(plan: DistributedPlan, field_sum: np.ndarray, step: int, *, params: np.ndarray,
                source: np.ndarray) -> np.ndarray:
    """The server's decode of one step at the global weights ``params``: the pseudo-gradient
    ``-lr * (noisy sum + normaliser * 2 * l2sp * (params - source))`` (float64) that its optimiser
    averages over the public normaliser, i.e. ``-lr`` times the noisy mean gradient plus the
    gradient of the L2-SP penalty ``l2sp * ||w - w_source||^2`` toward the source head ``source``
    (``[training] l2sp``; 0: none). The penalty involves no record, so adding it after the noise
    is post-processing, as it is for a local-noise client (docs/privacy.md)."""
    settings = plan.settings
    noisy_sum = plan.encoding.decode_sum(field_sum, rotation_seed=plan.rotation_seed(step))
    if settings.l2sp:
        noisy_sum = noisy_sum + settings.normaliser * 2.0 * settings.l2sp * (params - source)
    return -settings.lr * noisy_sum
