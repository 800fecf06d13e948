"""secfedtl.privacy: DP events, accountants, budgets, the hash-chained ledger, and audits.

Importing this package does not import torch; only the PRV accountant does, when it is used.
"""

from secfedtl.privacy.accountants import (
    ACCOUNTANTS,
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
    make_accountant,
)
from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
from secfedtl.privacy.events import PoissonGaussianEvent, PoissonSkellamEvent, event_from_dict
from secfedtl.privacy.ledger import Ledger, spent_events, verify_ledger

__all__ = [
    "ACCOUNTANTS",
    "BudgetGuard",
    "Ledger",
    "PRVAccountant",
    "PoissonGaussianEvent",
    "PoissonSkellamEvent",
    "PrivacyBudget",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "event_from_dict",
    "make_accountant",
    "spent_events",
    "verify_ledger",
]
