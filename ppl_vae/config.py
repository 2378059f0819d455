"""One frozen config for a run, and the only tables that turn names into objects.

Every table is a ``Registry``: the built-ins are registered in it like a user's own piece.
A name is either a key of the table or ``module:attribute`` naming a user's class or
function (imported from the current folder too, as ``python -m`` would), so
``--likelihood mypkg.lik:Beta`` needs no edit of this package. A user's class is built with
``cls.from_config(config, **context)`` when it has one, else ``cls()``; the context of each
table is listed where it is defined. ``config.json`` records the name, so ``--resume`` and
``evaluate`` build the same piece again.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Literal, Optional, Tuple

import torch
import torch.nn as nn

from . import data, guides, likelihoods, nets, objectives, priors
from .compiled import Compiled, check_compilable
from .errors import UserError, setting


class Registry:
    """Names -> builders ``(config, **context) -> piece`` of one kind."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._builders: Dict[str, Callable] = {}

    def register(self, name: str, builder: Callable, piece: Optional[type] = None) -> Callable:
        """Add ``builder`` under ``name``: a function ``(config, **context)`` or a class.

        ``piece`` is the class the builder makes, asked before anything is built (a guide's
        ``compilable``); a registered class is its own piece.
        """
        builder = _as_builder(builder)
        if piece is not None:
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
            return _as_builder(obj)
        raise UserError(f"unknown {self.kind} {name!r} for {setting(self.field)}; choose one "
                        f"of {', '.join(self._builders)} or name your own as module:attribute")

    def build(self, config: "Config", **context):
        name = getattr(config, self.field)
        builder = self.resolve(name)
        try:
            return builder(config, **context)
        except TypeError as e:
            if name in self._builders:  # a built-in's own bug keeps its traceback
                raise
            raise UserError(f"cannot build {self.kind} {name!r} for {setting(self.field)} "
                            f"({e}); give it a from_config(config, **context) classmethod or "
                            f"an __init__ without arguments") from None


def _as_builder(obj) -> Callable:
    if isinstance(obj, type):
        def build(config, **context):
            if hasattr(obj, "from_config"):
                return obj.from_config(config, **context)
            return obj()
        build.piece = obj
        return build
    return obj


def _import(name: str, registry: Registry):
    module, _, attr = name.partition(":")
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


ACTIVATIONS = Registry("activation", "activation")
ACTIVATIONS.register("relu", lambda c, **_: nn.ReLU)
ACTIVATIONS.register("elu", lambda c, **_: nn.ELU)
ACTIVATIONS.register("tanh", lambda c, **_: nn.Tanh)
ACTIVATIONS.register("softplus", lambda c, **_: nn.Softplus)

LIKELIHOODS = Registry("likelihood", "likelihood")  # context: data_dim
LIKELIHOODS.register("bernoulli", lambda c, **_: likelihoods.Bernoulli())
LIKELIHOODS.register("continuous_bernoulli", lambda c, **_: likelihoods.ContinuousBernoulli())
LIKELIHOODS.register("normal", lambda c, data_dim, **_: likelihoods.Normal(data_dim, shared=False))
LIKELIHOODS.register("normal_shared", lambda c, data_dim, **_: likelihoods.Normal(data_dim, shared=True))

PRIORS = Registry("prior", "prior")
PRIORS.register("normal", lambda c, **_: priors.StandardNormal(c.latent_dim))
PRIORS.register("mog", lambda c, **_: priors.MixtureOfGaussians(c.latent_dim, seed=c.seed))

OBJECTIVES = Registry("objective", "objective")
OBJECTIVES.register("elbo", lambda c, **_: objectives.ELBO(c.num_particles, beta=c.beta))
OBJECTIVES.register("analytic_kl", lambda c, **_: objectives.AnalyticKLELBO(c.num_particles, beta=c.beta))
OBJECTIVES.register("iwae", lambda c, **_: objectives.IWAE(c.num_particles, dreg=c.dreg))


def _mlp(c, shape, role, **_):
    dim = shape[0] * shape[1] * shape[2]
    if role == "encoder":
        return nets.Encoder(dim, tuple(reversed(c.hidden)), c.latent_dim, ACTIVATIONS.build(c))
    return nets.Decoder(c.latent_dim, c.hidden, dim, ACTIVATIONS.build(c))


def _conv(c, shape, role, **_):
    if role == "encoder":
        return nets.ConvEncoder(shape, tuple(reversed(c.hidden)), c.latent_dim)
    return nets.ConvDecoder(c.latent_dim, c.hidden, shape)


NETS = Registry("network", "net")  # context: shape (C, H, W), role ("encoder" or "decoder")
NETS.register("mlp", _mlp)
NETS.register("conv", _conv)


def encoder(c: "Config", data_dim: int, shape=None) -> nn.Module:
    return NETS.build(c, shape=shape or data.infer_shape(data_dim), role="encoder")


def decoder(c: "Config", data_dim: int, shape=None) -> nn.Module:
    return NETS.build(c, shape=shape or data.infer_shape(data_dim), role="decoder")


def _meanfield(c, data_dim, num_data, x=None, rank=0, world_size=1, **_):
    guide = guides.LocalNormal(num_data, c.latent_dim, rank=rank, world_size=world_size)
    if c.local_init == "pca" and x is not None:
        guide = guide.to(x.device).init_pca(x)
    return guide


GUIDES = Registry("guide", "guide")  # context: data_dim, num_data, x (training rows), model,
#                                       shape, rank and world_size (the torchrun process)
GUIDES.register("amortized", lambda c, data_dim, shape=None, **_: guides.AmortizedNormal(
    encoder(c, data_dim, shape)), guides.AmortizedNormal)
GUIDES.register("meanfield", _meanfield, guides.LocalNormal)
GUIDES.register("iaf", lambda c, data_dim, shape=None, **_: guides.AmortizedIAF(
    encoder(c, data_dim, shape), num_flows=2), guides.AmortizedIAF)
GUIDES.register("semiamortized", lambda c, data_dim, model, shape=None, **_:
                guides.SemiAmortizedNormal(encoder(c, data_dim, shape), model,
                                           steps=c.refine_steps, step_size=c.refine_lr,
                                           stop_gradient=c.refine_stop_gradient),
                guides.SemiAmortizedNormal)

LR_SCHEDULES = Registry("learning-rate schedule", "lr_schedule")  # epoch -> factor
LR_SCHEDULES.register("constant", lambda c, **_: None)
LR_SCHEDULES.register("burda", lambda c, **_: _burda)


def _burda(epoch: int) -> float:
    from .train import burda_factor
    return burda_factor(epoch)


# the built-in names as types (documentation and tests); a user's module:attribute is valid too
LikelihoodName = Literal[LIKELIHOODS.names()]
PriorName = Literal[PRIORS.names()]
GuideName = Literal[GUIDES.names()]
ObjectiveName = Literal[OBJECTIVES.names()]

BINARIZE = ("dynamic", "static", "none")
LOCAL_INIT = ("pca", "prior")
ON_DIVERGENCE = ("stop", "lower_lr")
MAX_LATENT, MAX_WIDTH = 4096, 65536  # beyond these a run only fails in the allocator
SEED_LIMIT = 2 ** 32 - 1  # torch's CPU generator keeps 32 bits of a seed: 2**32 acts as 0


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
    train_size: Optional[int] = None  # use the first n training rows (smoke runs)
    valid_size: int = 1000  # validation rows scored every epoch
    test_size: Optional[int] = None  # evaluate on the first n test rows (default: all)
    on_divergence: str = "stop"  # non-finite loss: stop, or halve the rates and go on
    compile: bool = False  # trace the objective once per batch shape and compile it (compiled.py)
    track_gaps: bool = False  # score the gaps on training and test rows at gap_epochs
    gap_epochs: Tuple[int, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000)
    gap_rows: int = 1000  # rows of each of the training and test subsets of the gap curves
    gap_particles: int = 500  # K of log p(x) in the gap curves
    tensorboard: bool = False  # also write TensorBoard events into <out>/tensorboard
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "Config":
        data.check_name(self.dataset)
        for registry in (LIKELIHOODS, PRIORS, GUIDES, OBJECTIVES, ACTIVATIONS, LR_SCHEDULES,
                         NETS):
            registry.resolve(getattr(self, registry.field))
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise UserError(f"{setting(name)} must lie strictly between 0 and 1, got {value}")
        if self.tensorboard:
            from .tracking import require_tensorboard
            require_tensorboard()
        for name, choices in (("binarize", BINARIZE), ("local_init", LOCAL_INIT),
                              ("on_divergence", ON_DIVERGENCE)):
            if getattr(self, name) not in choices:
                raise UserError(f"unknown {name} {getattr(self, name)!r} for {setting(name)}; "
                                f"choose one of {', '.join(choices)}")
        positive = ["latent_dim", "epochs", "batch_size", "lr", "num_particles", "valid_size",
                    "adam_eps", "gap_rows", "gap_particles"]
        if self.guide == "meanfield":
            positive.append("local_lr")
        if self.guide == "semiamortized":
            positive.append("refine_lr")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{setting(name)} must be a positive finite number, got {value}")
        for name in ("train_size", "test_size", "max_seconds"):
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
        if self.warmup_epochs and self.objective == "iwae":
            raise UserError(f"{setting('warmup_epochs')} weights the KL term of the ELBO "
                            f"objectives; IWAE has none: drop it or use {setting('objective')} elbo")
        if self.objective == "iwae" and self.beta != 1.0:
            raise UserError(f"{setting('beta')} applies to the ELBO objectives; IWAE has no "
                            f"separate KL term")
        if self.compile:
            piece = getattr(GUIDES.resolve(self.guide), "piece", None)
            if not getattr(piece, "compilable", True):
                raise UserError(f"{setting('compile')} applies to the amortized guides "
                                f"(amortized, iaf), not to {self.guide}: its step cannot be "
                                f"traced once and replayed; drop compile or use another guide")
            if self.dreg:
                raise UserError(f"{setting('compile')} cannot trace DReG's gradient hook; drop "
                                f"compile or dreg")
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
        for key in ("hidden", "gap_epochs"):
            if key in d:
                if not isinstance(d[key], (list, tuple)):
                    raise UserError(f"config key {key!r} must be a list of numbers")
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"bad config: {e}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
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


def build_model(config: Config, data_dim: int, shape: Optional[data.Shape] = None):
    """The generative model: prior, decoder (``config.net``; conv nets need the image ``shape``
    (C, H, W), inferred from ``data_dim`` when None) and likelihood, seeded by ``config.seed``."""
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
    (any other guide is cut down afterwards by ``guides.shard``).
    """
    torch.manual_seed(config.seed + 1)
    guide = GUIDES.build(config, data_dim=data_dim, num_data=num_data, x=x, model=model,
                         shape=shape, rank=rank, world_size=world_size)
    if config.compile:
        check_compilable(guide, config.dreg)
    return guide


def build_objective(config: Config):
    objective = OBJECTIVES.build(config)
    return Compiled(objective) if config.compile else objective


def lr_factor(config: Config):
    """``epoch -> learning-rate factor`` of ``config.lr_schedule``, or None for a constant rate."""
    return LR_SCHEDULES.build(config)
