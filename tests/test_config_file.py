"""--config FILE for train and compare: TOML or JSON settings under the command line's flags;
a run's own config.json re-runs it to the same numbers; a comparison's results.json gives
back its guides, seeds, budget and K; an unknown key names the nearest valid one and a value
of the wrong type its type, in one line with exit code 2."""
from __future__ import annotations

import json

import pytest

from ppl_vae import cli, config_file
from ppl_vae.errors import UserError

SMALL = ["--train-size", "300", "--valid-size", "20", "--test-size", "40", "--epochs", "1",
         "--hidden", "16", "--latent-dim", "3", "--batch-size", "100", "--compile", "off",
         "--no-progress"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_toml_file_sets_options_and_flags_override_it(tmp_path):
    path = write(tmp_path, "c.toml", 'epochs = 7\nhidden = [32, 16]\nlatent-dim = 4\n'
                                     'guide = "meanfield"\nlr = 3e-4\ncompile = "off"\n')
    args = cli.parse(["train", "--config", str(path)])
    assert (args.epochs, args.hidden, args.latent_dim, args.guide, args.lr, args.compile) == (
        7, [32, 16], 4, "meanfield", 3e-4, "off")
    args = cli.parse(["train", "--config", str(path), "--epochs", "2", "--guide", "amortized"])
    assert (args.epochs, args.guide, args.latent_dim) == (2, "amortized", 4)
    assert cli._config(args).latent_dim == 4  # it reaches the Config the run is built from


def test_compare_takes_its_own_options_from_a_file(tmp_path):
    path = write(tmp_path, "c.toml", 'guides = ["amortized", "meanfield"]\nseeds = [0, 1]\n'
                                     'budget = "evaluations=400"\nnum_particles_eval = 50\n'
                                     'local_rows = 30\nepochs = 3\n')
    args = cli.parse(["compare", "--config", str(path)])
    assert (args.guides, args.seeds, args.budget, args.num_particles_eval, args.local_rows,
            args.epochs) == (["amortized", "meanfield"], "0,1", "evaluations=400", 50, 30, 3)
    path = write(tmp_path, "n.toml", "seeds = 3\nbudget = \"flops=2e14\"\n")
    args = cli.parse(["compare", "--config", str(path)])
    assert (args.seeds, args.budget) == ("3", "flops=2e14")  # a count of seeds, as --seeds 3


def test_a_comparisons_record_gives_back_its_plan(tmp_path):
    doc = {"config": {"epochs": 4, "guide": "amortized", "hidden": [16], "data_dir": None},
           "guides": ["amortized", "iaf"], "seeds": [3], "num_particles": 25,
           "local_rows": 12, "budget": {"unit": "evaluations", "amount": 800},
           "date": "2026-12-07", "versions": {}, "command": ["x"], "amortized": {"a": 1},
           "differences": []}
    path = write(tmp_path, "results.json", json.dumps(doc))
    args = cli.parse(["compare", "--config", str(path)])
    assert (args.guides, args.seeds, args.num_particles_eval, args.local_rows, args.budget,
            args.epochs, args.data_dir) == (["amortized", "iaf"], "3,", 25, 12,
                                             "evaluations=800", 4, None)
    assert "guide" not in cli._given(["compare", "--config", str(path)], "compare")
    with pytest.raises(UserError, match="is a comparison's record \\(guides amortized, iaf\\); "
                                        "re-run it with `ppl-vae compare --config"):
        cli.parse(["train", "--config", str(path)])  # which guide would train train?


@pytest.mark.parametrize("text,message", [
    ("epoch = 3\n", "unknown key 'epoch' for train; did you mean epochs?"),
    ("latent_dims = 3\n", "did you mean latent_dim?"),
    ('epochs = "abc"\n', "epochs must be a whole number, got 'abc'"),
    ("epochs = 2.5\n", "epochs must be a whole number, got 2.5"),
    ("hidden = 400\n", "hidden must be a list such as [400], got 400"),
    ('dreg = "yes"\n', "dreg must be true or false, got 'yes'"),
    ("epochs = = 3\n", "is not valid TOML"),
    ("trust_code = true\n", "unknown key 'trust_code' for train"),  # consent is not a file's
    ("overwrite = true\n", "unknown key 'overwrite' for train"),
])
def test_a_bad_file_is_one_line_with_exit_2(tmp_path, capsys, text, message):
    path = write(tmp_path, "bad.toml", text)
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_missing_and_unreadable_files(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    path = write(tmp_path, "list.json", "[1, 2]")
    with pytest.raises(UserError, match="must hold a table of settings"):
        config_file.read(path)


def test_a_runs_config_json_re_runs_it_to_the_same_numbers(tmp_path, cached_mnist):
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli.main(["train", *SMALL, "--guide", "meanfield", "--seed", "3", "--lr", "2e-3",
                     "--out", str(first)]) == 0
    assert cli.main(["train", "--config", str(first / "config.json"), "--no-progress",
                     "--out", str(again)]) == 0
    a = json.loads((first / "summary.json").read_text())
    b = json.loads((again / "summary.json").read_text())
    assert b["guide"] == "meanfield" and a["test_elbo"] == b["test_elbo"]
    saved = json.loads((again / "config.json").read_text())["config"]
    assert saved == json.loads((first / "config.json").read_text())["config"]
