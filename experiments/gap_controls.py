"""Where the gap numbers come from: each choice of the gap estimator, changed one at a time.

    uv run python experiments/gap_controls.py --run runs/cremer/amortized   # a trained run
    uv run python experiments/gap_controls.py --smoke                       # toy size, seconds

On the first ``--rows`` test rows (``--split train``: training rows, as the run saw them) of a
run's newest checkpoint, the gaps are computed as ``evaluate`` computes them (``ours``) and
then with one choice changed at a time:

- ``q* <= 500 steps``: the local fit capped as in the gap curves (``--track-gaps`` runs);
- ``q* from N(0, I)``: each row's q* started from a standard Normal instead of the encoder's
  answer (the authors' code starts every q* from a fresh Gaussian), same step budget;
- ``q* from q, stricter stop``: our fit run on with a ten times stricter plateau rule
  (10 halvings of the step size at 0.001 nats, up to four times the steps): how far our
  q* is from its optimum;
- ``log p(x) K = 500``: importance sampling with a tenth of the particles;
- ``log p(x) from q``: the encoder as the proposal instead of q*;
- ``L[q], L[q*] from K samples``: the ELBOs averaged over K samples per row, as the authors
  do, instead of our 10 (the ELBO is an expectation: only its noise should change).

Each row gives L[q], L[q*], log p(x) and both gaps with the paired standard errors; a table
goes to ``<out>/table.md`` and the rows to ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _table import SMOKE, markdown
from ppl_vae import local_fit
from ppl_vae.evaluate import Estimate, elbo_parts, log_px
from ppl_vae.heldout import EVAL_SEED, scored_rows
from ppl_vae.run import fit_run
from ppl_vae.run_setup import load_trained

COLUMNS = ["variant", "L[q]", "L[q*]", "log p(x)", "approximation_gap", "amortization_gap",
           "q*_steps", "seconds"]


def shown(row: dict) -> dict:
    """A result row as the table shows it: each gap as mean ± standard error."""
    out = dict(row)
    for gap in ("approximation_gap", "amortization_gap"):
        out[gap] = f"{row[gap]:.2f} ± {row[gap + '_stderr']:.2f}"
    return out


def controls(model, guide, x: torch.Tensor, num_particles: int, max_steps: int,
             progress: bool = False) -> list:
    """The table's rows: ``ours`` and one row per changed choice (see the module docstring)."""
    own = local_fit.held_out(guide, model, x, seed=EVAL_SEED).guide  # the guide as it answers

    def elbo(q, k=10):  # per-row ELBO from k samples; k = 10 as `evaluate` (same batches)
        return elbo_parts(model, q, x, num_particles=k, seed=EVAL_SEED,
                          batch_size=max(1, min(1000, 10_000 // k))).elbo

    def fit(init, steps, **rule):
        return local_fit.local_inference(model, x, init=init, max_steps=steps, seed=EVAL_SEED,
                                      **rule)

    estimates = {}  # (proposal, K) -> per-row log p(x): a row that only changes the ELBOs reuses it

    def row(name, q_star, steps, start, l_q=None, l_star=None, proposal=None, k=None):
        l_q = elbo(own) if l_q is None else l_q
        l_star = elbo(q_star) if l_star is None else l_star
        key = (id(proposal or q_star), k or num_particles)
        if key not in estimates:
            estimates[key] = log_px(model, proposal or q_star, x, key[1], seed=EVAL_SEED)
        lp = estimates[key]
        approx, amort = Estimate.of(lp - l_star), Estimate.of(l_star - l_q)  # paired
        out = {"variant": name, "L[q]": l_q.mean().item(), "L[q*]": l_star.mean().item(),
               "log p(x)": lp.mean().item(), "approximation_gap": approx.mean,
               "approximation_gap_stderr": approx.stderr, "amortization_gap": amort.mean,
               "amortization_gap_stderr": amort.stderr, "q*_steps": steps,
               "seconds": time.perf_counter() - start}
        if progress:
            print(" | ".join(str(v) for v in shown(out).values()), flush=True)
        return out

    rows = []
    t = time.perf_counter()
    ours = fit(own, max_steps)
    rows.append(row("ours: q* from q, <= %d steps, K = %d" % (max_steps, num_particles),
                    ours.guide, ours.steps, t))
    t = time.perf_counter()
    short = fit(own, 500)
    rows.append(row("q* <= 500 steps", short.guide, short.steps, t))
    t = time.perf_counter()
    fresh = fit(None, max_steps)
    rows.append(row("q* from N(0, I)", fresh.guide, fresh.steps, t))
    t = time.perf_counter()
    strict = fit(own, 4 * max_steps, tol=0.001, decays=10)
    rows.append(row("q* from q, stricter stop", strict.guide, strict.steps, t))
    t = time.perf_counter()
    k_small = max(1, num_particles // 10)
    rows.append(row(f"log p(x) K = {k_small}", ours.guide, ours.steps, t, k=k_small))
    t = time.perf_counter()
    rows.append(row("log p(x) from q", ours.guide, ours.steps, t, proposal=own))
    t = time.perf_counter()
    rows.append(row(f"L[q], L[q*] from K = {num_particles} samples", ours.guide, ours.steps, t,
                    l_q=elbo(own, num_particles), l_star=elbo(ours.guide, num_particles)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a trained run folder (ppl-vae train --out)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--num-particles", type=int, default=5000)
    p.add_argument("--local-steps", type=int, default=3000)
    p.add_argument("--out", type=Path, default=Path("runs/gap_controls"))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        from ppl_vae.config import Config
        args.run = args.out / "trained"
        fit_run(Config(**SMOKE), args.run, overwrite=True, progress=False)
        args.rows, args.num_particles, args.local_steps = 20, 20, 30
    if args.run is None:
        p.error("--run RUN_FOLDER is required (or --smoke)")
    trained = load_trained(args.run)
    guide, x = scored_rows(trained, args.split, args.rows)
    rows = controls(trained.model, guide, x, args.num_particles, args.local_steps,
                    progress=not args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"run": str(args.run), "split": args.split, "rows_scored": len(x),
         "epochs": len(trained.history), "rows": rows}, indent=2) + "\n")
    table = markdown([shown(r) for r in rows], COLUMNS)
    (args.out / "table.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
