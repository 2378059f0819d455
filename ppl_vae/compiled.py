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

A training step asks for more: ``value_and_grad(model, guide, batch, params)`` records the
step's loss *and its backward pass* (``torch.autograd.grad`` traced at the dispatcher level)
as one graph that returns the loss, the gradients and a found-non-finite flag. At run time
there is then no autograd at all (no autograd graph, no ``CompiledFunction`` wrappers, no
gradient accumulation), and the divergence guard's check of every gradient is fused into the
kernels that produce them: on a 2-core CPU that step is faster than a hand-written eager
PyTorch step (experiments/README.md, section 5). ``step.step_on_device`` asks an
objective for it and falls back to ``loss.backward()`` where it answers None.

Every built-in guide compiles this way. A per-datapoint table (``PerDatapoint``) cannot be an
input of the graph (its gradient is sparse): the graph gathers the batch's rows, the guide
reads them through ``given_rows``, and the rows' gradients ([B, width]) are outputs, which
the step hands to ``RowAdam`` as the sparse gradient ``F.embedding`` would have given, so
rows outside the batch are never touched; the local-only inner steps are a second graph
that differentiates the rows alone. A semi-amortized guide differentiates inside its program
(K refinement steps, ``create_graph=True``): ``make_fx`` traces that inner
``torch.autograd.grad`` too, so the refinement, its second-order terms and the outer
backward pass are one graph. DReG's gradient hook runs while the backward pass is traced, so
its product is in the graph. What cannot be compiled: a user's guide with tables that has no
``given_rows``, a parameter kept outside the model's and guide's modules (Pyro's param
store), and a program that branches on a tensor's value (these run eagerly, the last with a
warning).

What tracing freezes: shapes, the subsample scale N / B, Python numbers in the program, and
any branch taken on a tensor's value (none in this package's models and guides; a custom
program that branches on data must not be compiled). Keyword arguments of a call (the KL
weight ``beta`` of a warm-up schedule) are inputs of the graph, so they may change every
step. A batch of a new shape (the last, partial batch of an epoch) compiles a second graph
(``compile on``; ``compile auto`` runs it eagerly); past ``max_graphs`` keys it runs
eagerly. If tracing or compiling fails (no C++ compiler, a program that branches on data),
it warns once per shape and runs eagerly.

Compiling takes seconds to a minute, once per shape and process; Inductor caches kernels on
disk, so a second run starts faster. It pays on long runs: ``choose`` is the rule of
``compile auto`` (the default), and ``experiments/bench.py`` measures it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import pyro
import torch
import torch.nn as nn

from . import logs
from .batching import Batch
from .errors import UserError


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." note, which every
    compile on a machine with a CUDA toolkit but no GPU prints (Inductor's C++ build imports
    ``torch.utils.cpp_extension``, which says so when it looks for CUDA): a CPU run needs no
    CUDA runtime. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cuda_runtime_note() -> None:
    """Install ``_NoCudaRuntimeNote`` on torch's ``cpp_extension`` logger (once)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


quiet_cuda_runtime_note()  # before any compile: the note comes at the first C++ build


# where ``compile auto`` repays a compile of seconds to a minute per shape (``compiles``):
PAYS_FROM_STEPS = 2000  # the training step: a run of at least this many optimizer steps ...
PAYS_FROM_SECONDS = 120.0  # ... and, with a time budget, a budget at least this long
PAYS_FROM_LOCAL_ROWS = 1000  # q*'s fit: chunks of at least this many rows
PAYS_FROM_LOG_PX_ROWS = 2_000_000  # log p(x): at least this many decoder rows (K x N)
MODES = ("auto", "on", "off")  # the ``--compile`` setting (``config.COMPILE_MODES``)


class Choice(NamedTuple):
    """Whether a run's step is compiled, and the line that says why."""

    compile: bool
    reason: str
    warn: bool = False  # say it as a warning: the user may want to fix it


class Auto(NamedTuple):
    """What ``compile auto`` needs to know of the run (the rest it reads off the first batch)."""

    epochs: int
    max_seconds: Optional[float] = None
    batch_size: Optional[int] = None  # the run's batches; None: the first batch's size
    max_steps: Optional[int] = None  # a step budget, when the run has one


def has_compiler() -> bool:
    """Whether Inductor can build its kernels here: a C++ compiler (``$CXX``, c++, g++ or
    clang++) on the PATH. CPU kernels are C++; a GPU's Triton kernels need one for their
    launchers too."""
    names = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    return any(shutil.which(n) for n in names if n)


def run_steps(epochs: int, num_data: int, batch_size: int,
              max_steps: Optional[int] = None) -> int:
    """Optimizer steps of a run of ``epochs`` epochs of ``num_data`` rows (one process), at
    most ``max_steps``."""
    steps = epochs * -(-num_data // batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def mode_of(compile) -> str:
    """The ``--compile`` mode of a setting given as a mode, or as the older bool/None of the
    Python API (True: on, False: off, None: auto)."""
    if compile is None or compile is True or compile is False:
        return {None: "auto", True: "on", False: "off"}[compile]
    if compile not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}, got {compile!r}")
    return compile


def compiles(compile, work: float, pays_from: float) -> bool:
    """The one rule of ``--compile`` for every compiled piece (the training step through
    ``choose``, q*'s fit, log p(x)): ``on`` compiles, ``off`` does not, and ``auto``
    compiles where the piece's ``work`` (steps, rows, decoder rows) reaches ``pays_from``
    (one of the ``PAYS_FROM_*`` above) and a C++ compiler is present."""
    mode = mode_of(compile)
    if mode != "auto":
        return mode == "on"
    return work >= pays_from and has_compiler()


def choose(mode: str, guide, steps: int, max_seconds: Optional[float] = None) -> Choice:
    """``compiles`` for the training step, with the line that says why: ``on`` compiles,
    ``off`` does not, and ``auto`` compiles when the guide can be compiled
    (``Answers.traceable``), a C++ compiler is present (``has_compiler``) and the run is
    long enough to repay a compile of seconds to a minute per batch shape: at least ``PAYS_FROM_STEPS`` optimizer steps, and with a time
    budget (``max_seconds``), at least ``PAYS_FROM_SECONDS`` of it. The compiled step saves
    about 30-60% of an eager step on a CPU (experiments/bench.py), so 2,000 steps repay
    the compile for every built-in guide at batch 128 (the default ``compare``: 3,910 steps
    a guide). ``auto`` compiles the run's full batches only: the short last batch of an
    epoch (one step of an epoch's N / B) runs eagerly rather than pay a second compile."""
    if mode == "off":
        return Choice(False, "compile off: the step runs eagerly")
    if mode == "on":
        return Choice(True, "compile on: the step is compiled")
    if not guide.traceable():
        return Choice(False, f"compile auto: eager, the {type(guide).__name__} guide cannot "
                             f"be compiled")
    if steps < PAYS_FROM_STEPS or (max_seconds is not None and max_seconds < PAYS_FROM_SECONDS):
        length = (f"{steps} steps" if max_seconds is None or max_seconds >= PAYS_FROM_SECONDS
                  else f"a budget of {max_seconds:g} s")
        return Choice(False, f"compile auto: eager, {length} would not repay the compile "
                             f"(it compiles from {PAYS_FROM_STEPS} steps and "
                             f"{PAYS_FROM_SECONDS:g} s)")
    if not compiles(mode, steps, PAYS_FROM_STEPS):  # long enough: the compiler is missing
        return Choice(False, "compile auto: eager, no C++ compiler found (set $CXX or install "
                             "g++ to compile the step)", warn=True)
    return Choice(True, f"compile auto: the step is compiled ({steps} steps repay the compile)")


def compiled_run(config, guide, num_data: int) -> bool:
    """Whether a run of ``config`` (a ``Config``) on ``num_data`` training rows compiles its
    step: ``choose`` as ``build.build_objective`` applies it (a compile that then fails
    warns and trains eagerly)."""
    steps = run_steps(config.epochs, num_data, config.batch_size,
                      getattr(config, "max_steps", None))
    return choose(config.compile, guide, steps, config.max_seconds).compile


def check_compilable(guide) -> None:
    """Refuse, with the fix, a guide whose step cannot be traced once and replayed (it says
    so, or it has per-datapoint tables it cannot hand over as rows: ``Answers.traceable``)."""
    if not guide.traceable():
        raise UserError(f"setting compile on: the {type(guide).__name__} guide cannot be "
                        f"compiled (it says so, or its per-datapoint tables cannot be handed "
                        f"to the graph as rows: give it given_rows); use compile auto or off")


class Program(nn.Module):
    """Model and guide under one module, so one ``functional_call`` swaps in all their tensors."""

    def __init__(self, fn, model: nn.Module, guide: nn.Module, num_data: int, names):
        super().__init__()
        self.model, self.guide = model, guide
        self.fn, self.num_data, self.names = fn, num_data, names
        every = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        self._slots = [(n, self.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
                       for n in every]

    def tensors(self) -> dict:
        """Every parameter and buffer by name, the compiled graph's inputs: read through the
        modules that hold them (a parameter replaced since tracing is the one passed), without
        walking the module tree on every call (that walk cost about 80 us a step)."""
        return {name: getattr(module, attr) for name, module, attr in self._slots}

    def forward(self, x: torch.Tensor, idx: torch.Tensor, *values) -> torch.Tensor:
        return self.fn(self.model, self.guide, Batch(x, idx, self.num_data),
                       **dict(zip(self.names, values)))


class Compiled:
    """``objective(model, guide, batch) -> tensor`` traced and compiled once per (model, guide,
    batch shape, N, grad mode); called like ``objective``."""

    def __init__(self, objective, max_graphs: int = 8, backend: str = "inductor",
                 options: Optional[dict] = None, auto: Optional[Auto] = None):
        self.objective = objective
        # ``auto``: the training step decides at its first batch (``choose``) and says so;
        # otherwise it compiles
        self.auto, self.chosen = auto, (None if auto is not None else True)
        self.max_graphs = max_graphs
        self.backend = backend
        self.options = dict(options or {})  # Inductor's settings, e.g. {"max_autotune": True}
        if backend == "inductor":
            self.options.setdefault("fallback_random", True)
        self._graphs: Dict[Tuple, List] = {}  # key -> [program, graph or None, has run]

    def __repr__(self) -> str:
        return f"Compiled({self.objective!r})"

    def __call__(self, model: nn.Module, guide: nn.Module, batch: Batch,
                 **kwargs) -> torch.Tensor:
        if not self._compiles(batch):  # compile auto chose eager, or a short batch
            return self.objective(model, guide, batch, **kwargs)
        names, values = _graph_inputs(batch, kwargs)
        key = self._key(model, guide, batch, names)
        entry = self._graphs.get(key)
        if entry is None:
            if torch.is_grad_enabled() and (not guide.traceable() or list(guide.local_parameters())):
                # autograd through a compiled loss: a table's gradient would be dense, and a
                # guide that says it cannot be compiled means it; the step compiles them
                # through value_and_grad (a table's rows as inputs)
                return self.objective(model, guide, batch, **kwargs)
            if len(self._graphs) >= self.max_graphs:
                return self.objective(model, guide, batch, **kwargs)
            with _own_rng(batch.x.device), torch.no_grad():
                self.objective(model, guide, batch, **kwargs)  # eager once: Pyro checks every site
            program = Program(self.objective, model, guide, batch.num_data, names)
            entry = self._graphs[key] = [program, None, False]
            try:  # a program that branches on a tensor's value cannot be traced
                entry[1] = self._compile(program, batch, values)
            except Exception as e:  # noqa: BLE001 - whatever failed, eager still works
                return self._eager_after(e, model, guide, batch, kwargs)
            except BaseException:  # Ctrl-C while tracing: trace again next time
                self._graphs.pop(key, None)
                raise
        program, graph, ran = entry
        if graph is None:  # compiling failed once: eager from then on
            return self.objective(model, guide, batch, **kwargs)
        if ran:
            return graph(program.tensors(), batch.x, batch.idx, *values)
        try:  # torch.compile compiles on the first call; a machine without a C++ compiler fails here
            out = graph(program.tensors(), batch.x, batch.idx, *values)
        except Exception as e:  # noqa: BLE001 - whatever failed, eager still works
            entry[1] = None
            return self._eager_after(e, model, guide, batch, kwargs)
        except BaseException:  # Ctrl-C while compiling (step.abandonable): compile again
            self._graphs.pop(key, None)  # next time rather than run eagerly for good
            raise
        entry[2] = True
        return out

    def _key(self, model, guide, batch: Batch, names) -> Tuple:
        return (id(model), id(guide), tuple(batch.x.shape), batch.x.dtype, batch.x.device,
                tuple(batch.idx.shape), batch.num_data, torch.is_grad_enabled(), names)

    def value_and_grad(self, model: nn.Module, guide: nn.Module, batch: Batch,
                       params: Sequence[torch.Tensor], scale: float = 1.0, check: bool = True,
                       **kwargs) -> Optional["Step"]:
        """A training step's forward and backward pass as one compiled graph.

        Returns a ``Step``: the step's loss (the guide's training loss,
        ``Answers.training_loss``; detached, unscaled), a 0-dim flag that is 1.0 when the loss
        or a gradient has a non-finite entry (0.0 without ``check``), the gradients of
        ``scale * loss`` with respect to ``params``, in their order, None for a parameter the
        loss does not use (as ``loss.backward()`` would leave its ``.grad``), and for a guide
        with per-datapoint tables the gradients of its batch rows (``rows``: one [B, width]
        tensor per table, the rows ``guide.table_index(batch.idx)``; the graph
        gathers them and the guide reads them through ``given_rows``). ``params`` may be
        empty: the local-only steps of a per-datapoint guide differentiate the rows alone.
        Nothing is written to ``.grad``; the caller decides. Returns None where it cannot: a
        guide that is not compilable, a parameter that is not one of the model's or the
        guide's tensors, more than ``max_graphs`` shapes, or a program that cannot be
        traced or compiled (warned once); the caller then differentiates ``self(...)``.
        """
        if self.chosen is None:
            self._choose(guide, batch)
        if not self._compiles(batch) or not torch.is_grad_enabled() or not guide.traceable():
            return None
        names, values = _graph_inputs(batch, kwargs)
        key = ("value_and_grad", self._key(model, guide, batch, names),
               tuple(id(p) for p in params), float(scale), bool(check))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return None
            entry = self._graphs[key] = _GradGraph(self.objective, model, guide, batch,
                                                   names, params)
            if entry.wrt is not None:
                try:
                    with _own_rng(batch.x.device), torch.no_grad():  # eager once: Pyro
                        entry.program(batch.x, batch.idx, *values)  # checks every site
                    entry.graph = self._compile_grad(entry, batch, values, scale, check)
                except Exception as e:  # noqa: BLE001 - whatever failed, autograd still works
                    return self._no_graph(e, entry, model, guide, batch, names)
                except BaseException:  # Ctrl-C while tracing: trace again next time
                    self._graphs.pop(key, None)
                    raise
        tensors = entry.current(params)
        if tensors is None:  # not the program's tensors (or no longer): autograd instead
            return None
        try:
            with torch.no_grad():
                loss, flag, present, rows = entry.graph(list(params), tensors, batch.x,
                                                        batch.idx, *values)
        except Exception as e:  # noqa: BLE001 - a first call that fails to compile
            if entry.ran:
                raise
            return self._no_graph(e, entry, model, guide, batch, names)
        except BaseException:  # Ctrl-C while compiling (step.abandonable): compile again
            if not entry.ran:  # next time rather than differentiate eagerly for good
                self._graphs.pop(key, None)
            raise
        entry.ran = True
        it = iter(present)
        return Step(loss, flag, [next(it) if used else None for used in entry.used], rows)

    def _compiles(self, batch: Batch) -> bool:
        """False where ``compile auto`` runs eagerly: it chose to (or has not chosen yet), or
        a batch that is not of the run's size (an epoch's short last batch)."""
        if self.auto is None:
            return True
        return bool(self.chosen) and len(batch.idx) == self.auto.batch_size

    def _choose(self, guide, batch: Batch) -> None:
        """``compile auto`` at the run's first step: ``choose``, and one line saying what."""
        if self.auto.batch_size is None:
            self.auto = self.auto._replace(batch_size=len(batch.idx))
        steps = run_steps(self.auto.epochs, batch.num_data, self.auto.batch_size,
                          self.auto.max_steps)
        choice = choose("auto", guide, steps, self.auto.max_seconds)
        self.chosen = choice.compile
        (logs.warning if choice.warn else logs.info)(choice.reason)

    def _no_graph(self, error: Exception, entry: "_GradGraph", model, guide, batch: Batch,
                  names) -> None:
        """Compiling failed: warn once, and let the loss run eagerly too rather than fail
        again (the same program, traced the same way)."""
        entry.wrt, entry.graph = None, None
        self._graphs.setdefault(self._key(model, guide, batch, names), [None, None, False])
        _warn(error, "computing the loss and its gradients eagerly", stacklevel=4)
        return None

    def _compile_grad(self, entry: "_GradGraph", batch: Batch, values, scale: float,
                      check: bool):
        from torch.func import functional_call
        from torch.fx.experimental.proxy_tensor import make_fx
        program, wrt, tables = entry.program, entry.wrt, entry.tables
        guide = program.guide

        def pure(params, rest, x, idx, *values):
            tensors = dict(rest)
            tensors.update(zip(wrt, params))
            at = guide.table_index(idx) if tables else None
            rows = [tensors[n].index_select(0, at).detach().requires_grad_() for n in tables]
            with guide.given_rows(rows) if rows else contextlib.nullcontext():
                loss = functional_call(program, tensors, (x, idx, *values))
            grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss,
                                        [*params, *rows], allow_unused=True)
            grads, row_grads = grads[:len(params)], grads[len(params):]
            entry.used = [g is not None for g in grads]
            grads = [g for g in grads if g is not None]
            row_grads = [torch.zeros_like(r) if g is None else g
                         for r, g in zip(rows, row_grads)]
            flag = torch.zeros((), dtype=loss.dtype, device=loss.device)
            if check:  # fused by Inductor into the kernels that produce the gradients
                bad = ~torch.isfinite(loss)
                for g in [*grads, *row_grads]:
                    bad = bad | ~torch.isfinite(g).all()
                flag = bad.to(loss.dtype)
            return loss.detach(), flag, grads, row_grads

        params = [t.detach().requires_grad_() for t in entry.params()]
        with _own_rng(batch.x.device), pyro.validation_enabled(False), torch.enable_grad():
            graph = make_fx(pure)(params, entry.rest(), batch.x, batch.idx, *values)
        return torch.compile(graph, backend=self.backend, dynamic=False, fullgraph=True,
                             options=self.options or None)

    def _eager_after(self, error: Exception, model, guide, batch: Batch, kwargs) -> torch.Tensor:
        _warn(error, "running it eagerly", stacklevel=4)
        return self.objective(model, guide, batch, **kwargs)

    def _compile(self, program: Program, batch: Batch, values):
        from torch.func import functional_call
        from torch.fx.experimental.proxy_tensor import make_fx

        def pure(tensors, x, idx, *values):
            return functional_call(program, tensors, (x, idx, *values))

        with _own_rng(batch.x.device), pyro.validation_enabled(False):
            graph = make_fx(pure)(program.tensors(), batch.x, batch.idx, *values)
        return torch.compile(graph, backend=self.backend, dynamic=False, fullgraph=True,
                             options=self.options or None)


class Step(NamedTuple):
    """What ``Compiled.value_and_grad`` returns: one training step's graph outputs."""

    loss: torch.Tensor  # 0-dim, detached, unscaled
    flag: torch.Tensor  # 0-dim: 1.0 when the loss or a gradient has a non-finite entry
    grads: List[Optional[torch.Tensor]]  # of scale * loss, one per parameter asked for
    rows: List[torch.Tensor]  # of scale * loss w.r.t. each table's batch rows, [B, width]


class _GradGraph:
    """What ``Compiled.value_and_grad`` keeps per key: the program (the guide's training
    loss), the names of the parameters it differentiates (None: it cannot) and of the
    per-datapoint tables whose batch rows it differentiates, the graph."""

    def __init__(self, objective, model, guide, batch: Batch, names, params):

        def loss(model, guide, batch, **kwargs):
            return guide.training_loss(objective, model, batch, **kwargs)

        self.program = Program(loss, model, guide, batch.num_data, names)
        by_id = {id(t): n for n, t in self.program.tensors().items()}
        tables = list(guide.local_parameters())
        self.wrt = ([by_id[id(p)] for p in params]
                    if all(id(p) in by_id for p in [*params, *tables]) else None)
        self.tables = [by_id[id(t)] for t in tables] if self.wrt is not None else []
        if set(self.tables) & set(self.wrt or ()):
            self.wrt = None  # a table is differentiated by its rows, never as a parameter
        self.graph, self.ran, self.used = None, False, []

    def params(self) -> List[torch.Tensor]:
        tensors = self.program.tensors()
        return [tensors[n] for n in self.wrt]

    def rest(self) -> dict:
        """The program's other tensors (buffers, parameters no optimizer holds)."""
        wrt = set(self.wrt)
        return {n: t for n, t in self.program.tensors().items() if n not in wrt}

    def current(self, params) -> Optional[dict]:
        """``rest()``, or None if ``params`` are no longer the program's own tensors (a
        parameter replaced since tracing) or it has no graph."""
        if self.graph is None:
            return None
        tensors = self.program.tensors()
        if any(tensors[n] is not p for n, p in zip(self.wrt, params)):
            return None
        for n in self.wrt:
            del tensors[n]
        return tensors


def _graph_inputs(batch: Batch, kwargs) -> Tuple[Tuple[str, ...], List[torch.Tensor]]:
    """The keyword arguments' names and values as tensors: inputs of the graph, so they may
    change between calls (the KL weight of a warm-up)."""
    names = tuple(sorted(kwargs))
    return names, [torch.as_tensor(kwargs[n], dtype=batch.x.dtype, device=batch.x.device)
                   for n in names]


def _warn(error: Exception, instead: str, stacklevel: int) -> None:
    text = str(error).strip()
    first_line = text.splitlines()[0][:200] if text else ""
    warnings.warn(f"compiling the objective failed ({type(error).__name__}: {first_line}); "
                  f"{instead}", RuntimeWarning, stacklevel=stacklevel)


def _own_rng(device: torch.device):
    """Keep the draws of the checking run and of tracing (which runs the program on real
    tensors) out of the caller's random stream: every loss the caller sees is the graph's."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
