"""The training pipeline: ``train_run(config, out)`` trains, checkpoints, scores and writes files.

Files written into ``out``: ``config.json`` (settings, library versions, git revision, the
command line, and every resume's changed settings), ``metrics.jsonl`` (one object per epoch),
``checkpoint.pt`` (every epoch, atomically), ``gaps.jsonl`` with ``track_gaps``, and
``summary.json`` (``test_elbo`` and timings) once the run has finished. How a run is set up
(its data, pieces, and a resumed checkpoint) and loaded back is ``run_setup``'s; which
folders may be written is ``rundir``'s business; scoring during training (validation, gap
curves) is ``heldout``'s, and a trained run's evaluation ``evaluation``'s.

Layering: above ``run_setup``; below ``cli`` and ``compare``, which train through it, and
``results`` (a ``Summary`` in the comparison's records).
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import batching, checkpoint, data, distributed, gap_plots, logs
from .build import lr_factor
from .config import Config, local_fit_options
from .errors import UserError, for_cli, setting
from .compiled import compiled_run
from .evaluate import Estimate
from .heldout import GapTracker, eval_pixels, held_out_elbo, read_gaps, train_pixels
from .rundir import RunDir
from .runfiles import (check_gaps, is_regular, set_aside_stale_evaluation, write_config, write_json,
                       write_text)
from .run_setup import Setup, Trained, epochs_text, set_up
from .tracking import open_tracker
from .callbacks import LRSchedule, StepBudget
from .loopstate import EpochMetrics, Interrupted, Position
from .step import DivergenceError
from .train import fit


@dataclass
class Summary:
    """What ``summary.json`` holds."""

    test_elbo: float
    test_elbo_stderr: float
    test_rows: int
    epochs: int
    steps: int
    seconds_per_epoch: float
    train_seconds: float
    steps_per_second: float
    eval_seconds: Optional[float]  # None when the caller scored the test set
    final_train_elbo: float
    final_valid_elbo: float
    guide: str
    dataset: str
    binarize: str
    memory: dict = field(default_factory=dict)
    gap_tracking_seconds: Optional[float] = None
    compiled: bool = False  # the step ran compiled (compiled.choose; a failed compile warns)
    # the first epoch holds a compile and warm-up; the steady state is the later epochs'
    # median (None for a run of one epoch)
    first_epoch_seconds: Optional[float] = None
    steady_seconds_per_epoch: Optional[float] = None
    steady_steps_per_second: Optional[float] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("memory"))
        return d

    def costs(self) -> dict:
        """What training took: counts, times, memory and whether the step was compiled (what
        a comparison gives beside each guide's scores); unmeasured ones left out."""
        d = {"epochs": self.epochs, "steps": self.steps, "train_seconds": self.train_seconds,
             "seconds_per_epoch": self.seconds_per_epoch,
             "steps_per_second": self.steps_per_second,
             "gap_tracking_seconds": self.gap_tracking_seconds, "compiled": self.compiled,
             "first_epoch_seconds": self.first_epoch_seconds,
             "steady_seconds_per_epoch": self.steady_seconds_per_epoch,
             "steady_steps_per_second": self.steady_steps_per_second, **self.memory}
        return {k: v for k, v in d.items() if v is not None}


def train_run(config: Config, out: Optional[Path] = None, overwrite: bool = False,
              resume: bool = False, progress=None,
              log: Callable[[str], None] = logs.info, trust_code: bool = False,
              state: Optional[dict] = None,
              then: Optional[Callable[[], object]] = None) -> Optional["Summary"]:
    """Train per ``config``, write the run's files into ``out`` and return its ``Summary``
    (under torchrun: rank 0 scores and writes it; the other processes return None).
    ``trust_code``: a resumed checkpoint may name code (``module:Class``) that ``config``
    does not (see ``registry.require_consent``). ``state``: the checkpoint a resume continues,
    already read (``run_setup.resumed_config``); None reads it. ``progress``: ``train.fit``'s
    (None: a bar where stderr is a terminal). ``then`` is called (on every process)
    once summary.json is written, while the folder's lock is still held: ``train
    --evaluate`` evaluates there, so no other process writes the folder in between.

    Why so many parameters: it is the ``train`` command's Python API; each keyword is one of
    its flags."""
    trained = fit_run(config, out, overwrite, resume, progress, log, trust_code, state)
    try:
        summary = (finish(trained, out, log, release=False) if distributed.current().main
                   else None)
        if then is not None:
            then()
    finally:
        release(trained)
    return summary


def release(trained: "Trained") -> None:
    """Release the lock that ``fit_run`` kept on the run's folder (``finish`` does it unless
    told not to); nothing when there is none or it was released."""
    if trained is not None and trained.folder is not None:
        trained.folder.close()


@contextlib.contextmanager
def holding(trained: "Trained"):
    """``with holding(fit_run(...)) as trained:`` keeps the run's folder locked for what
    follows (its scoring, ``finish(..., release=False)``, files of the caller's own) and
    releases it at the end, whatever happens."""
    try:
        yield trained
    finally:
        release(trained)


def fit_run(config: Config, out: Optional[Path] = None, overwrite: bool = False,
            resume: bool = False, progress=None,
            log: Callable[[str], None] = logs.info, trust_code: bool = False,
            state: Optional[dict] = None) -> Trained:
    """Train per ``config`` (writing config, metrics and checkpoints when ``out`` is given).

    Everything that can be refused is refused before anything is written: the settings, the
    folder, the data, the pieces and, for ``resume``, the checkpoint. Under torchrun every
    process trains its shard (``distributed``); rank 0 writes the files, and a refusal on any
    process stops all of them before the first step. The returned ``Trained`` keeps the
    run's folder locked (``Trained.folder``) for the files that follow: ``finish`` releases
    it (or ``release``, or ``holding``), so the lock is held from the first file to the last.
    """
    world = distributed.current()
    setup, error = None, None
    try:
        setup = set_up(config, out, overwrite, resume, world, log, trust_code, state)
    except UserError as e:
        error = e
    distributed.refuse_unless_all(error, world)
    try:
        return _train(setup, setup.config, world, progress, log)
    except BaseException:  # Ctrl-C before the loop took it over: no lock or staging left
        if setup.folder is not None:
            setup.folder.close()
        raise


def _train(setup: Setup, config: Config, world: distributed.World, progress, log) -> Trained:
    """Why so long: the run's life in order (config.json, the tracker, the callbacks, the loop,
    the checkpoint at every epoch, the end) with the lock held throughout; each step is a
    call, and the order is what the resume tests pin down."""
    (_, device, folder, splits, train_split, shards, binarize, model, guide, optimizers,
     validator, objective, history, position, resumes) = setup
    n = len(splits.train)
    setup_resumed = bool(history) or position is not None
    # config.json describes the checkpoint beside it: a new run's is written now, a resumed
    # run's is made now (a full disk shows before anything changes) and put in place once
    # the first checkpoint of the resumed run is saved
    pending: list = [None]
    if folder is not None:
        try:
            pending[0] = write_config(folder.file("config.json"), config.to_dict(),
                                      str(device), resumes, splits.describe(),
                                      world_size=world.size, place=not setup_resumed)
            _write_metrics(folder.file("metrics.jsonl"), history)
        except OSError as e:
            folder.close()
            raise UserError(f"could not write {e.filename or 'config.json'} in "
                            f"{folder.final} ({e.strerror or e}); the disk may be full: free "
                            f"space and run the command again (nothing else was changed)"
                            ) from None
        if not setup_resumed:
            pending[0] = None
    tracker_tb = None  # opened at the first epoch's end, in the folder as committed

    def save(done: list, position: Optional[Position] = None) -> None:
        if folder is None and world.size == 1:
            return
        guide_state, opt_states = distributed.full_state(guide, optimizers, world, n)
        rng, noise = checkpoint.rng_state(), binarize.generator.get_state()
        ranks = (distributed.gather_objects((rng, noise), world) if world.size > 1 else None)
        if folder is None:
            return
        state = {
            "config": config.to_dict(), "model": model.state_dict(), "guide": guide_state,
            "optimizers": opt_states, "valid_guide": validator.state_dict(),
            "history": [m._asdict() for m in done],
            "position": position._asdict() if position is not None else None,
            "rng": rng, "binarize_rng": noise, "world_size": world.size, "resumes": resumes}
        if ranks is not None:
            state["rng_ranks"] = [r for r, _ in ranks]
            state["binarize_rng_ranks"] = [b for _, b in ranks]
        checkpoint.save(state, folder.path)
        if setup_resumed and len(done) == len(history) + 1:
            # the old summary no longer holds; what an evaluation wrote is kept aside
            folder.set_aside_results(len(history), log)
        if len(done) > len(history):  # a finished epoch replaces an old run, an interrupted
            folder.commit()          # first epoch does not
        if pending[0] is not None:  # the resumed run's config.json, now that its
            try:                    # checkpoint is there
                os.replace(pending[0], folder.file("config.json"))
            except OSError as e:
                raise UserError(f"could not put config.json in place in {folder.path} "
                                f"({e.strerror or e}); the checkpoint holds the settings: "
                                f"continue with {setting('resume')}") from None
            pending[0] = None

    def on_epoch(metrics: EpochMetrics) -> None:
        # the checkpoint first: every epoch metrics.jsonl shows is saved (a kill in between
        # loses only the line, which a resume writes again from the checkpoint's history)
        done.append(metrics)
        save(done)
        if folder is not None:
            with open(folder.file("metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics._asdict()) + "\n")
        nonlocal tracker_tb
        if tracker_tb is None and folder is not None:
            tracker_tb = open_tracker(folder.path, config.tensorboard)
        if tracker_tb is not None:
            tracker_tb.epoch(metrics)

    done = list(history)
    callbacks = _schedules(config, optimizers)
    tracker = None
    if config.track_gaps and folder is not None:
        tracker = _gap_tracker(config, model, guide, splits, n, folder)
        callbacks.append(tracker)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        try:
            history = fit(model, guide, objective, train_split, optimizers, config.epochs,
                          config.batch_size, binarize, seed=config.seed, beta=config.beta,
                          warmup_epochs=config.warmup_epochs, max_seconds=config.max_seconds,
                          validate=validator if world.main else None, on_epoch=on_epoch,
                          progress=progress if world.main else False, history=history,
                          position=position, on_divergence=config.on_divergence,
                          callbacks=callbacks, log=log, shards=shards, rank=world.rank,
                          ctrl_c=world.size == 1)
        except Interrupted as e:
            if folder is not None and folder.staged:  # no epoch yet: close() drops it
                e.kept = _what_is_kept(folder, done, history)
            else:
                save(done, e.position)
            raise
        except DivergenceError as e:
            e.kept = _what_is_kept(folder, done, history)
            raise
        finally:
            if tracker_tb is not None:
                tracker_tb.close()
            if pending[0] is not None:  # a resume that saved no checkpoint: config.json
                pending[0].unlink(missing_ok=True)  # stays as its checkpoint
                pending[0] = None
    except BaseException:
        if folder is not None:  # the lock goes, an uncommitted attempt with it
            folder.close()
        raise
    # the folder stays locked until ``finish`` has written the run's last file
    return Trained(config, model, guide, splits, history, device,
                   gap_seconds=tracker.seconds if tracker is not None else None,
                   folder=folder)


def _what_is_kept(folder: Optional[RunDir], done: list, history: list) -> str:
    """What a run that stops on an error leaves, in words."""
    if folder is None:
        return "nothing was written"
    if folder.staged:  # it commits after its first epoch
        return f"the new run had not finished an epoch: {folder.final} is left as it was"
    if len(done) > 0:
        return f"the checkpoint after epoch {len(done)} is kept"
    return "no epoch finished, so no checkpoint was written"


def _schedules(config: Config, optimizers) -> list:
    factor = lr_factor(config)
    callbacks = [LRSchedule(optimizers, factor)] if factor is not None else []
    if config.max_steps is not None:
        callbacks.append(StepBudget(config.max_steps))
    return callbacks


def _gap_tracker(config: Config, model, guide, splits: data.Splits, n: int,
                 folder: RunDir) -> GapTracker:
    x_train = train_pixels(config, splits.train, config.gap_rows)
    x_test = eval_pixels(config, splits.test, config.gap_rows)
    return GapTracker(model, guide, x_train, n, x_test, config.gap_epochs, config.epochs,
                      config.gap_particles, lambda: folder.file("gaps.jsonl"),
                      local_options=local_fit_options(config))


def _write_metrics(path: Path, history) -> None:
    """metrics.jsonl from the checkpoint's history, put in place whole (what was there, even
    a named pipe, is replaced, never opened)."""
    write_text(path, "".join(json.dumps(m._asdict()) + "\n" for m in history))


def memory_summary(trained: Trained) -> dict:
    """Peak memory: process RSS (CPU) or allocator peak (CUDA), and parameter bytes."""
    params = sum(p.numel() * p.element_size()
                 for m in (trained.model, trained.guide) for p in m.parameters())
    out = {"param_mb": params / 2 ** 20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if trained.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(trained.device) / 2 ** 20
    return out


def steady_state(history) -> dict:
    """The first epoch's seconds (a compile and warm-up are in it) apart from the steady
    state: the median seconds of the later epochs, and their steps per second."""
    if not history:
        return {}
    out = {"first_epoch_seconds": history[0].seconds}
    later = [m for m in history[1:] if m.seconds > 0]
    if later:
        seconds = statistics.median(m.seconds for m in later)
        steps = (history[-1].steps - history[0].steps) / len(later)
        out.update(steady_seconds_per_epoch=seconds, steady_steps_per_second=steps / seconds)
    return out


def finish(trained: Trained, out: Optional[Path], log: Callable[[str], None] = logs.info,
           test: Optional[Estimate] = None, release: bool = True) -> Summary:
    """Score the trained model's own guide on the test set and write ``summary.json``.

    ``test`` passes a test ELBO already computed (by ``evaluate_model``) instead. The run's
    folder, locked since ``fit_run``, is released at the end (also on an error) unless
    ``release`` is False (then ``release(trained)`` does it, after the caller's own files).
    """
    try:
        return _finish(trained, out, log, test)
    finally:
        if release:
            _release(trained)


_release = release


def _finish(trained: Trained, out: Optional[Path], log, test: Optional[Estimate]) -> Summary:
    x_test = eval_pixels(trained.config, trained.splits.test)
    start, eval_seconds = time.perf_counter(), None
    if test is None:
        test = Estimate.of(held_out_elbo(trained.model, trained.guide, x_test,
                                         compile=trained.config.compile)[0])
        eval_seconds = time.perf_counter() - start
    history = trained.history
    train_seconds = history[-1].wall if history else 0.0
    steps = history[-1].steps if history else 0
    summary = Summary(
        test_elbo=test.mean, test_elbo_stderr=test.stderr, test_rows=len(x_test),
        epochs=len(history), steps=steps,
        seconds_per_epoch=train_seconds / max(1, len(history)), train_seconds=train_seconds,
        steps_per_second=(steps / train_seconds) if train_seconds else math.nan,
        eval_seconds=eval_seconds,
        final_train_elbo=history[-1].train_elbo if history else math.nan,
        final_valid_elbo=history[-1].valid_elbo if history else math.nan,
        guide=trained.config.guide, dataset=trained.config.dataset,
        binarize=trained.config.binarize, memory=memory_summary(trained),
        gap_tracking_seconds=trained.gap_seconds, compiled=compiled_run(
            trained.config, trained.guide, len(trained.splits.train)),
        **steady_state(history))
    log(f"test ELBO {test.mean:.2f} +- {test.stderr:.2f} nats ({epochs_text(len(history))}, "
        f"{summary.seconds_per_epoch:.1f} s/epoch)")
    _warn_if_absurd(summary, trained, x_test, log)
    if out is not None:
        folder = trained.folder.path if trained.folder is not None else Path(out)
        # an evaluation of an earlier epoch (an evaluate while the run was cut short) is
        # kept aside, in evaluated-epoch<N>, not left beside a summary it does not describe
        set_aside_stale_evaluation(folder, len(history), log)
        write_json(folder / "summary.json", summary.to_json())
        gaps = folder / "gaps.jsonl"
        if is_regular(gaps):  # the gap curves' figure, as --help promises
            try:
                check_gaps(gaps)
                gap_plots.gap_curves({trained.config.guide: read_gaps(gaps)}, folder / "gaps.png")
            except (UserError, ValueError, KeyError, TypeError) as e:
                log(f"warning: no gaps.png: {e}")
        tracker = open_tracker(folder, trained.config.tensorboard)
        if tracker is not None:
            tracker.hparams(trained.config.to_dict(), {
                "test_elbo": summary.test_elbo, "final_valid_elbo": summary.final_valid_elbo,
                "final_train_elbo": summary.final_train_elbo})
            tracker.close()
    return summary


def _warn_if_absurd(summary: Summary, trained: "Trained", x: torch.Tensor, log) -> None:
    """A finite but absurd ELBO (a rate far too high) deserves a word, not silence; the
    setting named is the one the guide finds at fault (a refinement's step size), else the
    learning rate."""
    if math.isfinite(summary.test_elbo) and summary.test_elbo >= -1e5:
        return
    rows = x[:256]
    try:
        cause = trained.guide.divergence_cause(
            trained.model, batching.Batch(rows, torch.arange(len(rows), device=rows.device),
                                          len(rows)))
    except Exception:  # noqa: BLE001 - a guide that cannot tell: the learning rate
        cause = None
    name, why = cause if cause is not None else ("lr", "training went astray")
    value = getattr(trained.config, name, None)
    log(f"warning: the test ELBO {summary.test_elbo:.3g} is absurd: {for_cli(why)}; try a smaller "
        f"--{name.replace('_', '-')}" + (f" (it was {value:g})" if value is not None else ""))
