"""The generative program: z ~ p(z), x ~ p(x | decoder(z)), over a subsampled data plate.

Sites are named ``"z"`` and ``"x"``, and the plate ``"data"`` is declared with the size of
the whole dataset and the minibatch's row indices as ``subsample``, so Pyro scales every
log-density by N / B. Model and guide share one signature: ``(batch: Batch) -> None``.
"""
from __future__ import annotations

import pyro
import torch.nn as nn

from .data import Batch
from .likelihoods import Likelihood


def data_plate(batch: Batch) -> pyro.plate:
    """The ``"data"`` plate of size N, subsampled to the batch's rows."""
    return pyro.plate("data", batch.num_data, subsample=batch.idx)


def register(name: str, module: nn.Module) -> None:
    """``pyro.module`` for modules that have parameters (so SVI with pyro.optim trains them)."""
    if any(True for _ in module.parameters()):
        pyro.module(name, module)


class VAEModel(nn.Module):
    """p(x, z) = p(z) p(x | decoder(z)) for every row of the batch."""

    def __init__(self, decoder: nn.Module, likelihood: Likelihood, prior: nn.Module):
        super().__init__()
        self.decoder, self.likelihood, self.prior = decoder, likelihood, prior

    @property
    def latent_dim(self) -> int:
        return self.decoder.latent_dim

    def forward(self, batch: Batch) -> None:
        register("decoder", self.decoder)
        register("likelihood", self.likelihood)
        register("prior", self.prior)
        with data_plate(batch):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=batch.x)
