"""The training loop, visible: ``loop`` draws a batch, takes a step and records it; everything
around it (progress bar, time budget, Ctrl-C, validation, checkpoints, learning-rate schedule)
is a ``Callback``, and KL warm-up is a schedule of beta handed to the objective per step.
Steps never wait on the host: whether each was applied is counted on the device
(``Loop.record``) and read every ``READ_EVERY`` steps and at each epoch's end, where a step
that diverged (and was not applied) stops the run or lowers the learning rates.

``fit(model, guide, objective, data, optimizers, ...)`` builds the defaults (the batches,
``data.Shards``; the beta schedule; the ``Loop`` state) and the usual callbacks from keyword
arguments and calls ``loop``. One step (``step_on_device``) is ``zero_grad();
loss.backward(); step()`` on the loss the guide trains on (``protocol.training_loss``, by
default ``objective(model, guide, batch)``), with its other paths as named pieces around it:
a guide with per-datapoint tables first takes ``inner_steps`` updates of its batch rows alone
(stochastic variational inference in the style of Hoffman et al. 2013); a compiled objective
gives the loss and gradients from one graph instead of autograd; under torchrun the
gradients are all-reduced; and a divergence guard keeps a non-finite step from changing
anything.
"""
from __future__ import annotations

import _thread
import contextlib
import math
import re
import signal
import sys
import threading
import time
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import errors, logs, protocol
from .data import Batch, Binarize, Shards, Split
from .errors import UserError, setting
from .objectives import takes_beta
from .optim import Optimizers, restore_rows, save_rows

# (epoch [0-based], step within the epoch) -> beta, the KL weight of that step
BetaSchedule = Callable[[int, int], float]


class EpochMetrics(NamedTuple):
    epoch: int  # 1-based
    train_elbo: float  # mean per-image training objective over the epoch's steps (nats)
    valid_elbo: float  # per-image ELBO on the validation rows (nats); nan when not scored
    seconds: float  # training time of this epoch (validation excluded)
    wall: float  # training time since the start of the run
    steps: int  # optimizer steps so far
    beta: float  # KL weight used in this epoch's last step


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


class Position(NamedTuple):
    """Where an interrupted epoch stopped: the next step and what the epoch had summed so far."""

    epoch: int  # 0-based epoch in progress
    step: int  # next step within it
    loss_sum: float  # sum of the epoch's step losses so far
    seconds: float  # training time spent in the epoch so far
    wall: float  # training time of the whole run so far
    steps: int  # optimizer steps of the whole run so far
    taken: int  # steps applied in this epoch so far (skipped batches excluded)


class Interrupted(Exception):
    """Training stopped on SIGINT (Ctrl-C): after its current step, or in the middle of a step
    (a validation, a scoring) that ran past ``GRACE_SECONDS`` after Ctrl-C, which was then
    abandoned with nothing applied; ``position`` is where to resume."""

    def __init__(self, position: Position):
        where = (f"after epoch {position.epoch}" if position.step == 0 and position.epoch
                 else f"at epoch {position.epoch + 1}, step {position.step}")
        super().__init__(f"interrupted {where}")  # a whole epoch is not called the next one
        self.position = position
        self.kept: Optional[str] = None  # what was kept, when not the checkpoint to resume


# ---------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------
def beta_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, warmup_epochs: int,
            beta: float) -> float:
    """Linear KL warm-up from 0 to ``beta`` over ``warmup_epochs`` (0 based epoch)."""
    if warmup_epochs <= 0:
        return beta
    progress = (epoch + step_in_epoch / steps_per_epoch) / warmup_epochs
    return beta * min(1.0, progress)


def kl_warmup(beta: float, warmup_epochs: int, steps_per_epoch: int) -> BetaSchedule:
    """The schedule of ``beta_at``: 0 at the first step, ``beta`` from ``warmup_epochs`` on."""
    return lambda epoch, step: beta_at(epoch, step, steps_per_epoch, warmup_epochs, beta)


def burda_factor(epoch: int, stages: int = 8) -> float:
    """Learning-rate factor of Burda et al. (2016): 3^i epochs at 10^(-i/7), i = 0 .. 7.

    3,280 epochs in all; past them the last factor stays.
    """
    i, end = 0, 1
    while epoch >= end and i < stages - 1:
        i += 1
        end += 3 ** i
    return 10 ** (-i / 7)


# ---------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------
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
        rows = protocol.table_index(guide, batch.idx) if tables else None
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
        """The training loss, for autograd (``protocol.training_loss``)."""
        return protocol.training_loss(self.guide, self.objective, self.model, self.batch,
                                    **self.kwargs)

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
    if not (s.tables and s.optimizers.inner_steps and (s.guard or _listening())):
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
    if value_and_grad is None or [id(t) for t in protocol.local_parameters(guide)] != \
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


def lower_lr(optimizers: Optimizers, factor: float = 0.5) -> None:
    for opt in optimizers.all():
        for group in opt.param_groups:
            group["lr"] *= factor
            if "base_lr" in group:  # a schedule's base rate comes down with it
                group["base_lr"] *= factor


# ---------------------------------------------------------------------------------------
# the loop and its callbacks
# ---------------------------------------------------------------------------------------
class Loop:
    """Where a run stands; the core loop updates it and callbacks read it."""

    def __init__(self, n: int, steps_per_epoch: int, history: Sequence[EpochMetrics] = (),
                 position: Optional[Position] = None, beta: float = 1.0,
                 start_epoch: Optional[int] = None):
        self.n, self.steps_per_epoch = n, steps_per_epoch
        self.history: List[EpochMetrics] = list(history)
        last = self.history[-1] if self.history else None
        self.epoch = len(self.history) if start_epoch is None else start_epoch
        self.wall = last.wall if last else 0.0  # training seconds up to this epoch's (re)start
        self.steps = last.steps if last else 0
        self._resume = position
        if position is not None:
            self.epoch, self.wall, self.steps = position.epoch, position.wall, position.steps
        self.beta, self.lowered, self.stop, self.valid = beta, 0, False, math.nan
        self.last_loss: Optional[torch.Tensor] = None
        self.batch: Optional[Batch] = None  # the batch of the step in progress (or the last)
        self.shown = math.nan  # the epoch's mean training ELBO per image at the last host read

    def begin(self, epoch: int, device) -> None:
        p = self._resume if self._resume is not None and self._resume.epoch == epoch else None
        self._resume = None
        self.epoch, self.valid = epoch, math.nan
        self.step, self.loss_sum, self.before, self.taken = \
            (p.step, p.loss_sum, p.seconds, p.taken) if p else (0, 0.0, 0.0, 0)
        self.epoch_loss = torch.zeros((), device=device)
        # device-side counters of guarded steps since the last host read (``sync``)
        self.pending, self._bad = 0, torch.zeros((), device=device)
        self._first_bad = torch.full((), -1.0, device=device)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this epoch (re)started."""
        return time.perf_counter() - self.started

    def run_seconds(self) -> float:
        return self.wall + self.elapsed()

    def record(self, loss: torch.Tensor, bad: Optional[torch.Tensor],
               beta: Optional[float]) -> None:
        """Count a step without reading anything on the host: ``bad`` (a device flag, or None
        for an unguarded step) says it was not applied."""
        if bad is None:
            self.epoch_loss += loss
            self.steps += 1
            self.taken += 1
        else:
            self.epoch_loss += torch.where(bad > 0, torch.zeros_like(loss), loss)
            self._bad += bad
            self._first_bad = torch.where((self._first_bad < 0) & (bad > 0),
                                          float(self.step), self._first_bad)
            self.pending += 1
        self.last_loss = loss
        if beta is not None:
            self.beta = float(beta)

    @property
    def resume_step(self) -> int:
        """The step within its epoch that a resumed run starts from (0 otherwise)."""
        return self._resume.step if self._resume is not None else 0

    def read_counters(self) -> Tuple[int, int]:
        """Read the device counters (one host read): returns how many of the steps since the
        last read were not applied and the first such step (-1: none)."""
        if self.pending == 0:
            return 0, -1
        bad, first, total = torch.stack([self._bad, self._first_bad,
                                         self.epoch_loss.detach()]).tolist()
        applied = self.pending - int(bad)
        self.steps += applied
        self.taken += applied
        self.pending = 0
        self._bad.zero_()
        self._first_bad.fill_(-1.0)
        self.shown = -(self.loss_sum + total) / (self.n * max(self.taken, 1))
        return int(bad), int(first)

    def position(self) -> Position:
        self.read_counters()
        return Position(self.epoch, self.step, self.loss_sum + float(self.epoch_loss),
                        self.before + self.elapsed(), self.run_seconds(), self.steps, self.taken)

    def boundary(self) -> Position:
        """The start of the next epoch, once this one's metrics are made."""
        return Position(self.epoch + 1, 0, 0.0, 0.0, self.wall, self.steps, 0)

    def end_epoch(self, grad_sync=None) -> EpochMetrics:
        """The epoch's metrics; ``grad_sync`` (torchrun's ``GradSync``) averages the loss over
        processes."""
        self.read_counters()
        elapsed = self.elapsed()
        seconds = self.before + elapsed
        self.wall += elapsed
        loss = (self.epoch_loss if grad_sync is None
                else grad_sync.all_reduce(self.epoch_loss) / grad_sync.size)
        train = -(self.loss_sum + float(loss)) / (self.n * max(self.taken, 1))
        metrics = EpochMetrics(self.epoch + 1, train, self.valid, seconds, self.wall,
                               self.steps, self.beta)
        self.history.append(metrics)
        return metrics


class Callback:
    """Hooks around the loop; every one is optional. ``True`` from ``after_step`` ends the
    epoch where it is, from ``on_metrics`` the run."""

    def on_start(self, loop: Loop) -> None:
        pass

    def on_epoch_start(self, loop: Loop) -> None:
        pass

    def after_step(self, loop: Loop) -> bool:
        return False

    def on_epoch_end(self, loop: Loop) -> None:  # before the epoch's metrics are made
        pass

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        return False

    def on_end(self, loop: Loop) -> None:  # the run's epochs are done (not on an exception)
        pass

    def close(self) -> None:
        pass


READ_EVERY = 100  # steps between host reads of the divergence guard's device counters


def loop(model, guide, objective, train: Split, optimizers: Optimizers, epochs: int, *,
         binarize: Binarize, shards: Shards, state: Loop, seed: int = 0,
         beta: Optional[BetaSchedule] = None, callbacks: Sequence[Callback] = (),
         on_divergence: str = "stop", log: Callable[[str], None] = logs.info, rank: int = 0,
         read_every: int = READ_EVERY) -> List[EpochMetrics]:
    """The core loop: epochs of seeded minibatches, one guarded step each, callbacks around.

    The steps never wait on the host: whether a step was applied is counted on the device
    and read every ``read_every`` steps and at the end of the epoch, where a non-finite step
    (never applied) stops the run or lowers the rates (``on_divergence``). Under torchrun,
    ``shards`` and ``rank`` say which rows this process draws (``data.Shards``); ``binarize``
    is then this process's noise.
    """
    noise = {rank: binarize}
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_guard_speaks())
        for cb in callbacks:
            cb.on_start(state)
        for epoch in range(state.epoch, epochs):
            state.begin(epoch, train.x.device)
            for cb in callbacks:
                cb.on_epoch_start(state)
            if state.stop:
                break
            streams = _Streams.of(binarize, train.x.device)  # before the batch's noise
            for batch in shards.batches(train, noise, seed * 100_003 + epoch, [rank],
                                        start=state.step):
                kwargs = {} if beta is None else {"beta": beta(epoch, state.step)}
                state.batch = batch
                try:
                    loss, bad = step_on_device(model, guide, objective, batch, optimizers,
                                               **kwargs)
                except DivergenceError as e:  # an optimizer that cannot skip on a flag
                    _recover(e, state, state.step, optimizers, on_divergence, log,
                             lambda: _cause(guide, model, batch))
                except Abandoned:  # nothing applied: the random streams as before the step
                    streams.restore()
                    raise Interrupted(state.position()) from None
                else:
                    state.record(loss, bad, kwargs.get("beta"))
                state.step += 1
                if state.step % read_every == 0:
                    _check(state, optimizers, on_divergence, log, guide, model)
                if any([cb.after_step(state) for cb in callbacks]):
                    break
                streams = _Streams.of(binarize, train.x.device)
            _check(state, optimizers, on_divergence, log, guide, model)
            try:
                for cb in callbacks:
                    cb.on_epoch_end(state)
            except Abandoned:  # a validation cut short: the epoch's steps are all taken
                raise Interrupted(state.position()) from None
            metrics = state.end_epoch(optimizers.sync)
            try:
                if any([cb.on_metrics(state, metrics) for cb in callbacks]):
                    break
            except Abandoned:  # a scoring cut short (the gap curves), after the checkpoint
                raise Interrupted(state.boundary()) from None
        for cb in callbacks:
            cb.on_end(state)
    finally:
        for cb in callbacks:
            cb.close()
        stack.close()
    return state.history


@contextlib.contextmanager
def _guard_speaks():
    """Pyro's "Encountered NaN/inf" warnings silenced while the loop runs: a non-finite loss
    or gradient is the divergence guard's to report, in one line naming the step (a
    diverging refinement otherwise printed dozens of warnings before it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Encountered (NaN|\+inf|-inf)",
                                category=UserWarning)
        yield


class _Streams(NamedTuple):
    """The random streams a step draws from (torch's, the device's, the binarization
    noise's), as they were before it, for a step that Ctrl-C abandons; empty (nothing to
    keep) when no ``fit`` listens for Ctrl-C."""

    cpu: Optional[torch.Tensor] = None
    cuda: Optional[Tuple[torch.device, torch.Tensor]] = None
    binarize: Optional[Tuple[torch.Generator, torch.Tensor]] = None

    @classmethod
    def of(cls, binarize: Binarize, device) -> "_Streams":
        if not _listening():
            return cls()
        device = torch.device(device)
        generator = getattr(binarize, "generator", None)
        return cls(torch.get_rng_state(),
                   (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
                   (generator, generator.get_state()) if generator is not None else None)

    def restore(self) -> None:
        if self.cpu is not None:
            torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
        if self.binarize is not None:
            self.binarize[0].set_state(self.binarize[1])


def _check(state: Loop, optimizers, on_divergence: str, log, guide=None, model=None) -> None:
    """The host read of the guard: act on every step since the last read that was not applied."""
    bad, first = state.read_counters()
    for _ in range(bad):
        _recover(DivergenceError("non-finite loss or gradient; the step was not applied"),
                 state, first, optimizers, on_divergence, log,
                 lambda: _cause(guide, model, state.batch))


def _cause(guide, model, batch: Optional[Batch]) -> Optional[Tuple[str, str]]:
    """The guide's diagnosis of a divergence on ``batch`` (``protocol.divergence_cause``):
    (setting, why in words), or None: the learning rate. A diagnosis that fails is none."""
    if guide is None or batch is None:
        return None
    try:
        return protocol.divergence_cause(guide, model, batch)
    except Exception:  # noqa: BLE001 - the divergence is reported either way
        return None


def _recover(error: DivergenceError, state: Loop, step: int, optimizers, on_divergence: str,
             log, cause: Optional[Callable[[], Optional[Tuple[str, str]]]] = None) -> None:
    """Stop on a diverged step, or halve every rate (its batch was skipped; at most 10 times).
    ``cause()``: what the guide says caused it, asked for only when the run stops."""
    where = f"epoch {state.epoch + 1}, step {step + 1}: {error.raw}"
    if on_divergence != "lower_lr" or state.lowered >= 10:
        found = cause() if cause is not None else None
        if found is None:
            raise DivergenceError(where) from None
        raise DivergenceError(where, found[1], found[0]) from None
    state.lowered += 1
    lower_lr(optimizers)
    log(errors.for_library(f"{where}; learning rates halved, batch skipped"))


class Validate(Callback):
    """Scores the model after every epoch: ``valid_elbo`` of the epoch's metrics. Ctrl-C may
    abandon the scoring (``abandonable``): the run then resumes at the epoch's end."""

    def __init__(self, score: Callable[[], float]):
        self.score = score

    def on_epoch_end(self, loop: Loop) -> None:
        with abandonable():
            loop.valid = self.score()


class OnEpoch(Callback):
    """Calls ``fn(metrics)`` after every epoch (checkpoints, logs)."""

    def __init__(self, fn: Callable[[EpochMetrics], None]):
        self.fn = fn

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        self.fn(metrics)
        return False


class TimeBudget(Callback):
    """Stops once the run's training seconds reach ``seconds`` (mid-epoch: the partial epoch
    is scored and recorded)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def spent(self, loop: Loop) -> bool:
        return loop.run_seconds() >= self.seconds

    def on_epoch_start(self, loop: Loop) -> None:
        loop.stop = loop.stop or loop.wall >= self.seconds  # a resumed run whose budget is spent

    def after_step(self, loop: Loop) -> bool:
        return self.spent(loop)

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        return loop.wall >= self.seconds


class StepBudget(Callback):
    """Stops once the run has taken ``steps`` optimizer steps (mid-epoch: the partial epoch is
    scored and recorded, as under ``TimeBudget``). A count, so two runs stop at the same step
    however busy the machine; steps the divergence guard skipped count as taken."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_epoch_start(self, loop: Loop) -> None:
        loop.stop = loop.stop or loop.steps >= self.steps  # a resumed run whose budget is spent

    def after_step(self, loop: Loop) -> bool:
        return loop.steps + loop.pending >= self.steps  # pending: taken, not yet read

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        return loop.steps >= self.steps


class LRSchedule(Callback):
    """Sets every learning rate to its base rate times ``factor(epoch)`` at each epoch's start."""

    def __init__(self, optimizers: Optimizers, factor: Callable[[int], float]):
        self.optimizers, self.factor = optimizers, factor

    def on_epoch_start(self, loop: Loop) -> None:
        for opt in self.optimizers.all():
            for group in opt.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * self.factor(loop.epoch)


GRACE_SECONDS = 1.0  # what Ctrl-C gives a step (a validation, a scoring) to finish


class Abandoned(KeyboardInterrupt):
    """Ctrl-C cut short what ran inside ``abandonable()``: a step, a validation or the gap
    scoring that went on past ``GRACE_SECONDS`` after it. Nothing of it was applied; the loop
    turns it into ``Interrupted``. A ``KeyboardInterrupt``, so that no ``except Exception``
    on the way (a compile that falls back to eager) takes it for a failure."""


_listener: Optional["StopOnCtrlC"] = None  # the running ``fit``'s, while it listens


def _listening() -> bool:
    return _listener is not None


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
            self._owner._enter()
        return self

    def __exit__(self, *exc) -> None:
        if self._owner is not None:
            self._owner._exit()


class StopOnCtrlC(Callback):
    """Ctrl-C (SIGINT) becomes a flag read between steps, so a step is not cut in half; the
    loop then raises ``Interrupted`` carrying the position to resume from.

    A phase that can run long (a step, a validation, the gap scoring: ``abandonable()``) is
    given ``grace`` seconds after Ctrl-C to end; past them (or at a second Ctrl-C) it is
    abandoned with nothing applied: a timer sends SIGINT to the main thread again, whose
    handler then raises ``Abandoned``, which ends even a wait on a compiler that hangs."""

    def __init__(self, grace: float = GRACE_SECONDS):
        self.grace = grace

    def on_start(self, loop: Loop) -> None:
        global _listener
        self.flag, self.previous, self.outer = False, None, None
        self._since: Optional[float] = None  # when Ctrl-C came (time.monotonic)
        self._presses, self._depth, self._raised = 0, 0, False
        self._lock, self._timer, self._installed = threading.RLock(), None, False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.outer, _listener, self._installed = _listener, self, True

    def _handle(self, signum, frame):
        if not self.flag:
            self.flag, self._since = True, time.monotonic()
        self._presses += 1
        if self._depth:
            self._abandon_if_due()

    def _abandon_if_due(self) -> None:
        """Inside a phase, with Ctrl-C pressed: raise ``Abandoned`` once the grace is spent
        or at a second Ctrl-C; else arm the timer that comes back when it is spent."""
        if self._raised:
            return
        left = self.grace - (time.monotonic() - self._since)
        if left <= 0 or self._presses > 1:
            self._raised = True
            self._disarm()
            raise Abandoned()
        self._arm(left)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            return
        main = threading.main_thread().ident

        def again():
            with self._lock:  # not once the phase is over (``_disarm``)
                if self._timer is not None:
                    if hasattr(signal, "pthread_kill"):  # wakes a blocking call too
                        signal.pthread_kill(main, signal.SIGINT)
                    else:
                        _thread.interrupt_main(signal.SIGINT)

        self._timer = threading.Timer(seconds + 0.01, again)
        self._timer.daemon = True
        self._timer.start()

    def _disarm(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _enter(self) -> None:
        if threading.get_ident() != threading.main_thread().ident:
            return
        self._depth += 1
        if self.flag:  # Ctrl-C came before the phase: what is left of the grace
            self._abandon_if_due()

    def _exit(self) -> None:
        if threading.get_ident() != threading.main_thread().ident or not self._depth:
            return
        self._depth -= 1
        if not self._depth:
            self._disarm()

    def after_step(self, loop: Loop) -> bool:
        if self.flag:
            raise Interrupted(loop.position())
        return False

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        if self.flag:  # Ctrl-C during validation or checkpointing: stop at the boundary
            raise Interrupted(loop.boundary())
        return False

    def on_end(self, loop: Loop) -> None:
        if self.flag:  # Ctrl-C in the last epoch's scoring, which ended within the grace
            raise Interrupted(loop.boundary())

    def close(self) -> None:
        global _listener
        if not getattr(self, "_installed", False):
            return
        self._installed, self._depth = False, 0
        self._disarm()
        # None: a handler not set from Python; Python's own is the nearest to it
        signal.signal(signal.SIGINT, self.previous if self.previous is not None
                      else signal.default_int_handler)
        self.previous = None
        if _listener is self:
            _listener = self.outer


Progress = Union[bool, str, None]  # fit's ``progress``: True, "lines", False, or None (auto)


def progress_default() -> bool:
    """The rule of ``progress=None``: show progress where a person watches, that is when
    stderr is a terminal (a bar, and a line per epoch), and stay quiet otherwise (a script,
    a notebook's captured stream, a pipe to a file)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def resolve_progress(progress: Progress) -> Union[bool, str]:
    """``progress`` as ``ProgressBar`` takes it: None becomes ``progress_default()``."""
    return progress_default() if progress is None else progress


class ProgressBar(Callback):
    """A tqdm bar of steps, or of budget seconds for a budget run (whose epochs are only a
    ceiling), drawn only on a terminal, and a line per epoch (through ``log`` when no bar).

    ``enabled``: True (a bar on a terminal, else lines), ``"lines"`` (lines only) or False
    (silent)."""

    def __init__(self, epochs: int, max_seconds: Optional[float] = None, enabled: bool = True,
                 log: Callable[[str], None] = logs.info):
        self.epochs, self.max_seconds, self.enabled, self.log = epochs, max_seconds, enabled, log
        self.bar = None

    def on_start(self, loop: Loop) -> None:
        from tqdm.auto import tqdm
        if self.max_seconds is not None:
            self.bar = tqdm(total=float(self.max_seconds),
                            initial=min(loop.wall, self.max_seconds), unit="s",
                            disable=None if self.enabled is True else True,
                            dynamic_ncols=True, leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training "
                                       "[{elapsed}{postfix}]")
        else:
            done = loop.epoch * loop.steps_per_epoch + loop.resume_step
            self.bar = tqdm(total=self.epochs * loop.steps_per_epoch, initial=done,
                            disable=None if self.enabled is True else True, unit="step",
                            dynamic_ncols=True, leave=False)

    def after_step(self, loop: Loop) -> bool:
        if loop.step % 20 == 0 and loop.shown == loop.shown:  # as of the last host read
            self.bar.set_postfix(epoch=loop.epoch + 1, elbo=f"{loop.shown:.2f}")
        if self.max_seconds is None:
            self.bar.update(1)
        else:
            self.bar.update(min(loop.run_seconds(), self.max_seconds) - self.bar.n)
        return False

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        line = (f"epoch {metrics.epoch:3d}  train {metrics.train_elbo:9.3f}  "
                f"valid {metrics.valid_elbo:9.3f}  {metrics.seconds:6.1f}s")
        if not self.enabled:  # asked for silence
            return False
        if self.bar.disable:  # not a terminal: the line alone, through the log
            self.log(line)
        else:
            self.bar.write(line)
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fit(model, guide, objective, train: Split, optimizers: Optimizers, epochs: int,
        batch_size: int, binarize: Binarize, seed: int = 0, start_epoch: Optional[int] = None,
        warmup_epochs: int = 0, beta: float = 1.0, max_seconds: Optional[float] = None,
        validate: Optional[Callable[[], float]] = None,
        on_epoch: Optional[Callable[[EpochMetrics], None]] = None,
        progress: Progress = None, history: Optional[List[EpochMetrics]] = None,
        position: Optional[Position] = None, on_divergence: str = "stop",
        callbacks: Sequence[Callback] = (), log: Callable[[str], None] = logs.info,
        shards: Optional[Shards] = None, rank: int = 0, ctrl_c: bool = True,
        read_every: int = READ_EVERY) -> List[EpochMetrics]:
    """Train for epochs ``start_epoch .. epochs-1`` (by default from ``len(history)``);
    returns the per-epoch metrics.

    ``objective`` is any ``(model, guide, batch, **kwargs) -> loss``. The data order of
    epoch e comes from a generator seeded with (seed, e), so two guides trained with the same
    seed see the same minibatches, and a resumed run sees the same order as an uninterrupted
    one; ``position`` resumes inside an epoch. ``beta`` is the KL weight and
    ``warmup_epochs`` a linear warm-up to it from 0 (``kl_warmup``); when either is not the
    default the weight is handed to the objective as ``beta=`` every step, so the objective
    must take it (``takes_beta``), and the metrics record it. ``validate()`` scores the model
    after every epoch; ``on_epoch`` (checkpointing, logging) runs after it; ``callbacks``
    come after those.

    ``progress``: None (the default) shows a progress bar and a line per epoch when stderr
    is a terminal and nothing otherwise (``progress_default``); True draws the bar on a
    terminal and otherwise sends the epoch lines to ``log``; ``"lines"`` the lines alone
    (through ``log`` when there is no bar); False nothing.

    A non-finite loss or gradient never reaches the parameters: with ``on_divergence="stop"``
    it raises ``DivergenceError`` naming the epoch and step; with ``"lower_lr"`` it halves
    every learning rate, skips the batch and goes on (at most 10 times). Ctrl-C finishes the
    current step and raises ``Interrupted`` carrying the position to resume from (with
    ``ctrl_c``; a torchrun process leaves Ctrl-C to torchrun); a step, validation or gap
    scoring still running ``GRACE_SECONDS`` after Ctrl-C is abandoned with nothing applied
    (``StopOnCtrlC``). ``shards`` and ``rank``: the
    rows this process draws under torchrun (``data.Shards``; by default all rows in batches
    of ``batch_size``); ``read_every``: steps between host reads of the divergence guard
    (``loop``).
    """
    shards = shards or Shards(len(train), 1, batch_size)
    schedule = _beta_schedule(objective, beta, warmup_epochs, shards.steps)
    state = Loop(len(train), shards.steps, history or (), position, beta, start_epoch)
    pieces = _fit_callbacks(epochs, validate=validate, on_epoch=on_epoch,
                            progress=resolve_progress(progress),
                            max_seconds=max_seconds, ctrl_c=ctrl_c, log=log)
    return loop(model, guide, objective, train, optimizers, epochs, binarize=binarize,
                shards=shards, state=state, seed=seed, beta=schedule,
                callbacks=[*pieces, *callbacks], on_divergence=on_divergence, log=log,
                rank=rank, read_every=read_every)


def _beta_schedule(objective, beta: float, warmup_epochs: int,
                   steps_per_epoch: int) -> Optional[BetaSchedule]:
    """The KL weight ``fit`` hands the objective every step (``kl_warmup``), or None when
    ``beta`` and ``warmup_epochs`` are at their defaults; ``UserError`` when the objective
    takes no ``beta``."""
    if not warmup_epochs and beta == 1.0:
        return None
    if not takes_beta(objective):
        raise UserError(f"the objective {objective!r} has no KL weight to warm up or set "
                        f"(beta={beta}, warmup_epochs={warmup_epochs}); use an ELBO "
                        f"objective or leave both at their defaults")
    return kl_warmup(beta, warmup_epochs, steps_per_epoch)


def _fit_callbacks(epochs: int, *, validate: Optional[Callable[[], float]],
                   on_epoch: Optional[Callable[[EpochMetrics], None]], progress,
                   max_seconds: Optional[float], ctrl_c: bool,
                   log: Callable[[str], None]) -> List[Callback]:
    """``fit``'s callbacks, in the order they run: validation, the progress bar, ``on_epoch``
    (checkpoints), Ctrl-C (after the checkpoint: Ctrl-C there stops at the boundary) and the
    time budget."""
    pieces: List[Callback] = []
    if validate is not None:
        pieces.append(Validate(validate))
    pieces.append(ProgressBar(epochs, max_seconds, progress, log))
    if on_epoch is not None:
        pieces.append(OnEpoch(on_epoch))
    if ctrl_c:
        pieces.append(StopOnCtrlC())
    if max_seconds is not None:
        pieces.append(TimeBudget(max_seconds))
    return pieces
