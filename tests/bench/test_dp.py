"""Smoke test of `secfedtl bench dp`: it runs and reports every configuration (no timing asserts)."""

import json

from secfedtl.cli import main


def test_bench_dp_json(capsys):
    rc = main([
        "bench", "dp", "--json", "--samples", "96", "--batch-size", "16", "--backbone-steps", "2",
        "--head-steps", "3", "--repeats", "1", "--backbone", "tiny-cnn", "--threads", "1",
    ])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"tiny-cnn", "linear-784x10", "setup"}
    sps = report["tiny-cnn"]["steps_per_s"]
    assert set(sps) == {"dp_backbone", "plain_backbone", "dp_cached", "plain_cached"}
    assert all(v > 0 for v in sps.values())
    ratio = report["tiny-cnn"]["ratios"]["dp_cached_over_dp_backbone"]
    assert ratio == sps["dp_cached"] / sps["dp_backbone"]
    assert report["setup"]["expected_batch_size"] == 16


def test_thread_setting_is_restored():
    import torch

    from secfedtl.bench.dp import run_benchmark

    before = torch.get_num_threads()
    report = run_benchmark(samples=64, batch_size=16, backbone_steps=1, head_steps=1, repeats=1,
                           threads=1, backbones=("tiny-cnn",))
    assert report["setup"]["torch_threads"] == 1
    assert torch.get_num_threads() == before
