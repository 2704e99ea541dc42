"""Each exported graph as one component: the runtime's description of it (`runtime/graphs.py`: inputs,
outputs, tolerance, sample inputs, precision), its torch module, and the submodules whose weights it contains.

`TORCH` pairs each description with its torch side; adding a graph is one description plus one row here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from adaptbir.runtime.graphs import GRAPHS, Graph, GraphSpec, Tolerance

from .model import AdaptBIR, DecoderGraph, DualEncoderGraph, MusiqGraph, UNetGraph

# Sample sizes for tracing and export-time parity. Large enough that the tiny model's GroupNorms see
# more than a handful of elements per group at the bottleneck (README §8: tiny 8x16 latents are
# ill-conditioned), small enough to run the full-size model on a CPU.
SAMPLE_IMAGE = (256, 256)
# fp16 graphs are checked a second time at SD 2.1-base's own resolution: overflows grow with activation
# size (SD 2.x attention and VAE overflows are the known failure), so the small sample alone cannot show them.
FULL_SIZE_IMAGE = (512, 512)


@dataclass(frozen=True)
class TorchGraph:
    """The torch side of one description: the module exported, the submodules whose weights it holds."""

    module: Callable[[AdaptBIR], nn.Module]
    parts: Callable[[AdaptBIR], tuple[nn.Module, ...]]
    reference: Callable[[AdaptBIR], nn.Module] | None = None  # parity's, when the exported module is rewritten
    attention_heads_at_once: int | None = None  # recorded in the manifest for the runtime's memory model
    present: Callable[[AdaptBIR], bool] = lambda model: True  # a checkpoint without the part has no graph
    # The exporter's working set beyond the weights while it traces the graph on its sample (the forward's
    # activations, the traced graph, constant folding): measured on the tiny build, whose weights are a few MB
    # (export/memory.py; benchmarks/README.md, "Build memory").
    tracing_bytes: int = 0


def _encoders(model: AdaptBIR) -> tuple[nn.Module, ...]:
    identity = (model.vae.encoder, model.vae.quant_conv)
    return identity if model.restoration_encoder is None else (*identity, model.restoration_encoder)


def _folded_musiq(model: AdaptBIR) -> nn.Module:
    folded = copy.deepcopy(model.musiq)
    folded.fold_weight_standardisation()  # the graph gets plain convs; parity is against pyiqa's StdConv
    return MusiqGraph(folded)


MiB = 2**20
TORCH: dict[str, TorchGraph] = {
    "dual_encoder": TorchGraph(DualEncoderGraph, _encoders, tracing_bytes=200 * MiB),
    "unet": TorchGraph(UNetGraph, lambda m: (m.unet, m.controlnet, m.vae.post_quant_conv),
                       attention_heads_at_once=1,  # self-attention one head at a time (export/attention.py)
                       tracing_bytes=520 * MiB),
    "decoder": TorchGraph(DecoderGraph, lambda m: (m.vae.decoder, m.vae.post_quant_conv), tracing_bytes=350 * MiB),
    "musiq": TorchGraph(_folded_musiq, lambda m: (m.musiq,), reference=lambda m: MusiqGraph(m.musiq),
                        present=lambda m: m.musiq is not None, tracing_bytes=300 * MiB),
}


@dataclass
class Component:
    graph: Graph  # the runtime's description, its context width resolved
    module: nn.Module
    parts: tuple[nn.Module, ...]  # whose weights are inside the graph (for the reuse key)
    sample: tuple[torch.Tensor, ...]
    full_size_sample: tuple[torch.Tensor, ...] | None = None  # batch 1 at FULL_SIZE_IMAGE (fp16 check)
    reference: nn.Module | None = None  # what parity compares against, when the exported module is rewritten
    attention_heads_at_once: int | None = None  # recorded in the manifest for the runtime's memory model
    tracing_bytes: int = 0  # the exporter's working set beyond the weights (TorchGraph.tracing_bytes)

    @property
    def spec(self) -> GraphSpec:
        return self.graph.spec

    @property
    def tolerance(self) -> Tolerance:
        return self.graph.spec.tolerance

    @property
    def fp16_allowed(self) -> bool:
        return not self.graph.fp32_only

    @property
    def torch_reference(self) -> nn.Module:
        return self.reference or self.module

    @property
    def name(self) -> str:
        return self.graph.name

    def check_samples(self, graph_precision: str) -> dict[str, tuple[torch.Tensor, ...]]:
        """The inputs its graph is checked on: the sample, and for fp16 graphs the full-size one too."""
        samples = {"sample": self.sample}
        if graph_precision == "fp16" and self.full_size_sample is not None:
            samples["full_size"] = self.full_size_sample
        return samples

    def parts_to_free(self, later: list[Component]) -> list[nn.Module]:
        """Its parts that no later graph holds: their weights are not needed once its graph is checked."""
        needed = {id(part) for component in later for part in component.parts}
        return [part for part in self.parts if id(part) not in needed]


def _torch(feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.array(v, order="C")) for v in feeds.values())  # own, writable copies


def components(model: AdaptBIR, context: torch.Tensor, seed: int = 0) -> list[Component]:
    """The graphs of an engine directory, in build order, with the runtime's sample inputs: the check batch
    at SAMPLE_IMAGE, and for graphs that may be fp16 batch 1 at FULL_SIZE_IMAGE too."""
    rng = np.random.default_rng(seed)
    ctx = context.numpy()
    out = []
    for name, graph in GRAPHS.items():
        side = TORCH[name]
        if not side.present(model):
            continue
        graph = replace(graph, spec=graph.spec.resolved(C=model.config.context_dim))
        sample = _torch(graph.sample_feeds(rng, SAMPLE_IMAGE, graph.check_batch, ctx))
        full_size = None if graph.fp32_only else _torch(graph.sample_feeds(rng, FULL_SIZE_IMAGE, 1, ctx))
        out.append(Component(graph, side.module(model), side.parts(model), sample, full_size,
                             side.reference(model) if side.reference else None, side.attention_heads_at_once,
                             side.tracing_bytes))
    return out
