"""Stop signals for a batch: SIGINT, SIGTERM and SIGHUP alike, so an output and its record are never cut in
half and the batch ends with its summary (exit 128 + the signal)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) cut an image's reading or restore short."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP, alike, for a whole batch: inside `abandonable()` (reading and restoring
    an image) the image is dropped at once; anywhere else (an output's write, its record) the work finishes
    and the batch stops before the next image. A signal that was ignored (nohup, a background job) stays
    ignored; the previous handlers come back at the end. Main thread only: the one Python signals reach."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._abandon = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def install(self) -> StopSignals:
        """Our handlers; again after a library replaced them (Ray's core worker installs its own SIGTERM
        handler in `ray.init`, which ends the process at once)."""
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                current = signal.getsignal(number)
                if current is not signal.SIG_IGN and current != self._received:
                    previous = signal.signal(number, self._received)
                    self._previous.setdefault(number, previous)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():  # None: set outside Python; the default then
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def _received(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        if self._abandon:
            self._abandon = False
            raise Interrupted(self.signum)

    def stopped(self, err: KeyboardInterrupt) -> None:
        """Note a KeyboardInterrupt that was raised, not signalled (Ctrl-C as Python's default handler
        turns it into one, or a progress callback)."""
        self.signum = self.signum or getattr(err, "signum", signal.SIGINT)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        self._abandon = True
        try:
            if self.signum:  # checked once armed: a signal just before raises here, one after in the handler
                raise Interrupted(self.signum)
            yield
        finally:
            self._abandon = False


def command(main: Callable[..., int]) -> Callable[..., int]:
    """A command's `main`, ended quietly when the reader of its output goes away (`adaptbir info | head`):
    no traceback, stdout pointed at /dev/null so the interpreter's last flush cannot fail again, and the
    status a shell gives a command killed by SIGPIPE (141)."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE

    return run
