"""Image sizes as people type them: `HxW`, height first (`512x768`, `512X768`, `512×768`)."""

from __future__ import annotations

import argparse
import re

from .errors import ArgumentError

Size = tuple[int, int]


def parse_size(text: str, multiple: int = 64) -> Size:
    """(height, width) from `HxW`; both positive multiples of `multiple` (the runtime pads to 64)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not match:
        raise ArgumentError(f"image size {text!r} is not HxW (height x width, e.g. 512x768)")
    h, w = int(match.group(1)), int(match.group(2))
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ArgumentError(f"image size {h}x{w} (HxW): height and width must be positive multiples of {multiple}")
    return h, w


def describe_size(height: int, width: int) -> str:
    """A size for people, saying which number is which: `512×600 (W×H)`, as image viewers print it."""
    return f"{width}×{height} (W×H)"


def size_argument(text: str) -> Size:
    """`parse_size` as an argparse type, so a bad size is a usage error."""
    try:
        return parse_size(text)
    except ArgumentError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
