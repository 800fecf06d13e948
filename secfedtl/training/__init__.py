"""secfedtl.training: the DP client trainer (Opacus) that turns a model + data into an update."""

from secfedtl.training.client import BudgetGuardLike, PrivateClient
from secfedtl.training.config import DPTrainingConfig
from secfedtl.training.dpsgd import PerSampleLoss, run_dp_sgd, secure_gaussian
from secfedtl.training.evaluate import Evaluation, evaluate
from secfedtl.training.update import ClientUpdate, delta_names, flatten_delta, model_with_params, unflatten_delta

__all__ = [
    "BudgetGuardLike",
    "ClientUpdate",
    "DPTrainingConfig",
    "Evaluation",
    "PerSampleLoss",
    "PrivateClient",
    "delta_names",
    "evaluate",
    "flatten_delta",
    "model_with_params",
    "run_dp_sgd",
    "secure_gaussian",
    "unflatten_delta",
]
