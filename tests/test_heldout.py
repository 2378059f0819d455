"""ppl_vae.heldout: the gap curves score the model on their own random stream, so tracking
them does not change the training."""
from __future__ import annotations

import pytest

from helpers import GAPS, metrics, train_cli


@pytest.mark.parametrize("guide", [pytest.param("amortized", marks=pytest.mark.slow),
                                   "semiamortized",
                                   pytest.param("meanfield", marks=pytest.mark.slow)])
def test_tracking_the_gaps_does_not_change_the_training(tmp_path, cached_mnist, capsys, guide):
    """The gap curves score the model between epochs on their own random stream: the run's
    numbers are those of the same run without them (a semi-amortized guide's refinement in
    the tracker once took draws from the training stream)."""
    runs = []
    for extra in ([], GAPS):
        out = tmp_path / f"{guide}{len(extra)}"
        assert train_cli(capsys, out, "--guide", guide, "--epochs", "2", *extra)[0] == 0
        runs.append([(m["train_elbo"], m["valid_elbo"]) for m in metrics(out)])
    assert (tmp_path / f"{guide}{len(GAPS)}" / "gaps.jsonl").exists()
    assert runs[0] == runs[1]


def _unclocked(lines):
    return [{k: v for k, v in line.items() if not k.endswith("seconds")} for line in lines]


@pytest.mark.parametrize("lost", ["both", pytest.param("test", marks=pytest.mark.slow),
                                  pytest.param("mid-run", marks=pytest.mark.slow)])
def test_a_resume_scores_the_tracked_epoch_a_kill_cut_short(tmp_path, cached_mnist, capsys,
                                                           lost):
    """A kill after epoch 2's checkpoint but during (or before the end of) its scoring leaves
    epoch 2 without its lines (or with half of them): the resume scores it from the checkpoint,
    as the uninterrupted run did, then trains on ("mid-run": the epoch-300 point of a
    3,280-epoch run was once lost so, and the run went on to epoch 301)."""
    import json
    from ppl_vae.heldout import read_gaps
    out = tmp_path / "run"
    gaps = ["--track-gaps", "--gap-epochs", "1", "2"]
    epochs = ["--epochs", "3" if lost == "mid-run" else "2"]
    assert train_cli(capsys, out, *gaps, "--epochs", "2")[0] == 0
    path = out / "gaps.jsonl"
    whole = read_gaps(path)
    assert [(g["epoch"], g["split"]) for g in whole] == [(1, "train"), (1, "test"),
                                                         (2, "train"), (2, "test")]
    kept = whole[:3] if lost == "test" else whole[:2]
    path.write_text("".join(json.dumps(g) + "\n" for g in kept))
    if lost != "mid-run":
        (out / "summary.json").unlink()  # the kill came before the run's end
    assert train_cli(capsys, out, *gaps, *epochs, "--resume")[0] == 0
    again = read_gaps(path)
    assert again[:2] == whole[:2]  # the lines before are kept as they were
    if lost == "mid-run":  # as the uninterrupted 3-epoch run's, each epoch once
        reference = tmp_path / "whole"
        assert train_cli(capsys, reference, *gaps, *epochs)[0] == 0
        whole = read_gaps(reference / "gaps.jsonl")
        assert [g["epoch"] for g in again] == [1, 1, 2, 2, 3, 3]
    assert _unclocked(again) == _unclocked(whole)  # epoch 2 scored once, to the same numbers


def test_a_resumed_tracker_counts_the_seconds_of_the_lines_it_keeps(tmp_path):
    """The tracking seconds go on from the lines up to the resumed epoch: not those of an
    epoch half written (scored again), nor of later epochs (a checkpoint that fell back)."""
    import json

    import torch
    from ppl_vae.heldout import GapTracker
    from ppl_vae.loopstate import EpochMetrics, Loop
    done = [EpochMetrics(*([e + 1] + [0.0] * (len(EpochMetrics._fields) - 1)))
            for e in range(2)]
    lines = [(1, "train", 10.0), (1, "test", 10.0), (2, "train", 999.0), (5, "train", 5e3)]
    path = tmp_path / "gaps.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "split": s, "tracking_seconds": t}) + "\n"
                            for e, s, t in lines))
    x = torch.zeros(2, 4)
    tracker = GapTracker(None, None, x, 2, x, [1, 2], 5, 3, lambda: path)
    seen = []
    tracker.record = lambda metrics: seen.append((metrics.epoch, tracker.seconds))
    tracker.on_start(Loop(10, 5, done))
    assert seen == [(2, 10.0)]  # epoch 2 scored again, from epoch 1's 10 s
    tracker.on_start(Loop(10, 5, done[:1]))  # resumed after epoch 1: its 10 s, not 5,000
    assert tracker.seconds == 10.0


def test_a_ctrl_c_in_that_scoring_keeps_the_run_where_it_was(tmp_path):
    """Ctrl-C while the resume scores the lost epoch: the run stops at the same epoch end, and
    its next resume scores that epoch again."""
    import torch
    from ppl_vae.heldout import GapTracker
    from ppl_vae.loopstate import EpochMetrics, Interrupted, Loop
    from ppl_vae.step import Abandoned
    done = [EpochMetrics(*([e + 1] + [0.0] * (len(EpochMetrics._fields) - 1)))
            for e in range(2)]
    x = torch.zeros(2, 4)
    tracker = GapTracker(None, None, x, 2, x, [2], 5, 3, lambda: tmp_path / "gaps.jsonl")
    calls = []

    def cut(metrics):
        calls.append(metrics.epoch)
        raise Abandoned()
    tracker.record = cut
    with pytest.raises(Interrupted) as stopped:
        tracker.on_start(Loop(10, 5, done))
    where = stopped.value.position
    assert (where.epoch, where.step) == (2, 0) and calls == [2]
    assert "after epoch 2" in str(stopped.value)
    again = Loop(10, 5, done, where)
    assert again.at_epoch_end
    with pytest.raises(Interrupted):
        tracker.on_start(again)
    assert calls == [2, 2]
    tracker.on_start(Loop(10, 5, done[:1]))  # epoch 1 is not tracked: nothing scored
    assert calls == [2, 2]
    # Ctrl-C in a scoring that still ends (its grace): with no epoch left the run stops
    # where it started, not one epoch on
    assert Loop(10, 5, done).boundary().epoch == 2
