"""The ``ppl-vae`` command: train, evaluate and compare.

Every user error is one line on stderr and exit code 2; options map one-to-one onto
``Config`` fields, so the CLI and the Python API cannot drift apart. Importing this module
imports no torch: ``--help`` and usage errors answer at once, and a command imports the
modules it runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

from . import logs
from .config import Config, check_particles
from .errors import UserError
from .registry import REGISTRIES

HELP = {
    "dataset": "mnist, fashion_mnist, kmnist, a folder of IDX files, a .npz/.npy file of images, "
               "or torchvision:<Class> (files already under --data-dir); see README",
    "data_dir": "folder with the dataset's raw files (default: shipped MNIST; ~/.cache/ppl_vae "
                "for fashion_mnist, kmnist, torchvision:<Class>)",
    "valid_fraction": "fraction of the training rows held out for validation (default: 1/6, "
                      "MNIST's 10,000 of 60,000)",
    "test_fraction": "fraction of the rows held out for testing when the data have no test split",
    "net": "encoder/decoder: mlp, or conv (stride-2 convolutions built from the image shape)",
    "tensorboard": "also write TensorBoard events to <out>/tensorboard (needs the tensorboard extra)",
    "binarize": "dynamic: fresh Bernoulli draw per minibatch; static: one seeded draw; none: grayscale",
    "latent_dim": "dimension of z", "hidden": "hidden layer sizes of decoder (and encoder, reversed)",
    "activation": "activation of the hidden layers",
    "likelihood": "p(x|z)", "prior": "p(z)",
    "guide": "amortized (encoder), meanfield (per-datapoint table), semiamortized (encoder + "
             "gradient refinement) or iaf (encoder + flows)",
    "objective": "training objective", "num_particles": "particles of the training objective",
    "dreg": "doubly reparameterized gradients for --objective iwae",
    "beta": "KL weight of the ELBO objectives", "warmup_epochs": "linear KL warm-up from 0 to beta",
    "epochs": "training epochs", "batch_size": "minibatch size", "lr": "Adam learning rate of the networks",
    "adam_eps": "Adam's epsilon", "lr_schedule": "constant, or burda: 3^i epochs at lr * 10^(-i/7), i = 0..7",
    "refine_steps": "semiamortized: gradient steps from the encoder's output",
    "refine_lr": "semiamortized: step size of the refinement",
    "refine_stop_gradient": "semiamortized: no gradient through the refinement; the encoder "
                            "trains on its own ELBO",
    "track_gaps": "score L[q], L[q*], log p(x) and both gaps on training and test rows at "
                  "gap-epochs (gaps.jsonl, gaps.png)",
    "gap_epochs": "epochs at which --track-gaps scores (and the last)",
    "gap_rows": "training and test rows of the gap curves", "gap_particles": "K of log p(x) in the gap curves",
    "local_family": "family of q*, the per-datapoint fit that L[q*] and both gaps use: own (the "
                    "guide's own family, its local_family; diagonal for the built-in Normal "
                    "guides, a per-datapoint flow for iaf), diagonal, full (a per-row Cholesky "
                    "factor), lowrank[:R] or flow[:T[xH]] (T IAF steps, H hidden units, per row)",
    "local_lr": "meanfield: learning rate of the per-datapoint table",
    "inner_steps": "meanfield: local-only steps per minibatch before each joint step",
    "local_init": "meanfield: start rows at the data's principal-component scores (pca) or at N(0, I)",
    "on_divergence": "on a non-finite loss: stop with the last good checkpoint, or lower_lr (halve rates, go on)",
    "max_seconds": "stop training once this much training time has passed",
    "max_steps": "stop training after this many optimizer steps (a budget in counts, like epochs)",
    "train_size": "use only the first N training rows", "valid_size": "validation rows scored each epoch",
    "test_size": "evaluate on the first N test rows only",
    "seed": "seed of initialization, data order and noise (0 to 4294967295)",
    "device": "auto (CUDA when available), cpu or cuda[:N]",
    "compile": "compile with torch.compile the training step (every built-in guide), the fits "
               "of q* and the log p(x) estimate: on, off (all three eager), or auto: each "
               "where a C++ compiler is present and its work repays the compile (a run of at "
               "least 2,000 steps, and a --max-seconds of at least 120; q* on 1,000 rows or "
               "more; log p(x) over 2,000,000 decoder rows or more); the run says what it chose "
               "for the step",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _add_config(parser: argparse.ArgumentParser, defaults: Config, unlisted=()) -> None:
    """An option per ``Config`` field; those in ``unlisted`` are parsed but not shown in --help."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = f.type if isinstance(f.type, str) else str(f.type)
        help_ = HELP.get(f.name, "")
        if "(default" not in help_:
            help_ += f" (default: {default})"
        if f.name in unlisted:
            help_ = argparse.SUPPRESS
        if f.name in ("hidden", "gap_epochs"):
            parser.add_argument(flag, type=int, nargs="+", default=list(default), help=help_)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_)
        else:
            choices = _choices(f.name)
            typ = int if "int" in kind else float if "float" in kind else str
            if "Optional" in kind and typ is not str:
                typ = _optional(typ)
                if f.name != "valid_fraction":
                    help_ = help_.replace(" (default", "; 'all' for no limit (default")
                    help_ = help_.replace("(default: None)", "(default: all)")
            parser.add_argument(flag, type=typ, default=default, help=help_,
                                metavar=("{" + ",".join(choices) + "}") if choices else None)


def _optional(typ):
    """A number, or ``all``/``none`` for no limit (None)."""
    def parse(text: str):
        if text.lower() in ("all", "none"):
            return None
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None
    parse.__name__ = typ.__name__
    return parse


def _choices(name: str):
    from . import config as c
    tables = {"binarize": c.BINARIZE, "local_init": c.LOCAL_INIT, "on_divergence": c.ON_DIVERGENCE,
              "compile": c.COMPILE_MODES}
    for registry in REGISTRIES:
        tables[registry.field] = registry.names() + ("module:attr",)
    return tables.get(name)


def _config(args) -> Config:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    values["hidden"], values["gap_epochs"] = tuple(values["hidden"]), tuple(values["gap_epochs"])
    return Config(**values).validate()


_UNSET = object()


def parse(argv, unset: bool = False) -> argparse.Namespace:
    """``argv`` parsed, over the settings of its ``--config`` file (flags override the file);
    ``unset``: the options neither gives are ``_UNSET``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = parser.commands.get(args.command)
    if command is None:
        return args
    if unset:
        command.set_defaults(**{a.dest: _UNSET for a in command._actions
                                if a.option_strings and a.dest != "help"})
    if getattr(args, "config", None) is not None:
        from . import config_file
        command.set_defaults(**config_file.defaults(args.config, command, args.command))
    return parser.parse_args(argv) if unset or getattr(args, "config", None) is not None else args


def _explicit(argv) -> dict:
    """Every option that ``argv`` (and its ``--config`` file) gives explicitly, by dest
    (argparse fills in the others)."""
    return {key: value for key, value in vars(parse(argv, unset=True)).items()
            if value is not _UNSET}


def _given(argv, command: str) -> dict:
    """The settings that ``argv`` (and its ``--config`` file) give explicitly, as ``Config``
    values: what a ``--resume`` lays over the run's own settings."""
    explicit = _explicit(argv)
    given = {f.name: explicit[f.name] for f in dataclasses.fields(Config) if f.name in explicit}
    for key in ("hidden", "gap_epochs"):
        if key in given:
            given[key] = tuple(given[key])
    return given


NO_PROGRESS = ("--no-progress",)
NO_PROGRESS_KW = dict(dest="progress", action="store_false",
                      help="no progress bars (they are drawn only on a terminal anyway)")


CONFIG = ("--config",)
CONFIG_KW = dict(type=Path, default=None, metavar="FILE",
                 help="settings from a .toml or .json file (a run's own config.json re-runs "
                      "it, and for compare a comparison's results.json); flags given here "
                      "override it")

TRUST_CODE = ("--trust-code",)
TRUST_CODE_KW = dict(action="store_true",
                     help="import the module:Class names that a run folder's checkpoint gives "
                          "(--resume, evaluate); importing runs their code, so pass it only for "
                          "a folder whose author you trust")


def build_parser() -> Parser:
    """Why so long: one ``add_argument`` per option of the three commands, in the order
    ``--help`` lists them, so the command line reads as one declaration."""
    p = Parser(prog="ppl-vae", description="VAEs as Pyro programs: amortized vs mean-field SVI.")
    sub = p.add_subparsers(dest="command", parser_class=Parser, required=True)

    t = sub.add_parser("train", help="train one model and score it on the test set")
    _add_config(t, Config())
    t.add_argument(*CONFIG, **CONFIG_KW)
    t.add_argument("--out", type=_folder, default=Path("runs/train"),
                   help="run folder (default: runs/train)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its own settings; give only what "
                        "changes (--epochs, --lr, ...)")
    t.add_argument("--evaluate", action="store_true",
                   help="run `evaluate` (log p(x), figures) at the end")
    t.add_argument("--num-particles-eval", type=int, default=5000, help="K of log p(x) with --evaluate (default 5000)")
    t.add_argument(*TRUST_CODE, **TRUST_CODE_KW)
    t.add_argument(*NO_PROGRESS, **NO_PROGRESS_KW)

    e = sub.add_parser("evaluate", help="log p(x), gaps, rate/distortion, figures of a run")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--num-particles-eval", type=int, default=5000,
                   help="K of log p(x) (default 5000)")
    e.add_argument("--num-particles", type=int, default=None, dest="old_num_particles",
                   help=argparse.SUPPRESS)  # the old name, which train gives its own meaning
    e.add_argument("--split", default="test", help="test or valid (default test)")
    e.add_argument("--proposal", default="auto",
                   help="log p(x) proposal: auto (q* for meanfield, encoder for amortized), guide, local")
    e.add_argument("--local", action=argparse.BooleanOptionalAction, default=None,
                   help="also fit q* for L[q*] and the gaps (default: for a guide with "
                        "tables such as meanfield, and with --local-family or --proposal local)")
    e.add_argument("--local-family", default=None,
                   help="family of q*: own, diagonal, full, lowrank[:R] or flow[:T[xH]] "
                        "(default: the run's --local-family, own); implies --local")
    e.add_argument("--rows", type=int, default=None,
                   help="score the first N rows of --split only (default: the run's "
                        "--test-size; all rows when it has none)")
    e.add_argument("--test-size", type=int, default=None, dest="old_test_size",
                   help=argparse.SUPPRESS)  # the old name, which sized a valid split too
    e.add_argument("--device", default=None, help="device to evaluate on (default: the run's)")
    e.add_argument(*TRUST_CODE, **TRUST_CODE_KW)
    e.add_argument(*NO_PROGRESS, **NO_PROGRESS_KW)

    c = sub.add_parser("compare", help="amortized, semi-amortized and mean-field on the same "
                                       "decoder and budget")
    _add_config(c, COMPARE_DEFAULTS, unlisted=("guide",))  # refused: compare takes --guides
    c.add_argument(*CONFIG, **CONFIG_KW)
    c.add_argument("--out", type=_folder, default=Path("runs/compare"),
                   help="output folder (default: runs/compare)")
    c.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    c.add_argument("--resume", action="store_true",
                   help="continue a comparison cut short (a kill, Ctrl-C): the same command "
                        "with --resume keeps every scored guide run, continues the one in "
                        "progress from its last checkpoint and runs the rest; it may add "
                        "guides (or seeds, to a comparison of several) to a comparison cut "
                        "short or finished")
    c.add_argument("--quick", action="store_true",
                   help="a first look: 10k training rows, 2 epochs each, 1k test rows, K=100 "
                        "(each where no flag or --config sets it)")
    c.add_argument("--num-particles-eval", type=int, default=1000, help="K of log p(x) (default 1000)")
    c.add_argument("--guides", type=_guides, default=None,  # None: compare.DEFAULT_GUIDES
                   help="comma-separated guides to compare, any subset (default: "
                        "amortized,semiamortized,meanfield; iaf adds a flow guide)")
    c.add_argument("--seeds", default="1",
                   help="training seeds per guide: a number K (seeds --seed .. --seed + K - 1) "
                        "or a list such as 0,1,2; run one after another; with more than one, "
                        "runs go to <out>/<guide>/seed<S> and the report gives means, standard "
                        "deviations and paired differences over seeds (default: 1, --seed alone)")
    c.add_argument("--budget", default="epochs",
                   help="what every guide gets the same of: epochs (--epochs); "
                        "evaluations=N, N network passes (forward and backward passes over a "
                        "minibatch of the decoder and of the guide's networks, which count as "
                        "one network, counted on one step of each guide); or flops=N, N FLOPs "
                        "(one step's forward and backward passes, counted with torch's "
                        "FlopCounterMode). Each guide gets the whole steps N buys, at least 1 "
                        "and at most 100,000,000, else the budget is refused; all are counts, "
                        "never seconds (default: epochs)")
    c.add_argument("--local-rows", type=int, default=500,
                   help="training rows of a per-datapoint table scored for how far they are "
                        "from a local optimum at the end (default 500)")
    c.add_argument(*NO_PROGRESS, **NO_PROGRESS_KW)
    p.commands = {"train": t, "evaluate": e, "compare": c}
    return p


def _folder(text: str) -> Path:
    """A folder path; an empty one (which Path would read as the current folder) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    return Path(text)


def _guides(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected guide names separated by commas, got {text!r}")
    return names


# The default comparison's budget is the same number of epochs for every guide (never
# seconds, which a busy machine would hand out unequally); experiments/README.md has its time.
COMPARE_DEFAULTS = Config(epochs=10, test_size=2000)
QUICK = dict(train_size=10_000, test_size=1000, valid_size=500, epochs=2)


def main(argv: Optional[List[str]] = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path that the console cannot encode is
        try:                                 # printed escaped, not a UnicodeEncodeError
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    logs.to_console()
    try:
        return _main(argv)
    except _loaded("distributed", "RefusedElsewhere"):  # another torchrun process printed why
        return 2
    except UserError as e:
        print(f"error: {e.for_cli()}", file=sys.stderr)
        return 2
    except _loaded("train", "Interrupted") as e:
        print(f"{e}; {e.kept or 'the checkpoint is kept: continue with `ppl-vae train ... --resume`'}",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; finished epochs keep their checkpoints", file=sys.stderr)
        return 130
    except OSError as e:  # an unwritable --out, a full disk, a path through a file
        print(f"error: {e.strerror or e}: {e.filename or ''}; choose another --out or free "
              f"the disk", file=sys.stderr)
        return 2
    except _loaded("train", "DivergenceError") as e:
        print(f"error: training diverged at {e.for_cli()}; "
              f"{e.kept or 'the last good checkpoint is kept'}. {e.advice(cli=True)}",
              file=sys.stderr)
        return 1


def _loaded(module: str, name: str):
    """The exception class ``name`` of this package's ``module`` if that module was imported,
    else ``()`` (catches nothing: nothing could have raised it), so that ``main`` imports no
    torch to answer --help or a usage error."""
    found = sys.modules.get(f"{__package__}.{module}")
    return getattr(found, name) if found is not None else ()


def _renamed(args, old_dest: str, old: str, new_dest: str, new: str, why: str):
    """The value of an option given under its old name (with a warning naming the new one)
    or its new one; both at once is refused."""
    value = getattr(args, old_dest)
    if value is None:
        return getattr(args, new_dest)
    if any(a == new or a.startswith(new + "=") for a in getattr(args, "argv", ())):
        raise UserError(f"{old} is the old name of {new}; give {new} alone")
    logs.warning(f"{old} is now {new} ({why}); the old name still works")
    return value


RESUME_COMPARE = ("every scored guide run and the last checkpoint are kept: continue with "
                  "the same `ppl-vae compare` command and --resume")


def _main(argv) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from . import distributed
    if distributed.launched():  # under torchrun: join the process group; rank 0 talks
        world = distributed.init(getattr(args, "device", "auto") or "auto")
        if not world.main:
            logs.quiet()
        try:
            return _command(args)
        finally:
            distributed.shutdown()
    return _command(args)


def _command(args) -> int:
    """Why so long: the three commands' dispatch, each a short branch from its flags to one
    call of the Python API; kept side by side so each flag's way from the command line is
    read in one place."""
    if args.command == "train":
        from .run import train_run
        from .run_setup import resumed_config
        resumed = (resumed_config(args.out, _given(args.argv, "train"), args.trust_code)
                   if args.resume else None)  # the run's settings, its checkpoint read once
        config = resumed.config if resumed else _config(args)
        if args.num_particles_eval <= 0:
            raise UserError("--num-particles-eval must be positive")
        check_particles(args.num_particles_eval, "num_particles_eval")
        then = None
        if args.evaluate:  # under the training's lock: no other writer between the two
            from .evaluation import evaluate_run
            then = functools.partial(evaluate_run, args.out, args.num_particles_eval,
                                     progress=args.progress or "lines",
                                     trust_code=args.trust_code, given=config)
        train_run(config, args.out, overwrite=args.overwrite, resume=args.resume,
                  progress=args.progress or "lines", trust_code=args.trust_code,
                  state=resumed.state if resumed else None, then=then)
        return 0
    if args.command == "evaluate":
        from .evaluation import evaluate_run
        k = _renamed(args, "old_num_particles", "--num-particles", "num_particles_eval",
                     "--num-particles-eval", "in train it counts the training objective's "
                     "particles")
        rows = _renamed(args, "old_test_size", "--test-size", "rows", "--rows",
                        "it sizes any --split")
        if k <= 0:
            raise UserError(f"--num-particles-eval must be a positive K, got {k}")
        check_particles(k, "num_particles_eval")
        if rows is not None and rows <= 0:
            raise UserError(f"--rows must be a positive number of rows, got {rows}")
        evaluate_run(args.run_dir, k, split=args.split, proposal=args.proposal,
                     local=args.local, test_size=rows, device=args.device,
                     local_family=args.local_family,
                     progress=args.progress or "lines", trust_code=args.trust_code)
        return 0
    if args.command == "compare":
        from .compare import DEFAULT_GUIDES, compare, parse_seeds
        from .results import PAIRED_KEYS
        from .compute import Budget
        argv = getattr(args, "argv", None)  # what the user typed (set by _main)
        given = _explicit(argv) if argv is not None else {}  # flags and file
        if "guide" in given:
            raise UserError(f"compare trains every guide of --guides, not --guide; use "
                            f"--guides {args.guide} to compare that guide alone")
        if args.guides is None:
            args.guides = list(DEFAULT_GUIDES)
        config = _config(args)
        seeds, budget = parse_seeds(args.seeds, config.seed), Budget.parse(args.budget)
        k = args.num_particles_eval
        if args.quick:  # a first look's sizes, where the command line or --config gives none
            quick = {key: value for key, value in QUICK.items() if key not in given}
            if not quick:
                raise UserError(f"--quick sets {', '.join(QUICK)} where nothing else does, but "
                                f"the command line or --config sets all of them; drop --quick")
            config = config.replace(**quick).validate()
            if "num_particles_eval" not in given:
                k = min(k, 100)
        if k <= 0:
            raise UserError("--num-particles-eval must be positive")
        try:
            doc = compare(config, args.out, num_particles=k, overwrite=args.overwrite,
                          guides=args.guides, progress=args.progress or "lines", seeds=seeds,
                          budget=budget, local_rows=args.local_rows, resume=args.resume,
                          quick=args.quick)
        except _loaded("train", "Interrupted") as e:  # a guide's training stopped
            e.kept = RESUME_COMPARE
            raise
        except KeyboardInterrupt:  # between runs, or while scoring
            print(f"interrupted; {RESUME_COMPARE}", file=sys.stderr)
            return 130
        if not doc:  # another torchrun process: rank 0 prints the results
            return 0
        print(json.dumps({g: {key: doc[g].get(key) for key in PAIRED_KEYS}
                          for g in args.guides}, indent=2))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
