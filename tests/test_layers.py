"""No lower layer of secfedtl imports a higher one.

Every module's imports are read with :mod:`ast` (top-level and inside functions, so a lazy import
counts too) and each ``secfedtl...`` import is checked against the layer order below: a module
may import its own layer and any lower one, never a higher one.

The order (low to high), and why:

* ``errors``, ``_atomic``, ``_checks``: the exception tree, an atomic file write and shared argument checks, used everywhere;
* ``crypto``: wrappers over ``cryptography``;
* ``encoding``: fixed-point vectors in Z_2^b;
* ``secagg``: the Sans-I/O protocol (messages, codec, state machines, one round driver);
* ``privacy``: DP events, accountants, budgets, the ledger, audits;
* ``transfer``, ``training``, ``aggregation``, ``data``: models and freezing, the DP client,
  server optimizers, bundled datasets (one layer: training uses transfer's feature caching);
* ``reporting``: plots and tables from plain metrics dicts (it knows no model or transport, so
  the server loop below the transports may draw a simulation's report);
* ``federated``: a job's description, the server loop, the client node and its tasks, the wire
  format between them, the roster;
* ``runtime``: transports (in process, worker processes, node agent, Flower) and the local runner;
* ``testing``: hypothesis strategies and harnesses for users' tests (over the layers below);
* ``jobs``: job instances (heart) and the commands that run them;
* ``bench``, ``cli``, ``configs``: the top: commands and benchmarks over everything.

``secfedtl.jobs.audit_run`` (the empirical audit) is an experiment on the heart job, so it lives
with the jobs. ``PLACED`` can pin a module to another layer than its package's; it is empty.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "secfedtl"

LAYERS: list[set[str]] = [
    {"secfedtl", "secfedtl.errors", "secfedtl._atomic", "secfedtl._checks"},
    {"secfedtl.crypto"},
    {"secfedtl.encoding"},
    {"secfedtl.secagg"},
    {"secfedtl.privacy"},
    {"secfedtl.transfer", "secfedtl.training", "secfedtl.aggregation", "secfedtl.data"},
    {"secfedtl.reporting"},
    {"secfedtl.federated"},
    {"secfedtl.runtime"},
    {"secfedtl.testing"},
    {"secfedtl.jobs"},
    {"secfedtl.bench", "secfedtl.cli", "secfedtl.configs", "secfedtl.__main__"},
]
#: Modules whose layer is not their folder's (with the reason in the module docstring above).
PLACED: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> int:
    """A module's layer: its entry in PLACED, else its top-level package's."""
    parts = module.split(".")
    key = PLACED.get(module, ".".join(parts[:2]))
    for level, members in enumerate(LAYERS):
        if key in members:
            return level
    raise AssertionError(f"{module} is in no layer: add {key!r} to LAYERS in tests/test_layers.py")


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` of every secfedtl module ``path`` imports, wherever the import is."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against this module's package
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from pkg import module`
    return [(line, name) for line, name in found if name in known]


def _violations(modules: dict[str, Path]) -> list[str]:
    known = set(modules)
    bad = []
    for module, path in modules.items():
        mine = _layer(module)
        for line, target in _imports(module, path, known):
            if _layer(target) > mine:
                bad.append(f"{path}:{line}: {module} imports {target}, a higher layer")
    return bad


def test_every_module_is_in_a_layer():
    for module in _modules():
        _layer(module)


def test_no_lower_layer_imports_a_higher_one():
    assert _violations(_modules()) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """A function-level or relative import of a higher layer is caught (the check can fail)."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from secfedtl.jobs import heart\n    return heart\n", encoding="utf-8")
    relative = tmp_path / "relative.py"
    relative.write_text("from ..runtime import pool\n", encoding="utf-8")
    modules = {**_modules(), "secfedtl.crypto.lazy": lazy, "secfedtl.federated.relative": relative}
    found = _violations(modules)
    assert any("secfedtl.crypto.lazy imports secfedtl.jobs.heart" in v for v in found)
    assert any("secfedtl.federated.relative imports secfedtl.runtime.pool" in v for v in found)
    assert all("lazy.py" in v or "relative.py" in v for v in found)


@pytest.mark.parametrize("package", ["secfedtl.secagg", "secfedtl.privacy", "secfedtl.federated",
                                     "secfedtl.runtime"])
def test_no_module_below_the_jobs_imports_a_job(package):
    modules = _modules()
    for module, path in modules.items():
        if module.startswith(package + ".") and module not in PLACED:
            assert not [t for _, t in _imports(module, path, set(modules)) if t.startswith("secfedtl.jobs")], module
