"""Every restore argument checked before the first engine call, with a message that says what is allowed.

The API (`Pipeline.restore`, `restore_float`, `restore_latent`) and the CLI call the same check, so a bad
value fails in a line before minutes of sampling, never late and never with a misleading message.
"""

from __future__ import annotations

import argparse
import math
from numbers import Integral, Real

from .colorfix import METHODS as COLOR_FIXES
from .errors import ArgumentError

STEPS = (2, 1000)  # the spaced schedule needs 2 steps; the model was trained over 1000 timesteps
SR_SCALE = (0.125, 16.0)  # beyond these the processing size is a thumbnail or past the pixel limit anyway
SEED_BELOW = 2**63
TILE_MIN = 128


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ArgumentError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def check_arguments(*, steps: int | None = None, seed: int | None = None, score: float | None = None,
                    k: float | None = None, w: float | None = None, sr_scale: float | None = None,
                    color_fix: str | None = None, tile_size: int | None = None) -> list[str]:
    """Raise `ArgumentError` for the first value outside what is allowed; return warnings (w above 1).

    None means "not given" (the default or the measured value is used)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, Integral)
                              or not STEPS[0] <= steps <= STEPS[1]):
        raise ArgumentError(f"steps must be an integer from {STEPS[0]} to {STEPS[1]}, not {steps!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < SEED_BELOW):
        raise ArgumentError(f"seed must be an integer from 0 to 2**63 - 1, not {seed!r}")
    if score is not None:
        _number("score", score)
    if k is not None and not 0 <= _number("k", k) <= 1:
        raise ArgumentError(f"k must be in [0, 1] (0: the restoration latent, 1: the identity latent), not {k!r}")
    warnings = []
    if w is not None:
        if _number("w", w) < 0:
            raise ArgumentError(f"w must be ≥ 0 (0: no CSFT; the gate gives at most 1), not {w!r}")
        if w > 1:
            warnings.append(f"w = {w:g} is above 1, the strongest CSFT strength the gate gives")
    if sr_scale is not None and not SR_SCALE[0] <= _number("sr_scale", sr_scale) <= SR_SCALE[1]:
        raise ArgumentError(f"sr_scale must be from {SR_SCALE[0]} to {SR_SCALE[1]:g}, not {sr_scale!r}")
    if color_fix is not None and color_fix not in COLOR_FIXES:
        raise ArgumentError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, not {color_fix!r}")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, Integral) or (
            tile_size != 0 and (tile_size % 64 or tile_size < TILE_MIN))):
        raise ArgumentError(f"tile size must be 0 (never tile) or a multiple of 64 of at least {TILE_MIN} px, "
                            f"not {tile_size!r}")
    return warnings


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)
