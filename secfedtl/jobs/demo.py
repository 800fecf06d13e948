"""`secfedtl demo`: the bundled heart-disease job (secfedtl/configs/heart.toml, or with ``--noise
distributed`` secfedtl/configs/heart_distributed.toml) with overrides.

The demo's hospitals keep their privacy state (ledgers and budgets) in a THROWAWAY folder inside
the output folder (``<out>/privacy-state``) unless ``--state-dir`` says otherwise: a demo is not a
real hospital, and `make demo` starts from nothing each time. A real job (`secfedtl run`) keeps
each hospital's state across jobs (docs/privacy.md)."""

from __future__ import annotations

import argparse

from secfedtl.jobs.run import run_cli


def main(args: argparse.Namespace) -> int:
    """`secfedtl demo` (arguments: :mod:`secfedtl.cli`)."""
    from secfedtl.jobs.heart import HEART, HeartConfig

    config = HeartConfig.load(None) if args.noise == "local" else HeartConfig.load_bundled("heart_distributed.toml")
    config = config.updated({("job", "rounds"): args.rounds, ("privacy", "epsilon"): args.epsilon,
                             ("privacy", "delta"): args.delta, ("job", "seed"): args.seed})
    if args.state_dir is None:
        args.state_dir = (args.resume if args.resume is not None else args.out) / "privacy-state"
        print(f"demo: throwaway privacy state in {args.state_dir} (real jobs keep it across runs)")
    return run_cli(HEART, config, args)
