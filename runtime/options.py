"""`RestoreOptions`: the one definition of what a restore may be asked — its fields, defaults, checks, the
command-line spelling and the HTTP query spelling.

    options = RestoreOptions(seed=0, w=0.5)                # checked here, in the float32 the graphs get
    pipeline.restore(image, options)                       # steps: the engine directory's schedule default
    RestoreOptions.from_namespace(args)                    # `adaptbir restore`, `adaptbir-ray restore`
    RestoreOptions.from_query("seed=1&steps=20")           # `adaptbir-ray serve`

Everything that decides an output's pixels is a field here (`key()`); per-call hooks (progress, stage and
step callbacks) are not options and stay keyword arguments of `Pipeline.restore`.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from .arguments import bytes_argument, check_arguments, check_memory_budget
from .colorfix import METHODS as COLOR_FIXES
from .errors import ArgumentError

# The fields a service client may set in a query. The memory budget is the server's to decide; the rest
# (pre-scale, tiling, colour fix) change the work a request costs beyond what the service limits check.
RANDOM = "random"  # the seed that asks for a fresh draw per image
SEED_RULE = f"an integer from 0 to 2**63 - 1, or {RANDOM}"


def seed_value(text: str) -> int | str:
    """A seed as typed: an integer, or "random"."""
    if text.strip().lower() == RANDOM:
        return RANDOM
    try:
        return int(text)
    except ValueError:
        raise ArgumentError(f"seed {text[:40]!r}: {SEED_RULE}") from None


def seed_for(seed: int | str | None, pixels: np.ndarray) -> int:
    """The seed an image is restored with: the one given; a fresh draw for "random"; otherwise one derived from
    the image's pixels (sha256 of their shape and bytes), so the same image with the same options gives the
    same output on every run and every engine of this project (CLI, Ray, service), without --seed. The seed
    follows the pixels only, not the options: a sweep of w or k on one photo keeps its noise."""
    if isinstance(seed, int):
        return seed
    if seed == RANDOM:
        return secrets.randbits(63)
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"adaptbir seed 1 {pixels.dtype} {pixels.shape}".encode() + pixels.tobytes()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_argument(text: str) -> int | str:
    """`--seed`: `seed_value`, an argparse type (its error is the usage line)."""
    try:
        return seed_value(text)
    except ArgumentError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


QUERY_FIELDS = {"seed": seed_value, "steps": int, "score": float, "k": float, "w": float}


@dataclass(frozen=True)
class RestoreOptions:
    """How one image is restored. None means "not given": the schedule's default steps, a seed derived from
    the image's pixels (`seed_for`; "random" draws one), the
    measured score, the gate's k and w, tiling decided by the memory budget (the pipeline's by default).
    Every value is checked when the options are made (`ArgumentError` in one line); `memory_budget` may be
    given as a size such as "12G" and is held in bytes."""

    steps: int | None = None
    seed: int | str | None = None  # "random": a fresh draw per image
    score: float | None = None
    k: float | None = None
    w: float | None = None
    sr_scale: float = 1.0
    resize_back: bool = True
    color_fix: str = "none"
    tile_size: int | None = None  # pixels; 0 = never tile
    memory_budget: int | None = None  # bytes

    def __post_init__(self) -> None:
        if isinstance(self.seed, str) and self.seed != RANDOM:
            raise ArgumentError(f"seed {self.seed[:40]!r}: {SEED_RULE}")
        check_arguments(steps=self.steps, seed=None if self.seed == RANDOM else self.seed, score=self.score,
                        k=self.k, w=self.w, sr_scale=self.sr_scale, color_fix=self.color_fix, tile_size=self.tile_size,
                        resize_back=self.resize_back)
        object.__setattr__(self, "memory_budget", check_memory_budget(self.memory_budget))

    @property
    def warnings(self) -> list[str]:
        """Accepted values worth a word in the result (w above what the gate gives)."""
        return check_arguments(w=self.w)

    def for_schedule(self, default_steps: int, max_steps: int) -> RestoreOptions:
        """These options on an engine directory whose schedule defaults to `default_steps` and allows at most
        `max_steps` (`Manifest.schedule.default_steps`, `Manifest.max_steps`): steps filled in and checked."""
        check_arguments(steps=default_steps if self.steps is None else self.steps, max_steps=max_steps)
        return self if self.steps is not None else replace(self, steps=default_steps)

    def key(self) -> dict[str, Any]:
        """Every field, as JSON: what decides an output's pixels besides the image, the engines and the output
        format (the resume key of `adaptbir-ray restore`)."""
        return asdict(self)

    # ---------------------------------------------------------------------------- other spellings

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> RestoreOptions:
        """From the parsed command line (`add_arguments`); a field the command has no flag for keeps its
        default (`adaptbir plan` has no --seed)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if hasattr(args, "no_resize_back"):
            given["resize_back"] = not args.no_resize_back
        return cls(**given)

    @classmethod
    def from_query(cls, query: str) -> RestoreOptions:
        """From an HTTP query string: only `QUERY_FIELDS`, each at most once and of its type."""
        return cls.from_pairs(parse_qsl(query, keep_blank_values=True))

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]]) -> RestoreOptions:
        """From a parsed query's (name, value) pairs (`from_query`; the service first takes its own out)."""
        names = [name for name, _ in pairs]
        unknown = sorted(set(names) - set(QUERY_FIELDS))
        if unknown:
            raise ArgumentError(f"unknown parameter(s) {unknown}; known: {', '.join(QUERY_FIELDS)}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ArgumentError(f"parameter(s) {repeated} given more than once")
        given = {}
        for name, value in pairs:
            try:
                given[name] = QUERY_FIELDS[name](value)
            except ValueError:  # seed_value says what a seed may be itself (ArgumentError)
                raise ArgumentError(f"{name}={value[:40]!r} is not a {QUERY_FIELDS[name].__name__}") from None
        return cls(**given)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, planning_only: bool = False, query_only: bool = False) -> None:
        """The options' flags. `planning_only`: those that decide how an image runs (sizes, tiling, whether
        MUSIQ runs), for `adaptbir plan`; `query_only`: those a service client may set (`QUERY_FIELDS`, for
        `adaptbir-ray submit`); otherwise all of them (`adaptbir restore`)."""
        for flags, kwargs in _FLAGS:
            name = flags[0].removeprefix("--").replace("-", "_")
            if (not planning_only or name in _PLANNING) and (not query_only or name in QUERY_FIELDS):
                parser.add_argument(*flags, **kwargs)


_PLANNING = {"score", "sr_scale", "no_resize_back", "tile_size", "memory_budget"}  # `adaptbir plan`'s flags
_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--score",), {"type": float, "help": "use this MUSIQ score instead of running MUSIQ"}),
    (("--sr-scale",), {"type": float, "default": 1.0, "help": "super-resolution pre-scale (0.125..16)"}),
    (("--no-resize-back",), {"action": "store_true", "help": "keep the processing size"}),
    (("--tile-size",), {"type": int, "help": "tile size in px (multiple of 64; 0 = never tile; default: untiled "
                        "whenever the predicted peak fits the memory budget, else 512 px tiles)"}),
    (("--memory-budget",), {"type": bytes_argument, "metavar": "SIZE", "help": "memory a restore may use, e.g. 12G "
                            "(default: 85%% of what the process can reach)"}),
    (("--steps",), {"type": int, "help": "sampling steps (default: the engine directory's schedule default, 50 for "
                    "SD; 2 up to its timesteps)"}),
    (("--seed",), {"type": seed_argument, "help": "seed of every image, or 'random' for a fresh draw each (default: "
                   "derived from each image's pixels, so a re-run gives the same output; recorded)"}),
    (("--k",), {"type": float, "help": "override the latent interpolation weight k (0..1)"}),
    (("--w",), {"type": float, "help": "override the CSFT strength w (0..100; the gate gives 0..1)"}),
    (("--color-fix",), {"default": "none", "choices": COLOR_FIXES,
                        "help": "match the colours of the input's reconstruction"}),
]
