"""ppl_vae.compute: network passes per step against a hand count for every built-in guide,
the budget in passes, the step budget of training, and a per-datapoint table's local budget."""
from __future__ import annotations

import json

import pytest
import torch

from ppl_vae import cli
from ppl_vae.compare import _check, compare
from ppl_vae.compute import Budget, StepCost, local_budget, step_cost, steps_per_epoch
from ppl_vae.config import Config
from ppl_vae.errors import UserError
from ppl_vae.run import fit_run, load_splits

TINY = Config(train_size=500, valid_size=100, test_size=100, epochs=1, hidden=(32,),
              latent_dim=4, device="cpu")
QUICK_FIT = {"max_steps": 60}  # the test-time fit of q*: enough for a toy model


def quiet(_message):
    pass


@pytest.fixture
def splits(cached_mnist):
    return load_splits(TINY, torch.device("cpu"))


# (settings, forward passes, backward passes), counted by hand from guides.py and
# train.step_on_device; a pass is one network over one minibatch, K particles count K.
K = 5
HAND = {
    # the encoder once, the decoder once (one particle); one backward through both
    "amortized": ({}, {"encoder": 1, "decoder": 1}, {"encoder": 1, "decoder": 1}),
    # three vectorized particles: the decoder sees 3 x B rows, forward and backward
    "amortized, 3 particles": ({"num_particles": 3}, {"encoder": 1, "decoder": 3},
                               {"encoder": 1, "decoder": 3}),
    "iwae-5": ({"objective": "iwae", "num_particles": 5}, {"encoder": 1, "decoder": 5},
               {"encoder": 1, "decoder": 5}),
    # K refinements: a decoder forward and a backward (the inner gradient) each, then the
    # ELBO's forward and backward; the outer backward runs back through every refinement's
    # gradient (second order, create_graph) once more: K + 1 forward, 2K + 1 backward
    "semiamortized": ({"refine_steps": K}, {"encoder": 1, "decoder": K + 1},
                      {"encoder": 1, "decoder": 2 * K + 1}),
    "semiamortized, 1 step": ({"refine_steps": 1}, {"encoder": 1, "decoder": 2},
                              {"encoder": 1, "decoder": 3}),
    # stopped gradient: the refinement's K decoder passes each way, the refined ELBO's one,
    # and the encoder's own ELBO: a second encoder forward and one more decoder pass each way
    # (the refinement starts from a detached encoder output: one encoder backward)
    "semiamortized, stop gradient": ({"refine_steps": K, "refine_stop_gradient": True},
                                     {"encoder": 2, "decoder": K + 2},
                                     {"encoder": 1, "decoder": K + 2}),
    # no encoder; each of the inner steps and the joint step: one decoder pass each way
    "meanfield": ({"inner_steps": 1}, {"decoder": 2}, {"decoder": 2}),
    "meanfield, 3 inner steps": ({"inner_steps": 3}, {"decoder": 4}, {"decoder": 4}),
    "meanfield, no inner step": ({"inner_steps": 0}, {"decoder": 1}, {"decoder": 1}),
    # the encoder, each of the two flows' autoregressive networks, the decoder: once each way
    "iaf": ({}, {"encoder": 1, "flows": 2, "decoder": 1}, {"encoder": 1, "flows": 2,
                                                          "decoder": 1}),
}


@pytest.mark.filterwarnings("ignore:.*was not registered in the param store:UserWarning")
@pytest.mark.parametrize("case", list(HAND))
def test_passes_per_step_match_a_hand_count(case, splits):
    settings, forward, backward = HAND[case]
    guide = case.split(",")[0].replace("iwae-5", "amortized")
    cost = step_cost(TINY.replace(guide=guide, **settings), splits)
    assert cost.forward == pytest.approx(forward) and cost.backward == pytest.approx(backward)
    assert cost.passes == sum(forward.values()) + sum(backward.values())


def test_counting_leaves_the_random_stream_and_the_networks_alone(splits):
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    step_cost(TINY, splits)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("text,budget", [
    ("epochs", Budget()), ("evaluations=15640", Budget("evaluations", 15640)),
    ("evaluations=1e4", Budget("evaluations", 10000)),
    (" evaluations=15_640 ", Budget("evaluations", 15640))])
def test_budget_parses(text, budget):
    assert Budget.parse(text) == budget


@pytest.mark.parametrize("text", ["seconds=10", "evaluations", "evaluations=0",
                                  "evaluations=-4", "evaluations=2.5", "evaluations=inf",
                                  "epochs=3", ""])
def test_a_bad_budget_is_one_line_naming_the_forms(text, cached_mnist, tmp_path, capsys):
    with pytest.raises(UserError, match="evaluations=N"):
        Budget.parse(text)
    code = cli.main(["compare", "--train-size", "500", "--budget", text, "--out",
                     str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --budget") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_a_budget_in_passes_gives_each_guide_the_steps_it_buys(splits, tmp_path):
    budget = Budget("evaluations", 400)
    guides = ("amortized", "semiamortized", "meanfield")
    _, _, plans = _check(TINY, tmp_path / "c", False, guides, (0,), budget, 10)
    per_epoch = steps_per_epoch(TINY, splits)
    assert per_epoch == 4  # 500 rows in batches of 128
    # 400 // 4 = 100 steps (25 epochs); 400 // 19 = 21 steps (6 epochs); 100 (25)
    expected = {"amortized": (100, 25), "semiamortized": (21, 6), "meanfield": (100, 25)}
    for guide, (config, cost) in plans.items():
        assert (config.max_steps, config.epochs) == expected[guide], guide
        assert config.max_steps * cost.passes <= 400 < (config.max_steps + 1) * cost.passes
    # the epoch budget leaves the config as it is
    _, _, plans = _check(TINY, tmp_path / "c", False, guides, (0,), Budget(), 10)
    assert all(c == TINY.replace(guide=g) for g, (c, _) in plans.items())


def test_a_budget_below_one_step_is_refused(splits, tmp_path):
    with pytest.raises(UserError, match="semiamortized guide .19 network passes"):
        _check(TINY, tmp_path / "c", False, ("amortized", "semiamortized"), (0,),
               Budget("evaluations", 10), 10)


def test_max_steps_stops_training_mid_epoch(cached_mnist):
    trained = fit_run(TINY.replace(epochs=5, max_steps=6), progress=False, log=quiet)
    assert [m.steps for m in trained.history] == [4, 6]  # the partial epoch is recorded
    trained = fit_run(TINY.replace(epochs=1, max_steps=100), progress=False, log=quiet)
    assert [m.steps for m in trained.history] == [4]  # epochs stay a ceiling


def test_max_steps_is_refused_when_not_positive(capsys, tmp_path, cached_mnist):
    code = cli.main(["train", "--train-size", "500", "--max-steps", "0", "--out",
                     str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--max-steps" in err and err.count("\n") == 1


def test_local_budget_of_a_table_and_of_an_encoder(cached_mnist):
    trained = fit_run(TINY.replace(guide="meanfield"), progress=False, log=quiet)
    local = local_budget(trained, 40, **QUICK_FIT)
    assert local.rows == 40 and 0 < local.fit_steps <= QUICK_FIT["max_steps"]
    # one epoch: each row was visited once and a local fit of the rows gains a lot
    assert local.visits == pytest.approx(4 * 128 / 500)
    assert local.gap == pytest.approx(local.fitted - local.stored, abs=1e-3)
    assert local.gap > 1.0 and local.gap > 3 * local.gap_stderr
    amortized = fit_run(TINY, progress=False, log=quiet)
    assert local_budget(amortized, 40) is None


@pytest.mark.slow
def test_compare_at_equal_passes_trains_each_guide_the_steps_it_buys(tmp_path, cached_mnist):
    guides = ("amortized", "semiamortized", "meanfield")
    doc = compare(TINY.replace(test_size=40), tmp_path, num_particles=5, progress=False,
                  log=quiet, guides=guides, budget=Budget("evaluations", 200),
                  local_rows=20, local_options=QUICK_FIT)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budget"] == {"unit": "evaluations", "amount": 200}
    # 200 // 4 = 50 steps, 200 // 19 = 10 steps, 200 // 4 = 50 steps
    for guide, steps, passes in (("amortized", 50, 200), ("semiamortized", 10, 190),
                                 ("meanfield", 50, 200)):
        summary = json.loads((tmp_path / guide / "summary.json").read_text())
        assert summary["steps"] == steps and doc[guide]["steps"] == steps, guide
        assert saved[guide]["compute"]["total_passes"] == passes
    report = (tmp_path / "report.md").read_text()
    assert "200 network passes" in report and "semiamortized 10 steps" in report


def test_step_cost_is_a_record():
    cost = StepCost({"encoder": 1.0, "decoder": 2.0}, {"encoder": 1.0, "decoder": 2.0})
    assert cost.passes == 6 and cost.to_json()["passes"] == 6
