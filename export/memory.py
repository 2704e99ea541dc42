"""The peak memory of an engine build, predicted from parameter counts before any weight is loaded.

The build holds one copy of the model's weights and frees each part once its last graph is written and
measured (`build.free_weights`), so its peak is the largest of these, on top of the process as it is:

* loading: every weight in fp32 (the text tower too, freed once the context is computed);
* tracing and writing a graph: the weights still held, plus the graph's own copies while the exporter
  writes it (about 3x its weights for graphs the exporter keeps inline, under 2 GB; weights streamed one
  tensor at a time above that), plus the exporter's working set on the graph's sample, which follows the
  graph's operators rather than its weights (`TorchGraph.tracing_bytes`, measured on the tiny build: 0.5 GiB
  of a 1.24 GiB peak there, when the model said 0.78);
* torch's reference outputs: the weights still held, plus the activations (the attention scores dominate);
* ONNX Runtime's parity run: the weights still held after freeing, plus the session. fp32 graphs take
  about their file size; fp16 graphs on the CPU take about 3.5x theirs, because ONNX Runtime has no fp16
  kernels for most operators there and turns every weight into fp32 at load (the peak of an fp16 build).

The factors were measured on this project's builds (benchmarks/README.md, "Build memory").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.memory import GiB, rss_bytes

from .components import components
from .config import ModelConfig
from .model import AdaptBIR, Capabilities
from .onnx_export import PROTOBUF_LIMIT, WRITE_IN_FLIGHT_BYTES

INLINE_EXPORT_COPIES = 3.0  # exporter's proto + serialised bytes + the graph read back, for graphs < 2 GB
STREAM_OVERHEAD = WRITE_IN_FLIGHT_BYTES + 64 * 2**20  # in flight while streaming + the largest tensor
ORT_SESSION_FACTOR = {"fp32": 1.05, "fp16": 3.5}  # session bytes per graph-file byte (CPU provider)
ATTENTION_COPIES = 3  # scores, softmax and its fp32 upcast live together in torch's attention


@dataclass(frozen=True)
class BuildMemory:
    peak: int  # bytes above what the process holds before loading weights
    phase: str  # the step that sets the peak
    weights: int  # fp32 bytes of every weight the build loads
    phases: dict[str, int]
    base: int = 0  # what the process held when predicted (libraries), where known

    @property
    def total(self) -> int:
        return self.base + self.peak

    def summary(self) -> str:
        return (f"predicted peak {self.total / GiB:.1f} GiB ({self.phase}; {self.weights / GiB:.1f} GiB of fp32 "
                f"weights, {self.base / GiB:.1f} GiB of libraries already loaded)")


def _bytes(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(t.numel() * 4 for t in (*module.parameters(), *module.buffers()))


def _attention_bytes(sample: tuple[torch.Tensor, ...]) -> int:
    """The attention score tensors torch holds at once on `sample` (its first input is the latent): the
    UNet's first level (h·w tokens; its self-attention runs one head at a time) or the VAE decoder's
    mid-block (one head)."""
    batch, _, h, w = sample[0].shape
    return ATTENTION_COPIES * batch * (h * w) ** 2 * 4


def predict_build_memory(config: ModelConfig, precision: str, capabilities: Capabilities | None = None
                         ) -> BuildMemory:
    """Predict the build's peak from the parameter counts of `config` (a meta-device model: no memory),
    following the build's own order of graphs, check samples and freed parts."""
    caps = capabilities or Capabilities(has_text_encoder=config.text_encoder is not None)
    with torch.device("meta"):
        model = AdaptBIR(config, caps)
    comps = components(model, torch.zeros(1, 77, config.context_dim))
    held = _bytes(model) - _bytes(model.text_encoder)
    phases = {"loading the weights": _bytes(model)}
    for i, component in enumerate(comps):
        size = sum(_bytes(p) for p in component.parts)
        graph_precision = precision if component.fp16_allowed else "fp32"
        export = INLINE_EXPORT_COPIES * size if size < PROTOBUF_LIMIT else STREAM_OVERHEAD
        phases[f"tracing {component.name}"] = held + int(export) + component.tracing_bytes
        if component.graph.latent_attention:
            activations = max(_attention_bytes(sample)
                              for sample in component.check_samples(graph_precision).values())
            phases[f"torch reference of {component.name}"] = held + activations
        held -= sum(_bytes(p) for p in component.parts_to_free(comps[i + 1:]))
        file = size / 2 if graph_precision == "fp16" else size
        phases[f"ONNX Runtime check of {component.name}"] = held + int(ORT_SESSION_FACTOR[graph_precision] * file)
    phase = max(phases, key=phases.__getitem__)
    return BuildMemory(phases[phase], phase, _bytes(model), phases, rss_bytes() or 0)


def check_fits(memory: BuildMemory, available: int | None, what: str) -> None:
    """Refuse, in one line, a build that would not fit the memory this process can still allocate."""
    if available is not None and memory.peak > available:
        raise AdaptBIRError(
            f"{what} needs about {memory.peak / GiB:.1f} GiB more memory at its peak ({memory.phase}), but only "
            f"{available / GiB:.1f} GiB is available; close other programs or build on a larger machine "
            f"(--ignore-memory-check builds anyway)"
        )
