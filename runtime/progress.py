"""What a batch tells the person waiting: each image's stages, its sampling steps with an honest ETA.

On a terminal: an images bar and, per image, a status (stage, tiles) and a steps bar. Elsewhere (a pipe,
a log file, CI): plain lines, one per stage and one every `every` steps, never a carriage return.
`quiet`: nothing but errors and the summary.

Every line and bar text goes through `printable`: a file name is data, and a newline or an escape sequence
in it must not forge a line or reach the terminal.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from typing import TextIO

# C0 and C1 controls, DEL, line/paragraph separators, bidi overrides and isolates (they reorder what follows
# on the line), and lone surrogates (the undecodable bytes of a file name, which stdout cannot even encode).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     r"\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """`text` safe to print as (part of) one line: every character that could end the line, move the cursor,
    reorder the text or fail to encode is written as its escape (`\\n`, `\\x1b`, `\\u202e`)."""
    return _UNSAFE.sub(lambda match: _escaped(match.group()), text)


STAGE_NAMES = {"musiq": "scoring (MUSIQ)", "encode": "encoding", "sample": "sampling", "decode": "decoding"}


def step_eta(times: list[float], done: int, total: int) -> str:
    """Rate and ETA from the steps after the first, given the sampling start and each step's end time: the
    first step carries one-off warm-up (arena growth, compilation) and made a naive ETA read minutes/step."""
    if done < 2:
        return f"first step {times[1] - times[0]:.1f} s"
    rate = (times[-1] - times[1]) / (done - 1)
    return f"{rate:.2f} s/step, eta {_clock(rate * (total - done))}"


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def _stage_text(stage: str, tiles: int) -> str:
    return STAGE_NAMES.get(stage, stage) + (f", {tiles} tiles" if tiles > 1 else "")


class BatchProgress:
    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None, every: int = 10):
        self.stream = stream or sys.stderr
        self.mode = "off" if quiet else "bars" if self.stream.isatty() else "lines"
        self.total, self.every, self.index = total, every, 0
        self.images_bar = None
        if self.mode == "bars":
            from tqdm import tqdm

            # A fixed size: a terminal that reports 0 rows made tqdm hide every bar as "below the screen".
            columns, rows = shutil.get_terminal_size((100, 24))
            self.size = {"ncols": columns or 100, "nrows": rows or 24}
            self.images_bar = tqdm(total=total, desc="images", unit="img", file=self.stream, **self.size)

    def image(self, name: str, steps: int | None = None) -> ImageProgress:
        """The next image's hooks; `steps`, its sampling steps, is the steps bar's total from its first draw."""
        self.index += 1
        name = printable(name)
        return ImageProgress(self, name, f"[{self.index}/{self.total}] {name}", steps)

    def write(self, line: str) -> None:
        """A whole line (an error, a warning), never mixed into a bar."""
        line = printable(line)
        if self.images_bar is not None:
            self.images_bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def advance(self) -> None:
        if self.images_bar is not None:
            self.images_bar.update(1)

    def finished(self, name: str, outcome: str, seconds: float) -> None:
        """An image finished elsewhere (a Ray actor): as `ImageProgress.finish` says one finished here."""
        self.index += 1
        self.ended(f"[{self.index}/{self.total}] {name}", name, outcome, seconds)

    def ended(self, label: str, name: str, outcome: str, seconds: float) -> None:
        """An image is done with (`outcome`: ok, failed, ...): its line, or the images bar moved on past it."""
        if self.mode == "lines":
            self.write(f"{label}: {outcome} ({seconds:.1f} s)")
        elif self.mode == "bars":
            self.images_bar.set_postfix_str(printable(f"{name}: {outcome}"), refresh=False)
        self.advance()

    def close(self) -> None:
        """The images bar's last draw says how the batch ended, not the last image's stage."""
        if self.images_bar is not None:
            done = self.images_bar.n == self.total
            self.images_bar.set_postfix_str("done" if done else "stopped", refresh=False)
            self.images_bar.close()


class ImageProgress:
    """Hooks for one image: `stage(name, tiles)` as each stage begins, `step(i, n)` after each step."""

    def __init__(self, batch: BatchProgress, name: str, label: str, steps: int | None = None):
        self.batch, self.name, self.label, self.steps = batch, name, label, steps
        self._steps = None
        self._times = [time.perf_counter()]
        self._started = time.perf_counter()

    def stage(self, stage: str, tiles: int) -> None:
        self._close_steps()
        self._times = [time.perf_counter()]  # step times count from the stage's start
        text = _stage_text(stage, tiles)
        if self.batch.mode == "lines":
            self.batch.write(f"{self.label}: {text}")
        elif self.batch.mode == "bars":
            self.batch.images_bar.set_postfix_str(f"{self.name}: {text}")
            if stage == "sample":
                self._open_steps()

    def step(self, done: int, total: int) -> None:
        self._times.append(time.perf_counter())
        eta = step_eta(self._times, done, total)
        if self._steps is not None:
            self._steps.total = total
            self._steps.set_postfix_str(eta, refresh=False)
            self._steps.update(done - self._steps.n)  # a service's events may pass over steps
        elif self.batch.mode == "lines" and (done == 1 or done % self.batch.every == 0 or done == total):
            self.batch.write(f"{self.label}: step {done}/{total}, {eta}")

    def finish(self, outcome: str) -> None:
        """The image is done with (`outcome`: ok, failed, ...): `BatchProgress.ended`."""
        self._close_steps()
        self.batch.ended(self.label, self.name, outcome, time.perf_counter() - self._started)

    def _open_steps(self) -> None:
        from tqdm import tqdm

        self._steps = tqdm(total=self.steps, desc="  steps", unit="step", file=self.batch.stream, position=1,
                           leave=False, **self.batch.size, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} "
                           "[{elapsed}{postfix}]")

    def _close_steps(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None


def say(line: str, stream: TextIO | None = None) -> None:
    """Print one line (stderr by default) with the control characters of the names in it escaped."""
    print(printable(line), file=sys.stderr if stream is None else stream)


def plural(count: float, noun: str) -> str:
    """`1 image`, `2 images`, `0.8 CPUs`."""
    return f"{count:g} {noun}{'' if count == 1 else 's'}"
