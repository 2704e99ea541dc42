"""`make demo`: the main job on the embedded default — the tiny preset with seeded random weights.

What exists today: the torch model. It is timed stage by stage on a real photo (matplotlib's bundled
sample). ONNX engines, the numpy runtime and the full restore loop come with the next issues; the demo
says so instead of pretending.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from matplotlib import cbook
from PIL import Image

from .config import load_config
from .model import AdaptBIR, DecoderGraph, DualEncoderGraph, UNetGraph


def sample_photo() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def main(seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = load_config("tiny")
    model = AdaptBIR(config).eval()
    photo = sample_photo()
    h, w = (s // 64 * 64 for s in photo.shape[:2])
    image = torch.from_numpy(photo[:h, :w].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    context = torch.randn(1, 77, config.context_dim, generator=torch.Generator().manual_seed(seed))
    rows = []
    (z_restore, z_identity), dt = _timed(lambda: DualEncoderGraph(model)(image))
    rows.append(("dual encoder", dt))
    k = 0.55
    cond = (1 - k) * z_restore + k * z_identity
    x = torch.randn_like(cond)
    t = torch.tensor([999])
    eps, dt = _timed(lambda: UNetGraph(model)(x, t, context, cond, torch.tensor([0.8])))
    rows.append(("UNet + ControlNet + CSFT, one step", dt))
    decoded, dt = _timed(lambda: DecoderGraph(model)(cond))
    rows.append(("decoder", dt))
    print(f"AdaptBIR demo: tiny preset, random weights (seed {seed}), photo {h}x{w} (grace_hopper.jpg)")
    print(f"{'stage':<40} {'ms':>10}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds * 1e3:>10.1f}")
    print(f"latent {tuple(cond.shape)}, eps {tuple(eps.shape)}, decoded {tuple(decoded.shape)}")
    print("Not built yet (open issues): ONNX export and engine directories, the numpy runtime with MUSIQ "
          "gating and the 50-step sampler, adaptbir-bench. Random weights give a noise-like picture.")


if __name__ == "__main__":
    main()
