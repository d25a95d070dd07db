"""Command lines for train.py and eval.py: one config dataclass each, parsed by transformers' HfArgumentParser.

    cfg = parse(Config, argv, presets=lambda given: TOY_PRESET if given.get("model", "toy") == "toy" else {},
                renamed={"steps": "max_steps"})

Both scripts get the same style: every field is `--name value` (`--name-with-dashes` works too), booleans take
`--flag`, `--flag true|false` or `--no_flag`, lists take comma- or space-separated values (`--keep_p_grid 0.94,0.95`),
`--help` lists every field with its help text. A preset fills the fields the command line did not give (the offline
toy's sizes); `renamed` keeps old flag names working for a while, with a one-line deprecation notice.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from transformers import HfArgumentParser


class Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def list_fields(cls) -> set[str]:
    """Fields of `cls` typed list[...] (HfArgumentParser gives them nargs="+")."""
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is list}


def rename_flags(argv: list[str], renamed: dict[str, str], inverted: dict[str, str]) -> list[str]:
    """Old flag names to new ones, one deprecation line each: renamed {old: new}; inverted {old: new} for a boolean
    whose meaning flipped (--progress false -> --disable_tqdm true)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in renamed:
            print(f"warning: --{name} is deprecated, use --{renamed[name]}", file=sys.stderr)
            out.append(f"--{renamed[name]}" + (eq + value))
        elif name in inverted:
            print(f"warning: --{name} is deprecated, use --{inverted[name]} (the opposite)", file=sys.stderr)
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            out += [f"--{inverted[name]}", str(not bool_value(value or "true"))]
        else:
            out.append(arg)
        i += 1
    return out


def bool_value(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case); anything else is an argparse error naming it."""
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def split_commas(argv: list[str], names: set[str]) -> list[str]:
    """`--grid 0.94,0.95` as `--grid 0.94 0.95` for list fields (HfArgumentParser takes space-separated values)."""
    out, expecting = [], False
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            expecting = name.replace("-", "_") in names
            if expecting and eq:
                out += [f"--{name}", *[v for v in value.split(",") if v]]
                expecting = False
                continue
            out.append(arg)
        elif expecting:
            out += [v for v in arg.split(",") if v]
        else:
            out.append(arg)
    return out


def parse(cls, argv=None, presets=None, renamed=None, inverted=None, description=None):
    """An instance of dataclass `cls` from the command line: the given fields, else `presets(given)`, else the
    dataclass defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = split_commas(rename_flags(argv, renamed or {}, inverted or {}), list_fields(cls))
    parser = Parser(cls, description=description)
    for action in parser._actions:  # keep only what the command line gives (set_defaults would type-convert)
        shown = action.default not in (None, argparse.SUPPRESS) and not action.option_strings[0].startswith("--no_")
        if action.help and shown:
            action.help += f" (default: {action.default})"
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    preset = presets(given) if presets else {}
    return cls(**{**preset, **given})
