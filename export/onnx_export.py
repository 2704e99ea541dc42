"""Trace a component to ONNX, convert it to fp16 where safe, and measure it against torch.

The TorchScript-based exporter (`dynamo=False`) is used on purpose: on the tiny UNet it is 20x faster
than the torch.export path (3 s vs 56 s here) and emits the same operators; every graph is checked
against the torch module under ONNX Runtime right after export, so the exporter is not trusted blindly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from adaptbir.runtime.graphs import Tolerance
from adaptbir.runtime.metrics import output_errors

from .components import Component

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3  # a single .onnx protobuf cannot exceed 2 GB: larger weights go to external data
INLINE_BYTES = 1024  # smaller weights stay inside the .onnx file
WRITE_IN_FLIGHT_BYTES = 256 * 1024**2  # weights being converted and written at once (onnx-ir's default: 1 GiB)
# onnxconverter-common's clamping of fp32 weights into fp16 (its defaults), used for every weight alike
FP16_MIN_POSITIVE, FP16_MAX_FINITE = 1e-7, 1e4

# Operators kept in fp32 in fp16 graphs: normalisation statistics and softmax overflow or lose precision
# in fp16 (SD 2.x is known to); Cos/Sin take timestep arguments up to ~1000, where fp16 has a 0.5 ulp.
FP32_OP_TYPES = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax", "Cos", "Sin")


# --------------------------------------------------------------------------------------------- export


@dataclass
class ExportedGraph:
    """A traced graph whose large weights stay in the exporter's files until the graph is saved.

    `proto` holds the graph and only the small weights, so converting it to fp16 costs no memory: the
    converter retypes the on-disk weights it would convert, and `save` streams every weight from disk to
    the final file one tensor at a time, converting the retyped ones to fp16 on the way. A build's peak
    memory therefore never holds a second copy of a model (issue 14: the fp16 UNet was OOM-killed).
    """

    proto: onnx.ModelProto
    weights_dir: Path
    exported_dtypes: dict[str, int]  # external initializer → its data type on disk

    @classmethod
    def load(cls, path: Path) -> ExportedGraph:
        proto = onnx.load(str(path), load_external_data=False)
        if any(len(t.raw_data) >= INLINE_BYTES for t in proto.graph.initializer):
            # The exporter keeps the weights of graphs under 2 GB inline: move them to a file beside it too,
            # so that conversions copy the graph and never its weights.
            onnx.save_model(proto, str(path), save_as_external_data=True, location=f"{path.name}.weights",
                            size_threshold=INLINE_BYTES)
            del proto
            proto = onnx.load(str(path), load_external_data=False)
        dtypes = {t.name: t.data_type for t in proto.graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL}
        return cls(proto, path.parent, dtypes)

    def to_fp16(self) -> dict[str, list[str]]:
        """Convert in place (see `to_fp16`); returns the nodes kept in fp32, grouped by why."""
        self.proto, keep = to_fp16(self.proto)
        return keep

    def save(self, path: Path) -> str | None:
        """Write the graph at `path`; above the protobuf limit the weights go to one `<file>.data` beside it.

        Returns the external data file name, or None."""
        model = ir.from_proto(self.proto)
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = self._streamed(value.const_value)
        nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        data_name = f"{path.name}.data" if nbytes > PROTOBUF_LIMIT - 64 * 1024**2 else None
        ir.save(model, path, external_data=data_name, size_threshold_bytes=INLINE_BYTES,
                max_in_flight_bytes=WRITE_IN_FLIGHT_BYTES)
        return data_name

    def _streamed(self, stored: ir.ExternalTensor) -> ir.LazyTensor:
        """The tensor, read from disk only while it is written (plain reads, not a memory map, so the
        pages do not stay in this process's RSS) and converted to the graph's type for it."""
        source = onnx.helper.tensor_dtype_to_np_dtype(self.exported_dtypes[stored.name])
        file, offset, count = self.weights_dir / stored.location, stored.offset or 0, math.prod(stored.shape.numpy())

        def read() -> ir.Tensor:
            array = np.fromfile(file, dtype=source, count=count, offset=offset).reshape(stored.shape.numpy())
            if stored.dtype == ir.DataType.FLOAT16 and array.dtype == np.float32:
                array = fp16_weights(array)
            return ir.Tensor(array, name=stored.name)

        return ir.LazyTensor(read, dtype=stored.dtype, shape=stored.shape, name=stored.name)


@torch.no_grad()
def export_onnx(component: Component, staging: Path) -> ExportedGraph:
    """Trace the component's module to ONNX (fp32) in the `staging` folder, which keeps the exporter's
    weight files until the graph is saved elsewhere."""
    spec = component.spec
    with warnings.catch_warnings():
        # Shape arithmetic on fixed sizes (channels, the 32x32 patches) is traced as constants on purpose.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*|.*ONNX shape inference.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        raw = staging / spec.file
        torch.onnx.export(
            component.module.eval(), component.sample, str(raw), dynamo=False, opset_version=OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes, do_constant_folding=True,
        )
    graph = ExportedGraph.load(raw)
    graph.proto.producer_name, graph.proto.doc_string = "adaptbir-export", f"AdaptBIR {spec.name} graph"
    return graph


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
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    ir_model = ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    return ir.to_proto(ir_model)  # weights stored on disk stay references to their files


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """fp16 weights and activations except `fp32_nodes`; inputs and outputs stay fp32.

    The conversion itself is onnxconverter-common's (a maintained converter), driven by a block list. On a
    graph whose large weights stay on disk it converts the in-memory ones and only retypes the others
    (their data is converted by `ExportedGraph.save`).
    """
    from onnxconverter_common import float16

    model = lift_constants(model)
    keep = fp32_nodes(model)
    names = [n for names in keep.values() for n in names]
    with warnings.catch_warnings():  # tiny weights clamped to fp16's smallest normal value: expected
        warnings.filterwarnings("ignore", message=".*will be truncated to.*")
        converted = float16.convert_float_to_float16(
            model, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE, keep_io_types=True,
            op_block_list=float16.DEFAULT_OP_BLOCK_LIST + list(FP32_OP_TYPES),
            node_block_list=names,
        )
    return converted, keep


def fp16_weights(array: np.ndarray) -> np.ndarray:
    """fp32 weights → fp16 exactly as the converter treats the weights it holds in memory."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will be truncated to.*")
        return float16.convert_np_to_float16(array, FP16_MIN_POSITIVE, FP16_MAX_FINITE)


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


def compare(actual: list[np.ndarray], expected: list[np.ndarray], tol: Tolerance, precision: str) -> Parity:
    """Worst case over the outputs, judged by the precision's rule (abs error for fp32, PSNR for fp16)."""
    errors = output_errors(actual, expected)
    if errors is None:
        return Parity(math.inf, math.inf, 0.0, "finite, same shape", False)
    max_abs, max_rel, worst = errors
    if precision == "fp16" and tol.fp16_min_psnr_db != math.inf:
        tolerance, passed = f"PSNR >= {tol.fp16_min_psnr_db:g} dB", worst >= tol.fp16_min_psnr_db
    else:
        tolerance, passed = f"max abs <= {tol.fp32_atol:g}", max_abs <= tol.fp32_atol
    return Parity(max_abs, max_rel, None if worst == math.inf else worst, tolerance, passed)


def run_onnx(path: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """One run of a graph on ONNX Runtime's CPU provider, through the runtime's own session class; its
    memory goes back when it returns (a build runs each graph once, between loading and freeing weights)."""
    from adaptbir.runtime.backends import OrtSession

    return OrtSession(path, ["CPUExecutionProvider"], threads, shared_arena=False).run(feeds)


Sample = tuple[torch.Tensor, ...]


def sample_feeds(component: Component, sample: Sample) -> dict[str, np.ndarray]:
    return {t.name: s.numpy() for t, s in zip(component.spec.inputs, sample, strict=True)}


@torch.no_grad()
def torch_outputs(component: Component, sample: Sample) -> list[np.ndarray]:
    """The torch module's outputs on `sample`: what its graph is checked against."""
    expected = component.torch_reference(*sample)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    return [e.numpy() for e in expected]


def check_parity(component: Component, path: Path, precision: str, sample: Sample | None = None,
                 expected: list[np.ndarray] | None = None) -> Parity:
    """Run the graph under ONNX Runtime on `sample` (default: the component's) and compare with torch, or
    with `expected`: torch's outputs computed before its weights were freed."""
    sample = component.sample if sample is None else sample
    expected = torch_outputs(component, sample) if expected is None else expected
    return compare(run_onnx(path, sample_feeds(component, sample)), expected, component.tolerance, precision)
