"""SD 2.x UNet pieces, the LAControlNet, the CSFT blocks, and the UNet with both control phases.

Module and parameter names follow the reference checkpoint (`input_blocks.N.M`, `in_layers.2`, ...), so
a state dict loads without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer
from .config import UNetConfig
from .dtypes import cast


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (the reference upcasts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(super().forward(cast(x, torch.float32)), x.dtype)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding `[cos, sin]` of the original 0..999 timestep ids."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.max_period = dim, max_period
        self.reset_constants()

    def reset_constants(self) -> None:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def time_mlp(model_channels: int) -> nn.Sequential:
    dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps=eps), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps=eps), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + cast(self.emb_layers(emb), h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest ×2, then conv3×3 (may change the channel count: the CSFT feature upsamplers do)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A UNet block: layers that take the time embedding, the context, or neither."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels, channels // cfg.num_head_channels, cfg.num_head_channels, cfg.transformer_depth,
        cfg.context_dim, cfg.groupnorm_groups, cfg.transformer_groupnorm_eps, cfg.layernorm_eps,
    )


def _resblock(cfg: UNetConfig, channels: int, out_channels: int) -> ResBlock:
    return ResBlock(channels, cfg.time_embed_dim, out_channels, cfg.groupnorm_groups, cfg.groupnorm_eps)


def build_encoder(cfg: UNetConfig, in_channels: int) -> tuple[nn.ModuleList, TimestepSequential, list[int]]:
    """The 12 input blocks and the middle block; returns them with each input block's channel count."""
    mc = cfg.model_channels
    blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [_resblock(cfg, ch, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            blocks.append(TimestepSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    middle = TimestepSequential(_resblock(cfg, ch, ch), _transformer(cfg, ch), _resblock(cfg, ch, ch))
    return blocks, middle, chans


class ControlNet(nn.Module):
    """LAControlNet: the UNet encoder + middle block on `cat(x_t, hint)`.

    Returns the 13 zero-conv outputs (controls) and the 13 raw block outputs (features), both multiplied
    by the control scales as the reference does.
    """

    def __init__(self, cfg: UNetConfig, control_scales: tuple[float, ...]):
        super().__init__()
        self.t_embedding = TimestepEmbedding(cfg.model_channels)
        self.time_embed = time_mlp(cfg.model_channels)
        self.input_blocks, self.middle_block, chans = build_encoder(cfg, cfg.in_channels + cfg.hint_channels)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in chans)
        self.middle_block_out = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1))
        self.control_scales = tuple(control_scales)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        emb = self.time_embed(self.t_embedding(t))
        h = torch.cat([x, hint], dim=1)
        controls, features = [], []
        for block, zero_conv in zip(self.input_blocks, self.zero_convs, strict=True):
            h = block(h, emb, context)
            controls.append(zero_conv(h))
            features.append(h)
        h = self.middle_block(h, emb, context)
        controls.append(self.middle_block_out(h))
        features.append(h)
        return self._scaled(controls), self._scaled(features)

    def _scaled(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # A scale of exactly 1.0 is skipped: the product is bitwise the input, and the graph stays smaller.
        return [x if s == 1.0 else x * s for x, s in zip(tensors, self.control_scales, strict=True)]


class CSFTBlock(nn.Module):
    """`h + w·(GroupNorm(h)·scale(e) + shift(e))` with `e = ReLU(conv3×3(feature))` (Fuse_sft_block)."""

    def __init__(self, feature_channels: int, channels: int, hidden: int, groups: int, eps: float):
        super().__init__()
        self.fd_norm = GroupNorm32(groups, channels, eps=eps)
        self.mlp_shared = nn.Sequential(nn.Conv2d(feature_channels, hidden, 3, padding=1), nn.ReLU())
        self.scale = nn.Conv2d(hidden, channels, 3, padding=1)
        self.shift = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, feature: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        e = self.mlp_shared(feature)
        return h + w * (self.fd_norm(h) * self.scale(e) + self.shift(e))


# Output blocks after which the UNet up-samples; the CSFT feature used there is lifted to match.
UPSAMPLE_AFTER = (2, 5, 8)


class ControlledUNet(nn.Module):
    """The SD 2.x UNet with ControlNet skip additions and (optionally) the 13 CSFT blocks.

    Without CSFT (`with_csft=False`) this is the plain LAControlNet UNet and `w` is ignored.
    """

    def __init__(self, cfg: UNetConfig, with_csft: bool = True):
        super().__init__()
        mc = cfg.model_channels
        self.t_embedding = TimestepEmbedding(mc)
        self.time_embed = time_mlp(mc)
        self.input_blocks, self.middle_block, chans = build_encoder(cfg, cfg.in_channels)
        self.output_blocks = nn.ModuleList()
        skip_chans, ch, ds = list(chans), chans[-1], 2 ** (len(cfg.channel_mult) - 1)
        out_chans = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [_resblock(cfg, ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
                out_chans.append(ch)
        self.out = nn.Sequential(
            GroupNorm32(cfg.groupnorm_groups, ch, eps=cfg.groupnorm_eps), nn.SiLU(),
            nn.Conv2d(mc, cfg.out_channels, 3, padding=1),
        )
        self.with_csft = with_csft
        if with_csft:
            self._build_csft(cfg, chans, out_chans)

    def _build_csft(self, cfg: UNetConfig, chans: list[int], out_chans: list[int]) -> None:
        n = len(chans)  # 12 skip features; CSFT_0 acts on the middle block, CSFT_{i+1} after output block i
        # Feature used by CSFT_{i+1} is f_{n-1-i}; after an up-sampling block it is lifted to h's channels.
        feature_chans = [chans[-1]] + [chans[n - 1 - i] for i in range(n)]
        h_chans = [chans[-1], *out_chans]
        self.upsample_layers = nn.ModuleList(
            Upsample(chans[n - 1 - i], out_chans[i]) for i in UPSAMPLE_AFTER
        )
        for i in UPSAMPLE_AFTER:
            feature_chans[i + 1] = out_chans[i]
        self.cft_blocks = nn.ModuleList(
            CSFTBlock(f, c, cfg.csft_hidden_channels, cfg.groupnorm_groups, cfg.groupnorm_eps)
            for f, c in zip(feature_chans, h_chans, strict=True)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, controls: list[torch.Tensor],
                features: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(self.t_embedding(t))
        w = w.reshape(-1, 1, 1, 1)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        h = h + controls[-1]
        if self.with_csft:
            h = self.cft_blocks[0](features[-1], h, w)
        last = len(skips) - 1
        for i, block in enumerate(self.output_blocks):
            h = block(torch.cat([h, skips[last - i] + controls[last - i]], dim=1), emb, context)
            if self.with_csft:
                feature = features[last - i]
                if i in UPSAMPLE_AFTER:
                    feature = self.upsample_layers[UPSAMPLE_AFTER.index(i)](feature)
                h = self.cft_blocks[i + 1](feature, h, w)
        return self.out(h)
