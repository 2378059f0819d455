"""Issue 21: trust from outside. A run folder received from someone else runs no code, one
writer per folder, no run lost to Ctrl-C or a full disk, and Pyro's own objectives by name.

Each test here failed on the code before the fix it names.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from ppl_vae import checkpoint, rundir, runfiles
from ppl_vae.config import Config
from ppl_vae.registry import require_consent
from ppl_vae.errors import UserError
from ppl_vae.registry import require_consent
from helpers import (TINY, assert_one_error_line, call, config_json, files, summary, train_cli,
                     trained_copy)
from records import quiet

PAYLOAD = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from ppl_vae.likelihoods import Bernoulli as Lik
'''


def _plant(run, field, name):
    """Rewrite the checkpoints' config so that ``field`` names ``name`` (as a colleague's
    folder could); the rest of the run is untouched."""
    for file in (checkpoint.NAME, checkpoint.PREVIOUS):
        path = run / file
        if path.exists():
            state = torch.load(path, weights_only=True)
            state["config"][field] = name
            torch.save(state, path)


# ---------------------------------------------------------------------------------------
# 1. a received run folder runs no code without consent
# ---------------------------------------------------------------------------------------
@pytest.fixture
def shared2(finished_run, tmp_path, monkeypatch):
    """A received folder ``shared2/`` whose checkpoint names ``shared2.payload:Lik`` and which
    carries ``payload.py`` (it writes a marker and re-exports the built-in Bernoulli)."""
    folder = tmp_path / "shared2"
    finished_run.rename(folder)
    marker = tmp_path / "payload-ran"
    (folder / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    (folder / "__init__.py").write_text("")
    _plant(folder, "likelihood", "shared2.payload:Lik")
    monkeypatch.chdir(tmp_path)  # the user runs the command from the folder's parent
    yield folder, marker
    for name in [m for m in sys.modules if m.startswith("shared2")]:
        del sys.modules[name]


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_received_folder_does_not_import_its_code(shared2, capsys, command):
    folder, marker = shared2
    if command == "evaluate":
        code, out, err = call(capsys, "evaluate", "shared2", "--num-particles-eval", "2")
    else:
        code, out, err = train_cli(capsys, "shared2", "--epochs", "3", "--resume")
    assert_one_error_line(code, err, out)
    assert "shared2.payload" in err and "--trust-code" in err
    assert not marker.exists()
    assert not (folder / "eval.json").exists()


def test_trust_code_imports_it(shared2, capsys):
    folder, marker = shared2
    code, out, err = call(capsys, "evaluate", "shared2", "--num-particles-eval", "2",
                          "--trust-code")
    assert code == 0, err
    assert marker.exists() and (folder / "eval.json").exists()


def test_the_users_own_name_needs_no_flag(shared2, capsys):
    """A resume that names the same code on its own command line consents to it."""
    folder, marker = shared2
    code, out, err = train_cli(capsys, "shared2", "--epochs", "3", "--resume",
                               "--likelihood", "shared2.payload:Lik")
    assert code == 0, err
    assert marker.exists()


@pytest.mark.parametrize("field, name", [
    ("prior", "this:Zen"),  # an installed module whose import prints
    ("likelihood", "torch.utils.tensorboard:SummaryWriter"),  # a constructor that writes
    ("guide", "payload:Guide"),  # a module in the current folder
    ("objective", "os:system"),
    ("lr_schedule", "builtins:int"),
])
def test_siblings_are_refused_before_import(finished_run, capsys, field, name, tmp_path,
                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    _plant(finished_run, field, name)
    module = name.partition(":")[0]
    was_imported = module in sys.modules
    code, out, err = call(capsys, "evaluate", finished_run, "--num-particles-eval", "2")
    assert_one_error_line(code, err, out)
    assert name in err and "--trust-code" in err
    assert (module in sys.modules) == was_imported
    assert not (tmp_path / "runs").exists()  # SummaryWriter's default folder


def test_builtin_names_need_no_consent():
    require_consent(Config(), "a checkpoint")  # nothing to import: no error
    with pytest.raises(UserError, match="--trust-code"):
        require_consent(Config(likelihood="x.y:Z"), "a checkpoint")
    require_consent(Config(likelihood="x.y:Z"), "a checkpoint", trust_code=True)
    require_consent(Config(likelihood="x.y:Z"), "a checkpoint",
                    given=Config(likelihood="x.y:Z"))


@pytest.mark.parametrize("name", [".x:Y", ":", ":b", "a:", "a b:C", "a:1x"])
def test_malformed_code_names_are_one_line(capsys, name, tmp_path):
    code, out, err = call(capsys, "train", *TINY, "--likelihood", name,
                          "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert "module:Class" in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------
# 2, 3. --overwrite replaces the old run in one step, never on Ctrl-C in its first epoch
# ---------------------------------------------------------------------------------------
def _sigint_on_call(monkeypatch, calls: int):
    """The training objective sends this process SIGINT on its ``calls``-th call."""
    import signal

    from ppl_vae import run_setup
    build = run_setup.build_objective
    count = [0]

    def patched(config):
        objective = build(config)

        def interrupting(*args, **kwargs):
            count[0] += 1
            if count[0] == calls:
                signal.raise_signal(signal.SIGINT)
            return objective(*args, **kwargs)
        return interrupting
    monkeypatch.setattr(run_setup, "build_objective", patched)


def test_ctrl_c_in_the_first_epoch_of_overwrite_keeps_the_old_run(finished_run, capsys,
                                                                  monkeypatch):
    before = files(finished_run)
    _sigint_on_call(monkeypatch, 1)
    code, out, err = train_cli(capsys, finished_run, "--overwrite", "--epochs", "3")
    assert code == 130
    assert "is left as it was" in err and "--resume" not in err
    assert files(finished_run) == before
    assert not [p for p in finished_run.parent.iterdir() if ".staging" in p.name]


def test_ctrl_c_after_the_first_epoch_of_overwrite_keeps_the_new_run(finished_run, capsys,
                                                                     monkeypatch):
    _sigint_on_call(monkeypatch, 3)  # 2 steps an epoch: the 3rd is in epoch 2
    code, out, err = train_cli(capsys, finished_run, "--overwrite", "--epochs", "3")
    assert code == 130 and "--resume" in err
    state = checkpoint.load(finished_run)
    assert len(state["history"]) == 1 and state["position"]["epoch"] == 1
    assert not (finished_run / "summary.json").exists()  # the old run's is gone with it


def test_overwrite_with_tensorboard_on_both_runs(tmp_path, capsys, cached_mnist):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--tensorboard")[0] == 0
    code, _, err = train_cli(capsys, out, "--tensorboard", "--overwrite", "--epochs", "2")
    assert code == 0, err
    assert summary(out)["epochs"] == 2 and (out / "tensorboard").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # no staging left


def test_a_kill_between_the_renames_of_a_swap_is_undone(tmp_path):
    """Where the file system cannot exchange two folders, the swap is two renames; a kill
    between them leaves the old run parked, and the next command puts it back."""
    out = tmp_path / "run"
    parked = tmp_path / ".run.old-999999999"  # a process that is gone
    parked.mkdir()
    (parked / runfiles.MARKER).touch()
    (parked / "summary.json").write_text("{}")
    rundir.recover(out)
    assert (out / "summary.json").exists() and not parked.exists()


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not rundir.exchange(a, b):
        pytest.skip("this file system cannot exchange folders (two renames are used)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ---------------------------------------------------------------------------------------
# 4. one writer per folder
# ---------------------------------------------------------------------------------------
def _live_lock(folder, command="train"):
    (folder / runfiles.LOCK).write_text(f"{os.getppid()}\n{command}\n")  # a live process


@pytest.mark.parametrize("extra", [["--overwrite"], ["--resume", "--epochs", "3"], []])
def test_a_live_writer_is_refused(finished_run, capsys, extra):
    _live_lock(finished_run)
    before = files(finished_run)
    code, out, err = train_cli(capsys, finished_run, *extra)
    assert_one_error_line(code, err, out)
    assert f"pid {os.getppid()}" in err
    assert files(finished_run) == before


def test_two_new_runs_into_one_folder(tmp_path, capsys, cached_mnist):
    """The second of two runs started together is refused when it takes the lock (a
    folder checked free before the first took it)."""
    out = tmp_path / "run"
    folder = rundir.RunDir(out)  # the second run checked the folder: free
    assert train_cli(capsys, out, "--epochs", "1")[0] == 0  # the first ran meanwhile
    _live_lock(out)  # ... and still holds it
    with pytest.raises(UserError, match="another process"):
        folder.create()


def test_a_stale_lock_is_taken_over(finished_run, capsys):
    (finished_run / runfiles.LOCK).write_text("999999999\ntrain\n")
    code, _, err = train_cli(capsys, finished_run, "--resume", "--epochs", "3")
    assert code == 0, err
    assert not (finished_run / runfiles.LOCK).exists()


# ---------------------------------------------------------------------------------------
# 5. evaluate replaces the previous evaluation only when the new one is complete
# ---------------------------------------------------------------------------------------
@pytest.fixture
def evaluated(tmp_path, tmp_path_factory, cached_mnist, capsys):
    return trained_copy(tmp_path_factory, capsys, tmp_path / "run", 2, evaluate=True)


def test_a_failing_evaluation_keeps_the_previous_one(evaluated, capsys, monkeypatch):
    from ppl_vae import plots
    before = files(evaluated)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device", "latent.png")
    monkeypatch.setattr(plots, "run_figures", fail)
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


# ---------------------------------------------------------------------------------------
# 6. a full disk
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# 10. Pyro's own objectives by name
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Trace_ELBO", "pyro.infer:Trace_ELBO"])
def test_pyro_trace_elbo_trains_like_ours(tmp_path, capsys, cached_mnist, name):
    """Our ELBO equals Pyro's Trace_ELBO: the same seed gives the same numbers (to float
    rounding: the same draws, the same loss)."""
    runs = {}
    for objective in ("elbo", name):
        out = tmp_path / objective.replace(":", "_")
        code, _, err = train_cli(capsys, out, "--objective", objective)
        assert code == 0, err
        runs[objective] = summary(out)
    ours, pyros = runs["elbo"], runs[name]
    assert pyros["test_elbo"] == pytest.approx(ours["test_elbo"], abs=3 * ours["test_elbo_stderr"])
    assert pyros["final_train_elbo"] == pytest.approx(ours["final_train_elbo"], rel=1e-4)


def test_pyro_objectives_values_match_ours():
    """Per batch: Trace_ELBO equals elbo, TraceMeanField_ELBO equals analytic_kl, and
    TraceGraph_ELBO's value is -ELBO on the same draws."""
    import pyro
    from ppl_vae.batching import Batch
    from ppl_vae.build import build_guide, build_model, build_objective
    x = torch.bernoulli(torch.rand(6, 12, generator=torch.Generator().manual_seed(0)))
    cfg = Config(latent_dim=3, hidden=(8,), num_particles=4)
    model = build_model(cfg, 12)
    guide = build_guide(cfg, 12, 6)
    batch = Batch(x, torch.arange(6), 30)
    pairs = [("elbo", "Trace_ELBO"), ("analytic_kl", "TraceMeanField_ELBO"),
             ("elbo", "TraceGraph_ELBO")]
    for ours, theirs in pairs:
        values = []
        for name in (ours, theirs):
            pyro.set_rng_seed(1)
            values.append(float(build_objective(cfg.replace(objective=name))(model, guide, batch).detach()))
        assert values[1] == pytest.approx(values[0], rel=1e-5), (ours, theirs)


@pytest.mark.parametrize("argv, words", [
    (["--objective", "pyro.infer:RenyiELBO"], "N / B"),
    (["--objective", "Trace_ELBO", "--beta", "0.5"], "no KL weight"),
    (["--objective", "Trace_ELBO", "--warmup-epochs", "1"], "no KL weight"),
    (["--warmup-epochs", "7", "--epochs", "1"], "never reach"),
])
def test_objectives_that_cannot_run_are_one_line(tmp_path, capsys, cached_mnist, argv, words):
    code, out, err = call(capsys, "train", *TINY, *argv, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert words in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------
# 7, 8, 9. bounded sizes, odd files and environments, true messages: one line each
# ---------------------------------------------------------------------------------------
def _odd_files(folder):
    import numpy as np
    np.savez(folder / "objects.npz", x=np.array([{"a": 1}, 2], dtype=object))
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04garbage" * 10)
    with open(folder / "huge.npy", "wb") as f:  # a 4 KB file whose header claims 2.85 TiB
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 784_000)})
        f.write(b"\0" * 4000)
    np.savez(folder / "labels.npz", x=np.zeros((300, 8, 8), np.uint8),
             y=np.full(300, 2 ** 40))
    os.mkfifo(folder / "pipe.npy")


ODD = [
    (["--dataset", "objects.npz"], "Python objects"),
    (["--dataset", "corrupt.npz"], "not a zip"),
    (["--dataset", "huge.npy"], "header says"),
    (["--dataset", "labels.npz"], "class indices"),
    (["--dataset", "pipe.npy"], "not a regular file"),
    (["--dataset", "torchvision:__class__"], "no class"),
    (["--dataset", "torchvision:VisionDataset"], "no class"),
    (["--guide", "meanfield", "--inner-steps", "100000"], "at most 1000"),
    (["--refine-steps", "5000", "--guide", "semiamortized"], "at most 1000"),
    (["--gap-particles", "1000000000"], "beyond"),
    (["--num-particles", "1000000"], "GiB"),
    (["--hidden", "65536", "65536"], "GiB"),
    (["--num-particles-eval", "100000000000000000000", "--evaluate"], "beyond"),
    (["--lr-schedule", "builtins:int"], "epoch -> learning-rate factor"),
    (["--guide", "builtins:object"], "Pyro program guide(batch)"),
    (["--likelihood", "builtins:int"], "likelihood(decoder output)"),
    (["--likelihood", "ppl_vae.guides:AmortizedNormal"], "from_config"),
    (["--guide", "ppl_vae.likelihoods:Bernoulli"], "Pyro program guide(batch)"),
]


@pytest.mark.parametrize("argv, words", ODD, ids=[" ".join(a)[:40] for a, _ in ODD])
def test_odd_input_is_one_line_before_any_folder(tmp_path, capsys, cached_mnist, monkeypatch,
                                                  argv, words):
    _odd_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = call(capsys, "train", *TINY, *argv, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert words in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "abc"}, "LOCAL_RANK"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK"),
])
def test_a_broken_launcher_environment_is_one_line(tmp_path, capsys, monkeypatch, env, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = call(capsys, "train", *TINY, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert words in err


def test_an_absurd_elbo_warning_names_the_flag_without_control_bytes(tmp_path, capsys,
                                                                     cached_mnist):
    code, out, err = call(capsys, "train", *TINY, "--lr", "10", "--out", tmp_path / "r")
    assert "\x00" not in out + err
    if "absurd" in out + err:
        assert "--lr" in out + err


def test_a_divergence_before_any_checkpoint_says_so(tmp_path, capsys, cached_mnist):
    code, out, err = call(capsys, "train", *TINY, "--beta", "1e308", "--out", tmp_path / "r")
    assert code == 1
    assert "no checkpoint" in err and "is kept" not in err


def test_a_run_interrupted_in_its_final_scoring_can_be_finished(finished_run, capsys):
    """Ctrl-C while the test set is scored leaves all epochs and no summary: --resume
    finishes the scoring instead of refusing (it trains nothing more)."""
    (finished_run / "summary.json").unlink()
    before = checkpoint.load(finished_run)["model"]
    code, out, err = train_cli(capsys, finished_run, "--epochs", "2", "--resume")
    assert code == 0, err
    assert summary(finished_run)["epochs"] == 2
    after = checkpoint.load(finished_run)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_damaged_config_json_keeps_the_record_of_resumes(finished_run, capsys):
    assert train_cli(capsys, finished_run, "--epochs", "3", "--resume", "--lr", "2e-3")[0] == 0
    (finished_run / "config.json").write_text("{ damaged")
    assert train_cli(capsys, finished_run, "--epochs", "4", "--resume")[0] == 0
    resumes = config_json(finished_run)["resumes"]
    assert [r["after_epoch"] for r in resumes] == [2, 3]


def test_a_path_the_console_cannot_encode_is_printed_escaped(finished_run):
    """A folder name that is not UTF-8, under a console that encodes strictly: the path is
    printed escaped, not a UnicodeEncodeError after the files were written."""
    import subprocess
    odd = finished_run.parent / os.fsdecode(b"run-\xff")
    finished_run.rename(odd)
    code = "import sys; from ppl_vae.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "evaluate", os.fsencode(odd),
                           "--num-particles-eval", "2", "--rows", "10", "--no-progress"],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii:strict"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert b"UnicodeEncodeError" not in proc.stderr and (odd / "eval.json").exists()


# ---------------------------------------------------------------------------------------
# 11. a user's own pieces: work end to end, or one line before any folder
# ---------------------------------------------------------------------------------------
PIECES = '''
import pyro, pyro.distributions as dist, torch
from pyro.infer.autoguide import AutoNormal
from ppl_vae.model import data_plate


class Auto(AutoNormal):
    @classmethod
    def from_config(cls, config, model, **context):
        return cls(model, create_plates=data_plate)


def function_guide(batch):
    with data_plate(batch):
        pyro.sample("z", dist.Normal(torch.zeros(len(batch.idx), 3), 1.0).to_event(1))


class Latent(torch.nn.Module):
    def forward(self, batch):
        with data_plate(batch):
            pyro.sample("latent", dist.Normal(torch.zeros(len(batch.idx), 3), 1.0).to_event(1))


class TwoArgs(torch.nn.Module):
    def forward(self, x, y):
        pass


class OldObjective:
    def __call__(self, model, guide):
        return torch.zeros(())
'''


@pytest.fixture
def pieces(tmp_path, monkeypatch):
    (tmp_path / "mypieces.py").write_text(PIECES)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("mypieces", None)


def test_an_autoguide_trains_evaluates_and_resumes(pieces, capsys, cached_mnist):
    out = pieces / "auto"
    assert train_cli(capsys, out, "--guide", "mypieces:Auto")[0] == 0
    code, _, err = call(capsys, "evaluate", out, "--num-particles-eval", "2", "--rows", "10",
                        "--trust-code")
    assert code == 0, err
    code, _, err = train_cli(capsys, out, "--guide", "mypieces:Auto", "--epochs", "2",
                             "--resume")
    assert code == 0, err
    assert summary(out)["epochs"] == 2


@pytest.mark.parametrize("argv, words", [
    (["--guide", "mypieces:Latent"], "site 'z'"),
    (["--guide", "mypieces:TwoArgs"], "guide(batch)"),
    (["--objective", "mypieces:OldObjective"], "objective(model, guide, batch)"),
])
def test_a_piece_of_the_wrong_shape_is_one_line_before_any_folder(pieces, capsys,
                                                                   cached_mnist, argv, words):
    code, out, err = call(capsys, "train", *TINY, *argv, "--out", pieces / "r")
    assert_one_error_line(code, err, out)
    assert words in err
    assert not (pieces / "r").exists()
