"""ppl_vae.config: the settings' rules: bad numbers are one line, the seed range, the
resumable settings, and the choices config holds for the CLI matching the modules using them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ppl_vae import compiled, config, config as c, data, protocol, run_setup
from ppl_vae.config import Config, local_fit_options
from ppl_vae.errors import UserError

from helpers import assert_one_error_line, train_cli


@pytest.mark.parametrize("extra,flag", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "1e6"], "--lr"),
    (["--latent-dim", "100000000"], "--latent-dim"), (["--hidden", "1000000000"], "--hidden"),
    (["--beta", "-1"], "--beta"), (["--beta", "inf"], "--beta"),
    (["--max-seconds", "nan"], "--max-seconds"), (["--adam-eps", "-1"], "--adam-eps"),
    (["--seed", "99999999999999999999"], "--seed"), (["--seed", "4294967296"], "--seed"),
    (["--seed", "-1"], "--seed"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_numbers_are_one_line(extra, flag, tmp_path, capsys):
    code, out, err = train_cli(capsys, tmp_path / "o", *extra)
    assert_one_error_line(code, err, out)
    assert flag in err
    assert not (tmp_path / "o").exists()


def test_the_seed_range_is_where_seeds_do_not_alias():
    """torch's CPU generator keeps 32 bits of a seed, so --seed 2**32 would silently repeat
    --seed 0: the range --seed accepts is exactly the range of distinct streams."""
    draws = {s: torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (0, 2 ** 32)}
    assert torch.equal(draws[0], draws[2 ** 32])  # the aliasing the range check avoids
    assert Config(seed=2 ** 32 - 1).validate().seed == 2 ** 32 - 1
    with pytest.raises(UserError, match="--seed"):
        Config(seed=2 ** 32).validate()


def test_resumable_settings_are_settings():
    names = {f.name for f in dataclasses.fields(Config)}
    assert c.RESUMABLE <= names
    assert set(run_setup.RESUME_FIXED) | c.RESUMABLE == names


class _Guide(protocol.Answers):
    """A guide that answers the protocol with its defaults (compiled.choose asks it)."""


def test_the_choices_that_config_holds_match_the_modules_that_use_them():
    """config holds the values the CLI shows at parse time, where no torch is imported yet."""
    assert data.Binarize.MODES is config.BINARIZE  # one home, read by data
    for mode in config.COMPILE_MODES:  # every mode the CLI offers is one compiled.choose takes
        assert compiled.choose(mode, _Guide(), 10).reason.startswith(f"compile {mode}")


def test_the_run_setting_reaches_every_local_fit():
    assert local_fit_options(Config(compile="off"))["compile"] == "off"
    assert local_fit_options(Config(), {"compile": "on"})["compile"] == "on"  # the caller's
    assert local_fit_options(Config(local_family="full"))["family"] == "full"


def test_beta_is_refused_in_one_place_with_one_message():
    """Config.validate, train.fit's schedule and a Pyro ELBO handed beta= all give the one
    refusal (config.refuse_beta); an objective built from a Config has no beta of its own."""
    import pyro

    from ppl_vae import objectives, train
    from ppl_vae.build import build_objective
    from ppl_vae.errors import UserError
    with pytest.raises(UserError) as from_config:
        Config(objective="iwae", beta=0.5).validate()
    with pytest.raises(UserError) as from_fit:
        train._beta_schedule(objectives.IWAE(2), 0.5, 0, 10)
    wrapped = objectives.PyroObjective(pyro.infer.Trace_ELBO())
    with pytest.raises(UserError) as from_pyro:
        wrapped(None, None, None, beta=0.5)
    tails = {str(e.value).split("; ", 1)[1].split(" has ")[1] for e in (from_config, from_fit,
                                                                        from_pyro)}
    assert len(tails) == 1 and next(iter(tails)).startswith("no KL weight: drop it or use")
    firsts = {str(e.value).split("; ", 1)[0] for e in (from_config, from_fit, from_pyro)}
    assert len(firsts) == 1 and "0.5 weights the KL term" in next(iter(firsts))
    assert build_objective(Config(beta=0.5, compile="off")).beta == 1.0  # the schedule's
    Config(beta=0.5).validate()  # an ELBO takes it
