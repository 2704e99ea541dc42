"""Every restore argument checked before the first engine call, with a message that says what is allowed.

The API (`Pipeline.restore`, `restore_float`, `restore_latent`) and the CLI call the same check, so a bad
value fails in a line before minutes of sampling, never late and never with a misleading message.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np

from .colorfix import METHODS as COLOR_FIXES
from .errors import ArgumentError

STEPS = (2, 1000)  # the spaced schedule needs 2 steps; the model was trained over 1000 timesteps
SR_SCALE = (0.125, 16.0)  # beyond these the processing size is a thumbnail or past the pixel limit anyway
SEED_BELOW = 2**63
TILE_MIN, TILE_MAX = 128, 65536  # pixels; above any image Pillow opens, a tile is the whole image
W_MAX = 100.0  # the gate gives at most 1; far beyond it the CSFT features overflow into NaNs, not an image


def _number(name: str, value: object) -> float:
    """A finite real number that stays finite as the float32 the graphs are fed (1e39 is finite as a
    Python float and inf in float32)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentError(f"{name} must be a finite number, not {value!r}")
    with np.errstate(over="ignore"):
        if not (math.isfinite(float(value)) and np.isfinite(np.float32(value))):
            raise ArgumentError(f"{name} must be a finite number (within float32's ±3.4e38), not {value!r}")
    return float(value)


def _integer(name: str, value: object, low: int, high: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise ArgumentError(f"{name} must be {allowed}, not {value!r}")
    return int(value)


def check_memory_budget(value: object) -> int | None:
    """Bytes as an int, or a size such as "12G" (as `--memory-budget`); None: the default budget."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_bytes(value)
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 1:
        return int(value)
    raise ArgumentError(f"memory_budget must be a positive number of bytes or a size such as '12G', not {value!r}")


def _callback(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ArgumentError(f"{name} must be a callable (or None), not {type(value).__name__} {value!r}")


def check_arguments(*, steps: int | None = None, seed: int | None = None, score: float | None = None,
                    k: float | None = None, w: float | None = None, sr_scale: float | None = None,
                    color_fix: str | None = None, tile_size: int | None = None, max_steps: int = STEPS[1],
                    resize_back: object = True, progress: object = None, on_stage: object = None,
                    on_step: object = None, on_gate: object = None) -> list[str]:
    """Raise `ArgumentError` for the first value outside what is allowed; return warnings (w above 1).

    None means "not given" (the default or the measured value is used). `max_steps`: the most steps the
    engine directory's schedule allows (its timesteps, at most 1000). A memory budget is converted by
    `check_memory_budget`."""
    high = min(STEPS[1], max_steps)
    if steps is not None:
        _integer("steps", steps, STEPS[0], high, f"an integer from {STEPS[0]} to {high}"
                 + (f" (this engine directory's schedule has {max_steps} timesteps)" if high < STEPS[1] else ""))
    if seed is not None:
        _integer("seed", seed, 0, SEED_BELOW - 1, "an integer from 0 to 2**63 - 1")
    if score is not None:
        _number("score", score)
    if k is not None and not 0 <= _number("k", k) <= 1:
        raise ArgumentError(f"k must be in [0, 1] (0: the restoration latent, 1: the identity latent), not {k!r}")
    warnings = []
    if w is not None:
        if not 0 <= _number("w", w) <= W_MAX:
            raise ArgumentError(f"w must be from 0 to {W_MAX:g} (0: no CSFT; the gate gives at most 1), not {w!r}")
        if w > 1:
            warnings.append(f"w = {w:g} is above 1, the strongest CSFT strength the gate gives")
    if sr_scale is not None and not SR_SCALE[0] <= _number("sr_scale", sr_scale) <= SR_SCALE[1]:
        raise ArgumentError(f"sr_scale must be from {SR_SCALE[0]} to {SR_SCALE[1]:g}, not {sr_scale!r}")
    if color_fix is not None and (not isinstance(color_fix, str) or color_fix not in COLOR_FIXES):
        raise ArgumentError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, not {color_fix!r}")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, Integral) or (
            tile_size != 0 and (tile_size % 64 or not TILE_MIN <= tile_size <= TILE_MAX))):
        raise ArgumentError(f"tile size must be 0 (never tile) or a multiple of 64 from {TILE_MIN} to {TILE_MAX} "
                            f"px, not {tile_size!r}")
    if not isinstance(resize_back, bool):  # "no" would read as true
        raise ArgumentError(f"resize_back must be True or False, not {resize_back!r}")
    _callback("progress", progress)
    _callback("on_stage", on_stage)
    _callback("on_step", on_step)
    _callback("on_gate", on_gate)
    return warnings


def parse_bytes(text: str) -> int:
    """`12G`, `12GiB`, `800M`, `800MiB`, `0.5g` (binary units; a bare number is GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ArgumentError(f"memory size {text!r}: write it as e.g. 12G, 12GiB or 800M")
    power = {"k": 1, "m": 2, "g": 3, "t": 4, "": 3}[match.group(2).lower()]
    size = int(float(match.group(1)) * 1024**power)
    if size < 1:
        raise ArgumentError(f"memory size {text!r} is below one byte")
    return size


def bytes_argument(text: str) -> int:
    """`parse_bytes` as an argparse type, so a bad size is a usage error."""
    try:
        return parse_bytes(text)
    except ArgumentError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _suggestion(word: str, candidates: Iterable[str]) -> str:
    """" (did you mean --steps?)" for a close match, else ""."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def redefine(parser: argparse.ArgumentParser, option: str, **changes: object) -> None:
    """Change an option a shared function added (its default and help together, so that help never shows
    one default in words and another in "(default: ...)")."""
    action = parser._option_string_actions[option]
    for name, value in changes.items():
        setattr(action, name, value)
    if "default" in changes:
        parser.set_defaults(**{action.dest: changes["default"]})


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` that answers a mistyped option or choice with the usage of the command it was
    typed for (a subcommand's, not the program's) and the closest name it has: `--stpes 2` → "unrecognized
    arguments: --stpes 2 (did you mean --steps?)". Subcommands made by `add_subparsers` are Parsers too, so
    every command of a program built on it answers the same way."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self._command_parser(parsed)
            options = [o for action in owner._actions for o in action.option_strings]
            hints = "".join(_suggestion(word.split("=", 1)[0], options) for word in extras if word.startswith("-"))
            owner.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub)command's own parser that read the arguments, the deepest one chosen."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                chosen = action.choices[getattr(parsed, action.dest)]
                return chosen._command_parser(parsed) if isinstance(chosen, Parser) else chosen
        return self

    def _check_value(self, action: argparse.Action, value: object) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            if action.choices is None or not isinstance(value, str):
                raise
            raise argparse.ArgumentError(action, f"{err.message}{_suggestion(value, map(str, action.choices))}"
                                         ) from None
