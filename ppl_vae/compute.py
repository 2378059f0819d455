"""What a training step costs, counted: network passes per optimizer step, a budget in them,
and how far a per-datapoint guide's table rows are from a local optimum.

A network pass is one evaluation of a network (the model's decoder, each network of the
guide) forward or backward over one minibatch of rows. ``step_cost`` does not look the
guide up in a table: it builds the run's pieces on one minibatch, takes one real optimizer
step with hooks on the networks and counts what ran (``StepCost``). A forward pass over
[K, B] rows (K particles) counts K; a backward pass is counted each time a gradient flows
back through a forward pass's output, so differentiating through a refinement's gradient
steps (a semi-amortized guide, second order) counts those passes again.

Reference for the unit: Kim et al. (2018) compare SA-VAE with the VAE at equal epochs and
note its cost per step; here a budget is a count of passes, equal for every guide.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from . import data, guides
from .config import GUIDES, OBJECTIVES, Config, build_model
from .errors import UserError, setting
from .rng import seeded


# ---------------------------------------------------------------------------------------
# counting the passes of one step
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCost:
    """Network passes of one optimizer step on a full minibatch, per network (in units of
    one pass over the batch's rows): ``forward`` and ``backward``."""

    forward: Dict[str, float]
    backward: Dict[str, float]

    @property
    def passes(self) -> float:
        """Forward plus backward passes of every network: the unit of a budget."""
        return sum(self.forward.values()) + sum(self.backward.values())

    def to_json(self) -> dict:
        return {"forward": dict(self.forward), "backward": dict(self.backward),
                "passes": self.passes}


class _Tap(torch.autograd.Function):
    """Identity on a forward pass's outputs whose backward calls ``ctx.hit`` once per
    backward pass through them (also in a second-order pass, ``create_graph``)."""

    @staticmethod
    def forward(ctx, hit, *tensors):
        ctx.hit = hit
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.hit()
        return (None, *grads)


class _Counter:
    """Counts the outermost forward calls of one network (any of its submodules with
    parameters may be what is called, as a flow's inner network is; a parameter-free
    activation called on its own is not a network) and the backward passes through them."""

    def __init__(self, module: torch.nn.Module, rows: int):
        self.rows, self.depth, self.forward, self.backward = rows, 0, 0.0, 0.0
        self.handles = []
        self.weighted = {id(m) for m in module.modules() if any(True for _ in m.parameters())}
        for m in module.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1
        if self.depth or id(module) not in self.weighted:
            return None
        tensors = [output] if torch.is_tensor(output) else (
            list(output) if isinstance(output, tuple) else [])
        tensors = [t for t in tensors if torch.is_tensor(t)]
        if not tensors:
            return None
        first = tensors[0]
        share = first.numel() / max(1, first.shape[-1] if first.dim() else 1) / self.rows
        self.forward += share
        grad = [i for i, t in enumerate(tensors) if t.requires_grad]
        if not grad:
            return None

        def hit():
            self.backward += share
        tapped = _Tap.apply(hit, *[tensors[i] for i in grad])
        for i, t in zip(grad, tapped):
            tensors[i] = t
        return tensors[0] if torch.is_tensor(output) else tuple(tensors)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def networks(model, guide) -> Dict[str, torch.nn.Module]:
    """The networks whose passes are counted: the model's decoder and every child module of
    the guide that has parameters (an encoder, flows; a table is a parameter, not a network)."""
    nets = {"decoder": model.decoder}
    if isinstance(guide, torch.nn.Module):
        for name, child in guide.named_children():
            if any(True for _ in child.parameters()):
                nets[name] = child
    return nets


def count_step(model, guide, objective, batch: data.Batch, optimizers) -> StepCost:
    """The passes of one real optimizer step (``train.step``) of these pieces on ``batch``."""
    from .train import step

    counters = {name: _Counter(net, len(batch.idx)) for name, net in networks(model, guide).items()}
    try:
        step(model, guide, objective, batch, optimizers)
    finally:
        for c in counters.values():
            c.close()
    return StepCost({n: c.forward for n, c in counters.items()},
                    {n: c.backward for n, c in counters.items()})


def step_cost(config: Config, splits: data.Splits) -> StepCost:
    """The passes of one optimizer step of the run ``config`` describes, measured on the
    first ``batch_size`` training rows (on the CPU: a count does not depend on the device).

    The pieces are built as a run builds them (uncompiled: a compiled step evaluates the same
    networks); the caller's random stream is left as it was.
    """
    from .optim import make_optimizers

    x = splits.train.x[:config.batch_size].cpu()
    shape, n = splits.shape, len(x)
    with seeded(config.seed):
        if config.binarize != "none":
            x = torch.bernoulli(x)
        model = build_model(config, x.shape[1], shape)
        guide = GUIDES.build(config, data_dim=x.shape[1], num_data=n, x=None, model=model,
                             shape=shape, rank=0, world_size=1)
        batch = data.Batch(x, torch.arange(n), n)
        optimizers = make_optimizers(model, guide, config.lr, config.local_lr,
                                     config.inner_steps, batch=batch, eps=config.adam_eps)
        return count_step(model, guide, OBJECTIVES.build(config), batch, optimizers)


# ---------------------------------------------------------------------------------------
# a budget in counts
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What every guide gets the same of: ``epochs`` (``config.epochs``) or ``evaluations``
    (``amount`` network passes, ``StepCost.passes`` per step). Both are counts: a busy
    machine gives the same numbers as a quiet one."""

    unit: str = "epochs"
    amount: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        text = str(text).strip()
        if text == "epochs":
            return cls()
        unit, _, amount = text.partition("=")
        if unit.strip() == "evaluations":
            try:
                value = float(amount.replace("_", ""))
            except ValueError:
                value = math.nan
            if math.isfinite(value) and value >= 1 and value == int(value):
                return cls("evaluations", int(value))
        raise UserError(f"{setting('budget')} takes epochs or evaluations=N (N a positive "
                        f"whole number of network passes, e.g. evaluations=15640), got {text!r}")

    def steps(self, cost: StepCost, guide: str) -> Optional[int]:
        """Optimizer steps this budget gives a guide whose step costs ``cost`` (None: epochs)."""
        if self.unit == "epochs":
            return None
        steps = int(self.amount // cost.passes) if cost.passes > 0 else 0
        if steps < 1:
            raise UserError(f"{setting('budget')} evaluations={self.amount} is less than one "
                            f"step of the {guide} guide ({cost.passes:g} network passes); "
                            f"give at least {math.ceil(cost.passes)}")
        return steps

    def apply(self, config: Config, cost: StepCost, steps_per_epoch: int) -> Config:
        """``config`` with this budget: ``epochs`` as they are, or the steps the evaluations
        buy (``max_steps``) and the epochs that hold them."""
        steps = self.steps(cost, config.guide)
        if steps is None:
            return config
        return config.replace(max_steps=steps, epochs=math.ceil(steps / steps_per_epoch))

    def describe(self, config: Config) -> str:
        if self.unit == "epochs":
            return f"{config.epochs} epochs"
        return f"{self.amount:,} network passes (forward and backward, encoder and decoder)"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Compute:
    """What a trained guide spent: passes per step, steps, epochs and training seconds."""

    step: StepCost
    steps: int
    epochs: int
    seconds: float

    @property
    def total(self) -> float:
        return self.step.passes * self.steps

    def to_json(self) -> dict:
        return {"per_step": self.step.to_json(), "steps": self.steps, "epochs": self.epochs,
                "train_seconds": self.seconds, "total_passes": self.total}


# ---------------------------------------------------------------------------------------
# the local budget of a per-datapoint guide
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalBudget:
    """How far the first ``rows`` training rows of a per-datapoint table were from a local
    optimum when training ended: their ELBO as stored, after a fresh local fit with the
    decoder frozen (warm-started from the stored rows, the stopping rule of
    ``guides.local_inference``), and the gap between the two (paired over rows)."""

    rows: int
    stored: float
    fitted: float
    gap: float
    gap_stderr: float
    fit_steps: int
    fit_seconds: float
    visits: float  # how often the training loop visited each row (steps x batch / rows)

    def to_json(self) -> dict:
        return asdict(self)


def local_budget(trained, rows: int, **options) -> Optional[LocalBudget]:
    """``LocalBudget`` of a trained guide with per-datapoint tables; None for a guide
    without (an encoder answers for its rows; there is no table to fall short). ``options``
    go to ``guides.local_inference``."""
    from .evaluate import Estimate, elbo_parts
    from .heldout import EVAL_SEED, scored_rows

    if not guides.local_parameters(trained.guide):
        return None
    stored_guide, x = scored_rows(trained, "train", rows)
    stored = elbo_parts(trained.model, stored_guide, x, num_particles=10, seed=EVAL_SEED).elbo
    fit = guides.local_inference(trained.model, x, init=stored_guide, seed=EVAL_SEED, **options)
    fitted = elbo_parts(trained.model, fit.guide, x, num_particles=10, seed=EVAL_SEED).elbo
    gap = Estimate.of(fitted - stored)
    steps = trained.history[-1].steps if trained.history else 0
    visits = steps * trained.config.batch_size / len(trained.splits.train)
    return LocalBudget(len(x), float(stored.mean()), float(fitted.mean()), gap.mean, gap.stderr,
                       fit.steps, fit.seconds, visits)


def steps_per_epoch(config: Config, splits: data.Splits) -> int:
    return data.Shards(len(splits.train), 1, config.batch_size).steps

