"""A batch that no path, signal or name can corrupt (issue 21).

Every place a batch writes is tried before the first image; SIGINT, SIGTERM and SIGHUP stop it with whole
outputs, a record per finished image, a summary and nothing temporary left; a 255-byte name can be written;
FIFOs, sockets and devices are named, never opened; a name's control characters never reach a line raw.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptbir.runtime import atomic, batch, cli, image_io
from adaptbir.runtime.atomic import TEMPORARIES, SpecialFileError, host_name, open_regular
from adaptbir.runtime.image_io import read_image, write_image
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.progress import BatchProgress

FAST = ["--steps", "2", "--score", "50", "--seed", "1"]
LONG_NAMES = ["x" * 251 + ".png", "é" * 125 + "x.png"]  # 255 bytes each: the longest legal name
assert all(len(os.fsencode(name)) == 255 for name in LONG_NAMES)


def _photo(path: Path, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 100, np.uint8)).save(path)
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _everything(folder: Path) -> list[str]:
    """Every path under `folder`, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "adaptbir.runtime.cli", *map(str, args)]


def _wait_for_output(batch: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not list(out.glob("*.png")) and batch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert batch.poll() is None, "the batch ended before it could be signalled"


# --------------------------------------------------------------------------- every place written, first


@pytest.fixture
def read_only():
    """`read_only(folder)`: a folder nobody can write in, root included (root ignores modes; the immutable
    attribute stops it too)."""
    frozen: list[Path] = []
    root = os.geteuid() == 0

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        frozen.append(folder)
        if root and (not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode):
            pytest.skip("running as root where chattr +i is not available: no folder is read-only")
        return folder

    yield make
    for folder in frozen:
        if root and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# Each case: (OUTDIR, --report, the path the error names, why) from (tmp_path, read_only).
UNWRITABLE = {
    "report is a folder": lambda t, ro: (t / "out", t, t, "is a directory, not a regular file"),
    "report under a file": lambda t, ro: (t / "out", _file(t / "f") / "r.jsonl", t / "f",
                                          "is a regular file, not a folder"),
    "report in a read-only folder": lambda t, ro: (t / "out", ro(t / "ro") / "r.jsonl", t / "ro" / "r.jsonl",
                                                   "cannot open it for appending"),
    "report is a FIFO": lambda t, ro: (t / "out", _fifo(t / "r.jsonl"), t / "r.jsonl",
                                       "is a FIFO (named pipe), not a regular file"),
    "OUTDIR is a file": lambda t, ro: (_file(t / "out"), None, t / "out", "is a regular file, not a folder"),
    "OUTDIR is read-only": lambda t, ro: (ro(t / "out"), None, t / "out", "cannot write in it"),
    "OUTDIR under a file": lambda t, ro: (_file(t / "f") / "out", None, t / "f", "is a regular file, not a folder"),
    "a destination folder is a file": lambda t, ro: (_file(t / "out" / "sub").parent, None, t / "out" / "sub",
                                                     "is a regular file, not a folder"),
    "a destination folder is read-only": lambda t, ro: (ro(t / "out" / "sub").parent, None, t / "out" / "sub",
                                                        "cannot write in it"),
}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_places_stop_the_batch_before_the_engines_load(micro_engines, tmp_path, read_only,
                                                                  monkeypatch, capsys, case):
    _photo(tmp_path / "in" / "a.png")
    _photo(tmp_path / "in" / "sub" / "b.png")
    out, report, named, why = UNWRITABLE[case](tmp_path, read_only)
    before = _everything(tmp_path)
    monkeypatch.setattr(Pipeline, "from_engines", lambda *a, **k: pytest.fail("the engines were loaded"))
    extra = ["--report", str(report)] if report else []
    rc = cli.main(["restore", str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), *FAST, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("adaptbir: error: "), err
    assert str(named) in err and why in err, err
    assert _everything(tmp_path) == before  # nothing written, nothing left (no OUTDIR, no temporaries)


def test_a_report_that_fails_mid_batch_stops_it_in_one_line(micro_engines, tmp_path, monkeypatch, capsys):
    calls = []
    append = batch.append_report

    def full_disk_on_the_second(path, record):
        calls.append(record["input"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        append(path, record)

    monkeypatch.setattr(batch, "append_report", full_disk_on_the_second)
    inputs = [_photo(tmp_path / "in" / f"{n}.png") for n in "abc"]
    report = tmp_path / "r.jsonl"
    assert cli.main(["restore", *map(str, inputs), "-o", str(tmp_path / "out"), "--engines", str(micro_engines),
                     "--report", str(report), "--quiet", *FAST]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"adaptbir: --report {report}: cannot append a record (No space" in err
    assert "restored 2, skipped 0, failed 1 of 3" in err and len(calls) == 2  # c was never started
    assert [r["input"] for r in _records(report)] == [str(inputs[0])]


# ------------------------------------------------------------------------------------------ stop signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_mid_batch_leaves_whole_outputs_records_and_a_summary(micro_engines, tmp_path, signum):
    """A real batch, signalled as soon as its first output appears (whatever it is doing then)."""
    for n in range(8):
        _photo(tmp_path / "in" / f"{n}.png", size=64)
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    batch = subprocess.Popen(_cli("restore", tmp_path / "in", "-o", out, "--engines", micro_engines, "--steps", "20",
                                  "--score", "50", "--report", report), stderr=subprocess.PIPE, text=True)
    _wait_for_output(batch, out)
    batch.send_signal(signum)
    err = batch.communicate(timeout=120)[1]
    outputs = sorted(p.name for p in out.glob("*.png"))
    assert batch.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    summary = f"interrupted after {len(outputs)}, skipped 0, failed 0 of 8 inputs -> {out} ({name})"
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [summary], err[-3000:]
    assert 1 <= len(outputs) < 8 and all(read_image(out / o).rgb.shape == (64, 64, 3) for o in outputs)
    records = _records(report)
    assert sorted(Path(r["output"]).name for r in records if r["status"] == "ok") == outputs
    assert [r["status"] for r in records if r["status"] != "ok"] in ([], ["interrupted"])
    assert _everything(out) == outputs  # no temporary file, no folder of temporaries


SIGNAL_AT = """
import os, signal, sys, time
from pathlib import Path
from adaptbir.runtime import cli, image_io
from adaptbir.runtime.pipeline import Pipeline

where, number = sys.argv[1], int(sys.argv[2])

def signal_me():
    os.kill(os.getpid(), number)
    time.sleep(0.3)  # the handler runs during this: whatever it does, it does here

if where == "write":  # the temporary file holds the image, not yet renamed
    atomic_write = image_io.atomic_write
    def slow(path, write, temporary_dir=None):
        atomic_write(path, lambda f: (write(f), signal_me()), temporary_dir)
    image_io.atomic_write = slow
else:  # b is being restored
    restore = Pipeline.restore
    def restore_b(self, image, *args, **options):
        if Path(image.source).stem == "b":
            signal_me()
        return restore(self, image, *args, **options)
    Pipeline.restore = restore_b
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where,signum", [("write", signal.SIGTERM), ("write", signal.SIGHUP),
                                          ("restore", signal.SIGTERM), ("restore", signal.SIGHUP)],
                         ids=lambda v: getattr(v, "name", v))
def test_a_stop_signal_lets_a_write_finish_and_abandons_a_restore(micro_engines, tmp_path, where, signum):
    inputs = [_photo(tmp_path / "in" / f"{n}.png") for n in "abc"]
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    args = ["restore", *inputs, "-o", out, "--engines", micro_engines, *FAST, "--report", report]
    run = subprocess.run([sys.executable, "-c", SIGNAL_AT, where, str(int(signum)), *map(str, args)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    statuses = {"write": ["ok"], "restore": ["ok", "interrupted"]}[where]
    assert [r["status"] for r in _records(report)] == statuses
    assert _everything(out) == ["a.png"] and read_image(out / "a.png").rgb.shape == (24, 24, 3)
    assert f"interrupted after 1, skipped 0, failed 0 of 3 inputs -> {out} ({signal.Signals(signum).name})" \
        in run.stderr


def test_the_handlers_cover_the_batch_and_leave_ignored_signals_ignored(micro_engines, tmp_path, monkeypatch):
    """Under nohup SIGHUP is ignored: a batch must not start obeying it. Afterwards all is as before."""
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    seen = []
    restore, write = Pipeline.restore, batch.write_output

    def restoring(self, image, *args, **options):
        seen.append({s: signal.getsignal(s) for s in watched})
        return restore(self, image, *args, **options)

    def writing(job, out, args):
        seen.append({s: signal.getsignal(s) for s in watched})
        write(job, out, args)

    monkeypatch.setattr(Pipeline, "restore", restoring)
    monkeypatch.setattr(batch, "write_output", writing)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        before = {s: signal.getsignal(s) for s in watched}
        assert cli.main(["restore", str(_photo(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--engines",
                         str(micro_engines), "--quiet", *FAST]) == 0
        after = {s: signal.getsignal(s) for s in watched}
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert len(seen) == 2 and seen[0] == seen[1]  # the same handlers while restoring and while writing
    assert seen[0][signal.SIGHUP] is signal.SIG_IGN
    assert all(seen[0][s] is not before[s] and callable(seen[0][s]) for s in (signal.SIGINT, signal.SIGTERM))
    assert after == before


# --------------------------------------------------------------------------------------- temporaries


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_live_in_one_hidden_folder_that_fits_long_names(micro_engines, tmp_path, monkeypatch):
    """Each temporary file is OUTDIR/.adaptbir-tmp/HOST-PID-XXXXXXXX/tmpXXXXXXXX, so a 255-byte output name
    can be written; a killed run's folder is removed by the next run, a live one's is left alone, and a
    folder of temporaries inside an input folder is never walked. Without a folder of temporaries (the
    exporter, Ray actors), or for a destination on another filesystem, the temporary goes beside the output
    with a name cut to fit."""
    folder = tmp_path / "in"
    inputs = [_photo(folder / name) for name in ["a.png", *LONG_NAMES]]
    _photo(folder / TEMPORARIES / "old" / "leftover.png")  # an old OUTDIR given as input
    out = tmp_path / "out"
    dead, live = out / TEMPORARIES / f"{host_name()}-{_dead_pid()}-dead0000", None
    _file(dead / "tmpdead0000")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = out / TEMPORARIES / f"{host_name()}-{sleeper.pid}-live0000"
    _file(live / "tmplive0000")
    during = []
    real = image_io.atomic_write

    def watched(path, write, temporary_dir=None):
        real(path, lambda f: (write(f), during.append(_everything(out / TEMPORARIES))), temporary_dir)

    monkeypatch.setattr(image_io, "atomic_write", watched)
    try:
        report = tmp_path / "r.jsonl"
        assert cli.main(["restore", str(folder), "-o", str(out), "--engines", str(micro_engines), "--quiet",
                         "--report", str(report), *FAST]) == 0
        assert sorted(r["input"] for r in _records(report)) == sorted(map(str, inputs))
        mine = re.compile(rf"{re.escape(host_name())}-{os.getpid()}-\w{{8}}/tmp\w{{8}}")
        for listing in during:
            theirs = [p for p in listing if live.name in p]
            assert theirs == [live.name, f"{live.name}/tmplive0000"] and not any(dead.name in p for p in listing)
            assert len([p for p in listing if mine.fullmatch(p)]) == 1, listing
        assert len(during) == 3 and all(read_image(out / name).rgb.shape == (24, 24, 3) for name in LONG_NAMES)
        assert _everything(out) == sorted([*(p.name for p in inputs), TEMPORARIES, f"{TEMPORARIES}/{live.name}",
                                           f"{TEMPORARIES}/{live.name}/tmplive0000"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert cli.main(["restore", str(folder), "-o", str(out), "--engines", str(micro_engines), "--quiet",
                     *FAST]) == 0  # all skipped; the live run has ended since
    assert TEMPORARIES not in _everything(out)
    plain = tmp_path / "plain" / LONG_NAMES[1]  # the exporter's and the Ray actors' way: beside the output
    write_image(plain, np.zeros((8, 8, 3), np.uint8))
    assert _everything(plain.parent) == [plain.name]
    replace = os.replace  # a destination folder on another filesystem (a mount inside OUTDIR): beside it

    def across_filesystems(source, target):
        if Path(target).name.startswith(".adaptbir-probe-"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        replace(source, target)

    monkeypatch.setattr(os, "replace", across_filesystems)
    temporaries = atomic.open_temporaries(out)
    assert atomic.temporaries_for(plain.parent, temporaries) is None and _everything(plain.parent) == [plain.name]
    atomic.close_temporaries(temporaries)
    assert TEMPORARIES not in _everything(out)


def test_a_killed_batch_leaves_only_whole_outputs_and_the_next_run_cleans_up(micro_engines, tmp_path):
    """SIGKILL cannot be handled: what it leaves is temporaries, which the next run removes."""
    for n in range(4):
        _photo(tmp_path / "in" / f"{n}.png", size=64)
    out = tmp_path / "out"
    batch = subprocess.Popen(_cli("restore", tmp_path / "in", "-o", out, "--engines", micro_engines, "--steps", "20",
                                  "--score", "50", "--quiet"), stderr=subprocess.DEVNULL)
    _wait_for_output(batch, out)
    batch.kill()
    batch.wait()  # reaped: a zombie still counts as a live process
    assert all(read_image(p).rgb.shape == (64, 64, 3) for p in out.glob("*.png"))
    assert cli.main(["restore", str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), "--quiet",
                     *FAST]) == 0
    assert _everything(out) == [f"{n}.png" for n in range(4)]


# ------------------------------------------------------------------------------------- special files


def _blocked_writer(fifo: Path) -> threading.Thread:
    """A writer waiting in open() until someone opens `fifo` for reading."""
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer.start()
    return writer


def test_special_files_are_named_and_never_opened(micro_engines, tmp_path, monkeypatch):
    """FIFOs, sockets and devices, named on the command line or found by a walk, by `restore` and `plan`
    (with a timeout: a regression fails instead of hanging). A writer waiting on the FIFO is never
    released: nothing opened it. And the check on the opened descriptor alone (a file swapped for a FIFO
    after it was looked at) refuses it without blocking."""
    monkeypatch.chdir(tmp_path)  # short names: a socket's path is limited to 108 bytes
    _photo(Path("in") / "ok.png")
    os.mkfifo(Path("in") / "walked.png")
    os.mkfifo("fifo.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.png")
    kinds = {"in/walked.png": "FIFO (named pipe)", "fifo.png": "FIFO (named pipe)", "sock.png": "socket",
             "/dev/null": "character device"}
    writer = _blocked_writer(Path("fifo.png"))
    try:
        for command in (["restore", "-o", "out", *FAST, "--quiet"], ["plan", "--score", "50"]):
            run = subprocess.run(_cli(*command, "in", "fifo.png", "sock.png", "/dev/null", "--engines", micro_engines),
                                 capture_output=True, text=True, timeout=120)
            lines = (run.stdout + run.stderr).splitlines()
            assert run.returncode == 1, run.stderr[-3000:]
            for name, kind in kinds.items():
                assert any(name in line and f"is a {kind}, not a regular file" in line for line in lines), (name, lines)
            assert writer.is_alive()
        assert _everything(Path("out")) == ["ok.png"]  # restored
        assert run.stdout.startswith("in/ok.png: 24×24 → 512×512")  # planned
        monkeypatch.setattr(atomic, "file_kind", lambda path: None)  # as if the stat had seen a regular file
        refused = []
        opening = threading.Thread(target=lambda: refused.append(_refusal(Path("in") / "walked.png")), daemon=True)
        opening.start()
        opening.join(10)
        if hung := opening.is_alive():  # release it before failing
            os.close(os.open(Path("in") / "walked.png", os.O_WRONLY | os.O_NONBLOCK))
        assert not hung and refused == ["is a FIFO (named pipe), not a regular file"]
    finally:
        if writer.is_alive():
            os.close(os.open("fifo.png", os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
        sock.close()


def _refusal(path: Path) -> str:
    with pytest.raises(SpecialFileError) as info:
        os.close(open_regular(path))
    return info.value.strerror


# ------------------------------------------------------------------------------- names printed safely

FORGED = "evil\nrestored 9, skipped 0, failed 0 of 9 input(s) -> x\x1b[2J.png"
BROKEN = "bad\n  failed: nothing\x1b]0;owned\x07\u202egnp.png"  # not an image: a failure line names it
UNDECODABLE = "raw\udcff\x85.png"  # the bytes b"raw\xff\xc2\x85.png": not UTF-8, and a C1 control
RAW = set("\n\x1b\x07\x85\u202e\udcff")


def _clean(text: str) -> None:
    assert not RAW & set(text.replace("\n", "")), [c for c in text if c in RAW and c != "\n"]
    text.encode()  # a lone surrogate could not even be written to stdout


def test_control_characters_in_names_never_reach_a_line_raw(micro_engines, tmp_path, capsys):
    folder = tmp_path / "in"
    inputs = [_photo(folder / FORGED), _photo(folder / UNDECODABLE)]
    (folder / BROKEN).write_text("not an image")
    inputs.append(folder / BROKEN)
    report = tmp_path / "r.jsonl"
    assert cli.main(["restore", str(folder), "-o", str(tmp_path / "out"), "--engines", str(micro_engines),
                     "--report", str(report), *FAST]) == 1  # plain progress lines: stderr is not a terminal
    err = capsys.readouterr().err
    _clean(err)
    lines = err.splitlines()
    assert all(re.match(r"(\[[123]/3\] |adaptbir: |restored |  failed: )", line) for line in lines), lines
    assert [line for line in lines if line.startswith("restored ")] == [
        f"restored 2, skipped 0, failed 1 of 3 inputs -> {tmp_path / 'out'}"]
    assert len([line for line in lines if line.startswith("  failed: ")]) == 1
    for escaped in ("evil\\nrestored 9", "\\x1b[2J", "nothing\\x1b]0;owned\\x07\\u202e", "raw\\xff\\x85"):
        assert escaped in err, escaped
    assert sorted(r["input"] for r in _records(report)) == sorted(map(str, inputs))  # the report: exact

    assert cli.main(["plan", str(folder), "--engines", str(micro_engines), "--score", "50"]) == 1
    printed = capsys.readouterr().out
    _clean(printed)
    assert len(printed.splitlines()) == 3 and all(line.startswith(f"{folder}/") for line in printed.splitlines())
    assert cli.main(["plan", str(folder), "--engines", str(micro_engines), "--score", "50", "--json"]) == 1
    assert sorted(json.loads(line)["input"] for line in capsys.readouterr().out.splitlines()) == sorted(
        map(str, inputs))

    class Terminal:  # progress bars, as on a terminal
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

        def isatty(self):
            return True

    shown = BatchProgress(1, stream=(terminal := Terminal()))
    image = shown.image(FORGED)
    image.stage("sample", 1)
    image.step(1, 2)
    shown.write(f"adaptbir: {BROKEN}: warning")
    image.finish("ok")
    shown.advance()
    shown.close()
    assert "\x1b[2J" not in terminal.text and "\x1b]0" not in terminal.text and "\u202e" not in terminal.text
    assert "evil\nrestored" not in terminal.text and "evil\\nrestored 9" in terminal.text
