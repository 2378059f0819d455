"""A seeded fuzz of the command line: every option of ``train`` (taken from the parser, so a
new option is fuzzed without an edit here) with valid and invalid values, plus a few
``evaluate`` and ``compare`` cases. Each case must end in exit 0, or exit 2 with one error
line; never a traceback. Sizes stay tiny unless the case is about a size option."""
from __future__ import annotations

import argparse
import json
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
    options = {"--num-particles-eval": ["2", "0", "-3", "abc", "inf", ""],
               "--split": ["test", "valid", "train", ""],
               "--proposal": ["auto", "guide", "local", "prior"],
               "--rows": ["5", "0", "-1", "x", "all"],
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
            if "--num-particles-eval" not in argv:
                argv += ["--num-particles-eval", "2"]
            if "--rows" not in argv:
                argv += ["--rows", "5"]
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


# ---------------------------------------------------------------------------------------
# issue 32.4: hostile run folders. A checkpoint's fields and the run folder's files hold
# anything; every command that reads them ends in 0 or one error line, and never hangs
# ---------------------------------------------------------------------------------------
import os
import shutil
import signal
import sys

HOSTILE_VALUES = [None, [], ["x:G"], {}, {"foo": 1}, "", "abc", "7", "x:G", "Amortized",
                  -1, 0, 7, 10 ** 20, -(10 ** 20), 1.5, float("nan"), float("inf"), True,
                  [1, 2], {"epoch": "1"}]


def isolated(argv, seconds: int = 90):
    """``cli.main(argv)`` in a forked process: (exit code, stdout, stderr); the code is None
    when it was still running after ``seconds`` (a hang: a named pipe opened for reading
    blocks in C code, where no signal handler of this process could end it)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        pid = os.fork()
        if pid == 0:  # the child: run the command, report its exit code
            code = 99
            try:
                import torch
                torch.set_num_threads(1)  # the parent's thread pool is not the child's
                with open(out_path, "w") as out, open(err_path, "w") as err:
                    sys.stdout, sys.stderr = out, err
                    try:
                        code = cli.main(argv)
                    except SystemExit as e:
                        code = e.code
                    except BaseException:  # noqa: BLE001 - a traceback: shown, code 98
                        import traceback
                        traceback.print_exc(file=err)
                        code = 98
                    out.flush(), err.flush()
            finally:
                os._exit(code if isinstance(code, int) else 97)
        end = time.monotonic() + seconds
        status = None
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
        with open(out_path) as f:
            out = f.read()
        with open(err_path) as f:
            err = f.read()
    return (None if status is None else os.waitstatus_to_exitcode(status)), out, err


def run_isolated(argv, seconds: int = 90):
    """``isolated``, checked as ``check`` does: exit 0, or 2 with one error line; no hang."""
    code, out, err = isolated(argv, seconds)
    assert code is not None, f"argv: {argv}\nstill running after {seconds} s (a hang)\n{err[-2000:]}"
    check(argv, code, out, err)
    return code, err


def _fresh(tiny_run, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(tiny_run, folder)
    return folder


def _set_field(folder, path, value):
    """``path`` (a key, or (key, subkey)) of both checkpoints set to ``value``."""
    import torch
    for file in ("checkpoint.pt", "checkpoint.prev.pt"):
        if not (folder / file).exists():
            continue
        state = torch.load(folder / file, weights_only=True)
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        torch.save(state, folder / file)


def _replace(folder, name, how):
    """The run folder's file ``name`` replaced by something hostile."""
    path = folder / name
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "folder":
        path.mkdir()
    elif how == "devzero":
        path.symlink_to("/dev/zero")
    elif how == "dangling":
        path.symlink_to(folder / "nowhere")
    elif how == "list":
        path.write_text("[1, 2]")
    elif how == "garbage":
        path.write_bytes(b"\x00\xff{not json")
    elif how == "empty":
        path.write_text("")
    elif how == "hugepid":
        path.write_text(f"{10 ** 20}\ntrain\n")
    elif how == "wrongtypes":
        path.write_text(json.dumps({"epochs": "2", "test_elbo": [1], "resumes": "x",
                                    "config": 3, "rows": None}))


def _command(folder, command):
    if command == "evaluate":
        return ["evaluate", str(folder), "--num-particles-eval", "2", "--rows", "5"]
    return ["train", *sum(([("--" + k.replace("_", "-")), *v.split()] for k, v in TINY.items()),
                          []), "--out", str(folder), "--resume", "--epochs", "3"]


def _untouched_unless_accepted(folder, before, code):
    if code == 2:  # a refusal writes nothing
        now = {p.name: p.read_bytes() for p in folder.iterdir()
               if p.is_file() and not p.is_symlink() and p.stat().st_size < 10 ** 7}
        assert {k: v for k, v in now.items() if k in before} == \
            {k: v for k, v in before.items() if k in now}


SPECIFIC = [  # the cases of the issue, each refused in one line naming the file or field
    ("checkpoint.pt", "fifo", None), ("summary.json", "fifo", None),
    ("summary.json", "list", None), (".running", "hugepid", None),
    ("config", ("config", "guide"), ["x:G"]), ("config", ("config", "seed"), "7"),
    ("config", ("position",), {"foo": 1}), ("config", ("world_size",), "abc"),
]
CASES = [pytest.param(*case, command, id=f"{case[0]}-"
                      f"{case[1] if isinstance(case[1], str) else case[1][-1]}-{command}")
         for case in SPECIFIC for command in ("evaluate", "resume")
         # a resume does not read the summary it replaces
         if not (case[:2] == ("summary.json", "list") and command == "resume")]


@pytest.mark.parametrize("name, how, value, command", CASES)
def test_a_hostile_run_folder_is_one_line(tiny_run, tmp_path, cached_mnist, capsys, name, how,
                                          value, command):
    folder = _fresh(tiny_run, tmp_path, "hostile")
    if name == "config":
        _set_field(folder, how, value)
        said = how[-1]
    else:
        _replace(folder, name, how)
        said = name
    if (folder / "checkpoint.pt").is_file():
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    else:
        before = {}
    argv = _command(folder, command)
    code, err = run_isolated(argv, 90)
    assert code == 2, argv
    assert said in err, err  # the one line names the file or field at fault
    _untouched_unless_accepted(folder, before, code)


FILES = ["checkpoint.pt", "checkpoint.prev.pt", "summary.json", "config.json", "metrics.jsonl",
         "eval.json", "gaps.jsonl", ".running", ".ppl_vae", "checkpoint.pt.tmp",
         "config.json.tmp"]
HOW = ["fifo", "folder", "devzero", "dangling", "list", "garbage", "empty", "hugepid",
       "wrongtypes"]
FIELDS = [("config", "guide"), ("config", "seed"), ("config", "latent_dim"), ("config", "hidden"),
          ("config", "compile"), ("config", "lr"), ("config", "train_size"),
          ("config", "dataset"), ("config", "gap_epochs"), ("position",), ("world_size",),
          ("history",), ("resumes",), ("rng",), ("binarize_rng",), ("optimizers",),
          ("valid_guide",), ("rng_ranks",), ("model",)]


def test_fuzz_hostile_run_folders(tiny_run, tmp_path, cached_mnist, capsys):
    """Seeded: a file of the run folder replaced (a named pipe, a folder, a link to
    /dev/zero, JSON of the wrong shape, ...) or a checkpoint field set to a value of the
    wrong kind, then evaluate or resume; 0 or one error line, within the deadline."""
    rng = random.Random(32)
    refused = accepted = 0
    for i in range(36):
        folder = _fresh(tiny_run, tmp_path, f"h{i}")
        if rng.random() < 0.5:
            _replace(folder, rng.choice(FILES), rng.choice(HOW))
        else:
            _set_field(folder, rng.choice(FIELDS), rng.choice(HOSTILE_VALUES))
        argv = _command(folder, rng.choice(["evaluate", "resume"]))
        code, _ = run_isolated(argv, 90)
        refused += code == 2
        accepted += code == 0
    with capsys.disabled():
        print(f"\nfuzz hostile folders: {refused} refused, {accepted} accepted")
    assert refused > 0
