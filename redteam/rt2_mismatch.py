"""R2: the server's job file and the hospitals' own files differ only in [server] ema or
[training] l2sp (the keys the commits call server-side post-processing). In a deployment every
node reads its own file (secfedtl node CONFIG); the server reads its own. What happens?

(a) with an explicit [job] id: hospitals must neither refuse nor charge differently.
(b) with [job] id left out (the default of a deployment's job file: job_id() hashes the resolved
    config), the server's and the hospitals' job ids differ; the rotation seed of every DP step is
    derived from the job id, so the server un-rotates with another seed than the hospitals rotated
    with. Is that refused, or silently decoded to a wrong model?"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ledger, seeded

from secfedtl.federated import distributed as dist
from secfedtl.federated import federation as fedmod
from secfedtl.federated.job import build_server, job_id
from secfedtl.jobs.heart import build_job

HOSP = ["hungary", "switzerland", "va"]


def run(hosp_cfg, server_cfg, tmp: Path, tag: str):
    state = tmp / f"state-{tag}"
    job = build_job(hosp_cfg, tmp / f"out-{tag}", state_dir=state)
    try:
        hosp_plan = job.federation.distributed
        if server_cfg is not hosp_cfg:
            fed = job.federation
            job.federation = build_server(server_cfg, job.source, fed.pool, fed.roster, job=job.job)
        server_plan = job.federation.distributed
        real = dist.decode_step
        errors = []

        def spy(plan, field_sum, step, **kw):
            as_server = plan.encoding.decode_sum(field_sum, rotation_seed=server_plan.rotation_seed(step))
            as_hosp = plan.encoding.decode_sum(field_sum, rotation_seed=hosp_plan.rotation_seed(step))
            errors.append(float(np.linalg.norm(as_server - as_hosp) / np.linalg.norm(as_hosp)))
            return real(plan, field_sum, step, **kw)

        fedmod.decode_step = spy
        start = job.federation.global_params.copy()
        report = job.federation.run_round()
        fedmod.decode_step = real
        if errors and max(errors) > 0:
            print(f"   {tag}: server's decode vs the hospitals' (same field sum): relative error "
                  f"{min(errors):.2f}..{max(errors):.2f} over {len(errors)} steps")
        return report, job.federation.global_params - start, {n: ledger(state, n) for n in HOSP}
    finally:
        job.close()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rt2-"))
    bad = 0
    try:
        for id_ in ("rt", None):
            for key, server_kw in (("l2sp", dict(l2sp=0.3)), ("ema", dict(ema=0.9))):
                hosp = seeded(distributed=True, rounds=1, job_id=id_, epochs=1)
                server = seeded(distributed=True, rounds=1, job_id=id_, epochs=1, **server_kw)
                r_match, d_match, l_match = run(server, server, tmp, f"match-{id_}-{key}")
                r_mis, d_mis, l_mis = run(hosp, server, tmp, f"mis-{id_}-{key}")
                cos = float(d_match @ d_mis / (np.linalg.norm(d_match) * np.linalg.norm(d_mis)))
                jids = (job_id(hosp), job_id(server))
                print(f"[job id {'explicit' if id_ else 'hashed'}; server {key}={server_kw[key]}, hospitals default] "
                      f"job ids {jids[0][:16]} / {jids[1][:16]}; matched: {r_match.status} {r_match.steps_ok} steps; "
                      f"mismatched: {r_mis.status} {r_mis.steps_ok} steps, refused={r_mis.budget_refused}; "
                      f"cosine(update, matched update) = {cos:.3f}; |update| {np.linalg.norm(d_mis):.3f} vs "
                      f"{np.linalg.norm(d_match):.3f}")
                if r_mis.status == "ok" and cos < 0.99:
                    bad += 1
                    print("   -> SILENT: every step accepted, charged and applied, the model is not what the "
                          "hospitals computed")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("silent mismatches:", bad)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
