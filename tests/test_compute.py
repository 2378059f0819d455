"""ppl_vae.compute: network passes and FLOPs per step against a hand count for every built-in
guide and a guide built of pieces, the budget in passes and in FLOPs and its bounds, the step
budget of training, and a per-datapoint table's local budget."""
from __future__ import annotations

import json

import pytest
import torch

from ppl_vae import cli
from ppl_vae.compare import _check, compare
from ppl_vae.compute import (MAX_BUDGET_STEPS, Budget, Compute, StepCost, local_budget,
                             step_cost, steps_per_epoch)
from ppl_vae.errors import UserError
from ppl_vae.run import fit_run
from ppl_vae.run_setup import load_splits

from conftest import TOY


TINY = TOY.replace(train_size=500, valid_size=100, test_size=100, hidden=(32,), latent_dim=4,
                   batch_size=128, seed=0)
QUICK_FIT = {"max_steps": 60}  # the test-time fit of q*: enough for a toy model


def quiet(_message):
    pass


@pytest.fixture
def splits(cached_mnist):
    return load_splits(TINY, torch.device("cpu"))


# (settings, forward passes, backward passes), counted by hand from guides.py and
# step.step_on_device; a pass is one network over one minibatch, K particles count K.
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
    # the guide's networks (encoder and the two flows' autoregressive networks) are one
    # network, each module weighted by its share of its FLOPs; the decoder: once each way
    "iaf": ({}, {"encoder": 1, "decoder": 1}, {"encoder": 1, "decoder": 1}),
    # a user's guide of a shared body and two heads: one encoder pass, not three
    "twohead:TwoHeadGuide": ({}, {"encoder": 1, "decoder": 1}, {"encoder": 1, "decoder": 1}),
}
TWO_HEADS = "twohead:TwoHeadGuide"  # tests/twohead.py, on the path pytest gives tests/


@pytest.mark.filterwarnings("ignore:.*was not registered in the param store:UserWarning")
@pytest.mark.parametrize("case", list(HAND))
def test_passes_per_step_match_a_hand_count(case, splits):
    settings, forward, backward = HAND[case]
    guide = case.split(",")[0].replace("iwae-5", "amortized")
    cost = step_cost(TINY.replace(guide=guide, **settings), splits)
    assert cost.forward == pytest.approx(forward) and cost.backward == pytest.approx(backward)
    assert cost.passes == pytest.approx(sum(forward.values()) + sum(backward.values()))
    # FLOPs: every network's, and at most the step's (second-order terms are the step's only)
    assert set(cost.flops) == set(forward) and all(f > 0 for f in cost.flops.values())
    assert sum(cost.flops.values()) <= cost.flops_per_step
    if "semiamortized" not in case:  # first order only: the networks are the whole step
        assert sum(cost.flops.values()) == cost.flops_per_step


def mm(rows, a, b):
    """FLOPs of a [rows, a] x [a, b] matrix product (2 per multiply-add)."""
    return 2 * rows * a * b


def test_flops_per_step_match_a_hand_count(splits):
    """Amortized, TINY: encoder 784-32-8, decoder 4-32-784, B = 128. Forward: every layer's
    product; backward: every weight's gradient, and the input's gradient of every layer whose
    input needs one (not the encoder's first: its input is data)."""
    b, d = 128, 784
    encoder = 2 * (mm(b, d, 32) + mm(b, 32, 8)) + mm(b, 32, 8)
    forward = mm(b, 4, 32) + mm(b, 32, d)  # the decoder's, once
    decoder = 3 * forward  # forward, the weights' and the input's gradients
    cost = step_cost(TINY, splits)
    assert cost.flops == {"encoder": encoder, "decoder": decoder}
    assert cost.flops_per_step == encoder + decoder == 32_407_552
    # the per-datapoint guide: an inner step (the decoder forward, the rows' gradient: not
    # the weights') and the joint step (forward, both gradients)
    cost = step_cost(TINY.replace(guide="meanfield"), splits)
    assert cost.flops == {"decoder": 5 * forward} and cost.flops_per_step == 5 * forward
    # the record carries them: per step and in all
    doc = Compute(cost, 10, 3, 1.0).to_json()
    assert doc["per_step"]["flops"] == {"decoder": 5 * forward}
    assert doc["flops_per_step"] == doc["per_step"]["flops_per_step"] == 5 * forward
    assert doc["total_flops"] == 10 * 5 * forward and doc["total_passes"] == 40


@pytest.mark.filterwarnings("ignore:.*was not registered in the param store:UserWarning")
def test_a_guide_of_a_body_and_two_heads_costs_what_the_built_in_encoder_does(splits,
                                                                                tmp_path):
    """The built-in encoder's sizes at MNIST's (784-400-(50, 50) against 784-400-100, batch
    128): the same passes and FLOPs per step, so the same steps under either budget."""
    config = TINY.replace(hidden=(400,), latent_dim=50)
    built_in, pieces = (step_cost(config.replace(guide=g), splits)
                        for g in ("amortized", TWO_HEADS))
    assert pieces.forward == built_in.forward == {"encoder": 1.0, "decoder": 1.0}
    assert pieces.backward == built_in.backward and pieces.passes == built_in.passes == 4
    assert pieces.flops_per_step == pytest.approx(built_in.flops_per_step, rel=0.03)
    assert pieces.flops["encoder"] == pytest.approx(built_in.flops["encoder"], rel=0.03)
    for budget in (Budget("evaluations", 512), Budget("flops", 64 * built_in.flops_per_step)):
        _, _, plans = _check(config, tmp_path / "c", False, ("amortized", TWO_HEADS), (0,),
                             budget, 10)
        assert plans["amortized"][0].max_steps == plans[TWO_HEADS][0].max_steps, budget
    assert plans["amortized"][0].max_steps == 64

def test_counting_leaves_the_random_stream_and_the_networks_alone(splits):
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    step_cost(TINY, splits)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("text,budget", [
    ("epochs", Budget()), ("evaluations=15640", Budget("evaluations", 15640)),
    ("evaluations=1e4", Budget("evaluations", 10000)),
    (" evaluations=15_640 ", Budget("evaluations", 15640)),
    ("flops=2e12", Budget("flops", 2 * 10 ** 12)),
    ("flops = 447_488_000", Budget("flops", 447488000)),
    ("flops=123456789012345678901", Budget("flops", 123456789012345678901)),  # exact
    ("evaluations=1e99", Budget("evaluations", 10 ** 99))])  # parsed; refused by its steps
def test_budget_parses(text, budget):
    assert Budget.parse(text) == budget


@pytest.mark.parametrize("text", ["seconds=10", "evaluations", "evaluations=0",
                                  "evaluations=-4", "evaluations=2.5", "evaluations=inf",
                                  "epochs=3", "", "flops", "flops=0", "flops=-1e9",
                                  "flops=2.5", "flops=nan", "flops=1e301", "flops=1e9x"])
def test_a_bad_budget_is_one_line_naming_the_forms(text, cached_mnist, tmp_path, capsys):
    with pytest.raises(UserError, match="evaluations=N .* or flops=N"):
        Budget.parse(text)
    code = cli.main(["compare", "--train-size", "500", "--budget", text, "--out",
                     str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --budget") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_an_epochs_budget_records_its_epochs():
    assert Budget.parse("epochs").resolve(TINY.replace(epochs=7)).to_json() == {
        "unit": "epochs", "amount": 7}
    budget = Budget("flops", 10 ** 9)
    assert budget.resolve(TINY) == budget and budget.to_json() == {"unit": "flops",
                                                                   "amount": 10 ** 9}


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
    flops = step_cost(TINY, splits).flops_per_step
    with pytest.raises(UserError, match=f"flops={flops - 1} is less than one step of the "
                                        f"amortized guide .{flops:,} FLOPs.; give at least "
                                        f"flops={flops:_}"):
        _check(TINY, tmp_path / "c", False, ("amortized",), (0,), Budget("flops", flops - 1), 10)


def test_a_budget_in_flops_gives_each_guide_the_whole_steps_it_buys(splits, tmp_path):
    guides = ("amortized", "semiamortized", "meanfield")
    costs = {g: step_cost(TINY.replace(guide=g), splits).flops_per_step for g in guides}
    amount = 10 * costs["semiamortized"] + 1  # 10 semi-amortized steps, and a FLOP over
    _, _, plans = _check(TINY, tmp_path / "c", False, guides, (0,), Budget("flops", amount), 10)
    for guide, (config, cost) in plans.items():
        assert cost.flops_per_step == costs[guide]
        assert config.max_steps == amount // costs[guide], guide
        assert config.max_steps * costs[guide] <= amount < (config.max_steps + 1) * costs[guide]
        assert config.epochs == -(-config.max_steps // 4)
    assert plans["semiamortized"][0].max_steps == 10
    # one step's FLOPs buy one step: the least budget a guide takes
    _, _, plans = _check(TINY, tmp_path / "c", False, ("amortized",), (0,),
                         Budget("flops", costs["amortized"]), 10)
    assert plans["amortized"][0].max_steps == 1


@pytest.mark.parametrize("text", ["evaluations=1e99", "flops=1e99",
                                  f"evaluations={4 * (MAX_BUDGET_STEPS + 1)}"])
def test_a_budget_beyond_the_step_limit_is_refused(text, splits, tmp_path):
    with pytest.raises(UserError, match=f"above the limit of {MAX_BUDGET_STEPS:,} steps"):
        _check(TINY, tmp_path / "c", False, ("amortized",), (0,), Budget.parse(text), 10)
    # the limit itself is a budget
    _, _, plans = _check(TINY, tmp_path / "c", False, ("amortized",), (0,),
                         Budget("evaluations", 4 * MAX_BUDGET_STEPS), 10)
    assert plans["amortized"][0].max_steps == MAX_BUDGET_STEPS


def test_a_budget_beyond_the_step_limit_is_one_line(cached_mnist, tmp_path, capsys):
    code = cli.main(["compare", "--train-size", "500", "--guides", "amortized", "--budget",
                     "evaluations=1e99", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --budget evaluations=1e+99 buys the "
                                        "amortized guide 2.5e+98 steps")
    assert f"limit of {MAX_BUDGET_STEPS:,} steps" in err and err.count("\n") == 1


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
        (record,) = saved[guide]["per_seed"].values()  # one seed: its run's own record
        compute = record["compute"]
        assert compute["total_passes"] == saved[guide]["total_passes"] == passes
        assert saved[guide]["compute"]["per_step"] == compute["per_step"]
        assert compute["total_flops"] == steps * compute["flops_per_step"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "200 network passes" in report and "semiamortized 10 steps" in report


def test_step_cost_is_a_record():
    cost = StepCost({"encoder": 1.0, "decoder": 2.0}, {"encoder": 1.0, "decoder": 2.0})
    assert cost.passes == 6 and cost.to_json()["passes"] == 6
    assert cost.to_json()["flops_per_step"] == 0  # a record made before FLOPs were counted
