"""Shared by the experiment scripts: run one configuration to a result row, print tables."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from ppl_vae.evaluation import evaluate_trained
from ppl_vae import logs
from ppl_vae.config import Config
from ppl_vae.run import finish, fit_run


logs.to_console()  # the scripts print the library's progress lines

# the toy size every experiment's --smoke mode runs at (seconds on a CPU)
SMOKE = dict(epochs=1, max_seconds=None, train_size=300, valid_size=50, test_size=50,
             hidden=(32,), latent_dim=4)


def train_and_score(config: Config, out: Path, num_particles: int, local: bool = False,
                    progress: bool = True) -> Dict:
    """Train ``config`` into ``out`` and return its summary merged with its test scores
    (``Scores.to_json``'s names: ``test_elbo``, ``test_log_px``, ``test_log_px_stderr``, ...)."""
    trained = fit_run(config, out, overwrite=True, progress=progress)
    scores, _ = evaluate_trained(trained, num_particles, local=local, progress=progress)
    summary = finish(trained, out, test=scores.elbo)
    (Path(out) / "eval.json").write_text(json.dumps(scores.to_json(), indent=2) + "\n")
    return {**summary.to_json(), **scores.to_json()}


def markdown(rows: List[Dict], columns: List[str]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def write(rows: List[Dict], columns: List[str], out: Path) -> str:
    """Print the rows as a Markdown table and save it (table.md) with the rows (results.json)."""
    table = markdown(rows, columns)
    print(table)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "table.md").write_text(table)
    (Path(out) / "results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return table
