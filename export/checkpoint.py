"""Checkpoint loading with the reference key names, exact and loud.

Inputs are one AdaptBIR stage-3 checkpoint, or parts given separately (an SD 2.1-base checkpoint, a file
with ControlNet + CSFT weights, a stage-1 VAE for the restoration encoder, pyiqa's MUSIQ KonIQ weights).
Every key is either used, ignored for a stated reason, or an error; missing keys are an error too, except
for the optional parts (CSFT, restoration encoder, text encoder, MUSIQ), whose absence is reported.
Pickles are only ever opened with `torch.load(weights_only=True)`. Each file is hashed (sha256) right
before it is read and matched against the published files of `export/weights.py`, which also says, in
errors and notes, where a missing part is published and which flag gives it.
"""

from __future__ import annotations

import ctypes
import mmap
import pickle
import re
import weakref
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptbir.runtime.errors import CheckpointError

from .config import ModelConfig
from .model import CHECKPOINT_PREFIXES, AdaptBIR, Capabilities, random_model
from .weights import CSFT, MUSIQ, RESTORATION_ENCODER, TEXT_ENCODER, WeightFile, absent_note, fingerprint, missing_parts

SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
})
WRAPPERS = ("state_dict", "params")  # Lightning checkpoints; pyiqa/BasicSR weight files
RESTORATION_PREFIX = "preprocess_model."
MUSIQ_PREFIX = "musiq_model.net."

IGNORED_SCHEDULE = "DDPM schedule buffers and logvar (the sampler recomputes the schedule in float64)"
IGNORED_RESTORATION_VAE = "restoration VAE's decoder and quant convs (the main VAE's quant convs are used)"
IGNORED_DENOISE_COPY = "denoise_encoder.* (a frozen copy of preprocess_model.encoder, which is used)"
IGNORED_TEXT = "text tower parts SD 2.x does not use (projection, logit scale, last block: penultimate layer)"
IGNORED_MUSIQ_REPLACED = "musiq_model.* (replaced by the separate MUSIQ file)"
IGNORED_MUSIQ_DUMMY = "musiq_model.dummy_param (pyiqa's empty placeholder)"
IGNORED_EMA = "model_ema.* (EMA shadow copies; the checkpoint's model.* weights are used)"
IGNORED_LOSS = "training-only loss modules"

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> Tensors:
    """A flat `{key: tensor}` from `.safetensors`, or a `.ckpt`/`.pth` pickle opened with weights_only.

    A `state_dict`/`params` wrapper and a DataParallel `module.` prefix are removed.
    """
    path = _existing(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err
    else:
        state = _load_pickle(path)
    return _strip_module_prefix(state, path)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _load_pickle(path: Path) -> Tensors:
    mapped = zipfile.is_zipfile(path)
    try:
        # Memory-map zip-format checkpoints (parts never used — EMA copies, optimizer state — are never
        # read); legacy pickles cannot be.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects other than tensors, and unpickling them "
            f"could execute code (only weights_only loading is allowed). Re-save it as a plain state dict "
            f"or as .safetensors. Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {err}") from err
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {', '.join(list(obj)[:8])})")
    if mapped:
        _MAPPED.update((id(v), v) for v in tensors.values())
    return tensors


# Tensors that live in a checkpoint's file mapping (by id: tensors compare elementwise, not by identity).
_MAPPED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_MADV_DONTNEED = 4


def own_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as `dtype` in this process's own memory.

    A tensor of a memory-mapped checkpoint is copied and its pages handed back to the kernel at once
    (madvise DONTNEED; the mapping is never written, so touching them again would re-read the file).
    Otherwise the file's pages would stay resident for as long as any tensor of the file lives, and a
    build that frees the model part by part would free nothing: an sd21 fp16 build from a checkpoint
    peaked at 14.4 GiB instead of 10.0.
    """
    if _MAPPED.get(id(tensor)) is not tensor:
        return tensor.to(dtype=dtype)
    copy = tensor.to(dtype=dtype, copy=True)
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    return copy


def _strip_module_prefix(state: Tensors, path: Path) -> Tensors:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------- assembly


@dataclass
class CheckpointSet:
    """Tensors under the reference's stage-3 key names, gathered from one or more files."""

    tensors: Tensors = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sources: list[str] = field(default_factory=list)
    files: list[WeightFile] = field(default_factory=list)  # the files read, hashed; none for in-memory dicts

    def ignore(self, reason: str, keys) -> None:
        for key in keys:
            self.ignored[reason].append(key)
            self.tensors.pop(key, None)

    def drop_prefix(self, prefix: str, reason: str) -> None:
        self.ignore(reason, [k for k in self.tensors if k.startswith(prefix)])


def gather(checkpoint: str | Path | None = None, *, control: str | Path | None = None,
           restoration_vae: str | Path | None = None, musiq: str | Path | None = None,
           state_dicts: dict[str, Tensors] | None = None) -> CheckpointSet:
    """Merge the given files (later parts override earlier ones) into stage-3 key names.

    Each file is hashed right before it is read (streamed: the page cache then serves the read). `state_dicts`
    takes already-loaded dicts under the same roles (used by tests and random builds); they record no files.
    """
    given = {"checkpoint": checkpoint, "control": control, "restoration_vae": restoration_vae, "musiq": musiq}
    loaded = dict(state_dicts or {})
    files = []
    for role, path in given.items():
        if path is not None:
            files.append(fingerprint(role, _existing(path)))
            loaded[role] = read_state_dict(path)
    ckpts = CheckpointSet(sources=[f"{role}={path}" for role, path in given.items() if path is not None],
                          files=files)
    if "checkpoint" in loaded:
        ckpts.tensors.update(loaded["checkpoint"])
    if "control" in loaded:
        ckpts.tensors.update(loaded["control"])
    if "restoration_vae" in loaded:
        _add_restoration_vae(ckpts, loaded["restoration_vae"])
    if "musiq" in loaded:
        _add_musiq(ckpts, loaded["musiq"])
    return ckpts


def _add_restoration_vae(ckpts: CheckpointSet, state: Tensors) -> None:
    """A stage-1 VAE (AutoencoderKL keys, bare or under preprocess_model.) replaces the restoration encoder."""
    ckpts.drop_prefix("denoise_encoder.", "denoise_encoder.* (replaced by the separate restoration VAE)")
    ckpts.drop_prefix(RESTORATION_PREFIX, "preprocess_model.* (replaced by the separate restoration VAE)")
    for key, value in state.items():
        bare = key[len(RESTORATION_PREFIX):] if key.startswith(RESTORATION_PREFIX) else key
        if bare.startswith("loss."):
            ckpts.ignored[IGNORED_LOSS].append(key)
        else:
            ckpts.tensors[RESTORATION_PREFIX + bare] = value


def _add_musiq(ckpts: CheckpointSet, state: Tensors) -> None:
    """pyiqa's `musiq_koniq_ckpt-*.pth` (bare keys) replaces any MUSIQ weights of the checkpoint."""
    ckpts.drop_prefix("musiq_model.", IGNORED_MUSIQ_REPLACED)
    for key, value in state.items():
        bare = key[len(MUSIQ_PREFIX):] if key.startswith(MUSIQ_PREFIX) else key
        ckpts.tensors[MUSIQ_PREFIX + bare] = value


# -------------------------------------------------------------------------------------------- matching


@dataclass
class LoadReport:
    sources: list[str]
    capabilities: Capabilities
    loaded: dict[str, int]  # checkpoint prefix → number of tensors
    ignored: dict[str, list[str]]  # reason → keys
    notes: list[str]
    files: list[WeightFile] = field(default_factory=list)  # the files read, with size and sha256

    def summary(self) -> str:
        lines = [f"loaded from {', '.join(self.sources) or 'memory'}:"]
        lines += [f"  file {file.line()}" for file in self.files]
        lines += [f"  {prefix:<28} {count:>5} tensors" for prefix, count in self.loaded.items()]
        for reason, keys in self.ignored.items():
            lines.append(f"  ignored {len(keys):>4}: {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def record(self) -> dict:
        """The manifest's `checkpoint` section: sources, the files read (name, bytes, sha256), notes, ignored keys."""
        return {"sources": self.sources, "files": [file.to_dict() for file in self.files], "notes": self.notes,
                "ignored": {reason: len(keys) for reason, keys in self.ignored.items()}}


def _ignore_unused(ckpts: CheckpointSet, config: ModelConfig) -> None:
    keys = list(ckpts.tensors)
    ckpts.ignore(IGNORED_SCHEDULE, [k for k in keys if k in SCHEDULE_KEYS])
    ckpts.ignore(IGNORED_RESTORATION_VAE, [
        k for k in keys if k.startswith(RESTORATION_PREFIX) and not k.startswith(RESTORATION_PREFIX + "encoder.")
    ])
    has_preprocess_encoder = any(k.startswith(RESTORATION_PREFIX + "encoder.") for k in keys)
    if has_preprocess_encoder:
        ckpts.ignore(IGNORED_DENOISE_COPY, [k for k in keys if k.startswith("denoise_encoder.")])
    else:  # only the copy is there: it is the restoration encoder
        for k in [k for k in keys if k.startswith("denoise_encoder.")]:
            ckpts.tensors[RESTORATION_PREFIX + "encoder." + k[len("denoise_encoder."):]] = ckpts.tensors.pop(k)
    used_layers = config.text_encoder.layers_used if config.text_encoder else 0
    unused_block = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")
    ckpts.ignore(IGNORED_TEXT, [
        k for k in keys if k in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")
        or ((m := unused_block.match(k)) and int(m.group(1)) >= used_layers and config.text_encoder)
    ])
    ckpts.ignore(IGNORED_MUSIQ_DUMMY, [k for k in keys if k == "musiq_model.dummy_param"])
    ckpts.ignore(IGNORED_EMA, [k for k in keys if k.startswith("model_ema.")])


def to_model_key(key: str) -> str | None:
    for ours, theirs in CHECKPOINT_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def to_checkpoint_key(key: str) -> str:
    for ours, theirs in CHECKPOINT_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def detect_capabilities(keys, config: ModelConfig) -> Capabilities:
    keys = list(keys)

    def present(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    return Capabilities(
        has_csft=present("model.diffusion_model.cft_blocks.", "model.diffusion_model.upsample_layers."),
        has_restoration_encoder=present(RESTORATION_PREFIX + "encoder."),
        has_text_encoder=config.text_encoder is not None and present("cond_stage_model.model."),
        has_musiq=present(MUSIQ_PREFIX),
    )


def _notes(caps: Capabilities, config: ModelConfig, files: list[WeightFile] | tuple = ()) -> list[str]:
    """A file named like a published one but with other bytes, then each absent optional part and where it is."""
    notes = [note for file in files if (note := file.note())]
    if not caps.has_csft:
        notes.append(absent_note(CSFT))
    if not caps.has_restoration_encoder:
        notes.append(absent_note(RESTORATION_ENCODER))
    if not caps.has_text_encoder:
        notes.append(absent_note(TEXT_ENCODER) if config.text_encoder else
                     f"no text encoder (the {config.name} hyper-parameters have none): {TEXT_ENCODER.without}")
    if not caps.has_musiq:
        notes.append(absent_note(MUSIQ))
    return notes


def _group(key: str) -> str:
    """`model.diffusion_model.output_blocks.3.1.norm.weight` → `model.diffusion_model.output_blocks.3`."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or key


def describe_keys(keys, limit_groups: int = 12, examples: int = 2) -> str:
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        groups[_group(key)].append(key)
    lines = [
        f"    {name}.*: {len(ks)} key(s), e.g. {', '.join(ks[:examples])}"
        for name, ks in list(groups.items())[:limit_groups]
    ]
    if len(groups) > limit_groups:
        lines.append(f"    ... and {len(groups) - limit_groups} more group(s)")
    return "\n".join(lines)


def match_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> None:
    """Raise a CheckpointError listing missing, unexpected and wrongly shaped keys (checkpoint names)."""
    missing = [to_checkpoint_key(k) for k in expected if k not in found]
    unexpected = [to_checkpoint_key(k) for k in found if k not in expected]
    mismatched = [
        f"{to_checkpoint_key(k)}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}"
        for k in expected if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = ["the checkpoint does not fit the model:"]
    if missing:
        parts += [f"  {len(missing)} missing key(s):", describe_keys(missing)]
        parts += [f"  {line}" for line in missing_parts(missing)]
    if unexpected:
        parts += [f"  {len(unexpected)} unexpected key(s):", describe_keys(unexpected)]
    if mismatched:
        parts += [f"  {len(mismatched)} shape mismatch(es):"] + [f"    {m}" for m in mismatched[:12]]
    parts.append("  check --preset/--config against the checkpoint, or give the missing part "
                 "(--control, --restoration-vae, --musiq)")
    raise CheckpointError("\n".join(parts))


def load_model(config: ModelConfig, ckpts: CheckpointSet, device: str | torch.device = "cpu"
               ) -> tuple[AdaptBIR, LoadReport]:
    """Build the model the checkpoint set describes and load it exactly (strict, shapes checked).

    The model is built on the meta device and the checkpoint tensors are assigned, so nothing is
    allocated twice; with `device="meta"` only names and shapes are checked.
    """
    _ignore_unused(ckpts, config)
    caps = detect_capabilities(ckpts.tensors, config)
    with torch.device("meta"):
        model = AdaptBIR(config, caps)
    state: Tensors = {}
    unknown = []
    for key, value in ckpts.tensors.items():
        ours = to_model_key(key)
        if ours is None:
            unknown.append(key)
        else:
            state[ours] = value
    expected = {k: v.shape for k, v in model.state_dict().items()}
    match_keys(expected, {**{k: v.shape for k, v in state.items()}, **{u: torch.Size() for u in unknown}})
    if str(device) == "meta":
        state = {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    else:
        state = {k: own_copy(v, torch.float32).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if str(device) != "meta":
        model.reset_constants()
        model.to(device)
    loaded: dict[str, int] = defaultdict(int)
    for key in ckpts.tensors:
        loaded[next(p for p in CHECKPOINT_PREFIXES.values() if key.startswith(p))] += 1
    report = LoadReport(ckpts.sources, caps, dict(loaded), dict(ckpts.ignored), _notes(caps, config, ckpts.files),
                        list(ckpts.files))
    return model.eval(), report


def load_random(config: ModelConfig, seed: int) -> tuple[AdaptBIR, LoadReport]:
    """Seeded random weights in the real layout, with the report a checkpoint load would give."""
    model = random_model(config, seed)
    notes = [f"random weights, seed {seed}: a noise-like output is expected"]
    return model, LoadReport([f"random weights (seed {seed})"], model.capabilities, {}, {}, notes)
