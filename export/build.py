"""Build an engine directory: one converter per graph, each checked against torch, then the manifest.

A graph whose weights, description, precision and tool versions are unchanged since the last build (its
`source_key`) and whose file still has its recorded sha256 is reused, not re-exported.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from adaptbir.runtime import __version__
from adaptbir.runtime.atomic import atomic_write
from adaptbir.runtime.errors import AdaptBIRError, EngineError
from adaptbir.runtime.gating import RULE
from adaptbir.runtime.manifest import (
    MANIFEST,
    RUNTIME_RANGE,
    SCHEMA_VERSION,
    file_entry,
    load_manifest,
    write_json_atomic,
)
from adaptbir.runtime.musiq_patches import FIXED_TOKENS, token_count

from .checkpoint import LoadReport
from .components import Component, components
from .config import ModelConfig
from .onnx_export import FP32_OP_TYPES, OPSET, check_parity, export_onnx, save_onnx, to_fp16
from .text_encoder import TextEncoder

DEFAULT_N_MAX = token_count(2048, 2048)  # MUSIQ tokens of a 2048x2048 (padded) image
CONTEXT_FILE = "context.npy"


class ExportError(AdaptBIRError):
    """A graph failed its export-time parity check or could not be exported."""


@dataclass
class GraphResult:
    name: str
    entry: dict[str, Any]
    reused: bool


def tool_versions() -> dict[str, str]:
    import onnxconverter_common
    import onnxruntime

    return {
        "adaptbir": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "onnxconverter_common": onnxconverter_common.__version__,
    }


def source_key(component: Component, precision: str, tools: dict[str, str]) -> str:
    """Hash of everything that determines the graph file: description, precision, tools, weights."""
    digest = hashlib.sha256()
    meta = {
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


def _previous(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Graphs and file records of the directory's current manifest; empty when there is none (or an old or
    foreign one: then everything is rebuilt)."""
    if not (out / MANIFEST).is_file():
        return {}, {}
    try:
        data = load_manifest(out, verify=False).data
    except EngineError:
        return {}, {}
    return data["graphs"], data["files"]


def _reusable(out: Path, previous: dict[str, Any], name: str, key: str, files: dict[str, Any]) -> bool:
    entry = previous.get(name)
    if not entry or entry.get("source_key") != key:
        return False
    try:
        for file in filter(None, (entry["file"], entry.get("external_data"))):
            if file_entry(out / file) != files[file]:
                return False
    except (KeyError, OSError):
        return False
    return True


def _export_graph(component: Component, out: Path, precision: str, key: str) -> dict[str, Any]:
    graph_precision = precision if component.fp16_allowed else "fp32"
    proto = export_onnx(component, out / component.spec.file)
    fp32_ops: dict[str, Any] = {"all": "fp32 graph"} if graph_precision == "fp32" else {}
    if graph_precision == "fp16":
        proto, keep = to_fp16(proto)
        fp32_ops = {why: len(names) for why, names in keep.items()}
        fp32_ops["nodes"] = sorted(n for names in keep.values() for n in names)
    path = out / component.spec.file
    external = save_onnx(proto, path)
    parity = check_parity(component, path, graph_precision)
    if not parity.passed:
        path.unlink(missing_ok=True)
        if external:
            (out / external).unlink(missing_ok=True)
        raise ExportError(
            f"{component.name}: ONNX Runtime output differs from torch beyond tolerance "
            f"({parity.tolerance}): max abs {parity.max_abs:.3g}, PSNR {parity.psnr_db} dB"
        )
    return {
        "file": component.spec.file, "external_data": external,
        "inputs": [t.to_dict() for t in component.spec.inputs],
        "outputs": [t.to_dict() for t in component.spec.outputs],
        "precision": graph_precision, "fp32_ops": fp32_ops, "parity": parity.to_dict(), "source_key": key,
    }


def _save_context(out: Path, context: np.ndarray) -> None:
    atomic_write(out / CONTEXT_FILE, lambda f: np.save(f, context))


def build_engine_directory(
    model, report: LoadReport, config: ModelConfig, out: Path, *, precision: str = "fp32",
    context: np.ndarray, context_source: str, n_max: int = DEFAULT_N_MAX,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export every graph of `model` into `out` and write the manifest; returns the manifest."""
    if precision not in ("fp32", "fp16"):
        raise AdaptBIRError(f"precision must be fp32 or fp16, not {precision!r}")
    if n_max < FIXED_TOKENS + 1:
        raise AdaptBIRError(f"--musiq-n-max must be at least {FIXED_TOKENS + 1}")
    out.mkdir(parents=True, exist_ok=True)
    tools = tool_versions()
    previous, old_files = _previous(out)
    _save_context(out, context)
    results = []
    comps = components(model, torch.from_numpy(context))
    for i, component in enumerate(comps, 1):
        key = source_key(component, precision, tools)
        step = f"[{i}/{len(comps)}] {component.name}"
        if _reusable(out, previous, component.name, key, old_files):
            progress(f"{step}: up to date, reused")
            results.append(GraphResult(component.name, previous[component.name], True))
            continue
        progress(f"{step}: exporting ({precision if component.fp16_allowed else 'fp32'}) and checking parity")
        results.append(GraphResult(component.name, _export_graph(component, out, precision, key), False))
    manifest = _manifest(config, report, out, precision, context, context_source, n_max, tools, results)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _manifest(config: ModelConfig, report: LoadReport, out: Path, precision: str, context: np.ndarray,
              context_source: str, n_max: int, tools: dict[str, str], results: list[GraphResult]) -> dict:
    graphs = {r.name: r.entry for r in results}
    files = {CONTEXT_FILE: file_entry(out / CONTEXT_FILE)}
    for entry in graphs.values():
        for file in filter(None, (entry["file"], entry.get("external_data"))):
            files[file] = file_entry(out / file)
    schedule = config.schedule
    return {
        "schema_version": SCHEMA_VERSION,
        "name": out.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "precision": precision,
        "preset": config.name,
        "hyperparameters": config.to_dict(),
        "latent": {"scale_factor": config.scale_factor, "channels": 4, "downsample_factor": 8, "pad_multiple": 64},
        "schedule": {
            "beta_schedule": "linear", "linear_start": schedule.linear_start, "linear_end": schedule.linear_end,
            "timesteps": schedule.timesteps, "parameterization": "eps", "variance": "fixed_small",
            "default_steps": 50,
        },
        "gating": dict(RULE),
        "capabilities": report.capabilities.to_dict(),
        "musiq": {
            "n_max": n_max, "n_min": FIXED_TOKENS + 1, "patch_size": config.musiq.patch_size,
            "longer_side_lengths": list(config.musiq.longer_side_lengths),
            "spatial_pos_grid_size": config.musiq.spatial_pos_grid_size,
        },
        "context": {"file": CONTEXT_FILE, "shape": list(context.shape), "source": context_source},
        "graphs": graphs,
        "files": files,
        "checkpoint": {
            "sources": report.sources, "notes": report.notes,
            "ignored": {reason: len(keys) for reason, keys in report.ignored.items()},
        },
        "tools": tools,
        "runtime": dict(RUNTIME_RANGE),
    }
