"""Atomic writes: a dot-named temporary file (or directory) beside the destination, or in a folder of
temporaries on the same filesystem, then one rename.

A reader never sees half a file or half a directory, and on any error the destination is untouched and
nothing is left over. Also: opening only regular files (`open_regular`), and a batch's folder of
temporaries (`open_temporaries`), cleaned of what a killed process left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import shutil
import socket
import stat
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


NAME_MAX = 255  # bytes in one file name (Linux and macOS file systems)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], temporary_dir: Path | None = None) -> None:
    """Create or replace `path` with what `write(file)` writes, atomically.

    The temporary file is `temporary_dir/tmpXXXXXXXX` (a folder on the same filesystem), else a dot-named
    sibling `.NAME.XXXXXXXX.tmp`, NAME cut short where the whole would pass NAME_MAX."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temporary_dir is not None:
        fd, tmp = tempfile.mkstemp(prefix="tmp", dir=temporary_dir)
    else:
        stem = os.fsdecode(os.fsencode(path.name)[:NAME_MAX - 32])  # mkstemp adds 8 + ".tmp"; room to spare
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent)
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


# ------------------------------------------------------------------------------------- regular files only

_KINDS = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


class SpecialFileError(OSError):
    """A path that is there but is not a regular file (a FIFO, socket, device or directory)."""

    def __init__(self, path: Path, kind: str):
        super().__init__(errno.EINVAL, f"is a {kind}, not a regular file", str(path))
        self.kind = kind


def kind_of(mode: int) -> str:
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "special file")


def file_kind(path: Path) -> str | None:
    """What is at `path`, links followed ("regular file", "FIFO (named pipe)", ...); None when nothing is (or
    when it cannot be looked at: the open that follows says why)."""
    try:
        return kind_of(os.stat(path).st_mode)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else None
    except OSError:
        return None


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """os.open, for a regular file only: anything else is a SpecialFileError before any open (opening a FIFO
    blocks, or releases a writer waiting on it; opening a device can act on it). The open itself is
    non-blocking and checked with fstat, so a file swapped for a FIFO in between cannot hang it either."""
    kind = file_kind(path)
    if kind not in (None, "regular file"):
        raise SpecialFileError(path, kind)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(st_mode := os.fstat(fd).st_mode):
            raise SpecialFileError(path, kind_of(st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------------- a batch's temporaries

TEMPORARIES = ".adaptbir-tmp"


def open_temporaries(folder: Path) -> Path:
    """A new private folder for this process's temporary files, in `folder`/.adaptbir-tmp: on the outputs'
    filesystem (os.replace stays atomic), with short names (a 255-byte output name still fits), and one
    place to clean. Folders of this host's processes that are gone (SIGKILL) are removed first; a live
    run's are left alone."""
    shared = Path(folder) / TEMPORARIES
    shared.mkdir(exist_ok=True)
    for run in shared.iterdir():
        owner, _, pid = run.name.rpartition("-")[0].rpartition("-")
        if owner == host_name() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(run, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{host_name()}-{os.getpid()}-", dir=shared))


def host_name() -> str:
    """This machine's name as a run's folder of temporaries starts: a pid means something on its host only."""
    return "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())[:64]


def close_temporaries(mine: Path) -> None:
    """Remove this process's folder of temporaries, and the shared one if no other run is using it."""
    shutil.rmtree(mine, ignore_errors=True)
    with contextlib.suppress(OSError):
        mine.parent.rmdir()


def temporaries_for(folder: Path, temporaries: Path) -> Path | None:
    """Where temporaries for outputs in `folder` go: `temporaries`, or None (beside each output) when
    `folder` is on another filesystem (a mount point inside OUTDIR). Tried for real, a file created there
    and renamed into `folder`, as every write will be: read-only mounts, ACLs and immutable folders show
    up here as the OSError the write would have met, before any work."""
    fd, tmp = tempfile.mkstemp(prefix="probe", dir=temporaries)
    os.close(fd)
    probe = Path(folder) / f".adaptbir-probe-{Path(tmp).name}"
    try:
        os.replace(tmp, probe)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno != errno.EXDEV:
            raise OSError(err.errno, err.strerror, str(folder)) from None  # the folder, not the probe's name
        probe.touch()  # another filesystem: can temporaries be made in `folder` itself?
        temporaries = None
    probe.unlink()
    return temporaries


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal is sent: only whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; not a pid at all: not ours to remove
        return True
    return True


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
    staging = _fresh_sibling(out, "")
    try:
        yield staging
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_directory(out: Path, label: str) -> Iterator[Path]:
    """A hidden working folder beside `out` (`.NAME.building-LABEL-PID`), removed when the block ends however
    it ends; one left by a killed process is removed by the next build of `out`, as its staging is."""
    scratch = _fresh_sibling(Path(out).resolve(), f"{label}-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fresh_sibling(out: Path, label: str) -> Path:
    """An empty hidden folder `.NAME.building-LABELPID` beside `out`, those of killed processes removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    folder = out.parent / f".{out.name}{STAGING_MARK}{label}{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _remove_abandoned(out: Path) -> None:
    for sibling in out.parent.glob(f".{glob.escape(out.name)}{STAGING_MARK}*"):
        pid = sibling.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
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
