"""MUSIQ (pyiqa's architecture, KonIQ configuration) behind the patch-tensor interface of the engine.

The runtime extracts the multi-scale patches in numpy; this module scores them:
`patches [B,N,3072]`, `spatial_idx [B,N]`, `scale_idx [B,N]`, `mask [B,N]` → `score [B]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MusiqConfig


def build_pyiqa_musiq(cfg: MusiqConfig) -> nn.Module:
    """pyiqa's MUSIQ with `pretrained=False`: a bare constructor would download AVA weights (10 classes)."""
    from pyiqa.archs.musiq_arch import MUSIQ

    return MUSIQ(
        patch_size=cfg.patch_size, num_class=cfg.num_class, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads, num_layers=cfg.num_layers, num_scales=cfg.num_scales,
        spatial_pos_grid_size=cfg.spatial_pos_grid_size, use_scale_emb=cfg.use_scale_emb,
        pretrained=False, longer_side_lengths=list(cfg.longer_side_lengths),
    )


class StandardisedConv(nn.Module):
    """A pyiqa StdConv with its weight standardisation folded in: TF-"SAME" pad, then a plain conv."""

    def __init__(self, std_conv: nn.Conv2d):
        super().__init__()
        w = std_conv.weight.detach()
        w = w - w.mean((1, 2, 3), keepdim=True)
        self.weight = nn.Parameter(w / (w.std((1, 2, 3), keepdim=True) + 1e-5), requires_grad=False)
        self.bias = std_conv.bias
        self.kernel, self.stride = std_conv.kernel_size[0], std_conv.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Patches are a fixed 32×32, so the padding is a constant of the graph.
        size = x.shape[-1]
        out = -(-size // self.stride)
        pad = max((out - 1) * self.stride + self.kernel - size, 0)
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride)


class MusiqScorer(nn.Module):
    """Scores pre-extracted MUSIQ patch tokens; the weights live under `net.` (pyiqa names)."""

    def __init__(self, cfg: MusiqConfig):
        super().__init__()
        self.net = build_pyiqa_musiq(cfg)
        self.patch_size = cfg.patch_size

    def fold_weight_standardisation(self) -> None:
        """Replace every StdConv by a plain conv on standardised weights (done once, at export)."""
        from pyiqa.archs.musiq_arch import StdConv

        for parent in [self.net, self.net.block1]:
            for name, child in list(parent.named_children()):
                if isinstance(child, StdConv):
                    setattr(parent, name, StandardisedConv(child))

    def forward(self, patches: torch.Tensor, spatial_idx: torch.Tensor, scale_idx: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        net, p = self.net, self.patch_size
        b, n, _ = patches.shape
        x = patches.reshape(b * n, 3, p, p)
        x = net.block1(net.root_pool(net.gn_root(net.conv_root(x))))
        x = net.embedding(x.permute(0, 2, 3, 1).reshape(b, n, -1))  # (y, x, c) order, as TF
        enc = net.transformer_encoder
        x = enc.posembed_input(x, spatial_idx)
        if enc.use_scale_emb:
            x = enc.scaleembed_input(x, scale_idx)
        x = torch.cat([enc.cls.expand(b, -1, -1), x], dim=1)
        # A float mask (1 = token) instead of pyiqa's bool one: the same `== 0` test, and exportable.
        token_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in enc.transformer.values():
            x = block(x, token_mask)
        q = net.head(enc.encoder_norm(x)[:, 0])
        # dist_to_mos: Σ p_c·c; with KonIQ's single class this is the head output itself.
        classes = torch.arange(1, q.shape[-1] + 1, dtype=q.dtype, device=q.device)
        return (q * classes).sum(dim=-1)
