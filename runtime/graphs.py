"""One description per graph of the engine directory, read by both sides.

The exporter pairs each description with its torch module and writes it into the manifest; the runtime
validates feeds against it without torch. Dimensions are ints or the symbolic names of DESIGN.md:
`B` batch, `H`/`W` image, `h`/`w` latent (= H/8, W/8), `N` MUSIQ tokens, `C` context width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

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

        return GraphSpec(self.name, tuple(map(fix, self.inputs)), tuple(map(fix, self.outputs)))


def _f32(name: str, *dims: Dim) -> TensorSpec:
    return TensorSpec(name, dims, "float32")


def _i64(name: str, *dims: Dim) -> TensorSpec:
    return TensorSpec(name, dims, "int64")


PATCH_VALUES = 3 * 32 * 32  # one 32×32 RGB MUSIQ patch, channel-major

DUAL_ENCODER = GraphSpec(
    "dual_encoder",
    inputs=(_f32("image", "B", 3, "H", "W"),),
    outputs=(_f32("z_restore", "B", 4, "h", "w"), _f32("z_identity", "B", 4, "h", "w")),
)
UNET = GraphSpec(
    "unet",
    inputs=(
        _f32("x", "B", 4, "h", "w"),
        _i64("t", "B"),
        _f32("context", "B", 77, "C"),
        _f32("cond", "B", 4, "h", "w"),
        _f32("w", "B"),
    ),
    outputs=(_f32("eps", "B", 4, "h", "w"),),
)
DECODER = GraphSpec(
    "decoder",
    inputs=(_f32("latent", "B", 4, "h", "w"),),
    outputs=(_f32("image", "B", 3, "H", "W"),),
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
)

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (DUAL_ENCODER, UNET, DECODER, MUSIQ)}
