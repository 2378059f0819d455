"""One frozen config for a run, and the only tables that turn names into objects.

Every table is a ``Registry``: the built-ins are registered in it like a user's own piece.
A name is either a key of the table or ``module:attribute`` naming a user's class or
function (imported from the current folder too, as ``python -m`` would), so
``--likelihood mypkg.lik:Beta`` needs no edit of this package. A user's class is built with
``cls.from_config(config, **context)`` when it has one, else ``cls()``; the context of each
table is listed where it is defined. ``config.json`` records the name, so ``--resume`` and
``evaluate`` build the same piece again.

Importing a module runs its code, so a name read from a run's files (a checkpoint someone
else wrote) is imported only with the user's consent: ``require_consent`` refuses, before
anything is imported, every ``module:attribute`` that the user did not give on this command
unless ``trust_code`` is set (``--trust-code``), as Hugging Face's ``trust_remote_code`` does.

Importing this module imports no torch: a builder imports its piece's module when it first
runs (``_lib``) and a registered ``piece`` may be named ``module:Class``, imported when first
asked for, so ``ppl-vae --help`` and the CLI's usage errors answer without waiting for torch.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Literal, Optional, Tuple, Union

from .errors import UserError, setting

if TYPE_CHECKING:  # annotations only
    import torch
    import torch.nn as nn

    from . import data


def _lib(module: str):
    """This package's ``module``, imported when a builder first needs it (not at import)."""
    return importlib.import_module(f"{__package__}.{module}")


class Registry:
    """Names -> builders ``(config, **context) -> piece`` of one kind."""

    def __init__(self, kind: str, field: str, of_classes: bool = False):
        self.kind, self.field = kind, field
        self.of_classes = of_classes  # its pieces are classes (activations), not instances
        self._builders: Dict[str, Callable] = {}

    def register(self, name: str, builder: Callable,
                 piece: Union[type, str, None] = None) -> Callable:
        """Add ``builder`` under ``name``: a function ``(config, **context)`` or a class.

        ``piece`` is the class the builder makes, asked before anything is built (a guide's
        ``compilable``), or its ``module:Class`` name, imported when first asked for; a
        registered class is its own piece.
        """
        builder = _as_builder(builder)
        if isinstance(piece, str):
            builder = _Named(builder, piece)
        elif piece is not None:
            builder.piece = piece
        self._builders[name] = builder
        return builder

    def names(self):
        return tuple(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def resolve(self, name: str) -> Callable:
        """The builder of ``name``; refuses an unknown name with the choices."""
        if name in self._builders:
            return self._builders[name]
        if isinstance(name, str) and ":" in name:
            obj = _import(name, self)
            if not isinstance(obj, type):
                raise UserError(f"{name!r} for {setting(self.field)} is not a class; name a "
                                f"{self.kind} class as module:Class (a function is registered "
                                f"from Python with {self.kind.upper()}S.register)")
            if self.of_classes:  # the class itself is the piece: the network makes each one
                return lambda config, **context: obj
            return _as_builder(obj)
        raise UserError(f"unknown {self.kind} {name!r} for {setting(self.field)}; choose one "
                        f"of {', '.join(self._builders)} or name your own as module:attribute")

    def build(self, config: "Config", **context):
        name = getattr(config, self.field)
        builder = self.resolve(name)
        try:
            piece = builder(config, **context)
        except TypeError as e:
            if name in self._builders:  # a built-in's own bug keeps its traceback
                raise
            raise UserError(f"cannot build {self.kind} {name!r} for {setting(self.field)} "
                            f"({e}); give it a from_config(config, **context) classmethod or "
                            f"an __init__ without arguments") from None
        return self.adapt(piece) if self.adapt is not None else piece

    adapt: Optional[Callable] = None  # piece -> the piece in this table's signature


def _as_builder(obj) -> Callable:
    if isinstance(obj, type):
        def build(config, **context):
            if hasattr(obj, "from_config"):
                return obj.from_config(config, **context)
            return obj()
        build.piece = obj
        return build
    return obj


class _Named:
    """A builder whose ``piece`` is named ``module:Class`` and imported when first asked for."""

    def __init__(self, build: Callable, piece: str):
        self._build, self._piece = build, piece

    def __call__(self, config, **context):
        return self._build(config, **context)

    @property
    def piece(self) -> type:
        module, _, attr = self._piece.partition(":")
        return getattr(importlib.import_module(module), attr)


def _import(name: str, registry: Registry):
    module, _, attr = name.partition(":")
    if not all(part.isidentifier() for part in module.split(".") + attr.split(".")):
        raise UserError(f"{name!r} for {setting(registry.field)} is not a name of the form "
                        f"module:Class (e.g. mypkg.lik:Beta); use a built-in "
                        f"({', '.join(registry.names())}) or an importable module:Class")
    if os.getcwd() not in sys.path:  # as ``python -m`` would: the user's own folder
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import {registry.kind} {name!r} for "
                        f"{setting(registry.field)} ({type(e).__name__}: {e}); give "
                        f"module:attribute of an importable module") from None
    return obj


def code_names(config: "Config") -> Dict[str, str]:
    """``{field: name}`` of every setting that names code outside this package: a
    ``module:attribute`` that is not a registered name (importing it runs its module)."""
    out = {}
    for registry in REGISTRIES:
        name = getattr(config, registry.field)
        if isinstance(name, str) and name not in registry:
            out[registry.field] = name
    return out


def require_consent(config: "Config", source, given: Optional["Config"] = None,
                    trust_code: bool = False) -> None:
    """Refuse, before importing anything, code that a run's files name and the user did not.

    ``config`` was read from ``source`` (a checkpoint); a ``module:attribute`` in it is
    imported only when this command's own settings ``given`` name the same code for the same
    setting, or with ``trust_code``. Built-in names need no consent.
    """
    if trust_code:
        return
    for field, name in code_names(config).items():
        if given is not None and getattr(given, field) == name:
            continue
        module = name.partition(":")[0]
        raise UserError(f"{source} names code to import for {setting(field)}: {name!r} "
                        f"(module {module!r}); importing it runs that module, so it is not "
                        f"imported unless you pass {setting('trust_code')} (only for a run "
                        f"folder whose author you trust)")


def _activation(name: str) -> Callable:
    """``torch.nn``'s activation class ``name``."""
    def build(c, **_):
        import torch.nn
        return getattr(torch.nn, name)
    return build


ACTIVATIONS = Registry("activation", "activation", of_classes=True)
for _name, _class in (("relu", "ReLU"), ("elu", "ELU"), ("tanh", "Tanh"), ("softplus", "Softplus")):
    ACTIVATIONS.register(_name, _activation(_class))

LIKELIHOODS = Registry("likelihood", "likelihood")  # context: data_dim
LIKELIHOODS.register("bernoulli", lambda c, **_: _lib("likelihoods").Bernoulli())
LIKELIHOODS.register("continuous_bernoulli",
                     lambda c, **_: _lib("likelihoods").ContinuousBernoulli())
LIKELIHOODS.register("normal", lambda c, data_dim, **_: _lib("likelihoods").Normal(
    data_dim, shared=False))
LIKELIHOODS.register("normal_shared", lambda c, data_dim, **_: _lib("likelihoods").Normal(
    data_dim, shared=True))

PRIORS = Registry("prior", "prior")
PRIORS.register("normal", lambda c, **_: _lib("priors").StandardNormal(c.latent_dim))
PRIORS.register("mog", lambda c, **_: _lib("priors").MixtureOfGaussians(c.latent_dim, seed=c.seed))

OBJECTIVES = Registry("objective", "objective")
# a user's Pyro ELBO class (pyro.infer:X) works too
OBJECTIVES.adapt = lambda piece: _lib("objectives").pyro_objective(piece)
OBJECTIVES.register("elbo", lambda c, **_: _lib("objectives").ELBO(c.num_particles, beta=c.beta),
                    "ppl_vae.objectives:ELBO")
OBJECTIVES.register("analytic_kl", lambda c, **_: _lib("objectives").AnalyticKLELBO(
    c.num_particles, beta=c.beta), "ppl_vae.objectives:AnalyticKLELBO")
OBJECTIVES.register("iwae", lambda c, **_: _lib("objectives").IWAE(c.num_particles, dreg=c.dreg),
                    "ppl_vae.objectives:IWAE")


def _pyro(name: str):
    """Pyro's ``name`` ELBO class with ``num_particles`` vectorized particles."""
    def build(c, **_):
        import pyro.infer
        return _lib("objectives").PyroObjective(getattr(pyro.infer, name)(
            num_particles=c.num_particles, vectorize_particles=c.num_particles > 1,
            max_plate_nesting=2))
    return build


for _name in ("Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO"):
    OBJECTIVES.register(_name, _pyro(_name), "ppl_vae.objectives:PyroObjective")


def _mlp(c, shape, role, **_):
    dim = shape[0] * shape[1] * shape[2]
    if role == "encoder":
        return _lib("nets").Encoder(dim, tuple(reversed(c.hidden)), c.latent_dim,
                                    ACTIVATIONS.build(c))
    return _lib("nets").Decoder(c.latent_dim, c.hidden, dim, ACTIVATIONS.build(c))


def _conv(c, shape, role, **_):
    if role == "encoder":
        return _lib("nets").ConvEncoder(shape, tuple(reversed(c.hidden)), c.latent_dim)
    return _lib("nets").ConvDecoder(c.latent_dim, c.hidden, shape)


NETS = Registry("network", "net")  # context: shape (C, H, W), role ("encoder" or "decoder")
NETS.register("mlp", _mlp)
NETS.register("conv", _conv)


def encoder(c: "Config", data_dim: int, shape=None) -> nn.Module:
    return NETS.build(c, shape=shape or _lib("data").infer_shape(data_dim), role="encoder")


def decoder(c: "Config", data_dim: int, shape=None) -> nn.Module:
    return NETS.build(c, shape=shape or _lib("data").infer_shape(data_dim), role="decoder")


def _meanfield(c, data_dim, num_data, x=None, rank=0, world_size=1, **_):
    guide = _lib("guides").LocalNormal(num_data, c.latent_dim, rank=rank, world_size=world_size)
    if c.local_init == "pca" and x is not None:
        guide = guide.to(x.device).init_pca(x)
    return guide


GUIDES = Registry("guide", "guide")  # context: data_dim, num_data, x (training rows), model,
#                                       shape, rank and world_size (the torchrun process)
GUIDES.register("amortized", lambda c, data_dim, shape=None, **_: _lib("guides").AmortizedNormal(
    encoder(c, data_dim, shape)), "ppl_vae.guides:AmortizedNormal")
GUIDES.register("meanfield", _meanfield, "ppl_vae.guides:LocalNormal")
GUIDES.register("iaf", lambda c, data_dim, shape=None, **_: _lib("guides").AmortizedIAF(
    encoder(c, data_dim, shape), num_flows=2), "ppl_vae.guides:AmortizedIAF")
GUIDES.register("semiamortized", lambda c, data_dim, model, shape=None, **_:
                _lib("guides").SemiAmortizedNormal(encoder(c, data_dim, shape), model,
                                                   steps=c.refine_steps, step_size=c.refine_lr,
                                                   stop_gradient=c.refine_stop_gradient),
                "ppl_vae.guides:SemiAmortizedNormal")

LR_SCHEDULES = Registry("learning-rate schedule", "lr_schedule")  # epoch -> factor
LR_SCHEDULES.register("constant", lambda c, **_: None)
LR_SCHEDULES.register("burda", lambda c, **_: _burda)


REGISTRIES = (LIKELIHOODS, PRIORS, GUIDES, OBJECTIVES, ACTIVATIONS, LR_SCHEDULES, NETS)


def _burda(epoch: int) -> float:
    from .train import burda_factor
    return burda_factor(epoch)


# the built-in names as types (documentation and tests); a user's module:attribute is valid too
LikelihoodName = Literal[LIKELIHOODS.names()]
PriorName = Literal[PRIORS.names()]
GuideName = Literal[GUIDES.names()]
ObjectiveName = Literal[OBJECTIVES.names()]

BINARIZE = ("dynamic", "static", "none")  # data.Binarize's modes (its home: no torch here)
COMPILE_MODES = ("auto", "on", "off")  # compiled.choose's modes (its home: no torch here)
LOCAL_INIT = ("pca", "prior")
# q*'s family (``families.resolve`` builds it; "own": the guide's ``local_family``)
LOCAL_FAMILY = re.compile(r"own|diagonal|full|lowrank(:[1-9][0-9]*)?"
                          r"|flow(:[1-9][0-9]*(x[1-9][0-9]*)?)?")
ON_DIVERGENCE = ("stop", "lower_lr")
MAX_LATENT, MAX_WIDTH = 4096, 65536  # beyond these a run only fails in the allocator
MAX_STEPS = 1000  # inner and refinement steps per minibatch: a step stays interruptible
MAX_PARTICLES = 1_000_000  # K of an estimate: 10^6 already takes hours per 1,000 rows
SEED_LIMIT = 2 ** 32 - 1  # torch's CPU generator keeps 32 bits of a seed: 2**32 acts as 0


# settings a resumed run may change (each change is recorded in config.json's resumes); every
# other setting defines the run and a resume must keep it (run.RESUME_FIXED)
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
        _lib("data").check_name(self.dataset)
        for registry in REGISTRIES:
            registry.resolve(getattr(self, registry.field))
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise UserError(f"{setting(name)} must lie strictly between 0 and 1, got {value}")
        if self.tensorboard:
            from .tracking import require_tensorboard
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
        if self.dreg and piece is not None and getattr(piece, "family", None) != "diagonal normal":
            raise UserError(f"{setting('dreg')} needs a Normal guide; with {setting('guide')} "
                            f"{self.guide} drop dreg or use the amortized or meanfield guide")
        objective = getattr(OBJECTIVES.resolve(self.objective), "piece", None)
        if not _lib("objectives").takes_beta(objective):
            for name, default in (("warmup_epochs", 0), ("beta", 1.0)):
                if getattr(self, name) != default:
                    raise UserError(f"{setting(name)} weights the KL term of our ELBO "
                                    f"objectives; {setting('objective')} {self.objective} has "
                                    f"no KL weight: drop it or use {setting('objective')} elbo")
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
        resolve_device(self.device)
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


def resolve_device(name: str, world=None) -> torch.device:
    """The device a setting names, decided here only: ``auto`` is CUDA when available, else
    the CPU; under torchrun (``world``, a ``distributed.World`` of a launched process) each
    process takes its own GPU, ``cuda:LOCAL_RANK``, unless the setting is ``cpu``."""
    import torch

    from . import distributed
    if world is not None and (world.size > 1 or distributed.launched()):
        if name != "cpu" and torch.cuda.is_available():
            return torch.device("cuda", world.local_rank)
        if name.startswith("cuda"):
            raise UserError(f"device {name!r} ({setting('device')}) under torchrun, but CUDA "
                            f"is not available; use {setting('device')} cpu (Gloo)")
        return torch.device("cpu")
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


def guide_settings(config: Config) -> Tuple[str, ...]:
    """The settings the guide of ``config`` reads beyond the shared ones, as its class says
    (``Guide.settings``: a table's ``local_lr``, a refinement's ``refine_steps``, ...)."""
    return tuple(getattr(getattr(GUIDES.resolve(config.guide), "piece", None), "settings", ()))


def build_model(config: Config, data_dim: int, shape: Optional[data.Shape] = None):
    """The generative model: prior, decoder (``config.net``; conv nets need the image ``shape``
    (C, H, W), inferred from ``data_dim`` when None) and likelihood, seeded by ``config.seed``."""
    import torch
    torch.manual_seed(config.seed)  # same decoder initialization for every guide
    from .model import VAEModel
    return VAEModel(decoder(config, data_dim, shape),
                    LIKELIHOODS.build(config, data_dim=data_dim), PRIORS.build(config))


def build_guide(config: Config, data_dim: int, num_data: int, x=None, model=None,
                shape: Optional[data.Shape] = None, rank: int = 0, world_size: int = 1):
    """The guide named by ``config.guide``; initialized from its own seed stream.

    A per-datapoint guide with ``local_init="pca"`` starts from the principal-component
    scores of the (grayscale) training rows ``x``; without ``x`` it starts at N(0, I).
    A semi-amortized guide refines against ``model``. Under torchrun a builder that takes
    ``rank`` and ``world_size`` allocates only that process's rows of a per-datapoint table
    (any other guide is cut down afterwards by ``protocol.shard``).
    """
    import torch

    from .compiled import check_compilable
    torch.manual_seed(config.seed + 1)
    guide = GUIDES.build(config, data_dim=data_dim, num_data=num_data, x=x, model=model,
                         shape=shape, rank=rank, world_size=world_size)
    if config.compile == "on":
        check_compilable(guide)
    return guide


def build_objective(config: Config):
    from .compiled import Auto, Compiled
    objective = OBJECTIVES.build(config)
    if config.compile == "off":
        return objective
    return Compiled(objective, auto=Auto(config.epochs, config.max_seconds, config.batch_size,
                                         config.max_steps)
                    if config.compile == "auto" else None)


def lr_factor(config: Config):
    """``epoch -> learning-rate factor`` of ``config.lr_schedule``, or None for a constant rate."""
    return LR_SCHEDULES.build(config)


def local_family_of(config: "Config"):
    """q*'s family as ``local_fit.local_inference`` takes it: None asks the guide (``own``)."""
    return None if config.local_family == "own" else config.local_family
