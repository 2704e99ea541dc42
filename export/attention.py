"""The SD 2.x linear SpatialTransformer: self-attention, cross-attention to the text context, GEGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import cast


class CrossAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v; keys from `context` when given (else self-attention)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2).reshape(b * self.heads, n, -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ·scale)·v on [batch, tokens, dims]. Logits in float32 whatever the module dtype, as the
        reference forces: SD 2.x overflows in fp16."""
        f32 = torch.float32
        logits = torch.bmm(cast(q, f32), cast(k, f32).transpose(1, 2)) * self.scale
        return torch.bmm(cast(logits.softmax(dim=-1), v.dtype), v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            return self.to_out(self._self_attention(x))
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = self._attend(q, k, v)
        bh, n, d = out.shape
        out = out.reshape(bh // self.heads, self.heads, n, d).transpose(1, 2)
        return self.to_out(out.reshape(-1, n, self.heads * d))

    def _self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """One head at a time: the [tokens, tokens] scores of a single head are the largest tensor alive, not
        those of every head at once (5 heads × 12,288² × 4 B = 3 GB for SD 2.1 at 1024×768). The same
        arithmetic per head as the batched form; the heads' outputs side by side are its [B, N, heads·d]."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        d = q.shape[-1] // self.heads
        heads = [self._attend(q[..., i * d:(i + 1) * d], k[..., i * d:(i + 1) * d], v[..., i * d:(i + 1) * d])
                 for i in range(self.heads)]
        return torch.cat(heads, dim=-1)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, eps: float):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm → tokens (row-major) → proj_in → transformer blocks → proj_out → NCHW, plus the input."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 groups: int, gn_eps: float, ln_eps: float):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=gn_eps, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, ln_eps) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2).contiguous())
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w).contiguous()
        return out + x
