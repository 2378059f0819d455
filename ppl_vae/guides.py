"""Guides q(z | x): an amortized Normal (encoder network) and a per-datapoint Normal (free table).

Both are mean-field (diagonal Normal) in z; they differ in amortization. Both have the
model's signature ``(batch: Batch) -> None`` and sample the site ``"z"`` inside the same
subsampled ``"data"`` plate.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Batch
from .errors import UserError
from .model import data_plate, register
from .nets import softplus_inv

class AmortizedNormal(nn.Module):
    """q(z | x) = N(mu(x), diag sigma(x)^2) from an encoder network shared by all datapoints."""

    is_local = False

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def loc_scale(self, batch: Batch):
        """(loc [B, L], scale [B, L]) of q(z | x) for the batch's rows."""
        return self.encoder(batch.x)

    def forward(self, batch: Batch) -> None:
        register("encoder", self.encoder)
        with data_plate(batch):
            loc, scale = self.encoder(batch.x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class AmortizedIAF(nn.Module):
    """q(z | x): the amortized Normal pushed through inverse autoregressive flows.

    z = f_T o ... o f_1 (eps), eps ~ N(mu(x), diag sigma(x)^2), each f_t an affine
    autoregressive transform (Kingma et al. 2016; Pyro's ``AffineAutoregressive``, the
    numerically stable variant), so q is no longer mean-field; log q(z | x) follows by the
    change of variables, exactly, for sampled z. ``loc_scale`` gives the base Normal's
    parameters (an approximation of q's mean for warm starts and the 2-D view).
    """

    is_local = False

    def __init__(self, encoder: nn.Module, num_flows: int = 2, hidden: int = 0):
        from pyro.distributions.transforms import affine_autoregressive
        super().__init__()
        self.encoder = encoder
        dim = encoder.latent_dim
        self.flows = nn.ModuleList([affine_autoregressive(dim, [hidden or 2 * dim], stable=True)
                                    for _ in range(num_flows)])

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def loc_scale(self, batch: Batch):
        return self.encoder(batch.x)

    def distribution(self, x: torch.Tensor):
        loc, scale = self.encoder(x)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), list(self.flows))

    def forward(self, batch: Batch) -> None:
        register("encoder", self.encoder)
        register("flows", self.flows)
        with data_plate(batch):
            pyro.sample("z", self.distribution(batch.x))


class LocalNormal(nn.Module):
    """q(z_n) = N(m_n, diag s_n^2) with free parameters for each of N datapoints, no encoder.

    The table ``params`` is [N, 2L] (loc, then softplus^-1 of the scale). Rows are read with
    ``F.embedding``; with ``sparse=True`` its gradient is a sparse tensor holding only the
    batch's rows, so an optimizer for sparse rows (``RowAdam``) touches B rows, not N.
    Use ``sparse=False`` with dense optimizers such as ``pyro.optim.Adam`` inside ``SVI``.

    The table is indexed by ``batch.idx``: the data plate must be the full dataset
    (size N with the batch's indices as ``subsample``). A batch-sized plate would silently
    reuse the first B rows for every minibatch (Pyro issue 238) and is refused.
    """

    is_local = True

    def __init__(self, num_data: int, latent_dim: int, sparse: bool = True,
                 init_scale: float = 1.0):
        super().__init__()
        self.num_data, self.latent_dim, self.sparse = num_data, latent_dim, sparse
        raw = softplus_inv(float(init_scale)).item()
        table = torch.zeros(num_data, 2 * latent_dim)
        table[:, latent_dim:] = raw
        self.params = nn.Parameter(table)

    def loc_scale(self, batch: Batch):
        """(loc [B, L], scale [B, L]) of q(z_n) for the batch's rows."""
        return self.rows(batch.idx)

    def rows(self, idx: torch.Tensor):
        """(loc [B, L], scale [B, L]) of the rows ``idx``."""
        loc, raw = F.embedding(idx, self.params, sparse=self.sparse).chunk(2, dim=-1)
        return loc, F.softplus(raw) + 1e-5

    @torch.no_grad()
    def init_pca(self, x: torch.Tensor, scale: float = 0.5) -> "LocalNormal":
        """Start every row at its image's principal-component scores (unit variance per axis).

        A data-dependent start that involves no encoder: each datapoint gets a distinct,
        informative code from the first step, where N(0, I) rows give the decoder nothing
        to learn from until they have moved.
        """
        centred = x - x.mean(0)
        _, _, v = torch.svd_lowrank(centred, q=self.latent_dim + 10, niter=4)
        scores = centred @ v[:, :self.latent_dim]
        loc = scores / scores.std(0).clamp_min(1e-6)
        self.set_rows(torch.arange(len(x), device=x.device), loc,
                      torch.full_like(loc, scale))
        return self

    @torch.no_grad()
    def set_rows(self, idx: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Overwrite rows ``idx`` with N(loc, scale) (for instance an encoder's output)."""
        raw = softplus_inv((scale - 1e-5).clamp_min(1e-6))
        self.params[idx] = torch.cat([loc, raw], dim=-1)

    def forward(self, batch: Batch) -> None:
        if batch.num_data != self.num_data:
            raise UserError(
                f"LocalNormal holds {self.num_data} rows but the data plate has size "
                f"{batch.num_data}; declare the plate with the full dataset size and the "
                f"batch's dataset indices as subsample (Batch(x, idx, num_data={self.num_data}))")
        register("local", self)
        with data_plate(batch):
            loc, scale = self.rows(batch.idx)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
