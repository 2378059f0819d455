"""Optimizers: Adam for the networks, row-wise Adam for per-datapoint tables.

Plain Adam over an N x 2L table does O(N) work per step and, because a row outside the
batch has gradient zero (not absent), its momentum keeps moving it. ``RowAdam`` reads the
sparse gradient that ``F.embedding(..., sparse=True)`` produces and updates only the rows in
it, each with its own step count, so a row's bias correction reflects how often *it* was
updated. Cost per step is O(B).
"""
from __future__ import annotations

import math
from typing import Iterable, List, NamedTuple, Optional

import torch

from .errors import UserError, setting
from .protocol import as_guide
from .objectives import traces


class RowAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba 2015) applied row by row to the rows present in a sparse gradient."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of the rows in each gradient. Like fused Adam under a ``GradScaler``,
        it reads ``self.found_inf`` (a 0-dim tensor, or None): where it is non-zero, the
        rows, their moments and step counts stay as they were, with no host sync."""
        skip = getattr(self, "found_inf", None)
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
                # the rows (distinct, after coalescing) gathered once, updated, written back
                old = (p[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows],
                       state["steps"][rows])
                steps = old[3] + 1
                t = steps.unsqueeze(-1)  # [R, 1]
                m = old[1].lerp(values, 1 - beta1)
                v = old[2].mul(beta2).addcmul_(values, values, value=1 - beta2)
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                new = (old[0] - group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]), m, v,
                       steps)
                if skip is not None:  # a bad step: every row as it was, decided on the device
                    bad = skip.reshape(()) > 0
                    new = tuple(torch.where(bad, o, n) for o, n in zip(old, new))
                for target, value in zip((p, state["exp_avg"], state["exp_avg_sq"],
                                          state["steps"]), new):
                    target[rows] = value


def save_rows(optimizer: RowAdam, p: torch.Tensor, rows: torch.Tensor) -> dict:
    """Copies of rows ``rows`` of ``p`` and of its RowAdam state, for ``restore_rows``."""
    saved = {"param": p.detach()[rows].clone()}
    for key, value in optimizer.state.get(p, {}).items():
        saved[key] = value[rows].clone()
    return saved


@torch.no_grad()
def restore_rows(optimizer: RowAdam, p: torch.Tensor, rows: torch.Tensor, saved: dict,
                 where: Optional[torch.Tensor] = None) -> None:
    """Put back what ``save_rows`` copied (state created since then is reset for those rows);
    with ``where`` (a 0-dim tensor) only if it is non-zero, decided on the device."""
    def put(x, before):
        x[rows] = before if where is None else torch.where(where.reshape(()) > 0, before, x[rows])
    put(p, saved["param"])
    for key, value in optimizer.state.get(p, {}).items():
        put(value, saved[key] if key in saved else torch.zeros_like(value[rows]))


class Optimizers(NamedTuple):
    """The optimizers of one run: networks (``global_``) and, for a guide with per-datapoint
    tables, a row-wise optimizer of those tables."""

    global_: Optional[torch.optim.Optimizer]
    local: Optional[torch.optim.Optimizer] = None
    inner_steps: int = 0  # local-only steps per minibatch before the joint step
    sync: Optional[object] = None  # distributed.GradSync under torchrun: sums network gradients

    def networks(self) -> List[torch.Tensor]:
        """The parameters of the networks (the global optimizer's)."""
        if self.global_ is None:
            return []
        return [p for group in self.global_.param_groups for p in group["params"]]

    def skips_on_device(self) -> bool:
        """True when every optimizer can skip a step on a device-side flag (fused Adam,
        ``RowAdam``), so the divergence guard needs no host sync."""
        return all(isinstance(o, RowAdam) or o.defaults.get("fused") for o in self.all())

    def set_found_inf(self, found: Optional[torch.Tensor]) -> None:
        """Hand the step's found-non-finite flag to every optimizer (None: no guard)."""
        for o in self.all():
            o.found_inf = found

    def all(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.global_, self.local) if o is not None]

    def tables(self) -> List[torch.Tensor]:
        """The per-datapoint tables (the local optimizer's parameters)."""
        if self.local is None:
            return []
        return [p for group in self.local.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for o in self.all():
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.all():
            o.step()


def check_adam_eps(eps: float, dtype: torch.dtype = torch.float32) -> None:
    """Refuse an Adam epsilon that vanishes in the parameters' precision: below the smallest
    normal number of ``dtype`` (float32: 1.2e-38) it is flushed or rounded to zero where
    the update is computed, and a parameter whose gradient is exactly zero (a weight of a
    pixel that is 0 in every image) gets 0 / 0 = NaN at the first step. ``Config.validate``
    asks this of ``adam_eps``."""
    tiny = float(torch.finfo(dtype).tiny)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= tiny):
        raise UserError(f"{setting('adam_eps')} {eps:g} is not a positive number of at least "
                        f"{tiny:.2g} (the smallest normal {str(dtype).replace('torch.', '')}): "
                        f"a smaller one vanishes and Adam divides 0 by 0 for parameters whose "
                        f"gradient is 0; use a value such as 1e-8 (the default)")


def adam(params, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam with its fused kernel (one pass over all parameters; CPU and CUDA);
    ``check_adam_eps`` refuses an ``eps`` the parameters' precision cannot hold."""
    params = list(params)
    for dtype in {p.dtype for p in params if torch.is_tensor(p) and p.is_floating_point()}:
        check_adam_eps(eps, dtype)
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)


def trainable(module_or_fn, batch=None) -> List[torch.Tensor]:
    """The parameters of a model or guide: an ``nn.Module``'s, plus those a program keeps in
    Pyro's param store (a hand-written guide's ``pyro.param``s), found by running it once on
    ``batch`` (which also creates the lazy parameters of Pyro's autoguides)."""
    if batch is not None:
        import pyro
        from pyro import poutine
        with torch.no_grad():
            traces(lambda b: None, module_or_fn, batch, 1)  # creates lazy parameters
        tr = poutine.trace(module_or_fn, param_only=True).get_trace(batch)
        store = pyro.get_param_store()
        in_store = [store._params[name] for name, site in tr.nodes.items()
                    if site["type"] == "param" and name in store._params]
    else:
        in_store = []
    own = list(module_or_fn.parameters()) if hasattr(module_or_fn, "parameters") else []
    seen, out = set(), []
    for p in own + in_store:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def make_optimizers(model, guide, lr: float, local_lr: float = 0.2, inner_steps: int = 1,
                    batch=None, eps: float = 1e-8) -> Optimizers:
    """Adam(lr) for the model's and the guide's networks; RowAdam(local_lr) for the guide's
    per-datapoint tables (``local_parameters()``), when it has any.

    ``batch`` is needed for a guide that is not an ``nn.Module`` or creates its parameters
    lazily (a hand-written guide, Pyro's autoguides): it is run once to find them. The
    defaults for a per-datapoint table are ``Config``'s (see experiments/README.md).
    """
    guide = as_guide(guide)
    tables = list(guide.local_parameters())
    table_ids = {id(t) for t in tables}
    params = trainable(model) + [p for p in trainable(guide, batch) if id(p) not in table_ids]
    if not params and not tables:
        raise ValueError("neither model nor guide has parameters to train; a guide that keeps "
                         "its parameters in Pyro's param store needs make_optimizers(..., batch=)")
    global_ = adam(params, lr, eps) if params else None
    if not tables:
        return Optimizers(global_, None, 0)
    if not local_lr > 0:
        raise ValueError(f"a per-datapoint guide needs local_lr > 0, got {local_lr}")
    return Optimizers(global_, RowAdam(tables, lr=local_lr), inner_steps)
