"""Settings from a file: ``--config FILE`` for ``train`` and ``compare``; flags override it.

A file is TOML (``.toml``: one ``key = value`` line per option, named as the option is,
``epochs = 100``, ``hidden = [400]``, ``guides = "amortized,meanfield"``) or JSON
(``.json``: an object of the same keys, or a record this package wrote, whose settings
re-run it: a run's ``config.json``, or for ``compare`` a comparison's ``results.json`` or
``comparison.json``). A key may be spelled with ``_`` or ``-``. An unknown or mistyped key,
or a value of the wrong type, is one line naming it (and the nearest valid key). Nothing in
a file is imported or run: a ``module:Class`` name in it is a setting like any other,
imported when the command runs it.

This module imports no torch (``--help`` and usage errors stay instant).
"""
from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Dict

from .errors import UserError

# what a record of this package holds besides its settings (ignored when it is re-run)
RECORD_KEYS = {"data", "command", "versions", "device", "world_size", "resumes", "date",
               "seed_schedule", "guide_settings", "differences", "ran", "local_options"}
# a comparison's record names some options as the Python API does
RECORD_NAMES = {"num_particles": "num_particles_eval"}
# options a file cannot set: consent to run code, and consent to replace or continue what
# is on disk, are given on the command line by whoever runs it, never by a file
NOT_SETTINGS = {"help", "config", "run_dir", "trust_code", "overwrite", "resume"}


def read(path) -> dict:
    """The mapping a config file holds (TOML or JSON), unchecked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file; give a .toml or .json file of "
                        f"settings")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} cannot be read ({type(e).__name__}); give a .toml "
                        f"or .json file of settings") from None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise UserError(f"--config {path} is not valid JSON ({e}); fix it or give a "
                            f".toml file") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {path} is not valid TOML ({e}); fix it, or give a "
                            f".json file") from None
    if not isinstance(doc, dict):
        raise UserError(f"--config {path} must hold a table of settings, got "
                        f"{type(doc).__name__}")
    return doc


def _flatten(doc: dict, command: str) -> dict:
    """A record's settings as option names: its ``config`` table laid out at the top level
    (a comparison's ``guide`` left out: it takes ``guides``), its plan's names as options."""
    if not isinstance(doc.get("config"), dict):
        return dict(doc)
    settings = dict(doc["config"])
    if command == "compare":
        settings.pop("guide", None)
    for key, value in doc.items():
        if key == "config" or key in RECORD_KEYS:
            continue
        if key == "seeds" and isinstance(value, list):
            value = ",".join(str(s) for s in value) + ("," if len(value) == 1 else "")
        elif key == "budget" and isinstance(value, dict):
            value = ("epochs" if value.get("unit") == "epochs"
                     else f"{value.get('unit')}={value.get('amount')}")
        elif key in ("local_rows", "num_particles", "quick", "guides", "seeds", "budget"):
            pass
        else:
            continue  # a guide's entry of results.json, and other records: not settings
        if key == "guides" and isinstance(value, list):
            value = ",".join(value)
        settings[RECORD_NAMES.get(key, key)] = value
    return settings


def _convert(action: argparse.Action, key: str, value, path):
    """``value`` as the option ``action`` would have parsed it; one line if it cannot be."""
    def bad(what: str):
        return UserError(f"--config {path}: {key} must be {what}, got {value!r}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.nargs == "+":
        if not isinstance(value, list) or not value:
            raise bad("a list such as [400]")
        return [_convert_one(action, key, v, path, bad) for v in value]
    if value is None:
        return None
    return _convert_one(action, key, value, path, bad)


def _convert_one(action, key, value, path, bad):
    typ = action.type
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        value = ",".join(str(v) for v in value) + ("," if len(value) == 1 else "")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad("a number or a name")
    if typ is None:  # a free-form option: a name, or a number written as one (seeds = 3)
        return str(value)
    if getattr(typ, "__name__", "") == "int" and isinstance(value, float):
        if not value.is_integer():
            raise bad("a whole number")
        value = int(value)
    try:
        return typ(str(value))
    except argparse.ArgumentTypeError as e:
        raise bad(f"what --{key.replace('_', '-')} takes ({e})") from None
    except (ValueError, UserError):
        kind = {"int": "a whole number", "float": "a number"}.get(
            getattr(typ, "__name__", ""), f"what --{key.replace('_', '-')} takes")
        raise bad(kind) from None


def defaults(path, parser: argparse.ArgumentParser, command: str) -> Dict[str, object]:
    """The options ``path`` sets for ``parser`` (the ``command``'s parser), by dest, parsed
    as the options are; an unknown key is refused with the nearest valid one."""
    doc = read(path)
    if command == "train" and isinstance(doc.get("config"), dict) and "guides" in doc:
        guides = doc["guides"]
        guides = ", ".join(map(str, guides)) if isinstance(guides, list) else str(guides)
        raise UserError(f"--config {path} is a comparison's record (guides {guides}); re-run "
                        f"it with `ppl-vae compare --config {path}`, or train one guide from "
                        f"its run's config.json")
    settings = _flatten(doc, command)
    actions = {a.dest: a for a in parser._actions
               if a.dest not in NOT_SETTINGS and a.option_strings
               and a.help != argparse.SUPPRESS}
    out = {}
    for raw, value in settings.items():
        key = str(raw).replace("-", "_")
        if key not in actions:
            near = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else (
                f"; {command} takes {', '.join(sorted(actions))}")
            raise UserError(f"--config {path}: unknown key {raw!r} for {command}{hint}")
        out[key] = _convert(actions[key], key, value, path)
    return out
