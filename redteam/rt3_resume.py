"""R3: resume (secfedtl run --resume path: runtime.local.build_job(resume=True) + load_state_dict).
After a resume, (1) the L2-SP anchor must still be the source head, not the checkpointed
iterate; (2) the moving average must continue from the checkpoint's ema_params; (3) nothing a
hospital charges changes. Distributed noise with ema=0.7, l2sp=0.3; local noise with ema=0.7."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ledger, seeded

from secfedtl.aggregation.optimizers import decode_vector
from secfedtl.federated import distributed as dist
from secfedtl.federated import federation as fedmod
from secfedtl.jobs.heart import build_job
from secfedtl.training import flatten_params

HOSP = ["hungary", "switzerland", "va"]


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rt3-"))
    bad = 0
    try:
        for distributed in (True, False):
            cfg = seeded(distributed=distributed, rounds=2, ema=0.7, l2sp=0.3 if distributed else None,
                         epochs=1 if distributed else None)
            out, state = tmp / f"out-{distributed}", tmp / f"state-{distributed}"
            job = build_job(cfg, out, state_dir=state)
            try:
                job.federation.run(1, checkpoint=out / "checkpoint.json")
            finally:
                job.close()
            ckpt = json.loads((out / "checkpoint.json").read_text())
            n_entries = {n: len(ledger(state, n)) for n in HOSP}
            job = build_job(cfg, out, resume=True, state_dir=state)
            try:
                fed = job.federation
                head = flatten_params(job.source.head_state)
                anchor_ok = np.array_equal(fed.source_params, head)
                resumed_ema_ok = np.array_equal(fed.ema_params, decode_vector(ckpt["ema_params"]))
                resumed_iter = np.array_equal(fed.global_params, decode_vector(ckpt["global_params"]))
                calls = []
                real_decode = fedmod.decode_step

                def spy(plan, field_sum, step, *, params, source):
                    calls.append((params.copy(), source.copy()))
                    return real_decode(plan, field_sum, step, params=params, source=source)

                fedmod.decode_step = spy
                iterates = []
                real_step = fed.optimizer.step

                def step(*a, **k):
                    o = real_step(*a, **k)
                    iterates.append(o.copy())
                    return o

                fed.optimizer.step = step
                fed.run(2)
                fedmod.decode_step = real_decode
                anchors = all(np.array_equal(s, head) for _, s in calls)
                expected = decode_vector(ckpt["ema_params"])
                for x in iterates:
                    expected = 0.7 * expected + 0.3 * x
                ema_ok = np.allclose(fed.released_params, expected, rtol=1e-12, atol=1e-15)
                charged = {n: len(ledger(state, n)) - n_entries[n] for n in HOSP}
                print(f"[{'distributed' if distributed else 'local'}] resumed iterate = checkpoint: {resumed_iter}; "
                      f"anchor = source head: {anchor_ok} (checkpoint iterate differs from head: "
                      f"{not np.array_equal(decode_vector(ckpt['global_params']), head)}); ema restored: {resumed_ema_ok}; "
                      f"decode_step anchors all the head ({len(calls)} steps): {anchors}; EMA continued: {ema_ok}; "
                      f"new ledger entries per hospital: {charged}")
                bad += not (anchor_ok and resumed_ema_ok and resumed_iter and anchors and ema_ok)
            finally:
                job.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("problems:", bad)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
