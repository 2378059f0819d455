"""A seeded fuzz of the command line: every option of ``train`` (taken from the parser, so a
new option is fuzzed without an edit here) with valid and invalid values, plus a few
``evaluate`` and ``compare`` cases. Each case must end in exit 0, or exit 2 with one error
line; never a traceback. Sizes stay tiny unless the case is about a size option."""
from __future__ import annotations

import argparse
import random
import re
import time

import pytest

from ppl_vae import cli

TINY = {"train_size": "60", "valid_size": "10", "test_size": "10", "epochs": "1",
        "hidden": "8", "latent_dim": "2", "batch_size": "30", "gap_rows": "5",
        "gap_particles": "3", "device": "cpu", "num_particles": "1", "refine_steps": "1",
        "inner_steps": "1"}
# valid values worth trying (small, so a case that trains stays fast); others use the default
VALID = {
    "dataset": ["mnist"], "data_dir": ["none"], "binarize": ["dynamic", "static"],
    "latent_dim": ["1", "2", "3"], "hidden": ["8", "4 4"],
    "activation": ["relu", "elu", "tanh", "softplus"],
    "likelihood": ["bernoulli", "continuous_bernoulli"], "prior": ["normal", "mog"],
    "guide": ["amortized", "semiamortized", "iaf", "meanfield"],
    "objective": ["elbo", "analytic_kl", "iwae"], "num_particles": ["1", "2"],
    "beta": ["0", "0.5", "1", "2"], "warmup_epochs": ["0", "1", "3"], "epochs": ["1", "2"],
    "batch_size": ["7", "30", "1000"], "lr": ["1e-3", "0.01", "10"], "adam_eps": ["1e-8", "1"],
    "lr_schedule": ["constant", "burda"], "local_lr": ["0.2", "0.01"],
    "inner_steps": ["0", "1", "2"], "local_init": ["pca", "prior"], "compile": ["auto", "off"],
    "refine_steps": ["0", "1", "2"], "refine_lr": ["0.05", "1"],
    "max_seconds": ["all", "0.5", "100"], "train_size": ["1", "2", "60"],
    "valid_size": ["1", "10"], "test_size": ["1", "10"],
    "on_divergence": ["stop", "lower_lr"], "gap_epochs": ["1", "1 2"],
    "gap_rows": ["1", "5"], "gap_particles": ["1", "3"], "seed": ["0", "1", "4294967295"],
    "device": ["cpu", "auto"],
}
INVALID = ["-1", "0", "inf", "-inf", "nan", "1e30", "99999999999999999999", "abc", "", " ",
           "bogus_name", "1.5", "-0", "0x10", "mypkg:Nope", "None", "[]"]
HUGE_REFUSED = {"latent_dim", "hidden", "lr", "local_lr"}  # huge values must be refused
EXPENSIVE_FLAGS = {"compile", "track_gaps"}  # a compile, a local fit per gap epoch
SIZE_OPTIONS = set(TINY)


def train_options():
    """(dest, flag, kind) of every option of ``train``: kind is bool, list or value."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    options = []
    for action in train._actions:
        if not action.option_strings or action.dest in ("help", "out"):
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            kind = "bool"
        elif action.nargs == 0:
            kind = "flag"
        elif action.nargs == "+":
            kind = "list"
        else:
            kind = "value"
        options.append((action.dest, flag, kind))
    return options


def make_case(rng: random.Random, options, may_train: bool, slow: bool):
    """One argv for train; ``may_train`` False forces at least one invalid value."""
    chosen = rng.sample(options, rng.randint(1, 4))
    values, flags, invalid = dict(TINY), [], False
    must_fail = not may_train
    for i, (dest, flag, kind) in enumerate(chosen):
        bad = rng.random() < 0.4 or (must_fail and i == len(chosen) - 1 and not invalid)
        if kind in ("bool", "flag"):
            if dest in ("overwrite", "resume", "evaluate"):
                flags.append(flag) if rng.random() < 0.5 else None
                continue
            on = rng.random() < 0.5
            if on and dest in EXPENSIVE_FLAGS and not slow:
                on = False
            if bad:  # a value after a switch, or an unknown negation
                flags += [flag, rng.choice(INVALID)] if rng.random() < 0.5 else [
                    "--no-" + flag[2:] + "x"]
                invalid = True
            else:
                flags.append(flag if on else "--no-" + flag[2:])
            continue
        if bad:
            value = rng.choice(INVALID)
            if dest in HUGE_REFUSED and rng.random() < 0.3:
                value = "100000000"
            invalid = invalid or value not in VALID.get(dest, [])
        else:
            value = rng.choice(VALID.get(dest, [None])) or values.get(dest)
            if value is None:
                continue
        values[dest] = value
    argv = ["train"]
    for dest, flag, kind in options:
        if dest in values:
            argv += [flag, *values[dest].split()] if kind == "list" and values[dest].strip() \
                else [flag, values[dest]]
    return argv + flags, invalid


def check(argv, code, out, err):
    """Exit 0, or exit 2 with one error line; never a traceback."""
    where = f"argv: {argv}\nexit {code}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err + out, where
    assert code in (0, 2), where
    if code == 2:
        lines = [s for s in re.split(r"[\r\n]", err) if s.strip()]
        errors = [s for s in lines if s.startswith("error:")]
        assert len(errors) == 1, where
        assert "step/s" in err or err.count("\n") == 1, where  # only a progress bar besides


def run_case(argv, capsys):
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # --help and friends
        code = e.code
    except BaseException as e:  # anything escaping main is a failure: name the argv
        pytest.fail(f"{type(e).__name__}: {e}\nargv: {argv}")
    captured = capsys.readouterr()
    check(argv, code, captured.out, captured.err)
    return code


def fuzz_train(tmp_path, capsys, cases: int, max_trained: int, slow: bool, seed: int = 0):
    rng = random.Random(seed)
    options = train_options()
    tried = trained = rejected = 0
    start = time.perf_counter()
    for i in range(cases):
        argv, _ = make_case(rng, options, may_train=trained < max_trained, slow=slow)
        argv += ["--out", str(tmp_path / f"c{i}")]
        code = run_case(argv, capsys)
        tried += 1
        trained += code == 0
        rejected += code == 2
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nfuzz train: {tried} cases ({trained} trained, {rejected} refused) "
              f"in {seconds:.1f} s")
    return tried, trained


def test_fuzz_train(tmp_path, cached_mnist, capsys):
    tried, trained = fuzz_train(tmp_path, capsys, cases=150, max_trained=5, slow=False)
    assert tried == 150 and trained >= 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_train_many(tmp_path, cached_mnist, capsys, seed):
    tried, trained = fuzz_train(tmp_path, capsys, cases=400, max_trained=40, slow=True,
                                seed=seed)
    assert tried == 400 and trained >= 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import pytest as _pytest
    from ppl_vae import data
    mnist = data.load("mnist")
    out = tmp_path_factory.mktemp("fuzz") / "run"
    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load", lambda name="mnist", data_dir=None, *rest: mnist)
        assert cli.main(["train", *sum(([("--" + k.replace("_", "-")), *v.split()]
                                         for k, v in TINY.items()), []), "--out", str(out)]) == 0
    return out


def test_fuzz_evaluate(tiny_run, tmp_path, cached_mnist, capsys):
    rng = random.Random(0)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    folders = [str(tiny_run), str(tmp_path / "missing"), str(tmp_path / "file"),
               str(tmp_path / "empty"), ""]
    options = {"--num-particles": ["2", "0", "-3", "abc", "inf", ""],
               "--split": ["test", "valid", "train", ""],
               "--proposal": ["auto", "guide", "local", "prior"],
               "--test-size": ["5", "0", "-1", "x", "all"],
               "--device": ["cpu", "tpu", "", "cuda:99"],
               "--local": [None], "--no-local": [None]}
    tried = trained = 0
    start = time.perf_counter()
    for _ in range(40):
        argv = ["evaluate", rng.choice(folders)]
        for flag in rng.sample(list(options), rng.randint(0, 3)):
            value = rng.choice(options[flag])
            argv += [flag] if value is None else [flag, value]
        if argv[1] == str(tiny_run):  # keep a real evaluation small
            if "--num-particles" not in argv:
                argv += ["--num-particles", "2"]
            if "--test-size" not in argv:
                argv += ["--test-size", "5"]
            if "--local" in argv and trained >= 3:
                argv.remove("--local")
        code = run_case(argv, capsys)
        tried += 1
        trained += code == 0
    with capsys.disabled():
        print(f"\nfuzz evaluate: {tried} cases ({trained} evaluated) in "
              f"{time.perf_counter() - start:.1f} s")
    # every case ended in 0 or one line with code 2 (run_case); both kinds occurred
    assert tried == 40 and 1 <= trained < tried


COMPARE_BAD = [
    ["--guides", ""], ["--guides", ","], ["--guides", "bogus"], ["--guides", "amortized,amortized"],
    ["--num-particles-eval", "0"], ["--num-particles-eval", "x"],
    ["--epochs", "0"], ["--lr", "nan"], ["--quick", "--num-particles-eval", "-1"],
    ["--compile", "sometimes"], ["--test-size", "-5"],
]


@pytest.mark.parametrize("extra", COMPARE_BAD, ids=lambda v: " ".join(v) or "empty")
def test_fuzz_compare_refusals(extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--out", str(tmp_path / "cmp"), *extra]
    code = run_case(argv, capsys)
    assert code == 2, argv


# a module:attribute that is not a class (a function of other arguments, a constant) is
# refused with one line; it is never called
NOT_A_BUILDER = [["train", "--likelihood", "os:system"], ["train", "--guide", "math:pi"],
                 ["compare", "--guides", "os:system"],
                 # classes of the wrong role, malformed names, odd classes of torchvision
                 ["train", "--lr-schedule", "builtins:int"], ["train", "--guide", "builtins:object"],
                 ["train", "--likelihood", ".x:Y"], ["train", "--prior", ":"],
                 ["train", "--prior", ":b"], ["train", "--objective", "pyro.infer:RenyiELBO"],
                 ["train", "--guide", "ppl_vae.likelihoods:Bernoulli"],
                 ["train", "--dataset", "torchvision:__class__"],
                 ["train", "--dataset", "torchvision:VisionDataset"]]


@pytest.mark.parametrize("argv", NOT_A_BUILDER, ids=lambda v: " ".join(v))
def test_a_module_attribute_that_is_not_a_builder(argv, tmp_path, cached_mnist, capsys):
    argv = argv + ["--out", str(tmp_path / "o"), "--device", "cpu", "--train-size", "60",
                   "--valid-size", "10", "--test-size", "10", "--epochs", "1", "--hidden", "8",
                   "--latent-dim", "2"]
    assert run_case(argv, capsys) == 2
