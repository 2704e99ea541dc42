"""Image input/output: decoding every mode to 8-bit RGB, orientation, metadata, bad files, atomic writes.

Every test image is made here with Pillow/numpy (16-bit colour PNGs by hand: Pillow cannot write them).
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from adaptbir.runtime import image_io
from adaptbir.runtime.errors import InputError
from adaptbir.runtime.image_io import LoadedImage, from_array, read_image, resize_alpha, to_array, write_image

RNG = np.random.default_rng(0)


def _noise(h: int, w: int, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _save(tmp_path: Path, name: str, image: Image.Image, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG (grey+alpha, RGB or RGBA by channel count), rows cycling through all five filter types.

    The filters depend on the bytes per pixel, so this checks that the decoder keeps the right stride."""
    h, w, c = values.shape
    color_type = {2: 4, 3: 2, 4: 6}[c]
    raw = values.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int32)
    bpp = c * 2
    rows = []
    for y in range(h):
        cur = raw[y]
        up = raw[y - 1] if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:  # Paeth
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        rows.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))
    return path


def _round257(v: np.ndarray) -> np.ndarray:
    return np.round(v.astype(np.float64) / 257).astype(np.uint8)


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif_orientation(exif: bytes) -> int:
    parsed = Image.Exif()
    parsed.load(exif)
    return parsed[0x0112]


# ---------------------------------------------------------------------------------------- plain modes


def test_rgb_png_round_trip_is_exact(tmp_path):
    src = _noise(13, 17)
    loaded = read_image(_save(tmp_path, "in.png", Image.fromarray(src)))
    assert loaded.mode == "RGB" and loaded.alpha is None and loaded.source == str(tmp_path / "in.png")
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.flags.c_contiguous and loaded.rgb.flags.writeable
    np.testing.assert_array_equal(loaded.rgb, src)
    write_image(tmp_path / "out.png", loaded.rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), src)


def test_rgba_alpha_is_set_aside_then_kept_in_png_and_webp_and_dropped_in_jpeg(tmp_path):
    src = _noise(16, 16, 4)
    loaded = read_image(_save(tmp_path, "in.png", Image.fromarray(src)))
    assert loaded.rgb.shape == (16, 16, 3) and loaded.mode == "RGBA"
    np.testing.assert_array_equal(loaded.rgb, src[..., :3])
    np.testing.assert_array_equal(loaded.alpha, src[..., 3])

    write_image(tmp_path / "out.png", loaded.rgb, alpha=loaded.alpha)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(out), src)
    write_image(tmp_path / "out.webp", loaded.rgb, alpha=loaded.alpha, fmt="webp")
    with Image.open(tmp_path / "out.webp") as out:
        assert out.mode == "RGBA"
    write_image(tmp_path / "out.jpg", loaded.rgb, alpha=loaded.alpha, fmt="jpg")
    with Image.open(tmp_path / "out.jpg") as out:
        assert out.format == "JPEG" and out.mode == "RGB"


def test_la_alpha(tmp_path):
    grey, alpha = _noise(9, 11, 1)[..., 0], _noise(9, 11, 1)[..., 0]
    image = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    loaded = read_image(_save(tmp_path, "la.png", image))
    assert loaded.mode == "LA"
    np.testing.assert_array_equal(loaded.rgb, np.stack([grey] * 3, axis=2))
    np.testing.assert_array_equal(loaded.alpha, alpha)


def test_palette_with_transparency_gives_alpha(tmp_path):
    index = (np.arange(24).reshape(4, 6) % 3).astype(np.uint8)
    image = Image.fromarray(index, "L").convert("P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    loaded = read_image(_save(tmp_path, "p.png", image, transparency=1))
    assert loaded.mode == "P"
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(loaded.rgb, colours[index])
    np.testing.assert_array_equal(loaded.alpha, np.where(index == 1, 0, 255))


def test_palette_without_transparency_has_no_alpha(tmp_path):
    image = Image.fromarray(_noise(8, 8)).convert("P")
    loaded = read_image(_save(tmp_path, "p.png", image))
    assert loaded.alpha is None
    np.testing.assert_array_equal(loaded.rgb, np.asarray(image.convert("RGB")))


def test_rgb_colour_key_transparency_gives_alpha(tmp_path):
    src = _noise(6, 6)
    src[0, 0] = (1, 2, 3)
    loaded = read_image(_save(tmp_path, "key.png", Image.fromarray(src), transparency=(1, 2, 3)))
    assert loaded.alpha is not None and loaded.alpha[0, 0] == 0
    np.testing.assert_array_equal(loaded.rgb, src)


def test_grey_and_bilevel_expand_to_three_equal_channels(tmp_path):
    grey = _noise(7, 5, 1)[..., 0]
    loaded = read_image(_save(tmp_path, "l.png", Image.fromarray(grey)))
    assert loaded.mode == "L" and loaded.rgb.shape == (7, 5, 3)
    for ch in range(3):
        np.testing.assert_array_equal(loaded.rgb[..., ch], grey)
    bits = Image.fromarray(grey > 127)
    loaded = read_image(_save(tmp_path, "1.png", bits))
    assert loaded.mode == "1"
    np.testing.assert_array_equal(loaded.rgb[..., 0], np.where(grey > 127, 255, 0))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    loaded = read_image(_save(tmp_path, "cmyk.jpg", image, quality=95))
    assert loaded.mode == "CMYK" and loaded.rgb.shape == (16, 16, 3) and loaded.alpha is None
    assert np.abs(loaded.rgb.astype(int) - [255, 0, 0]).max() <= 4


# ---------------------------------------------------------------------------------------- 16-bit data


def test_16bit_grey_png_is_scaled_by_1_over_257_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 32768, 128, 129, 65400]], np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(values))
    loaded = read_image(path)
    assert loaded.mode.startswith("I")
    np.testing.assert_array_equal(loaded.rgb[0, :, 0], [0, 100, 255, 128, 0, 1, 254])
    np.testing.assert_array_equal(loaded.rgb[..., 0], _round257(values))
    assert (loaded.rgb[..., 0] == loaded.rgb[..., 2]).all()


def test_16bit_grey_png_with_transparency_key(tmp_path):
    values = np.array([[0, 1000, 65535]], np.uint16)
    path = _save(tmp_path, "g16t.png", Image.fromarray(values), transparency=1000)
    with Image.open(path) as check:
        if "transparency" not in check.info:
            pytest.skip("this Pillow does not write tRNS for 16-bit grey")
    np.testing.assert_array_equal(read_image(path).alpha, [[255, 0, 255]])


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16bit_colour_png_keeps_the_low_byte_for_rounding(tmp_path, channels):
    values = RNG.integers(0, 65536, size=(11, 7, channels), dtype=np.uint16)
    values[0, 0, 0], values[0, 1, 0], values[0, 2, 0], values[0, 3, 0] = 65535, 32768, 200, 65400
    loaded = read_image(_png16(tmp_path / "c16.png", values))
    # Pillow alone keeps the high byte: 200 -> 0 and 65400 -> 255; rounding v / 257 gives 1 and 254.
    grey = channels == 2
    colour = np.repeat(values[..., :1], 3, axis=2) if grey else values[..., :3]
    np.testing.assert_array_equal(loaded.rgb, _round257(colour))
    np.testing.assert_array_equal(loaded.rgb[0, :4, 0], [255, 128, 1, 254])
    if channels == 3:
        assert loaded.alpha is None and loaded.mode == "RGB"
    else:
        np.testing.assert_array_equal(loaded.alpha, _round257(values[..., -1]))


def test_16bit_colour_png_is_oriented_too(tmp_path):
    values = RNG.integers(0, 65536, size=(4, 6, 3), dtype=np.uint16)
    path = _png16(tmp_path / "c16.png", values)
    # Insert an eXIf chunk (orientation 6) before IEND.
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes()[6:]  # PNG's eXIf holds the TIFF block without the "Exif\0\0" prefix
    data = path.read_bytes()
    tag = b"eXIf"
    chunk = struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    path.write_bytes(data[:-12] + chunk + data[-12:])
    loaded = read_image(path)
    np.testing.assert_array_equal(loaded.rgb, np.rot90(_round257(values), -1))
    assert _exif_orientation(loaded.exif) == 1


def test_pil_modes_i_i16b_and_f():
    values = np.array([[-5, 0, 25700, 65535, 70000]], np.int32)
    np.testing.assert_array_equal(from_array(Image.fromarray(values)).rgb[0, :, 0], [0, 0, 100, 255, 255])
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], ">u2").tobytes())
    np.testing.assert_array_equal(from_array(big_endian).rgb[0, :, 0], [0, 128, 255])
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))  # max <= 1: read as 0..1
    np.testing.assert_array_equal(from_array(unit).rgb[0, :, 0], [0, 128, 255])
    byte = Image.fromarray(np.array([[-3.0, 100.4, 300.0, np.nan]], np.float32))  # else as 0..255, clipped
    np.testing.assert_array_equal(from_array(byte).rgb[0, :, 0], [0, 100, 255, 0])


# ---------------------------------------------------------------------------------------- orientation and metadata


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_orientation_6_is_applied_and_reset_to_1(tmp_path, fmt):
    if fmt == "png":  # lossless: any pixels, compared exactly
        src = _noise(10, 20)  # 20 wide, 10 high
    else:
        src = np.zeros((10, 20, 3), np.uint8)
        src[:5, :10] = (255, 0, 0)  # red: top-left quarter
        src[:5, 10:] = (0, 0, 255)  # blue: top-right quarter
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "AdaptBIR test camera"  # Make: other tags survive
    loaded = read_image(_save(tmp_path, f"o6.{fmt}", Image.fromarray(src), exif=exif.tobytes(), quality=95))
    assert loaded.rgb.shape == (20, 10, 3)
    expected = np.rot90(src, -1)  # orientation 6: rotate 90 degrees clockwise to display
    if fmt == "png":
        np.testing.assert_array_equal(loaded.rgb, expected)
    else:  # top of the picture becomes its right side: red at top-right, blue at bottom-right
        assert np.abs(loaded.rgb[2, 7].astype(int) - [255, 0, 0]).max() < 40
        assert np.abs(loaded.rgb[17, 7].astype(int) - [0, 0, 255]).max() < 40
        assert loaded.rgb[10, 2].max() < 40
    assert loaded.exif is not None and _exif_orientation(loaded.exif) == 1
    parsed = Image.Exif()
    parsed.load(loaded.exif)
    assert parsed[0x010F] == "AdaptBIR test camera"

    # Written with orientation 1: nothing rotates it a second time.
    write_image(tmp_path / f"out.{fmt}", loaded.rgb, exif=loaded.exif, fmt=fmt)
    again = read_image(tmp_path / f"out.{fmt}")
    assert again.rgb.shape == (20, 10, 3) and _exif_orientation(again.exif) == 1


def test_no_exif_gives_none(tmp_path):
    assert read_image(_save(tmp_path, "plain.png", Image.fromarray(_noise(4, 4)))).exif is None


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_icc_profile_is_carried_to_the_output(tmp_path, fmt):
    icc = _srgb_icc()
    loaded = read_image(_save(tmp_path, "icc.png", Image.fromarray(_noise(8, 8)), icc_profile=icc))
    assert loaded.icc_profile == icc
    write_image(tmp_path / f"out.{fmt}", loaded.rgb, icc_profile=loaded.icc_profile, fmt=fmt)
    with Image.open(tmp_path / f"out.{fmt}") as out:
        assert out.info.get("icc_profile") == icc


def test_non_rgb_icc_profile_is_not_carried(tmp_path):
    grey_icc = bytearray(_srgb_icc())
    grey_icc[16:20] = b"GRAY"  # only the header's colour space matters here
    loaded = read_image(_save(tmp_path, "g.png", Image.fromarray(_noise(4, 4)), icc_profile=bytes(grey_icc)))
    assert loaded.icc_profile is None


# ---------------------------------------------------------------------------------------- sizes


def test_one_pixel_image_is_valid(tmp_path):
    loaded = read_image(_save(tmp_path, "1x1.png", Image.new("RGB", (1, 1), (9, 8, 7))))
    assert loaded.rgb.shape == (1, 1, 3) and loaded.rgb[0, 0].tolist() == [9, 8, 7]


def test_long_strip_is_valid(tmp_path):
    src = _noise(4096, 2)
    loaded = read_image(_save(tmp_path, "strip.png", Image.fromarray(src)))
    np.testing.assert_array_equal(loaded.rgb, src)


# ---------------------------------------------------------------------------------------- bad files


def _input_error(path) -> str:
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "file not found" in _input_error(tmp_path / "nope.png")


def test_directory(tmp_path):
    assert "directory" in _input_error(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty (0 bytes)" in _input_error(tmp_path / "empty.png")


def test_text_file(tmp_path):
    (tmp_path / "notes.png").write_text("just some text, not pixels\n")
    assert "not an image file (unrecognised content)" in _input_error(tmp_path / "notes.png")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file(tmp_path, fmt):
    path = _save(tmp_path, f"full.{fmt}", Image.fromarray(_noise(64, 64)), format=fmt.upper())
    data = path.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])  # pixel data cut: only load() notices
    assert "truncated or corrupt" in _input_error(cut)
    cut.write_bytes(data[:20])  # header cut
    message = _input_error(cut)  # Pillow may read the cut header or not: either way it is named as damaged
    damaged = f"{'PNG' if fmt == 'png' else 'JPEG'} image whose header is damaged"
    assert "truncated or corrupt" in message or damaged in message


@pytest.mark.parametrize("side", [11, 20])  # 121 pixels: Pillow only warns; 400 (> 2 x limit): Pillow raises
def test_decompression_bomb_limit(tmp_path, monkeypatch, side):
    path = _save(tmp_path, "bomb.png", Image.new("RGB", (side, side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        message = _input_error(path)
    assert "decompression-bomb limit" in message and f"{side * side:,} pixels" in message and "100 pixels" in message


def test_unlimited_when_pillow_limit_is_off(tmp_path, monkeypatch):
    path = _save(tmp_path, "big.png", Image.new("RGB", (20, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert read_image(path).rgb.shape == (20, 20, 3)


# ---------------------------------------------------------------------------------------- writing


def test_write_creates_the_parent_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a" / "b" / "out.png"
    write_image(target, _noise(5, 5))
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]
    if os.name == "posix":  # not mkstemp's 0o600: what open() would have made
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_jpeg_quality_is_used(tmp_path):
    src = _noise(64, 64)
    write_image(tmp_path / "lo.jpeg", src, fmt="jpeg", quality=10)
    write_image(tmp_path / "hi.jpeg", src, fmt="JPEG", quality=95)
    assert (tmp_path / "lo.jpeg").stat().st_size < (tmp_path / "hi.jpeg").stat().st_size


def test_unknown_format_and_bad_quality(tmp_path):
    with pytest.raises(InputError, match="unknown output format 'bmp'"):
        write_image(tmp_path / "x.bmp", _noise(2, 2), fmt="bmp")
    with pytest.raises(InputError, match="quality"):
        write_image(tmp_path / "x.jpg", _noise(2, 2), fmt="jpg", quality=101)
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half of it")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(target, _noise(8, 8))
    assert list(tmp_path.iterdir()) == []

    # An existing file is left as it was.
    monkeypatch.undo()
    write_image(target, np.zeros((3, 3, 3), np.uint8))
    before = target.read_bytes()
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        write_image(target, _noise(8, 8))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


# ---------------------------------------------------------------------------------------- arrays


def test_from_array_rgb_rgba_and_grey():
    rgb = _noise(5, 6)
    loaded = from_array(rgb)
    assert (loaded.mode, loaded.source, loaded.alpha, loaded.icc_profile, loaded.exif) == ("RGB", "array", None,
                                                                                          None, None)
    np.testing.assert_array_equal(loaded.rgb, rgb)
    assert not np.shares_memory(loaded.rgb, rgb)

    rgba = _noise(5, 6, 4)
    loaded = from_array(rgba)
    assert loaded.mode == "RGBA" and loaded.rgb.flags.c_contiguous
    np.testing.assert_array_equal(to_array(loaded.rgb, loaded.alpha), rgba)

    grey = _noise(5, 6, 1)[..., 0]  # 2-D uint8 = grey
    np.testing.assert_array_equal(from_array(grey).rgb, np.stack([grey] * 3, axis=2))


def test_from_pil_image_keeps_the_callers_image():
    src = _noise(4, 8, 4)
    image = Image.fromarray(src)
    exif = Image.Exif()
    exif[0x0112] = 8
    image.info["exif"] = exif.tobytes()
    loaded = from_array(image)
    assert loaded.source == "PIL image" and loaded.mode == "RGBA"
    np.testing.assert_array_equal(loaded.rgb, np.rot90(src[..., :3], 1))
    np.testing.assert_array_equal(loaded.alpha, np.rot90(src[..., 3], 1))
    assert _exif_orientation(loaded.exif) == 1
    assert image.size == (8, 4) and image.getexif()[0x0112] == 8


@pytest.mark.parametrize("bad", [
    np.zeros((4, 4, 3), np.float32),
    np.zeros((4, 4, 3), np.uint16),
    np.zeros((4, 4, 3), bool),
    np.zeros((4, 4, 2), np.uint8),
    np.zeros((4, 4, 5), np.uint8),
    np.zeros((4,), np.uint8),
    np.zeros((2, 4, 4, 3), np.uint8),
    np.zeros((0, 4, 3), np.uint8),
    [[1, 2, 3]],
])
def test_from_array_rejects_other_dtypes_and_shapes(bad):
    with pytest.raises(InputError, match="array"):
        from_array(bad)


def test_to_array_and_resize_alpha():
    rgb = _noise(4, 4)
    assert to_array(rgb, None).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="resize_alpha"):
        to_array(rgb, np.zeros((2, 2), np.uint8))
    alpha = np.full((3, 5), 200, np.uint8)
    resized = resize_alpha(alpha, (6, 10))
    assert resized.shape == (6, 10) and resized.dtype == np.uint8 and (resized == 200).all()
    assert to_array(_noise(6, 10), resized).shape == (6, 10, 4)


def test_loaded_image_fields():
    loaded = LoadedImage(np.zeros((1, 1, 3), np.uint8), None, None, None, "array", "RGB")
    assert loaded.source == "array"


def test_runtime_image_io_does_not_import_torch():
    code = "import sys, adaptbir.runtime.image_io; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert image_io.__name__ == "adaptbir.runtime.image_io"
