"""R6: the same seeded job (distributed noise, ema 0.7, l2sp 0.3; and local noise, ema 0.7) in
process and with the hospitals in 2 forked worker processes: the same iterate, released model,
L2-SP anchor and ledgers?"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import diff_paths, ledger, seeded

from secfedtl.jobs.heart import build_job

HOSP = ["hungary", "switzerland", "va"]


def run(cfg, tmp, tag, workers):
    state = tmp / f"state-{tag}-{workers}"
    job = build_job(cfg, tmp / f"out-{tag}-{workers}", state_dir=state, workers=workers)
    try:
        job.federation.run(2)
        f = job.federation
        return f.global_params.copy(), f.released_params.copy(), f.source_params.copy(), {n: ledger(state, n) for n in HOSP}
    finally:
        job.close()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rt6-"))
    bad = 0
    try:
        for tag, cfg in (("distributed", seeded(distributed=True, rounds=2, ema=0.7, l2sp=0.3, epochs=1)),
                         ("local", seeded(distributed=False, rounds=2, ema=0.7))):
            a, b = run(cfg, tmp, tag, 0), run(cfg, tmp, tag, 2)
            d = diff_paths(a[3], b[3])
            ok = all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and not d
            print(f"[{tag}] in-process == 2 workers: iterate {np.array_equal(a[0], b[0])}, released "
                  f"{np.array_equal(a[1], b[1])}, anchor {np.array_equal(a[2], b[2])}, ledger diffs {len(d)} {d[:2]}")
            bad += not ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
