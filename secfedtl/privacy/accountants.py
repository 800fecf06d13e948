"""Privacy accountants: turn a sequence of DP events (:mod:`secfedtl.privacy.events`) into an epsilon.

Two accountants share one interface (``name``, ``compose``, ``get_epsilon``, ``events``,
``to_dict``/``from_dict``, ``copy``):

* :class:`RDPAccountant` -- Renyi-DP composition (Mironov 2017; Mironov, Talwar, Zhang 2019),
  computed by :mod:`secfedtl.privacy._rdp` in pure Python (so auditing does not import torch), over
  Opacus' default orders ``1.1, 1.2, ..., 10.9, 12, 13, ..., 63``, converted to (epsilon, delta)
  with the improved conversion of Balle et al. 2020 as Opacus implements it. With these orders it
  reproduces the epsilon Opacus' ``RDPAccountant`` reports for the same history. It is a valid
  upper bound but loose; note its floor: however large the noise, RDP over these orders never
  reports less than about 0.103 at delta=1e-5. It also interprets :class:`PoissonSkellamEvent`
  (distributed DP) through :mod:`secfedtl.privacy._rdp_skellam`, and composes both kinds.
* :class:`PRVAccountant` -- numerical composition of privacy-loss random variables (Gopi, Lee,
  Wutschitz 2021) via Opacus' implementation. It returns the *upper* end of its error interval
  (``eps_error=0.01`` by default), so it is still a guarantee, and it is much tighter than RDP.
  It interprets only :class:`PoissonGaussianEvent`: composing a Skellam event raises
  :class:`AccountingError` (``supports`` says so beforehand).

The accountant's state is only the list of events composed so far; epsilon is recomputed from it.
Events with the same ``(sample_rate, noise_multiplier)`` are merged before accounting (composition
is commutative), so ``compose(a)`` then ``compose(b)`` gives exactly the epsilon of one event with
``a.steps + b.steps`` steps.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol

from secfedtl.errors import AccountingError
from secfedtl.privacy._rdp import epsilon_from_rdp, rdp_poisson_gaussian
from secfedtl.privacy._rdp_skellam import rdp_poisson_skellam
from secfedtl.privacy.events import DpEvent, PoissonGaussianEvent, PoissonSkellamEvent, event_from_dict

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "PRVAccountant",
    "RDPAccountant",
    "calibrate_gaussian_sum",
    "calibrate_noise_multiplier",
    "calibrate_skellam_share",
    "compute_epsilon",
    "make_accountant",
]

#: Version of the accountant ``to_dict`` format.
STATE_VERSION = 1

#: Opacus' default RDP orders (``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS``).
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise AccountingError(f"delta must be a real number, got {type(delta).__name__}")
    if not (math.isfinite(delta) and 0.0 < delta < 1.0):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _grouped(events: Iterable[DpEvent]) -> list[tuple[float, float, int]]:
    """Merge Gaussian events by ``(noise_multiplier, sample_rate)``: ``[(sigma, q, total_steps), ...]``."""
    totals: dict[tuple[float, float], int] = {}
    for event in events:
        if not isinstance(event, PoissonGaussianEvent):
            continue
        key = (event.noise_multiplier, event.sample_rate)
        totals[key] = totals.get(key, 0) + event.steps
    return [(sigma, q, steps) for (sigma, q), steps in sorted(totals.items())]


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step of the subsampled Gaussian at every order of :data:`RDP_ORDERS`."""
    return tuple(rdp_poisson_gaussian(sample_rate, noise_multiplier, a) for a in RDP_ORDERS)


def _skellam_key(event: PoissonSkellamEvent) -> tuple[float, float, float, float]:
    return (event.sample_rate, event.total_mu, event.l2_bound, event.l1_bound)


@functools.lru_cache(maxsize=4096)
def _rdp_one_skellam_step(sample_rate: float, mu: float, l2: float, l1: float) -> tuple[float, ...]:
    """RDP of one step of the subsampled Skellam mechanism at every order of :data:`RDP_ORDERS`."""
    return tuple(rdp_poisson_skellam(sample_rate, a, mu=mu, l2=l2, l1=l1) for a in RDP_ORDERS)


def rdp_curve(events: Iterable[DpEvent]) -> list[float]:
    """Composed RDP of ``events`` at every order of :data:`RDP_ORDERS` (RDP adds up)."""
    rdp = [0.0] * len(RDP_ORDERS)
    for sigma, q, steps in _grouped(events):
        rdp = [total + steps * one for total, one in zip(rdp, _rdp_one_step(q, sigma))]
    skellam: dict[tuple[float, float, float, float], int] = {}
    for event in events:
        if isinstance(event, PoissonSkellamEvent):
            skellam[_skellam_key(event)] = skellam.get(_skellam_key(event), 0) + event.steps
    for key, steps in sorted(skellam.items()):
        rdp = [total + steps * one for total, one in zip(rdp, _rdp_one_skellam_step(*key))]
    return rdp


class Accountant(Protocol):
    """What every accountant provides."""

    name: ClassVar[str]

    def compose(self, event: DpEvent) -> None: ...
    def get_epsilon(self, delta: float) -> float: ...
    @property
    def events(self) -> tuple[DpEvent, ...]: ...
    def to_dict(self) -> dict[str, Any]: ...
    def copy(self) -> Accountant: ...


class _EventAccountant:
    """Shared state handling: the list of composed events, validation and serialisation."""

    name: ClassVar[str] = ""
    #: The event types this accountant can interpret.
    event_types: ClassVar[tuple[type, ...]] = (PoissonGaussianEvent,)

    __slots__ = ("_events",)

    def __init__(self, events: Iterable[DpEvent] = ()) -> None:
        checked = [self._check_event(e) for e in events]
        self._events: list[DpEvent] = checked

    @classmethod
    def supports(cls, event: object) -> bool:
        """Whether this accountant can interpret ``event``."""
        return isinstance(event, cls.event_types)

    @classmethod
    def _check_event(cls, event: object) -> DpEvent:
        if not cls.supports(event):
            raise AccountingError(
                f"the {cls.name} accountant can only compose "
                f"{', '.join(t.__name__ for t in cls.event_types)}, got {type(event).__name__}"
            )
        return event  # type: ignore[return-value]

    def compose(self, event: DpEvent) -> None:
        """Record that ``event`` ran. Raises :class:`AccountingError` (unchanged) if invalid."""
        self._events.append(self._check_event(event))

    @property
    def events(self) -> tuple[DpEvent, ...]:
        """Every event composed so far, in order."""
        return tuple(self._events)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of everything composed so far at ``delta`` (0.0 when nothing was composed)."""
        delta = _check_delta(delta)
        if not self._events:
            return 0.0
        eps = self._epsilon(self._events, delta)
        if math.isnan(eps) or eps < 0:
            raise AccountingError(f"{self.name} accountant produced an invalid epsilon {eps!r}")
        return eps

    def _epsilon(self, events: list[DpEvent], delta: float) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state: version, accountant name and the list of events."""
        return {
            "version": STATE_VERSION,
            "accountant": self.name,
            "events": [e.to_dict() for e in self._events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _EventAccountant:
        """Inverse of :meth:`to_dict`. Raises :class:`AccountingError` on anything unexpected."""
        if not isinstance(data, Mapping):
            raise AccountingError("accountant state must be a mapping")
        if data.get("version") != STATE_VERSION:
            raise AccountingError(f"unknown accountant state version {data.get('version')!r}")
        if data.get("accountant") != cls.name:
            raise AccountingError(
                f"state is for accountant {data.get('accountant')!r}, not {cls.name!r}"
            )
        if set(data) != {"version", "accountant", "events"}:
            raise AccountingError(f"unexpected accountant state fields {sorted(map(str, data))}")
        events = data["events"]
        if not isinstance(events, list):
            raise AccountingError("accountant state 'events' must be a list")
        return cls([event_from_dict(e) for e in events])

    def copy(self) -> _EventAccountant:
        """An independent accountant with the same events."""
        return type(self)(self._events)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(events={len(self._events)})"


class RDPAccountant(_EventAccountant):
    """Renyi-DP accountant over Opacus' default orders (see module docstring)."""

    name: ClassVar[str] = "rdp"
    event_types: ClassVar[tuple[type, ...]] = (PoissonGaussianEvent, PoissonSkellamEvent)
    __slots__ = ()

    def _epsilon(self, events: list[DpEvent], delta: float) -> float:
        return epsilon_from_rdp(RDP_ORDERS, rdp_curve(events), delta)


class PRVAccountant(_EventAccountant):
    """Tight accountant: Opacus' PRV accountant, reporting the upper end of its error interval.

    Args:
        events: events already spent.
        eps_error: the width of PRV's epsilon error interval (Opacus default 0.01). The reported
            epsilon is the upper bound of that interval.
    """

    name: ClassVar[str] = "prv"
    __slots__ = ("eps_error",)

    def __init__(self, events: Iterable[DpEvent] = (), *, eps_error: float = 0.01):
        super().__init__(events)
        if not (isinstance(eps_error, (int, float)) and 0 < eps_error < 1):
            raise AccountingError(f"eps_error must be in (0, 1), got {eps_error!r}")
        self.eps_error = float(eps_error)

    def copy(self) -> PRVAccountant:
        return PRVAccountant(self._events, eps_error=self.eps_error)

    def _epsilon(self, events: list[DpEvent], delta: float) -> float:
        groups = _grouped(events)
        import numpy as np  # noqa: PLC0415 - PRV (and torch, via opacus) only when asked for
        from opacus.accountants.prv import PRVAccountant as _OpacusPRV  # noqa: PLC0415

        acc = _OpacusPRV()
        acc.history = list(groups)
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                eps = float(acc.get_epsilon(delta, eps_error=self.eps_error))
        except (ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
            raise AccountingError(f"PRV accounting failed for {groups}: {exc}") from exc
        return eps


#: Fixed registry of accountants by name.
ACCOUNTANTS: Mapping[str, type[_EventAccountant]] = {
    RDPAccountant.name: RDPAccountant,
    PRVAccountant.name: PRVAccountant,
}


def make_accountant(name: str) -> _EventAccountant:
    """A fresh accountant by registry name (``"rdp"`` or ``"prv"``)."""
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise AccountingError(f"unknown accountant {name!r}; known: {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def accountant_from_dict(data: Mapping[str, Any]) -> _EventAccountant:
    """Rebuild any registered accountant from its ``to_dict`` state."""
    if not isinstance(data, Mapping):
        raise AccountingError("accountant state must be a mapping")
    name = data.get("accountant")
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise AccountingError(f"unknown accountant {name!r}; known: {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name].from_dict(data)


def compute_epsilon(
    events: Iterable[DpEvent], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of composing ``events`` with the named accountant."""
    acc = make_accountant(accountant)
    for event in events:
        acc.compose(event)
    return acc.get_epsilon(delta)


# Search range for calibration. Below _SIGMA_MIN the subsampled Gaussian is useless for DP and
# PRV's discretisation becomes very slow; above _SIGMA_MAX training cannot learn anything.
_SIGMA_MIN = 0.1
_SIGMA_MAX = 1.0e4


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    prior_events: Iterable[DpEvent] = (),
) -> float:
    """Smallest noise multiplier (to within the search) whose epsilon does not exceed the target.

    Binary search over sigma, as Opacus' ``get_noise_multiplier`` does. The returned sigma is
    always one for which the accountant *computed* ``epsilon <= target_epsilon`` (it never
    overshoots), with ``epsilon >= target_epsilon - tolerance`` unless the search interval
    collapsed first (relative width 1e-6) or the answer is the lower end of the search range
    (``sigma = 0.1``).

    Args:
        target_epsilon: the epsilon the whole composition may reach.
        target_delta: delta at which epsilon is measured.
        sample_rate: Poisson sampling rate of each step.
        steps: number of steps to be run at the calibrated sigma.
        accountant: registry name of the accountant.
        tolerance: acceptable epsilon slack below the target (in epsilon units, > 0).
        prior_events: events already spent, composed before the new ones.

    Raises:
        AccountingError: invalid arguments, or no sigma up to 1e4 meets the target (for example
            because ``prior_events`` alone already spend it, or RDP's floor is above it).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)):
        raise AccountingError("target_epsilon must be a real number")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise AccountingError(f"target_epsilon must be > 0 and finite, got {target_epsilon!r}")
    _check_delta(target_delta)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        math.isfinite(tolerance) and tolerance > 0
    ):
        raise AccountingError(f"tolerance must be > 0 and finite, got {tolerance!r}")
    base = make_accountant(accountant)
    for event in prior_events:
        base.compose(event)
    # Validates sample_rate and steps before any search.
    PoissonGaussianEvent(sample_rate=sample_rate, noise_multiplier=1.0, steps=steps)

    def eps_at(sigma: float) -> float:
        acc = base.copy()
        acc.compose(
            PoissonGaussianEvent(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps)
        )
        return acc.get_epsilon(target_delta)

    # Bracket: hi meets the target, lo does not (or is the floor).
    hi = 1.0
    if accountant != "rdp":
        # PRV is tighter than RDP, so the RDP answer is a cheap starting guess for hi.
        try:
            hi = calibrate_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                tolerance=tolerance,
                prior_events=base.events,
            )
        except AccountingError:
            hi = 1.0
    eps_hi = eps_at(hi)
    while eps_hi > target_epsilon:
        if hi >= _SIGMA_MAX:
            raise AccountingError(
                f"no noise multiplier <= {_SIGMA_MAX:g} reaches epsilon {target_epsilon} at "
                f"delta {target_delta} with {accountant} (epsilon at sigma={hi:g} is {eps_hi:.4g})"
            )
        hi = min(hi * 2.0, _SIGMA_MAX)
        eps_hi = eps_at(hi)
    if target_epsilon - eps_hi <= tolerance:
        return hi
    lo = hi
    while True:
        if lo <= _SIGMA_MIN:
            return hi  # even the floor meets the target; hi == floor here or the next loop
        lo = max(lo / 2.0, _SIGMA_MIN)
        eps_lo = eps_at(lo)
        if eps_lo > target_epsilon:
            break
        hi, eps_hi = lo, eps_lo
        if target_epsilon - eps_hi <= tolerance:
            return hi
    # Invariant: eps_at(lo) > target >= eps_at(hi) = eps_hi.
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2.0
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
            if target_epsilon - eps_hi <= tolerance:
                break
        else:
            lo = mid
    return hi


def calibrate_gaussian_sum(
    *,
    target_epsilon: float,
    target_delta: float,
    accountant: str = "rdp",
    prior_events: Iterable[DpEvent] = (),
) -> float:
    """Noise multiplier of a Gaussian mechanism run once on a sum (no sampling: ``sample_rate``
    1, one step), the smallest whose epsilon after ``prior_events`` is at most ``target_epsilon``.
    What DP source selection and DP feature centring release (see docs/privacy.md).

    Raises:
        AccountingError: as :func:`calibrate_noise_multiplier`.
    """
    return calibrate_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=1.0,
                                      steps=1, accountant=accountant, prior_events=prior_events)


# Search range for the Skellam calibration, as a total noise standard deviation relative to l2_bound.
_Z_MIN = 0.05
_Z_MAX = 1.0e4


def calibrate_skellam_share(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    honest_parties: int,
    l2_bound: float,
    l1_bound: float,
    dimension: int,
    scale: float,
    bits: int,
    tolerance: float = 0.01,
    prior_events: Iterable[DpEvent] = (),
) -> PoissonSkellamEvent:
    """The distributed Skellam event with the smallest per-party noise ``share_variance`` (to
    within the search) whose RDP epsilon, after ``prior_events``, does not exceed the target.

    Only the ``honest_parties`` hospitals' noise is counted: the total is
    ``Sk(honest_parties * share_variance / 2)``, so a round in which fewer than ``honest_parties``
    honest hospitals add their share is NOT covered and must be refused (docs/privacy.md,
    "Distributed noise"). Binary search over the total noise; like
    :func:`calibrate_noise_multiplier` it never overshoots: the returned event's epsilon was
    computed to be ``<= target_epsilon`` (and ``>= target_epsilon - tolerance`` unless the search
    interval collapsed).

    Raises:
        AccountingError: invalid arguments, or no noise up to ``1e4 * l2_bound`` standard
            deviation meets the target.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        math.isfinite(target_epsilon) and target_epsilon > 0
    ):
        raise AccountingError(f"target_epsilon must be > 0 and finite, got {target_epsilon!r}")
    _check_delta(target_delta)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        math.isfinite(tolerance) and tolerance > 0
    ):
        raise AccountingError(f"tolerance must be > 0 and finite, got {tolerance!r}")
    base = RDPAccountant(prior_events)

    def event_at(z: float) -> PoissonSkellamEvent:
        # total standard deviation z * l2_bound: 2 mu = (z l2)^2, share_variance = 2 mu / honest
        return PoissonSkellamEvent(
            sample_rate=sample_rate, steps=steps, share_variance=(z * l2_bound) ** 2 / honest_parties,
            honest_parties=honest_parties, l2_bound=l2_bound, l1_bound=l1_bound, dimension=dimension,
            scale=scale, bits=bits)

    def eps_at(z: float) -> float:
        acc = base.copy()
        acc.compose(event_at(z))
        return acc.get_epsilon(target_delta)

    event_at(1.0)  # validates every field before any search
    hi = 1.0
    eps_hi = eps_at(hi)
    while eps_hi > target_epsilon:
        if hi >= _Z_MAX:
            raise AccountingError(
                f"no Skellam noise up to {_Z_MAX:g} x l2_bound reaches epsilon {target_epsilon} at "
                f"delta {target_delta} (epsilon there is {eps_hi:.4g})")
        hi = min(hi * 2.0, _Z_MAX)
        eps_hi = eps_at(hi)
    lo = hi
    while target_epsilon - eps_hi > tolerance and lo > _Z_MIN:
        lo = max(lo / 2.0, _Z_MIN)
        eps_lo = eps_at(lo)
        if eps_lo > target_epsilon:
            break
        hi, eps_hi = lo, eps_lo
    else:
        return event_at(hi)
    while hi - lo > 1e-6 * hi and target_epsilon - eps_hi > tolerance:
        mid = (lo + hi) / 2.0
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return event_at(hi)
