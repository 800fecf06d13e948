"""The private client: turns the global trainable weights plus local data into a DP update.

Order of a round (:meth:`PrivateClient.train_round`):

1. check the incoming global state (exactly the trainable names, right shapes, finite);
2. build the round's DP event ``PoissonGaussianEvent(sample_rate, noise_multiplier, steps)``;
3. ``with guard.charge(event, round=..., model_hash=...)``: the guard refuses with
   :class:`~secfedtl.errors.PrivacyBudgetExceeded` *before* anything runs, so a refused round
   trains nothing and leaves the model bitwise unchanged;
4. inside the block, train a copy of the model with DP-SGD (:func:`~secfedtl.training.dpsgd.run_dp_sgd`);
5. only when training succeeded are the new weights copied into the client's model and the update
   (``new - global``, trainable parameters only) returned. A failure (e.g. non-finite loss ->
   :class:`~secfedtl.errors.TrainingError`) leaves the model as it was.

The guard is injected (anything with a ``charge`` context manager, :class:`BudgetGuardLike`); the
real one is :class:`secfedtl.privacy.budget.BudgetGuard`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from secfedtl.errors import ConfigError, InputError, ReplayError, TrainingError
from secfedtl.training.config import DPTrainingConfig
from secfedtl.privacy.randomness import Randomness
from secfedtl.training.dpsgd import GradientRegularizer, PerSampleLoss, run_dp_sgd
from secfedtl.training.update import ClientUpdate, model_with_params
from secfedtl.transfer.batchnorm import prepare_for_dp
from secfedtl.transfer.caching import cache_features, check_frozen_deterministic, split_head
from secfedtl.transfer.distillation import cross_entropy_loss

__all__ = ["MAX_ABS_WEIGHT", "BudgetGuardLike", "PrivateClient"]

#: Global weights a client accepts from the server (a public check of the server's input, made
#: before anything is charged): larger ones serve no model and only help a server make a record's
#: loss overflow. (Records with a non-finite loss contribute zero anyway; see run_dp_sgd.)
MAX_ABS_WEIGHT = 1e6


class BudgetGuardLike(Protocol):
    """What the trainer needs of a budget guard (``secfedtl.privacy.budget.BudgetGuard``)."""

    def charge(
        self, event: Any, *, round: int, model_hash: str, release: str, randomness: str,
        params: Mapping[str, Any],
    ) -> contextlib.AbstractContextManager[Any]: ...


def _make_event(*, sample_rate: float, noise_multiplier: float, steps: int) -> Any:
    from secfedtl.privacy.events import PoissonGaussianEvent

    return PoissonGaussianEvent(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps)


def _calibrate(*, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from secfedtl.privacy.accountants import calibrate_noise_multiplier

    return float(
        calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


class PrivateClient:
    """One client that fine-tunes its copy of the transferred model with DP-SGD.

    ``model`` must already have its freezing policy applied (``requires_grad`` marks what is
    trained). It is prepared for DP: trainable BatchNorm becomes GroupNorm (with a warning), frozen
    BatchNorm and dropout in frozen parts are pinned in eval mode.

    With ``cache_features=True`` and ``head`` naming the last module of the forward pass (e.g.
    ``"fc"``), the frozen backbone is run once over ``train_data`` and only the head is trained on
    the cached features; refused with :class:`ConfigError` when the backbone has trainable
    parameters or is not deterministic, or with a custom ``loss_fn`` (which may need raw inputs).
    The cache is float32, written in place batch by batch; ``feature_buffer`` (optional, only with
    ``cache_features=True``) is where: a float32 tensor of shape ``(len(train_data), d)``, e.g. a
    row slice of one buffer that holds several datasets' features, or ``torch.from_numpy`` of a
    ``np.memmap``; the client then trains on that storage itself (see
    :func:`~secfedtl.transfer.caching.cache_features`), ``cache_batch_size`` rows per backbone call.

    Randomness: Poisson batches and noise come from ``randomness``
    (:class:`~secfedtl.privacy.randomness.Randomness`; default :meth:`Randomness.secure`: batch
    membership from ``os.urandom``, noise from ``os.urandom`` in ``secure_mode`` or else from a
    generator of the client's own seeded from ``os.urandom``), never from torch's global
    generator or a public seed. :meth:`Randomness.insecure_seeded` is for tests only; the ledger
    entries it charges say so and ``secfedtl audit`` does not certify them.

    Public mechanism: the sample rate, steps, noise multiplier, normaliser and clip are functions
    of ``config`` alone (``config.public_dataset_size`` is the declared public record count); the
    private ``len(train_data)`` is never used for them, and the update's FedAvg weight is the
    declared count.
    """

    def __init__(
        self,
        *,
        client_id: str,
        model: nn.Module,
        train_data: Dataset,
        config: DPTrainingConfig,
        guard: BudgetGuardLike,
        loss_fn: PerSampleLoss | None = None,
        regularizer: GradientRegularizer | None = None,
        head: str | None = None,
        cache_features: bool = False,
        feature_buffer: torch.Tensor | None = None,
        randomness: Randomness | None = None,
        cache_batch_size: int = 64,
    ) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise InputError("client_id must be a non-empty string")
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, not {type(model).__name__}")
        if not isinstance(config, DPTrainingConfig):
            raise InputError("config must be a DPTrainingConfig")
        if not callable(getattr(guard, "charge", None)):
            raise InputError("guard must provide charge(event, *, round, model_hash)")
        budget = getattr(guard, "budget", None)
        spent_by = getattr(budget, "accountant_name", config.accountant)
        if config.noise_multiplier is None and spent_by != config.accountant:
            # Noise calibrated for one accountant but charged by another would overrun (PRV
            # noise under an RDP budget) or waste (the reverse) the budget.
            raise ConfigError(
                f"noise is calibrated with the {config.accountant!r} accountant but the budget "
                f"is kept by {spent_by!r}; set DPTrainingConfig.accountant={spent_by!r}"
            )
        if feature_buffer is not None and not cache_features:
            raise ConfigError("feature_buffer is where cached features go: it needs cache_features=True")
        if randomness is None:
            randomness = Randomness.secure(secure_mode=config.secure_mode)
        if not isinstance(randomness, Randomness):
            raise InputError("randomness must be a secfedtl.privacy.randomness.Randomness")
        if config.secure_mode and not randomness.secure_noise:
            raise ConfigError("secure_mode draws noise from the OS CSPRNG; insecure seeded randomness is refused")
        sample_rate = config.sample_rate  # ConfigError without a declared public_dataset_size
        try:
            dataset_size = len(train_data)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InputError("train_data must have a length") from exc
        if dataset_size < 1:
            raise InputError("train_data is empty")
        self.client_id = client_id
        self.config = config
        self._guard = guard
        self._device = config.resolve_device()
        self._model = prepare_for_dp(copy.deepcopy(model))
        self._trainable = [n for n, p in self._model.named_parameters() if p.requires_grad]
        if not self._trainable:
            raise ConfigError("the model has no trainable parameters: apply a freezing policy")
        self._loss_fn: PerSampleLoss = loss_fn if loss_fn is not None else cross_entropy_loss
        self._regularizer = regularizer
        self.randomness = randomness
        # made on first use, in the process that trains: a CUDA generator made here would
        # initialise CUDA before a worker pool forks, and forked children cannot use it
        self._noise_generator: Any = None
        self._noise_generator_made = False
        self.weight = int(config.public_dataset_size)  # type: ignore[arg-type]  # declared, public
        self.sample_rate = sample_rate
        self.local_steps = config.local_steps()
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            assert config.planned_rounds is not None
            self.noise_multiplier = _calibrate(
                target_epsilon=float(config.target_epsilon),  # type: ignore[arg-type]
                target_delta=float(config.target_delta),  # type: ignore[arg-type]
                sample_rate=self.sample_rate,
                steps=config.planned_rounds * self.local_steps,
                accountant=config.accountant,
            )
        self._head = head
        #: empirical audits only (:mod:`secfedtl.jobs.audit_run`): a :class:`~secfedtl.training.dpsgd.AuditHook`
        #: handed to every DP-SGD run; ``None`` (always, in a real job) changes nothing.
        self.audit_hook: Any = None
        self._data: Dataset = train_data
        self._cached = False
        if cache_features:
            self._data = self._build_cache(train_data, head, loss_fn, feature_buffer, cache_batch_size)
            self._cached = True

    def _build_cache(self, train_data: Dataset, head: str | None, loss_fn: PerSampleLoss | None,
                     feature_buffer: torch.Tensor | None, batch_size: int) -> Dataset:
        if head is None:
            raise ConfigError("cache_features needs the name of the head module")
        if loss_fn is not None:
            raise ConfigError("cache_features trains the head on features; a custom loss_fn is not supported")
        backbone, head_module = split_head(self._model, head)
        head_names = {f"{head}.{n}" for n, _ in head_module.named_parameters()}
        extra = sorted(set(self._trainable) - head_names)
        if extra:
            raise ConfigError(f"cannot cache features: trainable parameters outside the head: {', '.join(extra)}")
        backbone.train()  # pinned modules stay in eval: this is what private training would see
        check_frozen_deterministic(backbone)
        features = cache_features(backbone, train_data, batch_size=batch_size, out=feature_buffer)
        # The split must reproduce the model: head(backbone(x)) == model(x) on a probe batch.
        probe_x = torch.stack([train_data[i][0] for i in range(min(4, len(features)))])  # type: ignore[index]
        was = self._model.training
        self._model.eval()
        head_module.eval()
        with torch.no_grad():
            same = torch.allclose(head_module(backbone(probe_x).reshape(len(probe_x), -1)), self._model(probe_x), atol=1e-5)
        self._model.train(was)
        if not same:
            raise ConfigError(f"model(x) is not {head}(backbone(x)): cannot cache features for this model")
        return features

    @property
    def model(self) -> nn.Module:
        """The client's model (after the last successful round)."""
        return self._model

    @property
    def trainable_names(self) -> list[str]:
        """Names of the trained parameters; the keys of ``global_state`` and of every model update."""
        return list(self._trainable)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the current trainable parameters."""
        params = dict(self._model.named_parameters())
        return {n: params[n].detach().clone() for n in self._trainable}

    def _check_global_state(self, global_state: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(global_state, Mapping):
            raise InputError("global_state must map parameter names to tensors")
        missing = sorted(set(self._trainable) - set(global_state))
        unexpected = sorted(set(global_state) - set(self._trainable))
        if missing or unexpected:
            raise InputError(
                f"global_state must hold exactly the trainable parameters; missing {missing}, unexpected {unexpected}"
            )
        params = dict(self._model.named_parameters())
        for name in self._trainable:
            t = global_state[name]
            if not isinstance(t, torch.Tensor) or t.shape != params[name].shape:
                raise InputError(f"global_state[{name!r}] must be a tensor of shape {tuple(params[name].shape)}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise InputError(f"global_state[{name!r}] must be finite floating point")
            if bool((t.abs() > MAX_ABS_WEIGHT).any()):
                raise InputError(f"global_state[{name!r}] has weights beyond the public bound {MAX_ABS_WEIGHT:g}")

    def make_event(self) -> Any:
        """The DP event one round runs: Poisson sampling + Gaussian noise for ``local_steps`` steps."""
        return _make_event(
            sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=self.local_steps
        )

    def mechanism_params(self) -> dict[str, Any]:
        """The public parameters of the round's mechanism beyond its event (for the ledger): all
        functions of the configuration, none of the private data."""
        return {"clip_norm": self.config.max_grad_norm, "normaliser": self.config.expected_batch_size,
                "public_dataset_size": self.weight, "secure_mode": self.config.secure_mode,
                "clipping": self.config.clipping}

    def _check_before_charge(self, *, round: int, model_hash: str,  # noqa: A002
                             global_state: Mapping[str, torch.Tensor], release: str, unit: str) -> None:
        """What every charged release checks first: the round, the model hash, the global state,
        and that the ledger has not already charged this ``unit`` (round or step) for ``release``."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise InputError(f"round must be a non-negative int, got {round!r}")
        if not isinstance(model_hash, str) or not model_hash:
            raise InputError("model_hash must be a non-empty string")
        self._check_global_state(global_state)
        already = getattr(self._guard, "already_charged", None)
        if already is not None and already(round=round, release=release):
            again = "training it again" if unit == "round" else "running it again"
            raise ReplayError(f"{unit} {round} of this job was already charged ({release}); not {again}")

    def train_round(self, *, global_state: Mapping[str, torch.Tensor], round: int, model_hash: str,
                    release: str = "dpsgd_update") -> ClientUpdate:
        """Charge the round's event to the guard (its ledger entry says it releases ``release``:
        ``"dpsgd_update"`` for an update that leaves the client, ``"local_model"`` for one that
        stays), then train; see the module docstring."""
        self._check_before_charge(round=round, model_hash=model_hash, global_state=global_state, release=release,
                                  unit="round")
        event = self.make_event()
        with self._guard.charge(event, round=round, model_hash=model_hash, release=release,
                                randomness=self.randomness.label, params=self.mechanism_params()):
            work = model_with_params(self._model, {n: global_state[n] for n in self._trainable})
            params = dict(work.named_parameters())
            work.to(self._device)
            if not self._noise_generator_made:
                self._noise_generator = self.randomness.noise_generator(self._device)
                self._noise_generator_made = True
            start = {n: params[n].detach().clone() for n in self._trainable}
            trained = work.get_submodule(self._head) if self._cached and self._head else work
            try:
                run_dp_sgd(
                    model=trained,
                    data=self._data,
                    config=self.config,
                    noise_multiplier=self.noise_multiplier,
                    steps=self.local_steps,
                    sample_rate=self.sample_rate,
                    loss_fn=self._loss_fn,
                    regularizer=self._regularizer,
                    regularized_model=work,
                    randomness=self.randomness,
                    noise_generator=self._noise_generator,
                    device=self._device,
                    audit=self.audit_hook,
                )
            except NotImplementedError as exc:  # Opacus: layer without per-sample gradients
                raise TrainingError(f"Opacus cannot train this model privately: {exc}") from exc
            model_update = {n: (params[n].detach() - start[n]).to("cpu") for n in self._trainable}
            if not all(torch.isfinite(d).all() for d in model_update.values()):
                raise TrainingError("non-finite update")
        work.to("cpu")
        own = dict(self._model.named_parameters())
        with torch.no_grad():
            for name in self._trainable:
                own[name].copy_(params[name].detach().to(own[name].device))
        return ClientUpdate(model_update=model_update, weight=self.weight, event=event)

    def distributed_share(self, *, global_state: Mapping[str, torch.Tensor], round: int, model_hash: str,
                          encoding: Any, event: Any, rotation_seed: bytes,
                          params: Mapping[str, Any], release: str = "distributed_share") -> Any:
        """One distributed DP-SGD step (:mod:`secfedtl.federated.distributed`): charge ``event``
        (a :class:`~secfedtl.privacy.events.PoissonSkellamEvent` of one step) to the guard, then
        Poisson-sample this client's records at the event's public ``sample_rate`` (what is
        charged is what runs: there is no other rate to pass; secretly, from
        :attr:`randomness`), compute their per-example gradients at ``global_state`` and return
        this client's field vector: the encoded sum plus its Skellam noise share, modulo
        ``2**encoding.bits`` (:func:`secfedtl.privacy.distributed.noisy_share`; rounding and noise
        from a :class:`~secfedtl.crypto.stream.KeyStream` of :attr:`randomness`). The client's own
        model is not changed: the server takes the step."""
        from secfedtl.privacy.distributed import noisy_share  # noqa: PLC0415
        from secfedtl.training.dpsgd import _batch  # noqa: PLC0415
        from secfedtl.training.examples import per_example_gradients  # noqa: PLC0415

        self._check_before_charge(round=round, model_hash=model_hash, global_state=global_state, release=release,
                                  unit="step")
        sample_rate = getattr(event, "sample_rate", None)
        if (isinstance(sample_rate, bool) or not isinstance(sample_rate, float | int)
                or not 0.0 < float(sample_rate) <= 1.0):
            raise ConfigError(f"a distributed step charges a Poisson-sampled event; {type(event).__name__} has "
                              f"sample rate {sample_rate!r}")
        with self._guard.charge(event, round=round, model_hash=model_hash, release=release,
                                randomness=self.randomness.label, params=dict(params)):
            work = model_with_params(self._model, {n: global_state[n] for n in self._trainable})
            if self._cached and self._head:
                module, prefix = work.get_submodule(self._head), self._head + "."
            else:
                module, prefix = work, ""
            chosen = torch.from_numpy(self.randomness.poisson_indices(len(self._data), float(sample_rate)))  # type: ignore[arg-type]
            if chosen.numel() == 0:
                # An empty Poisson batch is a zero sum and the step still releases its noise share:
                # failing here would tell the server the batch was empty, which no entry accounts for.
                gradients = np.zeros((0, encoding.dimension), dtype=np.float64)
            else:
                x, y = _batch(self._data, chosen)
                gradients = per_example_gradients(module, x, y, loss_fn=self._loss_fn, prefix=prefix)
            return noisy_share(encoding, gradients, event=event, rotation_seed=rotation_seed,
                               stream=self.randomness.key_stream())
