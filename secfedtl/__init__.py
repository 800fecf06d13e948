"""secfedtl: privacy-preserving federated transfer learning.

Clients fine-tune a transferred model with DP-SGD (Opacus), mask their updates with pairwise
secret shares (Bonawitz et al. 2017 / SecAgg+), the server only ever sees masked sums, and every
epsilon spent is recorded in a hash-chained, auditable ledger.
"""

from secfedtl.errors import SecFedTLError

__version__ = "0.1.0"
__all__ = ["SecFedTLError", "__version__"]
