"""The training pipeline: ``train_run(config, out)`` trains, checkpoints, scores and writes files.

Files written into ``out``: ``config.json`` (settings, library versions, git revision, the
command line, and every resume's changed settings), ``metrics.jsonl`` (one object per epoch),
``checkpoint.pt`` (every epoch, atomically), ``gaps.jsonl`` with ``track_gaps``, and
``summary.json`` (``test_elbo`` and timings) once the run has finished. Which folders may be
written is ``rundir``'s business; scoring during training (validation, gap curves) is
``heldout``'s, and a trained run's evaluation ``evaluation``'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from . import checkpoint, data, distributed, logs, memory, protocol
from .config import (OBJECTIVES, RESUMABLE, Config, build_guide, build_model,
                     build_objective, code_names, guide_settings, local_family_of, lr_factor,
                     require_consent, resolve_device)
from .errors import UserError, for_cli, setting
from .compiled import compiled_run
from .evaluate import Estimate
from .heldout import (GapTracker, Validator, eval_pixels, held_out_elbo, read_gaps,
                      train_pixels)
from .objectives import unguided_sites
from .optim import make_optimizers
from .rundir import (RunDir, check_gaps, check_out, is_regular, read_mapping, recover,
                     resolve_link, set_aside_stale_evaluation, write_config, write_json)
from .rng import seeded
from .tracking import open_tracker
from .train import (DivergenceError, EpochMetrics, Interrupted, LRSchedule, Position, StepBudget,
                    fit)

# settings a resumed run must share with its checkpoint: every setting but the few that may
# change (config.RESUMABLE), which are recorded in config.json's resumes
RESUME_FIXED = tuple(f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE)


REQUIRED = ("config", "model", "guide", "optimizers", "history", "rng", "binarize_rng")


class Trained(NamedTuple):
    """A trained model with what it was trained on."""

    config: Config
    model: torch.nn.Module
    guide: torch.nn.Module
    splits: data.Splits  # on the device, grayscale
    history: list
    device: torch.device
    checkpoint: Optional[str] = None  # the checkpoint file it was loaded from
    gap_seconds: Optional[float] = None  # time spent on the gap curves
    # the run folder it was trained into, still locked: ``finish`` (or ``release``)
    # releases it, so no other process writes the folder before the run's last file
    folder: Optional[RunDir] = None


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


def load_splits(config: Config, device: torch.device) -> data.Splits:
    """The dataset's splits on ``device``, cut to ``train_size``/``test_size`` when set."""
    splits = data.load(config.dataset, config.data_dir, config.valid_fraction,
                       config.test_fraction)
    splits = data.Splits(splits.train.head(config.train_size).to(device),
                         splits.valid.to(device), splits.test.head(config.test_size).to(device))
    check_sizes(config, splits)
    return splits


def check_sizes(config: Config, splits: data.Splits) -> None:
    """Refuse data too small for the run's batch size or (per-datapoint PCA start) latent size."""
    n, dim = len(splits.train), splits.train.x.shape[1]
    if n < config.batch_size:
        raise UserError(f"{n} training rows are fewer than {setting('batch_size')} "
                        f"{config.batch_size}; use a batch size of at most {n} or give "
                        f"more rows")
    if "local_init" in guide_settings(config) and config.local_init == "pca" and \
            min(n, dim) < config.latent_dim + 10:
        raise UserError(f"{setting('local_init')} pca needs at least latent_dim + 10 = "
                        f"{config.latent_dim + 10} training rows and pixels, the data have {n} "
                        f"rows of {dim}; use a smaller {setting('latent_dim')} or "
                        f"{setting('local_init')} prior")


class Resumed(NamedTuple):
    """What ``--resume`` continues (``resumed_config``): its settings, and the checkpoint
    they were read from, handed to ``train_run`` so it is read once (None: no readable
    checkpoint; ``train_run`` then refuses the resume with its reason)."""

    config: Config
    state: Optional[dict]


def resumed_config(out, given: dict, trust_code: bool = False) -> Resumed:
    """What ``--resume`` continues: the run's own settings (its checkpoint's) with the
    settings ``given`` on this command laid over them, so a resume needs only what it
    changes (``--epochs``, ``--lr``, ...). The device is the one given, else ``auto``. Code
    that only the checkpoint names needs ``trust_code``; without a readable checkpoint the
    settings given are taken as they are (and the resume is refused later, with its reason).
    What a killed ``--overwrite`` left beside ``out`` is undone first (``rundir.recover``,
    as ``RunDir`` would; one process, not under torchrun), so the run read here is the run
    resumed.
    """
    own = Config().replace(**given)
    out = resolve_link(check_out(out))
    if not distributed.launched():  # under torchrun rank 0's RunDir does it, alone
        recover(out)
    said = []  # a fallback to checkpoint.prev.pt, said once the load has succeeded
    try:
        state = checkpoint.load(out, warn=said.append, required=REQUIRED,
                                mmap=distributed.launched())
    except UserError:  # train_run reads it again and refuses the resume with the reason
        state = None
    if state is None:
        return Resumed(own.validate(), None)
    for line in said:
        logs.info(line)
    saved = Config.from_dict(state["config"])
    require_consent(saved, Path(out) / state["file"], given=own, trust_code=trust_code)
    try:
        resolve_device(saved.device)
    except UserError:  # a GPU run resumed where there is none
        saved = saved.replace(device="auto")
    return Resumed(saved.replace(**given).validate(), state)


def check_compatible(saved: Config, config: Config) -> dict:
    """Refuse a resume that changes what the run is; returns the settings it does change."""
    for name in RESUME_FIXED:
        a, b = getattr(saved, name), getattr(config, name)
        if a != b:
            raise UserError(f"checkpoint was trained with {name}={a!r} but this run asks for "
                            f"{name}={b!r}; use the same setting or a new {setting('out')}")
    return {k: [v, config.to_dict()[k]] for k, v in saved.to_dict().items()
            if v != config.to_dict()[k]}


def train_run(config: Config, out: Optional[Path] = None, overwrite: bool = False,
              resume: bool = False, progress=None,
              log: Callable[[str], None] = logs.info, trust_code: bool = False,
              state: Optional[dict] = None,
              then: Optional[Callable[[], object]] = None) -> Optional["Summary"]:
    """Train per ``config``, write the run's files into ``out`` and return its ``Summary``
    (under torchrun: rank 0 scores and writes it; the other processes return None).
    ``trust_code``: a resumed checkpoint may name code (``module:Class``) that ``config``
    does not (see ``config.require_consent``). ``state``: the checkpoint a resume continues,
    already read (``resumed_config``); None reads it. ``progress``: ``train.fit``'s (None: a bar
    where stderr is a terminal). ``then`` is called (on every process)
    once summary.json is written, while the folder's lock is still held: ``train
    --evaluate`` evaluates there, so no other process writes the folder in between."""
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
        setup = _setup(config, out, overwrite, resume, world, log, trust_code, state)
    except UserError as e:
        error = e
    distributed.refuse_unless_all(error, world)
    try:
        return _train(setup, setup.config, world, progress, log)
    except BaseException:  # Ctrl-C before the loop took it over: no lock or staging left
        if setup.folder is not None:
            setup.folder.close()
        raise


class _Setup(NamedTuple):
    config: Config  # as resolved: a resume that only finishes the scoring trains no epoch
    device: torch.device
    folder: Optional[RunDir]
    splits: data.Splits
    train_split: data.Split
    shards: data.Shards
    binarize: data.Binarize
    model: torch.nn.Module
    guide: torch.nn.Module
    optimizers: object
    validator: Validator
    objective: object
    history: list
    position: Optional[Position]
    resumes: list


def _setup(config: Config, out, overwrite: bool, resume: bool, world: distributed.World,
           log, trust_code: bool = False, loaded: Optional[dict] = None) -> _Setup:
    config.validate()
    device = resolve_device(config.device, world)
    if world.size > 1:
        _check_distributed(config)
    folder = RunDir(out, overwrite, resume) if out is not None and world.main else None
    splits = load_splits(config, device)
    dim, n = splits.train.x.shape[1], len(splits.train)
    memory.check(config, dim, n, device)
    shards = data.Shards(n, world.size, config.batch_size)
    binarize = data.Binarize(config.binarize, torch.Generator().manual_seed(
        distributed.rank_seed(config.seed + 3, world)))
    train_split = binarize.prepare(splits.train, config.seed)
    with pieces_of(config):
        model = build_model(config, dim, splits.shape).to(device)
        guide = _to(build_guide(config, dim, n, None if resume else splits.train.x,
                                model=model, shape=splits.shape, rank=world.rank,
                                world_size=world.size), device)
        model.likelihood.check(train_split.x if config.binarize == "none"
                               else torch.bernoulli(train_split.x[:100]))
        objective = build_objective(config)
        probe(config, model, guide, train_split)
    history, position, resumes, state = [], None, [], None
    torch.manual_seed(distributed.rank_seed(config.seed + 2, world))
    if resume:
        final = folder.final if folder is not None else Path(out)
        state = loaded if loaded is not None else checkpoint.load(
            final, warn=log, required=REQUIRED, mmap=world.size > 1)
        saved = Config.from_dict(state["config"])
        require_consent(saved, final / state["file"], given=config, trust_code=trust_code)
        saved.replace(device=config.device).validate()  # its device need not exist here
        distributed.check_world_size(int(state.get("world_size", 1)), world, final)
        if world.main:
            check_gaps(final / "gaps.jsonl")  # the gap figure reads it at the end
        changed = check_compatible(saved, config)
        history = [EpochMetrics(**m) for m in state["history"]]
        if state.get("position") is None and len(history) >= config.epochs:
            if (final / "summary.json").exists():
                raise UserError(f"{final} already has {_epochs(len(history))}; to continue, "
                                f"ask for more with {setting('epochs')}")
            # all epochs trained, the final scoring interrupted: score it, train nothing
            log(f"{final} has trained its {_epochs(len(history))} but was not scored "
                f"(interrupted): scoring it now")
            config = config.replace(epochs=len(history))
        _restore_networks(state, model, guide)
        position = Position(**state["position"]) if state.get("position") else None
        resumes = _previous_resumes(state, final, log)
        if changed:
            resumes.append({"after_epoch": len(history), "changed": changed})
        log(f"resuming {final} after epoch {len(history)}"
            + (f", step {position.step} of epoch {position.epoch + 1}" if position else ""))
    guide = protocol.shard(guide, world.rank, world.size)
    optimizers = make_optimizers(model, guide, config.lr, config.local_lr, config.inner_steps,
                                 eps=config.adam_eps)
    if world.size > 1:
        optimizers = optimizers._replace(sync=distributed.GradSync(world))
    validator = Validator(model, guide, eval_pixels(config, splits.valid, config.valid_size))
    if state is not None:
        _restore_optimizers(state, optimizers, validator, config, world, n)
        ranks = state.get("rng_ranks")
        checkpoint.set_rng_state(ranks[world.rank] if ranks else state["rng"])
        ranks = state.get("binarize_rng_ranks")
        binarize.generator.set_state(ranks[world.rank] if ranks else state["binarize_rng"])
    if folder is not None:
        folder.create()  # the lock, last: a live writer is refused before anything is written
    return _Setup(config, device, folder, splits, train_split, shards, binarize, model, guide,
                  optimizers, validator, objective, history, position, resumes)


ROLES = {  # what each kind of piece must be, for the message that refuses a user's piece
    "guide": "a Pyro program guide(batch) (an nn.Module or a function) that samples site 'z' "
             "inside the 'data' plate (ppl_vae.model.data_plate)",
    "likelihood": "an nn.Module: likelihood(decoder output) -> a Distribution whose event is "
                  "one image, with check(x)",
    "prior": "an nn.Module: prior() -> a Distribution over z with event shape [latent_dim]",
    "objective": "a callable objective(model, guide, batch) -> a scalar loss",
    "net": "an nn.Module built by from_config(config, shape=, role=)",
    "activation": "an nn.Module class named as module:Class, such as torch.nn:ReLU",
    "lr_schedule": "a function epoch -> learning-rate factor (a number)",
}


@contextlib.contextmanager
def pieces_of(config: Config):
    """Turn a failure of a user's own piece (``module:Class``) while it is built and probed
    into one line naming the pieces and what each must be; built-ins keep their traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        names = code_names(config)
        if not names:
            raise
        what = "; ".join(f"{setting(f)} {n} must be {ROLES[f]}" for f, n in names.items())
        first = (str(e).strip().splitlines() or [""])[0]  # whole, not cut mid-word
        raise UserError(f"your own piece failed on a probe batch of 2 training rows "
                        f"({type(e).__name__}: {first}); {what}") from None


def probe(config: Config, model, guide, train: data.Split) -> None:
    """Run a user's pieces once on 2 training rows, on their own random stream, before any
    folder is made: a piece of the wrong shape fails here, and a lazy one (Pyro's autoguides)
    makes its parameters, so a checkpoint's state can be loaded into it. Built-ins skip it."""
    if not code_names(config):
        return
    factor = lr_factor(config)
    first = factor(0) if factor is not None else 1.0
    if not isinstance(first, (int, float)):
        raise TypeError(f"the schedule gave {type(first).__name__} for epoch 0, not a number")
    x = train.x[:2]
    batch = data.Batch(x if config.binarize == "none" else torch.bernoulli(x),
                       torch.arange(len(x), device=x.device), len(train))
    with seeded(config.seed + 5, x.device):  # the objective as written, never compiled
        missing = unguided_sites(model, guide, batch)
        if missing:
            raise TypeError(f"the guide samples no site {', '.join(map(repr, missing))} of "
                            f"the model")
        loss = protocol.training_loss(guide, OBJECTIVES.build(config), model, batch)
    if not (torch.is_tensor(loss) and loss.dim() == 0):
        raise TypeError(f"the objective gave {type(loss).__name__} "
                        f"{tuple(getattr(loss, 'shape', ()))}, not a scalar tensor")


def _to(piece, device):
    """``piece.to(device)`` for a module; a plain Pyro program has no ``to``."""
    return piece.to(device) if hasattr(piece, "to") else piece


def _check_distributed(config: Config) -> None:
    """Settings a torchrun run cannot honour yet, refused with the way out."""
    for name, value in (("max_seconds", config.max_seconds), ("track_gaps", config.track_gaps)):
        if value:
            what = ("a time budget would stop the processes at different steps"
                    if name == "max_seconds" else "the gap curves need the whole table")
            raise UserError(f"{setting(name)} is not available under torchrun ({what}); "
                            f"train with one process, or drop it")


def _train(setup: _Setup, config: Config, world: distributed.World, progress, log) -> Trained:
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


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _what_is_kept(folder: Optional[RunDir], done: list, history: list) -> str:
    """What a run that stops on an error leaves, in words."""
    if folder is None:
        return "nothing was written"
    if folder.staged:  # it commits after its first epoch
        return f"the new run had not finished an epoch: {folder.final} is left as it was"
    if len(done) > 0:
        return f"the checkpoint after epoch {len(done)} is kept"
    return "no epoch finished, so no checkpoint was written"


def _restore_networks(state, model, guide) -> None:
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"the checkpoint does not fit this run's model and guide "
                        f"({type(e).__name__}); start a new run") from None


def _restore_optimizers(state, optimizers, validator, config, world, num_data) -> None:
    try:
        opt_states = list(state["optimizers"])
        if optimizers.local is not None and opt_states:
            opt_states[-1] = distributed.local_optimizer_state(opt_states[-1], world, num_data)
        for opt, opt_state in zip(optimizers.all(), opt_states):
            opt.load_state_dict(opt_state)
        validator.load_state_dict(state.get("valid_guide"))
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
        raise UserError(f"the checkpoint does not fit this run's model and guide "
                        f"({type(e).__name__}); start a new run") from None
    for opt, lr in zip(optimizers.all(), (config.lr, config.local_lr)
                       if optimizers.global_ is not None else (config.local_lr,)):
        for group in opt.param_groups:  # a resumed run may ask for another rate
            group["lr"] = lr
            if "base_lr" in group:  # a learning-rate schedule scales this base rate
                group["base_lr"] = lr


def _previous_resumes(state: dict, out: Path, log) -> list:
    """The record of earlier resumes: the checkpoint's copy, else (a checkpoint written before
    it kept one) config.json's; a damaged config.json is said, not silently dropped."""
    if isinstance(state.get("resumes"), list):
        return list(state["resumes"])
    path = out / "config.json"
    if not path.exists():
        return []
    try:
        resumes = read_mapping(path, "").get("resumes", [])
    except UserError as e:
        resumes = e
    if not (isinstance(resumes, list) and all(isinstance(r, dict) for r in resumes)):
        log(f"warning: {path} is unreadable or damaged; the record of earlier resumes in it "
            f"is lost and a new config.json is written")
        return []
    return list(resumes)


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
                      local_family=local_family_of(config))


def _write_metrics(path: Path, history) -> None:
    """metrics.jsonl from the checkpoint's history, put in place whole (what was there, even
    a named pipe, is replaced, never opened)."""
    from .rundir import write_text
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
        test = Estimate.of(held_out_elbo(trained.model, trained.guide, x_test)[0])
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
    log(f"test ELBO {test.mean:.2f} +- {test.stderr:.2f} nats ({_epochs(len(history))}, "
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
            from . import plots
            try:
                check_gaps(gaps)
                plots.gap_curves({trained.config.guide: read_gaps(gaps)}, folder / "gaps.png")
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
        cause = protocol.divergence_cause(trained.guide, trained.model,
                                        data.Batch(rows, torch.arange(len(rows),
                                                                      device=rows.device),
                                                   len(rows)))
    except Exception:  # noqa: BLE001 - a guide that cannot tell: the learning rate
        cause = None
    name, why = cause if cause is not None else ("lr", "training went astray")
    value = getattr(trained.config, name, None)
    log(f"warning: the test ELBO {summary.test_elbo:.3g} is absurd: {for_cli(why)}; try a smaller "
        f"--{name.replace('_', '-')}" + (f" (it was {value:g})" if value is not None else ""))


def load_trained(run_dir: Path, device: Optional[str] = None, test_size: Optional[int] = None,
                 fallback: bool = True, warn=logs.warning, trust_code: bool = False,
                 given: Optional[Config] = None) -> Trained:
    """The model and guide of the newest checkpoint in ``run_dir``, with its data splits.

    Code the checkpoint names (``module:Class``) is imported only with ``trust_code`` or when
    ``given`` (the caller's own settings) names the same (``config.require_consent``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the out folder of a "
                        f"`ppl-vae train` run")
    state = checkpoint.load(run_dir, warn=warn, fallback=fallback, required=REQUIRED)
    if state is None:
        raise UserError(f"{run_dir} has no checkpoint; train into it first with "
                        f"`ppl-vae train --out {run_dir}`")
    config = Config.from_dict(state["config"])
    require_consent(config, run_dir / state["file"], given=given, trust_code=trust_code)
    if test_size is not None:
        config = config.replace(test_size=test_size)
    config = config.replace(device=device or config.device).validate()
    dev = resolve_device(config.device, distributed.current())  # torchrun: its own GPU
    splits = load_splits(config, dev)
    dim = splits.train.x.shape[1]
    with pieces_of(config):
        model = build_model(config, dim, splits.shape).to(dev)
        guide = _to(build_guide(config, dim, len(splits.train), model=model,
                                shape=splits.shape), dev)
        probe(config, model, guide, splits.train)  # a lazy guide makes its parameters
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        history = [EpochMetrics(**m) for m in state["history"]]
    except (RuntimeError, TypeError, KeyError) as e:
        raise UserError(f"the checkpoint in {run_dir} does not fit the model its config "
                        f"describes ({type(e).__name__}); it is damaged") from None
    return Trained(config, model, guide, splits, history, dev, state.get("file"))
