"""ppl_vae.compare_plan: what ``compare --resume`` must find again (the plan) and may take
(each run's record): a plan saved by an older version still matches, a record is this
comparison's run or not taken, and a resume may add guides, or seeds to a comparison of
several, but not drop them."""
from __future__ import annotations

import json

import pytest

from ppl_vae.compare_plan import plan_differs, plan_of
from ppl_vae.compute import Budget

from conftest import TOY

PLAN_TOY = TOY.replace(train_size=300, test_size=40, epochs=2, batch_size=100, seed=0,
                       compile="off", track_gaps=True, gap_epochs=(1, 2), gap_rows=20,
                       gap_particles=10)


def _plan(guides=("amortized", "meanfield"), seeds=(0, 1)):
    return plan_of(PLAN_TOY, guides, seeds, Budget().resolve(PLAN_TOY), 5, 20, None)


@pytest.mark.parametrize("guides,seeds,differs", [
    (("amortized", "meanfield", "semiamortized"), (0, 1), None),  # a guide added
    (("meanfield", "amortized"), (0, 1), None),  # the same guides, another order
    (("amortized", "meanfield"), (0, 1, 2), None),  # a seed added to two
    (("amortized",), (0, 1), "--guides (was ['amortized', 'meanfield'], now ['amortized']) "
                             "(a resume may add guides, not drop them)"),
    (("amortized", "meanfield"), (0,), "--seeds (was [0, 1], now [0])"),
])
def test_a_resume_may_add_guides_and_seeds_but_not_drop_them(guides, seeds, differs):
    said = plan_differs(_plan(), _plan(guides, seeds))
    assert said == differs or (differs and said.startswith(differs))


def test_a_one_seed_comparison_takes_no_seed_added():
    """Its runs sit in out/<guide>, those of several seeds in out/<guide>/seed<S>."""
    said = plan_differs(_plan(seeds=(0,)), _plan(seeds=(0, 1)))
    assert said.startswith("--seeds (was [0], now [0, 1])")


def test_a_plan_saved_by_an_older_version_still_matches():
    """A comparison started before a setting existed (its plan lacks it) or before an epochs
    budget recorded its amount resumes under today's code with the same settings."""
    from ppl_vae.compare_plan import plan_differs, plan_of
    from ppl_vae.compute import Budget
    plan = plan_of(PLAN_TOY, ("amortized", "meanfield"), (0, 1), Budget().resolve(PLAN_TOY), 5, 20, None)
    old = json.loads(json.dumps(plan))
    old["budget"] = {"unit": "epochs", "amount": None}
    del old["config"]["gap_rows"]  # as if the setting came later (its default then holds)
    assert plan_differs(old, plan) == "--gap-rows (was 1000, now 20)"
    old["config"]["gap_rows"] = 20
    assert plan_differs(old, plan) is None
    old["config"]["device"] = "cuda"  # a resume may move to another device
    assert plan_differs(old, plan) is None


def test_a_record_without_its_settings_is_read_by_its_runs_config(tmp_path):
    """A record written before records held their settings is taken when the run folder's
    config.json is this comparison's run (a setting newer than the run at its default), and
    refused when it is another's."""
    from ppl_vae.compare_plan import RECORD, read_record
    from ppl_vae.compute import StepCost
    from ppl_vae.evaluate import Estimate, Scores
    from ppl_vae.results import GuideRun
    from ppl_vae.run import Summary
    from ppl_vae.compute import Compute
    cost = StepCost({"decoder": 1.0}, {"decoder": 1.0})
    summary = Summary(-90.0, 0.5, 40, 2, 6, 1.0, 2.0, 3.0, None, -91.0, -92.0, "amortized",
                      "mnist", "dynamic")
    scores = Scores(split="test", rows=40, num_particles=5, proposal="guide",
                    elbo=Estimate(-95.0, 1.0), log_px=Estimate(-90.0, 0.9), rate=3.0,
                    distortion=92.0, active_units=3, seconds=1.0, log_px_seconds=0.5)
    run = GuideRun("amortized", 0, "amortized/seed0", scores, summary,
                   Compute(cost, 6, 2, 2.0), "diagonal normal", False, None)
    mine = PLAN_TOY.replace(guide="amortized", seed=0)
    saved = mine.to_dict()
    del saved["local_family"]  # the run predates the setting
    (tmp_path / "config.json").write_text(json.dumps({"config": saved}))
    (tmp_path / RECORD).write_text(json.dumps(run.to_record()))  # no "config" in it
    assert read_record(tmp_path, mine, cost).to_json() == run.to_json()
    assert read_record(tmp_path, mine.replace(epochs=3), cost) is None  # another's run
