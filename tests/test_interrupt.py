"""Ctrl-C is answered within seconds in every phase that can run long: a step with many inner
updates of a per-datapoint table, a step with many refinement steps, the gap curves' scoring
(q* fits and log p(x) chunks) and a compile whose C++ compiler hangs. Each ends as Ctrl-C
between steps does: exit code 130 and one line naming where the run stopped, the checkpoint
of the finished epochs kept.

Each test runs ``ppl-vae train`` in a subprocess whose code marks (a file) the moment it is
inside the long phase; SIGINT follows, and the process must be gone ``EXIT_WITHIN`` seconds
later (before the fix: the end of the phase, tens of seconds or never).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import tiny_binary_data
from helpers import ctrl_c_reaches_it
from ppl_vae import (callbacks, checkpoint, data, guides, likelihoods, loopstate, nets, objectives, optim,
                     priors, train)
from ppl_vae.model import VAEModel

EXIT_WITHIN = 10.0  # seconds from SIGINT to exit: the grace (step.GRACE_SECONDS) and the exit
REACH_WITHIN = 60.0  # seconds for the run to reach its long phase on a busy machine
SMALL = ["--train-size", "1000", "--valid-size", "50", "--test-size", "50", "--epochs", "1",
         "--device", "cpu", "--seed", "0"]

# ``ppl-vae train`` with a hook that touches the file MARKER when the long phase has begun:
# HOOK is ``module:Class.method`` (or ``module:function``) and AFTER the number of its calls;
# from then on each call also waits PAUSE seconds (a slow machine: the phase lasts minutes)
_LAUNCH = """
import os, sys, time, importlib
module, name = os.environ["HOOK"].split(":")
owner = importlib.import_module(module)
*path, attr = name.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, attr), [0]
def hooked(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["AFTER"]):
        open(os.environ["MARKER"], "w").close()
    if calls[0] >= int(os.environ["AFTER"]):
        time.sleep(float(os.environ["PAUSE"]))
    return real(*args, **kwargs)
setattr(owner, attr, hooked)
from ppl_vae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(tmp_path, argv, hook=None, after=1, pause=0.0, env=None):
    marker = tmp_path / "reached"
    code = textwrap.dedent(_LAUNCH) if hook else \
        "import sys; from ppl_vae.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(tmp_path / "stderr.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "train", *map(str, argv), "--out",
             str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=log,
            preexec_fn=ctrl_c_reaches_it, env={**os.environ, "OMP_NUM_THREADS": "1", "HOOK": hook or "", "AFTER": str(after),
                 "PAUSE": str(pause), "MARKER": str(marker), **(env or {})})
    return proc, marker


def _stderr(tmp_path) -> str:
    return (tmp_path / "stderr.log").read_text(errors="replace")


def _interrupt_when_reached(proc, marker, tmp_path, settle=1.0) -> float:
    """Wait for the marker, let the phase run ``settle`` s, send SIGINT; returns the seconds
    the process took to exit (it is killed, and the test fails, past ``EXIT_WITHIN``)."""
    deadline = time.monotonic() + REACH_WITHIN
    while not marker.exists():
        assert proc.poll() is None, _stderr(tmp_path)
        assert time.monotonic() < deadline, "the run never reached its long phase"
        time.sleep(0.05)
    time.sleep(settle)
    assert proc.poll() is None, "the phase ended before Ctrl-C: the test proves nothing"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"no exit within {EXIT_WITHIN} s of Ctrl-C; stderr:\n{_stderr(tmp_path)}")
    return time.monotonic() - sent


def _assert_clean_interrupt(proc, tmp_path):
    err = _stderr(tmp_path)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(("interrupted at epoch", "interrupted after epoch")), err


def test_ctrl_c_during_a_step_of_many_inner_updates(tmp_path):
    """A per-datapoint table's 1,000 inner updates in one step (here 30 s): Ctrl-C abandons
    the step after the grace; the checkpoint resumes at that step, which changed nothing."""
    proc, marker = _start(tmp_path, [*SMALL, "--guide", "meanfield", "--inner-steps", "1000",
                                     "--hidden", "32", "--latent-dim", "4", "--compile", "off"],
                          hook="ppl_vae.optim:RowAdam.step", after=5, pause=0.03)
    _interrupt_when_reached(proc, marker, tmp_path)
    _assert_clean_interrupt(proc, tmp_path)
    assert "interrupted at epoch 1, step 0" in _stderr(tmp_path)
    state = checkpoint.load(tmp_path / "run", warn=lambda _m: None)
    assert state["history"] == []
    assert (state["position"]["epoch"], state["position"]["step"]) == (0, 0)


def test_ctrl_c_during_a_step_of_many_refinement_steps(tmp_path):
    """A semi-amortized step refining 1,000 times (here 30 s): Ctrl-C is answered within
    seconds."""
    proc, marker = _start(tmp_path, [*SMALL, "--guide", "semiamortized", "--refine-steps",
                                     "1000", "--hidden", "32", "--latent-dim", "4",
                                     "--batch-size", "32", "--compile", "off"],
                          hook="ppl_vae.guides:_GivenNormal.__call__", after=5, pause=0.03)
    _interrupt_when_reached(proc, marker, tmp_path)
    _assert_clean_interrupt(proc, tmp_path)


def test_ctrl_c_during_gap_scoring_keeps_the_epoch(tmp_path):
    """The gap curves' scoring with K = 10^6 (hours): Ctrl-C stops it within seconds, the
    epoch it followed is in the checkpoint and the run resumes at the next epoch."""
    proc, marker = _start(tmp_path, [*SMALL, "--epochs", "2", "--hidden", "32",
                                     "--latent-dim", "4", "--track-gaps", "--gap-epochs", "1",
                                     "--gap-rows", "20", "--gap-particles", "1000000",
                                     "--compile", "off"],
                          hook="ppl_vae.heldout:GapTracker.record")
    _interrupt_when_reached(proc, marker, tmp_path, settle=2.0)
    _assert_clean_interrupt(proc, tmp_path)
    assert "--resume" in _stderr(tmp_path)
    state = checkpoint.load(tmp_path / "run", warn=lambda _m: None)
    assert len(state["history"]) == 1
    assert (state["position"]["epoch"], state["position"]["step"]) == (1, 0)


def test_ctrl_c_while_a_hung_compiler_compiles(tmp_path):
    """``--compile on`` with a C++ compiler that never answers: Ctrl-C ends the run within
    seconds, and the compiler process does not outlive it."""
    pids = tmp_path / "compiler.pids"
    cxx = tmp_path / "hung-cxx"
    cxx.write_text(f"#!/bin/sh\necho $$ >> {pids}\ntouch {tmp_path / 'reached'}\n"
                   f"exec sleep 1000\n")
    cxx.chmod(0o755)
    proc, marker = _start(tmp_path, [*SMALL, "--hidden", "32", "--latent-dim", "4",
                                     "--compile", "on"], env={"CXX": str(cxx)})
    try:
        _interrupt_when_reached(proc, marker, tmp_path)
        _assert_clean_interrupt(proc, tmp_path)
        time.sleep(0.5)
        for pid in map(int, pids.read_text().split()):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for pid in map(int, pids.read_text().split()) if pids.exists() else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class _SlowAt:
    """The ELBO, except that its ``at``-th call sends this process SIGINT and then runs for
    ``seconds`` (a step far past the grace)."""

    beta = 1.0

    def __init__(self, at: int, seconds: float = 12.0):
        self.at, self.seconds, self.calls = at, seconds, 0

    def __call__(self, model, guide, batch):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(self.seconds)
        return objectives.ELBO()(model, guide, batch)


def _setup(seed=0):
    torch.manual_seed(seed)
    n, d, latent = 96, 12, 2
    model = VAEModel(nets.Decoder(latent, (16,), d), likelihoods.Bernoulli(),
                     priors.StandardNormal(latent))
    guide = guides.LocalNormal(n, latent)
    split = data.Split(tiny_binary_data(n, d) * 0.8 + 0.1, torch.zeros(n, dtype=torch.long))
    opts = optim.make_optimizers(model, guide, lr=0.01, local_lr=0.05, inner_steps=2)
    noise = data.Binarize("dynamic", torch.Generator().manual_seed(seed + 1))
    return model, guide, split, opts, noise


def _fit(setup, objective, **kwargs):
    model, guide, split, opts, noise = setup
    return train.fit(model, guide, objective, split, opts, epochs=2, batch_size=32,
                     binarize=noise, seed=1, progress=False, log=lambda _m: None, **kwargs)


def _tensors(setup):
    model, guide, _, opts, noise = setup
    return ([p.detach().clone() for m in (model, guide) for p in m.parameters()],
            [s.clone() for o in opts.all() for st in o.state.values() for s in st.values()
             if torch.is_tensor(s)], noise.generator.get_state(), torch.get_rng_state())


def test_a_step_past_the_grace_is_abandoned_and_the_run_resumes_bit_for_bit():
    """Ctrl-C in a step that runs on past ``GRACE_SECONDS`` abandons it within seconds:
    ``Interrupted`` names that step, which changed nothing (parameters, the table's rows
    that its inner updates had moved, optimizer state, random streams), so going on from
    the position gives the uninterrupted run exactly."""
    straight = _setup()
    _fit(straight, objectives.ELBO())
    cut = _setup()
    # 3 calls a step (2 inner updates, the joint step): call 11 is step 4's second inner update
    slow = _SlowAt(11)
    before = []

    class Watch(callbacks.Callback):
        def after_step(self, loop):
            if loop.epoch == 0 and loop.step == 3:  # step 3 done: what step 4 must leave
                before.append(_tensors(cut))
            return False

    start = time.monotonic()
    with pytest.raises(loopstate.Interrupted) as e:
        _fit(cut, slow, callbacks=[Watch()])
    assert time.monotonic() - start < slow.seconds / 2  # abandoned, not waited for
    assert (e.value.position.epoch, e.value.position.step) == (1, 0)
    (params, state, noise, rng), = before
    after = _tensors(cut)
    for a, b in zip(params + state, after[0] + after[1]):
        assert torch.equal(a, b)
    assert torch.equal(noise, after[2]) and torch.equal(rng, after[3])
    _fit(cut, objectives.ELBO(), position=e.value.position)
    for a, b in zip(_tensors(straight)[0], _tensors(cut)[0]):
        assert torch.equal(a, b)


def test_ctrl_c_in_a_short_step_still_finishes_it():
    """A step that ends within the grace is finished, as before: ``Interrupted`` names the
    step after it."""
    cut = _setup()
    with pytest.raises(loopstate.Interrupted) as e:
        _fit(cut, _SlowAt(11, seconds=0.0))
    assert (e.value.position.epoch, e.value.position.step) == (1, 1)


def test_ctrl_c_in_a_long_validation_stops_at_the_end_of_the_epochs_steps():
    """A validation running on past the grace is abandoned: ``Interrupted`` names the end
    of the epoch's steps (all taken), and going on from there scores the epoch and trains
    the next as if nothing had happened."""
    cut = _setup()
    calls = []

    def validate():
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(12.0)
        return -1.0

    start = time.monotonic()
    with pytest.raises(loopstate.Interrupted) as e:
        _fit(cut, objectives.ELBO(), validate=validate)
    assert time.monotonic() - start < 6.0
    assert (e.value.position.epoch, e.value.position.step) == (0, 3)  # 3 steps an epoch
    history = _fit(cut, objectives.ELBO(), validate=validate, position=e.value.position)
    assert [(m.epoch, m.steps, m.valid_elbo) for m in history] == [(1, 3, -1.0), (2, 6, -1.0)]


def test_ctrl_c_in_the_last_epochs_scoring_is_not_lost():
    """Ctrl-C during a scoring after the last epoch that ends within the grace still stops
    the run (before, the flag died with the loop and the final evaluation went on)."""
    cut = _setup()

    class ScoreLast(callbacks.Callback):
        def on_metrics(self, loop, metrics):
            if metrics.epoch == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return False

    with pytest.raises(loopstate.Interrupted) as e:
        _fit(cut, objectives.ELBO(), callbacks=[ScoreLast()])
    assert (e.value.position.epoch, e.value.position.step) == (2, 0)


def test_an_interruption_between_epochs_names_the_epoch_that_finished():
    """Ctrl-C once the last of 3 epochs is done (scoring) is "after epoch 3", not "at epoch 4"."""
    from ppl_vae.loopstate import Interrupted, Position
    assert str(Interrupted(Position(3, 0, 0.0, 0.0, 1.0, 30, 0))) == "interrupted after epoch 3"
    assert str(Interrupted(Position(0, 0, 0.0, 0.0, 0.0, 0, 0))) == "interrupted at epoch 1, step 0"
    assert str(Interrupted(Position(1, 7, 0.0, 0.0, 1.0, 17, 7))) == "interrupted at epoch 2, step 7"
