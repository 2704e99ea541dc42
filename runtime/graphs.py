"""One description per graph of the engine directory, read by both sides: adding a graph is one description
here plus its torch module in export/components.py.

A description (`Graph`) owns the graph's contract (`GraphSpec`: inputs, outputs, tolerance), the pipeline stage
that runs it, its sample inputs, its check batch, whether it may be reduced precision, its memory term for the
planner, and its symbolic sizes for a TensorRT profile. The exporter pairs each with its torch module and writes
its spec into the manifest; the runtime validates feeds against it without torch. Dimensions are ints or the
symbolic names of docs/architecture.md: `B` batch, `H`/`W` image, `h`/`w` latent (= H/8, W/8), `N` MUSIQ tokens,
`C` context width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .memory import musiq_bytes, unet_call_bytes, vae_call_bytes
from .musiq_patches import FIXED_TOKENS, token_count

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
LATENT_FACTOR = 8  # the VAE's downsampling: latent h, w = H/8, W/8
Hyperparameters = Mapping[str, Any]  # a manifest's `hyperparameters`: the model configuration by part


@dataclass(frozen=True)
class Graph(ABC):
    """One graph of the engine directory: its contract, the pipeline stage that runs it, its sample inputs,
    how it is checked, and the memory one call of it takes."""

    spec: GraphSpec
    stage: str  # the pipeline stage that runs it (runtime/plan.py STAGES)
    check_batch: int = 1  # batch of its trace, parity and `adaptbir-export check` samples
    fp32_only: bool = False  # never reduced precision: not in an fp16 directory, not on OpenVINO bf16
    tiled: bool = True  # runs per latent tile when a restore is tiled; else always on the whole padded image
    # Its torch reference holds [h·w, h·w] attention scores over its latent input (the UNet's first level, the
    # VAE decoder's mid-block): the export's build-memory model counts them (export/memory.py).
    latent_attention: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @abstractmethod
    def sample_feeds(self, rng: np.random.Generator, size: tuple[int, int], batch: int,
                     context: np.ndarray | None = None, *, factor: int = LATENT_FACTOR) -> dict[str, np.ndarray]:
        """Inputs shaped and distributed like real ones for an image of `size` (H, W) and latents `factor`
        times smaller, in the graph's input order. The exporter traces and checks on these;
        `adaptbir-export check` compares backends on them."""

    @abstractmethod
    def call_bytes(self, hyperparameters: Hyperparameters, lat_h: int, lat_w: int, *, tokens: int | None = None,
                   heads_at_once: int | None = None) -> int:
        """Predicted peak of one call on a lat_h × lat_w latent (8·lat_h × 8·lat_w pixels), beyond what the
        process held before (runtime/memory.py). `tokens`: MUSIQ's token count; `heads_at_once`: the
        manifest entry's `attention_heads_at_once`. Graphs ignore what they do not need."""

    def symbol_sizes(self, size: tuple[int, int], batch: int, tokens: int, *,
                     factor: int = LATENT_FACTOR) -> dict[str, int]:
        """Every per-call symbolic dimension for an image of `size` (H, W): one TensorRT profile level."""
        height, width = size
        return {"B": batch, "H": height, "W": width, "h": height // factor, "w": width // factor, "N": tokens}


def _latents(rng: np.random.Generator, size: tuple[int, int], batch: int, factor: int, count: int
             ) -> list[np.ndarray]:
    shape = (batch, 4, size[0] // factor, size[1] // factor)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]


class _VaeGraph(Graph):
    def call_bytes(self, hyperparameters: Hyperparameters, lat_h: int, lat_w: int, *, tokens: int | None = None,
                   heads_at_once: int | None = None) -> int:
        return vae_call_bytes(hyperparameters["vae"], lat_h, lat_w)


class DualEncoder(_VaeGraph):
    """The restoration and identity VAE encoders on one image in [-1, 1]."""

    def sample_feeds(self, rng: np.random.Generator, size: tuple[int, int], batch: int,
                     context: np.ndarray | None = None, *, factor: int = LATENT_FACTOR) -> dict[str, np.ndarray]:
        return {"image": rng.random((batch, 3, *size), dtype=np.float32) * 2 - 1}


class Decoder(_VaeGraph):
    """The VAE decoder: a latent to an image."""

    def sample_feeds(self, rng: np.random.Generator, size: tuple[int, int], batch: int,
                     context: np.ndarray | None = None, *, factor: int = LATENT_FACTOR) -> dict[str, np.ndarray]:
        (latent,) = _latents(rng, size, batch, factor, 1)
        return {"latent": latent}


class UNetWithControls(Graph):
    """ControlNet and the UNet with CSFT: one eps prediction."""

    def sample_feeds(self, rng: np.random.Generator, size: tuple[int, int], batch: int,
                     context: np.ndarray | None = None, *, factor: int = LATENT_FACTOR) -> dict[str, np.ndarray]:
        """Standard normal latents, timesteps high and middle, CSFT strengths 0 and 0.8 (batch ≤ 2)."""
        if context is None:
            raise ValueError("the UNet's sample inputs need the text context")
        x, cond = _latents(rng, size, batch, factor, 2)
        return {"x": x, "t": np.array([999, 500][:batch], np.int64),
                "context": np.ascontiguousarray(np.broadcast_to(context, (batch, *context.shape[1:]))),
                "cond": cond, "w": np.array([0.0, 0.8][-batch:], np.float32)}

    def call_bytes(self, hyperparameters: Hyperparameters, lat_h: int, lat_w: int, *, tokens: int | None = None,
                   heads_at_once: int | None = None) -> int:
        return unet_call_bytes(hyperparameters["unet"], lat_h, lat_w, heads_at_once)


class Musiq(Graph):
    """The MUSIQ scorer on the token set of one image (its patches are cut by the runtime)."""

    def sample_feeds(self, rng: np.random.Generator, size: tuple[int, int], batch: int,
                     context: np.ndarray | None = None, *, factor: int = LATENT_FACTOR) -> dict[str, np.ndarray]:
        """As many tokens as the image has: 49 + 144 resized-scale slots (some masked, as a non-square image
        leaves them), then its native patches."""
        n = token_count(*size)
        patches = rng.random((batch, n, PATCH_VALUES), dtype=np.float32) * 2 - 1
        spatial = rng.integers(0, 100, (batch, n), dtype=np.int64)
        scale = np.concatenate([np.full((batch, 49), 0), np.full((batch, 144), 1),
                                np.full((batch, n - FIXED_TOKENS), 2)], 1)
        mask = np.ones((batch, n), np.float32)
        mask[:, 30:49] = 0
        mask[:, 49 + 120 : FIXED_TOKENS] = 0
        patches[mask == 0] = 0
        return {"patches": patches, "spatial_idx": spatial, "scale_idx": scale.astype(np.int64), "mask": mask}

    def call_bytes(self, hyperparameters: Hyperparameters, lat_h: int, lat_w: int, *, tokens: int | None = None,
                   heads_at_once: int | None = None) -> int:
        if tokens is None:
            raise ValueError("MUSIQ's memory term needs its token count")
        pixels = lat_h * lat_w * LATENT_FACTOR**2  # the whole padded image (never tiled): a multiple of 64
        return musiq_bytes(tokens, pixels, hyperparameters["musiq"])


# fp32 tolerances are 1e-4 on latents, eps and images and 1e-3 on the 0–100 MUSIQ score (docs/architecture.md);
# fp16 ones are PSNR over the output's peak-to-peak range (docs/precision.md). The order is the build order.
GRAPHS: dict[str, Graph] = {g.name: g for g in (
    DualEncoder(GraphSpec(
        "dual_encoder",
        inputs=(_f32("image", "B", 3, "H", "W"),),
        outputs=(_f32("z_restore", "B", 4, "h", "w"), _f32("z_identity", "B", 4, "h", "w")),
        tolerance=Tolerance(1e-4, 40.0),
    ), stage="encode"),
    UNetWithControls(GraphSpec(
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
    ), stage="sample", check_batch=2, latent_attention=True),  # check: both sample timesteps and CSFT strengths
    Decoder(GraphSpec(
        "decoder",
        inputs=(_f32("latent", "B", 4, "h", "w"),),
        outputs=(_f32("image", "B", 3, "H", "W"),),
        tolerance=Tolerance(1e-4, 35.0),
    ), stage="decode", latent_attention=True),
    Musiq(GraphSpec(
        "musiq",
        inputs=(
            _f32("patches", "B", "N", PATCH_VALUES),
            _i64("spatial_idx", "B", "N"),
            _i64("scale_idx", "B", "N"),
            _f32("mask", "B", "N"),
        ),
        outputs=(_f32("score", "B"),),
        tolerance=Tolerance(1e-3, float("inf")),
    ), stage="musiq", fp32_only=True, tiled=False),  # fp32 only: the gates must not flip on precision
)}
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
    graph = GRAPHS.get(declared.name)
    if graph is None:
        return [f"graph {declared.name!r} is not one this runtime runs ({', '.join(GRAPHS)})"]
    contract = graph.spec
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
