"""Curves over budget across seeds: means and standard deviations per budget point (by hand),
the budget in epochs, steps, passes and FLOPs, paired differences at every epoch, crossings
found in epochs and, at equal compute, between interpolated curves; the figure's panels."""
from __future__ import annotations

import statistics

import pytest

from ppl_vae import budget_curves
from ppl_vae.budget_curves import collect, crossings


def rows(values, split="test"):
    """gaps.jsonl lines: {epoch: log p(x)}, with L[q] 2 nats below it."""
    return [{"epoch": e, "split": split, "test_log_px": v, "test_elbo": v - 2.0,
             "approximation_gap": 1.0, "amortization_gap": None} for e, v in values.items()]


def history(epochs, steps_per_epoch=10):
    return [{"epoch": e, "steps": e * steps_per_epoch} for e in range(1, epochs + 1)]


# guide a is better early, b catches up and passes it after epoch 3 (every seed)
A = {0: {1: -100.0, 3: -95.0, 10: -93.0}, 1: {1: -101.0, 3: -96.0, 10: -94.0},
     2: {1: -99.0, 3: -94.0, 10: -92.0}}
B = {0: {1: -110.0, 3: -97.0, 10: -90.0}, 1: {1: -111.0, 3: -98.0, 10: -91.0},
     2: {1: -109.0, 3: -96.0, 10: -89.0}}


@pytest.fixture
def curves():
    runs = {"a": {s: (rows(v) + rows({1: 0.0}, "train"), history(10), 4.0, 1e6)
                  for s, v in A.items()},
            "b": {s: (rows(v), history(10), 16.0, None) for s, v in B.items()}}
    return collect(runs, (0, 1, 2))


def test_means_sds_and_budgets_by_hand(curves):
    pa = curves.points["a"]
    assert [p.epoch for p in pa] == [1, 3, 10]
    p3 = pa[1]
    vals = [A[s][3] for s in (0, 1, 2)]
    assert p3.values["log_px"].mean == pytest.approx(statistics.mean(vals))
    assert p3.values["log_px"].sd == pytest.approx(statistics.stdev(vals))
    assert p3.values["elbo"].mean == pytest.approx(statistics.mean(vals) - 2.0)
    assert "amortization_gap" not in p3.values  # n/a is left out, not drawn as a number
    assert (p3.steps, p3.passes, p3.flops) == (30.0, 120.0, 3e7)
    assert curves.points["b"][1].passes == 480.0 and curves.points["b"][1].flops is None
    assert curves.split == "test"  # the train lines are not mixed in
    assert curves.points["a"][0].values["log_px"].values == (-100.0, -101.0, -99.0)


def test_paired_differences_at_every_epoch(curves):
    d = {(e, x.quantity): x for e, x in curves.differences}
    at10 = d[(10, "log_px")]
    assert at10.values == (-3.0, -3.0, -3.0) and at10.mean == pytest.approx(-3.0)
    assert at10.settled is True  # b ahead at 10 epochs over all three seeds
    assert d[(1, "log_px")].mean == pytest.approx(10.0)


def test_a_crossing_in_epochs_and_at_equal_compute(curves):
    by = {(c.quantity, c.unit): c for c in curves.crossings}
    c = by[("log_px", "epochs")]
    assert (c.low, c.high, c.before) == (3, 10, "a")  # a first up to 3 epochs, then b
    # b's step costs 4x a's passes: at equal passes b's curve is shifted right; a still
    # leads where both have points (b at 40 .. 1600 passes, a at 40 .. 400)
    assert ("log_px", "passes") not in by or by[("log_px", "passes")].low >= 40
    assert ("log_px", "flops") not in by  # b has no FLOPs count: no curve, no crossing


def test_crossings_of_two_lines_by_hand():
    P = budget_curves.Point
    S = budget_curves.Spread
    up = [P(e, None, x, None, {"log_px": S((0,), (y,))}) for e, x, y in
          [(1, 10.0, -100.0), (2, 100.0, -90.0)]]
    flat = [P(e, None, x, None, {"log_px": S((0,), (y,))}) for e, x, y in
            [(1, 10.0, -95.0), (2, 100.0, -95.0)]]
    (c,) = crossings(up, flat, "up", "flat", "log_px", "passes")
    assert (c.low, c.high, c.before) == (10.0, 100.0, "flat")
    assert crossings(flat, flat, "f", "g", "log_px", "passes") == []


def test_the_figure_draws_a_band_per_guide_and_marks_the_crossing(curves, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = budget_curves.figure(curves, tmp_path / "b.png", units=("epochs", "passes"))
    assert path.read_bytes()[:4] == b"\x89PNG"
    fig = budget_curves.build(curves, units=("epochs", "passes"))
    axes = fig.axes
    assert len(axes) == 8  # 2 units x 4 quantities
    first = axes[0]
    assert [l.get_label() for l in first.get_lines()][:2] == ["a", "b"]
    assert len(first.collections) == 2 and len(first.patches) == 1  # two sd bands, one span
    assert [t.get_text() for t in first.texts] == ["a × b"]  # the span names its two guides
    assert "epochs" in first.get_xlabel() and "log p(x)" in first.get_ylabel()
    fig.canvas.draw()
    labels = [t.get_text() for t in first.get_xticklabels() if t.get_text()]
    assert labels == ["1", "3", "10"]  # the tracked epochs, not 2x10^0
    assert not [t.get_text() for t in first.get_xticklabels(minor=True) if t.get_text()]
    assert "n/a for every guide" in " ".join(t.get_text() for t in axes[3].texts)
    assert not any("n/a" in t.get_text() for t in first.texts)  # both guides drawn there
    assert "1 sd over 3 seeds" in fig._suptitle.get_text()
    plt.close(fig)


def test_the_report_tables_log_px_over_budget_and_names_the_crossing(curves):
    from ppl_vae import report
    text = report.over_budget(curves)
    assert "| 3 | -95.00 ± 1.00 | -97.00 ± 1.00 |" in text
    assert "| log p(x) | a × b | 3 to 10 epochs | a | b |" in text  # a table, a row each
    assert report.over_budget(None) == ""


def test_every_drawn_quantity_has_its_crossings_shaded():
    """The amortization-gap panel drew two guides' curves crossing with no shade (only log
    p(x), L[q] and the approximation gap were searched), under a title that says crossings
    are shaded."""
    def gaps(values):
        return [{"epoch": e, "split": "test", "test_log_px": -90.0, "amortization_gap": g}
                for e, g in zip((1, 3, 10), values)]
    curves = collect({"a": {0: (gaps([4.0, 4.3, 4.0]), history(10), 4.0, None)},
                      "b": {0: (gaps([3.4, 4.0, 4.3]), history(10), 4.0, None)}}, (0,))
    (c,) = [c for c in curves.crossings
            if c.quantity == "amortization_gap" and c.unit == "epochs"]
    assert (c.low, c.high, c.before) == (3, 10, "b")  # b's gap the smaller up to 3 epochs
    fig = budget_curves.build(curves, units=("epochs",))
    panel = next(ax for ax in fig.axes if "amortization gap" in ax.get_title())
    assert len(panel.patches) == 1 and [t.get_text() for t in panel.texts] == ["a × b"]


def test_crossings_in_one_interval_share_one_shade_that_names_every_pair():
    """Two pairs crossing between the same epochs drew two shades (darker) and wrote their
    names over each other."""
    runs = {g: {0: (rows(v), history(10), 4.0, None)} for g, v in
            {"a": {1: -100.0, 3: -95.0, 10: -93.0}, "b": {1: -110.0, 3: -97.0, 10: -90.0},
             "c": {1: -112.0, 3: -99.0, 10: -91.0}}.items()}
    curves = collect(runs, (0,))
    fig = budget_curves.build(curves, units=("epochs",))
    panel = fig.axes[0]
    assert len(panel.patches) == 1
    (text,) = panel.texts
    assert text.get_text().split("\n") == ["a × b", "a × c"]


def test_overlapping_crossing_intervals_merge_into_one_shade():
    """In compute each pair's interval ends at its own points: intervals that overlap without
    being equal are one shade too; touching ones stay apart."""
    C = budget_curves.Crossing
    found = [C("log_px", "a", "b", "flops", 1e11, 5e11, "a"),
             C("log_px", "a", "c", "flops", 3e11, 9e11, "c"),
             C("log_px", "b", "c", "flops", 9e11, 2e12, "b"),
             C("elbo", "a", "b", "flops", 1e11, 5e11, "a")]
    assert budget_curves._spans(found, "log_px", "flops") == [
        ((1e11, 9e11), ["a × b", "a × c"]), ((9e11, 2e12), ["b × c"])]
