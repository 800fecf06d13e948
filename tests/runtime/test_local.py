"""The in-process runner (:mod:`secfedtl.runtime.local`)."""

from __future__ import annotations

from secfedtl.jobs.heart import HeartConfig, build_job, run_job


def _config(job_id: str) -> HeartConfig:
    data = HeartConfig.load(None).to_dict()
    data["job"]["rounds"], data["job"]["id"], data["model"]["source_epochs"] = 1, job_id, 40
    return HeartConfig.from_mapping(data)


def test_a_second_job_on_the_same_states_says_what_earlier_jobs_spent(tmp_path, capsys):
    state = tmp_path / "state"
    first = _config("first")
    local = build_job(first, tmp_path / "fresh", state_dir=tmp_path / "fresh-state")
    try:  # nothing spent yet: nothing said
        local.warn_earlier_spend(epsilon=1.0, delta=1e-5, accountant="rdp")
    finally:
        local.close()
    assert capsys.readouterr().err == ""
    run_job(first, tmp_path / "a", progress=False, state_dir=state)
    capsys.readouterr()
    local = build_job(_config("second"), tmp_path / "b", state_dir=state)
    try:
        local.warn_earlier_spend(epsilon=1.0, delta=1e-5, accountant="rdp")
    finally:
        local.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(first["job"]["clients"])
    for name, line in zip(sorted(first["job"]["clients"]), sorted(lines)):
        assert line.startswith(f"{name}: its privacy state already spent epsilon 0.")
        assert "of 1 in earlier jobs" in line
