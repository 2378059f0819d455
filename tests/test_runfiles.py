"""ppl_vae.runfiles: an evaluation of an earlier epoch is set aside in its own subfolder,
never overwriting an earlier set."""
from __future__ import annotations

import json

from ppl_vae import run, rundir, runfiles

from conftest import TOY
from helpers import FIGURES, call, files, summary, train_cli


def test_a_finished_run_keeps_aside_an_evaluation_of_an_earlier_epoch(tmp_path, cached_mnist):
    """evaluate during training wrote eval.json at epoch 1; the run ends at epoch 2: the stale
    evaluation moves to evaluated-epoch1/ (issue 32.A: it was deleted), the summary stays
    alone beside the run."""
    out = tmp_path / "run"
    trained = run.fit_run(TOY.replace(epochs=2), out, progress=False, log=lambda m: None)
    (out / "eval.json").write_text(json.dumps({"epochs": 1}))
    (out / "latent.png").write_bytes(b"old")
    messages = []
    run.finish(trained, out, log=messages.append)
    assert not (out / "eval.json").exists() and not (out / "latent.png").exists()
    assert (out / "evaluated-epoch1" / "latent.png").read_bytes() == b"old"
    assert json.loads((out / "evaluated-epoch1" / "eval.json").read_text()) == {"epochs": 1}
    assert sum("evaluated-epoch1" in m for m in messages) == 1
    assert (out / "summary.json").exists()
    (out / "eval.json").write_text(json.dumps({"epochs": 2}))  # a current one stays
    run.finish(trained, out, log=messages.append)
    assert (out / "eval.json").exists()


EVALUATED = ("eval.json", "arrays.npz", *FIGURES)


def test_a_resume_keeps_the_evaluation_in_a_subfolder(evaluated, capsys):
    before = files(evaluated)
    assert set(EVALUATED) <= set(before)
    code, out, err = train_cli(capsys, evaluated, "--resume", "--epochs", "3")
    assert code == 0, err
    kept = evaluated / "evaluated-epoch2"
    assert kept.is_dir()
    for name in EVALUATED:  # every file, byte for byte, and none left beside the new run
        assert (kept / name).read_bytes() == before[name], name
        assert not (evaluated / name).exists(), name
    assert json.loads((kept / "eval.json").read_text())["epochs"] == 2
    assert summary(evaluated)["epochs"] == 3
    said = [line for line in out.splitlines() if "evaluated-epoch2" in line]
    assert len(said) == 1, out  # one log line says where the evaluation went
    # the folder stays a run that the next commands take: evaluate, resume, overwrite
    assert rundir.kind_of(evaluated) == "run"
    assert call(capsys, "evaluate", evaluated, "--num-particles-eval", "2",
                "--rows", "10")[0] == 0
    assert (kept / "eval.json").read_bytes() == before["eval.json"]  # untouched by it
    assert json.loads((evaluated / "eval.json").read_text())["epochs"] == 3
    code, _, err = train_cli(capsys, evaluated, "--resume", "--epochs", "4")
    assert code == 0, err
    assert (evaluated / "evaluated-epoch3" / "eval.json").exists() and kept.is_dir()
    code, _, err = train_cli(capsys, evaluated, "--overwrite", "--epochs", "1")
    assert code == 0, err  # replaces the run with its kept evaluations, leaves nothing beside
    assert not (evaluated / "evaluated-epoch2").exists()
    assert [p.name for p in evaluated.parent.iterdir() if p.name.startswith(".")] == []


def test_a_stale_evaluation_is_kept_in_a_subfolder(evaluated, capsys):
    """An evaluation of another epoch than the run's last (made while the run was cut short)
    is kept aside by the scoring that finishes the run, not deleted."""
    doc = json.loads((evaluated / "eval.json").read_text())
    doc["epochs"] = 1
    (evaluated / "eval.json").write_text(json.dumps(doc))
    (evaluated / "summary.json").unlink()  # interrupted in its final scoring
    before = files(evaluated)
    code, out, err = train_cli(capsys, evaluated, "--resume", "--epochs", "2")
    assert code == 0, err
    kept = evaluated / "evaluated-epoch1"
    for name in EVALUATED:
        assert (kept / name).read_bytes() == before[name], name
    assert len([line for line in out.splitlines() if "evaluated-epoch1" in line]) == 1, out
    assert summary(evaluated)["epochs"] == 2


def test_setting_aside_never_overwrites_an_earlier_set(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runfiles.MARKER).write_text("run")
    for text in ("first", "second"):
        (folder / "eval.json").write_text(json.dumps({"epochs": 2, "text": text}))
        (folder / "latent.png").write_text(text)
        assert runfiles.set_aside_evaluation(folder, 5, log=lambda _m: None) is not None
    kept = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert kept == ["evaluated-epoch2", "evaluated-epoch2-2"]
    assert (folder / "evaluated-epoch2" / "latent.png").read_text() == "first"
    assert (folder / "evaluated-epoch2-2" / "latent.png").read_text() == "second"
