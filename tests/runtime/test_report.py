import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from secfedtl.reporting.plots import plot_epsilon_per_round  # noqa: E402


def test_epsilon_panel_one_line_per_client_budget_and_accountant_label():
    rounds = [{"round": 0, "epsilon": {"a": 0.4, "b": 0.5}}, {"round": 1, "epsilon": {"a": 0.8}}]
    fig, ax = plt.subplots()
    plot_epsilon_per_round(ax, rounds, clients=["a", "b"], budget=1.0, accountant="prv", delta=1e-5)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["a"].get_xdata()) == [1, 2] and list(lines["a"].get_ydata()) == [0.4, 0.8]
    assert lines["b"].get_ydata()[0] == 0.5 and math.isnan(lines["b"].get_ydata()[1])  # missing: a gap
    assert list(lines["budget"].get_ydata()) == [1.0, 1.0]
    assert ax.get_ylabel() == "epsilon (PRV, delta=1e-05)"
    plt.close(fig)


def test_epsilon_panel_without_client_labels_names_only_the_budget():
    rounds = [{"round": r, "epsilon": {"a": 0.1 * r, "b": 0.2 * r}} for r in range(20)]
    fig, ax = plt.subplots()
    plot_epsilon_per_round(ax, rounds, clients=["a", "b"], budget=3.0, accountant="rdp", delta=1e-5,
                           ticks=[1, 5, 10, 15, 20], label_clients=False, title="t")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["budget"]
    assert list(ax.get_xticks()) == [1, 5, 10, 15, 20] and ax.get_title() == "t"
    plt.close(fig)
