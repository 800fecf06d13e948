"""R4: Federation.load_state_dict on bad checkpoints: specific secfedtl error, no state half-changed?"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import seeded

from secfedtl.aggregation.optimizers import encode_vector
from secfedtl.errors import SecFedTLError
from secfedtl.federated.federation import released_params_of
from secfedtl.jobs.heart import build_job


def snapshot(fed):
    return (fed.global_params.copy(), None if fed.ema_params is None else fed.ema_params.copy(), fed.rounds_done,
            json.dumps([h.to_dict() for h in fed.history], sort_keys=True, default=str),
            json.dumps(fed.optimizer.state_dict(), sort_keys=True))


def unchanged(a, b):
    return (np.array_equal(a[0], b[0]) and ((a[1] is None and b[1] is None) or np.array_equal(a[1], b[1]))
            and a[2:] == b[2:])


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rt4-"))
    problems = 0
    try:
        cfg = seeded(distributed=False, rounds=2, ema=0.5)
        cfg_m = cfg.to_dict()
        cfg_m["server"].update(optimizer="fedavgm", momentum=0.9)
        from secfedtl.jobs.heart import HeartConfig
        cfg = HeartConfig.from_mapping(cfg_m)
        job = build_job(cfg, tmp / "out", state_dir=tmp / "state")
        try:
            fed = job.federation
            fed.run(1, checkpoint=tmp / "ckpt1.json")
            good1 = json.loads((tmp / "ckpt1.json").read_text())
            fed.run(2, checkpoint=tmp / "ckpt2.json")
            good2 = json.loads((tmp / "ckpt2.json").read_text())
            before = snapshot(fed)
            assert good1["optimizer"] != good2["optimizer"]
            cases = {
                "rounds_done not an int": {**good1, "rounds_done": "one"},
                "history entry malformed": {**good1, "history": [{"bogus": 1}]},
                "history not a list": {**good1, "history": 7},
                "history missing": {k: v for k, v in good1.items() if k != "history"},
                "rounds_done missing": {k: v for k, v in good1.items() if k != "rounds_done"},
                "ema as a string": {**good1, "ema": "0.5"},
                "ema_params a list": {**good1, "ema_params": [0.0] * 3},
                "ema_params bad base64": {**good1, "ema_params": "!!!"},
                "optimizer missing": {k: v for k, v in good1.items() if k != "optimizer"},
                "global_params missing": {k: v for k, v in good1.items() if k != "global_params"},
                "state not a mapping": [1, 2],
                "rounds_done negative": {**good1, "rounds_done": -5},
                "rounds_done beyond history": {**good1, "rounds_done": 99},
            }
            for name, bad in cases.items():
                try:
                    fed.load_state_dict(copy.deepcopy(bad))
                    outcome = "ACCEPTED"
                except SecFedTLError as exc:
                    outcome = f"{type(exc).__name__}"
                except Exception as exc:  # noqa: BLE001
                    outcome = f"NON-LIBRARY {type(exc).__name__}: {exc}"[:90]
                after = snapshot(fed)
                same = unchanged(before, after)
                flag = "" if (outcome not in ("ACCEPTED",) and not outcome.startswith("NON") and same) else "  <-- PROBLEM"
                problems += bool(flag)
                print(f"{name:28s} -> {outcome:60s} state unchanged: {same}{flag}")
                if not same:
                    fed.load_state_dict(good2)
                    before = snapshot(fed)
            # a server without ema given a checkpoint that carries ema_params but says ema 0
            job2_cfg = seeded(distributed=False, rounds=2)
        finally:
            job.close()
        job = build_job(job2_cfg, tmp / "out2", state_dir=tmp / "state2")
        try:
            fed = job.federation
            fed.run(1, checkpoint=tmp / "plain.json")
            plain = json.loads((tmp / "plain.json").read_text())
            forged = {**plain, "ema": 0.0, "ema_params": encode_vector(np.zeros_like(fed.global_params))}
            try:
                fed.load_state_dict(forged)
                print("server ema=0 loads a checkpoint with ema 0.0 + ema_params: ACCEPTED; released_params_of"
                      f"(checkpoint) == server's released model: {np.array_equal(released_params_of(forged), fed.released_params)}")
                problems += 1
            except SecFedTLError as exc:
                print(f"server ema=0 given a checkpoint with ema 0.0 + ema_params: {type(exc).__name__}: {exc}")
        finally:
            job.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("problems:", problems)
    return int(problems > 0)


if __name__ == "__main__":
    sys.exit(main())
