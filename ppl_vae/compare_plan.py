"""What a comparison is (its plan, ``comparison.json``) and what each finished guide run left
(its record, ``comparison_run.json``): together they let ``compare --resume`` continue a
comparison where it stopped, or extend it with guides or seeds added, and never take a run
of another comparison as this one's. ``compare.py`` runs the comparison; this module only
reads and writes these files and decides what a resume may take.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from .compute import Budget
from .config import Config
from .errors import UserError, setting
from .runfiles import CHECKPOINTS, write_json
from .results import GuideRun

PLAN = "comparison.json"  # in the comparison's folder, written before the first run
RECORD = "comparison_run.json"  # in a guide run's folder, once the run is scored
FIGURE_ARRAYS = "comparison_arrays.npz"  # beside it: what the comparison's figures show
PLAN_MAY_CHANGE = ("device", "compile")  # a resume may move devices or compile differently
# a resume may add guides or seeds (not drop them): the finished runs are kept and the new
# ones run; a one-seed comparison's runs sit in out/<guide>, so it takes no seeds added
EXTENDABLE = {"guides": " (a resume may add guides, not drop them)",
              "seeds": " (a resume may add seeds to a comparison of two or more, not drop "
                       "them)"}


def plan_of(config: Config, guides, seeds, budget: Budget, num_particles: int,
            local_rows: int, local_options: Optional[dict]) -> dict:
    """Everything that decides a comparison's numbers (what ``--resume`` must find again)."""
    return {"config": config.to_dict(), "guides": list(guides), "seeds": list(seeds),
            "budget": budget.to_json(), "num_particles": int(num_particles),
            "local_rows": int(local_rows), "local_options": dict(local_options or {})}


def plan_differs(saved: dict, plan: dict) -> Optional[str]:
    """The first setting in which ``plan`` differs from the ``saved`` one (None: the same).
    A plan saved before a setting existed matches that setting's default, and an epochs
    budget saved without its amount matches the epochs of its config."""
    if not isinstance(saved, dict):
        return "the saved plan (not an object)"
    defaults = Config().to_dict()
    for key, value in plan.items():
        old = saved.get(key)
        if key == "config":
            old = old if isinstance(old, dict) else {}
            for name, v in value.items():
                was = old.get(name, defaults.get(name))
                if name not in PLAN_MAY_CHANGE and was != v:
                    return f"--{name.replace('_', '-')} (was {was!r}, now {v!r})"
            continue
        if key == "budget" and isinstance(old, dict) and old.get("unit") == "epochs" \
                and old.get("amount") is None:
            old = {**old, "amount": plan["config"].get("epochs")}
        if key in EXTENDABLE and isinstance(old, list) and set(old) <= set(value) \
                and (key != "seeds" or len(old) > 1 or old == value):
            continue  # guides or seeds added: a resume extends the comparison
        if old != value:
            name = {"num_particles": "num-particles-eval"}.get(key, key.replace("_", "-"))
            why = EXTENDABLE.get(key, "")
            return f"--{name} (was {old!r}, now {value!r}){why}"
    return None


def check_resume(out: Path, plan: dict) -> None:
    """Refuse a ``--resume`` of a folder that holds no unfinished comparison, or that was
    started with other settings (but for guides or seeds added, ``EXTENDABLE``)."""
    path = out / PLAN
    saved = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({type(e).__name__}); run the comparison "
                            f"again with {setting('overwrite')}") from None
    differs = plan_differs(saved, plan) if saved is not None else None
    if (out / "results.json").exists() and not differs \
            and (saved is None or finished(out, saved) and adds_nothing(saved, plan)):
        raise UserError(f"{out} holds a finished comparison: nothing to resume; pass "
                        f"{setting('overwrite')} to run it again or choose another "
                        f"{setting('out')}")
    if saved is None:
        raise UserError(f"{setting('resume')}: {out} holds no comparison to continue (no "
                        f"{PLAN}); run it without {setting('resume')}")
    if differs:
        raise UserError(f"{setting('resume')} continues the comparison as it was started, but "
                        f"this command changes {differs}; give the same settings, or "
                        f"{setting('overwrite')} to start it again")


def finished(out: Path, saved: dict) -> bool:
    """Whether ``out``'s results.json holds every guide and seed of the ``saved`` plan (a
    resume that adds guides or seeds keeps the old results.json, and writes the extended
    plan, until the extended results replace it)."""
    try:
        done = json.loads((out / "results.json").read_text())
        return adds_nothing(done, saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # unreadable: refused as finished, as before (--overwrite replaces it)


def extending(out: Path) -> bool:
    """Whether ``out`` holds a finished comparison's results beside the plan of an extension
    of it (guides or seeds added) that was cut short: unfinished, to be resumed."""
    try:
        return not finished(out, json.loads((out / PLAN).read_text()))
    except (OSError, ValueError):
        return False


def adds_nothing(before: dict, plan: dict) -> bool:
    """Whether ``plan`` asks no guide or seed that ``before`` (a plan, or results) lacks."""
    return set(plan["guides"]) <= set(before["guides"]) \
        and set(plan["seeds"]) <= set(before["seeds"])


def has_checkpoint(folder: Path) -> bool:
    """Whether a guide's run folder holds a checkpoint to continue."""
    return any((folder / n).exists() for n in CHECKPOINTS[:2])


def saved_config(folder: Path) -> Optional[dict]:
    try:
        path = folder / "config.json"
        return json.loads(path.read_text()).get("config") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def same_run(saved, run_config: Config) -> bool:
    """Whether a run's saved settings (a record's, a config.json's) are ``run_config``'s, but
    for what a resume may change: a run of another comparison is never taken as this one's."""
    if not isinstance(saved, dict):
        return False
    defaults = Config().to_dict()  # a setting newer than the run: its default held
    return all(saved.get(k, defaults[k]) == v for k, v in run_config.to_dict().items()
               if k not in PLAN_MAY_CHANGE)


def write_record(folder: Path, run: GuideRun, arrays: Optional[dict],
                  run_config: Config) -> None:
    """A scored guide run's record (and its figures' arrays) in its folder, the record last:
    a run with a record is finished and a resume takes it as it is (if its settings are the
    comparison's)."""
    if arrays is not None:
        tmp = folder / (FIGURE_ARRAYS + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(folder / FIGURE_ARRAYS)
    write_json(folder / RECORD, {**run.to_record(), "config": run_config.to_dict()})


def read_record(folder: Path, run_config: Config, cost) -> Optional[GuideRun]:
    """The record ``write_record`` left of the run ``run_config`` describes (None: the run is
    not finished, its record is unreadable or not a regular file, or it is another
    comparison's run, and it is trained or scored again)."""
    path = folder / RECORD
    try:
        if not path.is_file():  # a named pipe is no record (and would block a read)
            return None
        doc = json.loads(path.read_text())
        saved = doc.get("config") or saved_config(folder)  # a record before it held them
        if not same_run(saved, run_config):
            return None
        run = GuideRun.from_record(doc, cost)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return run if (run.guide, run.seed) == (run_config.guide, run_config.seed) else None


def read_arrays(folder: Path) -> Optional[dict]:
    path = folder / FIGURE_ARRAYS
    try:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
