"""How a run is set up: its data, its pieces built and probed, and a checkpoint taken up.

``set_up`` checks everything that can be refused before anything is written (the settings,
the folder, the data, a user's pieces on a probe batch, and for ``--resume`` the checkpoint)
and returns the ``Setup`` that ``run.fit_run`` trains: the data on the device, the model,
guide, optimizers and validator, and a resumed run's history, position and state restored.
``resumed_config`` reads what ``--resume`` continues (the checkpoint's settings under the
ones given); ``load_trained`` loads a trained run back from its newest checkpoint
(``Trained``), as ``evaluate`` and ``compare`` score it.

Layering: below ``run`` (the training pipeline: the loop, checkpoints, ``summary.json``)
and the commands that load a trained run (``evaluation``, ``compare``); above the pieces it
assembles (``config``, ``data``, ``batching``, ``guides``, ``optim``, ``heldout``, ``train``)
and the run folder (``rundir``, ``runfiles``, ``checkpoint``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from . import batching, checkpoint, data, distributed, logs, memory
from .build import build_guide, build_model, build_objective, lr_factor
from .config import RESUMABLE, Config, guide_settings
from .distributed import resolve_device
from .registry import OBJECTIVES, code_names, require_consent
from .errors import UserError, setting
from .heldout import Validator, eval_pixels
from .objectives import unguided_sites
from .optim import make_optimizers
from .rundir import RunDir, check_out, recover, resolve_link
from .runfiles import check_gaps, read_mapping
from .rng import seeded
from .loopstate import EpochMetrics, Position

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


class Setup(NamedTuple):
    """What ``set_up`` hands to the training (``run.fit_run``): every piece of the run, a
    resumed run's state restored into them."""

    config: Config  # as resolved: a resume that only finishes the scoring trains no epoch
    device: torch.device
    folder: Optional[RunDir]
    splits: data.Splits
    train_split: data.Split
    shards: batching.Shards
    binarize: data.Binarize
    model: torch.nn.Module
    guide: torch.nn.Module
    optimizers: object
    validator: Validator
    objective: object
    history: list
    position: Optional[Position]
    resumes: list


def set_up(config: Config, out, overwrite: bool, resume: bool, world: distributed.World,
           log, trust_code: bool = False, loaded: Optional[dict] = None) -> Setup:
    """Why so long: everything a run needs before its first step, in the order that keeps a
    refused run from writing anything (validate, device, data, pieces, resume state,
    optimizers, the lock last)."""
    config.validate()
    device = resolve_device(config.device, world)
    if world.size > 1:
        _check_distributed(config)
    folder = RunDir(out, overwrite, resume) if out is not None and world.main else None
    splits = load_splits(config, device)
    dim, n = splits.train.x.shape[1], len(splits.train)
    memory.check(config, dim, n, device)
    shards = batching.Shards(n, world.size, config.batch_size)
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
                raise UserError(f"{final} already has {epochs_text(len(history))}; to continue, "
                                f"ask for more with {setting('epochs')}")
            # all epochs trained, the final scoring interrupted: score it, train nothing
            log(f"{final} has trained its {epochs_text(len(history))} but was not scored "
                f"(interrupted): scoring it now")
            config = config.replace(epochs=len(history))
        _restore_networks(state, model, guide)
        position = Position(**state["position"]) if state.get("position") else None
        resumes = _previous_resumes(state, final, log)
        if changed:
            resumes.append({"after_epoch": len(history), "changed": changed})
        log(f"resuming {final} after epoch {len(history)}"
            + (f", step {position.step} of epoch {position.epoch + 1}" if position else ""))
    if world.size > 1:  # under torchrun each process keeps its shard (alone: all of it)
        guide = guide.shard(world.rank, world.size)
    optimizers = make_optimizers(model, guide, config.lr, config.local_lr, config.inner_steps,
                                 eps=config.adam_eps)
    if world.size > 1:
        optimizers = optimizers._replace(sync=distributed.GradSync(world))
    validator = Validator(model, guide, eval_pixels(config, splits.valid, config.valid_size),
                          compile=config.compile)
    if state is not None:
        _restore_optimizers(state, optimizers, validator, config, world, n)
        ranks = state.get("rng_ranks")
        checkpoint.set_rng_state(ranks[world.rank] if ranks else state["rng"])
        ranks = state.get("binarize_rng_ranks")
        binarize.generator.set_state(ranks[world.rank] if ranks else state["binarize_rng"])
    if folder is not None:
        folder.create()  # the lock, last: a live writer is refused before anything is written
    return Setup(config, device, folder, splits, train_split, shards, binarize, model, guide,
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
    batch = batching.Batch(x if config.binarize == "none" else torch.bernoulli(x),
                       torch.arange(len(x), device=x.device), len(train))
    with seeded(config.seed + 5, x.device):  # the objective as written, never compiled
        missing = unguided_sites(model, guide, batch)
        if missing:
            raise TypeError(f"the guide samples no site {', '.join(map(repr, missing))} of "
                            f"the model")
        loss = guide.training_loss(OBJECTIVES.build(config), model, batch)
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


def epochs_text(n: int) -> str:
    """``n`` epochs in words: "1 epoch", "3 epochs"."""
    return f"{n} epoch" if n == 1 else f"{n} epochs"


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


def load_trained(run_dir: Path, device: Optional[str] = None, test_size: Optional[int] = None,
                 fallback: bool = True, warn=logs.warning, trust_code: bool = False,
                 given: Optional[Config] = None) -> Trained:
    """The model and guide of the newest checkpoint in ``run_dir``, with its data splits.

    Code the checkpoint names (``module:Class``) is imported only with ``trust_code`` or when
    ``given`` (the caller's own settings) names the same (``registry.require_consent``)."""
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
