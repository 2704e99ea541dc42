"""AutoencoderKL (f=8): encoder, decoder and the two 1×1 quant convs, named as the reference checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .dtypes import cast


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written as the reference writes it (not F.silu), so the exported graph computes the same thing.
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if channels != out_channels:
            self.nin_shortcut = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 conv projections."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        logits = torch.bmm(cast(q, torch.float32), cast(k, torch.float32)) * (int(c) ** -0.5)
        weights = cast(logits.softmax(dim=2), v.dtype)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class EncoderDownsample(nn.Module):
    """Pad right/bottom by one zero row and column, then conv3×3 stride 2 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class DecoderUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block.i`, `attn.i` and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, eps)
        self.attn_1 = AttnBlock(channels, groups, eps)
        self.block_2 = ResnetBlock(channels, channels, groups, eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image [B,3,H,W] in [-1,1] → moments before quant_conv [B,2·z,H/8,W/8]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.groupnorm_groups, cfg.groupnorm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in, res = cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            ch_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, ch_out, g, eps))
                ch_in = ch_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(ch_in, g, eps))
            down = _Level(blocks, attns)
            if level != len(cfg.ch_mult) - 1:
                down.downsample = EncoderDownsample(ch_in)
                res //= 2
            self.down.append(down)
        self.mid = _Mid(ch_in, g, eps)
        self.norm_out = nn.GroupNorm(g, ch_in, eps=eps)
        self.conv_out = nn.Conv2d(ch_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down.run(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Post-quant latent [B,z,h,w] → image [B,3,8h,8w], nominally [-1,1], unbounded (no tanh)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.groupnorm_groups, cfg.groupnorm_eps
        ch_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _Mid(ch_in, g, eps)
        levels: list[_Level] = []
        for level in reversed(range(len(cfg.ch_mult))):
            ch_out = cfg.ch * cfg.ch_mult[level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch_in, ch_out, g, eps))
                ch_in = ch_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(ch_in, g, eps))
            up = _Level(blocks, attns)
            if level != 0:
                up.upsample = DecoderUpsample(ch_in)
                res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, ch_in, eps=eps)
        self.conv_out = nn.Conv2d(ch_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up.run(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's VAE: `encoder`, `decoder`, `quant_conv` (2z→2z), `post_quant_conv` (z→z)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.embed_dim = cfg.embed_dim

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        """Mean of the diagonal Gaussian `quant_conv(moments)` (the logvar half is unused)."""
        return self.quant_conv(moments)[:, : self.embed_dim]
