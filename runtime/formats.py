"""What a file is, from its first bytes: one of the image formats the runtime reads, or something it names
with what to do (a PDF, a HEIC photo, a camera raw, ...), so that no input is refused or skipped in silence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HEAD_BYTES = 512  # enough for every signature below (SVG's root element may follow an XML prolog)
CONVERT = "convert it to PNG or JPEG first"


@dataclass(frozen=True)
class Kind:
    name: str  # what the file is, as a person says it: "PDF document", "HEIC photo"
    readable: bool  # a format the runtime reads (image_io.READ_FORMATS)
    advice: str = ""  # what to do with one it does not read

    def describe(self) -> str:
        return self.name if self.readable else f"{self.name}; {self.advice}"


_ISO_BRANDS = {  # ISO base media files (`ftyp` box at byte 4): the major brand says what is inside
    b"heic": "HEIC photo", b"heix": "HEIC photo", b"heim": "HEIC photo", b"heis": "HEIC photo",
    b"hevc": "HEIC image sequence", b"hevx": "HEIC image sequence", b"mif1": "HEIF image",
    b"msf1": "HEIF image sequence", b"avif": "AVIF image", b"avis": "AVIF image sequence",
    b"crx ": "Canon CR3 camera raw",
}
_RAW_SUFFIXES = {  # camera raws built on TIFF: Pillow would read their small embedded preview as the photo
    ".dng": "DNG", ".nef": "Nikon NEF", ".nrw": "Nikon NRW", ".arw": "Sony ARW", ".srf": "Sony SRF",
    ".sr2": "Sony SR2", ".cr2": "Canon CR2", ".pef": "Pentax PEF", ".erf": "Epson ERF", ".3fr": "Hasselblad 3FR",
    ".iiq": "Phase One IIQ", ".mos": "Leaf MOS", ".srw": "Samsung SRW", ".kdc": "Kodak KDC", ".dcr": "Kodak DCR",
}
RAW_ADVICE = "develop it to a PNG, JPEG or 16-bit TIFF in a raw converter first"

_PREFIXES: tuple[tuple[bytes, Kind], ...] = (
    (b"\x89PNG\r\n\x1a\n", Kind("PNG image", True)),
    (b"\xff\xd8\xff", Kind("JPEG image", True)),
    (b"GIF87a", Kind("GIF image", True)),
    (b"GIF89a", Kind("GIF image", True)),
    (b"BM", Kind("BMP image", True)),
    (b"%PDF-", Kind("PDF document", False, "export its pages as PNG first (e.g. `pdftoppm -png`)")),
    (b"8BPS", Kind("Photoshop PSD document", False, "export it as PNG or 16-bit TIFF first")),
    (b"\xff\x0a", Kind("JPEG XL image", False, CONVERT)),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", Kind("JPEG XL image", False, CONVERT)),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", Kind("JPEG 2000 image", False, CONVERT)),
    (b"\xffO\xffQ", Kind("JPEG 2000 image", False, CONVERT)),
    (b"v/1\x01", Kind("OpenEXR image", False, "tone-map it to an 8- or 16-bit PNG or TIFF first")),
    (b"qoif", Kind("QOI image", False, CONVERT)),
    (b"FUJIFILMCCD-RAW", Kind("Fujifilm RAF camera raw", False, RAW_ADVICE)),
    (b"IIRO", Kind("Olympus ORF camera raw", False, RAW_ADVICE)),
    (b"IIRS", Kind("Olympus ORF camera raw", False, RAW_ADVICE)),
    (b"IIU\x00", Kind("Panasonic RW2 camera raw", False, RAW_ADVICE)),
    (b"FOVb", Kind("Sigma X3F camera raw", False, RAW_ADVICE)),
    (b"%!PS", Kind("PostScript/EPS document", False, "render it to PNG first")),
    (b"\xc5\xd0\xd3\xc6", Kind("EPS document", False, "render it to PNG first")),
    (b"\x00\x00\x01\x00", Kind("ICO icon", False, CONVERT)),
    (b"PK\x03\x04", Kind("ZIP archive", False, "unpack it and give the images inside")),
    (b"\x1f\x8b", Kind("gzip archive", False, "unpack it and give the images inside")),
)
_TIFF = (b"II*\x00", b"MM\x00*")
_NETPBM = tuple(f"P{n}".encode() for n in range(1, 7))


def identify(head: bytes, suffix: str = "") -> Kind | None:
    """The kind of file whose first bytes are `head` (`suffix`, lower case with its dot, tells TIFF-based camera
    raws from TIFF photos); None when nothing here recognises it."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _ISO_BRANDS:
            name = _ISO_BRANDS[brand]
            return Kind(name, False, RAW_ADVICE if "raw" in name else CONVERT + " (e.g. `heif-convert` for HEIC)")
        return Kind("video or other MP4/QuickTime file", False, "extract the frames you want as PNG first")
    if head[:4] == b"RIFF":
        return Kind("WebP image", True) if head[8:12] == b"WEBP" else Kind(
            "RIFF file (WAV, AVI, ...)", False, "give an image file")
    if head[:4] in _TIFF:
        if suffix in _RAW_SUFFIXES or head[8:10] == b"CR":
            name = _RAW_SUFFIXES.get(suffix, "Canon CR2")
            return Kind(f"{name} camera raw", False, RAW_ADVICE)
        return Kind("TIFF image", True)
    if head[:2] in _NETPBM and head[2:3].isspace():
        return Kind("PNM image", True)
    for prefix, kind in _PREFIXES:
        if head.startswith(prefix):
            return kind
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<?xml", b"<svg", b"<!--")) and b"<svg" in text:
        return Kind("SVG drawing", False, "render it to PNG first")
    return None


def identify_file(path: Path) -> Kind | None:
    """`identify` on a regular file's first bytes; None when it cannot be read (reading it says why) or is not
    a regular file (never opened: a FIFO would block)."""
    from .atomic import open_regular

    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            return identify(fh.read(HEAD_BYTES), path.suffix.lower())
    except OSError:
        return None
