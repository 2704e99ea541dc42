"""The OpenCLIP ViT-H/14 text tower as SD 2.x uses it: penultimate layer, final LayerNorm.

The product only ever needs the empty prompt, whose token ids are fixed ([SOT, EOT, 0, ...]), so no
tokenizer is involved.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .config import TextEncoderConfig


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)
        ))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.layernorm_eps) for _ in range(cfg.layers_used)
        )


class TextEncoder(nn.Module):
    """Token ids [B,77] → context [B,77,width] (output of block `layers_used`, then ln_final)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = _Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        self.reset_constants()

    def reset_constants(self) -> None:
        n = self.cfg.context_length
        self.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu_(1), persistent=False)

    def empty_prompt_tokens(self) -> torch.Tensor:
        tokens = torch.zeros(1, self.cfg.context_length, dtype=torch.long)
        tokens[0, 0], tokens[0, 1] = self.cfg.sot_token, self.cfg.eot_token
        return tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
        return self.ln_final(x)

    @torch.no_grad()
    def empty_context(self) -> torch.Tensor:
        """The constant context of the empty prompt, [1, 77, width]."""
        return self(self.empty_prompt_tokens())
