"""ppl_vae.build: every combination of guide, likelihood, objective and prior the CLI offers
builds, trains for one epoch at toy size and gives finite numbers."""
from __future__ import annotations

import itertools
import math
from typing import get_args

import pytest

from ppl_vae import config as cfg
from ppl_vae.run import fit_run


COMBINATIONS = [
    c for c in itertools.product(get_args(cfg.GuideName), get_args(cfg.LikelihoodName),
                                 get_args(cfg.ObjectiveName), get_args(cfg.PriorName),
                                 [False, True])
    if not (c[4] and (c[2] != "iwae" or c[0] == "iaf"))  # DReG: IWAE with a Normal guide only
]


@pytest.mark.parametrize("guide,likelihood,objective,prior,dreg", COMBINATIONS,
                         ids=["-".join(map(str, c)) for c in COMBINATIONS])
def test_every_combination_trains_one_epoch(guide, likelihood, objective, prior, dreg,
                                            cached_mnist):
    config = cfg.Config(guide=guide, likelihood=likelihood, objective=objective, prior=prior,
                        dreg=dreg, num_particles=1 if objective != "iwae" else 3,
                        binarize="dynamic" if likelihood == "bernoulli" else "none",
                        epochs=1, batch_size=32, train_size=64, valid_size=8, test_size=8,
                        hidden=(8,), latent_dim=2, device="cpu")
    trained = fit_run(config, None, progress=False, log=lambda _m: None)
    (metrics,) = trained.history
    assert math.isfinite(metrics.train_elbo) and math.isfinite(metrics.valid_elbo)
    assert metrics.steps == 2
