"""`secfedtl bench secagg`: it runs, its sums are exact, and --compare-flower runs Flower's SecAgg+
on the same inputs (no timing asserts)."""

import json
import sys

import pytest

from secfedtl.cli import main

PHASES = {"setup_s", "mask_per_client_s", "server_intake_s", "unmask_s", "server_total_s", "round_wall_s",
          "round_cpu_s"}


def _bench(capsys, *extra):
    rc = main(["bench", "secagg", "--clients", "5", "--params", "100", "--dropout", "0.2", "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_bench_secagg_without_flower(capsys):
    report = _bench(capsys, "--authenticated")
    assert PHASES <= set(report)
    assert report["authenticated"] is True
    assert report["sum_correct"] is True
    assert report["included"] == 4 and report["dropped"] == 1
    assert "flower" not in report and "flower_over_secfedtl" not in report


def test_compare_flower_without_flwr_is_one_clear_error(capsys, monkeypatch):
    for name in [n for n in sys.modules if n == "flwr" or n.startswith("flwr.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now raises ImportError
    monkeypatch.delitem(sys.modules, "secfedtl.bench.flower_secaggplus", raising=False)
    rc = main(["bench", "secagg", "--clients", "5", "--params", "10", "--compare-flower"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "--compare-flower needs flwr" in err


@pytest.mark.parametrize("neighbours,threshold,clock", [(None, None, "wall"), ("4", "3", "cpu")])
def test_compare_flower_same_run(capsys, neighbours, threshold, clock):
    pytest.importorskip("flwr")
    extra = ["--authenticated", "--compare-flower", "--clock", clock]
    if neighbours is not None:
        extra += ["--clients", "9", "--dropout", "0.1", "--neighbours", neighbours, "--threshold", threshold]
    report = _bench(capsys, *extra)
    assert report["clock"] == clock
    flower = report["flower"]
    assert PHASES <= set(flower)
    assert set(report["flower_over_secfedtl"]) <= PHASES
    assert report["sum_correct"] is True
    assert flower["completed"] is True
    assert flower["sum_correct"] is True
    assert flower["max_abs_error"] <= flower["error_bound"]
    assert flower["clients"] == report["clients"] and flower["params"] == report["params"]
    assert flower["threshold"] == report["threshold"]
    assert flower["dropped"] == report["dropped"]
    assert flower["included"] == report["included"]
    assert flower["neighbours"] == report["neighbours"]  # even degree: Flower's num_shares = k + 1
    assert flower["flwr_version"].startswith("1.")
    for key, ratio in report["flower_over_secfedtl"].items():
        assert ratio == flower[key] / report[key]


def test_flower_num_shares_mapping():
    flower = pytest.importorskip("secfedtl.bench.flower_secaggplus")
    assert flower.flower_num_shares(28, 100) == 29  # 28 neighbours, as ours
    assert flower.flower_num_shares(11, 100) == 11  # Flower needs an odd count: 10 neighbours
    assert flower.flower_num_shares(99, 100) == 100  # complete graph
