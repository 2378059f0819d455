"""ppl_vae.evaluate against the linear-Gaussian model's closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from ppl_vae import evaluate, guides, nets, objectives

from conftest import SEED, full_batch, local_guide, make_linear_gaussian


def _poor_guide(lg, x, shift=0.5, stretch=1.5):
    loc, scale = lg.optimal_meanfield(x)
    return local_guide(loc + shift, scale * stretch)


def test_log_px_is_exact_when_the_proposal_is_the_posterior():
    """Orthogonal W: the optimal diagonal q is the posterior, every weight equals p(x)."""
    lg = make_linear_gaussian(L=2, D=4, orthogonal=True, seed=3)
    x = lg.sample(6)
    guide = local_guide(*lg.optimal_meanfield(x))
    for max_rows in (2 ** 16, 64, 7):
        est = evaluate.log_px(lg.model, guide, x, num_particles=100, max_rows=max_rows)
        assert est.shape == (6,)
        torch.testing.assert_close(est.double(), lg.log_px(x), rtol=0, atol=2e-4)


def test_log_px_agrees_with_exact_log_px_within_monte_carlo_error():
    lg = make_linear_gaussian(L=2, D=3, seed=6)
    x = lg.sample(4, seed=6)
    guide = _poor_guide(lg, x)
    exact = lg.log_px(x)
    K = 2000
    runs = torch.stack([evaluate.log_px(lg.model, guide, x, num_particles=K, seed=SEED * 100 + s)
                        for s in range(10)]).double()  # [10, N]
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
    # log of an unbiased estimate: biased low by about Var(w)/(2 K p^2), tiny at K=2000
    assert ((mean - exact).abs() < 4 * se + 0.01).all(), (mean, exact, se)
    # a poor proposal with few particles is visibly a lower bound
    few = torch.stack([evaluate.log_px(lg.model, guide, x, num_particles=1, seed=s)
                       for s in range(200)]).double().mean(0)
    assert (few < exact - 0.2).all()


def _log_px_se(lg, guide, x, K, draws=20000):
    """Delta-method standard error of log((1/K) sum_k w_k): sqrt(Var(w) / (K E[w]^2))."""
    lw = objectives.log_weights(lg.model, guide, full_batch(x), draws).total.detach().double()
    w = (lw - lw.max(0).values).exp()
    return (w.var(0) / (K * w.mean(0) ** 2)).sqrt()


def test_log_px_chunking_gives_finite_close_values():
    lg = make_linear_gaussian(L=2, D=3, seed=6)
    x = lg.sample(5, seed=7)
    guide = _poor_guide(lg, x, shift=0.2, stretch=1.3)
    exact = lg.log_px(x)
    K = 600
    se = _log_px_se(lg, guide, x, K)
    whole = evaluate.log_px(lg.model, guide, x, num_particles=K, seed=1, max_rows=2 ** 16)
    chunked = evaluate.log_px(lg.model, guide, x, num_particles=K, seed=1, max_rows=256)
    tiny = evaluate.log_px(lg.model, guide, x, num_particles=K, seed=1, max_rows=11)  # 1 row, 11 particles
    for est in (whole, chunked, tiny):
        assert est.shape == (5,) and torch.isfinite(est).all()
        assert ((est.double() - exact).abs() < 5 * se + 0.01).all(), (est, exact, se)
    assert ((whole - chunked).abs() < 7 * se).all()
    # reseeded: the same call twice gives the same numbers
    again = evaluate.log_px(lg.model, guide, x, num_particles=K, seed=1, max_rows=256)
    assert torch.equal(chunked, again)


def test_log_px_reports_progress():
    lg = make_linear_gaussian()
    x = lg.sample(9)
    seen = []
    evaluate.log_px(lg.model, _poor_guide(lg, x), x, num_particles=40, max_rows=80,
                    progress=seen.append)
    assert sum(seen) == 9


def test_elbo_parts_match_closed_form_rate_and_distortion():
    lg = make_linear_gaussian(seed=2)
    x = lg.sample(5, seed=2)
    loc, scale = lg.optimal_meanfield(x)
    m, s = loc - 0.3, scale * 0.8
    guide = local_guide(m, s)
    parts = evaluate.elbo_parts(lg.model, guide, x, num_particles=20000, seed=SEED, batch_size=2)
    torch.testing.assert_close(parts.elbo, -(parts.rate + parts.distortion))
    # Monte Carlo standard errors of the two parts, from the same kind of draw
    assert ((parts.rate.double() - lg.kl(m, s)).abs() < 0.05).all()
    assert ((parts.distortion.double() + lg.expected_log_lik(x, m, s)).abs() < 0.1).all()


def test_active_units_counts_varying_dimensions():
    torch.manual_seed(0)
    n = 500
    means = torch.zeros(n, 6)
    means[:, 0] = torch.randn(n)  # var 1
    means[:, 2] = torch.randn(n) * 0.3  # var 0.09
    means[:, 3] = 5.0  # constant, not centred
    means[:, 4] = torch.randn(n) * 0.05  # var 0.0025 < 0.01
    means[:, 5] = torch.randn(n) * 0.2  # var 0.04
    assert evaluate.active_units(means) == 3
    assert evaluate.active_units(means, threshold=0.001) == 4
    assert evaluate.active_units(means, threshold=2.0) == 0


def test_posterior_means_are_the_guide_locs():
    lg = make_linear_gaussian()
    x = lg.sample(7)
    loc, scale = lg.optimal_meanfield(x)
    means = evaluate.posterior_means(local_guide(loc, scale, sparse=True), x, batch_size=3)
    torch.testing.assert_close(means.double(), loc, atol=1e-5, rtol=0)


def test_estimate_mean_and_standard_error():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    est = evaluate.Estimate.of(v)
    assert est.mean == pytest.approx(3.0)
    assert est.stderr == pytest.approx(float(v.std()) / 2.0)
    assert evaluate.Estimate.of(torch.tensor([4.0])) == (4.0, 0.0)


def test_evaluate_model_gaps_on_the_linear_gaussian_model():
    """log p(x) - L[q*] = approximation gap >= 0, L[q*] - L[q] = amortization gap >= 0."""
    lg = make_linear_gaussian(L=2, D=3, seed=8)
    x = lg.sample(8, seed=10)
    torch.manual_seed(0)
    amortized = guides.AmortizedNormal(nets.Encoder(3, (8,), 2))  # untrained: a poor q
    s = evaluate.evaluate_model(
        lg.model, amortized, x, num_particles=500, seed=SEED, progress=False,
        local_options=dict(max_steps=800, objective=objectives.AnalyticKLELBO(8)))
    exact = float(lg.log_px(x).mean())
    opt_elbo = float(lg.elbo(x, *lg.optimal_meanfield(x)).mean())
    assert s.log_px.mean == pytest.approx(exact, abs=0.05)
    assert s.elbo_local.mean == pytest.approx(opt_elbo, abs=0.05)
    assert s.approximation_gap.mean == pytest.approx(exact - opt_elbo, abs=0.08)
    assert s.amortization_gap.mean > 0.5  # the untrained encoder is far from q*
    assert s.amortization_gap.mean == pytest.approx(s.elbo_local.mean - s.elbo.mean, abs=1e-6)
    assert s.elbo.mean == pytest.approx(-(s.rate + s.distortion), abs=1e-4)
    assert s.proposal == "local" and s.rows == 8 and s.split == "test"
    assert s.local_family == "diagonal"  # q* in the amortized guide's own (diagonal) family
    assert s.means.shape == (8, 2)
    # eval.json's names: the split's estimates named by it, read back whole
    doc = s.to_json()
    assert doc["test_log_px"] == s.log_px.mean and doc["test_log_px_stderr"] == s.log_px.stderr
    assert doc["approximation_gap"] == s.approximation_gap.mean
    assert evaluate.Scores.from_json(doc) == s


