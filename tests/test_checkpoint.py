"""ppl_vae.checkpoint: atomic saves that keep the previous checkpoint, a crafted or damaged
checkpoint refused in one line (never run), a full disk, SIGKILL at random moments, and a
checkpoint written on a GPU resumed on a CPU bit for bit."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch

from ppl_vae import checkpoint, run
from ppl_vae.errors import UserError

from conftest import TOY
from helpers import (assert_one_error_line, assert_same_tensors, call, config_json, files,
                     final_state, process_log, train_cli, train_process)
from records import quiet


class Evil:
    marker = None

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_malicious_checkpoint_does_not_run_code(finished_run, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    state = checkpoint.load(finished_run)
    state["evil"] = Evil()
    (finished_run / checkpoint.PREVIOUS).unlink()
    torch.save(state, finished_run / checkpoint.NAME, _use_new_zipfile_serialization=True)
    # the file really would run the command if loaded without weights_only
    probe = tmp_path / "probe"
    Evil.marker = probe
    torch.save({"evil": Evil()}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    if command == "evaluate":
        code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    else:
        code, out, err = train_cli(capsys, finished_run, "--epochs", "3", "--resume")
    assert_one_error_line(code, err, out)
    assert "not loaded" in err
    assert not marker.exists()
    assert not (finished_run / "eval.json").exists()


def test_evaluate_refuses_a_finished_run_whose_newest_checkpoint_is_corrupt(finished_run,
                                                                            capsys):
    blob = (finished_run / checkpoint.NAME).read_bytes()
    (finished_run / checkpoint.NAME).write_bytes(blob[: len(blob) // 2])
    assert (finished_run / checkpoint.PREVIOUS).exists()  # epoch 1 would be readable
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    assert_one_error_line(code, err, out)
    assert "corrupt" in err
    assert not (finished_run / "eval.json").exists()


def _rewrite_checkpoint(folder, change):
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        state = torch.load(folder / name, weights_only=True)
        change(state)
        torch.save(state, folder / name)


def _drop(key):
    return lambda s: s.pop(key)


@pytest.mark.parametrize("change", [
    lambda s: s.__setitem__("config", "not a dict"),
    lambda s: s["config"].__setitem__("colour", "blue"),
    lambda s: s["config"].__setitem__("latent_dim", "three"),
    lambda s: s["config"].__setitem__("hidden", 16),
    lambda s: s["config"].__setitem__("guide", "bogus"),
    lambda s: s["config"].__setitem__("latent_dim", 5),
    _drop("model"), _drop("history"), _drop("rng"),
    lambda s: s.__setitem__("history", [{"epoch": 1}]),
    lambda s: s["model"].popitem(),
], ids=["config-str", "unknown-key", "latent-str", "hidden-int", "unknown-guide",
        "wrong-shape", "no-model", "no-history", "no-rng", "bad-history", "missing-tensor"])
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_damaged_checkpoint_is_one_line(finished_run, capsys, change, command):
    _rewrite_checkpoint(finished_run, change)
    before = files(finished_run)
    if command == "evaluate":
        code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    else:
        code, out, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3")
    assert_one_error_line(code, err, out)
    assert files(finished_run) == before


@pytest.mark.parametrize("guide", ["amortized", pytest.param("meanfield", marks=pytest.mark.slow)])
@pytest.mark.parametrize("device", [
    "auto", "cuda"])
def test_a_gpu_checkpoint_resumes_on_the_cpu_bitwise(tmp_path, cached_mnist, guide, device):
    config = TOY.replace(guide=guide, epochs=3)
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    s3 = run.train_run(config, straight, progress=False, log=quiet)
    run.train_run(config.replace(epochs=2), moved, progress=False, log=quiet)
    # as a CUDA machine writes it: CUDA generator states and a cuda device in the config
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        state = torch.load(moved / name, weights_only=True)
        state["rng"]["cuda"] = [torch.randint(0, 255, (16,), dtype=torch.uint8)
                                for _ in range(2)]
        state["config"]["device"] = device
        torch.save(state, moved / name)
    messages = []
    s21 = run.train_run(config, moved, resume=True, progress=False, log=messages.append)
    assert any("after epoch 2" in m for m in messages)
    (a, ma), (b, mb) = final_state(straight), final_state(moved)
    assert ma == mb and len(ma) == 3
    for key in ("model", "guide", "optimizers", "valid_guide"):
        assert_same_tensors(a[key], b[key], key)
    assert s3.test_elbo == s21.test_elbo
    assert config_json(moved)["resumes"][0]["changed"]["device"] == [device, "cpu"]


def test_a_full_disk_while_checkpointing_is_one_line(finished_run, capsys, monkeypatch):
    before = files(finished_run)

    def full(state, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 "
                           "vs 0\nPytorchStreamWriter failed writing file data/0: file write "
                           "failed")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    code, out, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3")
    assert_one_error_line(code, err, out)
    assert "disk" in err and "checkpoint" in err
    assert not (finished_run / "checkpoint.pt.tmp").exists()
    assert files(finished_run)["checkpoint.pt"] == before["checkpoint.pt"]


# kills per guide: one in the default suite, more on request (PPL_VAE_KILL_TRIALS=5)
TRIALS = int(os.environ.get("PPL_VAE_KILL_TRIALS", "1"))


# eager steps: an open-ended run (--epochs 100000) would otherwise compile its step first
@pytest.mark.parametrize("guide", ["amortized", pytest.param("meanfield", marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(tmp_path, guide):
    rng = random.Random(1234)
    for trial in range(TRIALS):
        out = tmp_path / f"{guide}{trial}"
        proc = train_process(out, "--epochs", "100000", "--guide", guide)
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, process_log(out)
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
    resumed = train_process(out, "--epochs", str(saved + 2), "--guide", guide, "--resume")
    assert resumed.wait(timeout=120) == 0, process_log(out)
    assert json.loads((out / "summary.json").read_text())["epochs"] == saved + 2


def test_checkpoint_save_keeps_the_previous_and_load_falls_back(tmp_path):
    assert checkpoint.load(tmp_path) is None
    checkpoint.save({"config": {}, "n": 1}, tmp_path)
    assert not (tmp_path / checkpoint.PREVIOUS).exists()
    checkpoint.save({"config": {}, "n": 2}, tmp_path)
    assert checkpoint.load(tmp_path)["n"] == 2
    assert torch.load(tmp_path / checkpoint.PREVIOUS, weights_only=True)["n"] == 1
    assert not (tmp_path / (checkpoint.NAME + ".tmp")).exists()
    # truncate the newest: load warns and uses the previous one
    blob = (tmp_path / checkpoint.NAME).read_bytes()
    (tmp_path / checkpoint.NAME).write_bytes(blob[: len(blob) // 2])
    warnings = []
    assert checkpoint.load(tmp_path, warn=warnings.append)["n"] == 1
    assert len(warnings) == 1 and checkpoint.PREVIOUS in warnings[0]
    # newest missing (killed between the two renames): the previous one
    (tmp_path / checkpoint.NAME).unlink()
    assert checkpoint.load(tmp_path)["n"] == 1


def test_checkpoint_truncated_without_previous_raises_user_error(tmp_path):
    checkpoint.save({"config": {}, "n": 1}, tmp_path)
    blob = (tmp_path / checkpoint.NAME).read_bytes()
    (tmp_path / checkpoint.NAME).write_bytes(blob[:100])
    with pytest.raises(UserError, match="corrupt or truncated") as e:
        checkpoint.load(tmp_path)
    assert "\n" not in str(e.value)
    torch.save({"model": 1}, tmp_path / checkpoint.NAME)  # a dict, but not ours
    with pytest.raises(UserError, match="not a ppl_vae checkpoint"):
        checkpoint.load(tmp_path)


def test_rng_state_roundtrip():
    state = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
