"""Image input and output for the runtime (numpy + Pillow only, never torch).

Reading (docs/architecture.md, "The runtime pipeline", step 1): Pillow decodes PNG, JPEG, WebP, TIFF, BMP, GIF or
PPM/PGM/PNM (its other plugins are never tried), EXIF orientation is applied, Pillow's
decompression-bomb limit is kept (anything above `PIL.Image.MAX_IMAGE_PIXELS` is refused, not only twice
that), and every mode becomes 8-bit RGB:

* 16-bit data (`I;16*`, and 16-bit RGB/RGBA/grey+alpha PNGs, which Pillow itself cuts to their high byte)
  is scaled by 1/257 with rounding, `(v + 128) // 257`, never clipped: 65535 -> 255, 32768 -> 128.
  Mode `I` (32-bit integers) is clipped to 0..65535 first and then scaled the same way.
* Mode `F` (float): values are taken as 0..1 when the maximum is <= 1, else as 0..255; then clipped to
  0..255 and rounded. NaN counts as 0.
* Palette, grey and bilevel images are expanded; CMYK, YCbCr, LAB and HSV use Pillow's conversion.
* An alpha channel (RGBA, LA, PA, La, RGBa, or a tRNS colour key) is set aside in `LoadedImage.alpha`.
* The ICC profile is kept only when it describes RGB data: a grey or CMYK profile does not describe the
  converted RGB pixels, and attaching it to an RGB file would be invalid.
* EXIF is kept with Orientation (0x0112) reset to 1, because the pixels are already rotated.
* Only the first frame of an animated file is read.

Writing (step 6): PNG, JPEG or WebP, alpha re-attached where the format keeps it (PNG, WebP), ICC and EXIF
passed on, written atomically (a temporary file on the same filesystem, then `os.replace`).
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .atomic import SpecialFileError, atomic_write, open_regular
from .errors import InputError
from .formats import HEAD_BYTES, identify

ORIENTATION = 0x0112

# The formats read (Pillow's names) and the file suffixes a folder walk picks up; Pillow's other plugins
# (EPS through Ghostscript, PSD, ICO, ...) are never tried, whatever a file's suffix or content.
READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM")
READ_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm")

# Output format name (as the CLI spells it) -> Pillow format, and whether that format keeps alpha.
WRITE_FORMATS: dict[str, tuple[str, bool]] = {
    "png": ("PNG", True),
    "jpg": ("JPEG", False),
    "jpeg": ("JPEG", False),
    "webp": ("WEBP", True),
    "tif": ("TIFF", True),
    "tiff": ("TIFF", True),
}

# 16-bit PNG raw modes that Pillow reduces to 8 bits by keeping the high byte, and the raw mode that decodes
# the same file with the same filter stride (bits per pixel) but yields the low bytes instead.
_PNG16_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
# Grey+alpha 16-bit has no "LA;16L" unpacker; its 4 bytes per pixel decode verbatim as 8-bit RGBA instead.
_PNG16_LA = "LA;16B"

# Pillow's bomb check warns through the global warnings filters; changing them is serialised so that
# concurrent reads (one Pipeline is shared by threads) do not restore each other's filters out of order.
_OPEN_LOCK = threading.Lock()


@dataclass
class LoadedImage:
    """A decoded image, ready for the pipeline, plus what is carried to the output file."""

    rgb: np.ndarray  # uint8, H x W x 3, C-contiguous
    alpha: np.ndarray | None  # uint8, H x W, or None when the source has no alpha
    icc_profile: bytes | None  # carried to the output
    exif: bytes | None  # carried to the output, Orientation reset to 1 (orientation already applied)
    source: str  # file name or "array"/"PIL image", for messages
    mode: str  # Pillow mode of the source, e.g. "RGB", "I;16", "CMYK", "P", "LA", "RGBA"


# --------------------------------------------------------------------------------------------- reading


def _open_file(path: Path) -> BinaryIO:
    """The file opened for reading, not empty; any problem is an InputError naming it. Only a regular file
    is opened: a FIFO, socket or device is named as such and never read (a FIFO would block forever)."""
    name = str(path)
    try:
        fh = os.fdopen(open_regular(path), "rb")
    except SpecialFileError as err:
        raise InputError(f"{name}: {err.strerror}") from None
    except FileNotFoundError:
        raise InputError(f"{name}: file not found; check the path") from None
    except OSError as err:
        raise InputError(f"{name}: cannot open the file ({err.strerror or err}); check its permissions") from None
    if os.fstat(fh.fileno()).st_size == 0:
        fh.close()
        raise InputError(f"{name}: the file is empty (0 bytes); expected an image such as PNG, JPEG or WebP")
    return fh


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) as `read_image` returns the image (orientation applied), from its header only."""
    path = Path(path)
    with _open_file(path) as fh:
        im = _open(fh, str(path))
        width, height = im.size
        return (width, height) if _orientation(im) in (5, 6, 7, 8) else (height, width)


def read_image(path: str | Path) -> LoadedImage:
    """Decode an image file to 8-bit RGB (+ alpha), orientation applied; any problem is an InputError."""
    path = Path(path)
    name = str(path)
    # We own the file handle, so it is closed even when Pillow gives up half-way through open().
    with _open_file(path) as fh:
        im = _open(fh, name)
        png16 = _png16_rawmode(im)
        try:
            if png16 == _PNG16_LA:
                _set_rawmode(im, "RGBA")
            im.load()  # inside the try: truncated or corrupt data only shows up when decoding
            low = None
            if png16 in _PNG16_LOW_BYTES:
                fh.seek(0)
                low = _open(fh, name)
                _set_rawmode(low, _PNG16_LOW_BYTES[png16])
                low.load()
        except InputError:
            raise
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, zlib/struct errors...
            raise InputError(
                f"{name}: the image data is truncated or corrupt ({type(err).__name__}: {err}); "
                "re-export or re-download the file") from err
        exif = _exif_bytes(im)
        icc = _rgb_icc(im.info.get("icc_profile"))
        mode = im.mode
        if png16 is None:
            if _orientation(im) != 1:  # exif_transpose copies even when there is nothing to do
                im = _transposed(im)
            rgb, alpha = _to_rgb8(im, name)
        else:
            rgb, alpha = _png16_to_rgb8(im, low, png16)
            orientation = _orientation(im)
            rgb = _orient(rgb, orientation)
            alpha = None if alpha is None else _orient(alpha, orientation)
    return LoadedImage(_c(rgb), None if alpha is None else _c(alpha), icc, exif, name, mode)


def _open(fh: BinaryIO, name: str) -> Image.Image:
    """Image.open with the decompression-bomb limit enforced from MAX_IMAGE_PIXELS itself, after the first
    bytes said what the file is (`formats.identify`): a PDF, HEIC, camera raw, ... is named, with what to do,
    and never handed to Pillow (which would read a raw's small embedded preview as the photo)."""
    limit = Image.MAX_IMAGE_PIXELS
    kind = identify(fh.read(HEAD_BYTES), Path(name).suffix.lower())
    fh.seek(0)
    if kind is not None and not kind.readable:
        raise InputError(f"{name}: {kind.name}, not a format the runtime reads; {kind.advice}")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh, formats=READ_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(_bomb_message(name, None, limit, str(err))) from None
    except Image.UnidentifiedImageError:
        what = (f"{kind.name} whose header is damaged; re-export or re-download the file" if kind is not None else
                f"not an image file (unrecognised content); expected one of {', '.join(READ_FORMATS)}")
        raise InputError(f"{name}: {what}") from None
    except Exception as err:
        raise InputError(
            f"{name}: the image header is truncated or corrupt ({type(err).__name__}: {err}); "
            "re-export or re-download the file") from err
    # Belt and braces: refuse the 1x..2x band even if the warning filter was not in effect.
    if limit is not None and im.width * im.height > limit:
        raise InputError(_bomb_message(name, im.size, limit, ""))
    return im


def _bomb_message(name: str, size: tuple[int, int] | None, limit: int | None, detail: str) -> str:
    if size is not None:
        found = f"{size[0]}×{size[1]} (W×H) = {size[0] * size[1]:,} pixels"
    else:  # Pillow's message says "Image size (N pixels) exceeds ..."
        digits = detail.split("(", 1)[-1].split(" ", 1)[0]
        found = f"{int(digits):,} pixels" if digits.isdigit() else "more pixels than allowed"
    return (f"{name}: the image has {found}, which exceeds the decompression-bomb limit of {limit:,} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS); raise that limit only for files you trust")


def _png16_rawmode(im: Image.Image) -> str | None:
    """The raw mode of a 16-bit colour PNG that Pillow would cut to 8 bits, else None."""
    if im.format != "PNG" or len(im.tile) != 1:
        return None
    args = im.tile[0][3]
    return args if args in _PNG16_LOW_BYTES or args == _PNG16_LA else None


def _set_rawmode(im: Image.Image, rawmode: str) -> None:
    # Pillow >= 11 uses a NamedTuple for tiles; older versions a plain tuple.
    im.tile = [t._replace(args=rawmode) if hasattr(t, "_replace") else (*t[:3], rawmode) for t in im.tile]


def _png16_to_rgb8(im: Image.Image, low: Image.Image | None, rawmode: str) -> tuple[np.ndarray, np.ndarray | None]:
    if rawmode == _PNG16_LA:  # bytes per pixel: L hi, L lo, A hi, A lo
        px = np.asarray(im).astype(np.uint16)
        grey = _scale16(px[..., 0] << 8 | px[..., 1])
        return np.repeat(grey[..., None], 3, axis=2), _scale16(px[..., 2] << 8 | px[..., 3])
    assert low is not None
    value = np.asarray(im).astype(np.uint16) << 8 | np.asarray(low)
    rgb = _scale16(value[..., :3])
    if value.shape[2] == 4:
        return rgb, _scale16(value[..., 3])
    key = im.info.get("transparency")
    if isinstance(key, tuple) and len(key) == 3:  # tRNS colour key, in 16-bit values
        return rgb, np.where(np.all(value == np.asarray(key, np.uint16), axis=2), 0, 255).astype(np.uint8)
    return rgb, None


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation tag (1..8); 1 when absent, invalid or unreadable."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:  # a broken EXIF block should not cost the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _transposed(im: Image.Image) -> Image.Image:
    """ImageOps.exif_transpose on a copy (the caller's image is left alone); unreadable EXIF = no rotation."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """What ImageOps.exif_transpose does, on a numpy array (rows = y)."""
    transforms = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.swapaxes(0, 1),
        6: lambda x: np.rot90(x, -1),  # ROTATE_270 (counter-clockwise) = 90 degrees clockwise
        7: lambda x: x.swapaxes(0, 1)[::-1, ::-1],
        8: lambda x: np.rot90(x, 1),
    }
    return transforms[orientation](a) if orientation in transforms else a


def _exif_bytes(im: Image.Image) -> bytes | None:
    """The source's EXIF block with Orientation = 1, or None.

    Parsed afresh from the raw block rather than from im.getexif(), which exif_transpose edits; TIFF tags
    (what getexif() returns for a TIFF) are not an EXIF block and are not carried. Unreadable EXIF is dropped.
    """
    raw = im.info.get("exif")
    try:
        if raw is None and "Raw profile type exif" in im.info:  # old-style PNG text chunk, as Pillow reads it
            raw = bytes.fromhex("".join(im.info["Raw profile type exif"].split("\n")[3:]))
        if not raw:
            return None
        exif = Image.Exif()
        exif.load(raw)
        exif[ORIENTATION] = 1
        return exif.tobytes()
    except Exception:
        return None


def _rgb_icc(profile: bytes | None) -> bytes | None:
    # Header bytes 16..20 are the profile's data colour space.
    return profile if profile and len(profile) >= 20 and profile[16:20] == b"RGB " else None


def _scale16(v: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit, round(v / 257): exact in integers (v / 257 is never a tie), 65535 -> 255."""
    return ((v.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _to_rgb8(im: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Any Pillow mode -> (uint8 H x W x 3, uint8 H x W alpha or None)."""
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode in ("1", "L", "RGB", "P") and transparency is not None:
        im = im.convert("RGBA")  # Pillow applies the palette / tRNS colour key
    elif mode == "P":
        im = im.convert("RGBA" if im.palette is not None and im.palette.mode == "RGBA" else "RGB")
    elif mode in ("PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "1":
        im = im.convert("L")
    mode = im.mode

    if mode == "RGB":
        return np.asarray(im), None
    if mode in ("RGBA", "RGBX"):
        px = np.asarray(im)
        return px[..., :3], (px[..., 3] if mode == "RGBA" else None)
    if mode == "L":
        return _grey3(np.asarray(im)), None
    if mode == "LA":
        px = np.asarray(im)
        return _grey3(px[..., 0]), px[..., 1]
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(im)
        alpha = None
        if isinstance(transparency, int):  # grey tRNS key, in the source's own values
            alpha = np.where(v == transparency, 0, 255).astype(np.uint8)
        return _grey3(_scale16(np.clip(v, 0, 65535))), alpha
    if mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if v.size and v.max() <= 1.0:
            v = v * 255.0
        return _grey3(np.rint(np.clip(v, 0.0, 255.0)).astype(np.uint8)), None
    try:  # CMYK, YCbCr, LAB, HSV
        return np.asarray(im.convert("RGB")), None
    except (ValueError, OSError) as err:
        raise InputError(f"{name}: unsupported colour mode {mode!r} ({err}); convert the image to RGB first") from None


def _c(a: np.ndarray) -> np.ndarray:
    """A C-contiguous uint8 array we own (np.asarray of a Pillow image may be read-only)."""
    return np.array(a, dtype=np.uint8, order="C", copy=True)


def from_array(image: np.ndarray | Image.Image) -> LoadedImage:
    """The Python API's input: a uint8 H x W x 3 / H x W x 4 array, or a PIL image of any mode.

    A 2-D uint8 array (or H x W x 1) is accepted as grayscale. Other dtypes and channel counts are refused:
    the caller knows their value range, this function does not. A PIL image gets the same conversion as a
    file (orientation from its EXIF applied, on a copy; the caller's image is not modified). A lazily opened
    16-bit RGB PNG is converted by Pillow to its high byte, as Pillow does; read_image rounds it properly.
    """
    if isinstance(image, Image.Image):
        try:
            image.load()
        except Exception as err:
            raise InputError(f"PIL image: cannot decode it ({type(err).__name__}: {err})") from None
        im = _transposed(image) if _orientation(image) != 1 else image
        exif = _exif_bytes(image)
        rgb, alpha = _to_rgb8(im, "PIL image")
        return LoadedImage(_c(rgb), None if alpha is None else _c(alpha), _rgb_icc(image.info.get("icc_profile")),
                           exif, "PIL image", image.mode)
    if not isinstance(image, np.ndarray):
        raise InputError(f"array: expected a uint8 numpy array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"array: expected dtype uint8 (0..255), got {image.dtype}; convert it first, "
                         "e.g. np.clip(x * 255, 0, 255).round().astype(np.uint8) for 0..1 floats")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        rgb, alpha, mode = _grey3(image), None, "L"
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        rgb, alpha = image[..., :3], (image[..., 3] if image.shape[2] == 4 else None)
        mode = "RGBA" if alpha is not None else "RGB"
    else:
        raise InputError(f"array: expected shape H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grey), "
                         f"got {image.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputError(f"array: the image is empty (shape {image.shape})")
    return LoadedImage(_c(rgb), None if alpha is None else _c(alpha), None, None, "array", mode)


def to_array(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """uint8 H x W x 3, or H x W x 4 with the alpha appended (same H x W required)."""
    if alpha is None:
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} does not match the image {rgb.shape[:2]}; use resize_alpha")
    return np.concatenate([rgb, alpha[..., None]], axis=2).astype(np.uint8, copy=False)


def resize_alpha(alpha: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an alpha plane like the image (LANCZOS), to (height, width)."""
    h, w = size_hw
    if alpha.shape == (h, w):
        return alpha.copy()
    return np.asarray(Image.fromarray(np.ascontiguousarray(alpha, dtype=np.uint8)).resize(
        (w, h), Image.Resampling.LANCZOS)).copy()


# --------------------------------------------------------------------------------------------- writing


def write_image(path: Path, rgb: np.ndarray, *, alpha: np.ndarray | None = None, icc_profile: bytes | None = None,
                exif: bytes | None = None, fmt: str = "png", quality: int = 95,
                temporary_dir: Path | None = None) -> None:
    """Write atomically as png, jpg/jpeg, webp or tif/tiff: a temporary file (in `temporary_dir`, on the same
    filesystem, else a dot-named sibling), then os.replace.

    Alpha is kept for png and webp and dropped for jpg; quality applies to jpg and webp. On any error the
    temporary file is removed and the destination is untouched, and the error propagates.
    """
    try:
        save = _saver(rgb, alpha, icc_profile, exif, fmt, quality)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    atomic_write(Path(path), save, temporary_dir)


def encode_image(rgb: np.ndarray, *, alpha: np.ndarray | None = None, icc_profile: bytes | None = None,
                 exif: bytes | None = None, fmt: str = "png", quality: int = 95) -> bytes:
    """The bytes `write_image` would write (a service's answer)."""
    buffer = io.BytesIO()
    _saver(rgb, alpha, icc_profile, exif, fmt, quality)(buffer)
    return buffer.getvalue()


def _saver(rgb: np.ndarray, alpha: np.ndarray | None, icc_profile: bytes | None, exif: bytes | None, fmt: str,
           quality: int) -> Callable[[BinaryIO], None]:
    key = fmt.lower().lstrip(".")
    if key not in WRITE_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)}")
    if not 0 <= int(quality) <= 100:
        raise InputError(f"quality must be between 0 and 100, got {quality}")
    pil_format, keeps_alpha = WRITE_FORMATS[key]
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(to_array(rgb, alpha if keeps_alpha else None))

    options: dict[str, object] = {}
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = int(quality)
    if icc_profile:
        options["icc_profile"] = icc_profile
    if exif:
        options["exif"] = exif
    return lambda f: image.save(f, format=pil_format, **options)
