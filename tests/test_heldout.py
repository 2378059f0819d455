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
