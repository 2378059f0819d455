"""Helpers shared by the test files: the command line called in-process (and in a subprocess),
the files of a run folder read back, a finished tiny run copied per test, and two checkpoints
compared bitwise.

The run-folder fixtures built on ``trained_copy`` (``finished_run``, ``evaluated_run``) are in
conftest.py."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import torch

from ppl_vae import checkpoint, cli

# the toy run of conftest.TOY on the command line: 2 steps per epoch, tiny networks
TINY = ["--train-size", "100", "--valid-size", "20", "--test-size", "20", "--epochs", "1",
        "--hidden", "16", "--latent-dim", "3", "--batch-size", "50", "--device", "cpu",
        "--seed", "3", "--gap-rows", "10", "--gap-particles", "5"]
FIGURES = ("curves.png", "reconstructions.png", "samples.png", "latent.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GAPS = ["--track-gaps", "--gap-epochs", "1"]
# eager steps: an open-ended run (--epochs 100000) would otherwise compile its step first
EAGER_TOY = ["--train-size", "256", "--valid-size", "8", "--test-size", "8", "--hidden", "8",
             "--latent-dim", "2", "--batch-size", "32", "--device", "cpu", "--compile", "off"]


def call(capsys, *argv):
    """``cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, err, out=""):
    """Exit code 2 and exactly one line on stderr, starting with error:, no traceback."""
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert "Traceback" not in err + out


def error_segments(err):
    """The error: lines of a stderr that may also hold a progress bar's carriage returns."""
    return [s for s in re.split(r"[\r\n]", err) if s.startswith("error:")]


def train_cli(capsys, out, *extra):
    return call(capsys, "train", *TINY, "--out", out, *extra)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def config_json(folder):
    return json.loads((folder / "config.json").read_text())


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def params(folder):
    state = checkpoint.load(folder)
    return {k: v for part in ("model", "guide") for k, v in state[part].items()}


def without_timings(doc):
    if isinstance(doc, dict):
        return {k: without_timings(v) for k, v in doc.items()
                if not any(t in k for t in ("seconds", "per_second", "peak_rss", "date",
                                            "wall"))}
    if isinstance(doc, list):
        return [without_timings(v) for v in doc]
    return doc


def numbers(folder):
    """The numbers of a run's metrics, without its timings."""
    return [(m["train_elbo"], m["valid_elbo"], m["steps"], m["beta"]) for m in metrics(folder)]


_TRAINED = {}  # (epochs, evaluated) -> a finished run that tests get copies of


def trained_copy(tmp_path_factory, capsys, out, epochs: int, evaluate: bool = False):
    """A copy at ``out`` of a finished tiny CLI run (trained once per test session)."""
    key = (epochs, evaluate)
    if key not in _TRAINED:
        template = tmp_path_factory.mktemp("trained") / "run"
        assert train_cli(capsys, template, "--epochs", str(epochs))[0] == 0
        if evaluate:
            assert call(capsys, "evaluate", template, "--num-particles-eval", "2",
                        "--rows", "10")[0] == 0
        _TRAINED[key] = template
    shutil.copytree(_TRAINED[key], out)
    return out


def final_state(out):
    """The newest checkpoint of a run and its metrics without their timings."""
    state = torch.load(out / checkpoint.NAME, map_location="cpu", weights_only=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("seconds"), m.pop("wall")
    return state, metrics


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_tensors(u, v, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def ctrl_c_reaches_it() -> None:
    """``preexec_fn`` of a subprocess that a test interrupts with SIGINT: Ctrl-C's default
    action, which Python turns into its own handler at startup. A suite started in the
    background by a shell (``cmd &``) has SIGINT ignored, and a child inherits that, so a
    SIGINT sent before the run installs its handler was lost (a test hung 120 s so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_process(out, *extra):
    """``ppl-vae train`` of ``EAGER_TOY`` in a subprocess; its stderr goes to ``<out>.log``."""
    code = "import sys; from ppl_vae.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(f"{out}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-c", code, "train", *EAGER_TOY, "--out",
                                 str(out), *extra], stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                preexec_fn=ctrl_c_reaches_it)


def process_log(out) -> str:
    with open(f"{out}.log") as f:
        return f.read()
