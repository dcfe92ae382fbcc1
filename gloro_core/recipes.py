"""Named training presets: ``python -m gloro_core train --recipe NAME``.

A recipe is a JSON file shipped in ``gloro_core/recipe_files/``::

    {"description": "...", "status": "measured ... | unverified ...", "source": "...",
     "flags": {"dataset": "fashion-mnist", "eps": 0.1, "lr_decay": "decay_to_lb", ...}}

``flags`` holds ``train`` options by their argparse names (``lr_decay`` is ``--lr-decay``).
They are turned into command-line arguments placed *before* the user's, so argparse itself
applies them and checks them, and any flag given on the command line wins (argparse keeps the
last value). Schedules in recipes are written in fractions of the run (``x,y,50%``,
``--warmup 2.5%``), so ``--epochs`` scales them. Options that belong to one machine or one run
(``out``, ``data_dir``, ``resume``, ...) are not allowed in a recipe.
"""
from __future__ import annotations

import argparse
import json
import os

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe_files")
NOT_IN_RECIPES = {"out", "data_dir", "resume", "overwrite", "recipe", "stop_after", "plot",
                  "no_progress", "device", "backend", "command", "help"}


def names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(DIR) if f.endswith(".json"))


def load(name: str) -> dict:
    """The recipe ``name`` as a dict; ValueError naming the flag and the choices if unknown."""
    if name not in names():
        raise ValueError(f"--recipe {name!r}: unknown recipe; choose one of "
                         f"{', '.join(names())} (or --recipe list)")
    with open(os.path.join(DIR, name + ".json")) as fh:
        r = json.load(fh)
    if not isinstance(r, dict) or not isinstance(r.get("flags"), dict):
        raise ValueError(f"recipe {name}: expected an object with 'flags'")
    return r


def listing() -> str:
    """What ``--recipe list`` prints: name, status and description of each recipe."""
    lines = []
    for n in names():
        r = load(n)
        lines.append(f"{n}\n    {r.get('description', '')}\n    status: {r.get('status', '?')}")
    return "\n".join(lines)


def _actions(parser: argparse.ArgumentParser) -> dict:
    """dest -> option action of ``parser`` (the train subparser)."""
    return {a.dest: a for a in parser._actions if a.option_strings}


def to_argv(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """The recipe's flags as arguments of ``parser`` (the train subparser)."""
    flags = load(name)["flags"]
    acts = _actions(parser)
    argv = []
    for key, value in flags.items():
        if key in NOT_IN_RECIPES or key not in acts:
            raise ValueError(f"recipe {name}: {key!r} is not a train option a recipe may set")
        opt = acts[key].option_strings[-1]
        if isinstance(acts[key], argparse._StoreTrueAction):
            if value not in (True, False):
                raise ValueError(f"recipe {name}: {key!r} must be true or false")
            argv += [opt] if value else []
        elif value is not None:
            argv.append(f"{opt}={value}")    # '=': values such as '-1,0.1,2' stay values
    return argv


def explicit(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """dests of the options given in ``argv`` (parsed again with every default suppressed)."""
    saved = {a: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(argv)
    finally:
        for a, d in saved.items():
            a.default = d
    return set(vars(ns))


def apply(parser: argparse.ArgumentParser, argv: list[str]):
    """-> (args, note): ``argv`` (train's arguments, without 'train') parsed after the
    recipe's flags, and a line saying which recipe ran and what the command line changed."""
    first = parser.parse_args(argv)
    name = first.recipe
    recipe_argv = to_argv(name, parser)
    args = parser.parse_args(recipe_argv + list(argv))
    given = sorted(explicit(parser, argv) & set(load(name)["flags"]))
    note = (f"recipe {name} ({load(name).get('status', '?')})"
            + (f"; overridden on the command line: {', '.join(given)}" if given else ""))
    return args, note
