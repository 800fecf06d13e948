"""Server optimisers over securely aggregated, weighted sums of client updates.

With secure aggregation the server never sees one client's update. Each round it learns only

* ``weighted_sum = sum_k n_k * u_k`` -- a float64 vector, ``u_k = x_k - x_t`` being client
  ``k``'s change to the global parameters ``x_t`` (the *descent* direction), and
* ``total_weight = sum_k n_k`` -- the total of the clients' weights (usually example counts).

Every optimiser here uses only their quotient, the average update
``u_t = weighted_sum / total_weight``, following Reddi et al., "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2), where it is written Delta_t. The paper's pseudo-gradient
is ``-u_t``; we write the rules directly in terms of ``u_t`` so every rule *adds* to the
parameters:

* :class:`FedAvg`:   ``x <- x + lr * u``
* :class:`FedAvgM`:  ``m <- momentum * m + u``;                 ``x <- x + lr * m``
* :class:`FedAdagrad`: ``m <- b1 m + (1-b1) u``; ``v <- v + u^2``;  ``x <- x + lr m / (sqrt(v)+tau)``
* :class:`FedAdam`:  ``m`` as above; ``v <- b2 v + (1-b2) u^2``;    same ``x`` update
* :class:`FedYogi`:  ``m`` as above; ``v <- v - (1-b2) u^2 sign(v - u^2)``; same ``x`` update

As in the paper there is no bias correction; ``m`` starts at 0 and ``v`` at ``tau**2``
(Algorithm 2 asks for ``v_{-1} >= tau^2``).

Every ``step`` checks its inputs first and changes state second: an input that is rejected, or an
update that would overflow to NaN/inf, raises and leaves the optimiser exactly as it was.
State is saved as JSON-able dicts (float64 vectors as base64 of little-endian bytes), never pickle.
"""

from __future__ import annotations

import base64
import binascii
import math
from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from secfedtl.errors import AggregationError, ConfigError, InputError

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "SERVER_OPTIMIZERS",
    "ServerOptimizer",
    "FedAvg",
    "FedAvgM",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "average_update",
    "make_server_optimizer",
    "encode_vector",
    "decode_vector",
]

STATE_FORMAT = "secfedtl.server_optimizer"
STATE_VERSION = 1


# --- vector codec ----------------------------------------------------------------------------


def encode_vector(vector: np.ndarray) -> str:
    """Base64 of the vector as float64 little-endian bytes (JSON-able, exact)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f8").tobytes()).decode("ascii")


def decode_vector(text: object, *, length: int | None = None) -> np.ndarray:
    """Inverse of :func:`encode_vector`; raises :class:`InputError` on anything malformed."""
    if not isinstance(text, str):
        raise InputError(f"an encoded vector must be a str, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise InputError(f"invalid base64 vector: {exc}") from exc
    if len(raw) % 8:
        raise InputError(f"encoded vector has {len(raw)} bytes, not a multiple of 8")
    vector = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if length is not None and vector.shape[0] != length:
        raise InputError(f"encoded vector has length {vector.shape[0]}, expected {length}")
    if not np.isfinite(vector).all():
        raise InputError("encoded vector contains NaN or inf")
    return vector


# --- validation ------------------------------------------------------------------------------


def _check_hyper(name: str, value: object, *, low: float, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high)`` (``(low, high)`` with ``low_open``; no upper bound
    when ``high`` is None), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and v < high
    if not ok:
        lo = "(" if low_open else "["
        raise ConfigError(f"{name} must lie in {lo}{low}, {high if high is not None else 'inf'}), got {value!r}")
    return v


def _as_vector(name: str, value: object) -> np.ndarray:
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise InputError(f"{name} must be a 1-D array of real numbers, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged sequences and other junk
        raise InputError(f"{name} is not an array: {exc}") from exc
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise InputError(f"{name} contains NaN or inf")
    return out


def average_update(weighted_sum: object, total_weight: object) -> np.ndarray:
    """``weighted_sum / total_weight`` after checking both (the FedAvg average of the client updates)."""
    total = _check_total_weight(total_weight)
    with np.errstate(over="ignore"):
        mean_update = _as_vector("weighted_sum", weighted_sum) / total
    if not np.isfinite(mean_update).all():
        raise AggregationError("weighted_sum / total_weight overflowed")
    return mean_update


def _check_total_weight(total_weight: object) -> float:
    if isinstance(total_weight, bool) or not isinstance(
        total_weight, (int, float, np.integer, np.floating)
    ):
        raise InputError(f"total_weight must be a number, got {type(total_weight).__name__}")
    total = float(total_weight)
    if math.isnan(total) or math.isinf(total):
        raise InputError(f"total_weight must be finite, got {total_weight!r}")
    if total <= 0.0:
        raise AggregationError(
            f"total_weight must be > 0 (no client contributed?), got {total_weight!r}"
        )
    return total


# --- optimisers ------------------------------------------------------------------------------


class ServerOptimizer(ABC):
    """Base class: turns the global parameters and one round's aggregate into new parameters.

    Subclasses declare ``name`` (their registry key), ``_buffer_names`` (the state vectors they
    keep) and implement :meth:`_update`, which must be pure: it gets copies of the buffers and
    returns the new parameters and buffers, and the base class commits them only if all is finite.
    """

    name: ClassVar[str]
    _buffer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._num_steps = 0
        self._dim: int | None = None
        self._buffers: dict[str, np.ndarray] = {}

    # -- configuration --

    @abstractmethod
    def config(self) -> dict[str, float]:
        """Hyperparameters, as plain floats (part of the saved state)."""

    @property
    def num_steps(self) -> int:
        """How many rounds this optimiser has applied."""
        return self._num_steps

    @property
    def dim(self) -> int | None:
        """Length of the parameter vector, fixed by the first step (``None`` before it)."""
        return self._dim

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- the round --

    def step(
        self, global_params: np.ndarray, weighted_sum: np.ndarray, total_weight: float
    ) -> np.ndarray:
        """Apply one round; return new float64 parameters (``global_params`` is not modified).

        Raises :class:`InputError` for non-1-D, non-finite or mismatched vectors and
        :class:`AggregationError` for ``total_weight <= 0`` or an update that overflows; in every
        case the optimiser's state is unchanged.
        """
        params = _as_vector("global_params", global_params)
        total = _check_total_weight(total_weight)
        summed = _as_vector("weighted_sum", weighted_sum)
        if summed.shape != params.shape:
            raise InputError(
                f"weighted_sum has shape {summed.shape}, global_params {params.shape}"
            )
        if self._dim is not None and params.shape[0] != self._dim:
            raise InputError(
                f"this optimiser holds state for {self._dim} parameters, got {params.shape[0]}"
            )
        mean_update = average_update(summed, total)
        buffers = {
            key: (self._buffers[key].copy() if key in self._buffers else self._initial_buffer(key, params.shape[0]))
            for key in self._buffer_names
        }
        with np.errstate(over="ignore", invalid="ignore"):
            new_params, new_buffers = self._update(params, mean_update, buffers)
        if not np.isfinite(new_params).all() or not all(
            np.isfinite(b).all() for b in new_buffers.values()
        ):
            raise AggregationError(f"{self.name} update is not finite; state left unchanged")
        # commit
        self._buffers = new_buffers
        self._dim = params.shape[0]
        self._num_steps += 1
        return new_params

    def _initial_buffer(self, key: str, dim: int) -> np.ndarray:
        return np.zeros(dim, dtype=np.float64)

    @abstractmethod
    def _update(
        self, params: np.ndarray, mean_update: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Pure update rule on float64 copies; ``mean_update`` is the average client update."""

    # -- persistence --

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for resuming: format, version, name, config, step count, buffers."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "name": self.name,
            "config": self.config(),
            "num_steps": self._num_steps,
            "dim": self._dim,
            "buffers": {k: encode_vector(v) for k, v in sorted(self._buffers.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The state must come from an optimiser of the same
        kind and hyperparameters; anything else raises and leaves this optimiser unchanged."""
        if not isinstance(state, Mapping):
            raise InputError(f"state must be a mapping, got {type(state).__name__}")
        expected_keys = {"format", "version", "name", "config", "num_steps", "dim", "buffers"}
        if set(state) != expected_keys:
            raise InputError(f"state keys {sorted(state)} != {sorted(expected_keys)}")
        if state["format"] != STATE_FORMAT:
            raise InputError(f"not a server optimiser state: format={state['format']!r}")
        if isinstance(state["version"], bool) or state["version"] != STATE_VERSION:
            raise InputError(f"unknown state version {state['version']!r}")
        if state["name"] != self.name:
            raise ConfigError(f"state is for {state['name']!r}, this optimiser is {self.name!r}")
        config = state["config"]
        if not isinstance(config, Mapping) or dict(config) != self.config():
            raise ConfigError(
                f"state hyperparameters {config!r} differ from this optimiser's {self.config()!r}"
            )
        num_steps, dim = state["num_steps"], state["dim"]
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise InputError(f"num_steps must be a non-negative int, got {num_steps!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
            raise InputError(f"dim must be a positive int or None, got {dim!r}")
        if (dim is None) != (num_steps == 0):
            raise InputError("dim must be None exactly when no step has been taken")
        raw_buffers = state["buffers"]
        wanted = set(self._buffer_names) if num_steps > 0 else set()
        if not isinstance(raw_buffers, Mapping) or set(raw_buffers) != wanted:
            raise InputError(f"state buffers must be exactly {sorted(wanted)}")
        buffers = {k: decode_vector(v, length=dim) for k, v in raw_buffers.items()}
        self._validate_buffers(buffers)
        # commit
        self._num_steps = num_steps
        self._dim = dim
        self._buffers = buffers

    def _validate_buffers(self, buffers: Mapping[str, np.ndarray]) -> None:
        """Hook for invariants of restored buffers (e.g. a non-negative second moment)."""


class FedAvg(ServerOptimizer):
    """Federated averaging: ``x <- x + server_lr * weighted_sum / total_weight``."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = _check_hyper("server_lr", server_lr, low=0.0, low_open=True)

    def config(self) -> dict[str, float]:
        return {"server_lr": self.server_lr}

    def _update(
        self, params: np.ndarray, mean_update: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return params + self.server_lr * mean_update, {}


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): ``m <- momentum m + u; x <- x + lr m``.

    ``momentum=0`` is exactly :class:`FedAvg`.
    """

    name = "fedavgm"
    _buffer_names = ("momentum",)

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = _check_hyper("server_lr", server_lr, low=0.0, low_open=True)
        self.momentum = _check_hyper("momentum", momentum, low=0.0, high=1.0)

    def config(self) -> dict[str, float]:
        return {"server_lr": self.server_lr, "momentum": self.momentum}

    def _update(
        self, params: np.ndarray, mean_update: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m = self.momentum * buffers["momentum"] + mean_update
        return params + self.server_lr * m, {"momentum": m}


class _AdaptiveOptimizer(ServerOptimizer):
    """Shared parts of FedAdagrad/FedAdam/FedYogi (Reddi et al. 2021, Algorithm 2)."""

    _buffer_names = ("first_moment", "second_moment")

    def __init__(
        self, *, server_lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        self.server_lr = _check_hyper("server_lr", server_lr, low=0.0, low_open=True)
        self.beta1 = _check_hyper("beta1", beta1, low=0.0, high=1.0)
        self.beta2 = _check_hyper("beta2", beta2, low=0.0, high=1.0)
        self.tau = _check_hyper("tau", tau, low=0.0, low_open=True)

    def config(self) -> dict[str, float]:
        return {
            "server_lr": self.server_lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }

    def _initial_buffer(self, key: str, dim: int) -> np.ndarray:
        if key == "second_moment":
            return np.full(dim, self.tau**2, dtype=np.float64)
        return np.zeros(dim, dtype=np.float64)

    def _validate_buffers(self, buffers: Mapping[str, np.ndarray]) -> None:
        v = buffers.get("second_moment")
        if v is not None and (v < 0).any():
            raise InputError("second_moment must be non-negative")

    @abstractmethod
    def _second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        """The rule that tells the three adaptive optimisers apart."""

    def _update(
        self, params: np.ndarray, mean_update: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m = self.beta1 * buffers["first_moment"] + (1.0 - self.beta1) * mean_update
        v = self._second_moment(buffers["second_moment"], mean_update * mean_update)
        new_params = params + self.server_lr * m / (np.sqrt(v) + self.tau)
        return new_params, {"first_moment": m, "second_moment": v}


class FedAdagrad(_AdaptiveOptimizer):
    """FedAdagrad: ``v <- v + u^2`` (``beta2`` is unused but kept for a uniform config)."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        return v + update_sq


class FedAdam(_AdaptiveOptimizer):
    """FedAdam: ``v <- beta2 v + (1 - beta2) u^2``."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * update_sq


class FedYogi(_AdaptiveOptimizer):
    """FedYogi: ``v <- v - (1 - beta2) u^2 sign(v - u^2)``."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, update_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * update_sq * np.sign(v - update_sq)


SERVER_OPTIMIZERS: Mapping[str, Callable[..., ServerOptimizer]] = MappingProxyType({
    FedAvg.name: FedAvg,
    FedAvgM.name: FedAvgM,
    FedAdagrad.name: FedAdagrad,
    FedAdam.name: FedAdam,
    FedYogi.name: FedYogi,
})
"""Fixed registry: names are never looked up as import paths."""


def make_server_optimizer(name: str, **kwargs: Any) -> ServerOptimizer:
    """Build the optimiser registered under ``name`` with keyword hyperparameters.

    Unknown names or hyperparameters raise :class:`ConfigError`.
    """
    if not isinstance(name, str) or name.lower() not in SERVER_OPTIMIZERS:
        raise ConfigError(
            f"unknown server optimiser {name!r}; choose one of {sorted(SERVER_OPTIMIZERS)}"
        )
    factory = SERVER_OPTIMIZERS[name.lower()]
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for {name!r}: {exc}") from exc
