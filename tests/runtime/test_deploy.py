"""Process orchestration for local Flower deployments (no Flower needed)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from secfedtl.runtime.deploy import APP_PYPROJECT, Processes, free_port, read_status, wait_for, write_app


def test_the_app_names_secfedtl_components_and_every_run_config_key(tmp_path: Path) -> None:
    conf = tomllib.loads(write_app(tmp_path / "app").joinpath("pyproject.toml").read_text(encoding="utf-8"))
    assert conf["tool"]["flwr"]["app"]["components"] == {"serverapp": "secfedtl.runtime.flower:server_app",
                                                         "clientapp": "secfedtl.runtime.flower:client_app"}
    keys = set(conf["tool"]["flwr"]["app"]["config"])
    assert keys == {"job", "job-code", "roster", "out", "phase-timeout", "discovery-timeout", "poll-interval",
                    "record-view"}
    shipped = Path(__file__).parents[2] / "examples" / "flower_deployment" / "pyproject.toml"
    assert shipped.read_text(encoding="utf-8") == APP_PYPROJECT  # the example is this app


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_processes_are_killed_by_their_ids(tmp_path: Path) -> None:
    procs = Processes(root=tmp_path)
    proc = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(Exception, match="already running"):
        procs.start("sleeper", [sys.executable, "-c", "pass"])
    assert proc.poll() is None
    procs.kill("sleeper")
    assert proc.poll() is not None
    quitter = procs.start("quitter", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="quitter exited"):
        wait_for(lambda: False, timeout=30, what="nothing", procs=procs)
    assert quitter.returncode == 3 and "bye" in procs.log("quitter")
    procs.stop_all(grace=1)


def test_wait_for_times_out_and_status_reads_tolerate_partial_files(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        wait_for(lambda: False, timeout=0.2, what="nothing", interval=0.05)
    assert read_status(tmp_path) == {}
    (tmp_path / "status.json").write_text('{"state": "runn', encoding="utf-8")
    assert read_status(tmp_path) == {}
    (tmp_path / "status.json").write_text('{"state": "done"}', encoding="utf-8")
    assert read_status(tmp_path) == {"state": "done"}


def test_the_local_run_progress_follows_what_the_server_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`secfedtl flower local` is minutes of child processes: its bar follows the server's files."""
    import json

    from secfedtl.runtime.deploy import _Progress

    bar = _Progress(rounds=2, personalise=True, server_out=tmp_path, enabled=True)
    bar.poll()  # nothing written yet
    assert bar.bar.n == 0 and bar.bar.desc.startswith("server: training the source model")
    (tmp_path / "status.json").write_text(json.dumps({"state": "discovering"}), encoding="utf-8")
    bar.poll()
    assert bar.bar.desc.startswith("server: waiting for the nodes")
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}), encoding="utf-8")
    (tmp_path / "rounds.json").write_text(json.dumps([{"round": 0}]), encoding="utf-8")
    (tmp_path / "progress.jsonl").write_text(json.dumps({"phase": "unmask:start"}) + "\n", encoding="utf-8")
    bar.poll()
    assert bar.bar.n == 1 and bar.bar.desc.startswith("federated rounds")
    assert bar.bar.postfix == "phase=unmask"
    (tmp_path / "rounds.json").write_text('[{"round": 0}, {"rou', encoding="utf-8")  # being written
    bar.poll()
    assert bar.bar.n == 1
    (tmp_path / "rounds.json").write_text(json.dumps([{"round": 0}, {"round": 1}]), encoding="utf-8")
    bar.poll()
    assert bar.bar.n == 2 and bar.bar.desc.startswith("personalisation")
    (tmp_path / "status.json").write_text(json.dumps({"state": "done"}), encoding="utf-8")
    bar.poll()
    assert bar.bar.n == 3 == bar.bar.total
    bar.close()
    assert "personalisation" in capsys.readouterr().err
