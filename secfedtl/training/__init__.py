"""secfedtl.training: the DP client trainer (Opacus) that turns a model + data into a model update."""

from secfedtl.training.client import BudgetGuardLike, PrivateClient
from secfedtl.training.config import DPTrainingConfig
from secfedtl.training.dpsgd import PerSampleLoss, run_dp_sgd, secure_gaussian
from secfedtl.training.evaluate import Evaluation, evaluate
from secfedtl.training.update import ClientUpdate, flatten_params, model_with_params, param_names, unflatten_params

__all__ = [
    "BudgetGuardLike",
    "ClientUpdate",
    "DPTrainingConfig",
    "Evaluation",
    "PerSampleLoss",
    "PrivateClient",
    "evaluate",
    "flatten_params",
    "model_with_params",
    "param_names",
    "run_dp_sgd",
    "secure_gaussian",
    "unflatten_params",
]
