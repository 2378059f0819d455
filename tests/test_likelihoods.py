"""ppl_vae.likelihoods: each likelihood's log-density against its formula, and ``check``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ppl_vae import likelihoods
from ppl_vae.errors import UserError


def test_bernoulli_log_density_matches_formula():
    torch.manual_seed(0)
    out = torch.randn(4, 7) * 3
    x = (torch.rand(4, 7) < 0.5).float()
    d = likelihoods.Bernoulli()(out)
    assert d.event_shape == (7,) and d.batch_shape == (4,)
    # log Bernoulli(x; sigmoid(a)) = x a - log(1 + e^a)
    expected = (x.double() * out.double() - F.softplus(out.double())).sum(-1)
    torch.testing.assert_close(d.log_prob(x).double(), expected, rtol=0, atol=1e-5)
    # the mean image is sigmoid(out)
    torch.testing.assert_close(d.mean, torch.sigmoid(out))


def _log_cb_normalizer(lam: torch.Tensor) -> torch.Tensor:
    """log C(lambda), C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), C(1/2) = 2 (float64)."""
    u = (1 - 2 * lam).double()
    small = u.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(u), u)
    ratio = torch.where(small, 1 + u ** 2 / 3, torch.atanh(safe) / safe)
    return math.log(2.0) + torch.log(ratio)


def test_continuous_bernoulli_normalizer_closed_form():
    lam = torch.tensor([0.01, 0.2, 0.45, 0.499, 0.4999, 0.5, 0.5001, 0.501, 0.6, 0.9, 0.99],
                       dtype=torch.float64)
    logits = torch.log(lam) - torch.log1p(-lam)
    x = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    for xi in x:
        got = likelihoods.ContinuousBernoulli()(logits[None].float()).base_dist.log_prob(
            xi.float().expand(len(lam))[None])[0].double()
        expected = xi * torch.log(lam) + (1 - xi) * torch.log1p(-lam) + _log_cb_normalizer(lam)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    # C(1/2) = 2 exactly: at lambda = 1/2 the density is uniform, log p(x) = 0 for every x
    d = likelihoods.ContinuousBernoulli()(torch.zeros(1, 5))
    torch.testing.assert_close(d.log_prob(torch.rand(1, 5)), torch.zeros(1), atol=1e-5, rtol=0)


def test_continuous_bernoulli_normalizer_values():
    # closed-form values: C(0.5) = 2, and for lambda = 0.25: 2 atanh(0.5) / 0.5 = 4 atanh(0.5)
    assert float(_log_cb_normalizer(torch.tensor(0.5))) == pytest.approx(math.log(2))
    assert float(_log_cb_normalizer(torch.tensor(0.25))) == pytest.approx(math.log(4 * math.atanh(0.5)))
    lam = torch.tensor([0.25, 0.5, 0.5 + 1e-4])
    logits = (lam.log() - (-lam).log1p())[None]
    d = likelihoods.ContinuousBernoulli()(logits)
    # log p(x=1) - log lambda = log C(lambda)
    got = d.base_dist.log_prob(torch.ones(1, 3))[0].double() - lam.double().log()
    torch.testing.assert_close(got, _log_cb_normalizer(lam.double()), atol=2e-4, rtol=0)


@pytest.mark.parametrize("logit", [-4.0, -0.7, 0.0, 1e-4, 0.3, 2.5])
def test_continuous_bernoulli_integrates_to_one(logit):
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    d = likelihoods.ContinuousBernoulli()(torch.full((1, 1), logit))
    dens = d.base_dist.log_prob(grid[:, None, None].float()).double().exp().reshape(-1)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)


def test_normal_log_density_with_learned_scale():
    torch.manual_seed(0)
    D = 6
    lik = likelihoods.Normal(D, shared=False)
    assert lik.raw_scale.shape == (D,)
    torch.testing.assert_close(lik.scale, torch.full((D,), 0.2))  # init_scale
    with torch.no_grad():
        lik.raw_scale.copy_(torch.linspace(-3, 1, D))
    out, x = torch.randn(3, D), torch.rand(3, D)
    sigma = F.softplus(torch.linspace(-3, 1, D)).double() + 0.01
    mu = torch.sigmoid(out.double())
    expected = (-0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(lik(out).log_prob(x).double(), expected, rtol=0, atol=1e-5)


def test_normal_shared_scale_and_its_maximum_likelihood():
    """Shared sigma: d/dsigma sum log N = 0 at sigma^2 = mean squared residual."""
    torch.manual_seed(1)
    D = 10
    lik = likelihoods.Normal(D, shared=True, min_scale=0.01)
    assert lik.raw_scale.shape == (1,)
    out, x = torch.randn(8, D), torch.rand(8, D)
    resid2 = ((x - torch.sigmoid(out)) ** 2).mean()
    sigma_hat = resid2.sqrt()
    with torch.no_grad():  # raw = softplus^-1(sigma_hat - min_scale)
        lik.raw_scale.fill_(float(torch.log(torch.expm1(sigma_hat - 0.01))))
    torch.testing.assert_close(lik.scale, sigma_hat.reshape(1), atol=1e-6, rtol=0)
    loss = -lik(out).log_prob(x).sum()
    (g,) = torch.autograd.grad(loss, [lik.raw_scale])
    assert abs(float(g)) < 1e-3
    # and away from it the gradient points towards it
    with torch.no_grad():
        lik.raw_scale.add_(0.5)
    (g,) = torch.autograd.grad(-lik(out).log_prob(x).sum(), [lik.raw_scale])
    assert float(g) > 0


def test_normal_scale_bounded_below():
    lik = likelihoods.Normal(4, min_scale=0.05)
    with torch.no_grad():
        lik.raw_scale.fill_(-200.0)
    assert torch.all(lik.scale >= 0.05) and torch.allclose(lik.scale, torch.full((4,), 0.05))
    # hence a finite density even for a pixel exactly at the mean
    assert torch.isfinite(lik(torch.zeros(1, 4)).log_prob(torch.full((1, 4), 0.5))).all()


def test_bernoulli_check_refuses_grayscale_naming_the_fix():
    with pytest.raises(UserError) as e:
        likelihoods.Bernoulli().check(torch.tensor([[0.0, 0.3, 1.0]]))
    msg = str(e.value)
    assert "--binarize" in msg and "continuous_bernoulli" in msg and "\n" not in msg
    likelihoods.Bernoulli().check(torch.tensor([[0.0, 1.0, 1.0]]))  # binary passes


@pytest.mark.parametrize("lik", [likelihoods.Bernoulli(), likelihoods.ContinuousBernoulli(),
                                 likelihoods.Normal(3)])
def test_check_refuses_out_of_range(lik):
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        lik.check(torch.tensor([[0.0, 1.5, 1.0]]))
    with pytest.raises(UserError):
        lik.check(torch.tensor([[-0.1, 0.5, 1.0]]))


def test_grayscale_accepted_by_continuous_likelihoods():
    x = torch.tensor([[0.0, 0.3, 1.0]])
    likelihoods.ContinuousBernoulli().check(x)
    likelihoods.Normal(3).check(x)
