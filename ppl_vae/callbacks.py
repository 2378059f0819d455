"""The hooks around the training loop: the ``Callback`` interface and the callbacks ``fit``
and ``run`` use: ``Validate`` (the validation score), ``OnEpoch`` (checkpoints, logs),
``TimeBudget`` and ``StepBudget``, ``LRSchedule``, ``StopOnCtrlC`` (Ctrl-C as a flag read
between steps, and the grace after which ``abandonable`` phases are cut short) and
``ProgressBar`` (with ``progress_default``, the rule of ``progress=None``).

Layering: above ``step`` (``abandonable`` and its listener slot) and ``loopstate`` (the
``Loop`` they read); below ``train``, whose ``fit`` builds the usual ones. ``heldout``'s
``GapTracker`` is a ``Callback`` too.
"""
from __future__ import annotations

import _thread
import signal
import sys
import threading
import time
from typing import Callable, Optional, Union

from . import logs
from .loopstate import EpochMetrics, Interrupted, Loop
from .optim import Optimizers
from .step import GRACE_SECONDS, Abandoned, abandonable, listen, listener


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
        self.flag, self.previous, self.outer = False, None, None
        self._since: Optional[float] = None  # when Ctrl-C came (time.monotonic)
        self._presses, self._depth, self._raised = 0, 0, False
        self._lock, self._timer, self._installed = threading.RLock(), None, False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.outer, self._installed = listen(self), True

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

    def enter_phase(self) -> None:
        if threading.get_ident() != threading.main_thread().ident:
            return
        self._depth += 1
        if self.flag:  # Ctrl-C came before the phase: what is left of the grace
            self._abandon_if_due()

    def exit_phase(self) -> None:
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
        if not getattr(self, "_installed", False):
            return
        self._installed, self._depth = False, 0
        self._disarm()
        # None: a handler not set from Python; Python's own is the nearest to it
        signal.signal(signal.SIGINT, self.previous if self.previous is not None
                      else signal.default_int_handler)
        self.previous = None
        if listener() is self:
            listen(self.outer)


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
