"""Where a training run stands: ``Loop`` (the state the core loop updates and callbacks read,
with the divergence guard's device-side counters), the per-epoch record ``EpochMetrics``, and
``Position``, where an interrupted epoch stopped, which ``Interrupted`` carries.

Layering: a leaf below ``callbacks`` and ``train``; imports only the data's ``Batch``.
``checkpoint`` and ``run`` read ``EpochMetrics`` and ``Position`` from here.
"""
from __future__ import annotations

import math
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .batching import Batch


class EpochMetrics(NamedTuple):
    epoch: int  # 1-based
    train_elbo: float  # mean per-image training objective over the epoch's steps (nats)
    valid_elbo: float  # per-image ELBO on the validation rows (nats); nan when not scored
    seconds: float  # training time of this epoch (validation excluded)
    wall: float  # training time since the start of the run
    steps: int  # optimizer steps so far
    beta: float  # KL weight used in this epoch's last step


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
        self.began = False  # whether an epoch has begun in this call (``begin``)
        self.last_loss: Optional[torch.Tensor] = None
        self.batch: Optional[Batch] = None  # the batch of the step in progress (or the last)
        self.shown = math.nan  # the epoch's mean training ELBO per image at the last host read

    def begin(self, epoch: int, device) -> None:
        self.began = True
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
    def at_epoch_end(self) -> bool:
        """Whether the run (re)starts right after its last finished epoch, no step of the next
        one taken: the state its checkpoint holds is that epoch's end."""
        p = self._resume
        return (p is None and self.epoch == len(self.history)) or (
            p is not None and p.step == 0 and p.epoch == len(self.history))

    def start(self) -> Position:
        """Where the run (re)starts, before its first step: what a Ctrl-C there keeps."""
        if self._resume is not None:
            return self._resume
        return Position(self.epoch, 0, 0.0, 0.0, self.wall, self.steps, 0)

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
        """The start of the next epoch, once this one's metrics are made (before any epoch
        began, e.g. Ctrl-C in a resume's scoring of its last epoch: where the run started)."""
        if not self.began:
            return self.start()
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
