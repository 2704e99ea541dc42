"""Trace a component to ONNX, convert it to fp16 where safe, and measure it against torch.

The TorchScript-based exporter (`dynamo=False`) is used on purpose: on the tiny UNet it is 20x faster
than the torch.export path (3 s vs 56 s here) and emits the same operators; every graph is checked
against the torch module under ONNX Runtime right after export, so the exporter is not trusted blindly.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .components import FP16_MIN_PSNR_DB, FP32_ATOL, Component

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3  # a single .onnx protobuf cannot exceed 2 GB: larger weights go to external data

# Operators kept in fp32 in fp16 graphs: normalisation statistics and softmax overflow or lose precision
# in fp16 (SD 2.x is known to); Cos/Sin take timestep arguments up to ~1000, where fp16 has a 0.5 ulp.
FP32_OP_TYPES = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax", "Cos", "Sin")


# --------------------------------------------------------------------------------------------- export


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )


def save_onnx(model: onnx.ModelProto, path: Path) -> str | None:
    """Save `model` at `path`; weights over the protobuf limit go to one `<file>.data` beside it.

    Returns the external data file name, or None. Files are written under temporary names and renamed.
    """
    external = initializer_bytes(model) > PROTOBUF_LIMIT - 64 * 1024**2
    data_name = f"{path.name}.data" if external else None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".staging-") as staging:
        staged = Path(staging) / path.name
        if external:
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(Path(staging) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, staged)
            (path.parent / f"{path.name}.data").unlink(missing_ok=True)
        os.replace(staged, path)
    return data_name


@torch.no_grad()
def export_onnx(component: Component, path: Path) -> onnx.ModelProto:
    """Trace the component's module to ONNX (fp32) and return the loaded model (weights included)."""
    spec = component.spec
    with tempfile.TemporaryDirectory(prefix="adaptbir-export-") as tmp, warnings.catch_warnings():
        # Shape arithmetic on fixed sizes (channels, the 32x32 patches) is traced as constants on purpose.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*|.*ONNX shape inference.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        raw = Path(tmp) / spec.file
        torch.onnx.export(
            component.module.eval(), component.sample, str(raw), dynamo=False, opset_version=OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes, do_constant_folding=True,
        )
        model = onnx.load(str(raw))  # pulls in any external data the exporter wrote
    model.producer_name, model.doc_string = "adaptbir-export", f"AdaptBIR {spec.name} graph"
    return model


# ----------------------------------------------------------------------------------------------- fp16


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def fp32_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Nodes to keep in fp32, grouped by why: the FP32_OP_TYPES, the attention logits (the MatMul and
    scale feeding each Softmax), and the timestep-argument arithmetic feeding Cos/Sin."""
    producers = _producers(model)
    keep: dict[str, list[str]] = {op: [] for op in FP32_OP_TYPES}
    keep["attention logits (MatMul, scale)"] = []
    keep["timestep arguments"] = []
    for node in model.graph.node:
        if node.op_type in FP32_OP_TYPES:
            keep[node.op_type].append(node.name)
        if node.op_type == "Softmax":
            keep["attention logits (MatMul, scale)"] += _walk_back(node, producers, ("Mul", "Div", "Add"), "MatMul")
        if node.op_type in ("Cos", "Sin"):
            keep["timestep arguments"] += _walk_back(node, producers, ("Mul", "Unsqueeze", "Cast"), None)
    return {why: sorted(set(names)) for why, names in keep.items() if names}


def _walk_back(node: onnx.NodeProto, producers, through: tuple[str, ...], stop_at: str | None) -> list[str]:
    found, frontier = [], list(node.input)
    while frontier:
        parent = producers.get(frontier.pop())
        if parent is None:
            continue
        if parent.op_type == stop_at:
            found.append(parent.name)
        elif parent.op_type in through:
            found.append(parent.name)
            frontier += list(parent.input)
    return found


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes → initializers, so the fp16 converter sees (and keeps or casts) every constant a
    blocked node reads; otherwise a blocked fp32 Mul can end up with an fp16 Constant operand."""
    import onnx_ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    ir_model = onnx_ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    return onnx_ir.to_proto(ir_model)


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """fp16 weights and activations except `fp32_nodes`; inputs and outputs stay fp32.

    The conversion itself is onnxconverter-common's (a maintained converter), driven by a block list.
    """
    from onnxconverter_common import float16

    model = lift_constants(model)
    keep = fp32_nodes(model)
    names = [n for names in keep.values() for n in names]
    with warnings.catch_warnings():  # tiny weights clamped to fp16's smallest normal value: expected
        warnings.filterwarnings("ignore", message=".*will be truncated to.*")
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=float16.DEFAULT_OP_BLOCK_LIST + list(FP32_OP_TYPES),
            node_block_list=names,
        )
    return converted, keep


# ---------------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class Parity:
    max_abs: float
    max_rel: float  # max_abs over the largest reference magnitude
    psnr_db: float | None  # over the reference's peak-to-peak range; None when the error is exactly 0
    tolerance: str
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def psnr(actual: np.ndarray, expected: np.ndarray, peak: float) -> float | None:
    """PSNR in dB of `actual` against `expected` for the given peak value; None when they are equal."""
    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(peak**2 / mse)


def compare(actual: list[np.ndarray], expected: list[np.ndarray], name: str, precision: str) -> Parity:
    """Worst case over the outputs, judged by the precision's rule (abs error for fp32, PSNR for fp16)."""
    max_abs, max_rel, worst = 0.0, 0.0, math.inf
    for a, e in zip(actual, expected, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a.shape != e.shape or not np.all(np.isfinite(a)):
            return Parity(math.inf, math.inf, 0.0, "finite, same shape", False)
        err = np.abs(a - e)
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float(err.max() / max(np.abs(e).max(), 1e-12)))
        # peak: the output's range, or its magnitude for a single value (a score)
        db = psnr(a, e, max(float(np.ptp(e)), float(np.abs(e).max()), 1e-12))
        if db is not None:
            worst = min(worst, db)
    if precision == "fp16" and FP16_MIN_PSNR_DB[name] != math.inf:
        tolerance, passed = f"PSNR >= {FP16_MIN_PSNR_DB[name]:g} dB", worst >= FP16_MIN_PSNR_DB[name]
    else:
        tolerance, passed = f"max abs <= {FP32_ATOL[name]:g}", max_abs <= FP32_ATOL[name]
    return Parity(max_abs, max_rel, None if worst == math.inf else worst, tolerance, passed)


def run_onnx(path: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """One run of a graph on ONNX Runtime's CPU provider, through the runtime's own session class."""
    from adaptbir.runtime.backends import OrtSession

    return OrtSession(path, ["CPUExecutionProvider"], threads).run(feeds)


@torch.no_grad()
def check_parity(component: Component, path: Path, precision: str) -> Parity:
    """Run the graph under ONNX Runtime and the torch module on the component's sample inputs."""
    feeds = {t.name: s.numpy() for t, s in zip(component.spec.inputs, component.sample, strict=True)}
    expected = component.torch_reference(*component.sample)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    return compare(run_onnx(path, feeds), [e.numpy() for e in expected], component.name, precision)
