"""Mean-field training that works: the same training-time budget for three set-ups.

1. amortized: the encoder guide (reference);
2. meanfield, ours: per-datapoint table started at PCA scores, RowAdam on the batch rows
   with its own learning rate and inner steps (the defaults of ``Config``);
3. meanfield, naive: the table started at N(0, I), dense Adam over the whole N x 2L table at
   the networks' learning rate, no inner steps (what Pyro's ``SVI`` + ``pyro.optim.Adam``
   does with such a guide).

Each model's test ELBO: its own guide (amortized) or a per-datapoint q fitted to the test rows
with the decoder frozen (meanfield). Target: ours reaches -105 nats or better in 10 minutes.

    uv run python experiments/meanfield_budget.py --max-seconds 600
    uv run python experiments/meanfield_budget.py --smoke
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _table import SMOKE, write
from ppl_vae import data
from ppl_vae.build import build_guide, build_model, build_objective
from ppl_vae.config import Config
from ppl_vae.distributed import resolve_device
from ppl_vae.evaluate import Estimate
from ppl_vae.optim import Optimizers
from ppl_vae.heldout import eval_pixels, held_out_elbo
from ppl_vae.run import finish, fit_run
from ppl_vae.run_setup import load_splits
from ppl_vae.train import fit


def naive_meanfield(config: Config, progress: bool) -> dict:
    """Dense Adam over the table and the decoder, one learning rate, table at N(0, I)."""
    splits = load_splits(config, resolve_device(config.device))
    dim = splits.train.x.shape[1]
    model = build_model(config, dim).to(splits.train.x.device)
    guide = build_guide(config.replace(local_init="prior"), dim, len(splits.train))
    guide.sparse = False
    guide = guide.to(splits.train.x.device)
    params = list(model.parameters()) + list(guide.parameters())
    opts = Optimizers(torch.optim.Adam(params, lr=config.lr))
    history = fit(model, guide, build_objective(config), splits.train, opts, config.epochs,
                  config.batch_size, data.Binarize(config.binarize), seed=config.seed,
                  max_seconds=config.max_seconds, progress=progress)
    elbo, _ = held_out_elbo(model, guide, eval_pixels(config, splits.test))
    est = Estimate.of(elbo)
    return {"test_elbo": est.mean, "test_elbo_stderr": est.stderr, "epochs": len(history),
            "train_seconds": history[-1].wall}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("runs/meanfield_budget"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--setups", nargs="+", default=["amortized", "meanfield", "naive"],
                   choices=["amortized", "meanfield", "naive"], help="which set-ups to run")
    args = p.parse_args(argv)
    base = Config(epochs=10_000, max_seconds=args.max_seconds)
    if args.smoke:
        base = base.replace(**SMOKE)
    rows = []
    for label, guide in (("amortized", "amortized"), ("meanfield (ours)", "meanfield")):
        if guide not in args.setups:
            continue
        trained = fit_run(base.replace(guide=guide), args.out / guide, overwrite=True,
                          progress=not args.smoke)
        rows.append({"setup": label, **finish(trained, args.out / guide).to_json()})
    if "naive" in args.setups:
        rows.append({"setup": "meanfield (naive dense Adam)",
                     **naive_meanfield(base.replace(guide="meanfield"), not args.smoke)})
    write(rows, ["setup", "epochs", "train_seconds", "test_elbo", "test_elbo_stderr"], args.out)
    return rows


if __name__ == "__main__":
    main()
