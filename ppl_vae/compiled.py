"""Compiled objectives: run the Pyro program once per batch shape, replay it as one kernel graph.

Most of an eager SVI step's overhead on a CPU is Python: Pyro's messengers and traces,
distribution objects and one dispatcher call per tensor operation. ``Compiled(objective)``
keeps the objective's signature ``(model, guide, batch) -> loss`` and removes that overhead,
in the spirit of Pyro's ``JitTrace_ELBO``. It wraps any function of that signature that
returns a tensor (``evaluate.log_px`` compiles its per-chunk log-mean-exp of the weights):

1. the first call for a given model, guide, batch shape and dataset size runs the objective
   once eagerly, so Pyro and torch.distributions check every site's arguments (its random
   draws are kept out of the caller's stream);
2. it then records the tensor program the objective executes, with model and guide
   parameters and buffers as inputs (``make_fx`` over ``torch.func.functional_call``, argument
   validation off), and compiles that graph with ``torch.compile`` (Inductor: fused C++
   kernels on a CPU, Triton on a GPU; ``fallback_random`` so the noise is drawn from torch's
   own generator in the order eager mode draws it);
3. this and every later call with that key run the compiled graph on the current parameters.
   The loss and gradients are those of the eager objective on the same draws up to float
   rounding, and a resumed compiled run repeats an uninterrupted one bit for bit (tested).

What tracing freezes: shapes, the subsample scale N / B, Python numbers such as ``beta``, and
any branch taken on a tensor's value (none in this package's models and guides; a custom
program that branches on data must not be compiled). Not compiled, refused by
``check_compilable``: guides whose tables get sparse gradients (the per-datapoint guide: its
rows are updated by ``RowAdam`` from a sparse gradient), DReG (a gradient hook), and KL
warm-up (beta changes every step). A batch of a new shape (the last, partial batch of an
epoch) compiles a second graph; past ``max_graphs`` shapes it runs eagerly. If tracing or
compiling fails (no C++ compiler, a program that branches on data), it warns once per shape
and runs eagerly.

Compiling takes seconds to a minute, once per shape and process; Inductor caches kernels on
disk, so a second run starts faster. It pays on long runs: see ``experiments/bench.py``.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import pyro
import torch
import torch.nn as nn

from .data import Batch
from .errors import UserError


def check_compilable(guide_is_local: bool, dreg: bool, warmup_epochs: int) -> None:
    """Refuse, with the fix, the settings whose step cannot be traced once and replayed."""
    if guide_is_local:
        raise UserError("--compile applies to the amortized guides (amortized, iaf), not to "
                        "meanfield, whose table is updated row by row from a sparse gradient; "
                        "drop --compile or the meanfield guide")
    if dreg:
        raise UserError("--compile cannot trace DReG's gradient hook; drop --compile or --dreg")
    if warmup_epochs:
        raise UserError("--compile freezes beta, which KL warm-up changes every step; "
                        "drop --compile or --warmup-epochs")


class _Program(nn.Module):
    """Model and guide under one module, so one ``functional_call`` swaps in all their tensors."""

    def __init__(self, fn, model: nn.Module, guide: nn.Module, num_data: int):
        super().__init__()
        self.model, self.guide = model, guide
        self.fn, self.num_data = fn, num_data

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, self.guide, Batch(x, idx, self.num_data))


class Compiled:
    """``objective(model, guide, batch) -> tensor`` traced and compiled once per (model, guide,
    batch shape, N, grad mode); called like ``objective``."""

    def __init__(self, objective, max_graphs: int = 4, backend: str = "inductor",
                 options: Optional[dict] = None):
        self.objective = objective
        self.max_graphs = max_graphs
        self.backend = backend
        self.options = dict(options or {})  # Inductor's settings, e.g. {"max_autotune": True}
        if backend == "inductor":
            self.options.setdefault("fallback_random", True)
        self._graphs: Dict[Tuple, List] = {}  # key -> [program, graph or None, has run]

    @property
    def beta(self) -> float:
        return self.objective.beta

    def __repr__(self) -> str:
        return f"Compiled({self.objective!r})"

    def __call__(self, model: nn.Module, guide: nn.Module, batch: Batch) -> torch.Tensor:
        key = (id(model), id(guide), tuple(batch.x.shape), batch.x.dtype, batch.x.device,
               tuple(batch.idx.shape), batch.num_data, torch.is_grad_enabled())
        entry = self._graphs.get(key)
        if entry is None:
            if torch.is_grad_enabled() and getattr(guide, "is_local", False):
                raise ValueError("Compiled trains amortized guides only: a per-datapoint table "
                                 "gets a sparse gradient, which the compiled graph cannot "
                                 "produce (under torch.no_grad any guide is fine)")
            if len(self._graphs) >= self.max_graphs:
                return self.objective(model, guide, batch)
            with _own_rng(batch.x.device), torch.no_grad():
                self.objective(model, guide, batch)  # eager once: Pyro checks every site's arguments
            program = _Program(self.objective, model, guide, batch.num_data)
            entry = self._graphs[key] = [program, None, False]
            try:  # a program that branches on a tensor's value cannot be traced
                entry[1] = self._compile(program, batch)
            except Exception as e:  # noqa: BLE001 - whatever failed, eager still works
                return self._eager_after(e, model, guide, batch)
        program, graph, ran = entry
        if graph is None:  # compiling failed once: eager from then on
            return self.objective(model, guide, batch)
        if ran:
            return graph(_tensors(program), batch.x, batch.idx)
        try:  # torch.compile compiles on the first call; a machine without a C++ compiler fails here
            out = graph(_tensors(program), batch.x, batch.idx)
        except Exception as e:  # noqa: BLE001 - whatever failed, eager still works
            entry[1] = None
            return self._eager_after(e, model, guide, batch)
        entry[2] = True
        return out

    def _eager_after(self, error: Exception, model, guide, batch: Batch) -> torch.Tensor:
        text = str(error).strip()
        first_line = text.splitlines()[0][:200] if text else ""
        warnings.warn(f"compiling the objective failed ({type(error).__name__}: {first_line}); "
                      f"running it eagerly", RuntimeWarning, stacklevel=3)
        return self.objective(model, guide, batch)

    def _compile(self, program: _Program, batch: Batch):
        from torch.func import functional_call
        from torch.fx.experimental.proxy_tensor import make_fx

        def pure(tensors, x, idx):
            return functional_call(program, tensors, (x, idx))

        with _own_rng(batch.x.device), pyro.validation_enabled(False):
            graph = make_fx(pure)(_tensors(program), batch.x, batch.idx)
        return torch.compile(graph, backend=self.backend, dynamic=False, fullgraph=True,
                             options=self.options or None)


def _own_rng(device: torch.device):
    """Keep the draws of the checking run and of tracing (which runs the program on real
    tensors) out of the caller's random stream: every loss the caller sees is the graph's."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _tensors(program: nn.Module) -> dict:
    """Every parameter and buffer of the program by name: the compiled graph's inputs."""
    tensors = dict(program.named_parameters())
    tensors.update(program.named_buffers())
    return tensors
