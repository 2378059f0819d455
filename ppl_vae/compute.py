"""What a training step costs, counted: network passes and FLOPs per optimizer step, a budget
in either, and how far a per-datapoint guide's table rows are from a local optimum.

``step_cost`` does not look the guide up in a table: it builds the run's pieces on one
minibatch, takes one real optimizer step with hooks on the networks and a FLOP counter
around it, and counts what ran (``StepCost``).

Networks. Two are counted: the model's ``decoder``, and the guide's networks as ONE network,
``encoder``: every child module of the guide that has parameters and is not the model's (an
encoder; a shared body and its loc and scale heads; flows). A guide is charged for what it
computes, not for how many modules it is built of. A table is a parameter, not a network.

A pass is one evaluation of a network over the minibatch's B rows, forward or backward: a
pass per network, not per module. A forward call of one of a network's modules over R rows
(R = its first output's size over its last dimension, so [K, B] rows, K particles, count K)
counts R / B times that module's share of one pass of the network: its forward FLOPs per B
rows over the sum of those of every module of the network the step called (measured on the
step; by parameter count where the network runs no counted FLOPs). A network called as one
module (the decoder, the built-in encoder) counts 1 per call over B rows; a shared body
(784-400) and two heads (400-50 each) count 0.887 + 2 x 0.057 = 1, as the built-in
784-400-100 encoder does. A backward pass is counted, with the same weight, each time a
gradient flows back through a forward call's output, so differentiating through a
refinement's gradient steps (a semi-amortized guide, second order) counts those passes again.

FLOPs are ``torch.utils.flop_counter.FlopCounterMode``'s count of the ops the step executed
(matrix products and convolutions, forward and backward, 2 per multiply-add; elementwise ops
count 0), in all (``StepCost.flops_per_step``) and per network (its forward and first-order
backward ops, as the counter's module tracker attributes them; the rest, such as the
second-order terms of a semi-amortized refinement, is in the total only).

Reference for the unit: Kim et al. (2018) compare SA-VAE with the VAE at equal epochs and
note its cost per step; here a budget is a count of passes or of FLOPs, equal for every guide.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import batching, data, local_fit
from .build import build_guide, build_model
from .config import Config
from .errors import UserError, setting
from .registry import OBJECTIVES
from .rng import seeded
from .step import step
from .optim import make_optimizers
from .evaluate import elbo_parts, Estimate
from .heldout import EVAL_SEED, scored_rows

ENCODER, DECODER = "encoder", "decoder"  # the names of the networks counted
# The most optimizer steps a budget may buy a guide: 65x the longest schedule in use
# (Burda et al.'s 3,280 epochs of 469 steps = 1.5 x 10^6); a budget beyond it is a typo.
MAX_BUDGET_STEPS = 10 ** 8
MAX_AMOUNT = Decimal(10) ** 300  # a budget's N: within a float's range (it is printed)


# ---------------------------------------------------------------------------------------
# counting the passes and FLOPs of one step
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCost:
    """What one optimizer step on a full minibatch costs: network passes per network (in
    units of one pass over the batch's rows), ``forward`` and ``backward``; FLOPs per network
    (``flops``: its forward and first-order backward) and in all (``flops_per_step``)."""

    forward: Dict[str, float]
    backward: Dict[str, float]
    flops: Dict[str, int] = field(default_factory=dict)
    flops_per_step: int = 0

    @property
    def passes(self) -> float:
        """Forward plus backward passes of every network: the unit of an evaluations budget."""
        return sum(self.forward.values()) + sum(self.backward.values())

    def to_json(self) -> dict:
        return {"forward": dict(self.forward), "backward": dict(self.backward),
                "passes": self.passes, "flops": dict(self.flops),
                "flops_per_step": self.flops_per_step}


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


def _size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Counter:
    """Counts the passes of one network (``parts``: its top-level modules): the outermost
    forward calls of any of its modules with parameters (any submodule may be what is called,
    as a flow's inner network is; a parameter-free activation called on its own is not a
    network), with the FLOPs (``flops()``, a running total) each call ran, and the backward
    passes through them. ``forward`` and ``backward`` weigh each call by its module's share
    of the network (see the module docstring)."""

    def __init__(self, parts: Dict[str, torch.nn.Module], rows: int,
                 flops: Callable[[], int], skip=frozenset()):
        self.rows, self.flops, self.depth, self.start = rows, flops, 0, 0
        self.calls: List[Tuple[int, float, int]] = []  # (module, rows / B, forward FLOPs)
        self.hits: List[Tuple[int, float]] = []  # (module, rows / B): backward passes
        self.sizes: Dict[int, int] = {}
        self.handles = []
        seen = set(skip)
        for part in parts.values():
            for m in part.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                if any(True for _ in m.parameters()):
                    self.sizes[id(m)] = _size(m)
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        if not self.depth:
            self.start = self.flops()
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1
        if self.depth or id(module) not in self.sizes:
            return None
        tensors = [output] if torch.is_tensor(output) else (
            list(output) if isinstance(output, tuple) else [])
        tensors = [t for t in tensors if torch.is_tensor(t)]
        if not tensors:
            return None
        first, key = tensors[0], id(module)
        share = first.numel() / max(1, first.shape[-1] if first.dim() else 1) / self.rows
        self.calls.append((key, share, self.flops() - self.start))
        grad = [i for i, t in enumerate(tensors) if t.requires_grad]
        if not grad:
            return None

        def hit():
            self.hits.append((key, share))
        tapped = _Tap.apply(hit, *[tensors[i] for i in grad])
        for i, t in zip(grad, tapped):
            tensors[i] = t
        return tensors[0] if torch.is_tensor(output) else tuple(tensors)

    def weights(self) -> Dict[int, float]:
        """Each called module's share of one pass of the network: its forward FLOPs over the
        batch's rows, over those of every called module (parameter counts without FLOPs)."""
        per_pass: Dict[int, float] = defaultdict(float)
        for key, share, flops in self.calls:
            if share > 0:
                per_pass[key] = max(per_pass[key], flops / share)
        if not per_pass:
            return {}
        whole = sum(per_pass.values())
        if whole <= 0:
            per_pass = {key: float(self.sizes[key]) for key in per_pass}
            whole = sum(per_pass.values())
        return {key: v / whole if whole > 0 else 1.0 / len(per_pass)
                for key, v in per_pass.items()}

    @property
    def forward(self) -> float:
        w = self.weights()
        return sum(share * w.get(key, 0.0) for key, share, _ in self.calls)

    @property
    def backward(self) -> float:
        w = self.weights()
        return sum(share * w.get(key, 0.0) for key, share in self.hits)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def networks(model, guide) -> Dict[str, Dict[str, torch.nn.Module]]:
    """The networks whose passes are counted, each as its top-level modules by name: the
    model's ``decoder``, and the guide's ``encoder``: every child module of the guide that
    has parameters and is not one of the model's (an encoder, a body and its heads, flows;
    a table is a parameter, not a network), counted together as one network."""
    nets = {DECODER: {DECODER: model.decoder}}
    if isinstance(guide, torch.nn.Module):
        own = {id(m) for m in model.modules()} if isinstance(model, torch.nn.Module) else set()
        parts = {name: child for name, child in guide.named_children()
                 if id(child) not in own and any(True for _ in child.parameters())}
        if parts:
            nets[ENCODER] = parts
    return nets


def _flop_counter(names: Dict[int, str]):
    """A ``FlopCounterMode`` that also counts FLOPs per network (``by_network``: every op
    once for each network one of whose modules is running it, forward or backward, as the
    counter's module tracker sees it). ``names`` names the counted networks' modules
    ``network:part.path`` (by module id), whichever wrapper calls them first. Where this
    torch's counter lacks the pieces, ``by_network`` is None: the total alone."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.utils.module_tracker import ModuleTracker

    class Tracker(ModuleTracker):
        def _get_mod_name(self, mod):
            return names.get(id(mod), "")

        def _fw_pre_hook(self, mod, args):
            # torch's tracker leaves a module's backward when its inputs' gradients are
            # done; a module whose inputs need none (an encoder of data) would stay entered
            # for the rest of the backward: leave it once its parameters' gradients are done
            super()._fw_pre_hook(mod, args)
            flat = args if isinstance(args, tuple) else (args,)
            params = [p for p in mod.parameters() if p.requires_grad]
            if (not params or not torch.is_grad_enabled()
                    or any(torch.is_tensor(a) and a.requires_grad for a in flat)):
                return
            left, leave = [len(params)], self._get_pop_fn(self._get_mod_name(mod), True)

            def done(_grad):
                left[0] -= 1
                if left[0] == 0:
                    leave()
            self._hooks.extend(p.register_hook(done) for p in params)

    class Counter(FlopCounterMode):
        def __init__(self):
            super().__init__(display=False)
            self.by_network = None
            if (all(hasattr(ModuleTracker, a) for a in ("_get_mod_name", "_fw_pre_hook",
                                                        "_get_pop_fn"))
                    and hasattr(FlopCounterMode, "_count_flops")):
                self.mod_tracker, self.by_network = Tracker(), defaultdict(int)

        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.get_total_flops()
            out = super()._count_flops(func_packet, out, args, kwargs)
            added = self.get_total_flops() - before
            if added and self.by_network is not None:
                for net in {n.partition(":")[0] for n in self.mod_tracker.parents if ":" in n}:
                    self.by_network[net] += added
            return out

    return Counter()


def count_step(model, guide, objective, batch: batching.Batch, optimizers) -> StepCost:
    """The passes and FLOPs of one real optimizer step (``step.step``) of these pieces on
    ``batch``."""

    nets = networks(model, guide)
    names: Dict[int, str] = {}
    for net, parts in nets.items():
        for part, module in parts.items():
            for path, m in module.named_modules():
                names.setdefault(id(m), f"{net}:{part}" + (f".{path}" if path else ""))
    counter = _flop_counter(names)
    rows, counters, taken = len(batch.idx), {}, set()
    try:
        for net, parts in nets.items():  # the decoder first: a guide that holds it skips it
            counters[net] = _Counter(parts, rows, counter.get_total_flops, frozenset(taken))
            taken |= {id(m) for p in parts.values() for m in p.modules()}
        with counter:
            step(model, guide, objective, batch, optimizers)
    finally:
        for c in counters.values():
            c.close()
    total = int(counter.get_total_flops())
    per_net = ({n: int(counter.by_network.get(n, 0)) for n in nets}
               if counter.by_network is not None else {})
    # rounded: a network's shares sum to 1 up to float error, which must not cost a step
    return StepCost({n: round(c.forward, 6) for n, c in counters.items()},
                    {n: round(c.backward, 6) for n, c in counters.items()}, per_net, total)


def step_cost(config: Config, splits: data.Splits) -> StepCost:
    """The passes and FLOPs of one optimizer step of the run ``config`` describes, measured
    on the first ``batch_size`` training rows (on the CPU: a count does not depend on the
    device).

    The pieces are built as a run builds them (uncompiled: a compiled step evaluates the same
    networks); the caller's random stream is left as it was.
    """

    x = splits.train.x[:config.batch_size].cpu()
    shape, n = splits.shape, len(x)
    with seeded(config.seed):
        if config.binarize != "none":
            x = torch.bernoulli(x)
        model = build_model(config, x.shape[1], shape)
        guide = build_guide(config, x.shape[1], n, model=model, shape=shape)
        batch = batching.Batch(x, torch.arange(n), n)
        optimizers = make_optimizers(model, guide, config.lr, config.local_lr,
                                     config.inner_steps, batch=batch, eps=config.adam_eps)
        return count_step(model, guide, OBJECTIVES.build(config), batch, optimizers)


# ---------------------------------------------------------------------------------------
# a budget in counts
# ---------------------------------------------------------------------------------------
FORMS = ("epochs, evaluations=N (N network passes, forward and backward, e.g. "
         "evaluations=15640) or flops=N (N FLOPs, e.g. flops=2e12); N a positive whole number")


def _big(n) -> str:
    """``n`` with thousands separators, or as 1.23e+45 when that would run long."""
    return f"{n:,}" if n < 10 ** 15 else f"{float(n):.3g}"


@dataclass(frozen=True)
class Budget:
    """What every guide gets the same of: ``epochs`` (``config.epochs``; ``amount`` once
    ``resolve`` has read them), ``evaluations`` (``amount`` network passes,
    ``StepCost.passes`` per step) or ``flops`` (``amount`` FLOPs, ``StepCost.flops_per_step``
    per step). All are counts: a busy machine gives the same numbers as a quiet one."""

    unit: str = "epochs"
    amount: Optional[int] = None

    UNITS = ("evaluations", "flops")  # the units with an amount N

    @classmethod
    def parse(cls, text: str) -> "Budget":
        text = str(text).strip()
        if text == "epochs":
            return cls()
        unit, _, amount = text.partition("=")
        if unit.strip() in cls.UNITS:
            try:
                value = Decimal(amount.strip().replace("_", ""))
            except InvalidOperation:
                value = Decimal("NaN")
            if (value.is_finite() and 1 <= value <= MAX_AMOUNT
                    and value == value.to_integral_value()):
                return cls(unit.strip(), int(value))
        raise UserError(f"{setting('budget')} takes {FORMS} at most 1e300, got {text!r}")

    def resolve(self, config: Config) -> "Budget":
        """This budget as the run spends it: an epochs budget records ``config.epochs``."""
        return Budget("epochs", config.epochs) if self.unit == "epochs" else self

    def per_step(self, cost: StepCost) -> float:
        """What one step of a guide costing ``cost`` spends of this budget's unit."""
        return cost.passes if self.unit == "evaluations" else cost.flops_per_step

    def steps(self, cost: StepCost, guide: str) -> Optional[int]:
        """Optimizer steps this budget gives a guide whose step costs ``cost`` (None: epochs):
        the whole steps ``amount`` pays for, at least 1 and at most ``MAX_BUDGET_STEPS``."""
        if self.unit == "epochs":
            return None
        each = self.per_step(cost)
        what = "network passes" if self.unit == "evaluations" else "FLOPs"
        one = f"{each:g} {what}" if self.unit == "evaluations" else f"{_big(each)} {what}"
        if each <= 0:
            raise UserError(f"{setting('budget')} {self.unit}= cannot be spent by the {guide} "
                            f"guide: its step counts no {what}; use another budget")
        steps = int(self.amount // each)
        if steps < 1:
            raise UserError(f"{setting('budget')} {self.unit}={self.amount} is less than one "
                            f"step of the {guide} guide ({one}); give at least "
                            f"{self.unit}={math.ceil(each):_}")
        if steps > MAX_BUDGET_STEPS:
            raise UserError(f"{setting('budget')} {self.unit}={_big(self.amount)} buys the "
                            f"{guide} guide {_big(steps)} steps, above the limit of "
                            f"{MAX_BUDGET_STEPS:,} steps ({one} each); give at most "
                            f"{self.unit}={math.floor(MAX_BUDGET_STEPS * each):_}")
        return steps

    def apply(self, config: Config, cost: StepCost, steps_per_epoch: int) -> Config:
        """``config`` with this budget: ``epochs`` as they are, or the steps the budget buys
        (``max_steps``) and the epochs that hold them."""
        steps = self.steps(cost, config.guide)
        if steps is None:
            return config
        return config.replace(max_steps=steps, epochs=math.ceil(steps / steps_per_epoch))

    def describe(self, config: Config) -> str:
        if self.unit == "epochs":
            return f"{config.epochs} epochs"
        if self.unit == "flops":
            return (f"{_big(self.amount)} FLOPs (matrix products of the forward and backward "
                    f"passes, counted on one step of each guide)")
        return f"{self.amount:,} network passes (forward and backward, encoder and decoder)"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Compute:
    """What a trained guide spent: passes and FLOPs per step, steps, epochs and training
    seconds."""

    step: StepCost
    steps: int
    epochs: int
    seconds: float

    @property
    def total(self) -> float:
        return self.step.passes * self.steps

    @property
    def total_flops(self) -> int:
        return self.step.flops_per_step * self.steps

    def to_json(self) -> dict:
        return {"per_step": self.step.to_json(), "steps": self.steps, "epochs": self.epochs,
                "train_seconds": self.seconds, "total_passes": self.total,
                "flops_per_step": self.step.flops_per_step, "total_flops": self.total_flops}


# ---------------------------------------------------------------------------------------
# the local budget of a per-datapoint guide
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalBudget:
    """How far the first ``rows`` training rows of a per-datapoint table were from a local
    optimum when training ended: their ELBO as stored, after a fresh local fit with the
    decoder frozen (warm-started from the stored rows, the stopping rule of
    ``local_fit.local_inference``), and the gap between the two (paired over rows)."""

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
    go to ``local_fit.local_inference``."""

    if not list(trained.guide.local_parameters()):
        return None
    stored_guide, x = scored_rows(trained, "train", rows)
    stored = elbo_parts(trained.model, stored_guide, x, num_particles=10, seed=EVAL_SEED).elbo
    fit = local_fit.local_inference(trained.model, x, init=stored_guide, seed=EVAL_SEED, **options)
    fitted = elbo_parts(trained.model, fit.guide, x, num_particles=10, seed=EVAL_SEED).elbo
    gap = Estimate.of(fitted - stored)
    steps = trained.history[-1].steps if trained.history else 0
    visits = steps * trained.config.batch_size / len(trained.splits.train)
    return LocalBudget(len(x), float(stored.mean()), float(fitted.mean()), gap.mean, gap.stderr,
                       fit.steps, fit.seconds, visits)


def steps_per_epoch(config: Config, splits: data.Splits) -> int:
    return batching.Shards(len(splits.train), 1, config.batch_size).steps

