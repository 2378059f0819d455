"""Scoring during training: the fixed evaluation pixels every score uses, the per-epoch
validation ELBO (``Validator``) and the gap curves over training (``GapTracker``). A trained
run scored on its held-out split, and the ``evaluate`` command that writes its files, are
``evaluation.py``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import batching, data, local_fit, protocol
from .evaluate import elbo_parts, evaluate_model
from .callbacks import Callback
from .config import VALID_FIT_STEPS
from .loopstate import EpochMetrics, Interrupted, Loop
from .step import Abandoned, abandonable

EVAL_SEED = 1234  # the test/validation binarization and every estimate's noise


def eval_pixels(config, split: data.Split, rows: Optional[int] = None) -> torch.Tensor:
    """Held-out pixels as every model sees them: one fixed binarization (seed ``EVAL_SEED``)."""
    split = split.head(rows)
    if config.binarize == "none":
        return split.x
    return data.static_binarize(split, EVAL_SEED).x


def train_pixels(config, split: data.Split, rows: Optional[int] = None) -> torch.Tensor:
    """Training rows as the model saw them: under ``static`` binarization the very draw it
    trained on (``data.Binarize.prepare`` with ``config.seed``, as the run does); otherwise
    one fixed draw as in ``eval_pixels`` (a dynamically binarized model never saw one draw
    twice)."""
    if config.binarize == "static":
        return data.Binarize("static").prepare(split, config.seed).head(rows).x
    return eval_pixels(config, split, rows)


def scored_rows(trained, split: str, rows: Optional[int] = None) -> tuple:
    """(guide, pixels) that score the first ``rows`` of ``split`` of a trained run: held-out
    rows under the fixed binarization with the guide as it answers new rows; training rows
    as the run saw them, with the guide as trained (a per-datapoint table: its own rows)."""
    if split != "train":
        return trained.guide, eval_pixels(trained.config, trained.splits.get(split), rows)
    x = train_pixels(trained.config, trained.splits.train, rows)
    return RowsOf(trained.guide, torch.arange(len(x), device=x.device),
                  len(trained.splits.train)), x


def held_out_elbo(model, guide, x: torch.Tensor, warm=None, **local) -> tuple:
    """(per-datapoint ELBO [N], the guide used) of ``guide`` on held-out ``x``.

    The guide answers for new rows itself (``local_fit.held_out``): an encoder as it is, a
    per-datapoint guide with a fresh fit (decoder frozen, warm-started from ``warm``).
    """
    held = local_fit.held_out(guide, model, x, warm=warm, seed=EVAL_SEED, **local)
    return elbo_parts(model, held.guide, x, num_particles=10, seed=EVAL_SEED).elbo, held.guide


class Validator:
    """The per-epoch validation ELBO; a refitted held-out guide is warm-started epoch to epoch
    and its state goes into the checkpoint."""

    def __init__(self, model, guide, x: torch.Tensor, max_steps: int = VALID_FIT_STEPS,
                 compile=None):
        self.model, self.guide, self.x, self.max_steps = model, guide, x, max_steps
        self.compile = compile  # the run's --compile, for a table's held-out fit
        self.held: Optional[object] = None  # the last held-out guide, when it is a fit

    def __call__(self) -> float:
        elbo, used = held_out_elbo(self.model, self.guide, self.x, self.held,
                                   max_steps=self.max_steps, compile=self.compile)
        self.held = used if used is not self.guide else None
        return float(elbo.mean())

    def state_dict(self):
        return self.held.state_dict() if self.held is not None else None

    def load_state_dict(self, state) -> None:
        if state is None:
            return
        shell = local_fit.held_out(self.guide, self.model, self.x, max_steps=0).guide
        shell.load_state_dict(state)
        self.held = shell


# ---------------------------------------------------------------------------------------
# gap curves
# ---------------------------------------------------------------------------------------
class RowsOf(protocol.Answers, torch.nn.Module):
    """A trained guide over a subset of its own training rows: batch indices are positions
    in the subset, mapped to the dataset rows ``rows`` of a plate of size ``num_data``."""

    def __init__(self, guide, rows: torch.Tensor, num_data: int):
        super().__init__()
        self._inner, self.rows, self.num_data = [guide], rows, num_data

    def _batch(self, batch: batching.Batch) -> batching.Batch:
        return batching.Batch(batch.x, self.rows[batch.idx], self.num_data)

    def forward(self, batch: batching.Batch) -> None:
        from pyro import poutine
        with poutine.block(hide=["data"]):  # its plate indexes the dataset, not the subset
            return self._inner[0](self._batch(batch))

    def held_out(self, model, x, warm=None, **options) -> protocol.HeldOut:
        return protocol.HeldOut(self)  # these rows are the guide's own

    def loc_scale(self, batch: batching.Batch):
        return self._inner[0].loc_scale(self._batch(batch))

    @property
    def family(self):
        return protocol.family_words(self._inner[0])

    def local_family(self):
        return protocol.family_of(self._inner[0])


class GapTracker(Callback):
    """Scores L[q], L[q*], log p(x) and both gaps on fixed training and test rows at chosen
    epochs (and the last), appending one JSON line per epoch and split to ``path``. Ctrl-C
    abandons a scoring that runs on (``step.abandonable``): that epoch then has no line
    until a resume from its checkpoint scores it (``on_start``), as after a kill."""

    def __init__(self, model, guide, x_train: torch.Tensor, num_train: int,
                 x_test: torch.Tensor, epochs: Sequence[int], last: int, num_particles: int,
                 path: Callable[[], Path], local_steps: int = 500,
                 local_options: Optional[dict] = None):
        """Why so many parameters: the tracker's rows, epochs and estimate settings, each read
        from the run's ``Config`` by ``run.py`` in one call."""
        self.model, self.guide = model, guide
        self.x_train, self.x_test = x_train, x_test
        self.rows = torch.arange(len(x_train), device=x_train.device)
        self.num_train = num_train
        self.epochs, self.last = set(epochs), last
        self.num_particles, self.path = num_particles, path
        # q*'s family and the compile setting (``config.local_fit_options``), at most
        # ``local_steps`` steps of each fit
        self.local_options = {**(local_options or {}), "max_steps": local_steps}
        self.seconds = 0.0

    def on_start(self, loop: Loop) -> None:
        """A resumed run's tracking seconds go on from its lines' (``seconds`` counts every
        process of the run, as its training time does; a line's ``tracking_seconds`` is the
        count when it was written). A run resumed at the end of a tracked epoch whose
        scoring a kill or Ctrl-C cut short scores it now: its checkpoint is the state those
        lines would have scored."""
        last = loop.history[-1] if loop.history else None
        if last is None:  # a fresh run
            return
        path = self.path()
        lines = read_gaps(path) if path.exists() else []
        whole = {line.get("split") for line in lines if line.get("epoch") == last.epoch} \
            >= {"train", "test"}
        # the seconds so far: the most any line up to this epoch counted (an epoch to score
        # again, or later ones of a checkpoint that fell back, do not count)
        kept_upto = last.epoch if whole else last.epoch - 1
        self.seconds = max((float(line.get("tracking_seconds", 0.0)) for line in lines
                            if line.get("epoch", 0) <= kept_upto), default=0.0)
        if not loop.at_epoch_end or not self._due(last.epoch) or whole:
            return
        kept = [line for line in lines if line.get("epoch") != last.epoch]  # a half-written
        if len(kept) < len(lines):                                          # epoch goes
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            tmp.replace(path)
        try:
            self.record(last)
        except Abandoned:  # Ctrl-C again: the run stays where it was, to be resumed
            raise Interrupted(loop.start()) from None

    def on_metrics(self, loop: Loop, metrics: EpochMetrics) -> bool:
        if self._due(metrics.epoch):
            self.record(metrics)
        return False

    def _due(self, epoch: int) -> bool:
        return epoch in self.epochs or epoch == self.last

    def record(self, metrics: EpochMetrics) -> list:
        import time
        start = time.perf_counter()
        lines = []
        with abandonable():  # Ctrl-C may cut the scoring short: nothing is written then
            for split, guide, x in (("train", RowsOf(self.guide, self.rows, self.num_train),
                                     self.x_train), ("test", self.guide, self.x_test)):
                scores = evaluate_model(self.model, guide, x, self.num_particles, local=True,
                                        seed=EVAL_SEED, progress=False, split=split,
                                        local_options=self.local_options)
                lines.append({"epoch": metrics.epoch, **scores.to_json()})
        self.seconds += time.perf_counter() - start
        for line in lines:
            line["tracking_seconds"] = self.seconds
        with open(self.path(), "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        return lines


def read_gaps(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
