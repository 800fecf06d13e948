"""`secfedtl ...` command line.

The parser is built from modules that import nothing heavy: `secfedtl --help`, `secfedtl run
--help` and `secfedtl audit LEDGER` never import torch or opacus. Each command names the module
that adds its arguments (``add_arguments(parser)``; the job commands' arguments are here, since
the job module imports torch) and the ``module:function`` that runs it (``main(args) -> int``),
imported only after the arguments parsed.

A user's mistake (a missing file, a bad value, a file that is not a ledger) is one line on stderr
and exit status 2, never a traceback: commands raise :class:`~secfedtl.errors.SecFedTLError` for
them, and an :class:`OSError` that escapes (a folder that cannot be written) is reported the same
way. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from secfedtl.errors import SecFedTLError


@dataclass(frozen=True, slots=True)
class Command:
    """One ``secfedtl`` command: its help line, what adds its arguments (a module name, imported
    to build the parser, or a function here) and the ``module:function`` that runs it."""

    help: str
    arguments: str | Callable[[argparse.ArgumentParser], None]
    run: str


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints its whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _job_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """Options shared by `secfedtl run` and `secfedtl demo`."""
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR from its last completed round")
    parser.add_argument("--workers", type=_nonnegative_int, default=None, metavar="N",
                        help="run the clients in N forked worker processes (default: the config's job.workers; "
                             "0: in this process, one after the other)")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="where the hospitals' privacy states (ledgers, budgets) live, kept across jobs; "
                             "default $SECFEDTL_STATE_DIR, else ~/.local/share/secfedtl/privacy")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="job TOML file (schema: docs/config.md)")
    parser.add_argument("--job", default=None, metavar="MODULE:ATTR",
                        help="the FederatedJob to run, from this machine's installation (default: the bundled heart "
                             "job, secfedtl.jobs.heart:HEART; docs/embedding.md)")
    _job_arguments(parser, out="runs/job")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    _job_arguments(parser, out="runs/demo")
    parser.add_argument("--rounds", type=_positive_int, default=None, help="federated rounds (default 5)")
    parser.add_argument("--epsilon", type=float, default=None, help="per-hospital budget (default 1.0)")
    parser.add_argument("--delta", type=float, default=None, help="default 1e-5")
    parser.add_argument("--seed", type=int, default=None, help="the public job seed (default 0)")
    parser.add_argument("--noise", choices=("local", "distributed"), default="local",
                        help="local: secfedtl/configs/heart.toml (each hospital adds the full noise); distributed: "
                             "secfedtl/configs/heart_distributed.toml (each adds a share; docs/privacy.md)")


COMMANDS: dict[str, Command] = {
    "demo": Command("run the bundled heart-disease federated transfer job", _demo_arguments,
                    "secfedtl.jobs.demo:main"),
    "run": Command("run a job described by a TOML config", _run_arguments, "secfedtl.jobs.run:main"),
    "audit": Command("verify a privacy ledger and recompute every epsilon", "secfedtl.privacy.audit",
                     "secfedtl.privacy.audit:main"),
    "audit-run": Command("empirical lower bound on a hospital's epsilon from one run with canaries "
                         "(exit 4: above the ledger)", "secfedtl.jobs.audit_run", "secfedtl.jobs.audit_run:main"),
    "node": Command("serve one hospital's node to its Flower SuperNode (a local agent)", "secfedtl.runtime.agent",
                    "secfedtl.runtime.agent:main"),
    "flower": Command("run a job on Flower on this machine (local deployment or simulation)",
                      "secfedtl.runtime.deploy", "secfedtl.runtime.deploy:main"),
    "keys": Command("create a signing key pair, build or show the federation's roster", "secfedtl.federated.roster",
                    "secfedtl.federated.roster:main"),
}
BENCHES: dict[str, Command] = {
    "secagg": Command("time each secure-aggregation phase", "secfedtl.bench.secagg", "secfedtl.bench.secagg:main"),
    "dp": Command("time DP head training: cached features vs backbone", "secfedtl.bench.dp", "secfedtl.bench.dp:main"),
    "flower": Command("per-round cost of a job over Flower (local deployment) vs in process", "secfedtl.bench.flower",
                      "secfedtl.bench.flower:main"),
    "audit": Command("repeated empirical audits of the correct pipeline: false alarms, tightness",
                     "secfedtl.bench.audit", "secfedtl.bench.audit:main"),
    "distributed": Command("distributed DP: Skellam sampler speed, encoding cost, bit-width table",
                           "secfedtl.bench.distributed", "secfedtl.bench.distributed:main"),
}


def _import(module: str) -> object | None:
    """``module``, or None when this build of secfedtl lacks it (a trimmed install)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("secfedtl"):
            return None
        raise


def _add(sub: argparse._SubParsersAction, name: str, command: Command) -> None:
    parser = sub.add_parser(name, help=command.help, description=command.help)
    if callable(command.arguments):
        command.arguments(parser)
    else:
        mod = _import(command.arguments)
        if mod is None:
            parser.set_defaults(_missing=command.arguments)
            return
        mod.add_arguments(parser)  # type: ignore[attr-defined]
    parser.set_defaults(_run=command.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the command asked for gets its arguments (the others are
    listed with their help line), so no other command's module is imported."""
    parser = _Parser(prog="secfedtl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, command in COMMANDS.items():
        if name == wanted:
            _add(sub, name, command)
        else:
            sub.add_parser(name, help=command.help)
    bench = sub.add_parser("bench", help="benchmarks (never part of the test suite)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    wanted_bench = argv[1] if wanted == "bench" and len(argv) > 1 else None
    for name, command in BENCHES.items():
        if name == wanted_bench:
            _add(bench_sub, name, command)
        else:
            bench_sub.add_parser(name, help=command.help)
    return parser


def _error(message: str) -> int:
    print(f"secfedtl: error: {message}", file=sys.stderr)
    return 2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(f"this build of secfedtl has no {args._missing}")
    module_name, _, function = args._run.partition(":")
    module = _import(module_name)
    if module is None:
        parser.error(f"this build of secfedtl has no {module_name}")
    try:
        return int(getattr(module, function)(args) or 0)
    except SecFedTLError as exc:
        return _error(_one_line(exc))
    except OSError as exc:  # a folder that cannot be created or written, a disk that is full
        where = f" {os.fspath(exc.filename)!r}" if exc.filename is not None else ""
        return _error(f"{exc.strerror or _one_line(exc)}{where}")
    except KeyboardInterrupt:
        print("secfedtl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
