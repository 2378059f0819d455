"""ppl_vae.priors: the standard Normal and the mixture of Gaussians prior."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ppl_vae import priors


def test_mixture_prior_initialization():
    p = priors.MixtureOfGaussians(4, num_components=10, seed=0)
    torch.testing.assert_close(F.softplus(p.raw_scales) + 1e-4, torch.ones(10, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.softmax(p.logits, 0), torch.full((10,), 0.1))
    assert torch.equal(p.locs, priors.MixtureOfGaussians(4, seed=0).locs)
    assert not torch.equal(p.locs, priors.MixtureOfGaussians(4, seed=1).locs)
    d = p()
    assert d.event_shape == (4,) and d.batch_shape == ()


def test_standard_normal_prior():
    d = priors.StandardNormal(3)()
    z = torch.randn(5, 3)
    torch.testing.assert_close(d.log_prob(z), torch.distributions.Normal(0, 1).log_prob(z).sum(-1))
