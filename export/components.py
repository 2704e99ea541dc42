"""Each exported graph as one component: its description (from the runtime: inputs, outputs, tolerance and
sample inputs), its torch module, and the submodules whose weights it contains."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adaptbir.runtime import graphs
from adaptbir.runtime.graphs import GraphSpec, Tolerance

from .model import AdaptBIR, DecoderGraph, DualEncoderGraph, MusiqGraph, UNetGraph

# Sample sizes for tracing and export-time parity. Large enough that the tiny model's GroupNorms see
# more than a handful of elements per group at the bottleneck (README §8: tiny 8x16 latents are
# ill-conditioned), small enough to run the full-size model on a CPU.
SAMPLE_IMAGE = (256, 256)
SAMPLE_BATCH = 2
# fp16 graphs are checked a second time at SD 2.1-base's own resolution: overflows grow with activation
# size (SD 2.x attention and VAE overflows are the known failure), so the small sample alone cannot show them.
FULL_SIZE_IMAGE = (512, 512)
MUSIQ_SAMPLE_NATIVE = 64  # native-resolution patches of a 256x256 image

@dataclass
class Component:
    spec: GraphSpec
    module: nn.Module
    parts: tuple[nn.Module, ...]  # whose weights are inside the graph (for the reuse key)
    sample: tuple[torch.Tensor, ...]
    full_size_sample: tuple[torch.Tensor, ...] | None = None  # batch 1 at FULL_SIZE_IMAGE (fp16 check)
    fp16_allowed: bool = True  # MUSIQ stays fp32 everywhere so the gates do not flip on precision
    reference: nn.Module | None = None  # what parity compares against, when the exported module is rewritten
    attention_heads_at_once: int | None = None  # recorded in the manifest for the runtime's memory model

    @property
    def tolerance(self) -> Tolerance:
        return self.spec.tolerance

    @property
    def torch_reference(self) -> nn.Module:
        return self.reference or self.module

    @property
    def name(self) -> str:
        return self.spec.name

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
    """The four graphs of an engine directory, in build order, with the runtime's sample inputs."""
    rng = np.random.default_rng(seed)
    ctx = context.numpy()

    def samples(name: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        batch = SAMPLE_BATCH if name == "unet" else 1
        return (_torch(graphs.sample_feeds(name, rng, SAMPLE_IMAGE, batch, ctx)),
                _torch(graphs.sample_feeds(name, rng, FULL_SIZE_IMAGE, 1, ctx)))

    vae, encoders = model.vae, [model.vae.encoder, model.vae.quant_conv]
    if model.restoration_encoder is not None:
        encoders.append(model.restoration_encoder)
    out = [
        Component(graphs.DUAL_ENCODER, DualEncoderGraph(model), tuple(encoders), *samples("dual_encoder")),
        Component(graphs.UNET.resolved(C=model.config.context_dim), UNetGraph(model),
                  (model.unet, model.controlnet, vae.post_quant_conv), *samples("unet"),
                  attention_heads_at_once=1),  # self-attention one head at a time (export/attention.py)
        Component(graphs.DECODER, DecoderGraph(model), (vae.decoder, vae.post_quant_conv), *samples("decoder")),
    ]
    if model.musiq is not None:
        folded = copy.deepcopy(model.musiq)
        folded.fold_weight_standardisation()  # the graph gets plain convs; parity is against pyiqa's StdConv
        out.append(Component(graphs.MUSIQ, MusiqGraph(folded), (model.musiq,),
                             _torch(graphs.musiq_sample(rng, 1, MUSIQ_SAMPLE_NATIVE)), fp16_allowed=False,
                             reference=MusiqGraph(model.musiq)))
    return out
