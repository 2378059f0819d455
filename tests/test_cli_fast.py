"""The command line answers --help and usage errors without importing torch (seconds saved on
every typo), and ``main`` still maps the errors of the modules it imports later."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ppl_vae import (cli, compiled, config, data, distributed, guides, loopstate, objectives,
                     registry, step)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_help_of_every_command_imports_no_torch():
    run = _python("""
        import contextlib, io, sys
        from ppl_vae import cli
        parser = cli.build_parser()
        for argv in ([], ["train"], ["evaluate"], ["compare"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    parser.parse_args(argv + ["--help"])
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)
            assert "usage: ppl-vae" in out.getvalue(), argv
        loaded = sorted(m for m in ("torch", "pyro", "numpy") if m in sys.modules)
        print("loaded:", loaded)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "loaded: []", run.stdout


@pytest.mark.parametrize("argv", [["train", "--epochs", "abc"], ["bogus"], [],
                                  ["compare", "--guides", ","], ["evaluate"],
                                  ["train", "--out", ""], ["train", "--max-steps", "x"]])
def test_a_usage_error_exits_2_on_one_line_without_torch(argv):
    run = _python(f"""
        import sys
        from ppl_vae import cli
        code = cli.main({argv!r})
        print(code, "torch" in sys.modules, "pyro" in sys.modules)
    """)
    assert run.stdout.strip() == "2 False False", (run.stdout, run.stderr)
    assert run.stderr.startswith("error: ppl-vae") and run.stderr.count("\n") == 1, run.stderr


def test_the_command_itself_answers_help_and_usage_errors():
    help_ = subprocess.run([sys.executable, "-m", "ppl_vae", "train", "--help"],
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--epochs" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "ppl_vae", "train", "--epochs", "abc"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr == "error: ppl-vae train: argument --epochs: invalid int value: 'abc'\n"


def test_compare_help_hides_guide_and_still_refuses_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--guide " not in text and "--guide\n" not in text and "--guides" in text
    assert cli.main(["compare", "--guide", "meanfield", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guides meanfield" in err
    assert not (tmp_path / "c").exists()


def test_compare_defaults_to_the_default_guides():
    from ppl_vae.compare import DEFAULT_GUIDES
    args = cli.build_parser().parse_args(["compare", "--guide", "iaf"])
    assert args.guides is None  # filled in by the command from compare.DEFAULT_GUIDES
    assert list(DEFAULT_GUIDES) == ["amortized", "semiamortized", "meanfield"]


def test_the_choices_that_config_holds_match_the_modules_that_use_them():
    """config holds the values the CLI shows at parse time, where no torch is imported yet."""
    assert data.Binarize.MODES is config.BINARIZE  # one home, read by data
    for mode in config.COMPILE_MODES:  # every mode the CLI offers is one compiled.choose takes
        assert compiled.choose(mode, object(), 10).reason.startswith(f"compile {mode}")


def test_pieces_named_in_the_registries_import_on_demand():
    assert registry.GUIDES.resolve("amortized").piece is guides.AmortizedNormal
    assert registry.GUIDES.resolve("meanfield").piece is guides.LocalNormal
    assert registry.OBJECTIVES.resolve("iwae").piece is objectives.IWAE
    assert registry.OBJECTIVES.resolve("Trace_ELBO").piece is objectives.PyroObjective
    assert getattr(registry.LIKELIHOODS.resolve("bernoulli"), "piece", None) is None


@pytest.mark.parametrize("error, code, message", [
    (distributed.RefusedElsewhere("elsewhere"), 2, ""),
    (step.DivergenceError("epoch 3"), 1, "error: training diverged at epoch 3"),
    (loopstate.Interrupted(loopstate.Position(0, 5, 0.0, 0.0, 0.0, 5, 5)), 130,
     "interrupted at epoch 1, step 5"),
])
def test_main_maps_the_errors_of_modules_imported_later(monkeypatch, capsys, error, code,
                                                        message):
    def fail(args):
        raise error
    monkeypatch.setattr(cli, "_command", fail)
    assert cli.main(["evaluate", "somewhere"]) == code
    assert capsys.readouterr().err.startswith(message)
