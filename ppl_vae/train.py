"""The training loop, visible: ``fit(model, guide, objective, data, optimizers, ...)``.

One step draws a minibatch (rows of a seeded permutation, binarized afresh when dynamic),
evaluates the objective from the model's and guide's traces and updates the parameters.
A per-datapoint guide first takes ``inner_steps`` updates of its batch rows alone (stochastic
variational inference in the style of Hoffman et al. 2013), then a joint step.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Callable, List, NamedTuple, Optional

import torch

from .data import Batch, Binarize, Split, minibatches, num_batches
from .optim import Optimizers, restore_rows, save_rows


class EpochMetrics(NamedTuple):
    epoch: int  # 1-based
    train_elbo: float  # mean per-image training objective over the epoch's steps (nats)
    valid_elbo: float  # per-image ELBO on the validation rows (nats); nan when not scored
    seconds: float  # training time of this epoch (validation excluded)
    wall: float  # training time since the start of the run
    steps: int  # optimizer steps so far
    beta: float  # KL weight used in this epoch


class DivergenceError(RuntimeError):
    """A non-finite loss or gradient: the step was stopped before it touched the parameters."""


def beta_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, warmup_epochs: int,
            beta: float) -> float:
    """Linear KL warm-up from 0 to ``beta`` over ``warmup_epochs`` (0 based epoch)."""
    if warmup_epochs <= 0:
        return beta
    progress = (epoch + step_in_epoch / steps_per_epoch) / warmup_epochs
    return beta * min(1.0, progress)


def step(model, guide, objective, batch: Batch, optimizers: Optimizers,
         guard: bool = True) -> torch.Tensor:
    """One SVI step; returns the (detached) loss.

    With ``guard`` the step is all or nothing: a non-finite loss or gradient raises
    ``DivergenceError`` before the optimizers touch the parameters, and rows of a
    per-datapoint table already moved by the step's inner updates are put back.
    """
    saved = None
    if guard and optimizers.local is not None and optimizers.inner_steps:
        saved = save_rows(optimizers.local, guide.params, batch.idx)
    try:
        return _step(model, guide, objective, batch, optimizers, guard)
    except DivergenceError:
        if saved is not None:
            restore_rows(optimizers.local, guide.params, batch.idx, saved)
        raise


def _step(model, guide, objective, batch, optimizers, guard) -> torch.Tensor:
    if optimizers.local is not None:
        table = guide.params
        for _ in range(optimizers.inner_steps):
            loss = objective(model, guide, batch)
            (table.grad,) = torch.autograd.grad(loss, [table])
            if guard and not _finite(loss, table.grad):
                table.grad = None
                raise DivergenceError("non-finite loss or gradient in a local step; "
                                      "the step was not applied")
            optimizers.local.step()
        table.grad = None
    optimizers.zero_grad()
    loss = objective(model, guide, batch)
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


class _StopOnSigint:
    """Turn SIGINT into a flag the loop reads between steps, so no step is cut in half."""

    def __enter__(self):
        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def lower_lr(optimizers: Optimizers, factor: float = 0.5) -> None:
    for opt in optimizers.all():
        for group in opt.param_groups:
            group["lr"] *= factor


def fit(model, guide, objective, train: Split, optimizers: Optimizers, epochs: int,
        batch_size: int, binarize: Binarize, seed: int = 0, start_epoch: int = 0,
        warmup_epochs: int = 0, max_seconds: Optional[float] = None,
        validate: Optional[Callable[[], float]] = None,
        on_epoch: Optional[Callable[[EpochMetrics], None]] = None,
        progress: bool = True, history: Optional[List[EpochMetrics]] = None,
        position: Optional[Position] = None, on_divergence: str = "stop",
        log: Callable[[str], None] = print) -> List[EpochMetrics]:
    """Train for epochs ``start_epoch .. epochs-1``; returns the per-epoch metrics.

    The data order of epoch e comes from a generator seeded with (seed, e), so two guides
    trained with the same seed see the same minibatches, and a resumed run sees the same
    order as an uninterrupted one; ``position`` resumes inside an epoch. ``validate()``
    scores the model after every epoch; ``on_epoch`` (checkpointing, logging) runs after it.

    A non-finite loss or gradient never reaches the parameters: with ``on_divergence="stop"``
    it raises ``DivergenceError`` naming the epoch and step; with ``"lower_lr"`` it halves
    every learning rate, skips the batch and goes on (at most 10 times). Ctrl-C finishes the
    current step and raises ``Interrupted`` carrying the position to resume from.
    """
    from tqdm.auto import tqdm

    history = list(history or [])
    n = len(train)
    steps_per_epoch = num_batches(n, batch_size)
    wall = history[-1].wall if history else 0.0
    total_steps = history[-1].steps if history else 0
    if position is not None:
        start_epoch, wall, total_steps = position.epoch, position.wall, position.steps
    lowered = 0
    # A budget run counts seconds of its budget (its epochs are only a ceiling, so a bar of
    # epochs x steps would stop at a fraction); otherwise the bar counts steps.
    if max_seconds is not None:
        bar = tqdm(total=float(max_seconds), initial=min(wall, max_seconds), unit="s",
                   disable=None if progress else True, dynamic_ncols=True, leave=False,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training [{elapsed}{postfix}]")
    else:
        bar = tqdm(total=(epochs - start_epoch) * steps_per_epoch, disable=None if progress else True,
                   unit="step", dynamic_ncols=True, leave=False)

    def out_of_time(seconds_this_epoch: float) -> bool:
        """Whether the budget is spent, given the seconds run in this epoch since ``start``."""
        return max_seconds is not None and wall + seconds_this_epoch >= max_seconds

    def advance(seconds_this_epoch: float) -> None:
        if max_seconds is None:
            bar.update(1)
        else:
            bar.update(min(wall + seconds_this_epoch, max_seconds) - bar.n)

    with _StopOnSigint() as sigint:
        for epoch in range(start_epoch, epochs):
            if out_of_time(0.0):  # a resumed run whose budget is spent
                break
            order = torch.Generator().manual_seed(seed * 100_003 + epoch)
            first, loss_sum, before, taken = 0, 0.0, 0.0, 0
            if position is not None and epoch == position.epoch:
                first, loss_sum, before = position.step, position.loss_sum, position.seconds
                taken = position.taken
                if max_seconds is None:
                    bar.update(first)
            epoch_loss, start = torch.zeros((), device=train.x.device), time.perf_counter()
            beta = objective.beta
            batches = minibatches(train, batch_size, binarize, order, start=first)
            for i, batch in enumerate(batches, start=first):
                if warmup_epochs:
                    beta = beta_at(epoch, i, steps_per_epoch, warmup_epochs, objective.beta)
                    current = dataclasses.replace(objective, beta=beta)
                else:
                    current = objective
                try:
                    loss = step(model, guide, current, batch, optimizers)
                except DivergenceError as e:
                    where = f"epoch {epoch + 1}, step {i + 1}: {e}"
                    if on_divergence != "lower_lr" or lowered >= 10:
                        bar.close()
                        raise DivergenceError(where) from None
                    lowered += 1
                    lower_lr(optimizers)
                    log(f"{where}; learning rates halved, batch skipped")
                else:
                    epoch_loss += loss
                    total_steps += 1
                    taken += 1
                    if i % 20 == 0:
                        bar.set_postfix(epoch=epoch + 1, elbo=f"{-float(loss) / n:.2f}")
                    advance(time.perf_counter() - start)
                if sigint.flag:
                    bar.close()
                    seconds = before + time.perf_counter() - start
                    raise Interrupted(Position(epoch, i + 1, loss_sum + float(epoch_loss),
                                               seconds, wall + seconds - before, total_steps,
                                               taken))
                if out_of_time(time.perf_counter() - start):  # (wall already holds ``before``)
                    break  # the budget ends mid-epoch: score and record the partial epoch
            seconds = before + time.perf_counter() - start
            wall += seconds - before
            valid = validate() if validate is not None else math.nan
            train_elbo = -(loss_sum + float(epoch_loss)) / (n * max(taken, 1))
            metrics = EpochMetrics(epoch + 1, train_elbo, valid, seconds, wall, total_steps, beta)
            history.append(metrics)
            line = (f"epoch {epoch + 1:3d}  train {metrics.train_elbo:9.3f}  "
                    f"valid {valid:9.3f}  {seconds:6.1f}s")
            bar.write(line) if progress else log(line)  # bars: only on a terminal
            if on_epoch is not None:
                on_epoch(metrics)
            if sigint.flag:  # Ctrl-C during validation or checkpointing: stop at the boundary
                bar.close()
                raise Interrupted(Position(epoch + 1, 0, 0.0, 0.0, wall, total_steps, 0))
            if out_of_time(0.0):
                break
    bar.close()
    return history
