"""`secfedtl ...` command line.

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported only when their command runs, so `secfedtl audit`
does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from secfedtl.errors import SecFedTLError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("secfedtl.jobs.demo", "run the bundled heart-disease federated transfer job"),
    "run": ("secfedtl.jobs.run", "run a job described by a TOML config"),
    "audit": ("secfedtl.privacy.audit", "verify a privacy ledger and recompute every epsilon"),
    "audit-run": ("secfedtl.runtime.audit_run",
                  "empirical lower bound on a hospital's epsilon from one run with canaries (exit 4: above the ledger)"),
    "node": ("secfedtl.runtime.agent", "serve one hospital's node to its Flower SuperNode (a local agent)"),
    "flower": ("secfedtl.runtime.deploy", "run a job on Flower on this machine (local deployment or simulation)"),
    "keys": ("secfedtl.federated.roster", "create a signing key pair, build or show the federation's roster"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "secagg": ("secfedtl.bench.secagg", "time each secure-aggregation phase"),
    "dp": ("secfedtl.bench.dp", "time DP head training: cached features vs backbone"),
    "flower": ("secfedtl.bench.flower", "per-round cost of a job over Flower (local deployment) vs in process"),
    "audit": ("secfedtl.bench.audit", "repeated empirical audits of the correct pipeline: false alarms, tightness"),
    "distributed": ("secfedtl.bench.distributed", "distributed DP: Skellam sampler speed, encoding cost, bit-width table"),
}


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("secfedtl"):
            parser.set_defaults(_missing=module)
            return
        raise
    mod.add_arguments(parser)
    parser.set_defaults(_main=mod.main)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secfedtl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Import only the module of the command actually asked for.
    wanted = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            _add(sub, name, module, help_text)
        else:
            sub.add_parser(name, help=help_text)
    bench = sub.add_parser("bench", help="benchmarks (never part of the test suite)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    wanted_bench = argv[1] if wanted == "bench" and len(argv) > 1 else None
    for name, (module, help_text) in BENCHES.items():
        if name == wanted_bench:
            _add(bench_sub, name, module, help_text)
        else:
            bench_sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(f"this build of secfedtl has no {args._missing}")
    if not hasattr(args, "_main"):
        parser.error("unknown command")
    try:
        return int(args._main(args) or 0)
    except SecFedTLError as exc:
        print(f"secfedtl: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
