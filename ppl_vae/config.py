"""One frozen config for a run (``Config``), its setting constants and the rules of its settings.

``Config`` holds every setting; ``validate`` refuses bad values with a message naming the fix;
``to_dict``/``from_dict`` are its ``config.json`` form. The constants (``BINARIZE``,
``COMPILE_MODES``, ``LOCAL_INIT``, ``LOCAL_FAMILY``, ``ON_DIVERGENCE``, the ``MAX_*`` limits,
``SEED_LIMIT``, ``RESUMABLE``, ``BUILTIN_DATASETS``) live here so that the CLI and ``validate``
read them without torch; the modules that act on them (``data``, ``run``, ``compare``) read
them from here.

Layering: this module imports, of this package, only ``errors``, ``tracking`` (torch-free:
``require_tensorboard``) and ``registry``, whose tables give the names of the built-in pieces
(the ``Literal`` types below) and resolve a setting's name for ``validate``; nothing here
builds an object (``build`` does) and no module that imports ``data`` is imported here, so
``data`` and every module above it import this one freely. Importing it imports no torch:
``named_device`` and ``takes_beta`` import torch and Pyro when called, and ``validate`` asks
the registries for a guide's or objective's class, which they import by name when first
asked for, so ``ppl-vae --help`` and the CLI's usage errors answer without waiting for torch.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Tuple

from .errors import UserError, setting
from .registry import GUIDES, LIKELIHOODS, OBJECTIVES, PRIORS, REGISTRIES
from .tracking import require_tensorboard

if TYPE_CHECKING:  # annotations only
    import torch


# the built-in names as types (documentation and tests); a user's module:attribute is valid too
LikelihoodName = Literal[LIKELIHOODS.names()]
PriorName = Literal[PRIORS.names()]
GuideName = Literal[GUIDES.names()]
ObjectiveName = Literal[OBJECTIVES.names()]

BINARIZE = ("dynamic", "static", "none")  # data.Binarize's modes (its home: no torch here)
DIAGONAL_TITLE = "diagonal normal"  # families.DIAGONAL's title (its home: no torch here)
COMPILE_MODES = ("auto", "on", "off")  # compiled.choose's modes (its home: no torch here)
LOCAL_INIT = ("pca", "prior")
# q*'s family (``families.resolve`` builds it; "own": the guide's ``local_family``)
LOCAL_FAMILY = re.compile(r"own|diagonal|full|lowrank(:[1-9][0-9]*)?"
                          r"|flow(:[1-9][0-9]*(x[1-9][0-9]*)?)?")
ON_DIVERGENCE = ("stop", "lower_lr")
MAX_LATENT, MAX_WIDTH = 4096, 65536  # beyond these a run only fails in the allocator
MAX_STEPS = 1000  # inner and refinement steps per minibatch: a step stays interruptible
VALID_FIT_STEPS = 30  # heldout.Validator's refit of a table's validation rows, per epoch
MAX_PARTICLES = 1_000_000  # K of an estimate: 10^6 already takes hours per 1,000 rows
SEED_LIMIT = 2 ** 32 - 1  # torch's CPU generator keeps 32 bits of a seed: 2**32 acts as 0
BUILTIN_DATASETS = ("mnist", "fashion_mnist", "kmnist")  # data.read's (home: no torch here)


# settings a resumed run may change (each change is recorded in config.json's resumes); every
# other setting defines the run and a resume must keep it (run_setup.RESUME_FIXED)
RESUMABLE = frozenset({"epochs", "lr", "local_lr", "max_seconds", "max_steps", "test_size",
                       "on_divergence", "compile", "device", "gap_epochs", "tensorboard",
                       "local_family"})


@dataclass(frozen=True)
class Config:
    """Every setting of a run; ``validate`` refuses bad values with a message naming the fix."""

    dataset: str = "mnist"  # a built-in name, a folder of IDX files, a .npz/.npy, torchvision:<Class>
    data_dir: Optional[str] = None
    valid_fraction: Optional[float] = None  # of the training rows; None: 1/6 (MNIST's 10k of 60k)
    test_fraction: float = 0.1  # of the rows, for data sets without their own test split
    net: str = "mlp"  # encoder/decoder: MLPs, or conv nets built from the image shape
    binarize: str = "dynamic"  # dynamic, static or none
    latent_dim: int = 50
    hidden: Tuple[int, ...] = (400,)
    activation: str = "relu"  # of the hidden layers: relu, elu, tanh, softplus
    likelihood: str = "bernoulli"
    prior: str = "normal"
    guide: str = "amortized"
    objective: str = "elbo"
    num_particles: int = 1
    dreg: bool = False
    beta: float = 1.0  # KL weight of the ELBO objectives
    warmup_epochs: int = 0  # linear KL warm-up from 0 to beta
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"  # or burda: 3^i epochs at lr * 10^(-i/7), i = 0..7
    local_lr: float = 0.2  # per-datapoint guide: RowAdam learning rate of the table
    inner_steps: int = 1  # per-datapoint guide: local-only steps per minibatch
    local_init: str = "pca"  # per-datapoint guide: where the table's rows start
    refine_steps: int = 5  # semi-amortized guide: gradient steps from the encoder's output
    refine_lr: float = 0.05  # semi-amortized guide: step size of the refinement
    refine_stop_gradient: bool = False  # semi-amortized: encoder trained on its own ELBO
    max_seconds: Optional[float] = None  # stop training after this much training time
    max_steps: Optional[int] = None  # stop training after this many optimizer steps
    train_size: Optional[int] = None  # use the first n training rows (smoke runs)
    valid_size: int = 1000  # validation rows scored every epoch
    test_size: Optional[int] = None  # evaluate on the first n test rows (default: all)
    on_divergence: str = "stop"  # non-finite loss: stop, or halve the rates and go on
    compile: str = "auto"  # auto, on or off: compile the training step (compiled.choose)
    track_gaps: bool = False  # score the gaps on training and test rows at gap_epochs
    gap_epochs: Tuple[int, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000)
    gap_rows: int = 1000  # rows of each of the training and test subsets of the gap curves
    gap_particles: int = 500  # K of log p(x) in the gap curves
    local_family: str = "own"  # q*'s family: own, diagonal, full, lowrank[:R], flow[:T[xH]]
    tensorboard: bool = False  # also write TensorBoard events into <out>/tensorboard
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "Config":
        """Why so long: one independent check per setting, each with its own one-line message
        naming the fix, in the record's field order."""
        check_name(self.dataset)
        for registry in REGISTRIES:
            registry.resolve(getattr(self, registry.field))
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise UserError(f"{setting(name)} must lie strictly between 0 and 1, got {value}")
        if self.tensorboard:
            require_tensorboard()
        if not LOCAL_FAMILY.fullmatch(str(self.local_family)):
            raise UserError(f"{setting('local_family')} must be own (the guide's own family), "
                            f"diagonal, full, lowrank[:R] (R a positive rank) or flow[:T[xH]] "
                            f"(T flows of H hidden units), got "
                            f"{self.local_family!r}")
        for name, choices in (("binarize", BINARIZE), ("local_init", LOCAL_INIT),
                              ("on_divergence", ON_DIVERGENCE)):
            if getattr(self, name) not in choices:
                raise UserError(f"unknown {name} {getattr(self, name)!r} for {setting(name)}; "
                                f"choose one of {', '.join(choices)}")
        positive = ["latent_dim", "epochs", "batch_size", "lr", "num_particles", "valid_size",
                    "adam_eps", "gap_rows", "gap_particles"]
        positive += [name for name in ("local_lr", "refine_lr") if name in guide_settings(self)]
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{setting(name)} must be a positive finite number, got {value}")
        for name in ("train_size", "test_size", "max_seconds", "max_steps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"{setting(name)} must be positive, got {value}")
        for name in ("lr", "local_lr"):
            if getattr(self, name) > 10:
                raise UserError(f"{setting(name)} {getattr(self, name)} is far above any rate "
                                f"Adam trains with; use a value such as 1e-3 (lr) or 0.2 (local_lr)")
        if self.latent_dim > MAX_LATENT:
            raise UserError(f"{setting('latent_dim')} {self.latent_dim} is too large; use at "
                            f"most {MAX_LATENT}")
        if not self.hidden or any(h <= 0 or h > MAX_WIDTH for h in self.hidden):
            raise UserError(f"{setting('hidden')} needs layer sizes from 1 to {MAX_WIDTH}, got "
                            f"{list(self.hidden)}")
        if not self.gap_epochs or any(e <= 0 for e in self.gap_epochs):
            raise UserError(f"{setting('gap_epochs')} needs positive epochs, got "
                            f"{list(self.gap_epochs)}")
        for name in ("inner_steps", "warmup_epochs", "refine_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{setting(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("inner_steps", "refine_steps"):
            if getattr(self, name) > MAX_STEPS:
                raise UserError(f"{setting(name)} {getattr(self, name)} would make one step "
                                f"run for minutes, deaf to Ctrl-C and the time budget; use at "
                                f"most {MAX_STEPS}")
        for name in ("gap_particles", "gap_rows"):
            check_particles(getattr(self, name), name)
        if not 0 <= self.seed <= SEED_LIMIT:  # larger or negative seeds alias smaller ones
            raise UserError(f"{setting('seed')} must be an integer from 0 to {SEED_LIMIT:,} "
                            f"(torch's generator keeps 32 bits of a seed), got {self.seed}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise UserError(f"{setting('beta')} must be a finite number >= 0, got {self.beta}")
        if self.dreg and self.objective != "iwae":
            raise UserError(f"{setting('dreg')} applies to {setting('objective')} iwae only")
        piece = getattr(GUIDES.resolve(self.guide), "piece", None)
        if self.dreg and piece is not None and getattr(piece, "family", None) != DIAGONAL_TITLE:
            raise UserError(f"{setting('dreg')} needs a Normal guide; with {setting('guide')} "
                            f"{self.guide} drop dreg or use the amortized or meanfield guide")
        refuse_beta(getattr(OBJECTIVES.resolve(self.objective), "piece", None), self.beta,
                    self.warmup_epochs, f"{setting('objective')} {self.objective}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"{setting('warmup_epochs')} {self.warmup_epochs} is longer than "
                            f"the run's {self.epochs} epochs, so the KL weight would never "
                            f"reach beta; use at most {setting('epochs')}")
        if self.compile not in COMPILE_MODES:
            raise UserError(f"unknown compile {self.compile!r} for {setting('compile')}; choose "
                            f"one of {', '.join(COMPILE_MODES)}")
        if self.compile == "on":
            piece = getattr(GUIDES.resolve(self.guide), "piece", None)
            if not getattr(piece, "compilable", True):
                raise UserError(f"{setting('compile')} on: the {self.guide} guide says its step "
                                f"cannot be traced once and replayed; use compile auto or off")
        named_device(self.device)
        return self

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"], d["gap_epochs"] = list(self.hidden), list(self.gap_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise UserError(f"a config must be a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown config keys {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("compile"), bool):  # config.json before compile took auto/on/off
            d["compile"] = "on" if d["compile"] else "off"
        for key in ("hidden", "gap_epochs"):
            if key in d:
                if not isinstance(d[key], (list, tuple)):
                    raise UserError(f"config key {key!r} must be a list of numbers")
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"bad config: {e}") from None


def check_particles(k: int, name: str) -> None:
    """Refuse a sample size beyond ``MAX_PARTICLES`` (a typo of a few zeros runs for days)."""
    if k > MAX_PARTICLES:
        raise UserError(f"{setting(name)} {k:,} is beyond {MAX_PARTICLES:,}: the estimate "
                        f"would run for days; use a smaller value (5,000 is the usual K)")


def check_name(name: str) -> None:
    """Refuse a ``--dataset`` that is no built-in name, ``torchvision:<Class>`` or existing path."""
    if name in BUILTIN_DATASETS or (name.startswith("torchvision:")
                                    and len(name) > len("torchvision:")):
        return
    if not Path(name).exists():
        raise UserError(f"unknown dataset {name!r}: not one of {', '.join(BUILTIN_DATASETS)}, "
                        f"not torchvision:<Class>, and no file or folder of that name exists")


def named_device(name: str) -> torch.device:
    """The device the ``device`` setting ``name`` names, outside torchrun: ``auto`` is CUDA
    when available, else the CPU; an unknown, unsupported or absent device is refused.
    ``distributed.resolve_device`` adds torchrun's rule (each process its own GPU)."""
    import torch  # here, not at the top: ``ppl-vae --help`` answers without torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use "
                        f"{setting('device')} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA "
                        f"device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def takes_beta(objective) -> bool:
    """Whether an objective (a class, an instance or a bound method) takes ``beta=``, a KL
    weight: it says so in ``weights_kl``; Pyro's ELBO classes do not; another callable is
    given it."""
    from pyro.infer.elbo import ELBO as PyroELBO
    owner = getattr(objective, "__self__", objective)
    if isinstance(owner, PyroELBO) or (isinstance(owner, type) and issubclass(owner, PyroELBO)):
        return False
    return getattr(objective, "weights_kl", True)


def refuse_beta(objective, beta: float = 1.0, warmup_epochs: int = 0,
                name: Optional[str] = None) -> None:
    """The one refusal of a KL weight (``beta`` other than 1, or a warm-up) for an objective
    that has none (``takes_beta``): ``Config.validate``, ``train.fit`` and a Pyro ELBO
    handed ``beta=`` all ask here, so the rule and its message live once."""
    asked = [f"{setting('beta')} {beta:g}" if beta != 1.0 else "",
             f"{setting('warmup_epochs')} {warmup_epochs}" if warmup_epochs else ""]
    asked = [a for a in asked if a]
    if not asked or takes_beta(objective):
        return
    raise UserError(f"{' and '.join(asked)} weight{'s' if len(asked) == 1 else ''} the KL "
                    f"term of our ELBO objectives; {name or f'the objective {objective!r}'} has "
                    f"no KL weight: drop {'it' if len(asked) == 1 else 'them'} or use "
                    f"{setting('objective')} elbo")


def guide_settings(config: Config) -> Tuple[str, ...]:
    """The settings the guide of ``config`` reads beyond the shared ones, as its class says
    (``Guide.settings``: a table's ``local_lr``, a refinement's ``refine_steps``, ...)."""
    return tuple(getattr(getattr(GUIDES.resolve(config.guide), "piece", None), "settings", ()))


def local_family_of(config: "Config"):
    """q*'s family as ``local_fit.local_inference`` takes it: None asks the guide (``own``)."""
    return None if config.local_family == "own" else config.local_family


def local_fit_options(config: "Config", local_options: Optional[dict] = None) -> dict:
    """The options of every local fit and estimate of a run's scoring (q* on held-out rows,
    a table's local budget, log p(x)): the caller's, with q*'s family from ``--local-family``
    (``own`` adds nothing: the guide says its family) and ``--compile`` (the one rule of
    ``compiled.compiles`` decides, from this setting, the training step, q*'s fit and
    log p(x) alike). The one place these settings are read for scoring."""
    options = dict(local_options or {})
    family = local_family_of(config)
    if family is not None:
        options.setdefault("family", family)
    options.setdefault("compile", config.compile)
    return options
