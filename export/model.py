"""The whole AdaptBIR model and the four graphs the engine directory holds.

`AdaptBIR` owns every part under a name that maps 1:1 onto a checkpoint prefix (`CHECKPOINT_PREFIXES`).
The graph modules (`DualEncoderGraph`, `UNetGraph`, `DecoderGraph`, `MusiqGraph`) are thin views over it
that implement the engine contract of docs/architecture.md: one latent space (the diffusion latent, VAE mode ×
scale factor) at every graph boundary.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptbir.runtime.manifest import Capabilities  # the manifest's section, shared by the exporter

from .config import ModelConfig
from .musiq import MusiqScorer
from .text_encoder import TextEncoder
from .unet import ControlledUNet, ControlNet
from .vae import AutoencoderKL, Encoder

# Our module name → the reference checkpoint's prefix.
CHECKPOINT_PREFIXES = {
    "unet.": "model.diffusion_model.",
    "controlnet.": "control_model.",
    "vae.": "first_stage_model.",
    "restoration_encoder.": "preprocess_model.encoder.",
    "text_encoder.": "cond_stage_model.model.",
    "musiq.net.": "musiq_model.net.",
}


class AdaptBIR(nn.Module):
    def __init__(self, config: ModelConfig, capabilities: Capabilities | None = None):
        super().__init__()
        caps = capabilities or Capabilities(has_text_encoder=config.text_encoder is not None)
        self.config, self.capabilities = config, caps
        self.unet = ControlledUNet(config.unet, with_csft=caps.has_csft)
        self.controlnet = ControlNet(config.controlnet, config.control_scales)
        self.vae = AutoencoderKL(config.vae)
        self.restoration_encoder = Encoder(config.restoration_encoder) if caps.has_restoration_encoder else None
        self.text_encoder = TextEncoder(config.text_encoder) if caps.has_text_encoder else None
        self.musiq = MusiqScorer(config.musiq) if caps.has_musiq else None
        self.reset_constants()

    def reset_constants(self) -> None:
        """(Re)create the non-persistent constants; needed after loading onto a meta-built model."""
        scale = torch.tensor(self.config.scale_factor, dtype=torch.float32)
        # float32(1/s) from the Python double, then a float32 multiply: the reference's exact arithmetic.
        inverse = torch.tensor(1.0 / self.config.scale_factor, dtype=torch.float32)
        self.register_buffer("latent_scale", scale, persistent=False)
        self.register_buffer("latent_scale_inv", inverse, persistent=False)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_constants"):
                module.reset_constants()

    # --- reference-form pieces (used by the golden tests and the graphs) ---

    def identity_moments(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.quant_conv(self.vae.encoder(image))

    def restoration_moments(self, image: torch.Tensor) -> torch.Tensor:
        encoder = self.restoration_encoder or self.vae.encoder
        return self.vae.quant_conv(encoder(image))

    def hint_from_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Diffusion-space conditioning → the ControlNet hint (post_quant_conv space, unscaled)."""
        return self.vae.post_quant_conv(cond * self.latent_scale_inv)

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
            w: torch.Tensor) -> torch.Tensor:
        """UNet-with-controls noise prediction for a hint in post_quant_conv space."""
        controls, features = self.controlnet(x, hint, t, context)
        return self.unet(x, t, context, controls, features, w)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(self.vae.post_quant_conv(latent * self.latent_scale_inv))


class DualEncoderGraph(nn.Module):
    """image [B,3,H,W] in [-1,1] → z_restore, z_identity [B,4,H/8,W/8] (diffusion latent space)."""

    def __init__(self, model: AdaptBIR):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, dim = self.model, self.model.vae.embed_dim
        z_identity = m.identity_moments(image)[:, :dim] * m.latent_scale
        if m.restoration_encoder is None:  # k is fixed to 1: both outputs are the identity latent
            return z_identity, z_identity
        return m.restoration_moments(image)[:, :dim] * m.latent_scale, z_identity


class UNetGraph(nn.Module):
    """x, t (int64), context, cond (diffusion space), w → eps. UNet + ControlNet + CSFT in one graph."""

    def __init__(self, model: AdaptBIR):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
        return self.model.eps(x, t, context, self.model.hint_from_cond(cond), w)


class DecoderGraph(nn.Module):
    """latent [B,4,h,w] (diffusion space) → image [B,3,8h,8w], nominally [-1,1], unbounded."""

    def __init__(self, model: AdaptBIR):
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent)


class MusiqGraph(nn.Module):
    """patches [B,N,3072], spatial_idx, scale_idx [B,N] int64, mask [B,N] → score [B]."""

    def __init__(self, musiq: MusiqScorer):
        super().__init__()
        self.musiq = musiq

    def forward(self, patches: torch.Tensor, spatial_idx: torch.Tensor, scale_idx: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return self.musiq(patches, spatial_idx, scale_idx, mask)


def random_model(config: ModelConfig, seed: int) -> AdaptBIR:
    """Seeded random weights in the exact real layout (PyTorch's default initialisation); no text tower,
    so the context of a random build is seeded too."""
    torch.manual_seed(seed)
    return AdaptBIR(config, Capabilities(has_text_encoder=False)).eval()
