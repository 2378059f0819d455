"""Cremer, Li & Duvenaud (2018)'s protocol for the inference gaps on MNIST, with our pieces.

    uv run python experiments/cremer.py                      # the full protocol (hours)
    uv run python experiments/cremer.py --resume             # continue it after a stop
    uv run python experiments/cremer.py --smoke              # toy size, seconds
    uv run python experiments/cremer.py --warmup-epochs 0    # a control: no KL warm-up
    uv run python experiments/cremer.py --warmup-epochs 100 --warmup-term entropy  # the authors'

Every difference from our defaults is a setting of ``Config``, not a fork of the code:
encoder 784-200-200-(2x50) and decoder 50-200-200-784 with ELU (``hidden=(200, 200)``,
``activation="elu"``), batch 100, Adam with eps 1e-4, the learning-rate schedule of Burda et
al. (``lr_schedule="burda"``: 3^i epochs at 1e-3 x 10^(-i/7), i = 0..7, 3,280 epochs in
all), KL warm-up over the first 400 epochs (``warmup_epochs=400``), and gap curves
(``track_gaps``) at log-spaced epochs. At the end each model is scored on 1,000 training and
1,000 test rows: L[q], L[q*] (fitted per datapoint in each guide's own family, the decoder frozen),
log p(x) with K = 5000 from q*, and both gaps, into ``<out>/results.json`` and a table;
every guide's gap curves go into ``<out>/gap_curves.png``.

Guides: the factorized Gaussian (``amortized``), a flow (``iaf``: our two-step IAF, not the
paper's auxiliary flow) and, beside them, a model trained with the mean-field per-datapoint
guide, which the paper does not have. Each guide's run folder checkpoints every epoch, so
``--resume`` continues an interrupted protocol exactly.

q* is fitted in each guide's own per-datapoint family (``protocol.local_family``): a diagonal
Gaussian for the factorized guide and the mean-field model, and for the flow a per-datapoint
flow of the same shape (``families.Flow``: its own network weights for every row, started
at the amortized flow's), as the paper fits a local flow; the table's rows name the family.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from _table import SMOKE, markdown
from ppl_vae import checkpoint, gap_plots, objectives, plots
from ppl_vae.config import Config
from ppl_vae.evaluate import evaluate_model
from ppl_vae.heldout import EVAL_SEED, scored_rows
from ppl_vae.run import fit_run
from ppl_vae.run_setup import load_trained

PROTOCOL = Config(hidden=(200, 200), activation="elu", latent_dim=50, batch_size=100,
                  adam_eps=1e-4, lr=1e-3, lr_schedule="burda", epochs=3280, warmup_epochs=400,
                  track_gaps=True, gap_epochs=(1, 3, 10, 30, 100, 300, 1000, 3280),
                  gap_rows=1000, gap_particles=500, valid_size=1000)
PAPER = {  # Cremer, Li & Duvenaud (2018), Table 2, MNIST (see experiments/README.md)
    "amortized": {"log_px": -89.80, "elbo_local": -91.23, "elbo": -92.57,
                  "approximation_gap": 1.43, "amortization_gap": 1.34},
    "iaf": {"log_px": -88.94, "elbo_local": -90.38, "elbo": -91.79,
            "approximation_gap": 1.44, "amortization_gap": 1.41},
}


@dataclass(frozen=True)
class EntropyWarmupELBO(objectives.ELBO):
    """The warm-up of the authors' code (``chriscremer/Inference-Suboptimality``, every
    ``train_mnist.py``: ``elbo = logpxz - warmup * logqz``): beta weights only log q, so the
    bound is E_q[log p(x, z)] - beta E_q[log q(z | x)], where our KL warm-up weights
    log q - log p(z). Equal to the ELBO at beta = 1. A user objective named
    ``cremer:EntropyWarmupELBO`` (``--warmup-term entropy``); run from ``experiments/`` to
    ``evaluate`` such a run, so the name imports."""

    @classmethod
    def from_config(cls, config, **_):
        return cls(config.num_particles)  # beta: handed every step by train.fit

    def per_datapoint(self, model, guide, batch, beta=None):
        beta = self.beta if beta is None else beta
        lw = objectives.log_weights(model, guide, batch, self.num_particles)
        return (lw.log_lik + lw.log_prior - beta * lw.log_q).mean(0)  # [B]


def paper_lines(paper: dict, names=None) -> dict:
    """``gap_plots.gap_curves``' references: the paper's values, each guide's (or ``names``')."""
    names = names or {g: g for g in paper}
    return {names[g]: {**v, "label": f"{names[g]}: Cremer et al. 2018, as recalled"}
            for g, v in paper.items() if g in names}


COLUMNS = ["guide", "rows", "epochs", "local_family", "log_px", "elbo_local", "elbo", "approximation_gap",
           "amortization_gap"]  # ``Scores`` quantities, of the row's split


def score(trained, rows: int, num_particles: int, progress: bool,
          local_steps: int = 3000) -> list:
    """The gap table's rows of one trained model: its first ``rows`` training and test rows."""
    out = []
    for split in ("train", "test"):
        guide, x = scored_rows(trained, split, rows)
        scores = evaluate_model(trained.model, guide, x, num_particles, local=True,
                                seed=EVAL_SEED, progress=progress, split=split,
                                local_options={"max_steps": local_steps})
        out.append({"guide": trained.config.guide, "rows": f"{split} {len(x)}",
                    "epochs": len(trained.history), **scores.by_quantity()})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guides", default="amortized,iaf,meanfield")
    p.add_argument("--epochs", type=int, default=PROTOCOL.epochs,
                   help="a shorter budget than the protocol's 3,280 epochs")
    p.add_argument("--num-particles", type=int, default=5000)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("runs/cremer"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--local-steps", type=int, default=3000,
                   help="at most this many steps of the final fits of q* (plateau rule)")
    p.add_argument("--binarize", default=PROTOCOL.binarize,
                   help="dynamic (ours), or static: one seeded draw, as the authors' data")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs of linear KL warm-up (the protocol's 400; 0: none)")
    p.add_argument("--warmup-term", choices=("kl", "entropy"), default="kl",
                   help="what the warm-up weights: the KL term (ours, the protocol as "
                        "issue 13 states it) or only log q (the authors' code)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    base = PROTOCOL.replace(epochs=args.epochs, device=args.device, binarize=args.binarize)
    if args.smoke:
        base = base.replace(**SMOKE, gap_rows=20, gap_particles=10, warmup_epochs=1,
                            gap_epochs=(1,))
    if args.warmup_epochs is not None:
        base = base.replace(warmup_epochs=args.warmup_epochs)
    if args.warmup_term == "entropy":
        base = base.replace(objective="cremer:EntropyWarmupELBO")
    scoring = (dict(rows=20, num_particles=10, local_steps=30) if args.smoke else
               dict(rows=args.rows, num_particles=args.num_particles, local_steps=args.local_steps))
    rows = []
    for guide in args.guides.split(","):
        config = base.replace(guide=guide, compile="off" if args.smoke else "auto")
        folder = args.out / guide
        state = checkpoint.load(folder) if args.resume and folder.is_dir() else None
        if state is not None and state.get("position") is None \
                and len(state["history"]) >= config.epochs:
            trained = load_trained(folder, trust_code=True)  # its run, finished: its own code
        else:
            trained = fit_run(config, folder, overwrite=state is None, resume=state is not None,
                              progress=not args.smoke)
        rows += score(trained, progress=not args.smoke, **scoring)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"config": base.to_dict(), "rows": rows,
                                                       "paper": PAPER}, indent=2) + "\n")
    curves = {g: plots.read_metrics(args.out / g, "gaps.jsonl") for g in args.guides.split(",")
              if (args.out / g / "gaps.jsonl").exists()}
    if curves:  # every guide's gap curves in one figure
        gap_plots.gap_curves(curves, args.out / "gap_curves.png", references=paper_lines(PAPER))
    table = markdown(rows, COLUMNS)
    (args.out / "table.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
