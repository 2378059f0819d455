"""The guide protocol: the pipeline asks a guide, never its kind, so a user's own guide (an
``nn.Module``, a plain function with ``pyro.param``, Pyro's ``AutoNormal``) trains and is
scored with no change to the library; what cannot work is refused with one clear message;
and the semi-amortized guide is the third mode between amortized and mean-field."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from conftest import (SEED, USER_D, USER_L, USER_N, MyEncoderGuide, my_function_guide,
                      tiny_binary_data, user_model, user_split)
from ppl_vae import data, guides, likelihoods, nets, objectives, optim, priors, protocol, step, train
from ppl_vae.batching import Batch
from ppl_vae.errors import UserError
from ppl_vae.evaluate import Scores, elbo_parts, evaluate_model
from ppl_vae.model import VAEModel, data_plate

N, D, L = USER_N, USER_D, USER_L


def _train(model, guide, objective=objectives.ELBO(), epochs=4):
    split = user_split()
    idx = torch.arange(8)
    opts = optim.make_optimizers(model, guide, lr=0.02, batch=Batch(split.x[idx], idx, N))
    history = train.fit(model, guide, objective, split, opts, epochs=epochs, batch_size=32,
                        binarize=data.Binarize("none"), progress=False)
    return split, history


@pytest.mark.parametrize("make", [MyEncoderGuide, lambda: my_function_guide,
                                  lambda m=None: "auto"], ids=["module", "function", "autonormal"])
def test_a_users_guide_trains_and_is_scored_without_library_changes(make):
    model = user_model()
    guide = make()
    if guide == "auto":
        guide = AutoNormal(model, create_plates=data_plate)
    split, history = _train(model, guide)
    assert history[-1].train_elbo > history[0].train_elbo  # it learned
    x = split.x[:40]
    s = evaluate_model(model, guide, x, num_particles=20, progress=False,
                       local_options={"max_steps": 60})
    for est in (s.elbo, s.elbo_local, s.log_px, s.approximation_gap):
        assert math.isfinite(est.mean) and math.isfinite(est.stderr)
    if isinstance(guide, AutoNormal):
        # a parameter per training row means nothing for new rows: q is refitted, like a
        # per-datapoint table's, so its own ELBO there is L[q*] and no amortization gap exists
        assert protocol.reads_rows(guide, x) and s.local_steps > 0
        assert s.amortization_gap is None
        assert s.elbo.mean == pytest.approx(s.elbo_local.mean, abs=1e-4)
    else:
        # a diagonal Normal from x, q*'s family: the amortization gap is defined
        assert not protocol.reads_rows(guide, x)
        assert s.amortization_gap is not None


def test_autonormal_without_the_models_plate_is_refused():
    """Its plate would draw its own random subsample instead of the batch's rows."""
    model = user_model()
    with pytest.raises(UserError, match="create_plates=ppl_vae.model.data_plate"):
        _train(model, AutoNormal(model), epochs=1)


def test_a_guide_with_one_joint_latent_vector_is_refused():
    model = user_model()
    with pytest.raises(UserError, match="'data' plate"):
        _train(model, AutoDiagonalNormal(model), epochs=1)


def test_fit_takes_pyros_own_objective():
    model, guide = user_model(), MyEncoderGuide()
    _, history = _train(model, guide, pyro.infer.Trace_ELBO().differentiable_loss)
    assert history[-1].train_elbo > history[0].train_elbo


def test_our_elbo_honours_poutine_scale_like_pyros():
    """poutine.scale on the latent site: our ELBO equals Pyro's Trace_ELBO on the same draws."""
    model, guide = user_model(), MyEncoderGuide()
    scaled = poutine.scale(model, scale=0.1)
    x = user_split().x
    idx = torch.arange(5, 13)
    batch = Batch(x[idx], idx, N)
    pyro.set_rng_seed(SEED + 3)
    ours = objectives.ELBO()(scaled, guide, batch)
    pyro.set_rng_seed(SEED + 3)
    theirs = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(scaled, guide, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)
    pyro.set_rng_seed(SEED + 3)
    unscaled = objectives.ELBO()(model, guide, batch).detach()
    assert abs(float(unscaled) - float(ours.detach())) > 1.0  # the scale matters


def test_semi_amortized_refinement_improves_the_encoders_elbo(lingauss):
    """On the linear-Gaussian model, K gradient steps from the encoder's output raise each
    datapoint's ELBO towards the exact optimum (the diagonal-Normal q*)."""
    x = lingauss.sample(30, seed=2)
    torch.manual_seed(SEED)
    encoder = nets.Encoder(lingauss.D, (8,), lingauss.L)
    bare = guides.AmortizedNormal(encoder)
    semi = guides.SemiAmortizedNormal(encoder, lingauss.model, steps=20, step_size=0.05)
    e_bare = elbo_parts(lingauss.model, bare, x, num_particles=200, seed=1).elbo
    e_semi = elbo_parts(lingauss.model, semi, x, num_particles=200, seed=1).elbo
    m, s = lingauss.optimal_meanfield(x)
    best = lingauss.elbo(x, m, s)  # [N], the exact optimum of a diagonal Normal
    assert float(e_semi.mean()) > float(e_bare.mean()) + 0.5
    assert float(e_semi.mean()) <= float(best.mean()) + 0.05  # never above it (MC slack)
    assert set(semi.views()) == {"encoder"}


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_semi_amortized_trains_end_to_end_or_with_the_gradient_stopped(stop_gradient):
    """SAVI: the refined q's loss reaches encoder and decoder through the refinement; with the
    gradient stopped the encoder trains on its own ELBO and the decoder on the refined q."""
    model = user_model()
    guide = guides.SemiAmortizedNormal(nets.Encoder(D, (16,), L), model, steps=3,
                                       step_size=0.05, stop_gradient=stop_gradient)
    x = user_split().x
    idx = torch.arange(16)
    batch = Batch(x[idx], idx, N)
    loss = guide.training_loss(objectives.ELBO(), model, batch)
    enc = torch.autograd.grad(loss, list(guide.encoder.parameters()), retain_graph=True)
    dec = torch.autograd.grad(loss, list(model.decoder.parameters()))
    assert all(g.abs().sum() > 0 for g in enc) and all(g.abs().sum() > 0 for g in dec)
    # the reported loss is the refined q's whichever way the gradient goes
    pyro.set_rng_seed(SEED + 5)
    a = guide.training_loss(objectives.ELBO(), model, batch)
    pyro.set_rng_seed(SEED + 5)
    b = objectives.ELBO()(model, guide, batch)
    torch.testing.assert_close(a, b)
    _, history = _train(model, guide, epochs=3)
    assert history[-1].train_elbo > history[0].train_elbo


def test_semi_amortized_reports_both_amortization_gaps():
    model = user_model()
    guide = guides.SemiAmortizedNormal(nets.Encoder(D, (16,), L), model, steps=3)
    split, _ = _train(model, guide, epochs=2)
    s = evaluate_model(model, guide, split.x[:30], num_particles=20, progress=False,
                       local_options={"max_steps": 60})
    (view,) = s.views
    assert view.name == "encoder"
    for est in (s.amortization_gap, view.amortization_gap, view.elbo):
        assert est is not None and math.isfinite(est.mean)
    assert s.elbo.mean - view.elbo.mean == pytest.approx(
        view.amortization_gap.mean - s.amortization_gap.mean, abs=1e-4)
    doc = s.to_json()  # the view under its own names, read back whole
    assert doc["test_elbo_encoder"] == view.elbo.mean
    assert doc["amortization_gap_encoder"] == view.amortization_gap.mean
    assert Scores.from_json(doc) == s


def test_a_table_reads_the_rows_it_is_given_and_only_within():
    """``given_rows``: what a compiled step hands the guide in place of its table reads; the
    rows' gradient is then dense ([B, width]) and the table gets none."""
    table = guides.LocalNormal(N, L)
    idx = torch.tensor([4, 1, 4])
    given = torch.randn(len(idx), 2 * L, requires_grad=True)
    with table.given_rows([given]):
        loc, scale = table.loc_scale(Batch(torch.zeros(len(idx), D), idx, N))
    torch.testing.assert_close(loc, given[:, :L])
    torch.testing.assert_close(scale, torch.nn.functional.softplus(given[:, L:]) + 1e-5)
    (grad,) = torch.autograd.grad(loc.sum(), [given])
    assert not grad.is_sparse and table.params.grad is None
    outside, _ = table.loc_scale(Batch(torch.zeros(len(idx), D), idx, N))
    torch.testing.assert_close(outside, table.params.detach()[idx, :L])


# ---------------------------------------------------------------------------------------
# a refinement step too large
# ---------------------------------------------------------------------------------------
def test_a_refine_lr_beyond_float32_is_one_line(tmp_path, capsys, cached_mnist):
    """``--refine-lr 1e40``: the first refinement step left float32's range and a 120-line
    Pyro ValueError followed; now one line naming the setting and a value that works."""
    from helpers import TINY, assert_one_error_line, call
    code, out, err = call(capsys, "train", *TINY, "--guide", "semiamortized", "--refine-lr",
                          "1e40", "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert "--refine-lr 1e+40" in err and "0.05" in err
    guides.check_refine_lr(0.05)
    guides.check_refine_lr(1e30)  # finite steps are the divergence guard's business
    for bad in (1e40, float("inf"), float("nan"), 0.0):
        with pytest.raises(UserError, match="refine_lr"):
            guides.check_refine_lr(bad)


def _semi(step_size, d=12, latent=2):
    torch.manual_seed(SEED)
    model = VAEModel(nets.Decoder(latent, (16,), d), likelihoods.Bernoulli(),
                     priors.StandardNormal(latent))
    guide = guides.SemiAmortizedNormal(nets.Encoder(d, (16,), latent), model, steps=5,
                                       step_size=step_size)
    return model, guide


def test_a_diverging_refinement_is_named_in_the_divergence(tmp_path, capsys, cached_mnist):
    """A refinement step far too large makes training diverge: the error names refine_lr
    (the setting that caused it), not the learning rate, on the command line too."""
    from helpers import TINY, call
    code, out, err = call(capsys, "train", *TINY, "--guide", "semiamortized", "--refine-lr",
                          "1e30", "--out", tmp_path / "r")
    assert code == 1 and "Traceback" not in err, err
    assert "diverged" in err and "--refine-lr" in err, err
    model, guide = _semi(1e30)
    x = tiny_binary_data(96, 12)
    split = data.Split(x, torch.zeros(96, dtype=torch.long))
    opts = optim.make_optimizers(model, guide, lr=1e-3)
    with pytest.raises(step.DivergenceError) as e:
        train.fit(model, guide, objectives.ELBO(), split, opts, epochs=1, batch_size=32,
                  binarize=data.Binarize("none"), progress=False, log=lambda _m: None)
    assert e.value.setting == "refine_lr" and "refine_lr (--refine-lr)" in str(e.value)
    assert e.value.advice(cli=True) == "Try a smaller --refine-lr"


@pytest.mark.parametrize("step_size, blamed", [(1000.0, True), (0.05, False)])
def test_the_refinement_answers_whether_it_caused_a_divergence(step_size, blamed):
    """A step so large that the refinement lowers the ELBO it climbs is blamed; the default
    step, which raises it, is not (the learning rate is then the suspect)."""
    model, guide = _semi(step_size)
    x = tiny_binary_data(64, 12)
    cause = guide.divergence_cause(model, Batch(x, torch.arange(64), 64))
    assert (cause is not None and cause[0] == "refine_lr") == blamed, cause
    assert guides.AmortizedNormal(guide.encoder).divergence_cause(
        model, Batch(x, torch.arange(64), 64)) is None
