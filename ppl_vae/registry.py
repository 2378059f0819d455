"""The tables that turn names into objects (``Registry``) and the consent rule for user code.

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

Layering: this module sits just above ``errors`` and below everything else; ``config`` imports
it for the tables' names (its ``Literal`` types, ``validate``) and ``build`` for the tables.
It imports no other module of this package and no torch when imported: a builder imports its
piece's module by name when it first runs (``_lib``, the pieces' modules import ``config``), and
a registered ``piece`` may be named ``module:Class``, imported when first asked for, so
``ppl-vae --help`` and the CLI's usage errors answer without waiting for torch. A builder is
given a ``config.Config`` and reads its settings by attribute.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Callable, Dict, Optional, Union

from .errors import UserError, setting

if TYPE_CHECKING:  # annotations only
    import torch.nn as nn


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

    def build(self, config, **context):
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


def code_names(config) -> Dict[str, str]:
    """``{field: name}`` of every setting that names code outside this package: a
    ``module:attribute`` that is not a registered name (importing it runs its module)."""
    out = {}
    for registry in REGISTRIES:
        name = getattr(config, registry.field)
        if isinstance(name, str) and name not in registry:
            out[registry.field] = name
    return out


def require_consent(config, source, given=None, trust_code: bool = False) -> None:
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
# beta is not built into an objective: ``train.fit`` hands it every step (its schedule), the
# one place it is carried
OBJECTIVES.register("elbo", lambda c, **_: _lib("objectives").ELBO(c.num_particles),
                    "ppl_vae.objectives:ELBO")
OBJECTIVES.register("analytic_kl", lambda c, **_: _lib("objectives").AnalyticKLELBO(
    c.num_particles), "ppl_vae.objectives:AnalyticKLELBO")
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
        return _lib("nets").ConvEncoder(shape, tuple(reversed(c.hidden)), c.latent_dim,
                                        activation=ACTIVATIONS.build(c))
    return _lib("nets").ConvDecoder(c.latent_dim, c.hidden, shape, activation=ACTIVATIONS.build(c))


NETS = Registry("network", "net")  # context: shape (C, H, W), role ("encoder" or "decoder")
NETS.register("mlp", _mlp)
NETS.register("conv", _conv)


def encoder(c, data_dim: int, shape=None) -> nn.Module:
    return NETS.build(c, shape=shape or _lib("data").infer_shape(data_dim), role="encoder")


def decoder(c, data_dim: int, shape=None) -> nn.Module:
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
    return _lib("train").burda_factor(epoch)
