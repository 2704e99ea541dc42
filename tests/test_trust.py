"""A closed engine directory and a batch that never stops on one image.

Each attack on an engine directory is refused with an `EngineError` naming the file, whatever the ONNX
Runtime version; each bad argument is refused before any engine runs; each per-image failure is recorded
and the batch goes on; outputs never collide, never land on inputs, and nothing partial is left behind.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from adaptbir.runtime import cli
from adaptbir.runtime.errors import ArgumentError, EngineError, InputError
from adaptbir.runtime.image_io import read_image
from adaptbir.runtime.manifest import FileRecord, load_manifest, write_json_atomic
from adaptbir.runtime.pipeline import Pipeline

STEPS = ["--steps", "2", "--quiet"]


# ----------------------------------------------------------------------------------- the engine directory


@pytest.fixture
def copied(micro_engines, tmp_path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(micro_engines, out)
    return out


def _edit(directory: Path, change) -> None:
    """Rewrite the manifest the way an attacker who controls the whole directory would."""
    data = json.loads((directory / "manifest.json").read_text())
    change(data)
    write_json_atomic(directory / "manifest.json", data)


def _list(data: dict, directory: Path, name: str, path: Path | None = None) -> None:
    """Record `name` with the true size and sha256 of `path` (default: the file itself)."""
    data["files"][name] = FileRecord.of(path or directory / name).__dict__


def _refused(directory: Path, *fragments: str) -> str:
    with pytest.raises(EngineError) as info:
        load_manifest(directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_unlisted_graph_is_refused(copied):
    _edit(copied, lambda d: d["files"].pop("unet.onnx"))
    _refused(copied, "not listed under `files`", "unet.onnx (graph unet)")


def test_unlisted_external_data_is_refused(copied):
    _edit(copied, lambda d: d["graphs"]["decoder"].update(external_data="decoder.onnx.data"))
    _refused(copied, "decoder.onnx.data (external data of graph decoder)")


def test_absolute_path_is_refused(copied, tmp_path):
    outside = tmp_path / "elsewhere" / "unet.onnx"
    outside.parent.mkdir()
    shutil.copy(copied / "unet.onnx", outside)

    def attack(d):
        d["graphs"]["unet"]["file"] = str(outside)
        _list(d, copied, str(outside), outside)

    _edit(copied, attack)
    _refused(copied, str(outside))


def test_dotdot_path_is_refused(copied, tmp_path):
    shutil.copy(copied / "unet.onnx", tmp_path / "unet.onnx")

    def attack(d):
        d["graphs"]["unet"]["file"] = "../unet.onnx"
        _list(d, copied, "../unet.onnx", tmp_path / "unet.onnx")

    _edit(copied, attack)
    _refused(copied, "../unet.onnx")


def test_symlink_leaving_the_directory_is_refused(copied, tmp_path):
    outside = tmp_path / "unet-outside.onnx"
    (copied / "unet.onnx").rename(outside)  # same bytes, so the sha256 still matches
    (copied / "unet.onnx").symlink_to(outside)
    _refused(copied, "unet.onnx leaves the engine directory", str(outside))


def test_symlinked_directory_and_inner_symlinks_are_fine(copied, tmp_path):
    (copied / "decoder.onnx").rename(copied / "decoder-real.onnx")
    (copied / "decoder.onnx").symlink_to("decoder-real.onnx")
    (tmp_path / "current").symlink_to(copied)
    assert load_manifest(tmp_path / "current").graphs["decoder"].file == "decoder.onnx"


def _with_external_data(directory: Path, location: str) -> None:
    """The decoder's weights moved to external data at `location` (relative to the graph)."""
    model = onnx.load(str(directory / "decoder.onnx"))
    onnx.save(model, str(directory / "decoder.onnx"), save_as_external_data=True, location=location,
              size_threshold=0)


def test_graph_reaching_outside_through_external_data_is_refused(copied, tmp_path):
    """A graph whose external data points outside: the manifest lists (and hashes) the graph itself, but the
    graph names a file the manifest does not list."""
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(copied / "decoder.onnx"))
    convert_model_to_external_data(model, location="../secret.bin", size_threshold=0)  # references only
    (copied / "decoder.onnx").write_bytes(model.SerializeToString())
    _edit(copied, lambda d: _list(d, copied, "decoder.onnx"))
    _refused(copied, "decoder.onnx (graph decoder) references external data '../secret.bin'")


def test_swapped_external_data_is_refused(copied):
    _with_external_data(copied, "decoder.onnx.data")

    def relist(d):
        d["graphs"]["decoder"]["external_data"] = "decoder.onnx.data"
        _list(d, copied, "decoder.onnx")
        _list(d, copied, "decoder.onnx.data")

    _edit(copied, relist)
    Pipeline.from_engines(copied)  # the honest directory with external data loads and runs
    data = bytearray((copied / "decoder.onnx.data").read_bytes())
    data[:4] = b"\0\0\0\0" if data[:4] != b"\0\0\0\0" else b"\1\1\1\1"
    (copied / "decoder.onnx.data").write_bytes(bytes(data))
    _refused(copied, "decoder.onnx.data does not match its recorded sha256")


def _with_plan(directory: Path) -> None:
    (directory / "unet.0123456789abcdef.plan").write_bytes(b"plan bytes " * 100)

    def add(d):
        _list(d, directory, "unet.0123456789abcdef.plan")
        d["tensorrt"] = {"version": "11.0.0", "compute_capability": "9.0", "flags": ["STRONGLY_TYPED"],
                         "profile": {}, "timing_cache": "timing.cache",
                         "plans": {"unet": {"file": "unet.0123456789abcdef.plan", "key": "k", "shapes": {}}}}

    _edit(directory, add)


def test_swapped_plan_is_refused(copied):
    _with_plan(copied)
    assert load_manifest(copied).plan_path("unet").name == "unet.0123456789abcdef.plan"
    (copied / "unet.0123456789abcdef.plan").write_bytes(b"other bytes" * 100)
    _refused(copied, "unet.0123456789abcdef.plan does not match its recorded sha256")


def test_unlisted_plan_is_refused(copied):
    _with_plan(copied)
    _edit(copied, lambda d: d["files"].pop("unet.0123456789abcdef.plan"))
    _refused(copied, "unet.0123456789abcdef.plan (TensorRT plan of unet)")


def test_swapped_context_is_refused(copied):
    np.save(copied / "context.npy", np.zeros((1, 77, 32), np.float32))
    _refused(copied, "context.npy does not match its recorded sha256")


def test_pickled_context_is_refused_even_when_listed(copied):
    """A pickle is never unpickled, even with a manifest that records its true sha256."""
    with (copied / "context.npy").open("wb") as f:
        np.save(f, np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    _edit(copied, lambda d: _list(d, copied, "context.npy"))
    load_manifest(copied)  # listed and hashed: the manifest alone cannot tell
    with pytest.raises(EngineError, match=r"context\.npy: not a plain float32 \.npy array"):
        Pipeline.from_engines(copied)


def test_context_of_the_wrong_shape_is_refused(copied):
    np.save(copied / "context.npy", np.zeros((1, 77, 16), np.float32))
    _edit(copied, lambda d: _list(d, copied, "context.npy"))
    with pytest.raises(EngineError, match=r"context\.npy: float32 \[1, 77, 16\], the manifest records float32 "
                                          r"\[1, 77, 32\]"):
        Pipeline.from_engines(copied)


def test_foreign_gating_rule_is_refused(copied):
    _edit(copied, lambda d: d["gating"].update(k_max=0.9))
    _refused(copied, "gating rule")


def test_directory_without_musiq_loads_and_asks_for_the_score(copied):
    def drop(d):
        del d["graphs"]["musiq"], d["files"]["musiq.onnx"]
        d["capabilities"]["has_musiq"] = False

    _edit(copied, drop)
    (copied / "musiq.onnx").unlink()
    pipeline = Pipeline.from_engines(copied)
    photo = np.full((64, 64, 3), 120, np.uint8)
    with pytest.raises(InputError, match="no MUSIQ graph: give the score"):
        pipeline.restore(photo, steps=2, seed=0)
    assert pipeline.restore(photo, steps=2, seed=0, score=50).image.shape == photo.shape


def test_written_manifest_is_validated(copied):
    manifest = load_manifest(copied)
    with pytest.raises(EngineError, match="invalid manifest at precision"):
        replace(manifest, precision="fp8").write(copied)
    assert load_manifest(copied).precision == "fp32"  # the file on disk was not touched


# ------------------------------------------------------------------------------------------- arguments


@pytest.fixture(scope="module")
def pipeline(micro_engines):
    return Pipeline.from_engines(micro_engines, threads=2)


@pytest.mark.parametrize("options,message", [
    ({"score": float("nan")}, "score must be a finite number"),
    ({"k": 5}, r"k must be in \[0, 1\]"),
    ({"w": -3}, "w must be from 0 to 100"),
    ({"w": float("inf")}, "w must be a finite number"),
    ({"sr_scale": float("inf")}, "sr_scale must be a finite number"),
    ({"sr_scale": 100}, "sr_scale must be from 0.125 to 16"),
    ({"color_fix": "sepia"}, "color_fix must be one of none, adain, wavelet"),
    ({"steps": 1}, "steps must be an integer from 2 to 1000"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"seed": -1}, "seed must be an integer from 0"),
    ({"tile_size": 100}, "tile size must be 0 .* or a multiple of 64"),
])
def test_api_checks_every_argument_before_any_engine_runs(pipeline, monkeypatch, options, message):
    monkeypatch.setattr(pipeline.engines, "run", lambda *a, **k: pytest.fail("an engine ran"))
    with pytest.raises(ArgumentError, match=message):
        pipeline.restore(np.zeros((64, 64, 3), np.uint8), **{"steps": 2, **options})


def test_w_above_one_is_a_warning(pipeline):
    result = pipeline.restore(np.full((64, 64, 3), 90, np.uint8), steps=2, seed=0, score=50, w=1.5)
    assert result.w == 1.5 and any("above 1" in w for w in result.warnings)


@pytest.mark.parametrize("args,message", [
    (["--score", "nan"], "score must be a finite number"),
    (["--k", "5"], "k must be in [0, 1]"),
    (["--w", "-3"], "w must be from 0 to 100"),
    (["--sr-scale", "inf"], "sr_scale must be a finite number"),
    (["--steps", "1"], "steps must be an integer from 2 to 1000"),
    (["--tile-size", "100"], "tile size must be 0"),
    (["--quality", "101"], "--quality must be from 0 to 100"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_cli_checks_arguments_before_loading_engines(tmp_path, capsys, args, message):
    """Exit 2 in one line, before the (here missing) engine directory is even opened."""
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    rc = cli.main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--engines",
                   str(tmp_path / "missing"), *STEPS, *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ the batch


def _photo(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(path)
    return path


def _run(micro_engines, inputs, out, *extra) -> int:
    return cli.main(["restore", *map(str, inputs), "-o", str(out), "--engines", str(micro_engines), "--score", "50",
                     "--seed", "1", *STEPS, *extra])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("names", [("x/a.png", "y/a.png"), ("b.jpg", "b.png"), ("a.png", "a.png")])
def test_output_collisions_are_refused_before_any_work(micro_engines, tmp_path, capsys, names):
    inputs = [_photo(tmp_path / "in" / name) for name in names]
    rc = _run(micro_engines, inputs, tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "several inputs would be written to the same output" in err
    assert all(str(p) in err for p in inputs) and not (tmp_path / "out").exists()


def test_outdir_inside_an_input_folder_is_never_walked(micro_engines, tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "a.png")
    out = photos / "restored"
    report = tmp_path / "r.jsonl"
    assert _run(micro_engines, [photos], out, "--report", str(report)) == 0
    assert _run(micro_engines, [photos], out, "--report", str(report)) == 0  # skip: restored/ is not an input
    assert [r["input"] for r in _records(report)] == [str(photos / "a.png")] * 2
    assert sorted(p.name for p in out.rglob("*")) == ["a.png"]


def test_input_folder_that_is_the_outdir_is_refused(micro_engines, tmp_path, capsys):
    _photo(tmp_path / "photos" / "a.png")
    assert _run(micro_engines, [tmp_path / "photos"], tmp_path / "photos") == 2
    assert "is the output folder or inside it" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["input", "output", "image"])
def test_report_cannot_be_an_image(micro_engines, tmp_path, capsys, where):
    source = _photo(tmp_path / "a.png").rename(tmp_path / "scan")  # an input given by name, without a suffix
    original = source.read_bytes()
    report = {"input": source, "output": tmp_path / "out" / "scan.png", "image": tmp_path / "other.jpg"}[where]
    assert _run(micro_engines, [source], tmp_path / "out", "--report", str(report)) == 2
    assert "--report" in capsys.readouterr().err and source.read_bytes() == original


def test_any_per_image_failure_is_recorded_and_the_batch_goes_on(micro_engines, tmp_path, monkeypatch, capsys):
    """An ONNX Runtime error (its own exception class), an OverflowError and any other exception."""
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    raised = {"b": RuntimeException("ORT: out of memory"), "c": OverflowError("cannot convert float infinity"),
              "d": KeyError("surprise")}
    restore = Pipeline.restore

    def flaky(self, image, *args, **options):
        name = Path(image.source).stem
        if name in raised:
            raise raised[name]
        return restore(self, image, *args, **options)

    monkeypatch.setattr(Pipeline, "restore", flaky)
    inputs = [_photo(tmp_path / "in" / f"{n}.png") for n in "abcde"]
    report = tmp_path / "r.jsonl"
    assert _run(micro_engines, inputs, tmp_path / "out", "--report", str(report)) == 1
    status = {Path(r["input"]).stem: (r["status"], r.get("error", "")) for r in _records(report)}
    assert status["a"][0] == status["e"][0] == "ok"
    assert status["b"] == ("failed", "RuntimeException: ORT: out of memory")
    assert status["c"] == ("failed", "OverflowError: cannot convert float infinity")
    assert status["d"] == ("failed", "KeyError: 'surprise'")
    err = capsys.readouterr().err
    assert "restored 2, skipped 0, failed 3 of 5" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "e.png"]


def test_ctrl_c_stops_after_the_current_image_with_nothing_partial(micro_engines, tmp_path, monkeypatch, capsys):
    restore = Pipeline.restore

    def interrupted_at_b(self, image, *args, **options):
        if Path(image.source).stem == "b":
            raise KeyboardInterrupt
        return restore(self, image, *args, **options)

    monkeypatch.setattr(Pipeline, "restore", interrupted_at_b)
    inputs = [_photo(tmp_path / "in" / f"{n}.png") for n in "abc"]
    report = tmp_path / "r.jsonl"
    assert _run(micro_engines, inputs, tmp_path / "out", "--report", str(report)) == 130
    assert [r["status"] for r in _records(report)] == ["ok", "interrupted"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # no temporary, no partial file
    assert "interrupted after 1" in capsys.readouterr().err


def test_ctrl_c_during_a_write_lets_it_finish(micro_engines, tmp_path):
    """SIGINT arriving while the output is written takes effect after it: the file is whole and recorded.
    Run as the CLI runs, in a fresh process (the signal goes to its main thread during the first write)."""
    inputs = [_photo(tmp_path / "in" / f"{n}.png") for n in "ab"]
    report, out = tmp_path / "r.jsonl", tmp_path / "out"
    script = f"""
import signal, sys, threading
from adaptbir.runtime import batch, cli
write = batch.write_output
def write_then_signal(job, out, args):
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # handled after the write
    write(job, out, args)
batch.write_output = write_then_signal
sys.exit(cli.main({[
    "restore", *map(str, inputs), "-o", str(out), "--engines", str(micro_engines), "--score", "50", "--seed", "1",
    *STEPS, "--report", str(report)]!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 130, result.stderr[-2000:]
    assert [r["status"] for r in _records(report)] == ["ok"]
    assert read_image(out / "a.png").rgb.shape == (24, 24, 3) and sorted(p.name for p in out.iterdir()) == ["a.png"]


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA"])
def test_only_the_listed_formats_are_opened(tmp_path, fmt):
    path = tmp_path / "photo.png"  # the suffix lies; the content decides, among the listed formats only
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path, format=fmt)
    Image.open(path).load()  # Pillow itself would read it
    message = (r"ICO icon, not a format the runtime reads; convert it" if fmt == "ICO" else
               r"not an image file \(unrecognised content\); expected one of PNG, JPEG")
    with pytest.raises(InputError, match=message):
        read_image(path)


def test_pickle_is_not_an_image(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match="not an image file"):
        read_image(path)
