"""Benchmarks (`secfedtl bench ...`). Never imported by the test suite's assertions."""
