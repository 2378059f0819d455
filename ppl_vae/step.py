"""One training step: ``step_on_device`` is ``zero_grad(); loss.backward(); step()`` on the
loss the guide trains on (its ``training_loss``, by default ``objective(model, guide,
batch)``), with its other paths as named pieces around it: a guide with per-datapoint tables
first takes ``inner_steps`` updates of its batch rows alone (stochastic variational inference
in the style of Hoffman et al. 2013); a compiled objective gives the loss and gradients from
one graph instead of autograd; under torchrun the gradients are all-reduced; and a divergence
guard keeps a non-finite step from changing anything (``DivergenceError`` when it is read on
the host). ``step`` is the same step with the guard read at once.

Also here, because a step is the first thing Ctrl-C may abandon: ``abandonable`` (a phase that
Ctrl-C cuts short past ``GRACE_SECONDS``, raising ``Abandoned``) and the slot of the Ctrl-C
listener it reports to (``listen``; the listener is ``callbacks.StopOnCtrlC``).

Layering: below the loop. Imports the guides, the optimizers and the data's ``Batch``;
``train`` (the loop), ``callbacks``, ``heldout`` and ``compute`` import it, never the reverse.
"""
from __future__ import annotations

import re
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from . import errors
from .batching import Batch
from .errors import setting
from .optim import Optimizers, restore_rows, save_rows


class DivergenceError(RuntimeError):
    """A non-finite loss or gradient: the step was stopped before it touched the parameters.

    ``setting`` names the setting to lower: ``lr``, unless the guide found the cause in one
    of its own (a semi-amortized refinement that diverges: ``refine_lr``), which ``cause``
    then says in words (settings written ``errors.setting``, shown as ``UserError`` shows
    them). ``advice()`` is the way out, for the library or (``cli=True``) the command line.
    """

    kept: Optional[str] = None  # what the run left, in words (set by the pipeline)

    def __init__(self, message: str, cause: Optional[str] = None,
                 setting_name: str = "lr"):
        self.raw = message if cause is None else f"{message}; {cause}"
        super().__init__(self.raw)
        self.cause, self.setting = cause, setting_name

    def __str__(self) -> str:
        return errors.for_library(self.raw)

    def for_cli(self) -> str:
        return errors.for_cli(self.raw)

    def advice(self, cli: bool = False) -> str:
        """What to try: a smaller value of ``setting`` (and, for the learning rate, halving
        the rates on a divergence)."""
        text = (f"Try a smaller {setting('lr')} or {setting('on_divergence')} lower_lr"
                if self.setting == "lr" else f"Try a smaller {setting(self.setting)}")
        return errors.for_cli(text) if cli else errors.for_library(text)


def step(model, guide, objective, batch: Batch, optimizers: Optimizers,
         guard: bool = True, **kwargs) -> torch.Tensor:
    """One SVI step; returns the (detached) loss. ``kwargs`` (``beta``) go to the objective.

    With ``guard`` the step is all or nothing: a non-finite loss or gradient raises
    ``DivergenceError`` and neither the networks nor the rows of a per-datapoint table (which
    the step's inner updates may have moved) change. This reads the verdict on the host;
    the training loop uses ``step_on_device`` and reads it every few steps instead.
    """
    return step_on_device(model, guide, objective, batch, optimizers, guard, defer=False,
                          **kwargs)[0]


def step_on_device(model, guide, objective, batch: Batch, optimizers: Optimizers,
                   guard: bool = True, defer: bool = True, **kwargs):
    """One SVI step that never waits on the host; returns (loss, bad), both on the device.

    The plain step is ``zero_grad(); loss.backward(); step()``; around it, each in a named
    function: a per-datapoint table's inner updates (``_inner_steps``), the compiled graph
    in place of autograd (``_backward``), the all-reduce under torchrun (``_all_reduce``) and
    the divergence guard (``_checked``, ``_give_up``, ``_saved_rows``, ``_put_back``).

    With ``guard``, ``bad`` is 1.0 when the loss or a gradient of the step (inner updates
    included, on any process) was non-finite, else 0.0, and then nothing was applied: the
    flag goes to the optimizers as ``found_inf`` (fused Adam and ``RowAdam`` skip on it, as
    under a ``GradScaler``) and the table rows moved by inner updates are put back with a
    device-side select. With ``defer=False``, or optimizers that cannot skip on a flag, the
    flag is read on the host before anything is applied (``DivergenceError`` at once).
    Without ``guard``, ``bad`` is None.

    An objective with ``value_and_grad`` (``Compiled``) computes the loss, the networks'
    gradients, the gradients of a table's batch rows and the guard's check in one graph (the
    inner updates in a second one); others, and steps the graph declines (it answers None),
    are differentiated with autograd.

    Under torchrun (``optimizers.sync``) every process's loss is divided by the world size
    and the networks' gradients are summed over processes, with the flag in the same
    all-reduce; a table's gradient stays on its process.
    """
    s = _StepContext.of(model, guide, objective, batch, optimizers, guard, defer, kwargs)
    saved = _saved_rows(s)
    try:  # Ctrl-C past the grace abandons the step here, before anything is applied
        with abandonable():
            bad = s.zero() if guard else None
            bad = _inner_steps(s, bad, saved)  # a table's batch rows alone, ``inner_steps`` times
            optimizers.zero_grad()
            params = optimizers.networks()
            loss, flag = _backward(s, params)  # ``loss.backward()``, or the compiled graph
            if guard:
                bad = _checked(bad, flag, loss, lambda: _grads(optimizers))
    except Abandoned:
        _abandon(s, saved)
        raise
    except ValueError as e:  # torch.distributions refusing a NaN: the guard's business
        reached = _invalid_values(e) if guard else None
        if reached is None:
            raise
        _abandon(s, saved)
        raise DivergenceError(f"NaN reached {reached}; the step was not applied") from None
    bad = _all_reduce(s, params, bad)
    _give_up(s, bad, saved)
    optimizers.set_found_inf(bad if s.on_device else None)
    optimizers.step()
    _put_back(s, bad, saved)
    return loss.detach(), bad


class _StepContext(NamedTuple):
    """One call of ``step_on_device`` and what it works out once: the per-datapoint tables
    and the batch's rows in them, the compiled graph, and where the guard decides."""

    model: object
    guide: object
    objective: object
    batch: Batch
    optimizers: Optimizers
    kwargs: dict  # to the objective (``beta``)
    guard: bool
    on_device: bool  # the guard's flag goes to the optimizers; else it is read on the host
    tables: List[torch.Tensor]  # the tables the local optimizer updates ([]: none)
    rows: Optional[torch.Tensor]  # the batch's rows in them (None: no tables)
    graph: Optional[Callable]  # the objective's compiled step (``_graph``), or None

    @classmethod
    def of(cls, model, guide, objective, batch: Batch, optimizers: Optimizers, guard: bool,
           defer: bool, kwargs: dict) -> "_StepContext":
        tables = optimizers.tables()
        rows = guide.table_index(batch.idx) if tables else None
        return cls(model, guide, objective, batch, optimizers, kwargs, guard,
                   defer and optimizers.skips_on_device(), tables, rows,
                   _graph(objective, guide, tables))

    @property
    def scale(self) -> float:
        """This process's share of the loss: 1 / world size under torchrun, else 1."""
        sync = self.optimizers.sync
        return 1.0 / sync.size if sync is not None else 1.0

    def zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.batch.x.device)

    def loss(self) -> torch.Tensor:
        """The training loss, for autograd (``training_loss``)."""
        return self.guide.training_loss(self.objective, self.model, self.batch, **self.kwargs)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What autograd differentiates: ``loss``, times ``scale`` under torchrun."""
        return loss * self.scale if self.optimizers.sync is not None else loss

    def compiled(self, params: Sequence[torch.Tensor]):
        """The compiled graph's answer (a ``compiled.Step``: the loss, the gradients of
        ``params`` and of the tables' batch rows, the guard's check when guarded), or None:
        use autograd (no graph, or one that declines this step)."""
        if self.graph is None:
            return None
        return self.graph(self.model, self.guide, self.batch, params, scale=self.scale,
                          check=self.guard, **self.kwargs)


def _backward(s: _StepContext, params: Sequence[torch.Tensor]):
    """The joint step's gradients: returns the loss and the compiled graph's guard flag (None
    under autograd), the gradients of the networks (``params``) and of a table's batch rows
    put in ``.grad``."""
    out = s.compiled(params)  # forward, backward and the guard's check in one graph
    if out is None:  # the plain path
        loss = s.loss()
        s.scaled(loss).backward()
        return loss, None
    for p, grad in zip(params, out.grads):
        p.grad = grad
    for table, grad in zip(s.tables, _row_grads(out.rows, s.tables, s.rows)):
        table.grad = grad
    return out.loss, out.flag


def _inner_steps(s: _StepContext, bad: Optional[torch.Tensor],
                 saved: Optional[List[dict]]) -> Optional[torch.Tensor]:
    """A per-datapoint table's ``inner_steps`` updates of the batch's rows alone, the
    networks held (stochastic variational inference in the style of Hoffman et al. 2013),
    each checked by the guard; ``RowAdam`` skips on its flag. Returns the flag; without
    tables, nothing happens."""
    for _ in range(s.optimizers.inner_steps if s.tables else 0):
        loss, grads, flag = _row_gradients(s)
        if s.guard:
            bad = _checked(bad, flag, loss, lambda: grads)
            _give_up(s, bad, saved)
        for table, grad in zip(s.tables, grads):
            table.grad = grad
        s.optimizers.local.found_inf = bad
        s.optimizers.local.step()
    for table in s.tables:
        table.grad = None
    return bad


def _row_gradients(s: _StepContext):
    """The loss, the gradients of the tables' batch rows (sparse) and the compiled graph's
    guard flag (None under autograd)."""
    out = s.compiled([])  # the rows' loss, gradients and the guard's check in one graph
    if out is None:
        loss = s.loss()
        return loss, torch.autograd.grad(s.scaled(loss), s.tables), None
    return out.loss, _row_grads(out.rows, s.tables, s.rows), out.flag


def _checked(bad: torch.Tensor, flag: Optional[torch.Tensor], loss: torch.Tensor,
             grads: Callable[[], Sequence[torch.Tensor]]) -> torch.Tensor:
    """The guard after a backward pass: ``bad`` or'ed with the compiled graph's ``flag``, or
    under autograd (``flag`` None) with ``_nonfinite`` of the loss and ``grads()`` (asked for
    only then: the compiled graph checked its gradients itself)."""
    return torch.maximum(bad, flag) if flag is not None else _nonfinite(bad, loss, *grads())


def _all_reduce(s: _StepContext, params: Sequence[torch.Tensor],
                bad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Under torchrun (``optimizers.sync``): the networks' gradients summed over processes,
    the guard's flag in the same all-reduce; returns the flag, set when any process's was.
    Otherwise ``bad`` as it is."""
    sync = s.optimizers.sync
    if sync is None:
        return bad
    total = sync.reduce(params, bad if s.guard else s.zero())
    return (total > 0).to(total.dtype) if s.guard else None


def _saved_rows(s: _StepContext) -> Optional[List[dict]]:
    """Copies of the batch's table rows and their ``RowAdam`` state before the inner updates
    move them (``save_rows``), for the guard or a step that Ctrl-C abandons; None without
    tables or inner steps, or with neither the guard nor Ctrl-C listened to."""
    if not (s.tables and s.optimizers.inner_steps and (s.guard or listening())):
        return None
    return [save_rows(s.optimizers.local, t, s.rows) for t in s.tables]


_INVALID = re.compile(r"Expected parameter (\w+) .*? of distribution (\w+)\(.*"
                      r"to satisfy the constraint Real\(\), but found invalid values", re.S)


def _invalid_values(error: ValueError) -> Optional[str]:
    """Where a distribution refused a NaN parameter (Pyro validates every site, so a NaN
    raises there before the loss is NaN), in words; None for any other ValueError (a value
    out of a distribution's support is the program's or the data's mistake, not a
    divergence)."""
    found = _INVALID.match(str(error))
    return f"parameter {found.group(1)} of a {found.group(2)}" if found else None


def _abandon(s: _StepContext, saved: Optional[List[dict]]) -> None:
    """A step that Ctrl-C abandoned: no gradients left, the rows its inner updates moved put
    back as ``saved`` them (nothing else was applied yet)."""
    s.optimizers.zero_grad()
    for table, kept in zip(s.tables, saved or ()):
        restore_rows(s.optimizers.local, table, s.rows, kept)


def _give_up(s: _StepContext, bad: Optional[torch.Tensor],
             saved: Optional[List[dict]]) -> None:
    """The guard's host read, where the flag cannot go to the optimizers (``defer=False``, or
    an optimizer that cannot skip on it): a non-finite step clears the gradients, puts back
    the rows the inner updates moved and raises ``DivergenceError``."""
    if s.guard and not s.on_device and bool(bad):
        s.optimizers.zero_grad()
        for table, kept in zip(s.tables, saved or ()):
            restore_rows(s.optimizers.local, table, s.rows, kept)
        raise DivergenceError("non-finite loss or gradient; the step was not applied")


def _put_back(s: _StepContext, bad: Optional[torch.Tensor],
              saved: Optional[List[dict]]) -> None:
    """After the joint step: where the guard's flag is set (a step not applied), the rows the
    inner updates moved go back as ``saved`` them, selected on the device."""
    if not s.guard:
        return
    for table, kept in zip(s.tables, saved or ()):
        restore_rows(s.optimizers.local, table, s.rows, kept, where=bad)


def _graph(objective, guide, tables: Sequence[torch.Tensor]):
    """The objective's ``value_and_grad`` (a compiled step), when it has one and the tables
    the optimizers update are the guide's own (the rows the graph differentiates)."""
    value_and_grad = getattr(objective, "value_and_grad", None)
    if value_and_grad is None or [id(t) for t in guide.local_parameters()] != \
            [id(t) for t in tables]:
        return None
    return value_and_grad


def _row_grads(grads: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
               rows: torch.Tensor) -> List[torch.Tensor]:
    """The gradients of a table's batch rows ([B, width]) as the sparse table gradient that
    ``F.embedding(sparse=True)`` would give (a row drawn twice: its gradients summed)."""
    return [torch.sparse_coo_tensor(rows.unsqueeze(0), g, table.shape, check_invariants=False)
            for g, table in zip(grads, tables)]


def _grads(optimizers: Optimizers) -> List[torch.Tensor]:
    return [p.grad for opt in optimizers.all() for group in opt.param_groups
            for p in group["params"] if p.grad is not None]


def check_finite(loss: torch.Tensor, optimizers: Optimizers) -> bool:
    """True when the loss and every gradient are finite (a host read)."""
    return not bool(_nonfinite(torch.zeros((), device=loss.device), loss, *_grads(optimizers)))


def _nonfinite(bad: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """``bad`` or'ed with "some entry is not finite", on the device: the check mixed
    precision's ``GradScaler`` runs (one multi-tensor kernel on CUDA; about 0.2 ms for these
    networks on this CPU, where a max-norm took 3 ms). It looks at every entry, so a huge
    but finite gradient is not mistaken for a diverged one; it multiplies the tensors by 1.
    """
    found = torch.zeros_like(bad)
    dense = [(t.coalesce().values() if t.is_sparse else t).detach().reshape(-1)
             for t in tensors]
    torch._amp_foreach_non_finite_check_and_unscale_(dense, found, torch.ones_like(bad))
    return torch.maximum(bad, found)


# ---------------------------------------------------------------------------------------
# what Ctrl-C may cut short
# ---------------------------------------------------------------------------------------
GRACE_SECONDS = 1.0  # what Ctrl-C gives a step (a validation, a scoring) to finish


class Abandoned(KeyboardInterrupt):
    """Ctrl-C cut short what ran inside ``abandonable()``: a step, a validation or the gap
    scoring that went on past ``GRACE_SECONDS`` after it. Nothing of it was applied; the loop
    turns it into ``Interrupted``. A ``KeyboardInterrupt``, so that no ``except Exception``
    on the way (a compile that falls back to eager) takes it for a failure."""


_listener = None  # the running ``fit``'s ``callbacks.StopOnCtrlC``, while it listens


def listening() -> bool:
    return _listener is not None


def listener():
    """The Ctrl-C listener that ``abandonable`` reports to (None: none listens)."""
    return _listener


def listen(new):
    """Make ``new`` (a ``callbacks.StopOnCtrlC``, or None) the listener; returns the one
    before it."""
    global _listener
    previous, _listener = _listener, new
    return previous


class abandonable:
    """Within: while ``fit`` listens for Ctrl-C, Ctrl-C does not wait for the phase to end
    but abandons it (raises ``Abandoned``) once it has run ``GRACE_SECONDS`` past Ctrl-C, or
    at a second Ctrl-C, even inside a blocking call (a compiler that does not answer).
    Outside, and without ``fit`` listening, nothing changes. What runs inside must change
    nothing it cannot put back: a step before it applies anything, a scoring before it
    writes."""

    __slots__ = ("_owner",)

    def __enter__(self) -> "abandonable":
        self._owner = _listener
        if self._owner is not None:
            self._owner.enter_phase()
        return self

    def __exit__(self, *exc) -> None:
        if self._owner is not None:
            self._owner.exit_phase()
