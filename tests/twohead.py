"""A user's guide with one encoder built of pieces (ppl_vae.compute's tests): a shared body
and two linear heads, loc and scale, of the built-in encoder's sizes (D-H-(L, L) against
D-H-2L), so a step computes what the built-in amortized guide's does."""
from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import nn

from ppl_vae.model import data_plate


class TwoHeadGuide(nn.Module):
    def __init__(self, data_dim: int, hidden: int, latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU())
        self.loc = nn.Linear(hidden, latent_dim)
        self.scale = nn.Linear(hidden, latent_dim)

    @classmethod
    def from_config(cls, config, data_dim, **context):
        return cls(data_dim, config.hidden[-1], config.latent_dim)

    def forward(self, batch) -> None:
        pyro.module("two_head", self)
        with data_plate(batch):
            h = self.body(batch.x)
            scale = nn.functional.softplus(self.scale(h)) + 1e-5
            pyro.sample("z", dist.Normal(self.loc(h), scale).to_event(1))
