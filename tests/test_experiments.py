"""Every experiment script runs in its smoke mode (tiny sizes, seconds)."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run_script(name, args, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.setattr(sys, "argv", [name, *args])
    return runpy.run_path(str(EXPERIMENTS / name), run_name="__main__")


@pytest.mark.parametrize("name", ["likelihoods.py", "objectives.py"])
def test_table_experiments_smoke(name, monkeypatch, tmp_path):
    run_script(name, ["--smoke", "--out", str(tmp_path / "out")], monkeypatch, tmp_path)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("\n") == 2 + 3  # header, rule, three rows
    assert "nan" not in table


def test_meanfield_budget_smoke(monkeypatch, tmp_path):
    run_script("meanfield_budget.py", ["--smoke", "--out", str(tmp_path / "out")], monkeypatch,
               tmp_path)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("\n") == 2 + 3 and "nan" not in table


def test_long_compare_smoke(monkeypatch, tmp_path):
    run_script("long_compare.py", ["--smoke", "--out", str(tmp_path / "out")], monkeypatch,
               tmp_path)
    import json
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["meanfield"]["amortization_gap"] is None
    assert doc["amortized"]["approximation_gap"] == pytest.approx(
        doc["amortized"]["test_log_px"] - doc["amortized"]["test_elbo_local"], abs=1e-3)


def test_local_inference_smoke(monkeypatch, tmp_path, capsys):
    run_script("local_inference.py", ["--smoke"], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert '"difference"' in out


def test_bench_smoke(monkeypatch, tmp_path):
    run_script("bench.py", ["--smoke", "--batch-sizes", "16", "--repeats", "3", "--out",
                            str(tmp_path / "bench.json")], monkeypatch, tmp_path)
    import json
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert list(doc["cpu"]["ms_per_step"]) == ["16"] and doc["settings"]["repeats"] == 3
    row = doc["cpu"]["ms_per_step"]["16"]
    assert row["hand-written PyTorch"] > 0 and row["ppl_vae amortized"] > 0


@pytest.mark.slow  # a q* compile: about 10 s
def test_bench_eval_smoke_records_the_settings_it_ran(monkeypatch, tmp_path):
    run_script("bench.py", ["--smoke", "--part", "eval", "--out", str(tmp_path / "be.json")],
               monkeypatch, tmp_path)
    import json
    doc = json.loads((tmp_path / "be.json").read_text())
    ran = doc["cpu_eval"]["log_px_setting"]
    assert doc["settings"] == {"q_rows": 20, "repeats": 1, "logpx_k": 10, "logpx_rows": 20,
                               "logpx_repeats": 1}  # the eval's, not the step bench's
    assert (ran["rows"], ran["K"], doc["cpu_eval"]["q_rows"]) == (20, 10, 20)
    assert doc["cpu_eval"]["log_px_over_floor"] > 0


@pytest.mark.slow  # four launches, two of them torchrun with 2 processes
def test_bench_distributed_smoke(monkeypatch, tmp_path):
    run_script("bench_distributed.py", ["--smoke", "--out", str(tmp_path / "bd.json")],
               monkeypatch, tmp_path)
    import json
    res = json.loads((tmp_path / "bd.json").read_text())["results"]
    assert res["meanfield/2"]["table_rows_per_process"] == 128  # 256 rows over 2 processes
    assert res["meanfield/1"]["table_rows_per_process"] == 256
    assert res["amortized/2"]["allreduce_ms"] > 0 and res["amortized/1"]["allreduce_ms"] is None
    waits = res["meanfield/2"]["in_step_allreduce_ms"]  # each process's time in the all-reduce
    assert len(waits) == 2 and all(0 < w < res["meanfield/2"]["step_ms"] for w in waits)
    assert res["meanfield/1"]["in_step_allreduce_ms"] is None
    one, two = res["amortized/1"], res["amortized/2"]  # the bound the all-reduce sets
    assert two["speedup_bound"] == pytest.approx(
        2 * one["step_ms"] / (one["step_ms"] + two["allreduce_ms"]))
    assert two["speedup_bound"] < 2 and one["speedup_bound"] is None


def test_cremer_smoke_writes_the_gap_table_and_curves(monkeypatch, tmp_path):
    """The paper's protocol at toy size: three guides, gap rows for training and test rows,
    gap curves tracked during training, and --resume of a finished protocol rescoring it."""
    out = tmp_path / "out"
    run_script("cremer.py", ["--smoke", "--out", str(out)], monkeypatch, tmp_path)
    import json
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["guide"], r["rows"].split()[0]): r for r in doc["rows"]}
    assert set(rows) == {(g, s) for g in ("amortized", "iaf", "meanfield")
                         for s in ("train", "test")}
    for (guide, split), r in rows.items():
        assert r["approximation_gap"] == pytest.approx(r["log_px"] - r["elbo_local"], abs=1e-3)
        assert (r["rows"], r["num_particles"]) == (f"{split} 20", 10)  # the smoke's scoring
    # the factorized Gaussian and the flow (q* a per-datapoint flow) have an amortization
    # gap on both; the mean-field table has one on its own training rows only
    assert rows["amortized", "test"]["amortization_gap"] is not None
    assert rows["iaf", "test"]["amortization_gap"] is not None
    assert (rows["iaf", "test"]["local_family"], rows["amortized", "test"]["local_family"]) \
        == ("flow", "diagonal")
    assert rows["meanfield", "train"]["amortization_gap"] is not None
    assert rows["meanfield", "test"]["amortization_gap"] is None
    gaps = [json.loads(line) for line in (out / "amortized" / "gaps.jsonl").read_text().splitlines()]
    assert {g["split"] for g in gaps} == {"train", "test"} and gaps[0]["epoch"] == 1
    assert (out / "gap_curves.png").stat().st_size > 10_000  # a drawn figure, not an empty file
    config = json.loads((out / "amortized" / "config.json").read_text())["config"]
    assert config["activation"] == "elu" and config["lr_schedule"] == "burda"
    assert config["adam_eps"] == 1e-4 and config["warmup_epochs"] == 1
    first = json.loads((out / "amortized" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["beta"] < 1.0  # the warm-up weighted the KL term
    run_script("cremer.py", ["--smoke", "--resume", "--out", str(out)], monkeypatch, tmp_path)


def test_gap_controls_smoke_changes_one_choice_per_row(monkeypatch, tmp_path):
    import json
    run_script("gap_controls.py", ["--smoke", "--out", str(tmp_path / "out")], monkeypatch,
               tmp_path)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 7 and "nan" not in (tmp_path / "out" / "table.md").read_text()
    ours, short, fresh, strict, k_small, from_q, k_many = rows
    for r in rows:  # the gaps are the paired differences of the row's own columns (float32)
        assert r["approximation_gap"] == pytest.approx(r["log p(x)"] - r["L[q*]"], abs=1e-3)
        assert r["amortization_gap"] == pytest.approx(r["L[q*]"] - r["L[q]"], abs=1e-3)
    # each row changes only its own choice: the encoder's L[q] and our q* stay where they are
    assert {r["L[q]"] for r in rows[:-1]} == {ours["L[q]"]}
    for r in (k_small, from_q):
        assert r["L[q*]"] == ours["L[q*]"] and r["log p(x)"] != ours["log p(x)"]
    for r in (short, fresh, strict):
        assert r["L[q*]"] != ours["L[q*]"]
    assert strict["q*_steps"] > ours["q*_steps"]
    assert k_many["L[q]"] != ours["L[q]"] and k_many["log p(x)"] == ours["log p(x)"]
    # --split train: the same run scored on its own training rows (as it trained on them)
    run_script("gap_controls.py", ["--run", str(tmp_path / "out" / "trained"), "--split",
                                   "train", "--rows", "20", "--num-particles", "20",
                                   "--local-steps", "30", "--out", str(tmp_path / "train")],
               monkeypatch, tmp_path)
    doc = json.loads((tmp_path / "train" / "results.json").read_text())
    assert doc["split"] == "train" and doc["rows_scored"] == 20
    assert doc["rows"][0]["L[q]"] != ours["L[q]"]


def test_cremer_binarize_static_trains_and_scores_on_one_draw(monkeypatch, tmp_path):
    """--binarize static trains and scores training rows on one draw; --warmup-epochs 0
    and --warmup-term entropy (in the same run, to save one) train without a warm-up, with
    the authors' objective named as a user piece."""
    import json
    from ppl_vae import data
    from ppl_vae.heldout import eval_pixels, train_pixels
    from ppl_vae.run_setup import load_trained
    out = tmp_path / "out"
    run_script("cremer.py", ["--smoke", "--guides", "amortized", "--binarize", "static",
                             "--warmup-epochs", "0", "--warmup-term", "entropy",
                             "--out", str(out)], monkeypatch, tmp_path)
    config = json.loads((out / "amortized" / "config.json").read_text())["config"]
    assert config["binarize"] == "static" and config["warmup_epochs"] == 0
    assert config["objective"] == "cremer:EntropyWarmupELBO"  # built by name, recorded
    table = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["rows"], r["num_particles"]) for r in table] == [("train 20", 10), ("test 20", 10)]
    first = json.loads((out / "amortized" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["beta"] == 1.0  # no warm-up: the whole KL term from the first step
    trained = load_trained(out / "amortized", trust_code=True)  # cremer:EntropyWarmupELBO
    scored = train_pixels(trained.config, trained.splits.train)  # the gap rows' training pixels
    trained_on = data.Binarize("static").prepare(trained.splits.train, trained.config.seed).x
    assert torch.equal(scored, trained_on)  # the run's one draw, not the held-out draw:
    assert not torch.equal(scored, eval_pixels(trained.config, trained.splits.train))


def test_the_authors_warmup_weights_only_log_q(monkeypatch):
    """cremer.EntropyWarmupELBO: E_q[log p(x, z)] - beta E_q[log q], so on the same draws it
    exceeds our KL-weighted bound by (1 - beta) E_q[log p(z)], and equals it at beta = 1."""
    import pyro
    from ppl_vae import guides, nets, objectives
    from ppl_vae.batching import Batch
    from ppl_vae.likelihoods import Bernoulli
    from ppl_vae.model import VAEModel
    from ppl_vae.priors import StandardNormal
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    from cremer import EntropyWarmupELBO
    torch.manual_seed(0)
    model = VAEModel(nets.Decoder(3, [8], 12), Bernoulli(), StandardNormal(3))
    guide = guides.AmortizedNormal(nets.Encoder(12, [8], 3))
    x = torch.bernoulli(torch.full((5, 12), 0.4))
    batch = Batch(x, torch.arange(5), 5)

    def on_seed(fn):
        pyro.set_rng_seed(1)
        return fn()
    for beta in (0.3, 1.0):
        ours = on_seed(lambda: objectives.ELBO(3).per_datapoint(model, guide, batch, beta=beta))
        theirs = on_seed(lambda: EntropyWarmupELBO(3).per_datapoint(model, guide, batch,
                                                                    beta=beta))
        prior = on_seed(lambda: objectives.log_weights(model, guide, batch, 3).log_prior)
        torch.testing.assert_close(theirs - ours, (1 - beta) * prior.mean(0))
    assert not torch.allclose(prior, torch.zeros_like(prior))
