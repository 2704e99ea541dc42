"""One description per graph of the engine directory, read by both sides.

The exporter pairs each description with its torch module and writes it into the manifest; the runtime
validates feeds against it without torch. Dimensions are ints or the symbolic names of docs/architecture.md:
`B` batch, `H`/`W` image, `h`/`w` latent (= H/8, W/8), `N` MUSIQ tokens, `C` context width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .musiq_patches import FIXED_TOKENS

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[Dim, ...]
    dtype: str  # numpy dtype name: "float32" or "int64"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.dims), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class Tolerance:
    """How far a graph's outputs may be from torch's (export parity) or another backend's (`check`)."""

    fp32_atol: float  # max abs error of an fp32 graph (latents, eps, images; MUSIQ: its 0–100 score)
    fp16_min_psnr_db: float  # PSNR over the output's own range of an fp16 graph (inf: never fp16)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance = Tolerance(1e-4, 40.0)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx-style dynamic axes: every symbolic dimension of every input and output."""
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
        }

    def resolved(self, **sizes: int) -> GraphSpec:
        """The same spec with some symbolic dimensions fixed (e.g. the context width `C`)."""

        def fix(t: TensorSpec) -> TensorSpec:
            return TensorSpec(t.name, tuple(sizes.get(d, d) if isinstance(d, str) else d for d in t.dims), t.dtype)

        return replace(self, inputs=tuple(map(fix, self.inputs)), outputs=tuple(map(fix, self.outputs)))

    def input_shapes(self, **sizes: int) -> dict[str, tuple[int, ...]]:
        """Every input's shape with the symbolic dimensions given in `sizes` (all of them)."""
        return {t.name: tuple(t.dims) for t in self.resolved(**sizes).inputs}


def _f32(name: str, *dims: Dim) -> TensorSpec:
    return TensorSpec(name, dims, "float32")


def _i64(name: str, *dims: Dim) -> TensorSpec:
    return TensorSpec(name, dims, "int64")


PATCH_VALUES = 3 * 32 * 32  # one 32×32 RGB MUSIQ patch, channel-major

# fp32 tolerances are 1e-4 on latents, eps and images and 1e-3 on the 0–100 MUSIQ score (docs/architecture.md);
# fp16 ones are PSNR over the output's peak-to-peak range (README "Precision"); MUSIQ is never fp16.
DUAL_ENCODER = GraphSpec(
    "dual_encoder",
    inputs=(_f32("image", "B", 3, "H", "W"),),
    outputs=(_f32("z_restore", "B", 4, "h", "w"), _f32("z_identity", "B", 4, "h", "w")),
    tolerance=Tolerance(1e-4, 40.0),
)
UNET = GraphSpec(
    "unet",
    inputs=(
        _f32("x", "B", 4, "h", "w"),
        _i64("t", "B"),
        _f32("context", "B", 77, "C"),
        _f32("cond", "B", 4, "h", "w"),
        _f32("w", "B"),  # the CSFT strength (the contract's name; latent widths are called otherwise)
    ),
    outputs=(_f32("eps", "B", 4, "h", "w"),),
    tolerance=Tolerance(1e-4, 40.0),
)
DECODER = GraphSpec(
    "decoder",
    inputs=(_f32("latent", "B", 4, "h", "w"),),
    outputs=(_f32("image", "B", 3, "H", "W"),),
    tolerance=Tolerance(1e-4, 35.0),
)
MUSIQ = GraphSpec(
    "musiq",
    inputs=(
        _f32("patches", "B", "N", PATCH_VALUES),
        _i64("spatial_idx", "B", "N"),
        _i64("scale_idx", "B", "N"),
        _f32("mask", "B", "N"),
    ),
    outputs=(_f32("score", "B"),),
    tolerance=Tolerance(1e-3, float("inf")),
)

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (DUAL_ENCODER, UNET, DECODER, MUSIQ)}
# Symbolic dimensions each directory fixes once (the exporter resolves the context width); the others vary
# per call and must stay symbolic, or the graph would refuse the next image size.
PER_DIRECTORY_DIMS = frozenset({"C"})

# ---------------------------------------------------------------------------------- agreeing with a spec


def _per_call(contract: Dim, declared: Dim) -> bool:
    """A manifest's dimension against the runtime's contract."""
    if isinstance(contract, str) and contract in PER_DIRECTORY_DIMS:
        return declared == contract or (isinstance(declared, int) and declared >= 1)
    return declared == contract


def _in_graph(declared: Dim, found: Dim | None) -> bool:
    """An ONNX graph's dimension (None: unnamed) against the manifest's: fixed ones equal, symbolic ones
    not fixed (the dim_param's name is a label only)."""
    return found == declared if isinstance(declared, int) else not isinstance(found, int)


def _tensor_problems(kind: str, expected: tuple[TensorSpec, ...], found: tuple[TensorSpec, ...],
                     agree: Callable[[Dim, Dim | None], bool]) -> list[str]:
    names = [t.name for t in expected]
    if [t.name for t in found] != names:  # the runtime feeds by name and unpacks outputs by position
        return [f"{kind} {[t.name for t in found]}, expected {names}"]
    return [f"{kind[:-1]} {got.name!r} is {got.dtype} {list(got.dims)}, expected {want.dtype} {list(want.dims)}"
            for want, got in zip(expected, found, strict=True)
            if got.dtype != want.dtype or len(got.dims) != len(want.dims)
            or not all(map(agree, want.dims, got.dims))]


def contract_problems(declared: GraphSpec) -> list[str]:
    """How a manifest's declared graph differs from what the runtime feeds and reads (names, dtypes, ranks,
    fixed dimensions); an unknown graph name has no contract."""
    contract = GRAPHS.get(declared.name)
    if contract is None:
        return [f"graph {declared.name!r} is not one this runtime runs ({', '.join(GRAPHS)})"]
    return [problem for kind in ("inputs", "outputs")
            for problem in _tensor_problems(kind, getattr(contract, kind), getattr(declared, kind), _per_call)]


def onnx_tensor(value: Any) -> TensorSpec:
    """An ONNX ValueInfoProto as a TensorSpec: dim_value → int, dim_param → its name, neither → None."""
    import onnx

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(value.name, (), f"a {kind} (not a tensor)")
    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = f"ONNX element type {tensor.elem_type}"
    if not tensor.HasField("shape"):
        return TensorSpec(value.name, (), f"{dtype} of no declared shape")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return TensorSpec(value.name, dims, dtype)


def onnx_problems(declared: GraphSpec, graph: Any) -> list[str]:
    """How an ONNX GraphProto's own inputs and outputs differ from the manifest's declaration: a renamed,
    retyped, re-ranked or resized tensor, or another graph's file altogether."""
    return [problem for kind in ("inputs", "outputs") for problem in _tensor_problems(
        kind, getattr(declared, kind), tuple(map(onnx_tensor, getattr(graph, kind[:-1]))), _in_graph)]

# ------------------------------------------------------------------------------------------ sample inputs

def sample_feeds(name: str, rng: np.random.Generator, size: tuple[int, int], batch: int,
                 context: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs shaped and distributed like real ones for an image of `size` (H, W), in the graph's input
    order: images in [-1, 1], latents standard normal, timesteps high and middle, CSFT strengths 0 and 0.8,
    and a MUSIQ token set of 64 native patches (some resized-scale slots masked, as a non-square image
    leaves them). The exporter traces and checks on these; `adaptbir-export check` compares backends."""
    H, W = size
    lat = (batch, 4, H // 8, W // 8)
    if name == "dual_encoder":
        return {"image": rng.random((batch, 3, H, W), dtype=np.float32) * 2 - 1}
    if name == "unet":
        x, cond = rng.standard_normal(lat, dtype=np.float32), rng.standard_normal(lat, dtype=np.float32)
        return {"x": x, "t": np.array([999, 500][:batch], np.int64),
                "context": np.ascontiguousarray(np.broadcast_to(context, (batch, *context.shape[1:]))),
                "cond": cond, "w": np.array([0.0, 0.8][-batch:], np.float32)}
    if name == "decoder":
        return {"latent": rng.standard_normal(lat, dtype=np.float32)}
    if name == "musiq":
        return musiq_sample(rng, batch, native=64)
    raise KeyError(f"no sample inputs for graph {name!r}")


def musiq_sample(rng: np.random.Generator, batch: int, native: int) -> dict[str, np.ndarray]:
    """A token set shaped like a real one: 49 + 144 resized-scale slots (some masked), then native patches."""
    n = FIXED_TOKENS + native
    patches = rng.random((batch, n, PATCH_VALUES), dtype=np.float32) * 2 - 1
    spatial = rng.integers(0, 100, (batch, n), dtype=np.int64)
    scale = np.concatenate([np.full((batch, 49), 0), np.full((batch, 144), 1), np.full((batch, native), 2)], 1)
    mask = np.ones((batch, n), np.float32)
    mask[:, 30:49] = 0  # a non-square image leaves the padded slots of a resized scale empty
    mask[:, 49 + 120 : FIXED_TOKENS] = 0
    patches[mask == 0] = 0
    return {"patches": patches, "spatial_idx": spatial, "scale_idx": scale.astype(np.int64), "mask": mask}
