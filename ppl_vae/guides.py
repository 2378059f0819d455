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

SOFTPLUS_INV_1 = 0.5413248546129181  # softplus^-1(1): a unit scale


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
        raw = torch.tensor(float(init_scale)).expm1().log().item()
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
    def set_rows(self, idx: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Overwrite rows ``idx`` with N(loc, scale) (for instance an encoder's output)."""
        raw = (scale - 1e-5).clamp_min(1e-6)
        raw = raw + torch.log(-torch.expm1(-raw))  # softplus^-1
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
