"""Where a client's DP randomness comes from: Poisson batch membership and Gaussian noise.

Subsampling amplification (the ``sample_rate`` in a :class:`~secfedtl.privacy.events.PoissonGaussianEvent`)
holds only if nobody outside the client can predict which records a step samples. Every sampling
decision on private data therefore comes from the operating system's CSPRNG (``os.urandom``), per
client and per step, never from a seedable generator and never from the public job seed.

:class:`Randomness` is the one object a client draws from:

* :meth:`Randomness.secure` (the default everywhere): batch membership from ``os.urandom``; noise from
  ``os.urandom`` (``secure_mode``) or from a torch generator of the client's own, seeded with 64 bits
  from ``os.urandom``. Its ledger label is ``"csprng"``.
* :meth:`Randomness.insecure_seeded` is for tests and reproducibility experiments only: sampling and
  noise follow a seed, so anyone who knows the seed can predict them. Its ledger label is
  ``"insecure_seeded"``, written into every ledger entry it charges, and ``secfedtl audit`` never
  certifies such an entry.

numpy and ``os`` only at import; torch is imported when a noise generator is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secfedtl.crypto.stream import KeyStream
from secfedtl.errors import ConfigError, InputError

__all__ = ["CERTIFIED_RANDOMNESS", "RANDOMNESS_LABELS", "Randomness", "secure_poisson_mask"]

#: The ledger label of randomness that DP accounting may certify.
CERTIFIED_RANDOMNESS = "csprng"
#: Every label a ledger entry may carry (``"unrecorded"``: a version-1 ledger, written before the
#: label existed, when Poisson batches followed the public job seed).
RANDOMNESS_LABELS = (CERTIFIED_RANDOMNESS, "insecure_seeded", "unrecorded")

_TWO_64 = 1 << 64


def _check_rate(n: int, sample_rate: float) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise InputError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def secure_poisson_mask(n: int, sample_rate: float) -> np.ndarray:
    """``n`` independent Bernoulli(``sample_rate``) decisions from ``os.urandom``, as a bool array.

    Each decision compares 64 fresh random bits with ``floor(sample_rate * 2**64)``: the inclusion
    probability is ``sample_rate`` to within ``2**-64``. ``sample_rate == 1`` includes everything.
    """
    _check_rate(n, sample_rate)
    if sample_rate >= 1.0:
        return np.ones(n, dtype=bool)
    if n == 0:
        return np.zeros(0, dtype=bool)
    threshold = np.uint64(min(_TWO_64 - 1, int(sample_rate * _TWO_64)))
    draws = np.frombuffer(os.urandom(8 * int(n)), dtype=np.uint64)
    return draws < threshold


@dataclass(frozen=True, kw_only=True)
class Randomness:
    """One client's source of sampling and noise randomness (see the module docstring).

    Build it with :meth:`secure` or :meth:`insecure_seeded`; the fields are not for callers.
    """

    label: str
    secure_noise: bool
    _seed: int | None = field(default=None, repr=False)
    _rng: np.random.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.label not in RANDOMNESS_LABELS[:2]:
            raise ConfigError(f"unknown randomness {self.label!r}")

    @classmethod
    def secure(cls, *, secure_mode: bool = True) -> Randomness:
        """Sampling from ``os.urandom``; noise from ``os.urandom`` (``secure_mode``) or from a
        torch generator seeded with 64 bits from ``os.urandom``."""
        if not isinstance(secure_mode, bool):
            raise ConfigError("secure_mode must be a bool")
        return cls(label=CERTIFIED_RANDOMNESS, secure_noise=secure_mode)

    @classmethod
    def insecure_seeded(cls, seed: int) -> Randomness:
        """TESTS ONLY: sampling and noise that anyone who knows ``seed`` can predict. Every ledger
        entry charged with it says so, and ``secfedtl audit`` does not certify it."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        return cls(label="insecure_seeded", secure_noise=False, _seed=seed,
                   _rng=np.random.default_rng([seed, 0x5A3D]))

    @property
    def certified(self) -> bool:
        """Whether DP accounting may certify mechanisms that draw from this randomness."""
        return self.label == CERTIFIED_RANDOMNESS

    def poisson_indices(self, n: int, sample_rate: float) -> np.ndarray:
        """Indices of the records one Poisson-sampled step includes (each with ``sample_rate``)."""
        if self._rng is not None:
            _check_rate(n, sample_rate)
            mask = self._rng.random(int(n)) < sample_rate
        else:
            mask = secure_poisson_mask(n, sample_rate)
        return np.flatnonzero(mask)

    def key_stream(self) -> KeyStream:
        """A fresh :class:`~secfedtl.crypto.stream.KeyStream` for integer noise and rounding
        (distributed DP): keyed from ``os.urandom`` for :meth:`secure`; for
        :meth:`insecure_seeded`, keyed from this object's seeded generator (reproducible, and
        labelled ``insecure_seeded``)."""
        if self._rng is not None:
            return KeyStream.insecure_seeded(int(self._rng.integers(0, 2**63)))
        return KeyStream.fresh()

    def noise_generator(self, device: Any = "cpu") -> Any:
        """The torch generator DP noise comes from, or ``None`` when every noise sample comes from
        ``os.urandom`` (``secure_mode``). Never torch's global generator."""
        if self.secure_noise:
            return None
        import torch

        gen = torch.Generator(device=device)
        if self._seed is not None:
            gen.manual_seed(self._seed * 2 + 1)
        else:
            gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return gen
