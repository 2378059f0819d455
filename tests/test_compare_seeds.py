"""compare over seeds: a seed changes the numbers, the same seed gives the same numbers again,
means and standard deviations over seeds, paired differences on matched seeds with a 95%
t-interval (checked by hand), the layout of one seed and of several, and the --seeds option."""
from __future__ import annotations

import json
import math
import re
import statistics

import pytest

import records
from ppl_vae import cli, data
from records import quiet
from ppl_vae.compare import compare, parse_seeds
from ppl_vae.results import Comparison, GuideRun
from ppl_vae.compute import Budget, Compute, StepCost
from ppl_vae.config import Config
from ppl_vae.evaluate import Estimate, Scores
from ppl_vae.run import Summary
from ppl_vae.errors import UserError
from ppl_vae.seeds import Spread, differences, paired, t975

TINY = Config(train_size=300, valid_size=20, test_size=40, epochs=1, hidden=(16,),
              latent_dim=3, batch_size=100, device="cpu")
GUIDES = ("amortized", "meanfield")
QUICK_FIT = {"max_steps": 30}


def without_times(doc):
    return records.without_times(doc, also=("folder",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist):
    """Two comparisons on the shipped MNIST: seeds 0 and 1, then seed 1 alone (amortized)."""
    out = tmp_path_factory.mktemp("seeds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load", lambda *a, **k: mnist)
        both = compare(TINY, out / "both", num_particles=5, progress=False, log=quiet,
                       guides=GUIDES, seeds=(0, 1), local_rows=20, local_options=QUICK_FIT)
        one = compare(TINY, out / "one", num_particles=5, progress=False, log=quiet,
                      guides=GUIDES[:1], seeds=parse_seeds("1,"), local_rows=20,
                      local_options=QUICK_FIT)
    return out, both, one


# ---------------------------------------------------------------------------------------
# the statistics, by hand
# ---------------------------------------------------------------------------------------
def test_t_quantiles():
    assert t975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError):
        t975(0)


def test_the_paired_interval_takes_matched_seeds():
    a = {0: 1.0, 1: 2.0, 2: 4.0}
    b = {2: 1.0, 0: 0.5, 3: 9.0, 1: 1.0}  # another order, and a seed a does not have
    d = paired("test_log_px", "a", "b", a, b)
    assert d.seeds == (0, 1, 2) and d.values == (0.5, 1.0, 3.0)
    mean = 1.5
    sd = math.sqrt(((0.5 - mean) ** 2 + (1.0 - mean) ** 2 + (3.0 - mean) ** 2) / 2)
    half = 4.3027 * sd / math.sqrt(3)
    assert d.mean == pytest.approx(mean) and d.sd == pytest.approx(sd)
    assert (d.low, d.high) == (pytest.approx(mean - half, abs=1e-3),
                               pytest.approx(mean + half, abs=1e-3))
    assert d.settled is False  # [-1.79, 4.79] holds 0
    # seeds far apart, guides close within each seed: settled only when paired by seed
    # (paired by position, 10 - 29.1, 20 - 9, 30 - 19.05 would hold 0)
    d = paired("q", "a", "b", {0: 10.0, 1: 20.0, 2: 30.0}, {2: 29.1, 0: 9.0, 1: 19.05})
    assert d.values == pytest.approx((1.0, 0.95, 0.9)) and d.settled
    assert paired("q", "a", "b", {0: 1.0}, {0: 0.5}).low is None  # one seed: no interval
    assert paired("q", "a", "b", {0: 1.0}, {1: 0.5}) is None  # no seed in common


def test_differences_take_every_pair_in_order():
    values = {g: {"q": {0: v, 1: v + 1}} for g, v in (("x", 1.0), ("y", 3.0), ("z", 0.0))}
    diffs = differences(values, ["q"], ["x", "y", "z"])
    assert [(d.a, d.b, d.mean) for d in diffs] == [("x", "y", -2.0), ("x", "z", 1.0),
                                                   ("y", "z", 3.0)]
    assert all(d.sd == 0 and d.excludes_zero for d in diffs)
    assert all(d.settled is None for d in diffs)  # 2 seeds: 1 degree of freedom, not judged


def test_settled_needs_three_seeds_and_an_interval_without_zero():
    two = paired("q", "a", "b", {0: 2.0, 1: 2.1}, {0: 1.0, 1: 1.05})
    assert two.excludes_zero and two.settled is None and two.to_json()["settled"] is None
    three = paired("q", "a", "b", {0: 2.0, 1: 2.1, 2: 2.05}, {0: 1.0, 1: 1.05, 2: 1.0})
    assert three.excludes_zero and three.settled is True


def test_spread_is_mean_and_sample_sd():
    s = Spread((0, 1, 2), (1.0, 2.0, 6.0))
    assert s.mean == 3.0 and s.sd == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))
    assert Spread((0,), (1.0,)).sd is None


def _scores(log_px=-97.0, elbo=-100.0, elbo_local=-99.0, approximation_gap=2.0,
            amortization_gap=None):
    def est(v):
        return None if v is None else Estimate(v, 0.1)
    return Scores(split="test", rows=40, num_particles=5, proposal="local", elbo=est(elbo),
                  log_px=est(log_px), rate=1.0, distortion=99.0, active_units=2, seconds=1.0,
                  log_px_seconds=0.5, elbo_local=est(elbo_local),
                  approximation_gap=est(approximation_gap),
                  amortization_gap=est(amortization_gap))


SUMMARY = Summary(test_elbo=-100.0, test_elbo_stderr=0.1, test_rows=40, epochs=1, steps=10,
                  seconds_per_epoch=1.0, train_seconds=1.0, steps_per_second=10.0,
                  eval_seconds=None, final_train_elbo=-101.0, final_valid_elbo=-100.5,
                  guide="g", dataset="mnist", binarize="dynamic")


def _run(guide, seed, log_px, family="diagonal normal", per_datapoint=False, **scores):
    return GuideRun(guide, seed, f"{guide}/seed{seed}", _scores(log_px=log_px, **scores),
                    SUMMARY, Compute(StepCost({"decoder": 1.0}, {"decoder": 1.0}), 10, 1, 1.0),
                    family, per_datapoint)


def test_a_comparison_pairs_runs_by_seed_whatever_their_order():
    comp = Comparison("d", {}, {}, "cpu", ["a", "b"], {}, [], [0, 1, 2], Budget(), 10)
    comp.runs = [_run("a", 2, -90.0), _run("b", 0, -95.0), _run("a", 0, -94.0),
                 _run("b", 2, -93.0), _run("a", 1, -91.0), _run("b", 1, -92.5)]
    (d,) = [d for d in comp.differences() if d.quantity == "test_log_px"]
    assert d.seeds == (0, 1, 2) and d.values == (1.0, 1.5, 3.0)
    doc = comp.to_json()
    assert doc["a"]["over_seeds"]["test_log_px"]["values"] == [-94.0, -91.0, -90.0]
    assert doc["a"]["test_log_px"] == pytest.approx(-275.0 / 3)
    assert doc["a"]["total_passes"] == 20 and doc["differences"][0]["a"] == "a"


# ---------------------------------------------------------------------------------------
# --seeds
# ---------------------------------------------------------------------------------------
def test_parse_seeds():
    assert parse_seeds("3", 5) == (5, 6, 7) and parse_seeds("1") == (0,)
    assert parse_seeds("0,1,2", 9) == (0, 1, 2) and parse_seeds("4,") == (4,)


@pytest.mark.parametrize("text", ["0", "-2", "x", "1,1", "0,-1", "101", ",", "4294967296,"])
def test_bad_seeds_are_one_line(text, tmp_path, capsys, cached_mnist):
    with pytest.raises(UserError, match="seeds"):
        parse_seeds(text)
    code = cli.main(["compare", "--seeds", text, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --seeds") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------
# real comparisons
# ---------------------------------------------------------------------------------------
def test_a_seed_changes_the_numbers(runs):
    out, both, _ = runs
    saved = json.loads((out / "both" / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved == json.loads(json.dumps(both))
    for guide in GUIDES:
        per_seed = saved[guide]["per_seed"]
        assert per_seed["0"]["test_log_px"] != per_seed["1"]["test_log_px"], guide
        for seed in (0, 1):  # each seed has its own run folder
            assert (out / "both" / guide / f"seed{seed}" / "summary.json").is_file()
            assert per_seed[str(seed)]["folder"] == f"{guide}/seed{seed}"
        # the top-level number is the mean over seeds, with the sd and values beside it
        values = [per_seed[s]["test_log_px"] for s in ("0", "1")]
        spread = saved[guide]["over_seeds"]["test_log_px"]
        assert spread["values"] == values and spread["seeds"] == [0, 1]
        assert saved[guide]["test_log_px"] == pytest.approx(statistics.mean(values))
        assert spread["sd"] == pytest.approx(statistics.stdev(values))


def test_the_same_seed_gives_the_same_numbers_again(runs):
    """Seed 1 alone (the list form, one seed) gives seed 1's numbers of the two-seed
    comparison: a run depends on its seed only, not on the others; and one seed is written in
    the layout of many (a mean over one seed, its spread, its per-seed record)."""
    out, both, one = runs
    assert one["seeds"] == [1]
    guide = GUIDES[0]
    assert (out / "one" / guide / "summary.json").is_file()  # out/<guide>, as before seeds
    assert not (out / "one" / guide / "seed1").exists()
    assert set(one[guide]) == set(both[guide])  # one layout for one seed and for many
    mine, theirs = one[guide]["per_seed"]["1"], both[guide]["per_seed"]["1"]
    assert without_times(mine) == without_times({**theirs, "folder": guide})
    assert one[guide]["test_log_px"] == theirs["test_log_px"] == mine["test_log_px"]
    assert "test_log_px_stderr" not in one[guide]  # a seed's error is in its own record
    assert one[guide]["over_seeds"]["test_log_px"]["sd"] is None
    assert one["ran"] == {guide: {"1": {"epochs": 1, "steps": 3}}}


def test_standard_errors_over_seeds_are_not_averaged(runs):
    """Every seed scores the same test rows, so their standard errors are correlated: the
    mean over seeds carries none (the sd over seeds is its spread); each seed's own error
    stays in its record; and each guide's epochs and steps are recorded as they ran."""
    _, both, _ = runs
    for guide in GUIDES:
        assert not [k for k in both[guide] if k.endswith("_stderr")]
        assert both[guide]["per_seed"]["0"]["test_log_px_stderr"] > 0
        assert both[guide]["over_seeds"]["test_log_px"]["sd"] is not None
        assert both["ran"][guide] == {"0": {"epochs": 1, "steps": 3},
                                      "1": {"epochs": 1, "steps": 3}}


def test_the_paired_interval_is_on_matched_seeds(runs):
    out, both, _ = runs
    saved = json.loads((out / "both" / "results.json").read_text())
    (d,) = [d for d in saved["differences"] if d["quantity"] == "test_log_px"]
    assert (d["a"], d["b"], d["seeds"]) == ("amortized", "meanfield", [0, 1])
    a = [saved["amortized"]["per_seed"][s]["test_log_px"] for s in ("0", "1")]
    m = [saved["meanfield"]["per_seed"][s]["test_log_px"] for s in ("0", "1")]
    diffs = [x - y for x, y in zip(a, m)]
    assert d["values"] == pytest.approx(diffs)
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = 12.7062 * sd / math.sqrt(2)
    assert (d["mean"], d["sd"]) == (pytest.approx(mean), pytest.approx(sd))
    assert (d["low"], d["high"]) == (pytest.approx(mean - half, abs=1e-3),
                                     pytest.approx(mean + half, abs=1e-3))
    assert d["excludes_zero"] == (not d["low"] <= 0 <= d["high"])
    assert d["settled"] is None  # two seeds judge nothing


def test_the_report_gives_spread_compute_differences_and_local_budget(runs):
    out, both, one = runs
    report = (out / "both" / "report.md").read_text()
    assert "mean ± the standard deviation over the 2 seeds" in report
    assert "## Paired differences between guides over 2 seeds" in report
    assert "Settled" in report and "Not settled" in report
    assert "| log p(x) | amortized − meanfield |" in report
    assert "network passes per optimizer step" in report
    assert re.search(r"amortized: 4 per step \(decoder 1 forward \+ 1 backward, encoder 1 "
                     r"forward \+ 1 backward\), [\d,]+ FLOPs; meanfield: 4 per step \(decoder "
                     r"2 forward \+ 2 backward\), [\d,]+ FLOPs", " ".join(report.split()))
    assert "The meanfield guide's local budget" in report
    for guide in GUIDES:  # compute beside epochs, steps and wall time in results.json
        compute = both[guide]["per_seed"]["0"]["compute"]
        assert compute["steps"] == 3 and compute["epochs"] == 1 and compute["train_seconds"] > 0
        assert compute["total_passes"] == 3 * compute["per_step"]["passes"]
    local = both["meanfield"]["per_seed"]["0"]["local_budget"]
    assert local["rows"] == 20 and local["fitted"] > local["stored"]
    assert both["amortized"]["per_seed"]["0"]["local_budget"] is None
    single = (out / "one" / "report.md").read_text()  # one seed: errors over test rows
    assert "one standard error over test images" in single and "Paired" not in single
    assert "network passes per optimizer step" in single and "local budget" not in single


def test_local_rows_must_be_positive(tmp_path, capsys, cached_mnist):
    code = cli.main(["compare", "--local-rows", "0", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "--local-rows" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------
# the report's text from the guides that ran; folders; --guide refused
# ---------------------------------------------------------------------------------------
VERSIONS = {"torch": "t", "pyro": "p", "git": "g"}


def _report(guides, results=None, config=TINY, settings=None, seeds=(0,)):
    from ppl_vae import report
    comp = Comparison("d", config.to_dict(), VERSIONS, "cpu", list(guides), {}, [], list(seeds),
                      Budget(), 10, settings=settings or {})
    for g in guides:
        for s in seeds:
            comp.runs.append(GuideRun(g, s, g, _scores(**{
                k: v for k, v in (results or {}).get(g, {}).items() if k.endswith("_gap")}),
                SUMMARY, Compute(StepCost({"decoder": 1.0}, {"decoder": 1.0}), 10,
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
    text = _report(["amortized"], config=TINY.replace(epochs=1))
    assert "same budget of 1 epoch," in text and "1 epochs" not in text
    assert "same budget of 2 epochs," in _report(["amortized"], config=TINY.replace(epochs=2))


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
    said = report.line("userflow", _run("userflow", 0, -97.0, family=None))
    assert "amort gap n/a (q* was fitted in the diagonal family" in said
    assert "n/a (a per-datapoint table" in report.line("mf", _run("mf", 0, -97.0,
                                                                  per_datapoint=True))


def test_a_module_class_guide_gets_a_folder_without_a_colon(tmp_path):
    from ppl_vae.compare import folder_name, run_folder
    assert run_folder(tmp_path, "mymod.sub:A", 0, False) == tmp_path / "mymod_sub_A"
    assert run_folder(tmp_path, "mymod:A", 3, True) == tmp_path / "mymod_A" / "seed3"
    assert folder_name("meanfield") == "meanfield"
    comp = Comparison("d", {}, {}, "cpu", ["mymod:A"], {}, [], [0], Budget(), 10)
    comp.runs = [_run("mymod:A", 0, -90.0)]
    assert "mymod:A" in comp.to_json()  # results.json keeps the guide's own name


def test_guides_sharing_a_folder_are_refused(tmp_path, capsys):
    code = cli.main(["compare", "--guides", "m:A_b,m:A.b", "--out", str(tmp_path / "c")])
    assert code == 2 and "share a run folder" in capsys.readouterr().err


def test_compare_refuses_guide_and_points_to_guides(tmp_path, capsys):
    for guide in ("meanfield", "amortized"):  # the default too, when given
        code = cli.main(["compare", "--guide", guide, "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert code == 2 and f"--guides {guide}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
