"""Where the weights come from: the published files and the model's parts, in one table.

`PUBLISHED` lists the files a full build reads (who publishes each and where, its sha256 where one is
published); `PARTS` maps each checkpoint key prefix to the part's name,
the published files that hold it and the flags that give it. The loader (`export/checkpoint.py`) takes
every such fact from here: the hash check of the files it reads, the advice of a missing-keys error, the
notes on absent optional parts. README.md's "Weights" section and docs/weights.md say the same in prose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptbir.runtime.manifest import FileRecord

# `gather`'s roles → the `adaptbir-export build` flag of each.
ROLE_FLAGS = {"checkpoint": "--checkpoint", "control": "--control", "restoration_vae": "--restoration-vae",
              "musiq": "--musiq"}


@dataclass(frozen=True)
class PublishedFile:
    """One weight file as its publisher ships it."""

    title: str  # how messages name it
    name: str | None  # its published file name; None: any name (nothing published)
    publisher: str
    where: tuple[str, ...]  # URLs; the first is the main one
    sha256: str | None  # None: no published hash

    @property
    def origin(self) -> str:
        """`(publisher, where)` as messages say it."""
        where = " or ".join(self.where)
        return f"{self.publisher}, {where}" + ("" if self.sha256 else "; no published download or sha256")

    def describe(self) -> str:
        return f"{self.title} ({self.origin})"


STAGE3 = PublishedFile(  # all of AdaptBIR: SD 2.1-base UNet + CSFT, ControlNet, VAE, restoration encoder, text
    title="the AdaptBIR stage-3 checkpoint", name=None,
    publisher="the authors'", where=("github.com/YingqiLiulll/AdaptBIR",), sha256=None,
)
SD21_BASE = PublishedFile(  # UNet, VAE, OpenCLIP text tower
    title="Stable Diffusion 2.1-base's v2-1_512-ema-pruned.ckpt", name="v2-1_512-ema-pruned.ckpt",
    publisher="Stability AI", where=("https://huggingface.co/stabilityai/stable-diffusion-2-1-base",),
    sha256="88ecb782561455673c4b78d05093494b9c539fc6bfc08f3a9a4a0dd7b0b10f36",
)
MUSIQ_KONIQ = PublishedFile(  # MUSIQ trained on KonIQ, which scores each photo
    title="pyiqa's musiq_koniq_ckpt-e95806b9.pth", name="musiq_koniq_ckpt-e95806b9.pth",
    publisher="pyiqa", where=("https://huggingface.co/chaofengc/IQA-PyTorch-Weights",
                              "GitHub chaofengc/IQA-PyTorch release v0.1-weights"),
    sha256="e95806b9eae5f3814c410f574ba8e552362bd5bc63d758ed5b97860f5d6185aa",
)
PUBLISHED = (STAGE3, SD21_BASE, MUSIQ_KONIQ)


@dataclass(frozen=True)
class ModelPart:
    """A part of the model: its checkpoint key prefixes, where it is published, how the build is given it."""

    name: str
    prefixes: tuple[str, ...]  # the first is the one messages show
    files: tuple[PublishedFile, ...]  # published files that hold it
    flags: tuple[str, ...]  # e.g. "--checkpoint STAGE3", "--control FILE"
    without: str | None = None  # an optional part: what the engines do without it
    plural: bool = False  # "the CSFT layers are missing"

    @property
    def keys(self) -> str:
        return ", ".join(f"{p}*" for p in self.prefixes)

    def where(self) -> str:
        """`it is in FILE (ORIGIN) or in FILE (ORIGIN); give --flag ARG or --flag ARG`."""
        files = " or in ".join(f.describe() for f in self.files)
        return f"{'they are' if self.plural else 'it is'} in {files}; give {' or '.join(self.flags)}"


UNET = ModelPart("the UNet", ("model.diffusion_model.",), (STAGE3, SD21_BASE), ("--checkpoint FILE",))
CSFT = ModelPart("the CSFT layers", ("model.diffusion_model.cft_blocks.", "model.diffusion_model.upsample_layers."),
                 (STAGE3,), ("--checkpoint STAGE3", "--control FILE"), without="w is fixed to 0 (plain LAControlNet)",
                 plural=True)
CONTROLNET = ModelPart("the ControlNet", ("control_model.",), (STAGE3,), ("--checkpoint STAGE3", "--control FILE"))
VAE = ModelPart("the VAE", ("first_stage_model.",), (STAGE3, SD21_BASE), ("--checkpoint FILE",))
RESTORATION_ENCODER = ModelPart(
    "the restoration encoder", ("preprocess_model.encoder.", "denoise_encoder."), (STAGE3,),
    ("--checkpoint STAGE3", "--restoration-vae STAGE1_VAE"), without="k is fixed to 1")
TEXT_ENCODER = ModelPart(
    "the text encoder", ("cond_stage_model.model.",), (STAGE3, SD21_BASE), ("--checkpoint FILE",),
    without="the context must be given (--context) or seeded")
MUSIQ = ModelPart("MUSIQ", ("musiq_model.net.",), (MUSIQ_KONIQ,), ("--musiq FILE",),
                  without="the runtime needs an explicit --score")
PARTS = (UNET, CSFT, CONTROLNET, VAE, RESTORATION_ENCODER, TEXT_ENCODER, MUSIQ)


def part_of(key: str) -> ModelPart | None:
    """The part a checkpoint key belongs to (the longest matching prefix: CSFT before the UNet)."""
    best, length = None, 0
    for part in PARTS:
        for prefix in part.prefixes:
            if key.startswith(prefix) and len(prefix) > length:
                best, length = part, len(prefix)
    return best


def missing_parts(keys) -> list[str]:
    """One line per part with missing keys: which file holds it, where it is published, which flag gives it."""
    parts: dict[str, ModelPart] = {}
    for key in keys:
        part = part_of(key)
        if part is not None:
            parts.setdefault(part.name, part)
    return [f"{part.name} ({part.keys}) {'are' if part.plural else 'is'} missing: {part.where()}"
            for part in parts.values()]


def absent_note(part: ModelPart) -> str:
    """The note on an optional part a checkpoint does not hold."""
    return f"no {part.name.removeprefix('the ')} ({part.keys}): {part.without}; {part.where()}"


# ------------------------------------------------------------------------------------- files read


@dataclass(frozen=True)
class WeightFile:
    """One weight file a build read: its role (`gather`'s argument), name, size and sha256."""

    role: str
    name: str
    bytes: int
    sha256: str
    published: PublishedFile | None = None  # the published file it is, by hash

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "bytes": self.bytes, "sha256": self.sha256,
                "published": self.published.name if self.published else None}

    def line(self) -> str:
        what = f": the published {self.published.name}" if self.published else ""
        return (f"{ROLE_FLAGS.get(self.role, self.role)} {self.name}, {self.bytes:,} bytes, "
                f"sha256 {self.sha256}{what}")

    def note(self) -> str | None:
        """A note when the file has a published file's name but not its bytes (fine-tuned files keep names)."""
        same_name = next((f for f in PUBLISHED if f.name == self.name and f.sha256), None)
        if same_name is None or self.published is same_name:
            return None
        return (f"{self.name} is not the published {same_name.name}: its sha256 starts {self.sha256[:16]}, "
                f"the published one's {same_name.sha256[:16]} ({same_name.publisher}, {same_name.where[0]}); "
                f"the key check decides whether it fits")


def fingerprint(role: str, path: Path) -> WeightFile:
    """The record of one weight file: hashed (as an engine directory's files are), and matched against the
    published hashes."""
    record = FileRecord.of(Path(path))
    published = next((f for f in PUBLISHED if f.sha256 == record.sha256), None)
    return WeightFile(role, Path(path).name, record.bytes, record.sha256, published)
