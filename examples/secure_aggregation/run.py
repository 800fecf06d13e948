"""Secure aggregation of 20 hospitals' updates with dropouts, and the attack it refuses.

Run from the repository root after `make venv`:  .venv/bin/python examples/secure_aggregation/run.py
"""

from __future__ import annotations

import numpy as np

from secfedtl.errors import InconsistentDropoutError
from secfedtl.secagg import SecAggConfig, simulate
from secfedtl.secagg import messages as m
from secfedtl.testing.harness import make_round, run_until


def main() -> None:
    rng = np.random.default_rng(0)
    cfg = SecAggConfig(num_clients=20, threshold=11, clip=1.0, bits=32)
    inputs = [rng.uniform(-1, 1, 10_000) for _ in range(20)]
    res = simulate(inputs, cfg, dropouts={3: "mask", 7: "unmask", 12: "share"}, seed=0)
    plain = np.sum([inputs[i] for i in res.included], axis=0)
    print(f"included {len(res.included)} of 20 clients (3 and 12 dropped before masking; 7 after)")
    print(f"max |secure sum - plain sum| = {np.max(np.abs(res.total - plain)):.2e} "
          f"(stated bound {res.error_bound:.2e}); {res.wire_bytes / 1e6:.1f} MB on the wire")

    big = SecAggConfig.recommended(num_clients=1000, dropout_rate=0.05, corrupt_fraction=0.05)
    few = SecAggConfig.recommended(num_clients=1000, dropout_rate=0.05, corrupt_fraction=0.05, colluders=5)
    print(f"for 1,000 clients the rule picks {big.degree} neighbours and threshold {big.threshold} "
          f"(tolerates {big.tolerated_colluders} clients colluding with an active server); "
          f"for 5 colluders, {few.degree} and {few.threshold}")

    # A malicious server lists a victim both as surviving and as dropped, hoping for both its
    # self-mask shares and its mask-key shares. Every honest client refuses.
    session = make_round(SecAggConfig(num_clients=5, threshold=3), vector_length=8, seed=1)
    run_until(session, "unmask")  # the server's unmask requests are now pending
    requests = session.pending
    victim = 0
    refusals = forged_count = 0
    for request in requests:
        if victim in request.survivors:
            forged_count += 1
            forged = m.UnmaskRequest(session_id=request.session_id, round=request.round,
                                     recipient=request.recipient, survivors=request.survivors,
                                     dropped=tuple(sorted({*request.dropped, victim})))
            try:
                session.clients[request.recipient].receive(forged)
            except InconsistentDropoutError:
                refusals += 1
    print(f"victim listed alive and dropped: {refusals} of the {forged_count} clients asked refused")


if __name__ == "__main__":
    main()
