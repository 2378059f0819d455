"""The comparison report's words: what it calls settled, how it labels a --quick look, the
data's sizes, log p(x) named as the bound it is, the Cremer et al. paragraph only for MNIST,
one error-bar convention, and rows that name real quantities."""
from __future__ import annotations

import numpy as np
import pytest

from ppl_vae import plots, report, report_tables
from ppl_vae.results import Comparison, GuideRun
from ppl_vae.compute import Budget, Compute, LocalBudget, StepCost
from ppl_vae.evaluate import Estimate, Scores, View
from ppl_vae.run import Summary

import records
from conftest import TOY


CONFIG = TOY.replace(train_size=2000, valid_size=500, test_size=200, epochs=2, batch_size=100,
                     seed=0)
DATA = {"train": 2000, "valid": 10000, "test": 10000, "shape": [1, 28, 28], "labelled": True,
        "classes": None}
VERSIONS = {"torch": "t", "pyro": "p", "git": "g"}
SUMMARY = Summary(test_elbo=-100.0, test_elbo_stderr=0.1, test_rows=200, epochs=2, steps=40,
                  seconds_per_epoch=1.0, train_seconds=2.0, steps_per_second=20.0,
                  eval_seconds=None, final_train_elbo=-101.0, final_valid_elbo=-100.5,
                  guide="g", dataset="mnist", binarize="dynamic",
                  memory={"param_mb": 1.0, "peak_rss_mb": 100.0}, gap_tracking_seconds=3.0,
                  first_epoch_seconds=1.2, steady_seconds_per_epoch=0.8,
                  steady_steps_per_second=25.0)


def _scores(log_px=-97.0, amortization_gap=1.0, views=(), num_particles=1000):
    return Scores(split="test", rows=200, num_particles=num_particles, proposal="local",
                  elbo=Estimate(-100.0, 0.1), log_px=Estimate(log_px, 0.1), rate=1.0,
                  distortion=99.0, active_units=2, seconds=1.0, log_px_seconds=0.5,
                  elbo_local=Estimate(-99.0, 0.1), approximation_gap=Estimate(2.0, 0.05),
                  amortization_gap=(None if amortization_gap is None
                                    else Estimate(amortization_gap, 0.05)),
                  views=views, local_steps=30, local_seconds=0.2)


def _run(guide, seed, log_px=-97.0, **kwargs):
    return GuideRun(guide, seed, guide, _scores(log_px, **kwargs), SUMMARY,
                    Compute(StepCost({"decoder": 1.0}, {"decoder": 1.0}), 40, 2, 2.0),
                    "diagonal normal", False)


def _comparison(seeds=(0,), log_px=None, config=CONFIG, command=("ppl-vae", "compare"),
                data=DATA, guides=("amortized", "meanfield")) -> Comparison:
    comp = Comparison("d", config.to_dict(), VERSIONS, "cpu", list(guides), dict(data),
                      list(command), list(seeds), Budget(), 10)
    for g in guides:
        for s in seeds:
            value = (log_px or {}).get(g, {}).get(s, -97.0)
            comp.runs.append(_run(g, s, value))
    return comp


# ---------------------------------------------------------------------------------------
# 14. settled only from three seeds up
# ---------------------------------------------------------------------------------------
def test_two_seeds_settle_nothing_and_say_why():
    """With 2 seeds an interval excluding 0 rests on one degree of freedom."""
    comp = _comparison(seeds=(0, 1), log_px={"amortized": {0: -95.0, 1: -95.1},
                                             "meanfield": {0: -100.0, 1: -100.05}})
    (d,) = [d for d in comp.differences() if d.quantity == "test_log_px"]
    assert d.low > 0  # the interval excludes 0 ...
    text = report.markdown(comp)
    settled = text.split("Settled:")[1].split("\n")[0]
    assert "log p(x)" not in settled  # ... but two seeds do not settle it
    assert "3 seeds" in text and "1 degree of freedom" in text
    row = next(r for r in text.splitlines() if r.startswith("| log p(x) | amortized"))
    assert row.rstrip().endswith("| not judged (2 seeds) |")


def test_three_seeds_settle_a_difference_whose_interval_excludes_zero():
    comp = _comparison(seeds=(0, 1, 2), log_px={"amortized": {0: -95.0, 1: -95.1, 2: -95.2},
                                                "meanfield": {0: -100.0, 1: -100.05, 2: -99.9}})
    text = report.markdown(comp)
    assert "amortized − meanfield in log p(x)" in text.split("Settled:")[1].split("\n")[0]
    row = next(r for r in text.splitlines() if r.startswith("| log p(x) | amortized"))
    assert row.rstrip().endswith("| yes |")


# ---------------------------------------------------------------------------------------
# 15. --quick is a smoke look
# ---------------------------------------------------------------------------------------
def test_a_quick_comparison_is_labelled_a_smoke_look_not_a_verdict():
    comp = _comparison()
    comp.quick = True  # compare(..., quick=True), as `ppl-vae compare --quick` calls it
    head = report.markdown(comp).split("\n|")[0]  # before the table
    assert "smoke look" in head and "not a verdict" in head
    assert "smoke look" not in report.markdown(_comparison())


# ---------------------------------------------------------------------------------------
# 16. the data's sizes
# ---------------------------------------------------------------------------------------
def test_the_report_states_the_datas_sizes():
    text = report.markdown(_comparison())
    assert "2,000 training rows" in text
    assert "10,000 validation rows (the first 500 scored each epoch)" in text
    assert "10,000 test rows (the first 200 scored)" in text


# ---------------------------------------------------------------------------------------
# 17. log p(x) is a stochastic lower bound with its K
# ---------------------------------------------------------------------------------------
def test_log_px_is_named_a_stochastic_lower_bound_with_its_k():
    text = report.markdown(_comparison())
    row = next(r for r in text.splitlines() if r.startswith("| log p(x)"))
    assert "IWAE bound, K = 1000" in row and "lower bound" in row


# ---------------------------------------------------------------------------------------
# 18. Cremer et al.'s MNIST numbers only beside MNIST
# ---------------------------------------------------------------------------------------
def test_the_cremer_paragraph_only_for_mnist():
    assert "For reference, Cremer" in report.markdown(_comparison())
    other = _comparison(config=CONFIG.replace(dataset="fashion_mnist"))
    assert "For reference, Cremer" not in report.markdown(other)


# ---------------------------------------------------------------------------------------
# 6. one error-bar convention, said in the report
# ---------------------------------------------------------------------------------------
GAPS = {"amortized": [{"epoch": 1, "split": "test"}], "meanfield": [{"epoch": 1, "split": "test"}]}


def test_the_report_says_every_figure_uses_one_standard_error():
    text = report.markdown(_comparison(), gaps=GAPS)
    assert ("the error bars of gap_bars.png and the bands of gap_curves.png are ± one standard "
            "error" in text)
    assert "the error bars of gap_bars.png are ± one standard error" in \
        report.markdown(_comparison())
    several = report.markdown(_comparison(seeds=(0, 1, 2)), gaps=GAPS)
    assert ("error bars of gap_bars.png are ± one standard deviation over seeds, as the cells"
            in several)
    assert "bands of gap_curves.png (the first seed) are ± one standard error" in several
    for t in (text, several):
        assert "2 standard errors" not in t


# ---------------------------------------------------------------------------------------
# 19. every row names a real quantity
# ---------------------------------------------------------------------------------------
def _full_run() -> GuideRun:
    """A run with every number a report row can read: a bare encoder's view, a local budget,
    gap tracking and memory."""
    views = (View("encoder", Estimate(-101.0, 0.1), Estimate(2.0, 0.1)),)
    run = _run("semiamortized", 0, views=views)
    run.local = LocalBudget(rows=20, stored=-120.0, fitted=-100.0, gap=20.0, gap_stderr=1.0,
                            fit_steps=30, fit_seconds=0.1, visits=2.0)
    return run


@pytest.mark.parametrize("label,quantity,with_error", report_tables.ROWS)
def test_every_row_names_a_number_of_a_run(label, quantity, with_error):
    numbers = _full_run().numbers()
    assert report_tables.key(quantity) in numbers, (label, quantity, sorted(numbers))
    if with_error:
        assert report_tables.key(quantity + "_stderr") in numbers, (label, quantity)


def test_the_other_tables_name_numbers_of_a_run_too():
    numbers = _full_run().numbers()
    quantities = [q for _, q in report_tables.PER_SEED] + list(report_tables.PAIRED_LABELS)
    assert [q for q in quantities if report_tables.key(q) not in numbers] == []


# ---------------------------------------------------------------------------------------
# 4. under a budget in network passes, the curves are drawn against it
# ---------------------------------------------------------------------------------------
def test_write_figures_draws_the_curves_in_the_budgets_unit(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.setdefault(path.name, fig)
                        or path)
    history = [{"epoch": 1, "steps": 20, "wall": 1.0, "train_elbo": -200.0, "valid_elbo": -190.0},
               {"epoch": 2, "steps": 25, "wall": 2.0, "train_elbo": -180.0, "valid_elbo": -175.0}]
    arrays = {"inputs": np.zeros((2, 784)), "reconstructions": np.zeros((2, 784))}
    comp = _comparison()
    comp.budget = Budget("evaluations", 100)
    (tmp_path / "gaps.png").write_bytes(b"the bar chart's name before gap_bars.png")
    report.write_figures(tmp_path, {"amortized": history, "meanfield": history}, comp,
                         {"amortized": arrays, "meanfield": arrays})
    assert not (tmp_path / "gaps.png").exists() and "gap_bars.png" in figures
    ax = figures["curves.png"].axes[0]
    assert "network passes" in ax.get_xlabel()
    assert list(ax.get_lines()[0].get_xdata()) == [20 * 2, 25 * 2]  # 2 passes a step
    figures.clear()
    report.write_figures(tmp_path, {"amortized": history}, _comparison(guides=("amortized",)),
                         {"amortized": arrays})
    xs = list(figures["curves.png"].axes[0].get_lines()[0].get_xdata())
    assert xs == pytest.approx([1.0, 1.25])  # epochs: 5 of 20 steps of the second


SEEDS_TOY = TOY.replace(train_size=300, test_size=40, batch_size=100, seed=0)


def _report(guides, results=None, config=SEEDS_TOY, settings=None, seeds=(0,)):
    from ppl_vae import report
    comp = Comparison("d", config.to_dict(), VERSIONS, "cpu", list(guides), {}, [], list(seeds),
                      Budget(), 10, settings=settings or {})
    for g in guides:
        for s in seeds:
            comp.runs.append(GuideRun(g, s, g, records.scores(**{
                k: v for k, v in (results or {}).get(g, {}).items() if k.endswith("_gap")}),
                records.SUMMARY, Compute(StepCost({"decoder": 1.0}, {"decoder": 1.0}), 10,
                                 config.epochs, 1.0),
                (results or {}).get(g, {}).get("family", "diagonal normal"),
                (results or {}).get(g, {}).get("per_datapoint", False)))
    return report.markdown(comp)


def test_the_reports_title_and_settings_come_from_the_guides_that_ran():
    default = _report(["amortized", "semiamortized", "meanfield"])
    assert default.startswith("# Amortized, semi-amortized and mean-field inference\n")
    assert "RowAdam lr" in default and "refinement steps of size" in default
    user = _report(["mymod:A", "mymod:B"])
    assert user.startswith("# Inference compared: `mymod:A` and `mymod:B`\n")
    assert "RowAdam" not in user and "refinement" not in user and "mean-field" not in user
    told = _report(["mymod:A", "mymod:B"], settings={"mymod:A": ["local_lr"]})
    assert "the mymod:A guide: RowAdam lr" in told and "refinement" not in told
    assert "RowAdam" not in _report(["amortized"])


def test_one_epoch_is_one_epoch_not_one_epochs():
    text = _report(["amortized"], config=SEEDS_TOY.replace(epochs=1))
    assert "same budget of 1 epoch," in text and "1 epochs" not in text
    assert "same budget of 2 epochs," in _report(["amortized"], config=SEEDS_TOY.replace(epochs=2))


def test_the_report_says_why_an_amortization_gap_is_na():
    text = _report(["amortized", "meanfield", "userflow"], results={
        "amortized": {"family": "diagonal normal", "per_datapoint": False,
                      "amortization_gap": 1.0},
        "meanfield": {"family": "diagonal normal", "per_datapoint": True,
                      "amortization_gap": None},
        "userflow": {"family": None, "per_datapoint": False, "amortization_gap": None}})
    assert "The meanfield guide's amortization gap is n/a: a per-datapoint table" in text
    assert ("The userflow guide's amortization gap is n/a: q* was fitted in the diagonal family "
            "and the guide's q is in no family q* can take") in text
    assert ("The userflow guide's approximation gap is log p(x) - L[q*] with a diagonal q*: "
            "the diagonal family's approximation gap") in text
    assert "The amortized guide's" not in text and "The meanfield guide's approximation" not in text
    from ppl_vae import report
    said = report.line("userflow", records.guide_run("userflow", 0, -97.0, family=None))
    assert "amort gap n/a (q* was fitted in the diagonal family" in said
    assert "n/a (a per-datapoint table" in report.line("mf", records.guide_run("mf", 0, -97.0,
                                                                  per_datapoint=True))


def test_the_report_says_which_family_each_q_star_was_fitted_in():
    import dataclasses
    comp = _comparison(guides=("amortized", "iaf"))
    comp.runs = [dataclasses.replace(r, scores=dataclasses.replace(
        r.scores, local_family="flow" if r.guide == "iaf" else "diagonal")) for r in comp.runs]
    assert "family (amortized: diagonal; iaf: flow)." in report.q_star_families(comp)
    assert "family (amortized: diagonal; iaf: flow)." in report.markdown(comp)


def test_the_gap_curves_epochs_are_the_ones_each_guide_ran():
    """Under a budget in passes or FLOPs the guides run different epochs; the report listed
    the tracked epochs from the base config's epochs (some never reached, the last missed).
    They are read from the gap rows."""
    config = CONFIG.replace(epochs=10, gap_epochs=(1, 3, 10), track_gaps=True)
    rows = {"amortized": [{"epoch": e, "split": s} for e in (1, 3, 7)
                          for s in ("train", "test")],
            "meanfield": [{"epoch": e, "split": "test"} for e in (1, 2)]}
    text = report.markdown(_comparison(config=config), gaps=rows)
    assert "training and test rows at epochs 1, 3, 7 (amortized); 1, 2 (meanfield)" in text
    assert report.tracked_epochs({"a": rows["meanfield"], "b": rows["meanfield"]}) == "1, 2"
