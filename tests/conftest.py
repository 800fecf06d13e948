"""Suite-wide isolation: every test keeps hospitals' persistent privacy states in its own
temporary folder (``SECFEDTL_STATE_DIR``), never in the user's home."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECFEDTL_STATE_DIR", str(tmp_path_factory.mktemp("privacy-state")))
