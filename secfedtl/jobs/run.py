"""`secfedtl run CONFIG.toml [--job MODULE:ATTR]`: run a federated job in this process (or its
worker processes): the job file's public settings, the job's code (default: the bundled heart
job, :data:`secfedtl.jobs.heart.HEART`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - the job machinery imports torch: only when a job runs
    from secfedtl.federated.config import JobConfig
    from secfedtl.federated.job import FederatedJob


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="job TOML file (schema: docs/config.md)")
    add_common(parser)


def add_common(parser: argparse.ArgumentParser, *, job: bool = True) -> None:
    if job:
        parser.add_argument("--job", default=None, metavar="MODULE:ATTR",
                            help="the FederatedJob to run (default: the bundled heart job, secfedtl.jobs.heart:HEART)")
    parser.add_argument("--out", type=Path, default=Path("runs/job"), help="output directory")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR from its last completed round")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run the clients in N forked worker processes (default: the config's job.workers; "
                             "0: in this process, one after the other)")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="where the hospitals' privacy states (ledgers, budgets) live, kept across jobs; "
                             "default $SECFEDTL_STATE_DIR, else ~/.local/share/secfedtl/privacy")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from secfedtl.federated.job import load_job

    job = load_job(args.job)
    return run_cli(job, job.load_config(args.config), args)


def run_cli(job: FederatedJob, config: JobConfig, args: argparse.Namespace) -> int:
    from secfedtl.reporting.summary import print_summary
    from secfedtl.runtime.local import run_job

    out = args.resume if args.resume is not None else args.out
    metrics = run_job(job, config, out, resume=args.resume is not None, progress=not args.no_progress,
                      workers=args.workers, state_dir=args.state_dir)
    print_summary(metrics)
    ledgers = metrics.get("simulation_only", {}).get("ledgers", {})
    print(f"wrote {out / 'metrics.json'}, {out / 'report.png'}; ledgers: " + ", ".join(ledgers.values()))
    return 0
