"""Test doubles for the privacy package, which is written in parallel.

If ``secfedtl.privacy.events`` / ``secfedtl.privacy.accountants`` are importable (after the merge)
the real ones are used; otherwise thin fakes with the agreed API are installed in ``sys.modules``.
The budget guard is always a recording fake (the trainer takes any object with ``charge``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest

from secfedtl.errors import PrivacyBudgetExceeded


def _install_fakes() -> None:
    try:
        have_events = importlib.util.find_spec("secfedtl.privacy.events") is not None
        have_accountants = importlib.util.find_spec("secfedtl.privacy.accountants") is not None
    except ModuleNotFoundError:
        have_events = have_accountants = False
    if not have_events:
        events = types.ModuleType("secfedtl.privacy.events")

        @dataclass(frozen=True, kw_only=True)
        class PoissonGaussianEvent:
            sample_rate: float
            noise_multiplier: float
            steps: int

        events.PoissonGaussianEvent = PoissonGaussianEvent
        sys.modules["secfedtl.privacy.events"] = events
    if not have_accountants:
        accountants = types.ModuleType("secfedtl.privacy.accountants")

        def calibrate_noise_multiplier(*, target_epsilon, target_delta, sample_rate, steps, accountant="rdp"):
            from opacus.accountants.utils import get_noise_multiplier

            return get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta,
                sample_rate=sample_rate, steps=steps, accountant=accountant,
            )

        accountants.calibrate_noise_multiplier = calibrate_noise_multiplier
        sys.modules["secfedtl.privacy.accountants"] = accountants


_install_fakes()


class RecordingGuard:
    """Records charges; refuses every charge when ``refuse`` is set (before running the block)."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.pending: list[tuple[object, int, str]] = []
        self.completed: list[tuple[object, int, str]] = []
        self.failed: list[tuple[object, int, str]] = []

    @contextlib.contextmanager
    def charge(self, event, *, round: int, model_hash: str, **fields):
        if self.refuse:
            raise PrivacyBudgetExceeded("budget exhausted (test guard)")
        self.fields = fields  # release, randomness, params of the last charge
        entry = (event, round, model_hash)
        self.pending.append(entry)
        try:
            yield entry
        except BaseException:
            self.failed.append(entry)
            raise
        self.completed.append(entry)


@pytest.fixture
def guard() -> RecordingGuard:
    return RecordingGuard()


@pytest.fixture
def refusing_guard() -> RecordingGuard:
    return RecordingGuard(refuse=True)
