"""Secure-aggregation parameters and the rule that picks them.

Parameter rule (derived in docs/protocol.md). Each client shares its secrets with its ``k``
graph neighbours using a ``t``-of-``k`` Shamir scheme. For ``n`` clients, a ``dropout_rate``,
a corrupt fraction ``gamma`` and a number ``c`` of clients that may collude with an *active*
server:

* **active server** (it relays every message, may show different clients different survivor
  lists and chooses the session id, hence the graph): it learns a client's input only if it
  collects ``t`` shares of the client's self-mask seed *and* ``t`` shares of its mask key. Each
  honest neighbour reveals one kind, colluding neighbours reveal both, so it needs
  ``2 (t - c) <= k - c`` honest neighbours, i.e. ``c >= 2t - k``. The rule asks
  ``c <= 2t - k - 1`` (:func:`tolerated_colluders`): then no split of the survivor views and no
  placement of the ``c`` colluders (all may be one client's neighbours) reveals an input.
  This is a worst-case count, not a probability (failure probability 0 beyond the cryptography).
* **honest-but-curious server** (it follows the protocol; corrupt clients are a random
  ``gamma`` fraction): the chance that one client has ``t`` or more corrupt neighbours,
  ``P[Bin(k, gamma) >= t]``, summed over the ``n`` clients, is at most ``2**-security_bits``
  (default 40); ``t > k / 2`` always;
* **correctness**: the chance that some client keeps fewer than ``t`` live neighbours,
  ``n * P[Bin(k, 1 - dropout_rate) < t]``, is at most ``2**-correctness_bits`` (default 20).

:meth:`SecAggConfig.recommended` picks the smallest even ``k < n - 1`` and the smallest ``t``
that meet all three (``c`` defaults to ``floor(gamma * n)``, every corrupt client a colluder).
When no sparse graph meets them it uses the complete graph with worst-case counts instead of
probabilities: ``t >= max(k / 2 + 1, floor(gamma * n) + 1, ceil((k + c + 1) / 2))`` and
``k - ceil(dropout_rate * n) >= t``. A hand-written config is checked against the hard rules
(``k/2 < t <= k``, no wrap-around, ``3 <= n <= MAX_CLIENTS``).

``MAX_CLIENTS`` bounds the work one session description can cause: a decoder refuses a larger
session before it builds anything, and nothing a session allocates grows faster than ``n``
before a party asks for its own neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from secfedtl.encoding.fixed_point import FixedPointEncoding
from secfedtl.errors import ConfigError

PROTOCOL_VERSION = 1
MIN_CLIENTS = 3
#: The largest number of clients in one session: the largest ``n`` the parameter rule is stated
#: for (docs/protocol.md), and the bound on every list a decoder accepts.
MAX_CLIENTS = 10_000


def _binom_tail_ge(k: int, p: float, t: int) -> float:
    """P[Bin(k, p) >= t]."""
    if t <= 0:
        return 1.0
    if t > k:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(t, k + 1))


def failure_probabilities(*, num_clients: int, degree: int, threshold: int, dropout_rate: float,
                          corrupt_fraction: float) -> tuple[float, float]:
    """(privacy failure, correctness failure) probabilities of the rule above (union bounds)."""
    privacy = min(1.0, num_clients * _binom_tail_ge(degree, corrupt_fraction, threshold))
    correctness = min(1.0, num_clients * (1.0 - _binom_tail_ge(degree, 1.0 - dropout_rate, threshold)))
    return privacy, correctness


def tolerated_colluders(*, degree: int, threshold: int) -> int:
    """How many clients may collude with an active server without it learning any one client's
    input: ``2 * threshold - degree - 1`` (see the module docstring); negative means none."""
    return 2 * threshold - degree - 1


def active_threshold(*, degree: int, colluders: int) -> int:
    """The smallest threshold with ``degree // 2 < t`` that tolerates ``colluders`` against an
    active server (``2t - k - 1 >= c``); it may exceed ``degree`` (then no threshold does)."""
    return max(degree // 2 + 1, -(-(degree + colluders + 1) // 2))


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """Public parameters of one secure aggregation.

    ``neighbours=None`` selects the complete graph (every client is every other's neighbour);
    ``neighbours=k`` a SecAgg+ random k-regular graph. ``threshold`` is the Shamir threshold
    among a client's neighbours. ``clip``, ``bits``, ``scale`` and ``max_weight`` define the
    fixed-point encoding (see :class:`~secfedtl.encoding.FixedPointEncoding`).
    ``min_survivors`` (default ``threshold``) is the fewest clients whose inputs the server may
    ever learn the sum of. ``authenticated`` turns on Ed25519-signed keys and survivor lists.
    """

    num_clients: int
    threshold: int
    neighbours: int | None = None
    clip: float = 1.0
    bits: int = 32
    scale: float | None = None
    max_weight: int = 1
    min_survivors: int | None = None
    authenticated: bool = False
    encoding: FixedPointEncoding = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.num_clients
        if isinstance(n, bool) or not isinstance(n, int) or n < MIN_CLIENTS:
            raise ConfigError(f"secure aggregation needs at least {MIN_CLIENTS} clients, got {n!r}")
        if n > MAX_CLIENTS:
            raise ConfigError(f"at most {MAX_CLIENTS} clients in one session, got {n}")
        k = self.degree
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n - 1:
            raise ConfigError(f"neighbours must be an integer in [2, {n - 1}], got {self.neighbours!r}")
        if k % 2 == 1 and n % 2 == 1:
            raise ConfigError(f"no {k}-regular graph on {n} clients: use an even number of neighbours")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int) or not (k // 2 < t <= k):
            raise ConfigError(
                f"threshold must satisfy neighbours/2 < threshold <= neighbours ({k // 2 + 1}..{k}), "
                f"got {t!r}: a lower threshold lets a server collect both kinds of shares of a client")
        m = self.threshold if self.min_survivors is None else self.min_survivors
        if isinstance(m, bool) or not isinstance(m, int) or not t <= m <= n:
            raise ConfigError(f"min_survivors must be in [threshold, num_clients], got {m!r}")
        object.__setattr__(self, "min_survivors", m)
        object.__setattr__(self, "encoding", FixedPointEncoding(
            clip=self.clip, bits=self.bits, num_clients=n, max_weight=self.max_weight, scale=self.scale))

    @property
    def degree(self) -> int:
        """Number of neighbours of each client."""
        return self.num_clients - 1 if self.neighbours is None else self.neighbours

    @property
    def full_graph(self) -> bool:
        return self.degree == self.num_clients - 1

    @property
    def tolerated_colluders(self) -> int:
        """Clients that may collude with an active server: ``2t - k - 1`` (module docstring)."""
        return tolerated_colluders(degree=self.degree, threshold=self.threshold)

    @classmethod
    def recommended(cls, *, num_clients: int, dropout_rate: float = 0.05, corrupt_fraction: float = 0.05,
                    colluders: int | None = None, security_bits: int = 40, correctness_bits: int = 20,
                    **kwargs: object) -> SecAggConfig:
        """The smallest graph degree and threshold that meet the rule in the module docstring.
        ``colluders`` (default ``floor(corrupt_fraction * num_clients)``) is how many clients
        may collude with an active server."""
        if not 0 <= dropout_rate < 1 or not 0 <= corrupt_fraction < 0.5:
            raise ConfigError("dropout_rate must be in [0, 1) and corrupt_fraction in [0, 0.5)")
        if dropout_rate + corrupt_fraction >= 0.5:
            raise ConfigError("dropout_rate + corrupt_fraction must stay below 1/2")
        n = num_clients
        if isinstance(n, bool) or not isinstance(n, int) or not MIN_CLIENTS <= n <= MAX_CLIENTS:
            raise ConfigError(f"secure aggregation needs {MIN_CLIENTS} to {MAX_CLIENTS} clients")
        c = math.floor(corrupt_fraction * n) if colluders is None else colluders
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= n - 2:
            raise ConfigError(f"colluders must be an integer in [0, {n - 2}], got {colluders!r}")
        sec, cor = 2.0 ** -security_bits, 2.0 ** -correctness_bits
        for k in range(2, n - 1, 2):
            for t in range(active_threshold(degree=k, colluders=c), k + 1):
                p_priv, p_corr = failure_probabilities(num_clients=n, degree=k, threshold=t,
                                                       dropout_rate=dropout_rate,
                                                       corrupt_fraction=corrupt_fraction)
                if p_priv <= sec and p_corr <= cor:
                    return cls(num_clients=n, threshold=t, neighbours=k, **kwargs)  # type: ignore[arg-type]
                if p_priv <= sec:
                    break  # larger t only hurts correctness
        k = n - 1
        t = max(math.floor(corrupt_fraction * n) + 1, active_threshold(degree=k, colluders=c))
        if t <= k and k - math.ceil(dropout_rate * n) >= t:
            return cls(num_clients=n, threshold=t, neighbours=None, **kwargs)  # type: ignore[arg-type]
        raise ConfigError(
            f"no graph on {n} clients meets 2^-{security_bits} privacy, 2^-{correctness_bits} "
            f"correctness and {c} colluders at dropout {dropout_rate} and corrupt fraction {corrupt_fraction}")
