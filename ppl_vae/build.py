"""A ``Config`` to the objects of a run: the model, the guide, the objective, the rate schedule.

Each builder takes the piece named by a setting from its table in ``registry`` and seeds it
where the numbers depend on it (the decoder from ``config.seed``, the guide from
``config.seed + 1``); ``build_guide`` and ``build_objective`` apply ``config.compile``
(``compiled``). The device a setting names is ``distributed.resolve_device``.

Layering: above ``config``, ``registry`` and the pieces' modules (``model``, ``compiled``);
imported by the modules that run things (``run``, ``compute``) and by scripts and tests, never
by ``config`` or ``registry``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .compiled import Auto, Compiled, check_compilable
from .config import Config
from .data import Shape
from .model import VAEModel
from .protocol import as_guide
from .registry import GUIDES, LIKELIHOODS, LR_SCHEDULES, OBJECTIVES, PRIORS, decoder


def build_model(config: Config, data_dim: int, shape: Optional[Shape] = None):
    """The generative model: prior, decoder (``config.net``; conv nets need the image ``shape``
    (C, H, W), inferred from ``data_dim`` when None) and likelihood, seeded by ``config.seed``."""
    torch.manual_seed(config.seed)  # same decoder initialization for every guide
    return VAEModel(decoder(config, data_dim, shape),
                    LIKELIHOODS.build(config, data_dim=data_dim), PRIORS.build(config))


def build_guide(config: Config, data_dim: int, num_data: int, x=None, model=None,
                shape: Optional[Shape] = None, rank: int = 0, world_size: int = 1):
    """The guide named by ``config.guide``; initialized from its own seed stream.

    A per-datapoint guide with ``local_init="pca"`` starts from the principal-component
    scores of the (grayscale) training rows ``x``; without ``x`` it starts at N(0, I).
    A semi-amortized guide refines against ``model``. Under torchrun a builder that takes
    ``rank`` and ``world_size`` allocates only that process's rows of a per-datapoint table
    (any other guide is cut down afterwards by its ``shard``). The guide is adapted here, once
    (``protocol.as_guide``): a user's answers what the pipeline asks with the defaults.
    """
    torch.manual_seed(config.seed + 1)
    guide = as_guide(GUIDES.build(config, data_dim=data_dim, num_data=num_data, x=x,
                                  model=model, shape=shape, rank=rank, world_size=world_size))
    if config.compile == "on":
        check_compilable(guide)
    return guide


def build_objective(config: Config):
    objective = OBJECTIVES.build(config)
    if config.compile == "off":
        return objective
    return Compiled(objective, auto=Auto(config.epochs, config.max_seconds, config.batch_size,
                                         config.max_steps)
                    if config.compile == "auto" else None)


def lr_factor(config: Config):
    """``epoch -> learning-rate factor`` of ``config.lr_schedule``, or None for a constant rate."""
    return LR_SCHEDULES.build(config)
