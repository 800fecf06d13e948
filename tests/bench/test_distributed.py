"""Smoke test of `secfedtl bench distributed` on tiny sizes (no timing is asserted)."""

from __future__ import annotations

from secfedtl.bench.distributed import bench_bits, bench_encoding, bench_sampler, bench_step


def test_bench_pieces_run_and_report_the_rule() -> None:
    rows = bench_sampler(1000, [5.0], repeats=1)
    assert rows[0]["table_rows"] > 1 and rows[0]["samples_per_s"] > 0
    assert bench_encoding(100, 4, repeats=1)["padded"] == 128
    bits = bench_bits([1000], [3], max_batch=64, colluders=1)
    chosen = bits["smallest_within_1pct"][0]
    assert chosen["overhead"] <= 1.01 and chosen["honest"] == 2
    curve = bits["curves"][0]["curve"]
    assert [p["bits"] for p in curve] == sorted(p["bits"] for p in curve)
    assert curve[-1]["overhead"] < curve[0]["overhead"]


def test_bench_step_reports_each_piece_with_and_without_rotation() -> None:
    rows = bench_step(batch=6, features=20, classes=3, scale=100.0, mu=50.0, repeats=1)
    assert [r["rotate"] for r in rows] == [True, False]
    assert [r["padded"] for r in rows] == [64, 63]
    for row in rows:
        assert row["step_s"] == row["gradients_s"] + row["encode_s"] + row["noise_and_wrap_s"]
