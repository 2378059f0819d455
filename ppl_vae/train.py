"""The training loop, visible: ``loop`` draws a batch, takes a step (``step.step_on_device``)
and records it (``loopstate.Loop``); everything around it (progress bar, time budget, Ctrl-C,
validation, checkpoints, learning-rate schedule) is a ``callbacks.Callback``, and KL warm-up
is a schedule of beta handed to the objective per step.
Steps never wait on the host: whether each was applied is counted on the device
(``Loop.record``) and read every ``READ_EVERY`` steps and at each epoch's end, where a step
that diverged (and was not applied) stops the run or lowers the learning rates.

``fit(model, guide, objective, data, optimizers, ...)`` builds the defaults (the batches,
``batching.Shards``; the beta schedule; the ``Loop`` state) and the usual callbacks from keyword
arguments and calls ``loop``. One step, its divergence guard and its inner local-only steps
are ``step.py``.

Layering: the top of training; imports ``step``, ``loopstate`` and ``callbacks``, which do
not import it. ``run`` drives it; ``config`` reads ``burda_factor`` from it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import errors, logs
from .protocol import as_guide
from .batching import Batch, Shards
from .callbacks import (Callback, OnEpoch, Progress, ProgressBar, StopOnCtrlC, TimeBudget,
                        Validate, resolve_progress)
from .config import refuse_beta
from .data import Binarize, Split
from .loopstate import EpochMetrics, Interrupted, Loop, Position
from .optim import Optimizers
from .step import Abandoned, DivergenceError, listening, step_on_device

# (epoch [0-based], step within the epoch) -> beta, the KL weight of that step
BetaSchedule = Callable[[int, int], float]


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


def lower_lr(optimizers: Optimizers, factor: float = 0.5) -> None:
    for opt in optimizers.all():
        for group in opt.param_groups:
            group["lr"] *= factor
            if "base_lr" in group:  # a schedule's base rate comes down with it
                group["base_lr"] *= factor


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
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
    ``shards`` and ``rank`` say which rows this process draws (``batching.Shards``); ``binarize``
    is then this process's noise.

    Why so many parameters: ``loop`` is the visible training loop's Python API: the pieces
    (model, guide, objective, data, optimizers), its state (history, position) and its hooks
    (callbacks, guard, logging) are each a keyword a user may pass; ``fit`` builds them from
    plain settings.
    """
    guide = as_guide(guide)  # a guide handed to the Python API: the protocol's defaults
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
        if not listening():
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
    """The guide's diagnosis of a divergence on ``batch`` (``divergence_cause``):
    (setting, why in words), or None: the learning rate. A diagnosis that fails is none."""
    if guide is None or batch is None:
        return None
    try:
        return guide.divergence_cause(model, batch)
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
    rows this process draws under torchrun (``batching.Shards``; by default all rows in batches
    of ``batch_size``); ``read_every``: steps between host reads of the divergence guard
    (``loop``).

    Why so many parameters: ``fit`` is the one-call Python API of training: every keyword is
    a plain setting it turns into ``loop``'s pieces (batches, schedules, callbacks); a
    frozen plan record would carry the same settings under another name.
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
    refuse_beta(objective, beta, warmup_epochs)
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
