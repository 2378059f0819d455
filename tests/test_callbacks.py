"""ppl_vae.callbacks: the progress bar (what it reads of the loop, and when it shows)."""
from __future__ import annotations

import io
import sys

import pytest

from ppl_vae import callbacks, data, loopstate, objectives, train

from conftest import fit_setup, quiet


def test_the_progress_bar_reads_only_public_attributes_of_the_loop():
    class Public:
        """The loop as a callback outside train.py may see it: no ``_`` attributes."""

        def __init__(self, state):
            self._state = state

        def __getattr__(self, name):
            if name.startswith("_"):
                raise AttributeError(f"private attribute {name} of the loop")
            return getattr(self._state, name)

    position = loopstate.Position(1, 2, 0.0, 0.0, 0.0, 5, 2)
    state = loopstate.Loop(96, 3, position=position)
    bar = callbacks.ProgressBar(2, enabled=False, log=quiet)
    bar.on_start(Public(state))
    assert bar.bar.n == 3 + 2  # a resumed run's bar starts at epoch 1, step 2
    state.begin(1, "cpu")
    bar.after_step(Public(state))
    bar.on_metrics(Public(state), state.end_epoch())
    bar.close()


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_fit_shows_progress_by_default_on_a_terminal_only(monkeypatch, tty):
    """``fit`` (and ``run.train_run`` through it) without ``progress``: on a terminal
    (stderr a tty) a bar and a line per epoch; otherwise nothing, not even through ``log``.
    ``progress=True``/``False`` still decide."""
    out, err = _Stream(tty), _Stream(tty)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert callbacks.progress_default() is tty
    model, guide, split, opts = fit_setup(False)
    logged = []
    train.fit(model, guide, objectives.ELBO(), split, opts, epochs=2, batch_size=32,
              binarize=data.Binarize("none"), log=logged.append)
    shown = out.getvalue() + err.getvalue() + "".join(logged)
    if tty:
        assert "step" in err.getvalue()  # the bar
        assert shown.count("epoch ") >= 2 and "epoch   2  train" in shown
    else:
        assert shown == ""
    logged.clear()
    train.fit(model, guide, objectives.ELBO(), split, opts, epochs=3, batch_size=32,
              binarize=data.Binarize("none"), log=logged.append, progress=True)
    assert "epoch   3  train" in out.getvalue() + "".join(logged)  # asked for: shown
