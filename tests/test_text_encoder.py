"""Our OpenCLIP text tower (penultimate layer + ln_final, as SD 2.x) equals open_clip's on the same weights."""

from __future__ import annotations

import pytest
import torch

from adaptbir.export.build import empty_prompt_context
from adaptbir.export.config import TextEncoderConfig
from adaptbir.export.text_encoder import TextEncoder

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is a test dependency (make test installs it)")

torch.set_grad_enabled(False)
CFG = TextEncoderConfig(width=64, heads=4, layers=3, layers_used=2)  # reduced width; same structure as ViT-H/14


def _reference_context(tower, tokens: torch.Tensor) -> torch.Tensor:
    """SD 2.x FrozenOpenCLIPEmbedder.encode_with_transformer(layer="penultimate"), on open_clip's modules."""
    x = tower.token_embedding(tokens) + tower.positional_embedding
    batch_first = getattr(tower.transformer, "batch_first", True)
    x = x if batch_first else x.permute(1, 0, 2)
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    x = x if batch_first else x.permute(1, 0, 2)
    return tower.ln_final(x)


def test_empty_prompt_context_equals_open_clip():
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=CFG.vocab_size, width=CFG.width, heads=CFG.heads,
                            layers=CFG.layers, output_dim=CFG.width).eval()
    with torch.no_grad():  # open_clip leaves the positional embedding small; make it matter
        tower.positional_embedding.normal_(0, 0.5)
    ours = TextEncoder(CFG).eval()
    unused_block = f"transformer.resblocks.{CFG.layers - 1}."
    state = {k: v for k, v in tower.state_dict().items()
             if k not in ("text_projection", "attn_mask") and not k.startswith(unused_block)}
    ours.load_state_dict(state, strict=True)
    tokens = open_clip.tokenize([""])
    assert torch.equal(tokens, ours.empty_prompt_tokens())
    expected = _reference_context(tower, tokens)
    torch.testing.assert_close(ours.empty_context(), expected, rtol=0, atol=1e-5)
    context, source = empty_prompt_context(ours, None, 0, CFG.width)
    assert source == "text encoder, empty prompt" and context.shape == (1, 77, CFG.width)
