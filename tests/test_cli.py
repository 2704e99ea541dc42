"""`adaptbir restore` / `adaptbir info` on the tiny engines: outputs, reports, bad inputs, policies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptbir.runtime.cli import main

STEPS = ["--steps", "2", "--quiet"]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 / max(h - 1, 1), xx * 255 / max(w - 1, 1), np.full((h, w), 128.0)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_restore_directory_tree_with_report(micro_engines, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_photo(40, 60)).save(src / "a.png")
    Image.fromarray(_photo(30, 20, 1)).save(src / "sub" / "b.jpg", quality=90)
    report = tmp_path / "report.jsonl"
    rc = main(["restore", str(src), "-o", str(tmp_path / "out"), "--engines", str(micro_engines), "--sr-scale", "2",
               "--report", str(report), "--seed", "5", *STEPS])
    assert rc == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (120, 80)  # input × SR scale, layout kept
    assert Image.open(tmp_path / "out" / "sub" / "b.png").size == (40, 60)
    records = _records(report)
    assert [r["status"] for r in records] == ["ok", "ok"]
    for r in records:
        for field in ("input", "output", "score", "class", "k", "w", "seed", "steps", "sizes", "timings", "backend",
                      "engine_id", "engines", "precision", "wall_s"):
            assert field in r, field
        assert r["seed"] == 5 and r["steps"] == 2 and r["backend"] == "ort-cpu"
        assert r["warnings"][0].startswith("negative MUSIQ score")
    assert "restored 2, skipped 0, failed 0" in capsys.readouterr().err


def _bad_inputs(folder: Path) -> dict[str, str | tuple[int, int]]:
    """Each file and what must happen: an output size (w, h), or a fragment of the error message."""
    folder.mkdir()
    good = _photo(32, 48)
    Image.fromarray(good).save(folder / "ok.png")
    data = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    Image.fromarray(good[:1, :1]).save(folder / "one.png")
    Image.fromarray(_photo(2, 4096)).save(folder / "strip.png")
    Image.fromarray((np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(good).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.dstack([good, np.full((32, 48), 200, np.uint8)])).save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(good).save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx: beyond Pillow's bomb limit
    return {"ok.png": (48, 32), "truncated.png": "truncated", "empty.png": "empty",
            "notes.png": "not an image file (unrecognised content)",
            "one.png": (1, 1), "strip.png": "above the 64 Mpx limit", "deep16.png": (48, 32), "cmyk.jpg": (48, 32),
            "rgba.png": (48, 32), "rotated.jpg": (32, 48), "bomb.png": "decompression"}


def test_bad_inputs_fail_clearly_and_the_batch_goes_on(micro_engines, tmp_path, capsys):
    expected = _bad_inputs(tmp_path / "in")
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    rc = main(["restore", str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), "--score", "50",
               "--report", str(report), *STEPS])
    err = capsys.readouterr().err
    assert rc == 1
    records = {Path(r["input"]).name: r for r in _records(report)}
    assert set(records) == set(expected)
    for name, want in expected.items():
        r = records[name]
        if isinstance(want, tuple):
            assert r["status"] == "ok", (name, r.get("error"))
            assert Image.open(r["output"]).size == want, name
            assert (r["score"], r["score_source"]) == (50, "given")  # the score used, even when given
        else:
            assert r["status"] == "failed" and want.lower() in r["error"].lower(), (name, r.get("error"))
            assert name not in r["error"], r["error"]  # the record names the input once, in "input"
            lines = [line for line in err.splitlines() if name in line]
            assert lines and all(line.count(name) == 1 for line in lines), lines
            assert "Traceback" not in err
    assert Image.open(out / "rgba.png").mode == "RGBA"
    produced = sorted(p.name for p in out.iterdir())
    assert produced == sorted(Path(n).with_suffix(".png").name for n, w in expected.items() if isinstance(w, tuple))
    assert "failed 5 of 11" in err


def test_engine_directory_errors_are_one_line(micro_engines, tmp_path, capsys):
    Image.fromarray(_photo(16, 16)).save(tmp_path / "a.png")
    broken = tmp_path / "engines" / "broken"
    shutil.copytree(micro_engines, broken)
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--engines",
                 str(tmp_path / "missing"), *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"engine directories found nearby: {broken}" in err, err
    (broken / "musiq.onnx").write_bytes(b"x")
    assert main(["info", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "musiq.onnx does not match its recorded sha256" in err


def test_on_exists_policies_and_inputs_never_overwritten(micro_engines, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_photo(24, 24)).save(folder / "a.png")
    original = (folder / "a.png").read_bytes()
    common = ["--engines", str(micro_engines), "--score", "50", "--seed", "1", *STEPS]
    assert main(["restore", str(folder / "a.png"), "-o", str(folder), *common]) == 0  # OUTDIR == input folder
    assert (folder / "a.png").read_bytes() == original and (folder / "a-1.png").is_file()
    out = tmp_path / "out"
    assert main(["restore", str(folder / "a.png"), "-o", str(out), *common]) == 0
    first = (out / "a.png").stat().st_mtime_ns
    assert main(["restore", str(folder / "a.png"), "-o", str(out), *common, "--on-exists", "skip"]) == 0
    assert (out / "a.png").stat().st_mtime_ns == first and not (out / "a-1.png").exists()
    assert main(["restore", str(folder / "a.png"), "-o", str(out), *common, "--on-exists", "suffix"]) == 0
    assert (out / "a-1.png").is_file()
    assert main(["restore", str(folder / "a.png"), "-o", str(out), *common, "--on-exists", "overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a-1.png", "a.png"]


def test_a_rerun_without_a_seed_gives_the_same_output(micro_engines, tmp_path):
    """No --seed: each image's seed is derived from its pixels (recorded), so the same command gives the same
    bytes; --seed random draws a fresh one."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_photo(40, 56, seed=i)).save(folder / f"p{i}.png")
    runs = {}
    for name, extra in (("a", []), ("b", []), ("random", ["--seed", "random"])):
        report = tmp_path / f"{name}.jsonl"
        assert main(["restore", str(folder), "-o", str(tmp_path / name), "--engines", str(micro_engines), "--score",
                     "50", "--report", str(report), *STEPS, *extra]) == 0
        runs[name] = ({p.name: p.read_bytes() for p in (tmp_path / name).glob("*.png")},
                      {Path(r["input"]).name: r["seed"] for r in _records(report)})
    assert runs["a"] == runs["b"] and len(set(runs["a"][1].values())) == 2  # one seed per image, both runs alike
    assert all(runs["random"][1][n] != runs["a"][1][n] for n in runs["a"][1])
    assert all(runs["random"][0][n] != runs["a"][0][n] for n in runs["a"][0])


def test_formats_and_options(micro_engines, tmp_path):
    Image.fromarray(_photo(64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(out), "--engines", str(micro_engines), "--score", "75",
                 "--format", "webp", "--quality", "80", "--no-resize-back", "--color-fix", "wavelet", *STEPS]) == 0
    image = Image.open(out / "a.webp")
    assert image.format == "WEBP" and image.size == (512, 512)


def test_format_same_keeps_each_inputs_kind_and_jpeg_is_a_name(micro_engines, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.JPG", "c.webp", "d.tif", "e.bmp"):
        Image.fromarray(_photo(24, 32)).save(folder / name)
    common = ["--engines", str(micro_engines), "--score", "50", *STEPS]
    monkeypatch.chdir(tmp_path)  # relative paths given; the report names both ends absolute
    assert main(["restore", "in", "-o", "same", "--format", "same", "--report", "r.jsonl", *common]) == 0
    kinds = {p.name: Image.open(p).format for p in (tmp_path / "same").iterdir() if p.suffix != ".jsonl"}
    assert kinds == {"a.png": "PNG", "b.jpg": "JPEG", "c.webp": "WEBP", "d.tif": "TIFF", "e.png": "PNG"}
    for record in _records(tmp_path / "r.jsonl"):
        assert Path(record["input"]).is_absolute() and Path(record["output"]).is_absolute(), record
        assert Path(record["input"]).parent == folder
    assert main(["restore", "in/a.png", "-o", "jpeg", "--format", "jpeg", *common]) == 0
    assert Image.open(tmp_path / "jpeg" / "a.jpg").format == "JPEG"


def test_a_file_given_as_the_engine_directory_is_named(micro_engines, tmp_path, capsys):
    Image.fromarray(_photo(16, 16)).save(tmp_path / "a.png")
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--engines",
               str(micro_engines / "unet.onnx"), *STEPS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith(f"is a regular file inside an engine directory; give the directory: "
                                    f"{micro_engines}"), err


def test_unknown_backend_is_a_usage_error(micro_engines, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["restore", str(tmp_path), "-o", str(tmp_path / "o"), "--engines", str(micro_engines),
              "--backend", "cuda"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_unavailable_backend_is_one_line(micro_engines, tmp_path, capsys):
    Image.fromarray(_photo(16, 16)).save(tmp_path / "a.png")
    rc = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--engines", str(micro_engines),
               "--backend", "ort-cuda", *STEPS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "onnxruntime-gpu" in err


def test_info_prints_the_manifest(tiny_engines, capsys):
    assert main(["info", str(tiny_engines)]) == 0
    printed = capsys.readouterr().out
    assert "..4289: the range the TensorRT profile serves (trt; " in printed  # what the token range binds
    for fragment in ("preset tiny", "precision         fp32", "has_csft=yes", "unet", "musiq", "x[B, 4, h, w]"):
        assert fragment in printed, fragment


def test_progress_without_a_terminal_is_plain_lines_per_stage(micro_engines, tmp_path, capsys):
    """stderr is not a terminal here (captured): one line per stage, tiles counted, steps with a rate and an
    ETA once the first (warm-up) step is behind, no carriage returns; --quiet prints none of it."""
    Image.fromarray(_photo(64, 64)).save(tmp_path / "a.png")
    args = ["restore", str(tmp_path / "a.png"), "--engines", str(micro_engines), "--steps", "3", "--tile-size", "256"]
    assert main([*args, "-o", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("[1/1] a.png: ")]
    assert [line.split(": ", 1)[1] for line in lines[:3]] == ["scoring (MUSIQ)", "encoding, 9 tiles",
                                                              "sampling, 9 tiles"], lines
    assert lines[3].startswith("[1/1] a.png: step 1/3, first step ")
    assert lines[4].startswith("[1/1] a.png: step 3/3, ") and lines[4].endswith(" s/step, eta 0 s")
    assert lines[5].endswith("decoding, 9 tiles") and len(lines) == 7
    assert lines[6].startswith("[1/1] a.png: ok, 64×64 → 512×512 (W×H; short side raised to 512, as the paper does; "
                               "written 64×64) (")  # the sizes and why they change, on the image's own line
    assert main([*args, "-o", str(tmp_path / "q"), "--quiet"]) == 0
    assert "[1/1]" not in capsys.readouterr().err  # warnings and the summary only


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("sampling steps (default: the engine directory's schedule default, 50 for SD; 2 up to its "
                     "timesteps)", "(default: ort-cpu)", "(default: none)", "(default: png)", "(default: skip)",
                     "(default: 1.0)", "(default: 95)"):
        assert fragment in text, fragment
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "engine directory (adaptbir-export build)" in capsys.readouterr().out
