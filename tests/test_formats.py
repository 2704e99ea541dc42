"""No input dropped in silence (issue 24): what a file is, from its first bytes; folder walks that name every
file they pass over, by what it is; a run without any input image is a usage error (exit 2)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptbir.runtime.batch import BatchSettings
from adaptbir.runtime.cli import main
from adaptbir.runtime.errors import ArgumentError, InputError
from adaptbir.runtime.formats import identify
from adaptbir.runtime.image_io import read_image

PHOTO = (np.arange(24 * 32 * 3).reshape(24, 32, 3) % 251).astype(np.uint8)


def _saved(fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PHOTO).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _iso(brand: bytes) -> bytes:
    """The start of an ISO base media file: its `ftyp` box with `brand` as the major brand."""
    return b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1" + b"\x00" * 16


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.png", _saved("PNG"))
    return buffer.getvalue()


READ = {"PNG": "PNG image", "JPEG": "JPEG image", "WEBP": "WebP image", "TIFF": "TIFF image", "BMP": "BMP image",
        "GIF": "GIF image", "PPM": "PNM image"}
OTHERS = [  # (first bytes, suffix, what it is named)
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", ".pdf", "PDF document"),
    (_iso(b"heic"), ".heic", "HEIC photo"),
    (_iso(b"mif1"), ".heif", "HEIF image"),
    (_iso(b"avif"), ".avif", "AVIF image"),
    (_iso(b"crx "), ".cr3", "Canon CR3 camera raw"),
    (_iso(b"isom"), ".mp4", "video or other MP4/QuickTime file"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', ".svg", "SVG drawing"),
    (b"8BPS\x00\x01", ".psd", "Photoshop PSD document"),
    (b"FUJIFILMCCD-RAW 0201", ".raf", "Fujifilm RAF camera raw"),
    (b"\xff\x0a\xfa\x7f", ".jxl", "JPEG XL image"),
    (_zip(), ".zip", "ZIP archive"),
]


@pytest.mark.parametrize("fmt", sorted(READ))
def test_the_formats_read_are_recognised(fmt):
    kind = identify(_saved(fmt)[:512])
    assert kind is not None and kind.readable and kind.name == READ[fmt]


@pytest.mark.parametrize("head,suffix,name", OTHERS, ids=[o[1] for o in OTHERS])
def test_other_files_are_named_with_what_to_do(head, suffix, name, tmp_path):
    kind = identify(head[:512], suffix)
    assert kind is not None and not kind.readable and kind.name == name and kind.advice
    path = tmp_path / f"photo{suffix}"
    path.write_bytes(head)
    with pytest.raises(InputError, match=rf"photo\{suffix}: {name}, not a format the runtime reads; "):
        read_image(path)


def test_a_camera_raw_built_on_tiff_is_not_read_as_its_preview(tmp_path):
    """DNG, NEF, ARW... are TIFF files whose first image is often a small preview: Pillow would read that as the
    photo. The suffix tells them from TIFF photos; the content alone is the same."""
    tiff = _saved("TIFF")
    assert identify(tiff[:512], ".tif").readable
    path = tmp_path / "IMG_0001.DNG"
    path.write_bytes(tiff)
    with pytest.raises(InputError, match=r"DNG camera raw, not a format the runtime reads; develop it"):
        read_image(path)


def test_a_damaged_header_of_a_format_read_says_so(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_saved("PNG")[:12])
    with pytest.raises(InputError, match="PNG image whose header is damaged; re-export"):
        read_image(path)


def _mixed_folder(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.png").write_bytes(_saved("PNG"))
    (folder / "photo").write_bytes(_saved("JPEG"))  # no suffix: the content says it is a JPEG
    (folder / "scan.pdf").write_bytes(OTHERS[0][0])
    (folder / "sub" / "IMG_1.heic").write_bytes(_iso(b"heic"))
    (folder / "sub" / "IMG_2.heic").write_bytes(_iso(b"heic"))
    (folder / "notes.txt").write_text("shopping list\n")
    return folder


def test_a_folder_walk_names_every_file_it_passes_over(micro_engines, tmp_path, capsys):
    folder = _mixed_folder(tmp_path / "in")
    rc = main(["restore", str(folder), "-o", str(tmp_path / "out"), "--engines", str(micro_engines), "--score", "50",
               "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err  # files that are not images do not fail the batch; they are named
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png", "photo.png"]
    assert "restored 2, skipped 0, failed 0 of 2 inputs, 4 files not an image" in err
    assert "  not an image: scan.pdf (PDF document; export its pages as PNG first" in err
    assert "  not an image: IMG_1.heic, IMG_2.heic (HEIC photo; convert it to PNG or JPEG first" in err
    assert "  not an image: notes.txt (not an image (unrecognised content))" in err


def test_plan_names_them_too(micro_engines, tmp_path, capsys):
    folder = _mixed_folder(tmp_path / "in")
    assert main(["plan", str(folder), "--engines", str(micro_engines)]) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'scan.pdf'}: not an image: PDF document; export its pages" in out
    assert f"{folder / 'photo'}: " in out and out.count("not an image: HEIC photo") == 2


@pytest.mark.parametrize("command", ["restore", "plan"])
def test_no_input_image_is_a_usage_error(micro_engines, tmp_path, capsys, command):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scan.pdf").write_bytes(OTHERS[0][0])
    (folder / "IMG_1.heic").write_bytes(_iso(b"heic"))
    out = ["-o", str(tmp_path / "out")] if command == "restore" else []
    rc = main([command, str(folder), str(tmp_path / "missing.png"), *out, "--engines", str(micro_engines)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("adaptbir: error: no input image: ") and "missing.png: no such file or directory" in err[0]
    assert "IMG_1.heic: HEIC photo; convert" in err[0] and "scan.pdf: PDF document; export" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_batch_plan_shared_with_ray_refuses_no_image_and_empty_folders(micro_engines, tmp_path):
    (tmp_path / "empty").mkdir()
    settings = BatchSettings((tmp_path / "empty",), tmp_path / "out", micro_engines)
    with pytest.raises(ArgumentError, match=r"^no input image \(the folders are empty\)$"):
        settings.plan()
