"""Optimizers: Adam for the networks, row-wise Adam for per-datapoint tables.

Plain Adam over an N x 2L table does O(N) work per step and, because a row outside the
batch has gradient zero (not absent), its momentum keeps moving it. ``RowAdam`` reads the
sparse gradient that ``F.embedding(..., sparse=True)`` produces and updates only the rows in
it, each with its own step count, so a row's bias correction reflects how often *it* was
updated. Cost per step is O(B).
"""
from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional

import torch


class RowAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba 2015) applied row by row to the rows present in a sparse gradient."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:  # a dense gradient: every row is present
                    rows, values = torch.arange(p.shape[0], device=p.device), grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["steps"] = torch.zeros(p.shape[0], device=p.device, dtype=p.dtype)
                steps = state["steps"].index_add_(0, rows, torch.ones_like(rows, dtype=p.dtype))
                t = steps[rows].unsqueeze(-1)  # [R, 1]
                m = state["exp_avg"][rows].lerp_(values, 1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                p[rows] = p[rows] - group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def save_rows(optimizer: RowAdam, p: torch.Tensor, rows: torch.Tensor) -> dict:
    """Copies of rows ``rows`` of ``p`` and of its RowAdam state, for ``restore_rows``."""
    saved = {"param": p.detach()[rows].clone()}
    for key, value in optimizer.state.get(p, {}).items():
        saved[key] = value[rows].clone()
    return saved


@torch.no_grad()
def restore_rows(optimizer: RowAdam, p: torch.Tensor, rows: torch.Tensor, saved: dict) -> None:
    """Put back what ``save_rows`` copied (state created since then is reset for those rows)."""
    p[rows] = saved["param"]
    for key, value in optimizer.state.get(p, {}).items():
        value[rows] = saved[key] if key in saved else 0


class Optimizers(NamedTuple):
    """The optimizers of one run: networks (``global_``) and, for a local guide, its table."""

    global_: Optional[torch.optim.Optimizer]
    local: Optional[torch.optim.Optimizer] = None
    inner_steps: int = 0  # local-only steps per minibatch before the joint step

    def all(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.global_, self.local) if o is not None]

    def zero_grad(self) -> None:
        for o in self.all():
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.all():
            o.step()


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (one pass over all parameters; CPU and CUDA)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def make_optimizers(model, guide, lr: float, local_lr: float = 0.2,
                    inner_steps: int = 1) -> Optimizers:
    """Adam(lr) for the model's and an amortized guide's networks; RowAdam(local_lr) for a table.

    The defaults for a per-datapoint table are ``Config``'s (see experiments/README.md).
    """
    if getattr(guide, "is_local", False):
        if not local_lr > 0:
            raise ValueError(f"a per-datapoint guide needs local_lr > 0, got {local_lr}")
        params = [p for p in model.parameters() if p.requires_grad]
        local = RowAdam([guide.params], lr=local_lr)
        return Optimizers(adam(params, lr), local, inner_steps)
    params = [p for m in (model, guide) for p in m.parameters() if p.requires_grad]
    return Optimizers(adam(params, lr), None, 0)
