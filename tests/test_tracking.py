"""Run tracking: TensorBoard events read back with TensorBoard's own reader, quiet progress
bars off a terminal and with --no-progress, the command line and git state in config.json,
and Pyro's render_model on our model."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from ppl_vae import cli, tracking

SMALL = ["--train-size", "300", "--valid-size", "100", "--test-size", "100", "--epochs", "2",
         "--hidden", "16", "--latent-dim", "3", "--device", "cpu", "--batch-size", "100"]


def test_tensorboard_run_writes_events_tensorboard_can_read(tmp_path, cached_mnist):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--tensorboard", "--out", str(out), "--evaluate",
                     "--num-particles-eval", "20"]) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = acc.Scalars("elbo/valid")
    assert [e.step for e in valid] == [1, 2]
    assert [e.value for e in valid] == pytest.approx([m["valid_elbo"] for m in metrics], rel=1e-5)
    assert [e.value for e in acc.Scalars("elbo/train")] == pytest.approx(
        [m["train_elbo"] for m in metrics], rel=1e-5)
    assert {"time/epoch_seconds", "eval_test/test_log_px"} <= set(tags["scalars"])
    eval_ = json.loads((out / "eval.json").read_text())
    assert acc.Scalars("eval_test/test_log_px")[0].value == pytest.approx(eval_["test_log_px"],
                                                                          rel=1e-5)
    # evaluate's figures as images
    assert {"figures/curves", "figures/reconstructions", "figures/samples",
            "figures/latent"} <= set(tags["images"])
    assert acc.Images("figures/samples")[0].width > 100
    # the config as hparams (the HParams plugin's session-start summary)
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"latent_dim" in hparams["_hparams_/session_start_info"]


def test_without_the_flag_nothing_is_written(tmp_path, cached_mnist):
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists()


def test_missing_tensorboard_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uv sync --extra tensorboard" in err
    assert not out.exists()


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal,flag,bars", [(False, [], False), (True, [], True),
                                                (True, ["--no-progress"], False)])
def test_progress_bars_only_on_a_terminal_and_never_with_no_progress(
        tmp_path, cached_mnist, monkeypatch, capsys, terminal, flag, bars):
    fake = FakeTerminal()
    if terminal:
        monkeypatch.setattr(sys, "stderr", fake)
    assert cli.main(["train", *SMALL, "--out", str(tmp_path / "run"), *flag]) == 0
    captured = capsys.readouterr()
    drawn = fake.getvalue() + captured.err
    assert ("step/s" in drawn or "s/step" in drawn) == bars, drawn[:300]
    # the per-epoch lines stay either way
    assert captured.out.count("epoch ") >= 2 or "epoch   2" in fake.getvalue()


def test_config_json_records_command_and_git_state(tmp_path, cached_mnist, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ppl-vae", "train", "--epochs", "1"])
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["command"] == ["ppl-vae", "train", "--epochs", "1"]
    from ppl_vae.runfiles import git_dirty
    assert record["versions"]["git_dirty"] == git_dirty()
    assert record["data"]["train"] == 300 and record["data"]["shape"] == [1, 28, 28]


def test_render_model_draws_our_model(tmp_path, toy_config):
    """``pyro.render_model`` on the VAE program (needs the graphviz package and `dot`)."""
    graphviz = pytest.importorskip("graphviz")
    import shutil

    import pyro
    from ppl_vae.batching import Batch
    from ppl_vae.build import build_model

    model = build_model(toy_config.replace(hidden=(8,)), 784)
    batch = Batch(torch.zeros(5, 784), torch.arange(5), 100)
    graph = pyro.render_model(model, model_args=(batch,))
    assert isinstance(graph, graphviz.Digraph)
    source = graph.source
    assert "z" in source and "x" in source and "data" in source and "z -> x" in source
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot binary is not installed")
    path = graph.render(str(tmp_path / "model"), format="png", cleanup=True)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
