"""ppl_vae.config: the settings' rules: bad numbers are one line, the seed range, the
resumable settings, and the choices config holds for the CLI matching the modules using them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ppl_vae import compiled, config, config as c, data, run_setup
from ppl_vae.config import Config
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


def test_the_choices_that_config_holds_match_the_modules_that_use_them():
    """config holds the values the CLI shows at parse time, where no torch is imported yet."""
    assert data.Binarize.MODES is config.BINARIZE  # one home, read by data
    for mode in config.COMPILE_MODES:  # every mode the CLI offers is one compiled.choose takes
        assert compiled.choose(mode, object(), 10).reason.startswith(f"compile {mode}")
