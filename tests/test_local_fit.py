"""ppl_vae.local_fit: local_inference (q*'s fit), its stopping rule and its compiled step."""
from __future__ import annotations

import math

import pytest
import torch

from ppl_vae import guides, local_fit, nets, objectives

from conftest import SEED, make_linear_gaussian


def test_local_inference_reaches_the_optimal_diagonal_gaussian():
    lg = make_linear_gaussian(L=2, D=3, sigma=0.5, seed=8)
    x = lg.sample(6, seed=8)
    opt_loc, opt_scale = lg.optimal_meanfield(x)
    assert not torch.allclose(torch.diagonal(torch.linalg.inv(lg.precision())).sqrt(),
                              opt_scale[0])  # the posterior is correlated: mean-field < exact
    fit = local_fit.local_inference(lg.model, x, lr=0.05, max_steps=1500,
                                   objective=objectives.AnalyticKLELBO(16),
                                   chunk_size=4, seed=SEED)
    assert isinstance(fit.guide, guides.LocalNormal) and 0 < fit.steps <= 2 * 1500
    loc, scale = fit.guide.rows(torch.arange(len(x)))
    torch.testing.assert_close(loc.double(), opt_loc, atol=0.05, rtol=0)
    torch.testing.assert_close(scale.double(), opt_scale, atol=0.0, rtol=0.1)
    # its ELBO is (up to noise) the best a diagonal Gaussian can do, below log p(x)
    elbo_fit = lg.elbo(x, loc, scale)
    elbo_opt = lg.elbo(x, opt_loc, opt_scale)
    assert ((elbo_opt - elbo_fit) < 0.03).all() and (elbo_fit <= lg.log_px(x) + 1e-6).all()
    assert ((lg.log_px(x) - elbo_opt) > 0.01).all()  # a real approximation gap


def test_local_inference_warm_start_from_an_amortized_guide():
    lg = make_linear_gaussian(seed=8)
    x = lg.sample(5, seed=9)
    enc = nets.Encoder(3, (8,), 2)
    amortized = guides.AmortizedNormal(enc)
    fit0 = local_fit.local_inference(lg.model, x, init=amortized, max_steps=0)
    loc0, scale0 = fit0.guide.rows(torch.arange(5))
    with torch.no_grad():
        want_loc, want_scale = enc(x)
    torch.testing.assert_close(loc0, want_loc)  # max_steps=0: the warm start itself
    torch.testing.assert_close(scale0, want_scale, rtol=1e-4, atol=1e-5)
    fit = local_fit.local_inference(lg.model, x, init=amortized, max_steps=800, objective=objectives.AnalyticKLELBO(8))
    loc, _ = fit.guide.rows(torch.arange(5))
    torch.testing.assert_close(loc.double(), lg.posterior_mean(x), atol=0.08, rtol=0)


def test_local_inference_leaves_the_decoder_alone():
    lg = make_linear_gaussian()
    x = lg.sample(4)
    before = [p.detach().clone() for p in lg.model.parameters()]
    local_fit.local_inference(lg.model, x, max_steps=60)
    assert all(torch.equal(a, p) for a, p in zip(before, lg.model.parameters()))


# ----------------------------------------------------------------------------------------
# q*'s compiled step (issue 23) against the plain loop
# ----------------------------------------------------------------------------------------
def _old_fit_rows(model, chunk, batch, objective, lr, max_steps, window, tol, decays):
    """``local_fit._fit_rows`` as it was before issue 23: one host read of the loss per step."""
    opt = torch.optim.Adam([chunk.params], lr=lr)
    previous, running, halvings = math.inf, 0.0, 0
    for step in range(1, max_steps + 1):
        with torch.enable_grad():
            loss = -objective.per_datapoint(model, chunk, batch).sum()
            (grad,) = torch.autograd.grad(loss, [chunk.params])
        chunk.params.grad = grad
        opt.step()
        running += float(loss.detach()) / len(batch.idx)
        if step % window == 0:
            mean, running = running / window, 0.0
            if previous - mean < tol:
                halvings += 1
                if halvings >= decays:
                    return step
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            previous = mean
    return max_steps


def test_plain_local_fit_reads_the_loss_once_per_window_with_the_same_result(monkeypatch):
    """The eager loop sums a window's losses after one read; bit for bit the per-step rule."""
    lg = make_linear_gaussian(seed=8)
    x = lg.sample(7, seed=3)
    kw = dict(lr=0.05, max_steps=700, window=10, tol=0.01, decays=3, chunk_size=4, seed=2)
    new = local_fit.local_inference(lg.model, x, compile=False, **kw)
    monkeypatch.setattr(local_fit, "_fit_rows", lambda model, chunk, batch, objective, lr,
                        max_steps, window, tol, decays, progress, compile=False,
                        step_scale=None:
                        _old_fit_rows(model, chunk, batch, objective, lr, max_steps, window,
                                      tol, decays))
    old = local_fit.local_inference(lg.model, x, **kw)
    assert 0 < new.steps < 2 * 700 and new.steps == old.steps  # the rule stopped both early
    assert torch.equal(new.guide.params, old.guide.params)


def _needs_compiler():
    from ppl_vae.compiled import has_compiler
    if not has_compiler():
        pytest.skip("no C++ compiler: the compiled step cannot be built here")


def test_compiled_local_fit_equals_the_plain_loop_and_reaches_the_optimum():
    """One compiled graph of loss, row gradients and Adam: the same draws, steps and rows as
    the eager loop up to float rounding; two chunks of one shape share the graph."""
    _needs_compiler()
    lg = make_linear_gaussian(L=2, D=3, sigma=0.5, seed=8)
    x = lg.sample(32, seed=8)
    kw = dict(lr=0.05, max_steps=1200, chunk_size=16, seed=SEED,
              objective=objectives.AnalyticKLELBO(8))
    counted = {True: [], False: []}
    fits = {c: local_fit.local_inference(lg.model, x, compile=c, progress=counted[c].append, **kw)
            for c in (False, True)}
    assert fits[True].steps == fits[False].steps and 0 < fits[True].steps < 2 * 1200
    assert sum(counted[True]) == sum(counted[False]) == fits[True].steps
    torch.testing.assert_close(fits[True].guide.params, fits[False].guide.params,
                               atol=1e-4, rtol=1e-4)
    loc, scale = fits[True].guide.rows(torch.arange(len(x)))
    opt_loc, opt_scale = lg.optimal_meanfield(x)
    torch.testing.assert_close(loc.double(), opt_loc, atol=0.05, rtol=0)
    torch.testing.assert_close(scale.double(), opt_scale, atol=0.0, rtol=0.1)
    # the decoder is left alone, and the caller's random stream too
    before = torch.get_rng_state()
    local_fit.local_inference(lg.model, x, compile=True, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    assert lg.model.decoder.weight.grad is None


def test_a_compiled_local_fit_that_fails_to_build_warns_and_fits_eagerly(monkeypatch):
    lg = make_linear_gaussian(seed=8)
    x = lg.sample(6, seed=4)
    kw = dict(max_steps=90, chunk_size=6, seed=1, objective=objectives.AnalyticKLELBO(3))
    eager = local_fit.local_inference(lg.model, x, compile=False, **kw)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")
    monkeypatch.setattr(local_fit._CompiledFit, "_build", classmethod(broken))
    monkeypatch.setattr(local_fit._CompiledFit, "_cache", {})
    monkeypatch.setattr(local_fit._CompiledFit, "_failed", set())
    with pytest.warns(RuntimeWarning, match="compiling q.'s step failed.*no compiler today"):
        fallen = local_fit.local_inference(lg.model, x, compile=True, **kw)
    assert torch.equal(fallen.guide.params, eager.guide.params)
    assert fallen.steps == eager.steps


def test_local_inference_compiles_by_itself_only_from_enough_rows(monkeypatch):
    """compile=None: chunks of at least compiled.PAYS_FROM_LOCAL_ROWS rows where a compiler is found."""
    from ppl_vae import compiled
    seen = []
    monkeypatch.setattr(local_fit, "_fit_rows", lambda *a: seen.append(a[10]) or 0)  # compile
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    lg = make_linear_gaussian(seed=8)
    small = lg.sample(compiled.PAYS_FROM_LOCAL_ROWS - 1, seed=1)
    local_fit.local_inference(lg.model, small)
    local_fit.local_inference(lg.model, lg.sample(compiled.PAYS_FROM_LOCAL_ROWS, seed=1))
    monkeypatch.setattr(compiled, "has_compiler", lambda: False)
    local_fit.local_inference(lg.model, lg.sample(compiled.PAYS_FROM_LOCAL_ROWS, seed=1))
    assert seen == [False, True, False]
