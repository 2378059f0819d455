"""One rule decides compilation (the training step, q*'s fit, log p(x)), carried as the one
``--compile`` setting; beta refused in one place; report rows name numbers a run has."""
from __future__ import annotations

import pytest
import torch

from conftest import make_linear_gaussian
from ppl_vae import compiled, evaluate, guides, local_fit, nets
from ppl_vae.config import Config, local_fit_options


def test_the_rule_compiles_on_always_off_never_auto_from_its_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    assert compiled.compiles("on", 0, 10) and not compiled.compiles("off", 10 ** 9, 10)
    assert compiled.compiles("auto", 10, 10) and not compiled.compiles("auto", 9, 10)
    assert [compiled.mode_of(c) for c in (None, True, False, "off")] == ["auto", "on", "off",
                                                                        "off"]
    monkeypatch.setattr(compiled, "has_compiler", lambda: False)
    assert not compiled.compiles("auto", 10 ** 9, 10) and compiled.compiles("on", 0, 10)
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        compiled.compiles("sometimes", 1, 1)


def test_the_run_setting_reaches_every_local_fit():
    assert local_fit_options(Config(compile="off"))["compile"] == "off"
    assert local_fit_options(Config(), {"compile": "on"})["compile"] == "on"  # the caller's
    assert local_fit_options(Config(local_family="full"))["family"] == "full"


def _spy(monkeypatch):
    """Record where q*'s fit and log p(x) would compile (and run them eagerly)."""
    seen = []
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    monkeypatch.setattr(compiled, "PAYS_FROM_LOCAL_ROWS", 1)
    monkeypatch.setattr(compiled, "PAYS_FROM_LOG_PX_ROWS", 1)
    monkeypatch.setattr(evaluate, "PAYS_FROM_LOG_PX_ROWS", 1)
    monkeypatch.setattr(local_fit._CompiledFit, "get",
                        classmethod(lambda cls, *a: seen.append("q*") or None))
    monkeypatch.setattr(evaluate, "Compiled", lambda fn: seen.append("log p(x)") or fn)
    return seen


@pytest.mark.parametrize("mode, compiled_pieces", [("off", []), ("auto", ["q*", "log p(x)"]),
                                                   ("on", ["q*", "log p(x)"])])
def test_compile_off_reaches_q_star_and_log_px(monkeypatch, mode, compiled_pieces):
    seen = _spy(monkeypatch)
    lg = make_linear_gaussian(seed=3)
    x = lg.sample(6, seed=1)
    guide = guides.AmortizedNormal(nets.Encoder(lg.D, (8,), lg.L))
    evaluate.evaluate_model(lg.model, guide, x, num_particles=4, local=True, progress=False,
                            proposal="local", local_options={"compile": mode, "max_steps": 4})
    assert sorted(set(seen)) == sorted(compiled_pieces)


def test_train_compile_off_compiles_nothing_anywhere(monkeypatch, tmp_path, cached_mnist):
    """From the command line: a mean-field run (q* fitted for validation, the test ELBO and
    its evaluation) with --compile off compiles no step, no fit of q* and no log p(x);
    the same run with --compile on compiles all three."""
    from ppl_vae import cli
    seen = _spy(monkeypatch)
    steps = []
    original = compiled.Compiled.__init__

    def init(self, objective, *a, **k):
        steps.append(type(objective).__name__)
        original(self, objective, *a, **k)
    monkeypatch.setattr(compiled.Compiled, "__init__", init)
    monkeypatch.setattr(compiled.Compiled, "value_and_grad", lambda *a, **k: None)  # eager
    base = ["train", "--guide", "meanfield", "--train-size", "200", "--valid-size", "20",
            "--test-size", "20", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
            "--batch-size", "100", "--no-progress"]
    assert cli.main(base + ["--compile", "off", "--out", str(tmp_path / "off")]) == 0
    assert cli.main(["evaluate", str(tmp_path / "off"), "--num-particles-eval", "3",
                     "--no-progress"]) == 0
    assert (seen, steps) == ([], [])
    assert cli.main(base + ["--compile", "on", "--out", str(tmp_path / "on")]) == 0
    assert cli.main(["evaluate", str(tmp_path / "on"), "--num-particles-eval", "3",
                     "--no-progress"]) == 0
    assert {"q*", "log p(x)"} <= set(seen) and steps


def test_local_inference_takes_the_mode_as_the_setting_names_it(monkeypatch):
    seen = _spy(monkeypatch)
    lg = make_linear_gaussian(seed=3)
    x = lg.sample(4, seed=1)
    for mode in ("off", "on", None, False, True):
        local_fit.local_inference(lg.model, x, max_steps=2, compile=mode)
    assert seen == ["q*", "q*", "q*"]  # on, auto (None: from 1 row here), True
    assert torch.isfinite(local_fit.local_inference(lg.model, x, max_steps=2).guide.params).all()


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
