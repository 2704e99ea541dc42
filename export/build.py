"""Build an engine directory: one converter per graph, each checked against torch, then the manifest.

A graph whose weights, description, precision and tool versions are unchanged since the last build (its
`source_key`) and whose file still has its recorded sha256 is reused, not re-exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from adaptbir.runtime import __version__
from adaptbir.runtime.atomic import atomic_write, scratch_directory, staged_directory
from adaptbir.runtime.errors import AdaptBIRError, EngineError
from adaptbir.runtime.manifest import (
    CONTEXT_FILE,
    MANIFEST,
    ContextEntry,
    FileRecord,
    GraphEntry,
    Latent,
    Manifest,
    MusiqLimits,
    read_manifest,
)
from adaptbir.runtime.musiq_patches import FIXED_TOKENS, token_count

from .checkpoint import LoadReport
from .components import FULL_SIZE_IMAGE, Component, components
from .config import ModelConfig
from .onnx_export import FP32_OP_TYPES, OPSET, check_parity, export_onnx, torch_outputs
from .quantize import Int8Options
from .text_encoder import TextEncoder

DEFAULT_N_MAX = token_count(2048, 2048)  # MUSIQ tokens of a 2048x2048 (padded) image


class ExportError(AdaptBIRError):
    """A graph failed its export-time parity check or could not be exported."""


@dataclass(frozen=True)
class WeightSource:
    """Where a build's weights come from: checkpoint files, or seeded random weights (`random_seed`)."""

    checkpoint: Path | None = None
    control: Path | None = None
    restoration_vae: Path | None = None
    musiq: Path | None = None
    random_seed: int | None = None

    def load(self, config: ModelConfig):
        from .checkpoint import gather, load_model, load_random

        if self.random_seed is not None:
            return load_random(config, self.random_seed)
        return load_model(config, gather(self.checkpoint, control=self.control, restoration_vae=self.restoration_vae,
                                         musiq=self.musiq))


@dataclass
class Built:
    manifest: Manifest
    report: LoadReport
    model: Any  # the torch model with the same weights when kept, else None (its weights were freed)


def build(config: ModelConfig, source: WeightSource, out: Path, *, precision: str = "fp32",
          context_file: Path | None = None, seed: int = 0, n_max: int | None = None, keep_model: bool = False,
          int8: Int8Options | None = None, progress: Callable[[str], None] = print) -> Built:
    """The one way to an engine directory: config → weights → context → graphs, checked, and the manifest.

    Used by `adaptbir-export build`, the demo and the benchmarks. Without `keep_model` the build frees
    each part's weights as soon as no later graph needs them (the memory bound of `export/memory.py`).
    `precision="int8"`: the fp32 directory is built in a temporary sibling, then calibrated, quantized and
    gated (`export/quantize.py`, options `int8`) into `out`."""
    model, report = source.load(config)
    progress(report.summary())
    context, context_source = empty_prompt_context(model.text_encoder, context_file, seed, config.context_dim)
    if precision == "int8":
        manifest = _build_int8(model, report, config, Path(out), context, context_source, n_max or DEFAULT_N_MAX,
                               not keep_model, int8 or Int8Options(), progress)
    else:
        manifest = build_engine_directory(model, report, config, out, precision=precision, context=context,
                                          context_source=context_source, n_max=n_max or DEFAULT_N_MAX,
                                          free=not keep_model, progress=progress)
    return Built(manifest, report, model if keep_model else None)


def _build_int8(model, report: LoadReport, config: ModelConfig, out: Path, context: np.ndarray, context_source: str,
                n_max: int, free: bool, options: Int8Options, progress: Callable[[str], None]) -> Manifest:
    from .quantize import quantize_directory

    with scratch_directory(out, "fp32") as scratch:  # the fp32 graphs, beside `out`: 5.4 GB on sd21
        fp32 = scratch / out.name
        build_engine_directory(model, report, config, fp32, precision="fp32", context=context,
                               context_source=context_source, n_max=n_max, free=free,
                               progress=lambda line: progress(f"fp32: {line}"))
        return quantize_directory(fp32, out, options, progress)


@dataclass
class GraphResult:
    name: str
    entry: GraphEntry
    reused: bool


def tool_versions() -> dict[str, str]:
    import onnxconverter_common
    import onnxruntime

    return {
        "adaptbir": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "onnxconverter_common": onnxconverter_common.__version__,
    }


def export_code_digest() -> str:
    """sha256 of this package's sources: a change in how a graph is written (say, its attention) must not
    reuse a graph exported by the previous code, whatever the version number says."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def source_key(component: Component, precision: str, tools: dict[str, str]) -> str:
    """Hash of everything that determines the graph file: description, precision, tools, export code, weights."""
    digest = hashlib.sha256()
    meta = {"code": export_code_digest(),
        "inputs": [t.to_dict() for t in component.spec.inputs],
        "outputs": [t.to_dict() for t in component.spec.outputs],
        "precision": precision, "opset": OPSET, "fp32_ops": FP32_OP_TYPES, "tools": tools,
        "sample": [list(s.shape) for s in component.sample],
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for part in component.parts:
        for key, value in part.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def empty_prompt_context(model_text: TextEncoder | None, context_file: Path | None, seed: int,
                         width: int) -> tuple[np.ndarray, str]:
    """The constant [1, 77, C] context: from a file, from the text tower, or seeded random (random builds)."""
    if context_file is not None:
        try:
            context = np.load(context_file)
        except (OSError, ValueError) as err:
            raise AdaptBIRError(f"cannot read the context file {context_file}: {err}") from err
        if context.ndim == 2:
            context = context[None]
        if context.shape != (1, 77, width):
            raise AdaptBIRError(f"context file {context_file} has shape {context.shape}, expected (1, 77, {width})")
        return context.astype(np.float32), f"file {context_file.name}"
    if model_text is not None:
        with torch.no_grad():
            return model_text.empty_context().numpy().astype(np.float32), "text encoder, empty prompt"
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, 77, width), dtype=np.float32), f"random, seed {seed}"


def _previous(out: Path) -> Manifest | None:
    """The directory's current manifest; None when there is none (or an old, foreign or damaged one: then
    everything is rebuilt)."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        return read_manifest(out)
    except EngineError:
        return None


def _reusable(previous: Manifest | None, name: str, key: str) -> bool:
    entry = previous.graphs.get(name) if previous else None
    if entry is None or entry.source_key != key:
        return False
    try:
        return all(FileRecord.of(previous.directory / file) == previous.files[file] for file in entry.files)
    except (KeyError, OSError):
        return False


def _reuse(entry: GraphEntry, old: Path, new: Path) -> None:
    """Carry an up-to-date graph into the new directory: a hard link, a copy where links are impossible."""
    for file in entry.files:
        try:
            os.link(old / file, new / file)
        except OSError:
            shutil.copy2(old / file, new / file)


def _export_graph(component: Component, out: Path, precision: str, key: str,
                  free_weights: Callable[[], None], progress: Callable[[str], None]) -> GraphEntry:
    """Trace, convert and write one graph, then check it against torch under ONNX Runtime.

    Torch's outputs are computed first and the component's weights freed before ONNX Runtime loads the
    graph, so the two copies of a model never share the memory (the build's peak, see `export/memory.py`)."""
    graph_precision = precision if component.fp16_allowed else "fp32"
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=out) as trace:
        progress("tracing")
        graph = export_onnx(component, Path(trace))
        fp32_ops: dict[str, Any] = {"all": "fp32 graph"}
        if graph_precision == "fp16":
            progress("converting to fp16")
            keep = graph.to_fp16()
            fp32_ops = {why: len(names) for why, names in keep.items()}
            fp32_ops["nodes"] = sorted(n for names in keep.values() for n in names)
        progress("writing")
        external = graph.save(out / component.spec.file)
    samples = component.check_samples(graph_precision)
    progress("torch reference")
    expected = {label: torch_outputs(component, sample) for label, sample in samples.items()}
    free_weights()
    parity = {}
    for label, sample in samples.items():
        progress(f"ONNX Runtime parity ({label})")
        parity[label] = check_parity(component, out / component.spec.file, graph_precision, sample, expected[label])
        if not parity[label].passed:
            raise ExportError(
                f"{component.name}: ONNX Runtime output differs from torch beyond tolerance at the {label} "
                f"input ({parity[label].tolerance}): max abs {parity[label].max_abs:.3g}, "
                f"PSNR {parity[label].psnr_db} dB"
            )
    full_size = parity.get("full_size")
    return GraphEntry(
        component.spec.file, external, component.spec.inputs, component.spec.outputs, graph_precision, fp32_ops,
        parity["sample"].to_dict(), key,
        {**full_size.to_dict(), "image": list(FULL_SIZE_IMAGE)} if full_size else None,
        component.attention_heads_at_once,
    )


def free_weights(done: Component, later: list[Component]) -> None:
    """Free the weights of `done`'s parts that no later graph holds (they become meta tensors)."""
    for part in done.parts_to_free(later):
        part.to("meta")


def _save_context(out: Path, context: np.ndarray) -> None:
    atomic_write(out / CONTEXT_FILE, lambda f: np.save(f, context))


def is_engine_directory(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def build_engine_directory(
    model, report: LoadReport, config: ModelConfig, out: Path, *, precision: str = "fp32",
    context: np.ndarray, context_source: str, n_max: int = DEFAULT_N_MAX, free: bool = False,
    progress: Callable[[str], None] = print,
) -> Manifest:
    """Export every graph of `model` into `out` and write the manifest; returns the manifest.

    The directory is built in a hidden sibling and replaces `out` only when every graph has passed its
    parity check: a failed or interrupted build leaves the previous directory as it was. With `free`, the
    build owns `model` and frees each part's weights once the last graph holding them is written and
    measured (the model cannot be used afterwards); this bounds the peak memory to about one copy of the
    model plus its largest graph (see `export/memory.py`).
    """
    if precision not in ("fp32", "fp16"):
        raise AdaptBIRError(f"precision must be fp32 or fp16, not {precision!r}")
    if n_max < FIXED_TOKENS + 1:
        raise AdaptBIRError(f"--musiq-n-max must be at least {FIXED_TOKENS + 1}")
    out = Path(out)
    tools = tool_versions()
    previous = _previous(out)
    if free and model.text_encoder is not None:
        model.text_encoder.to("meta")  # the context is computed: the text tower is not part of any graph
    try:
        with staged_directory(out, is_engine_directory) as staging:
            _save_context(staging, context)
            results = []
            comps = components(model, torch.from_numpy(context))
            for i, component in enumerate(comps, 1):
                key = source_key(component, precision, tools)
                step = f"[{i}/{len(comps)}] {component.name}"
                release = (lambda c=component, i=i: free_weights(c, comps[i:])) if free else (lambda: None)
                if _reusable(previous, component.name, key):
                    progress(f"{step}: up to date, reused")
                    _reuse(previous.graphs[component.name], out, staging)
                    results.append(GraphResult(component.name, previous.graphs[component.name], True))
                    release()
                    continue
                label = f"{step} ({precision if component.fp16_allowed else 'fp32'})"
                entry = _export_graph(component, staging, precision, key, release,
                                      lambda phase, label=label: progress(f"{label}: {phase}"))
                results.append(GraphResult(component.name, entry, False))
            manifest = _manifest(config, report, staging, out.name, precision, context, context_source, n_max,
                                 tools, results).write(staging)
    except FileExistsError as err:
        raise AdaptBIRError(f"--out {out}: {err}; choose a new or empty folder, or an engine directory") from err
    return replace(manifest, directory=out)


def _manifest(config: ModelConfig, report: LoadReport, out: Path, name: str, precision: str, context: np.ndarray,
              context_source: str, n_max: int, tools: dict[str, str], results: list[GraphResult]) -> Manifest:
    graphs = {r.name: r.entry for r in results}
    files = {CONTEXT_FILE: FileRecord.of(out / CONTEXT_FILE)}
    for entry in graphs.values():
        files.update({file: FileRecord.of(out / file) for file in entry.files})
    return Manifest(
        name=name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), precision=precision,
        preset=config.name, hyperparameters=config.to_dict(), latent=Latent(config.scale_factor),
        schedule=config.schedule,
        capabilities=report.capabilities,
        musiq=MusiqLimits(n_max, FIXED_TOKENS + 1, config.musiq.patch_size, tuple(config.musiq.longer_side_lengths),
                          config.musiq.spatial_pos_grid_size),
        context=ContextEntry(tuple(context.shape), context_source), graphs=graphs, files=files,
        checkpoint=report.record(),
        tools=tools,
    )
