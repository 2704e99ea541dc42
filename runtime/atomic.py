"""Atomic writes: a dot-named temporary file (or directory) beside the destination, then one rename.

A reader never sees half a file or half a directory, and on any error the destination is untouched and
nothing is left over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


# ------------------------------------------------------------------------------------------ directories

STAGING_MARK = ".building-"


@contextlib.contextmanager
def staged_directory(out: Path, is_replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Build a directory in a hidden sibling that replaces `out` in one step when the block succeeds.

    On any failure or interrupt the sibling is removed and `out` is untouched; a sibling left by a killed
    process (its pid is gone) is removed by the next build. `is_replaceable(out)` guards an existing `out`
    (e.g. "it is an engine directory"), so that a wrong path never destroys a user's folder.
    """
    out = Path(out).resolve()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_replaceable(out))):
        raise FileExistsError(f"{out} exists and is not a directory this build may replace")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_abandoned(out: Path) -> None:
    for sibling in out.parent.glob(f".{glob.escape(out.name)}{STAGING_MARK}*"):
        pid = sibling.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(sibling, ignore_errors=True)


def _replace(new: Path, out: Path) -> None:
    """`new` takes the place of `out`; the old content is removed afterwards."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):  # one atomic step: readers see the old directory or the new one
        shutil.rmtree(new)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where it is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
