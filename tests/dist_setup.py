"""The small problem that tests/test_distributed.py trains with 2 processes and with one."""
import torch

from ppl_vae import data
from ppl_vae.build import build_guide, build_model
from ppl_vae.config import Config

N, D, SEED, STEPS, WORLD, BATCH = 3200, 20, 0, 20, 2, 64  # BATCH: per process


def split() -> data.Split:
    g = torch.Generator().manual_seed(123)
    return data.Split(torch.rand(N, D, generator=g), torch.zeros(N, dtype=torch.long))


def config(guide: str) -> Config:
    return Config(guide=guide, hidden=(16,), latent_dim=2, lr=1e-2, local_lr=0.2,
                  inner_steps=1, seed=SEED, batch_size=BATCH)


def build(guide: str):
    """Model and guide (whole table) as every process builds them, before sharding."""
    c = config(guide)
    model = build_model(c, D, (1, 1, D))
    return model, build_guide(c, D, N, split().x, model=model, shape=(1, 1, D))


def noise(rank: int) -> data.Binarize:
    """Process ``rank``'s binarization noise (as ``run.fit_run`` seeds it)."""
    return data.Binarize("dynamic", torch.Generator().manual_seed(SEED + 3 + 7919 * rank))


# held-out evaluation: 40 rows in units of 10 (2 per process), small K and short local fits
EVAL = dict(num_particles=20, seed=5, unit_rows=10, local_options={"max_steps": 60},
            progress=False)


def eval_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(321)
    return torch.bernoulli(torch.rand(40, D, generator=g), generator=g)
