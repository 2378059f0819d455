"""Plain torch networks (MLP and convolutional encoders and decoders); no Pyro here."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def softplus_inv(y: torch.Tensor) -> torch.Tensor:
    """The inverse of softplus: x with log(1 + exp(x)) = y, for y > 0 (stable for small y)."""
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    return y + torch.log(-torch.expm1(-y))


MIN_SCALE = 1e-5  # the smallest standard deviation a guide's scale map gives


def to_scale(raw: torch.Tensor) -> torch.Tensor:
    """A guide's standard deviation from its unconstrained parameter: softplus(raw) + 1e-5."""
    return F.softplus(raw) + MIN_SCALE


def from_scale(scale: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_scale`` (scales at or below the floor map to its edge)."""
    return softplus_inv((scale - MIN_SCALE).clamp_min(1e-6))


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
        return loc, to_scale(raw)


def conv_sizes(height: int, width: int, max_layers: int = 3):
    """Spatial sizes after each stride-2 convolution (kernel 3, padding 1: s -> ceil(s / 2)),
    halving while both sides are at least 8, at most ``max_layers`` times."""
    sizes = [(height, width)]
    while len(sizes) <= max_layers and min(sizes[-1]) >= 8:
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


class ConvEncoder(nn.Module):
    """x [B, C*H*W] -> (loc [B, L], scale [B, L]): stride-2 3x3 convolutions, then an MLP.

    Built from the image ``shape`` (C, H, W); any size with sides of at least 1 works (small
    sides get fewer convolutions). ``hidden`` sizes the dense layers after the convolutions;
    ``activation`` follows every convolution and hidden layer.
    """

    def __init__(self, shape, hidden: Sequence[int], latent_dim: int,
                 channels: Sequence[int] = (32, 64, 64), activation=nn.ReLU):
        super().__init__()
        self.shape, self.latent_dim = tuple(shape), latent_dim
        c, h, w = self.shape
        self.sizes = conv_sizes(h, w, len(channels))
        chans = [c, *channels[:len(self.sizes) - 1]]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), activation()]
        self.conv = nn.Sequential(*layers)
        flat = chans[-1] * self.sizes[-1][0] * self.sizes[-1][1]
        self.head = mlp([flat, *hidden, 2 * latent_dim], activation)

    def forward(self, x: torch.Tensor):
        h = self.conv(x.reshape(-1, *self.shape)).flatten(1)
        loc, raw = self.head(h).reshape(*x.shape[:-1], -1).chunk(2, dim=-1)
        return loc, to_scale(raw)


class ConvDecoder(nn.Module):
    """z [..., L] -> decoder output [..., C*H*W]: an MLP, then stride-2 transposed convolutions
    that retrace the encoder's sizes exactly (output padding per side), so any (C, H, W) fits.
    Extra leading dimensions (particles) are folded into the batch and restored;
    ``activation`` follows every hidden layer and all but the last transposed convolution."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], shape,
                 channels: Sequence[int] = (32, 64, 64), activation=nn.ReLU):
        super().__init__()
        self.shape, self.latent_dim = tuple(shape), latent_dim
        c, h, w = self.shape
        self.out_dim = c * h * w
        self.sizes = conv_sizes(h, w, len(channels))
        chans = [c, *channels[:len(self.sizes) - 1]]
        self.start = (chans[-1], *self.sizes[-1])
        self.head = mlp([latent_dim, *hidden, chans[-1] * self.sizes[-1][0] * self.sizes[-1][1]],
                        activation)
        layers = []
        for i in range(len(self.sizes) - 1, 0, -1):  # from the smallest size back up
            th, tw = self.sizes[i - 1]
            pad = (1 - th % 2, 1 - tw % 2)  # ceil(t/2) -> t: 2 ceil(t/2) - 1 + pad = t
            layers += [activation(), nn.ConvTranspose2d(chans[i], chans[i - 1], 3, stride=2,
                                                     padding=1, output_padding=pad)]
        self.deconv = nn.Sequential(*layers)
        if not layers:  # an image too small to convolve: the MLP alone
            self.deconv = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z.reshape(-1, self.latent_dim)).reshape(-1, *self.start)
        return self.deconv(h).reshape(*z.shape[:-1], self.out_dim)
