"""Suite-wide isolation: every test keeps hospitals' persistent privacy states in its own
temporary folder (``SECFEDTL_STATE_DIR``), never in the user's home."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECFEDTL_STATE_DIR", str(tmp_path_factory.mktemp("privacy-state")))


@pytest.fixture
def fork_safe() -> None:
    """Tests that fork worker processes: on a CUDA machine where an earlier test in this process
    already initialised CUDA, the pool refuses to fork (the children could not use CUDA), so the
    test is skipped there; it always runs on CPU-only machines such as CI."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised in this test process; forked workers cannot use it")
