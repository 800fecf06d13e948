"""White-box one-run audit of the Fashion-MNIST example: gradient (Dirac) canaries in one client's
DP-SGD, scored from every noisy step, turned into both one-run lower bounds next to that client's
ledger epsilon (``secfedtl audit-run`` does the same for job files; this is the example's own
script, which is not a job file).

    OMP_NUM_THREADS=1 .venv/bin/python examples/fashion_mnist/audit.py --epsilon 4 --canaries 100000 \\
        --no-reference --no-progress --out runs/fashion_audit

Every ``run.py`` flag applies (``--rounds``, ``--clients``, ``--epsilon`` ...: a reduced
configuration is a smaller job, and its audit is of that job). The canaries live in a block of
coordinates of their own that no real record touches, so the trained head is the same job's;
their coins come from ``os.urandom``; the audited client's privacy state is the run's throwaway
one. Writes ``audit.json`` and ``audit.png`` next to the run's own outputs. Exit status 4 when the
(epsilon, delta) lower bound is above the client's ledger epsilon.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as example  # noqa: E402

from secfedtl.errors import ConfigError  # noqa: E402
from secfedtl.privacy.accountants import compute_epsilon  # noqa: E402
from secfedtl.privacy.empirical import gdp_mu_for_epsilon  # noqa: E402
from secfedtl.privacy.ledger import read_verified_ledger, spent_events  # noqa: E402
from secfedtl.jobs.audit_run import (VIOLATION_EXIT, GradientCanaries, analyse, draw_coins,  # noqa: E402
                                        plot_report, public_steps, whitebox_scores)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    canaries, client = 100_000, "client00"
    for flag in ("--canaries", "--audit-client"):
        if flag in argv:
            i = argv.index(flag)
            value = argv[i + 1]
            del argv[i:i + 2]
            if flag == "--canaries":
                canaries = int(value)
            else:
                client = value
    args = example.parse_args(argv)
    # The canaries are charged to a fresh throwaway state in <out> only: never to a state that
    # outlives the audit, nor one with earlier jobs (the bound is compared with this run's epsilon).
    if args.state_dir is not None:
        raise ConfigError("the audit runs on a throwaway privacy state in <out>/privacy-state; --state-dir is refused")
    if (args.out / "privacy-state").exists():
        raise ConfigError(f"{args.out} holds an earlier run's privacy state (its budget would continue): use another --out")
    included = draw_coins(canaries)
    hook = GradientCanaries(included)
    seen: dict[str, Any] = {}

    def install(clients: dict[str, Any], states: dict[str, Any], job_id: str) -> None:
        clients[client].audit_hook = hook
        seen.update(job_id=job_id, ledger=states[client].ledger.path)

    t0 = time.perf_counter()
    metrics = example.run(args, on_clients=install)
    run_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    observed = np.stack(hook.observed)
    steps = public_steps(seen["ledger"], client, seen["job_id"])
    delta = example.DELTA
    scorers = {"likelihood ratio (ledger q, sigma)": whitebox_scores(observed, steps, args.max_grad_norm)}
    name, bound, _, gname, gdp, _ = analyse(scorers, included, delta=delta)
    entries, _ = read_verified_ledger(seen["ledger"])
    events = [ev for _, ev, _ in spent_events(entries).get(client, [])]
    eps_ledger = compute_epsilon(events, delta, accountant=example.ACCOUNTANT)
    eps_prv = compute_epsilon(events, delta, accountant="prv")
    report = {
        "client": client, "adversary": "whitebox",
        "adversary_sees": "every noisy DP-SGD step of the client (noisy clipped-gradient sums) and public values",
        "canary_kind": "gradient (Dirac)", "canaries": canaries, "canaries_in": int(included.sum()),
        "coins": "os.urandom (secret to the auditor)", "confidence": 0.95, "scorer": name,
        "bound": bound.to_dict(),
        "fdp_gaussian": {**gdp.to_dict(), "scorer": gname, "ledger_mu": gdp_mu_for_epsilon(eps_ledger, delta),
                         "ratio": gdp.epsilon_lower / eps_ledger},
        "ledger_epsilon": eps_ledger, "ledger_accountant": example.ACCOUNTANT, "ledger_epsilon_prv": eps_prv,
        "delta": delta, "violation": bool(bound.epsilon_lower > eps_ledger),
        "ratio": bound.epsilon_lower / eps_ledger, "steps_or_rounds_observed": len(observed),
        "sample_rate": steps[0][0], "noise_multiplier": steps[0][1],
        "run_seconds": run_seconds, "analysis_seconds": time.perf_counter() - t1,
        "test_accuracy": metrics["simulation_only"]["final"].get("test_accuracy") if "simulation_only" in metrics else None,
        "scores": {"in": scorers[name][included].tolist(), "out": scorers[name][~included].tolist()},
    }
    (args.out / "audit.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_report(scorers[name], included, report, args.out / "audit.png")
    print(f"{client}: white-box, {canaries} gradient canaries, {len(observed)} steps (q {steps[0][0]:.4f}, "
          f"sigma {steps[0][1]:.4f})")
    print(f"  (epsilon, delta) test: epsilon >= {bound.epsilon_lower:.4f}; f-DP (Gaussian): not {gdp.mu_lower:.4f}-GDP "
          f"= epsilon {gdp.epsilon_lower:.4f} at delta {delta:g}; ledger {eps_ledger:.4f} (prv {eps_prv:.4f})")
    return VIOLATION_EXIT if report["violation"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
