"""Encodings of float vectors into Z_2^b and back: fixed point (local DP) and the per-example
integer encoding of distributed DP."""

from secfedtl.encoding.distributed import DistributedEncoding, plan_encoding
from secfedtl.encoding.fixed_point import FixedPointEncoding

__all__ = ["DistributedEncoding", "FixedPointEncoding", "plan_encoding"]
