"""Atomic file writes: a dot-named temporary file beside the destination, fsync, then os.replace.

A reader never sees half a file, and on any error the destination is untouched and nothing is left over.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


@functools.cache
def new_file_mode() -> int:
    """0o666 minus the umask, as open() would create it; mkstemp makes 0o600 files instead.

    Read from /proc rather than os.umask(), which would change the process's umask for a moment."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(file)` writes, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data does
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
