"""ppl_vae.evaluation: the ``evaluate`` command on a run folder: it needs only the
checkpoint, refuses damaged or foreign files in one line, writes only into a folder this
package wrote, and replaces an evaluation as one set."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ppl_vae import rundir, runfiles

from helpers import assert_one_error_line, call, error_segments, files, train_cli


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage"])
def test_evaluate_does_not_need_metrics_jsonl(finished_run, capsys, damage):
    path = finished_run / "metrics.jsonl"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-30])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x00\xff{not json\n")
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "10")
    assert code == 0, err
    assert (finished_run / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((finished_run / "eval.json").read_text())["epochs"] == 2


def test_evaluate_a_damaged_gaps_jsonl(tmp_path, cached_mnist, capsys):
    out = tmp_path / "gaps"
    assert train_cli(capsys, out, "--track-gaps", "--gap-epochs", "1")[0] == 0
    path = out / "gaps.jsonl"
    path.write_bytes(path.read_bytes()[:-20])
    code, stdout, err = call(capsys, "evaluate", out, "--num-particles-eval", "2", "--rows", "10")
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and err.count("\n") == 1), err


def test_evaluate_a_file_says_it_is_a_file(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"x")
    code, out, err = call(capsys, "evaluate", path)
    assert_one_error_line(code, err, out)
    assert "is a file" in err


def test_evaluate_bad_summary_json(finished_run, capsys):
    (finished_run / "summary.json").write_text("{truncated")
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2",
                          "--rows", "10")
    assert "Traceback" not in err
    assert code == 2 and error_segments(err) and err.count("\n") == 1, err


def test_a_failing_evaluation_keeps_the_previous_one(evaluated, capsys, monkeypatch):
    from ppl_vae import evaluation
    before = files(evaluated)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device", "latent.png")
    monkeypatch.setattr(evaluation, "run_figures", fail)
    code, out, err = call(capsys, "evaluate", evaluated, "--num-particles-eval", "3")
    assert code == 2 and "No space left" in err
    assert files(evaluated) == before
    assert not [p for p in evaluated.iterdir() if p.name.startswith(".evaluating")]


def test_evaluate_writes_only_into_a_folder_ppl_vae_wrote(evaluated, capsys):
    (evaluated / runfiles.MARKER).unlink()
    (evaluated / "samples.png").write_bytes(b"the user's own picture")
    before = files(evaluated)
    code, out, err = call(capsys, "evaluate", evaluated, "--num-particles-eval", "2")
    assert_one_error_line(code, err, out)
    assert runfiles.MARKER in err
    assert files(evaluated) == before


def _consistent(run):
    """The run's evaluation is one set: eval.json's rows are the rows arrays.npz holds."""
    if not run.exists():  # a kill between two renames: the next command puts the old back
        parked = [p for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.old-")]
        assert len(parked) == 1, list(run.parent.iterdir())
        run = parked[0]
    rows = json.loads((run / "eval.json").read_text())["num_rows"]
    with np.load(run / "arrays.npz") as a:
        assert len(a["labels"]) == rows, (rows, len(a["labels"]))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_an_evaluation_is_replaced_as_one_set(evaluated, capsys, monkeypatch, exchange):
    """Seen at every rename (or exchange) the evaluation makes, the run's evaluation is the
    old one or the new one, never eval.json of one beside arrays.npz of the other."""
    _consistent(evaluated)
    seen = []
    real_replace, real_rename, real_exchange = os.replace, os.rename, rundir.exchange

    def watched(real):
        def call_(*args, **kwargs):
            _consistent(evaluated)  # what a kill just before this call would leave
            result = real(*args, **kwargs)
            _consistent(evaluated)  # ... and just after it
            seen.append(args)
            return result
        return call_
    monkeypatch.setattr(os, "replace", watched(real_replace))
    monkeypatch.setattr(os, "rename", watched(real_rename))
    monkeypatch.setattr(rundir, "exchange", watched(
        real_exchange if exchange else (lambda a, b: False)))
    code, out, err = call(capsys, "evaluate", evaluated, "--num-particles-eval", "2",
                          "--rows", "5")
    assert code == 0, err
    assert seen
    assert json.loads((evaluated / "eval.json").read_text())["num_rows"] == 5
    _consistent(evaluated)
    assert [p.name for p in evaluated.parent.iterdir() if p.name.startswith(".")] == []
