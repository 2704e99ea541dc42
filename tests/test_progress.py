"""Progress as people see it: bars on a terminal (even one that reports no size), plain lines elsewhere."""

from __future__ import annotations

import io
import os
import shutil

from adaptbir.runtime.progress import BatchProgress, step_eta


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _one_image(stream) -> str:
    batch = BatchProgress(1, stream=stream)
    image = batch.image("a.png", steps=3)
    image.stage("musiq", 1)
    image.stage("encode", 4)
    image.stage("sample", 4)
    for i in range(1, 4):
        image.step(i, 3)
    image.stage("decode", 4)
    image.finish("ok")
    batch.close()
    return stream.getvalue()


def test_a_terminal_without_a_size_still_shows_the_bars(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((0, 0)))
    shown = _one_image(Terminal())
    assert "images: 100%" in shown and "  steps:   0%" in shown  # tqdm redraws at most every 0.1 s
    assert "a.png: sampling, 4 tiles" in shown and "a.png: decoding, 4 tiles" in shown


def test_elsewhere_plain_lines_without_carriage_returns():
    shown = _one_image(io.StringIO())
    assert "\r" not in shown
    assert shown.splitlines()[:3] == ["[1/1] a.png: scoring (MUSIQ)", "[1/1] a.png: encoding, 4 tiles",
                                      "[1/1] a.png: sampling, 4 tiles"]


def test_the_eta_ignores_the_warm_up_step():
    start = 100.0
    assert step_eta([start, start + 30], 1, 50) == "first step 30.0 s"
    assert step_eta([start, start + 30, start + 32, start + 34], 3, 50) == "2.00 s/step, eta 1:34"


def test_bars_know_their_totals_from_the_start_and_end_saying_done(monkeypatch):
    """The steps bar never draws 0/1 before 1/50; a finished batch's bar says done, not its last stage."""
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((100, 24)))
    shown = _one_image(Terminal())
    draws = [d for d in shown.replace("\n", "\r").split("\r") if d.strip()]
    steps = [d for d in draws if "steps:" in d]
    assert steps and all("/3 " in d for d in steps), steps  # every draw of the steps bar has the real total
    final = [d for d in draws if d.startswith("images")][-1]
    assert "1/1" in final and final.rstrip().endswith("done]"), final


def test_a_stopped_batch_says_stopped():
    stream = Terminal()
    batch = BatchProgress(3, stream=stream)
    batch.image("a.png", steps=3).finish("ok")
    batch.close()
    final = [d for d in stream.getvalue().replace("\n", "\r").split("\r") if d.startswith("images")][-1]
    assert "1/3" in final and "stopped]" in final, final
