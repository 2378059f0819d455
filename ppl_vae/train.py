"""The training loop, visible: ``loop`` draws a batch, takes a step and records it; everything
around it (progress bar, time budget, Ctrl-C, validation, checkpoints, learning-rate schedule)
is a ``Callback``, and KL warm-up is a schedule of beta handed to the objective per step.

``fit(model, guide, objective, data, optimizers, ...)`` assembles the usual callbacks from
keyword arguments and runs the loop. One step asks the guide for the loss it trains on
(``guides.training_loss``, by default ``objective(model, guide, batch)``); a guide with
per-datapoint tables first takes ``inner_steps`` updates of its batch rows alone (stochastic
variational inference in the style of Hoffman et al. 2013), then a joint step.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from . import guides, logs
from .data import Batch, Binarize, Split, minibatches, num_batches
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
    """A non-finite loss or gradient: the step was stopped before it touched the parameters."""


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
    """Training stopped on SIGINT (Ctrl-C) after finishing its current step."""

    def __init__(self, position: Position):
        super().__init__(f"interrupted at epoch {position.epoch + 1}, step {position.step}")
        self.position = position


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
    ``DivergenceError`` before the optimizers touch the parameters, and rows of a
    per-datapoint table already moved by the step's inner updates are put back.
    """
    saved = None
    if guard and optimizers.local is not None and optimizers.inner_steps:
        saved = [save_rows(optimizers.local, t, batch.idx) for t in optimizers.tables()]
    try:
        return _step(model, guide, objective, batch, optimizers, guard, kwargs)
    except DivergenceError:
        for table, rows in zip(optimizers.tables(), saved or ()):
            restore_rows(optimizers.local, table, batch.idx, rows)
        raise


def _step(model, guide, objective, batch, optimizers, guard, kwargs) -> torch.Tensor:
    if optimizers.local is not None:
        tables = optimizers.tables()
        for _ in range(optimizers.inner_steps):
            loss = guides.training_loss(guide, objective, model, batch, **kwargs)
            grads = torch.autograd.grad(loss, tables)
            if guard and not _finite(loss, *grads):
                raise DivergenceError("non-finite loss or gradient in a local step; "
                                      "the step was not applied")
            for table, grad in zip(tables, grads):
                table.grad = grad
            optimizers.local.step()
        for table in tables:
            table.grad = None
    optimizers.zero_grad()
    loss = guides.training_loss(guide, objective, model, batch, **kwargs)
    loss.backward()
    if guard and not check_finite(loss, optimizers):
        optimizers.zero_grad()
        raise DivergenceError("non-finite loss or gradient; the step was not applied")
    optimizers.step()
    return loss.detach()


def check_finite(loss: torch.Tensor, optimizers: Optimizers) -> bool:
    """True when the loss and every gradient are finite."""
    grads = [p.grad for opt in optimizers.all() for group in opt.param_groups
             for p in group["params"] if p.grad is not None]
    return _finite(loss, *grads)


def _finite(*tensors: torch.Tensor) -> bool:
    """True when every entry is finite: one reduction per tensor, one host sync in all.

    A sum is non-finite exactly when some entry is NaN or infinite (or the finite entries
    overflow, which is as much a sign of divergence).
    """
    sums = [(t.coalesce().values() if t.is_sparse else t).sum() for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all())


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

    def begin(self, epoch: int, device) -> None:
        p = self._resume if self._resume is not None and self._resume.epoch == epoch else None
        self._resume = None
        self.epoch, self.valid = epoch, math.nan
        self.step, self.loss_sum, self.before, self.taken = \
            (p.step, p.loss_sum, p.seconds, p.taken) if p else (0, 0.0, 0.0, 0)
        self.epoch_loss = torch.zeros((), device=device)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this epoch (re)started."""
        return time.perf_counter() - self.started

    def run_seconds(self) -> float:
        return self.wall + self.elapsed()

    def record(self, loss: torch.Tensor, beta: Optional[float]) -> None:
        self.epoch_loss += loss
        self.steps += 1
        self.taken += 1
        self.last_loss = loss
        if beta is not None:
            self.beta = float(beta)

    def position(self) -> Position:
        return Position(self.epoch, self.step, self.loss_sum + float(self.epoch_loss),
                        self.before + self.elapsed(), self.run_seconds(), self.steps, self.taken)

    def end_epoch(self) -> EpochMetrics:
        elapsed = self.elapsed()
        seconds = self.before + elapsed
        self.wall += elapsed
        train = -(self.loss_sum + float(self.epoch_loss)) / (self.n * max(self.taken, 1))
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

    def close(self) -> None:
        pass


def loop(model, guide, objective, train: Split, optimizers: Optimizers, epochs: int,
         batch_size: int, binarize: Binarize, seed: int = 0, beta: Optional[BetaSchedule] = None,
         callbacks: Sequence[Callback] = (), state: Optional[Loop] = None,
         on_divergence: str = "stop", log: Callable[[str], None] = logs.info
         ) -> List[EpochMetrics]:
    """The core loop: epochs of seeded minibatches, one guarded step each, callbacks around."""
    state = state or Loop(len(train), num_batches(len(train), batch_size))
    try:
        for cb in callbacks:
            cb.on_start(state)
        for epoch in range(state.epoch, epochs):
            state.begin(epoch, train.x.device)
            for cb in callbacks:
                cb.on_epoch_start(state)
            if state.stop:
                break
            order = torch.Generator().manual_seed(seed * 100_003 + epoch)
            for batch in minibatches(train, batch_size, binarize, order, start=state.step):
                kwargs = {} if beta is None else {"beta": beta(epoch, state.step)}
                try:
                    loss = step(model, guide, objective, batch, optimizers, **kwargs)
                except DivergenceError as e:
                    _recover(e, state, optimizers, on_divergence, log)
                else:
                    state.record(loss, kwargs.get("beta"))
                state.step += 1
                if any([cb.after_step(state) for cb in callbacks]):
                    break
            for cb in callbacks:
                cb.on_epoch_end(state)
            metrics = state.end_epoch()
            if any([cb.on_metrics(state, metrics) for cb in callbacks]):
                break
    finally:
        for cb in callbacks:
            cb.close()
    return state.history


def _recover(error: DivergenceError, state: Loop, optimizers, on_divergence: str, log) -> None:
    """Stop on a diverged step, or halve every rate and skip its batch (at most 10 times)."""
    where = f"epoch {state.epoch + 1}, step {state.step + 1}: {error}"
    if on_divergence != "lower_lr" or state.lowered >= 10:
        raise DivergenceError(where) from None
    state.lowered += 1
    lower_lr(optimizers)
    log(f"{where}; learning rates halved, batch skipped")


class Validate(Callback):
    """Scores the model after every epoch: ``valid_elbo`` of the epoch's metrics."""

    def __init__(self, score: Callable[[], float]):
        self.score = score

    def on_epoch_end(self, loop: Loop) -> None:
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


class LRSchedule(Callback):
    """Sets every learning rate to its base rate times ``factor(epoch)`` at each epoch's start."""

    def __init__(self, optimizers: Optimizers, factor: Callable[[int], float]):
        self.optimizers, self.factor = optimizers, factor

    def on_epoch_start(self, loop: Loop) -> None:
        for opt in self.optimizers.all():
            for group in opt.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * self.factor(loop.epoch)


class StopOnCtrlC(Callback):
    """Ctrl-C (SIGINT) becomes a flag read between steps, so no step is cut in half; the loop
    then raises ``Interrupted`` carrying the position to resume from."""

    def on_start(self, loop: Loop) -> None:
        self.flag, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def after_step(self, loop: Loop) -> bool:
        if self.flag:
            raise Interrupted(loop.position())
        return False

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        if self.flag:  # Ctrl-C during validation or checkpointing: stop at the boundary
            raise Interrupted(Position(loop.epoch + 1, 0, 0.0, 0.0, loop.wall, loop.steps, 0))
        return False

    def close(self) -> None:
        if getattr(self, "previous", None) is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


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
            done = loop.epoch * loop.steps_per_epoch + (loop._resume.step if loop._resume else 0)
            self.bar = tqdm(total=self.epochs * loop.steps_per_epoch, initial=done,
                            disable=None if self.enabled is True else True, unit="step",
                            dynamic_ncols=True, leave=False)

    def after_step(self, loop: Loop) -> bool:
        if loop.step % 20 == 1 and loop.last_loss is not None:
            self.bar.set_postfix(epoch=loop.epoch + 1,
                                 elbo=f"{-float(loop.last_loss) / loop.n:.2f}")
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
        warmup_epochs: int = 0,
        beta: Optional[BetaSchedule] = None, max_seconds: Optional[float] = None,
        validate: Optional[Callable[[], float]] = None,
        on_epoch: Optional[Callable[[EpochMetrics], None]] = None,
        progress: bool = True, history: Optional[List[EpochMetrics]] = None,
        position: Optional[Position] = None, on_divergence: str = "stop",
        callbacks: Sequence[Callback] = (), log: Callable[[str], None] = logs.info
        ) -> List[EpochMetrics]:
    """Train for epochs ``start_epoch .. epochs-1`` (by default from ``len(history)``);
    returns the per-epoch metrics.

    ``objective`` is any ``(model, guide, batch, **kwargs) -> loss``. The data order of
    epoch e comes from a generator seeded with (seed, e), so two guides trained with the same
    seed see the same minibatches, and a resumed run sees the same order as an uninterrupted
    one; ``position`` resumes inside an epoch. ``beta`` is a schedule of the KL weight handed
    to the objective as ``beta=`` every step (``warmup_epochs`` builds the linear warm-up to
    ``objective.beta``). ``validate()`` scores the model after every epoch; ``on_epoch``
    (checkpointing, logging) runs after it; ``callbacks`` come after those.

    A non-finite loss or gradient never reaches the parameters: with ``on_divergence="stop"``
    it raises ``DivergenceError`` naming the epoch and step; with ``"lower_lr"`` it halves
    every learning rate, skips the batch and goes on (at most 10 times). Ctrl-C finishes the
    current step and raises ``Interrupted`` carrying the position to resume from.
    """
    steps_per_epoch = num_batches(len(train), batch_size)
    default_beta = getattr(objective, "beta", 1.0)
    if warmup_epochs and beta is None:
        beta = kl_warmup(default_beta, warmup_epochs, steps_per_epoch)
    state = Loop(len(train), steps_per_epoch, history or (), position, default_beta, start_epoch)
    pieces: List[Callback] = [ProgressBar(epochs, max_seconds, progress, log)]
    if validate is not None:
        pieces.insert(0, Validate(validate))
    if on_epoch is not None:
        pieces.append(OnEpoch(on_epoch))
    pieces.append(StopOnCtrlC())  # after the checkpoint: Ctrl-C there stops at the boundary
    if max_seconds is not None:
        pieces.append(TimeBudget(max_seconds))
    return loop(model, guide, objective, train, optimizers, epochs, batch_size, binarize, seed,
                beta, [*pieces, *callbacks], state, on_divergence, log)
