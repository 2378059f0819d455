"""Plain torch networks; no Pyro here."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def softplus_inv(y: torch.Tensor) -> torch.Tensor:
    """The inverse of softplus: x with log(1 + exp(x)) = y, for y > 0 (stable for small y)."""
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    return y + torch.log(-torch.expm1(-y))


def mlp(sizes: Sequence[int], activation=nn.ReLU) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """z [..., L] -> decoder output [..., out_dim] (logits, means, ... as the likelihood reads it)."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], out_dim: int, activation=nn.ReLU):
        super().__init__()
        self.latent_dim, self.out_dim = latent_dim, out_dim
        self.net = mlp([latent_dim, *hidden, out_dim], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Encoder(nn.Module):
    """x [B, D] -> (loc [B, L], scale [B, L]) of a diagonal Normal."""

    def __init__(self, in_dim: int, hidden: Sequence[int], latent_dim: int, activation=nn.ReLU):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp([in_dim, *hidden, 2 * latent_dim], activation)

    def forward(self, x: torch.Tensor):
        loc, raw = self.net(x).chunk(2, dim=-1)
        return loc, F.softplus(raw) + 1e-5
