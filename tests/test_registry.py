"""Pieces by name: a user's class named module:Class on the command line trains, resumes and
is evaluated with no edit under ppl_vae/; the built-ins sit in the same registries."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from ppl_vae import checkpoint, cli, config, guides, objectives, registry
from ppl_vae.config import Config
from ppl_vae.errors import UserError
from ppl_vae.registry import require_consent

from helpers import TINY, assert_one_error_line, call, summary, train_cli


SMALL_RUN = ["--train-size", "200", "--valid-size", "20", "--test-size", "20", "--hidden", "16",
        "--latent-dim", "2", "--batch-size", "50", "--device", "cpu", "--no-progress"]

LAPLACE = textwrap.dedent('''
    import torch.distributions as D
    from ppl_vae.likelihoods import Likelihood

    class Laplace(Likelihood):
        """p(x | out) = Laplace(out, 0.1) per pixel."""
        def forward(self, out):
            return D.Independent(D.Laplace(out, 0.1), 1)
''')


def test_a_users_likelihood_trains_resumes_and_evaluates_from_the_cli(tmp_path, monkeypatch,
                                                                         cached_mnist, capsys):
    (tmp_path / "mylik.py").write_text(LAPLACE)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    base = ["--likelihood", "mylik:Laplace", "--binarize", "none", *SMALL_RUN, "--out", str(out)]
    assert cli.main(["train", *base, "--epochs", "1"]) == 0
    assert cli.main(["train", *base, "--epochs", "2", "--resume"]) == 0
    # a name read from the run's files is imported only with the user's consent
    assert cli.main(["evaluate", str(out), "--num-particles", "5", "--no-progress"]) == 2
    assert cli.main(["evaluate", str(out), "--num-particles", "5", "--no-progress",
                     "--trust-code"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["likelihood"] == "mylik:Laplace"
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["epochs"] == 2
    # a Laplace likelihood with scale 0.1 scores grayscale pixels very differently from a
    # Bernoulli: the numbers are its own
    assert cli.main(["train", *SMALL_RUN, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    laplace = json.loads((out / "summary.json").read_text())["test_elbo"]
    bern = json.loads((tmp_path / "b" / "summary.json").read_text())["test_elbo"]
    assert abs(laplace - bern) > 10


def test_registering_from_python_is_validated_like_the_builtins():
    from ppl_vae import likelihoods
    assert "bernoulli" in registry.LIKELIHOODS and "semiamortized" in registry.GUIDES
    with pytest.raises(UserError, match="unknown likelihood 'mine'"):
        config.Config(likelihood="mine").validate()
    registry.LIKELIHOODS.register("mine", likelihoods.Bernoulli)
    try:
        config.Config(likelihood="mine").validate()
        assert isinstance(registry.LIKELIHOODS.build(config.Config(likelihood="mine"), data_dim=4),
                          likelihoods.Bernoulli)
    finally:
        registry.LIKELIHOODS._builders.pop("mine")
    with pytest.raises(UserError, match="cannot import"):
        config.Config(likelihood="no_such_module:Thing").validate()


def test_the_library_speaks_through_logging(tmp_path, cached_mnist, caplog, toy_config):
    """Progress lines go to the "ppl_vae" logger (INFO), not to print: a program decides."""
    import logging

    from ppl_vae.run import train_run
    with caplog.at_level(logging.INFO, logger="ppl_vae"):
        train_run(toy_config.replace(valid_size=10, test_size=10, hidden=(8,), latent_dim=2,
                                     seed=0), tmp_path / "r", progress="lines")
    messages = [r.getMessage() for r in caplog.records if r.name == "ppl_vae"]
    assert any(m.startswith("epoch   1") for m in messages)
    assert any(m.startswith("test ELBO") for m in messages)


def test_an_activation_named_as_module_class_is_used_as_a_class(tmp_path, cached_mnist):
    """--activation torch.nn:ELU: the network makes its own ELU layers from the class (it was
    built as an instance and refused by the probe)."""
    import json

    import torch

    from ppl_vae import cli
    from ppl_vae.run_setup import load_trained
    out = tmp_path / "elu"
    assert cli.main(["train", "--activation", "torch.nn:ELU", "--train-size", "300",
                     "--valid-size", "20", "--test-size", "40", "--epochs", "1", "--hidden",
                     "16", "--latent-dim", "3", "--batch-size", "100", "--compile", "off",
                     "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["activation"] == "torch.nn:ELU"
    model = load_trained(out, trust_code=True).model
    assert any(isinstance(m, torch.nn.ELU) for m in model.decoder.modules())


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


def test_pieces_named_in_the_registries_import_on_demand():
    assert registry.GUIDES.resolve("amortized").piece is guides.AmortizedNormal
    assert registry.GUIDES.resolve("meanfield").piece is guides.LocalNormal
    assert registry.OBJECTIVES.resolve("iwae").piece is objectives.IWAE
    assert registry.OBJECTIVES.resolve("Trace_ELBO").piece is objectives.PyroObjective
    assert getattr(registry.LIKELIHOODS.resolve("bernoulli"), "piece", None) is None
