"""R5: are the new tests able to fail? Each mutant edits library code in this worktree, runs
tests/runtime/test_server_average.py (+ test_distributed_job.py's config test), and restores the
file with `git checkout`. A mutant that survives is a gap in the tests.
Run from the worktree root: OMP_NUM_THREADS=1 python redteam/rt5_mutants.py [NAME ...]"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FED, DIST, JOB = "secfedtl/federated/federation.py", "secfedtl/federated/distributed.py", "secfedtl/federated/job.py"
TESTS = ["tests/runtime/test_server_average.py",
         "tests/runtime/test_distributed_job.py::test_local_is_the_default_and_distributed_refuses_what_it_cannot_do"]

MUTANTS: dict[str, tuple[str, str, str]] = {
    "ema weights swapped": (FED, "self.ema * self.ema_params + (1.0 - self.ema) * params",
                            "(1.0 - self.ema) * self.ema_params + self.ema * params"),
    "training continues from the average": (FED, "        self.global_params = params\n        if self.ema_params is not None:\n            self.ema_params = self.ema * self.ema_params + (1.0 - self.ema) * params",
                                            "        if self.ema_params is not None:\n            self.ema_params = self.ema * self.ema_params + (1.0 - self.ema) * params\n        self.global_params = params if self.ema_params is None else self.ema_params.copy()"),
    "failed local round averaged in (unchanged iterate)": (FED, "        times = dict(outcome.times)\n        times[\"secagg_overhead\"]",
                                                           "        if status != \"ok\":\n            self._step_to(self.global_params)\n        times = dict(outcome.times)\n        times[\"secagg_overhead\"]"),
    "failed distributed step averaged in": (FED, "                tally.reasons.append(f\"step {s}: {outcome.reason}\")\n                continue",
                                            "                tally.reasons.append(f\"step {s}: {outcome.reason}\")\n                self._step_to(self.global_params)\n                continue"),
    "ema starts at zero": (FED, "self.ema_params = self.global_params.copy() if self.ema > 0.0 else None",
                           "self.ema_params = 0.0 * self.global_params if self.ema > 0.0 else None"),
    "load ignores another ema": (FED, "        if state.get(\"ema\", 0.0) != self.ema:\n            raise",
                                 "        if False:\n            raise"),
    "load assigns ema_params before checks": (FED, "            average = decode_vector(state[\"ema_params\"])\n",
                                              "            average = decode_vector(state[\"ema_params\"])\n            self.ema_params = average\n"),
    "load does not restore ema_params": (FED, "        self.ema_params = average\n", ""),
    "resume re-anchors L2-SP at the checkpoint iterate": (FED, "        self.ema_params = average\n",
                                                          "        self.ema_params = average\n        self.source_params = params.copy()\n"),
    "load: rounds_done unchecked (pre-fix)": (FED, "raise InputError(\"checkpoint's rounds_done must be an int equal to the number of rounds in its history\")", "pass"),
    "released_params_of ignores ema": (FED, "decode_vector(state[\"ema_params\"] if \"ema_params\" in state else state[\"global_params\"])",
                                       "decode_vector(state[\"global_params\"])"),
    "l2sp sign flipped": (DIST, "(params - source)\n    return", "(source - params)\n    return"),
    "l2sp without normaliser": (DIST, "settings.normaliser * 2.0 * settings.l2sp", "2.0 * settings.l2sp"),
    "l2sp announced": (DIST, "\"sample_rate\": self.settings.sample_rate}",
                       "\"sample_rate\": self.settings.sample_rate, \"l2sp\": self.settings.l2sp}"),
    "l2sp ignored by server": (DIST, "    if settings.l2sp:\n", "    if False:\n"),
    "server ema read from wrong key (ema never on from a job file)": (JOB, "ema=server.get(\"ema\", 0.0)", "ema=0.0"),
}


def run_tests() -> tuple[bool, str]:
    p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                       cwd=ROOT, capture_output=True, text=True)
    last = [line for line in p.stdout.splitlines() if line.strip()][-1:] or [""]
    failed = [line for line in p.stdout.splitlines() if line.startswith("FAILED")]
    return p.returncode != 0, (failed[0] if failed else last[0])[:160]


def main(names: list[str]) -> int:
    dirty = subprocess.run(["git", "status", "--porcelain", FED, DIST, JOB], cwd=ROOT, capture_output=True, text=True).stdout
    if dirty.strip():  # each mutant is undone with `git checkout`: uncommitted edits there would be lost
        print("commit or stash your changes to", FED, DIST, JOB, "first")
        return 2
    survivors = []
    for name, (path, old, new) in MUTANTS.items():
        if names and name not in names:
            continue
        f = ROOT / path
        text = f.read_text()
        if text.count(old) != 1:
            print(f"[{name}] pattern found {text.count(old)} times: mutant not applied")
            continue
        f.write_text(text.replace(old, new))
        try:
            killed, detail = run_tests()
        finally:
            subprocess.run(["git", "checkout", "--", path], cwd=ROOT, check=True)
        print(f"[{'killed ' if killed else 'SURVIVED'}] {name}: {detail}", flush=True)
        if not killed:
            survivors.append(name)
    print("survivors:", survivors)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
