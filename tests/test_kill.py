"""A training process killed with SIGKILL at random moments always leaves a loadable checkpoint
that has lost at most the epoch in progress, and the run resumes from it."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ppl_vae import checkpoint

# kills per guide: one in the default suite, more on request (PPL_VAE_KILL_TRIALS=5)
TRIALS = int(os.environ.get("PPL_VAE_KILL_TRIALS", "1"))
# eager steps: an open-ended run (--epochs 100000) would otherwise compile its step first
TOY = ["--train-size", "256", "--valid-size", "8", "--test-size", "8", "--hidden", "8",
       "--latent-dim", "2", "--batch-size", "32", "--device", "cpu", "--compile", "off"]


def _train(out, *extra):
    """``ppl-vae train`` in a subprocess; its stderr goes to ``<out>.log``."""
    code = "import sys; from ppl_vae.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(f"{out}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-c", code, "train", *TOY, "--out", str(out),
                                 *extra], stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def _log(out) -> str:
    with open(f"{out}.log") as f:
        return f.read()


@pytest.mark.parametrize("guide", ["amortized", pytest.param("meanfield", marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(tmp_path, guide):
    rng = random.Random(1234)
    for trial in range(TRIALS):
        out = tmp_path / f"{guide}{trial}"
        proc = _train(out, "--epochs", "100000", "--guide", guide)
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, _log(out)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))  # many epochs (and checkpoint writes) per second
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = checkpoint.load(out, warn=lambda _m: None)
        assert state is not None
        saved = len(state["history"])
        written = len((out / "metrics.jsonl").read_text().splitlines())
        # the checkpoint is written before the epoch's metrics line: everything shown is saved
        assert saved - written in (0, 1), (written, saved)
        assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()
                ] == [m["epoch"] for m in state["history"]][:written]
    # the last killed run continues from its checkpoint
    resumed = _train(out, "--epochs", str(saved + 2), "--guide", guide, "--resume")
    assert resumed.wait(timeout=120) == 0, _log(out)
    assert json.loads((out / "summary.json").read_text())["epochs"] == saved + 2


@pytest.mark.parametrize("moment", [pytest.param(0.0, marks=pytest.mark.slow), 0.5,
                                    pytest.param(1.5, marks=pytest.mark.slow)])
def test_sigint_during_overwrite_leaves_the_old_run_or_the_new_never_a_mix(tmp_path, moment):
    """Ctrl-C at several moments of ``--overwrite`` over a finished run (seed 1 over seed
    0): the folder then holds the old run, untouched, or the new one with a finished epoch,
    whose files all agree on the seed; never both, never nothing."""
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1", "--seed", "0").wait(timeout=120) == 0, _log(out)
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = _train(out, "--epochs", "100000", "--seed", "1", "--overwrite",
                  "--train-size", "2048")
    deadline = time.monotonic() + 60
    while not (tmp_path / f".run.staging-{proc.pid}").exists():  # the new run has begun
        assert proc.poll() is None, _log(out)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(moment)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, _log(out)
    now = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    state = checkpoint.load(out, warn=lambda _m: None)
    if now == old:
        assert state["config"]["seed"] == 0
    else:  # the new run: every file of it says seed 1, and it resumes
        assert state["config"]["seed"] == 1, sorted(
            n for n in set(now) | set(old) if now.get(n) != old.get(n))
        assert state["config"]["seed"] == 1 and len(state["history"]) >= 1
        assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1
        assert not (out / "summary.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")] == []
    assert not (out / ".running").exists()
