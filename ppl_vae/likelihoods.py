"""Likelihoods: decoder output -> a distribution over the pixels of one image.

A likelihood is an ``nn.Module`` with one signature, ``likelihood(out) -> Distribution``
whose event is the whole image (``event_shape == [D]``), and a ``check(x)`` that refuses
data outside its support with a message that names the fix. A new likelihood is one class.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError, setting
from .nets import softplus_inv


class Likelihood(nn.Module):
    """Base class: subclasses implement ``forward(out) -> Distribution`` with event_shape [D]."""

    binary_data = False  # whether the data must be 0/1

    def check(self, x: torch.Tensor) -> None:
        """Raise ``UserError`` if ``x`` is outside this likelihood's support."""
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise UserError(f"{type(self).__name__} likelihood needs pixels in [0, 1]; "
                            f"the data range over [{lo:g}, {hi:g}]")


class Bernoulli(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(out_d)); for binarized images."""

    binary_data = True

    def forward(self, out: torch.Tensor):
        return dist.Bernoulli(logits=out).to_event(1)

    def check(self, x: torch.Tensor) -> None:
        """Grayscale values are refused: a Bernoulli does not normalize over [0, 1]."""
        super().check(x)
        if bool(((x != 0) & (x != 1)).any()):
            raise UserError(f"the Bernoulli likelihood needs binary pixels but the data are "
                            f"grayscale; use {setting('binarize')} dynamic (or static), or "
                            f"{setting('likelihood')} continuous_bernoulli for grayscale data")


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli on [0, 1] (Loaiza-Ganem & Cunningham 2019); for grayscale images.

    log p(x|lambda) = x log lambda + (1-x) log(1-lambda) + log C(lambda), with the normalizer
    C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), and C(1/2) = 2.
    """

    def forward(self, out: torch.Tensor):
        return dist.ContinuousBernoulli(logits=out).to_event(1)


class Normal(Likelihood):
    """p(x|z) = prod_d N(x_d; sigmoid(out_d), sigma_d) with a learned scale.

    ``shared=True`` learns one sigma for all pixels, else one per pixel. The scale is
    bounded below by ``min_scale``: constant pixels (MNIST's borders) would otherwise drive
    it to zero and the density to infinity.
    """

    def __init__(self, out_dim: int, shared: bool = False, min_scale: float = 0.01,
                 init_scale: float = 0.2):
        super().__init__()
        self.min_scale = min_scale
        raw = softplus_inv(init_scale - min_scale)
        self.raw_scale = nn.Parameter(raw.expand(1 if shared else out_dim).clone())

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale) + self.min_scale

    def forward(self, out: torch.Tensor):
        loc = torch.sigmoid(out)
        return dist.Normal(loc, self.scale.expand(loc.shape)).to_event(1)
