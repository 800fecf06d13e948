"""secfedtl.transfer: source models, freezing policies, heads, L2-SP, distillation, caching,
DP source-model selection."""

from secfedtl.transfer.batchnorm import fix_trainable_batchnorm, pin_frozen_in_eval, prepare_for_dp, unpin
from secfedtl.transfer.caching import cache_features, cached_features, check_frozen_deterministic, split_head
from secfedtl.transfer.distillation import DistillationLoss, cross_entropy_loss, distillation_loss
from secfedtl.transfer.freezing import HeadOnly, LastBlocks, ParameterNames, replace_head, trainable_names
from secfedtl.transfer.models import check_state_dict, load_source_model, load_state_dict_file, state_hash
from secfedtl.transfer.regularizers import L2SP
from secfedtl.transfer.selection import (
    SelectionMechanism,
    SelectionResult,
    clipped_loss_sums,
    private_selection_statistics,
    select_candidate,
)

__all__ = [
    "DistillationLoss",
    "HeadOnly",
    "L2SP",
    "LastBlocks",
    "SelectionMechanism",
    "SelectionResult",
    "ParameterNames",
    "cache_features",
    "cached_features",
    "check_frozen_deterministic",
    "check_state_dict",
    "clipped_loss_sums",
    "cross_entropy_loss",
    "distillation_loss",
    "fix_trainable_batchnorm",
    "load_source_model",
    "load_state_dict_file",
    "pin_frozen_in_eval",
    "prepare_for_dp",
    "private_selection_statistics",
    "replace_head",
    "select_candidate",
    "split_head",
    "state_hash",
    "trainable_names",
    "unpin",
]
