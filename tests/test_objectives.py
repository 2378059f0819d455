"""ppl_vae.objectives on models with closed forms: log_weights, ELBO, analytic KL, IWAE, DReG.

Monte Carlo comparisons use tolerances of 4-5 standard errors computed from the samples.
"""
from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae import guides, likelihoods, nets, objectives, priors
from ppl_vae.batching import Batch
from ppl_vae.config import Config
from ppl_vae.model import VAEModel, data_plate

from conftest import SEED, full_batch, local_guide, make_linear_gaussian, tiny_binary_data
from helpers import TINY, assert_one_error_line, call, config_json, metrics, summary, train_cli


def _poor_guide(lg, x, shift=0.4, stretch=1.4):
    """A per-datapoint guide that is deliberately off the optimum (so every gap is visible)."""
    loc, scale = lg.optimal_meanfield(x)
    return local_guide(loc + shift, scale * stretch), loc + shift, scale * stretch


def _mean_se(values: torch.Tensor, dim=0):
    values = values.detach().double()
    return values.mean(dim), values.std(dim) / math.sqrt(values.shape[dim])


# ---------------------------------------------------------------------------------------
# log_weights: the primitive
# ---------------------------------------------------------------------------------------
def test_log_weights_are_the_exact_log_densities_of_the_drawn_particles(lingauss):
    x = lingauss.sample(5)
    guide, m, s = _poor_guide(lingauss, x)
    batch = Batch(x[[4, 1, 2]], torch.tensor([4, 1, 2]), 5)
    K = 7
    pyro.set_rng_seed(SEED + 11)
    model_tr, guide_tr = objectives.traces(lingauss.model, guide, batch, K)
    z = guide_tr.nodes["z"]["value"].detach().double()  # [K, B, L]
    assert z.shape == (K, 3, lingauss.L)
    pyro.set_rng_seed(SEED + 11)
    lw = objectives.log_weights(lingauss.model, guide, batch, K)
    xb = batch.x.double()
    log_lik = torch.distributions.Normal(z @ lingauss.W.T + lingauss.b, lingauss.sigma).log_prob(xb).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = torch.distributions.Normal(m[batch.idx].double(), s[batch.idx].double()).log_prob(z).sum(-1)
    for got, want in ((lw.log_lik, log_lik), (lw.log_prior, log_prior), (lw.log_q, log_q)):
        assert got.shape == (K, 3)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lw.total.double(), log_lik + log_prior - log_q, rtol=1e-5, atol=1e-4)


def test_log_weights_are_unscaled_and_leave_the_param_store_alone(lingauss):
    """The same rows and particles give the same log weights whatever the plate size N."""
    x = lingauss.sample(8)
    loc, scale = lingauss.optimal_meanfield(x)
    big = local_guide(loc, scale)  # 8 rows
    small = local_guide(loc[:2], scale[:2])  # the same first 2 rows
    pyro.set_rng_seed(SEED + 0)
    a = objectives.log_weights(lingauss.model, big, Batch(x[:2], torch.arange(2), 8), 3)
    pyro.set_rng_seed(SEED + 0)
    b = objectives.log_weights(lingauss.model, small, Batch(x[:2], torch.arange(2), 2), 3)
    for u, v in zip(a, b):
        assert u.shape == (3, 2)
        torch.testing.assert_close(u, v)
    # while the loss scales by N / B
    pyro.set_rng_seed(SEED + 0)
    loss_big = objectives.ELBO(3)(lingauss.model, big, Batch(x[:2], torch.arange(2), 8))
    pyro.set_rng_seed(SEED + 0)
    loss_small = objectives.ELBO(3)(lingauss.model, small, Batch(x[:2], torch.arange(2), 2))
    torch.testing.assert_close(loss_big, 4 * loss_small)
    assert len(pyro.get_param_store()) == 0  # _ModuleParams keeps models out of the store
    loss_big.backward()
    assert len(pyro.get_param_store()) == 0
    assert big.params.grad is not None and lingauss.model.decoder.weight.grad is not None


def test_log_weights_refuses_a_site_outside_the_data_plate(lingauss):
    x = lingauss.sample(4)
    guide = local_guide(*lingauss.optimal_meanfield(x))

    def model_with_global(batch):
        pyro.sample("c", dist.Normal(0.0, 1.0))  # not in the data plate
        lingauss.model(batch)

    def guide_with_global(batch):
        pyro.sample("c", dist.Normal(0.0, 1.0))
        guide(batch)

    with pytest.raises(ValueError, match="'c'"):
        objectives.log_weights(model_with_global, guide_with_global, full_batch(x), 2)


# ---------------------------------------------------------------------------------------
# ELBO
# ---------------------------------------------------------------------------------------
def test_mc_elbo_matches_closed_form(lingauss):
    x = lingauss.sample(4)
    guide, m, s = _poor_guide(lingauss, x)
    batch = full_batch(x)
    K = 20000
    pyro.set_rng_seed(SEED + 1)
    lw = objectives.log_weights(lingauss.model, guide, batch, K)
    pyro.set_rng_seed(SEED + 1)
    elbo = objectives.ELBO(K).per_datapoint(lingauss.model, guide, batch)
    torch.testing.assert_close(elbo, lw.total.mean(0), rtol=1e-6, atol=1e-5)
    mean, se = _mean_se(lw.total)
    exact = lingauss.elbo(x, m, s)
    assert ((mean - exact).abs() < 4 * se + 1e-4).all(), (mean, exact, se)
    # the parts: E_q log p(x|z) and -KL(q || p)
    mean_lik, se_lik = _mean_se(lw.log_lik)
    assert ((mean_lik - lingauss.expected_log_lik(x, m, s)).abs() < 4 * se_lik + 1e-4).all()
    mean_kl, se_kl = _mean_se(lw.log_q - lw.log_prior)
    assert ((mean_kl - lingauss.kl(m, s)).abs() < 4 * se_kl + 1e-4).all()
    # the loss is -N/B times the batch sum
    pyro.set_rng_seed(SEED + 1)
    loss = objectives.ELBO(K)(lingauss.model, guide, batch)
    torch.testing.assert_close(loss, -elbo.sum(), rtol=1e-6, atol=1e-4)


def test_elbo_is_tight_at_the_exact_posterior():
    """Orthogonal W: the exact posterior is diagonal, so ELBO = log p(x) for every particle."""
    lg = make_linear_gaussian(L=2, D=4, orthogonal=True, seed=3)
    x = lg.sample(5)
    guide = local_guide(*lg.optimal_meanfield(x))
    lw = objectives.log_weights(lg.model, guide, full_batch(x), 16).total.double()
    torch.testing.assert_close(lw, lg.log_px(x).expand(16, 5), rtol=0, atol=2e-4)
    torch.testing.assert_close(lg.elbo(x, *lg.optimal_meanfield(x)), lg.log_px(x))


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_analytic_kl_elbo_matches_closed_form_and_mc(lingauss, beta):
    x = lingauss.sample(4)
    guide, m, s = _poor_guide(lingauss, x)
    batch = full_batch(x)
    K = 20000
    pyro.set_rng_seed(SEED + 2)
    lw = objectives.log_weights(lingauss.model, guide, batch, K)
    pyro.set_rng_seed(SEED + 2)
    analytic = objectives.AnalyticKLELBO(K, beta=beta).per_datapoint(lingauss.model, guide, batch)
    # same particles: analytic = mean log_lik - beta * exact KL
    exact_kl = lingauss.kl(m, s)
    torch.testing.assert_close(analytic.double(), lw.log_lik.double().mean(0) - beta * exact_kl,
                               rtol=1e-5, atol=1e-3)
    _, se_lik = _mean_se(lw.log_lik)
    exact = lingauss.elbo(x, m, s, beta=beta)
    assert ((analytic - exact).abs() < 4 * se_lik + 1e-3).all()
    # and the MC ELBO with the same beta has the same expectation
    pyro.set_rng_seed(SEED + 3)
    mc = objectives.ELBO(K, beta=beta).per_datapoint(lingauss.model, guide, batch)
    se_mc = (lw.log_lik + beta * (lw.log_prior - lw.log_q)).double().std(0) / math.sqrt(K)
    assert ((mc - exact).abs() < 4 * se_mc + 1e-3).all()
    assert ((mc - analytic).abs() < 4 * (se_mc ** 2 + se_lik ** 2).sqrt() + 1e-3).all()


def test_analytic_kl_falls_back_to_mc_for_a_mixture_prior():
    torch.manual_seed(0)
    lg = make_linear_gaussian()
    model = VAEModel(lg.model.decoder, lg.model.likelihood, priors.MixtureOfGaussians(2, 3))
    x = lg.sample(4)
    guide, _, _ = _poor_guide(lg, x)
    batch = full_batch(x)
    pyro.set_rng_seed(SEED + 5)
    mc = objectives.ELBO(6).per_datapoint(model, guide, batch)
    pyro.set_rng_seed(SEED + 5)
    an = objectives.AnalyticKLELBO(6).per_datapoint(model, guide, batch)
    torch.testing.assert_close(an, mc, rtol=1e-5, atol=1e-4)


def _bernoulli_setup(amortized: bool, N=20, D=12, L=3):
    torch.manual_seed(0)
    model = VAEModel(nets.Decoder(L, (16,), D), likelihoods.Bernoulli(), priors.StandardNormal(L))
    if amortized:
        guide = guides.AmortizedNormal(nets.Encoder(D, (16,), L))
    else:
        guide = guides.LocalNormal(N, L, sparse=False)
        guide.set_rows(torch.arange(N), torch.randn(N, L), torch.rand(N, L) + 0.3)
    x = tiny_binary_data(N, D)
    idx = torch.tensor([3, 17, 8, 0, 11])
    return model, guide, Batch(x[idx], idx, N)


@pytest.mark.parametrize("amortized", [True, False])
@pytest.mark.parametrize("K", [1, 4])
def test_elbo_equals_pyro_trace_elbo_on_the_same_samples(amortized, K):
    """Our loss and gradients equal Pyro's Trace_ELBO on the same particles (subsampled batch)."""
    model, guide, batch = _bernoulli_setup(amortized)
    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(SEED + 7)
    ours = objectives.ELBO(K)(model, guide, batch)
    g_ours = torch.autograd.grad(ours, params)
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED + 7)
    trace_elbo = pyro.infer.Trace_ELBO(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=1)
    theirs = trace_elbo.differentiable_loss(model, guide, batch)
    g_theirs = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the loss is -N/B times the sum of per-datapoint ELBOs of the log weights
    pyro.set_rng_seed(SEED + 7)
    lw = objectives.log_weights(model, guide, batch, K).total
    torch.testing.assert_close(ours, -(20 / 5) * lw.mean(0).sum(), rtol=1e-5, atol=1e-3)


def test_local_guide_minibatch_elbo_is_unbiased_for_the_full_data_elbo():
    """Average over every minibatch of size 2 of N/B * batch ELBO = full-data ELBO (exact)."""
    lg = make_linear_gaussian(seed=1)
    N, B, K = 6, 2, 4000
    x = lg.sample(N, seed=1)
    guide, m, s = _poor_guide(lg, x, shift=-0.3, stretch=0.7)
    exact_total = float(lg.elbo(x, m, s).sum())
    pyro.set_rng_seed(SEED + 0)
    var = objectives.log_weights(lg.model, guide, full_batch(x), K).total.detach().double().var(0)  # [N]
    losses, se2 = [], 0.0
    for subset in itertools.combinations(range(N), B):
        idx = torch.tensor(subset)
        losses.append(objectives.ELBO(K)(lg.model, guide, Batch(x[idx], idx, N)).item())
        se2 += (N / B) ** 2 * float(var[idx].sum()) / K
    n_sub = len(losses)
    se = math.sqrt(se2) / n_sub
    assert abs(-sum(losses) / n_sub - exact_total) < 4 * se + 1e-3
    # a single minibatch is biased-free only on average: individual ones differ a lot
    assert max(losses) - min(losses) > 20 * se


# ---------------------------------------------------------------------------------------
# IWAE
# ---------------------------------------------------------------------------------------
def test_iwae_with_one_particle_equals_elbo(lingauss):
    x = lingauss.sample(6)
    guide, _, _ = _poor_guide(lingauss, x)
    batch = Batch(x[[0, 3, 5]], torch.tensor([0, 3, 5]), 6)
    pyro.set_rng_seed(SEED + 9)
    elbo = objectives.ELBO(1)(lingauss.model, guide, batch)
    pyro.set_rng_seed(SEED + 9)
    iwae = objectives.IWAE(1)(lingauss.model, guide, batch)
    torch.testing.assert_close(iwae, elbo, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("K", [2, 5])
def test_iwae_is_logmeanexp_of_the_log_weights(lingauss, K):
    x = lingauss.sample(6)
    guide, _, _ = _poor_guide(lingauss, x)
    batch = Batch(x[[1, 2]], torch.tensor([1, 2]), 6)
    pyro.set_rng_seed(SEED + 4)
    lw = objectives.log_weights(lingauss.model, guide, batch, K).total
    pyro.set_rng_seed(SEED + 4)
    per = objectives.IWAE(K).per_datapoint(lingauss.model, guide, batch)
    torch.testing.assert_close(per, torch.logsumexp(lw, 0) - math.log(K))
    pyro.set_rng_seed(SEED + 4)
    loss = objectives.IWAE(K)(lingauss.model, guide, batch)
    torch.testing.assert_close(loss, -(6 / 2) * per.sum())  # scaled after the logsumexp


def _replicated(x, rows, reps):
    """One batch holding each of ``rows`` ``reps`` times: independent draws in one call."""
    idx = torch.as_tensor(rows).repeat(reps)
    return Batch(x[idx], idx, len(x))


def test_iwae_bounds_are_ordered():
    """ELBO <= IWAE_k <= log p(x) on average, and E[IWAE_k] is non-decreasing in k."""
    lg = make_linear_gaussian(L=2, D=3, seed=2)
    N, R = 3, 3000
    x = lg.sample(N, seed=2)
    guide, m, s = _poor_guide(lg, x, shift=0.6, stretch=1.6)
    exact_elbo, log_px = lg.elbo(x, m, s), lg.log_px(x)
    batch = _replicated(x, range(N), R)
    means, ses = [], []
    for k in (1, 2, 5, 20, 100):
        per = objectives.IWAE(k).per_datapoint(lg.model, guide, batch).reshape(R, N)
        mean, se = _mean_se(per)
        means.append(mean)
        ses.append(se)
    means, ses = torch.stack(means), torch.stack(ses)  # [5, N]
    assert ((means[0] - exact_elbo).abs() < 4 * ses[0]).all()  # IWAE_1 is the ELBO
    for i in range(len(means) - 1):
        assert (means[i + 1] > means[i] - 4 * (ses[i] ** 2 + ses[i + 1] ** 2).sqrt()).all()
    assert (means <= log_px + 4 * ses).all()
    # and the bound really tightens: IWAE_100 closes most of the gap log p(x) - ELBO
    assert ((log_px - means[-1]) < 0.5 * (log_px - exact_elbo)).all()
    assert (means[-1] - means[0] > 10 * ses[-1]).all()


def test_iwae_is_exact_at_the_exact_posterior():
    lg = make_linear_gaussian(L=2, D=4, orthogonal=True, seed=3)
    x = lg.sample(5)
    guide = local_guide(*lg.optimal_meanfield(x))
    for k in (1, 3, 50):
        per = objectives.IWAE(k).per_datapoint(lg.model, guide, full_batch(x))
        torch.testing.assert_close(per.double(), lg.log_px(x), rtol=0, atol=2e-4)


def test_subsampled_iwae_is_unbiased_for_the_full_data_bound():
    """E over minibatches of the scaled IWAE loss = the full-data IWAE bound (logsumexp of
    *unscaled* weights per datapoint; scaling before the logsumexp would not be)."""
    lg = make_linear_gaussian(seed=4)
    N, B, K, R = 4, 2, 5, 4000
    x = lg.sample(N, seed=4)
    guide, _, _ = _poor_guide(lg, x, shift=0.5, stretch=1.5)
    iwae = objectives.IWAE(K)
    # reference: -sum_n E[IWAE_K(x_n)] from the log weights directly
    lw = objectives.log_weights(lg.model, guide, _replicated(x, range(N), R), K).total  # [K, R*N]
    per = (torch.logsumexp(lw, 0) - math.log(K)).reshape(R, N)
    ref_mean, ref_se = _mean_se(per)
    reference = -float(ref_mean.sum())
    losses, se2 = [], 0.0
    for subset in itertools.combinations(range(N), B):
        # R copies of the minibatch: N/(B R) * sum = the average of R minibatch losses
        losses.append(iwae(lg.model, guide, _replicated(x, subset, R)).item())
        se2 += (N / B) ** 2 * float((ref_se[list(subset)] ** 2).sum())
    se = math.sqrt(se2) / len(losses) + math.sqrt(float((ref_se ** 2).sum()))
    estimate = sum(losses) / len(losses)
    assert abs(estimate - reference) < 4 * se, (estimate, reference, se)
    # the exact log p(x) bounds it
    assert estimate > -float(lg.log_px(x).sum()) - 4 * se


# ---------------------------------------------------------------------------------------
# DReG
# ---------------------------------------------------------------------------------------
def test_dreg_value_and_model_gradient_equal_iwae_on_the_same_seed(lingauss):
    x = lingauss.sample(6)
    guide, _, _ = _poor_guide(lingauss, x)
    batch = Batch(x[[0, 2, 5]], torch.tensor([0, 2, 5]), 6)
    model_params = list(lingauss.model.parameters())
    pyro.set_rng_seed(SEED + 3)
    plain = objectives.IWAE(5)(lingauss.model, guide, batch)
    g_plain = torch.autograd.grad(plain, model_params)
    pyro.set_rng_seed(SEED + 3)
    dreg = objectives.IWAE(5, dreg=True)(lingauss.model, guide, batch)
    g_dreg = torch.autograd.grad(dreg, model_params)
    torch.testing.assert_close(dreg, plain, rtol=1e-6, atol=1e-4)
    for a, b in zip(g_dreg, g_plain):  # the model receives sum_k w_k d lw_k in both
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dreg_guide_gradient_is_the_doubly_reparameterized_formula(lingauss):
    """d/dphi = sum_k w_k^2 (d lw_k / d z_k) (d z_k / d phi), with log q's parameters held fixed."""
    x = lingauss.sample(4)
    guide, _, _ = _poor_guide(lingauss, x)
    batch = full_batch(x)
    K = 6
    pyro.set_rng_seed(SEED + 21)
    _, guide_tr = objectives.traces(lingauss.model, guide, batch, K)
    z_drawn = guide_tr.nodes["z"]["value"].detach()
    pyro.set_rng_seed(SEED + 21)
    surrogate = objectives.IWAE(K, dreg=True).per_datapoint(lingauss.model, guide, batch).sum()
    (g_pkg,) = torch.autograd.grad(surrogate, [guide.params])
    # by hand
    loc, scale = guide.rows(batch.idx)
    eps = (z_drawn - loc.detach()) / scale.detach()
    z = loc + scale * eps
    torch.testing.assert_close(z.detach(), z_drawn)
    W, b = lingauss.model.decoder.weight.detach(), lingauss.model.decoder.bias.detach()
    lw = (torch.distributions.Normal(z @ W.T + b, lingauss.sigma).log_prob(batch.x).sum(-1)
          + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
          - torch.distributions.Normal(loc.detach(), scale.detach()).log_prob(z).sum(-1))
    w = torch.softmax(lw.detach(), 0)
    (g_hand,) = torch.autograd.grad((w ** 2 * lw).sum(), [guide.params])
    torch.testing.assert_close(g_pkg, g_hand, rtol=1e-4, atol=1e-5)
    # it is not the plain IWAE gradient sum_k w_k d lw_k / d phi
    pyro.set_rng_seed(SEED + 21)
    (g_plain,) = torch.autograd.grad(objectives.IWAE(K).per_datapoint(lingauss.model, guide, batch).sum(),
                                     [guide.params])
    assert not torch.allclose(g_pkg, g_plain, atol=1e-3)


def test_dreg_guide_gradient_is_unbiased():
    """Averaged over many draws, DReG's guide gradient equals plain IWAE's (loose tolerance).

    A per-datapoint table with M rows, all for the same image, gives M independent gradient
    draws in one backward pass: row m's gradient depends only on row m's particles."""
    lg = make_linear_gaussian(seed=5)
    x0 = lg.sample(1, seed=5)
    loc, scale = lg.optimal_meanfield(x0)
    M, K = 20000, 5
    guide = local_guide((loc + 0.5).expand(M, -1), (scale * 1.5).expand(M, -1))
    x = x0.expand(M, -1)
    batch = full_batch(x)

    def grads(dreg, seed):
        pyro.set_rng_seed(seed)
        out = objectives.IWAE(K, dreg=dreg).per_datapoint(lg.model, guide, batch).sum()
        return torch.autograd.grad(out, [guide.params])[0].double()  # [M, 2L]

    g_plain, g_dreg = grads(False, 2 * SEED + 1), grads(True, 2 * SEED + 2)
    m_plain, se_plain = _mean_se(g_plain)
    m_dreg, se_dreg = _mean_se(g_dreg)
    tol = 5 * (se_plain ** 2 + se_dreg ** 2).sqrt()
    assert ((m_plain - m_dreg).abs() < tol).all(), (m_plain, m_dreg, tol)
    assert (m_plain.abs() > tol).any()  # the gradient is not trivially zero
    assert (g_dreg.var(0) < g_plain.var(0)).all()  # and DReG is the lower-variance estimator


def test_dreg_refuses_a_non_normal_guide(lingauss):
    x = lingauss.sample(3)

    def laplace_guide(batch):
        with data_plate(batch):
            pyro.sample("z", dist.Laplace(torch.zeros(len(batch.idx), 2), 1.0).to_event(1))

    with pytest.raises(ValueError, match="Normal"):
        objectives.IWAE(3, dreg=True)(lingauss.model, laplace_guide, full_batch(x))


def test_beta_changes_the_objective_and_is_recorded(tmp_path, cached_mnist, capsys):
    one, half = tmp_path / "beta1", tmp_path / "beta05"
    assert train_cli(capsys, one, "--beta", "1")[0] == 0
    assert train_cli(capsys, half, "--beta", "0.5")[0] == 0
    assert [m["beta"] for m in metrics(half)] == [0.5]
    assert [m["beta"] for m in metrics(one)] == [1.0]
    assert config_json(half)["config"]["beta"] == 0.5
    # a smaller KL weight gives a larger (less negative) objective, not the same one
    assert metrics(half)[0]["train_elbo"] > metrics(one)[0]["train_elbo"]


@pytest.mark.parametrize("name", ["Trace_ELBO", "pyro.infer:Trace_ELBO"])
def test_pyro_trace_elbo_trains_like_ours(tmp_path, capsys, cached_mnist, name):
    """Our ELBO equals Pyro's Trace_ELBO: the same seed gives the same numbers (to float
    rounding: the same draws, the same loss)."""
    runs = {}
    for objective in ("elbo", name):
        out = tmp_path / objective.replace(":", "_")
        code, _, err = train_cli(capsys, out, "--objective", objective)
        assert code == 0, err
        runs[objective] = summary(out)
    ours, pyros = runs["elbo"], runs[name]
    assert pyros["test_elbo"] == pytest.approx(ours["test_elbo"], abs=3 * ours["test_elbo_stderr"])
    assert pyros["final_train_elbo"] == pytest.approx(ours["final_train_elbo"], rel=1e-4)


def test_pyro_objectives_values_match_ours():
    """Per batch: Trace_ELBO equals elbo, TraceMeanField_ELBO equals analytic_kl, and
    TraceGraph_ELBO's value is -ELBO on the same draws."""
    import pyro
    from ppl_vae.batching import Batch
    from ppl_vae.build import build_guide, build_model, build_objective
    x = torch.bernoulli(torch.rand(6, 12, generator=torch.Generator().manual_seed(0)))
    cfg = Config(latent_dim=3, hidden=(8,), num_particles=4)
    model = build_model(cfg, 12)
    guide = build_guide(cfg, 12, 6)
    batch = Batch(x, torch.arange(6), 30)
    pairs = [("elbo", "Trace_ELBO"), ("analytic_kl", "TraceMeanField_ELBO"),
             ("elbo", "TraceGraph_ELBO")]
    for ours, theirs in pairs:
        values = []
        for name in (ours, theirs):
            pyro.set_rng_seed(1)
            values.append(float(build_objective(cfg.replace(objective=name))(model, guide, batch).detach()))
        assert values[1] == pytest.approx(values[0], rel=1e-5), (ours, theirs)


@pytest.mark.parametrize("argv, words", [
    (["--objective", "pyro.infer:RenyiELBO"], "N / B"),
    (["--objective", "Trace_ELBO", "--beta", "0.5"], "no KL weight"),
    (["--objective", "Trace_ELBO", "--warmup-epochs", "1"], "no KL weight"),
    (["--warmup-epochs", "7", "--epochs", "1"], "never reach"),
])
def test_objectives_that_cannot_run_are_one_line(tmp_path, capsys, cached_mnist, argv, words):
    code, out, err = call(capsys, "train", *TINY, *argv, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert words in err
    assert not (tmp_path / "r").exists()
