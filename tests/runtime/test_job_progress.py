"""The demo's progress bar and report.png end at the epsilon the summary table prints: the
personalisation round (which spends epsilon after the last federated round) is a step of the bar
and a point of the plot."""

from __future__ import annotations

from secfedtl.jobs.heart import HeartConfig, run_job
from secfedtl.reporting import plots


def test_bar_and_plot_include_the_personalisation_round(tmp_path, capsys, monkeypatch):
    data = HeartConfig.load(None).to_dict()
    data["job"].update(rounds=1, id="progress-test")
    data["model"]["source_epochs"] = 30
    assert data["privacy"]["personalise"]
    plotted = {}
    real_plot = plots.plot_epsilon_per_round

    def spy(ax, rounds, **kwargs):
        plotted.update(rounds=rounds, ax=ax)
        real_plot(ax, rounds, **kwargs)

    monkeypatch.setattr(plots, "plot_epsilon_per_round", spy)
    metrics = run_job(HeartConfig.from_mapping(data), tmp_path / "out", state_dir=tmp_path / "state", progress=True)
    final = metrics["simulation_only"]["final"]["epsilon"]
    after_rounds = metrics["simulation_only"]["rounds"][-1]["epsilon"]
    assert all(final[n] > after_rounds[n] for n in final)  # personalisation spent more
    assert metrics["server"]["personalisation"] == {n: "done" for n in final}

    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "2/2" in bar and f"eps={max(final.values()):.3f}" in bar and "done=3/3" in bar

    assert plotted["rounds"][-1]["epsilon"] == final
    assert [r["round"] for r in plotted["rounds"]] == [0, 1]
    assert [t.get_text() for t in plotted["ax"].get_xticklabels()] == ["1", "pers."]
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
