"""One frozen config for a run, and the only tables that turn names into objects."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, get_args

import torch

from . import data, guides, likelihoods, nets, objectives, priors
from .compiled import Compiled, check_compilable
from .errors import UserError

DatasetName = Literal["mnist", "fashion_mnist", "kmnist"]
BinarizeName = Literal["dynamic", "static", "none"]
LikelihoodName = Literal["bernoulli", "continuous_bernoulli", "normal", "normal_shared"]
PriorName = Literal["normal", "mog"]
GuideName = Literal["amortized", "meanfield", "iaf"]
ObjectiveName = Literal["elbo", "analytic_kl", "iwae"]
LocalInitName = Literal["pca", "prior"]
DivergenceName = Literal["stop", "lower_lr"]
NetName = Literal["mlp", "conv"]

LIKELIHOODS = {
    "bernoulli": lambda d: likelihoods.Bernoulli(),
    "continuous_bernoulli": lambda d: likelihoods.ContinuousBernoulli(),
    "normal": lambda d: likelihoods.Normal(d, shared=False),
    "normal_shared": lambda d: likelihoods.Normal(d, shared=True),
}
PRIORS = {
    "normal": lambda c: priors.StandardNormal(c.latent_dim),
    "mog": lambda c: priors.MixtureOfGaussians(c.latent_dim, seed=c.seed),
}
OBJECTIVES = {
    "elbo": lambda c: objectives.ELBO(c.num_particles),
    "analytic_kl": lambda c: objectives.AnalyticKLELBO(c.num_particles),
    "iwae": lambda c: objectives.IWAE(c.num_particles, dreg=c.dreg),
}
for _name, _table in (("LikelihoodName", LIKELIHOODS), ("PriorName", PRIORS),
                      ("ObjectiveName", OBJECTIVES)):
    assert set(get_args(globals()[_name])) == set(_table), _name


@dataclass(frozen=True)
class Config:
    """Every setting of a run; ``validate`` refuses bad values with a message naming the fix."""

    dataset: str = "mnist"  # a DatasetName, a folder of IDX files, a .npz/.npy, torchvision:<Class>
    data_dir: Optional[str] = None
    valid_fraction: Optional[float] = None  # of the training rows; None: 1/6 (MNIST's 10k of 60k)
    test_fraction: float = 0.1  # of the rows, for data sets without their own test split
    binarize: BinarizeName = "dynamic"
    latent_dim: int = 50
    hidden: Tuple[int, ...] = (400,)
    net: NetName = "mlp"  # encoder/decoder: MLPs, or conv nets built from the image shape
    likelihood: LikelihoodName = "bernoulli"
    prior: PriorName = "normal"
    guide: GuideName = "amortized"
    objective: ObjectiveName = "elbo"
    num_particles: int = 1
    dreg: bool = False
    beta: float = 1.0
    warmup_epochs: int = 0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    local_lr: float = 0.2  # per-datapoint guide: RowAdam learning rate of the table
    inner_steps: int = 1  # per-datapoint guide: local-only steps per minibatch
    local_init: LocalInitName = "pca"  # per-datapoint guide: where the table's rows start
    max_seconds: Optional[float] = None  # stop training after this much training time
    train_size: Optional[int] = None  # use the first n training rows (smoke runs)
    valid_size: int = 1000  # validation rows scored every epoch
    test_size: Optional[int] = None  # evaluate on the first n test rows (default: all)
    on_divergence: DivergenceName = "stop"  # non-finite loss: stop, or halve the rates and go on
    compile: bool = False  # trace the objective once per batch shape and compile it (compiled.py)
    tensorboard: bool = False  # also write TensorBoard events into <out>/tensorboard
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "Config":
        data.check_name(self.dataset)
        for name, choices in (("net", NetName), ("binarize", BinarizeName),
                              ("likelihood", LikelihoodName), ("prior", PriorName),
                              ("guide", GuideName), ("objective", ObjectiveName),
                              ("local_init", LocalInitName), ("on_divergence", DivergenceName)):
            value, valid = getattr(self, name), get_args(choices)
            if value not in valid:
                raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")
        positive = ["latent_dim", "epochs", "batch_size", "lr", "num_particles", "valid_size"]
        if self.guide == "meanfield":
            positive.append("local_lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("train_size", "test_size", "max_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must lie strictly between 0 and 1, "
                                f"got {value}")
        if self.tensorboard:
            from .tracking import require_tensorboard
            require_tensorboard()
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise UserError(f"--hidden needs positive layer sizes, got {list(self.hidden)}")
        if self.inner_steps < 0 or self.warmup_epochs < 0 or self.beta < 0:
            raise UserError("--inner-steps, --warmup-epochs and --beta must be >= 0")
        if self.dreg and self.objective != "iwae":
            raise UserError("--dreg applies to --objective iwae only")
        if self.dreg and self.guide == "iaf":
            raise UserError("--dreg needs a Normal guide; with --guide iaf drop --dreg or use "
                            "--guide amortized or meanfield")
        if self.warmup_epochs and self.objective == "iwae":
            raise UserError("--warmup-epochs weights the KL term of the ELBO objectives; "
                            "IWAE has none: drop it or use --objective elbo")
        if self.objective == "iwae" and self.beta != 1.0:
            raise UserError("--beta applies to the ELBO objectives; IWAE has no separate KL term")
        if self.compile:
            check_compilable(self.guide == "meanfield", self.dreg, self.warmup_epochs)
        resolve_device(self.device)
        return self

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown config keys {sorted(unknown)}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA "
                        f"device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def build_model(config: Config, data_dim: int, shape: Optional[data.Shape] = None):
    """The generative model: prior, decoder (``config.net``; conv nets need the image
    ``shape`` (C, H, W), inferred from ``data_dim`` when None) and likelihood, seeded by
    ``config.seed``."""
    torch.manual_seed(config.seed)  # same decoder initialization for every guide
    decoder = nets.make_decoder(config.net, config.latent_dim, config.hidden,
                                shape or data.infer_shape(data_dim))
    from .model import VAEModel
    return VAEModel(decoder, LIKELIHOODS[config.likelihood](data_dim), PRIORS[config.prior](config))


def build_guide(config: Config, data_dim: int, num_data: int, x=None,
                shape: Optional[data.Shape] = None):
    """The guide named by ``config.guide``; initialized from its own seed stream.

    A per-datapoint guide with ``local_init="pca"`` starts from the principal-component
    scores of the (grayscale) training rows ``x``; without ``x`` it starts at N(0, I).
    """
    torch.manual_seed(config.seed + 1)
    if config.guide in ("amortized", "iaf"):
        encoder = nets.make_encoder(config.net, shape or data.infer_shape(data_dim),
                                    tuple(reversed(config.hidden)), config.latent_dim)
        if config.guide == "iaf":
            return guides.AmortizedIAF(encoder, num_flows=2)
        return guides.AmortizedNormal(encoder)
    guide = guides.LocalNormal(num_data, config.latent_dim)
    if config.local_init == "pca" and x is not None:
        guide = guide.to(x.device).init_pca(x)
    return guide


def build_objective(config: Config):
    objective = OBJECTIVES[config.objective](config)
    return Compiled(objective) if config.compile else objective
