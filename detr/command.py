"""What the `detr` commands share: flags generated from the config dataclasses, and a training's
closing report (used by `detr train` and the applications' training commands)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from detr.config import field_types
from detr.distributed import World
from detr.trainer import Interrupted, TrainResult


def run_training(args: argparse.Namespace, start: typing.Callable[[bool], TrainResult]) -> int:
    """Run `start(progress)` (a training), then print how it ended; an interrupt prints the resume command."""
    try:
        with logging_redirect_tqdm():
            result = start(not args.no_progress and sys.stderr.isatty())
    except Interrupted as err:
        again = args.command_line + ([] if args.resume else ["--resume"])
        if World.from_environment().main:  # under torchrun, rank 0 says it for all
            print(f"detr: {err}\nresume with: detr {shlex.join(again)}", file=sys.stderr)
        return err.exit_code
    if not World.from_environment().main:
        return 0
    best = (f"best valid {result.best['metric']} {result.best['value']:.4g} at step {result.best['step']}; "
            if result.best else "")
    print(f"finished: {result.steps} steps, {result.epochs} epochs ({result.stopped}) in {result.seconds:.0f}s; "
          f"{best}model: {result.model_path}")
    return 0



def flag_type(hint: Any) -> type:
    # float("nan") parses; DecodeConfig.validate then refuses it in one line naming the key.
    return {int: int, float: float}.get(hint, str)


def add_config_flags(group: Any, cls: type, section: str, default_note: str,
                     only: set[str] | None = None) -> None:
    """One flag per field of the config dataclass `cls` (`beam_size` → `--beam-size`), with the field's
    help text, stored as `{section}_{field}`; an unset flag stays None (the default applies).
    `only`: just these fields."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag, dest = "--" + f.name.replace("_", "-"), f"{section}_{f.name}"
        text = f"{f.metadata['help']} ({section}.{f.name}; {default_note}: {f.default})"
        if hints[f.name] is bool:
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            group.add_argument(flag, dest=dest, choices=typing.get_args(hints[f.name]), help=text)
        else:
            group.add_argument(flag, dest=dest, type=flag_type(hints[f.name]), metavar=f.name.upper(), help=text)


def config_from_flags(args: argparse.Namespace, cls: type, section: str) -> Any:
    """The dataclass `cls` with the fields the user gave as flags."""
    given = {f.name: getattr(args, f"{section}_{f.name}") for f in dataclasses.fields(cls)
             if getattr(args, f"{section}_{f.name}", None) is not None}
    return cls(**given)
