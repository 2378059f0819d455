"""Pieces by name: a user's class named module:Class on the command line trains, resumes and
is evaluated with no edit under ppl_vae/; the built-ins sit in the same registries."""
from __future__ import annotations

import json
import textwrap

import pytest

from ppl_vae import cli, config, registry
from ppl_vae.errors import UserError

TINY = ["--train-size", "200", "--valid-size", "20", "--test-size", "20", "--hidden", "16",
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
    base = ["--likelihood", "mylik:Laplace", "--binarize", "none", *TINY, "--out", str(out)]
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
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
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


def test_the_library_speaks_through_logging(tmp_path, cached_mnist, caplog):
    """Progress lines go to the "ppl_vae" logger (INFO), not to print: a program decides."""
    import logging

    from ppl_vae.config import Config
    from ppl_vae.run import train_run
    with caplog.at_level(logging.INFO, logger="ppl_vae"):
        train_run(Config(train_size=100, valid_size=10, test_size=10, hidden=(8,), latent_dim=2,
                         batch_size=50, epochs=1, device="cpu"), tmp_path / "r", progress="lines")
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
