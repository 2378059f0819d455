"""The generative program: z ~ p(z), x ~ p(x | decoder(z)), over a subsampled data plate.

Sites are named ``"z"`` and ``"x"``, and the plate ``"data"`` is declared with the size of
the whole dataset and the minibatch's row indices as ``subsample``, so Pyro scales every
log-density by N / B. Model and guide share one signature: ``(batch: Batch) -> None``.

The model observes ``batch.x``; ``posterior_predictive`` runs it with ``x`` unobserved
(``poutine.uncondition``) under Pyro's ``Predictive``, so ``x`` is drawn from p(x | z) with
z from the guide: new images like each row of the batch.
"""
from __future__ import annotations

from typing import Dict

import pyro
import torch
import torch.nn as nn
from pyro import poutine
from pyro.infer import Predictive

from .batching import Batch
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


def posterior_predictive(model: VAEModel, guide, batch: Batch, num_samples: int = 1,
                         means: bool = False) -> Dict[str, torch.Tensor]:
    """Draws of Pyro's ``Predictive`` with ``x`` left unobserved: ``{"z": [S, B, L], "x":
    [S, B, D]}``, z ~ q(z | row) and x ~ p(x | z) for every row of ``batch`` (``means``: the
    likelihood's mean image instead of a draw of x, what the figures show)."""
    sites = ("z", "x")
    with torch.no_grad():
        draws = Predictive(poutine.uncondition(model), guide=guide, num_samples=num_samples,
                           return_sites=sites)(batch)
    if means:
        draws["x"] = model.likelihood(model.decoder(draws["z"])).mean
    return {k: draws[k].reshape(num_samples, len(batch.idx), -1) for k in sites}
