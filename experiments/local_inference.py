"""Is test-time local inference converged? The stopping rule against a fit four times longer.

Fits q* for the test rows of a trained run with the default stopping rule (S steps per chunk),
then again for 4 S steps per chunk with the learning rate decayed by a cosine from the same
start to zero, and reports L[q*] of both (same evaluation seed) and their difference. The
gap numbers of ``compare`` are only as good as this fit; the target is a difference < 0.1 nats.

    uv run python experiments/local_inference.py runs/amortized
    uv run python experiments/local_inference.py --smoke
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from _table import SMOKE
from ppl_vae import local_fit
from ppl_vae.batching import Batch
from ppl_vae.batching import batches_of
from ppl_vae.evaluate import elbo_parts
from ppl_vae.local_fit import local_inference
from ppl_vae.guides import LocalNormal
from ppl_vae.objectives import AnalyticKLELBO
from ppl_vae.run_setup import load_trained
from ppl_vae.heldout import EVAL_SEED, eval_pixels


def long_fit(model, x, init, steps: int, lr: float, chunk_size: int = 5000) -> LocalNormal:
    """Adam for ``steps`` steps per chunk with a cosine decay of the learning rate to zero."""
    torch.manual_seed(EVAL_SEED)
    guide = LocalNormal(len(x), model.latent_dim, sparse=False).to(x.device)
    objective = AnalyticKLELBO()  # the objective local_inference uses
    for batch in batches_of(x, chunk_size):
        chunk = LocalNormal(len(batch.idx), model.latent_dim, sparse=False).to(x.device)
        if init is not None:
            with torch.no_grad():
                loc, scale = init.loc_scale(batch)
            chunk.set_rows(torch.arange(len(batch.idx), device=x.device), loc, scale)
        local = Batch(batch.x, torch.arange(len(batch.idx), device=x.device), len(batch.idx))
        opt = torch.optim.Adam([chunk.params], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
        for _ in range(steps):
            loss = -objective.per_datapoint(model, chunk, local).sum()
            (chunk.params.grad,) = torch.autograd.grad(loss, [chunk.params])
            opt.step()
            sched.step()
        with torch.no_grad():
            guide.params[batch.idx] = chunk.params
    return guide


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        from ppl_vae.config import Config
        from ppl_vae.run import train_run
        args.run_dir = Path("runs/local_inference_smoke")
        train_run(Config(**SMOKE), args.run_dir, overwrite=True, progress=False)
        args.test_size = 50
    trained = load_trained(args.run_dir, test_size=args.test_size)
    x = eval_pixels(trained.config, trained.splits.test)
    # the guide's own start for new rows: an encoder's output, or N(0, I) rows for a table
    init = local_fit.held_out(trained.guide, trained.model, x, max_steps=0).guide
    model = trained.model
    t = time.perf_counter()
    rule = local_inference(model, x, init=init, seed=EVAL_SEED)
    rule_seconds = time.perf_counter() - t
    chunks = math.ceil(len(x) / 5000)
    steps = 4 * math.ceil(rule.steps / chunks)
    t = time.perf_counter()
    longer = long_fit(model, x, init, steps, lr=0.05)
    long_seconds = time.perf_counter() - t
    a = elbo_parts(model, rule.guide, x, num_particles=10, seed=EVAL_SEED).elbo.mean().item()
    b = elbo_parts(model, longer, x, num_particles=10, seed=EVAL_SEED).elbo.mean().item()
    out = {"run": str(args.run_dir), "rows": len(x), "rule_steps": rule.steps,
           "rule_seconds": rule_seconds, "rule_elbo": a, "long_steps": steps * chunks,
           "long_seconds": long_seconds, "long_elbo": b, "difference": b - a}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
