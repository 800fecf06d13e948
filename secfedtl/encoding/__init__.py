"""Fixed-point encoding of float vectors into Z_2^b and back."""

from secfedtl.encoding.fixed_point import FixedPointEncoding

__all__ = ["FixedPointEncoding"]
