"""Each exported graph as one component: its description (from the runtime), its torch module, the
submodules whose weights it contains, sample inputs for tracing and parity, and its tolerance."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from adaptbir.runtime import graphs
from adaptbir.runtime.graphs import GraphSpec
from adaptbir.runtime.musiq_patches import FIXED_TOKENS

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

# fp32: absolute error on latents, eps and images (DESIGN: 1e-4), and on the 0–100 MUSIQ score.
FP32_ATOL = {"dual_encoder": 1e-4, "unet": 1e-4, "decoder": 1e-4, "musiq": 1e-3}
# fp16: PSNR of the output over its own peak-to-peak range (see README "fp16").
FP16_MIN_PSNR_DB = {"dual_encoder": 40.0, "unet": 40.0, "decoder": 35.0, "musiq": float("inf")}


@dataclass
class Component:
    spec: GraphSpec
    module: nn.Module
    parts: tuple[nn.Module, ...]  # whose weights are inside the graph (for the reuse key)
    sample: tuple[torch.Tensor, ...]
    full_size_sample: tuple[torch.Tensor, ...] | None = None  # batch 1 at FULL_SIZE_IMAGE (fp16 check)
    fp16_allowed: bool = True  # MUSIQ stays fp32 everywhere so the gates do not flip on precision
    reference: nn.Module | None = None  # what parity compares against, when the exported module is rewritten

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


def musiq_sample(batch: int, native: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A token set shaped like a real one: 49 + 144 resized-scale slots (some masked), then native patches."""
    n = FIXED_TOKENS + native
    patches = torch.rand(batch, n, graphs.PATCH_VALUES, generator=generator) * 2 - 1
    spatial = torch.randint(0, 100, (batch, n), generator=generator)
    scale = torch.cat([torch.full((batch, 49), 0), torch.full((batch, 144), 1), torch.full((batch, native), 2)], 1)
    mask = torch.ones(batch, n)
    mask[:, 30:49] = 0  # a non-square image leaves the padded slots of a resized scale empty
    mask[:, 49 + 120 : FIXED_TOKENS] = 0
    patches[mask == 0] = 0
    return patches, spatial, scale, mask


def _image_samples(gen: torch.Generator, size: tuple[int, int], batch: int, context: torch.Tensor) -> dict:
    """Inputs of the three image graphs for one image size."""
    H, W = size
    h, w = H // 8, W // 8
    image = torch.rand(1, 3, H, W, generator=gen) * 2 - 1
    x, cond = torch.randn(batch, 4, h, w, generator=gen), torch.randn(batch, 4, h, w, generator=gen)
    t, strength = torch.tensor([999, 500][:batch]), torch.tensor([0.0, 0.8][-batch:])
    latent = torch.randn(1, 4, h, w, generator=gen)
    return {
        "dual_encoder": (image,),
        "unet": (x, t, context.expand(batch, -1, -1).contiguous(), cond, strength),
        "decoder": (latent,),
    }


def components(model: AdaptBIR, context: torch.Tensor, seed: int = 0) -> list[Component]:
    """The four graphs of an engine directory, in build order."""
    gen = torch.Generator().manual_seed(seed)
    sample = _image_samples(gen, SAMPLE_IMAGE, SAMPLE_BATCH, context)
    full = _image_samples(gen, FULL_SIZE_IMAGE, 1, context)
    vae, encoders = model.vae, [model.vae.encoder, model.vae.quant_conv]
    if model.restoration_encoder is not None:
        encoders.append(model.restoration_encoder)
    out = [
        Component(graphs.DUAL_ENCODER, DualEncoderGraph(model), tuple(encoders), sample["dual_encoder"],
                  full["dual_encoder"]),
        Component(graphs.UNET.resolved(C=model.config.context_dim), UNetGraph(model),
                  (model.unet, model.controlnet, vae.post_quant_conv), sample["unet"], full["unet"]),
        Component(graphs.DECODER, DecoderGraph(model), (vae.decoder, vae.post_quant_conv), sample["decoder"],
                  full["decoder"]),
    ]
    if model.musiq is not None:
        folded = copy.deepcopy(model.musiq)
        folded.fold_weight_standardisation()  # the graph gets plain convs; parity is against pyiqa's StdConv
        out.append(Component(graphs.MUSIQ, MusiqGraph(folded), (model.musiq,),
                             musiq_sample(1, MUSIQ_SAMPLE_NATIVE, gen), fp16_allowed=False,
                             reference=MusiqGraph(model.musiq)))
    return out
