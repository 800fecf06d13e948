"""docs/embedding.md runs as written: its fenced blocks are extracted and executed in order, in
a fresh folder. A block whose first line is ``# NAME`` (``# my_job.py``, ``# job.toml``) is
written to that file; every other python block is executed with that folder as the working
directory and on the import path. The Flower block (it calls ``run_local``) runs only under the
``flower`` mark (minutes: Flower starts a process per message)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(DOC.read_text(encoding="utf-8"))]


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, flower: bool) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", ":".join(filter(None, [str(tmp_path), *sys.path])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sys.modules.pop("my_job", None)
    namespace: dict = {"__name__": "__doc__"}
    ran = 0
    for lang, body in blocks():
        first = body.splitlines()[0]
        name = re.fullmatch(r"# ([\w.]+\.(?:py|toml))", first)
        if name:
            (tmp_path / name.group(1)).write_text(body, encoding="utf-8")
            continue
        if lang != "python" or ("run_local" in body and not flower):
            continue
        exec(compile(body, f"{DOC.name}:block{ran}", "exec"), namespace)  # noqa: S102 - our own doc
        ran += 1
    sys.modules.pop("my_job", None)
    return namespace


def test_the_doc_has_the_snippets_it_promises():
    langs = [lang for lang, _ in blocks()]
    assert langs.count("python") >= 3 and "toml" in langs
    assert any("run_job" in b for _, b in blocks()) and any("run_local" in b for _, b in blocks())


def test_embedding_doc_runs_in_process(tmp_path, monkeypatch):
    ns = _run(tmp_path, monkeypatch, flower=False)
    final = ns["metrics"]["simulation_only"]["final"]
    assert set(final["epsilon"]) == {"alice", "bob", "carol"}
    assert 0 < max(final["epsilon"].values()) <= 2.0
    assert [r["status"] for r in ns["metrics"]["server"]["rounds"]] == ["ok"] * 3
    assert final["pooled_test_accuracy"] > 0.6  # labels are a linear function of the inputs
    for name in ("alice", "bob", "carol"):
        assert (tmp_path / "runs" / "privacy" / name / "ledger.jsonl").stat().st_size > 0


@pytest.mark.flower
def test_embedding_doc_runs_on_flower(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    ns = _run(tmp_path, monkeypatch, flower=True)
    assert [r["status"] for r in ns["metrics"]["server"]["rounds"]] == ["ok"] * 3
    ledgers = list((tmp_path / "runs" / "my-job-flower" / "hospitals").glob("*/privacy/*/ledger.jsonl"))
    assert len(ledgers) == 3
