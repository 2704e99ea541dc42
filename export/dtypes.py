"""Precision helpers shared by the model modules."""

from __future__ import annotations

import torch


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, but a no-op (and no Cast node in a traced graph) when the dtype already matches.

    The reference forces float32 for GroupNorm, attention logits and softmax; in an fp32 export these
    casts would otherwise become float→float Cast nodes that confuse the fp16 converter.
    """
    return x if x.dtype == dtype else x.to(dtype)
