"""Priors p(z): ``prior() -> Distribution`` with event_shape [L] and empty batch shape."""
from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from .nets import softplus_inv


class StandardNormal(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("zeros", torch.zeros(latent_dim))
        self.register_buffer("ones", torch.ones(latent_dim))

    def forward(self):
        return dist.Normal(self.zeros, self.ones).to_event(1)


class MixtureOfGaussians(nn.Module):
    """A learned prior p(z) = sum_c pi_c N(z; mu_c, diag sigma_c^2).

    Its components start spread out (mu_c ~ N(0, I)) with unit scales and equal weights.
    """

    def __init__(self, latent_dim: int, num_components: int = 10, seed: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim, generator=g))
        self.raw_scales = nn.Parameter(softplus_inv(torch.ones(num_components, latent_dim)))

    def forward(self):
        components = dist.Normal(self.locs, F.softplus(self.raw_scales) + 1e-4).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)
