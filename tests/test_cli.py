"""`secfedtl ...` as a newcomer meets it: every mistake is one line on stderr and a non-zero exit
(never a traceback), checked before any folder is made; help and audit never import torch."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from secfedtl.cli import main
from secfedtl.privacy.events import PoissonGaussianEvent
from secfedtl.privacy.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]
HEART = REPO / "secfedtl" / "configs" / "heart.toml"
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``secfedtl argv``; assert it failed with exactly one line on stderr; return that line."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def job_file(tmp_path: Path, old: str, new: str) -> Path:
    text = HEART.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "job.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def run_argv(config: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["run", str(config), "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"),
            "--no-progress", *extra]


def assert_nothing_created(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


# --- the job file --------------------------------------------------------------------------------

def test_missing_job_file(tmp_path, capsys):
    line = one_line_error(run_argv(tmp_path / "missing.toml", tmp_path), capsys)
    assert line == f"secfedtl: error: cannot read job file {str(tmp_path / 'missing.toml')!r}: No such file or directory"
    assert_nothing_created(tmp_path)


def test_a_folder_given_as_job_file(tmp_path, capsys):
    (tmp_path / "jobs").mkdir()
    line = one_line_error(run_argv(tmp_path / "jobs", tmp_path), capsys)
    assert "cannot read job file" in line and "Is a directory" in line
    assert_nothing_created(tmp_path)


def test_an_unreadable_job_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "secret.toml"
    path.write_text(HEART.read_text(encoding="utf-8"), encoding="utf-8")
    real = Path.read_text

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        if self == path:  # chmod 000 does not stop root, who may run the suite
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    line = one_line_error(run_argv(path, tmp_path), capsys)
    assert line == f"secfedtl: error: cannot read job file {str(path)!r}: Permission denied"
    assert_nothing_created(tmp_path)


def test_a_binary_job_file(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_bytes(b"\xff\xfe\x00")
    assert "cannot read job file" in one_line_error(run_argv(path, tmp_path), capsys)
    assert_nothing_created(tmp_path)


def test_malformed_toml(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text("[job\n", encoding="utf-8")
    assert one_line_error(run_argv(path, tmp_path), capsys).startswith("secfedtl: error: invalid TOML: ")
    assert_nothing_created(tmp_path)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("rounds = 3 ", "roundz = 3 ", "[job]: unknown keys ['roundz'], missing keys ['rounds']"),
    ("rounds = 3 ", "rounds = 0 ", "rounds must be >= 1"),
    ('rounds = 3 ', 'rounds = "three" ', "[job] rounds must be int"),
    ("epsilon = 1.0 ", "epsilon = -1.0 ", "[privacy] epsilon must be > 0"),
    ('accountant = "rdp"', 'accountant = "gdp"', "[privacy] accountant must be one of ['prv', 'rdp']"),
    ('optimizer = "fedavg"', 'optimizer = "fedfoo"', "[server] unknown server optimiser 'fedfoo'"),
    ('optimizer = "sgd"', 'optimizer = "lbfgs"', "[training] optimizer must be 'sgd' or 'adam'"),
    ("lr = 0.05 ", "lr = -1.0 ", "[training] lr must be in (0, inf)"),
    ("expected_batch_size = 24", "expected_batch_size = 0", "[training] expected_batch_size must be a positive int"),
    ("l2sp = 0.0 ", "l2sp = -1.0 ", "[training] l2sp must be a finite number >= 0"),
    ("bits = 32", "bits = 3", "[secagg] bits must be an integer in [16, 64]"),
    ("clip = 1.0 ", "clip = 0.0 ", "[secagg] clip must be a finite positive number"),
    ('"switzerland", "va"]', '"switzerland", "mars"]', "[declared] records must give every client"),
])
def test_a_bad_value_is_one_line_and_creates_nothing(tmp_path, capsys, old, new, expected):
    line = one_line_error(run_argv(job_file(tmp_path, old, new), tmp_path), capsys)
    assert line.startswith("secfedtl: error: ") and expected in line
    assert_nothing_created(tmp_path)


def test_a_client_that_is_not_a_centre_of_the_dataset(tmp_path, capsys):
    path = job_file(tmp_path, '"switzerland", "va"]', '"switzerland", "mars"]')
    path.write_text(path.read_text(encoding="utf-8").replace("va = 70", "mars = 70"), encoding="utf-8")
    line = one_line_error(run_argv(path, tmp_path), capsys)
    assert "[job] not centres of uci_heart_disease: ['mars']" in line
    assert_nothing_created(tmp_path)


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    ([], "secfedtl: error: the following arguments are required: COMMAND"),
    (["frobnicate"], "secfedtl: error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["run"], "secfedtl run: error: the following arguments are required: config"),
    (["demo", "--rounds", "0"], "secfedtl demo: error: argument --rounds: must be >= 1, got 0"),
    (["demo", "--rounds", "many"], "secfedtl demo: error: argument --rounds: invalid"),
    (["run", str(HEART), "--workers", "-1"], "secfedtl run: error: argument --workers: must be >= 0, got -1"),
    (["audit"], "secfedtl audit: error: the following arguments are required: LEDGER"),
    (["audit", "x", "--accountant", "gdp"], "secfedtl audit: error: argument --accountant: invalid choice"),
    (["bench", "nope"], "secfedtl bench: error: argument BENCH: invalid choice: 'nope'"),
])
def test_bad_arguments(argv, expected, capsys):
    line = one_line_error(argv, capsys)
    assert line.startswith(expected), line
    assert "--help" in line


def test_demo_with_a_bad_budget_creates_nothing(tmp_path, capsys):
    line = one_line_error(["demo", "--epsilon", "0", "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert line == "secfedtl: error: [privacy] epsilon must be > 0 and delta in (0, 1), got epsilon 0.0, delta 1e-05"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--out", "--state-dir"])
def test_a_file_where_a_folder_belongs(tmp_path, capsys, option):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    argv = ["run", str(HEART), "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"), "--no-progress"]
    argv[argv.index(option) + 1] = str(tmp_path / "afile" / "sub")
    line = one_line_error(argv, capsys)
    assert line.startswith(f"secfedtl: error: {option} ") and "is a file, not a folder" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_nothing_to_resume(tmp_path, capsys):
    line = one_line_error(["run", str(HEART), "--resume", str(tmp_path / "none"), "--no-progress"], capsys)
    assert "nothing to resume" in line
    assert not (tmp_path / "none").exists()


# --- ledgers -------------------------------------------------------------------------------------

EVENT = PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=10)


def write_ledger(path: Path) -> Path:
    ledger = Ledger(path)
    ledger.complete(ledger.begin(client="h1", round=0, event=EVENT, delta=1e-5, model_hash="m", release="test",
                                 randomness="csprng"))
    return path


def test_an_empty_ledger_is_never_chain_ok(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    line = one_line_error(["audit", str(tmp_path / "empty.jsonl")], capsys)
    assert "is an empty ledger" in line and "chain ok" not in line


@pytest.mark.parametrize("content", [b"patient,age\n1,54\n", b"\x89PNG\r\n\x1a\n\x00\x00", b'{"a": 1}\n'])
def test_a_file_that_is_not_a_ledger(tmp_path, capsys, content):
    path = tmp_path / "notes.csv"
    path.write_bytes(content)
    line = one_line_error(["audit", str(path)], capsys)
    assert line.startswith(f"secfedtl: error: {str(path)!r}: not a secfedtl ledger")
    assert "TAMPERED" not in line.upper()


def test_a_tampered_ledger_is_not_called_not_a_ledger(tmp_path, capsys):
    path = write_ledger(tmp_path / "ledger.jsonl")
    path.write_bytes(path.read_bytes().replace(b'"steps":10', b'"steps":1'))
    assert main(["audit", str(path)]) == 1
    out = capsys.readouterr().out
    assert "ledger TAMPERED: first bad line 1" in out and "not a secfedtl ledger" not in out


@pytest.mark.parametrize("make", ["missing", "folder"])
def test_an_unreadable_ledger(tmp_path, capsys, make):
    path = tmp_path / "ledger.jsonl"
    if make == "folder":
        path.mkdir()
    line = one_line_error(["audit", str(path)], capsys)
    reason = "Is a directory" if make == "folder" else "No such file or directory"
    assert line == f"secfedtl: error: cannot read ledger {str(path)!r}: {reason}"


def test_a_bad_delta(tmp_path, capsys):
    line = one_line_error(["audit", str(write_ledger(tmp_path / "l.jsonl")), "--delta", "2"], capsys)
    assert line == "secfedtl: error: delta must be in (0, 1), got 2.0"


def test_errors_through_the_installed_entry_point(tmp_path):
    """The same through a real process (`python -m secfedtl.cli`): one line, exit 2."""
    for argv in (["run", str(tmp_path / "missing.toml")], ["audit", str(tmp_path / "missing.jsonl")]):
        done = subprocess.run([sys.executable, "-m", "secfedtl.cli", *argv], capture_output=True, text=True,
                              env=ENV, cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --- what help and audit import ------------------------------------------------------------------

PROBE = """
import json, sys
from secfedtl.cli import build_parser, main
for argv in (["--help"], ["run", "--help"], ["demo", "--help"], ["audit", "--help"]):
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit:
        pass
code = main(["audit", sys.argv[1]])
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "opacus", "flwr") if m in sys.modules)}))
"""


def test_help_and_audit_never_import_torch(tmp_path):
    ledger = write_ledger(tmp_path / "ledger.jsonl")
    done = subprocess.run([sys.executable, "-c", PROBE, str(ledger)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}


def test_audit_output_does_not_depend_on_optional_packages(tmp_path):
    """rich (or any other optional package) installed or not, an auditor reads the same text."""
    ledger = write_ledger(tmp_path / "ledger.jsonl")
    outputs = []
    for blocked in ([], ["rich", "tqdm", "matplotlib", "scipy", "pandas"]):
        code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
                + "from secfedtl.cli import main\nsys.exit(main(['audit', sys.argv[1], '--releases']))\n")
        done = subprocess.run([sys.executable, "-c", code, str(ledger)], capture_output=True, text=True, env=ENV,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] and "chain ok" in outputs[0]
    assert os.fspath(ledger) in outputs[0]


# --- other commands ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_a_key_name_cannot_leave_its_folder(tmp_path, capsys, name):
    line = one_line_error(["keys", "new", name, "--out", str(tmp_path / "keys")], capsys)
    assert "a key's name is also its file name" in line
    assert list(tmp_path.iterdir()) == []


def test_flower_arguments_are_checked_before_anything_starts(tmp_path, capsys):
    line = one_line_error(["flower", "local", "--phase-timeout", "0", "--out", str(tmp_path / "out")], capsys)
    assert line == "secfedtl: error: --phase-timeout must be a positive number of seconds, got 0.0"
    line = one_line_error(["flower", "local", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")], capsys)
    assert "cannot read job file" in line
    assert list(tmp_path.iterdir()) == []



def test_demo_noise_distributed_runs_the_bundled_distributed_job(tmp_path, monkeypatch):
    """`secfedtl demo --noise distributed` builds secfedtl/configs/heart_distributed.toml (with the
    demo's overrides) and hands it to the same runner; the default stays heart.toml."""
    import secfedtl.jobs.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_cli", lambda job, config, args: seen.setdefault("config", config) and 0)
    for noise, expected in (("distributed", "distributed"), ("local", "local")):
        seen.clear()
        args = argparse.Namespace(noise=noise, rounds=2, epsilon=None, delta=None, seed=None, state_dir=None,
                                  resume=None, out=tmp_path / noise)
        demo.main(args)
        assert seen["config"]["privacy"].get("noise", "local") == expected
        assert seen["config"]["job"]["rounds"] == 2
