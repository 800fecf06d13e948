"""`secfedtl run CONFIG.toml [--job MODULE:ATTR]`: run a federated job in this process (or its
worker processes): the job file's public settings, the job's code (default: the bundled heart
job, :data:`secfedtl.jobs.heart.HEART`). Arguments: :mod:`secfedtl.cli`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from secfedtl.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - the job machinery imports torch: only when a job runs
    from secfedtl.federated.config import JobConfig
    from secfedtl.federated.job import FederatedJob


def main(args: argparse.Namespace) -> int:
    """`secfedtl run CONFIG` (arguments: :mod:`secfedtl.cli`)."""
    from secfedtl.federated.job import load_job

    job = load_job(getattr(args, "job", None))
    return run_cli(job, job.load_config(args.config), args)


def _check_folder(path: Path, option: str) -> None:
    """Before anything is created: ``path`` is a folder or can become one."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {os.fspath(path)!r}: {os.fspath(parent)!r} is a file, not a folder")
            return


def run_cli(job: FederatedJob, config: JobConfig, args: argparse.Namespace) -> int:
    """Run ``job`` as `secfedtl run`/`demo` asked (arguments: :mod:`secfedtl.cli`)."""
    from secfedtl.reporting.summary import print_summary
    from secfedtl.runtime.local import run_job

    out = args.resume if args.resume is not None else args.out
    _check_folder(out, "--resume" if args.resume is not None else "--out")
    if args.state_dir is not None:
        _check_folder(args.state_dir, "--state-dir")
    metrics = run_job(job, config, out, resume=args.resume is not None, progress=not args.no_progress,
                      workers=args.workers, state_dir=args.state_dir)
    print_summary(metrics)
    ledgers = metrics.get("simulation_only", {}).get("ledgers", {})
    print(f"wrote {out / 'metrics.json'}, {out / 'report.png'}; ledgers: " + ", ".join(ledgers.values()))
    return 0
