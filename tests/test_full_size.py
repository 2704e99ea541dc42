"""Full-size (`sd21`) export with random weights: slow, not in the default run (`make test-slow`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptbir.export.build import build_engine_directory, empty_prompt_context
from adaptbir.export.checkpoint import load_random
from adaptbir.export.config import load_config
from adaptbir.export.model import UNetGraph
from adaptbir.export.onnx_export import run_onnx
from adaptbir.runtime.manifest import load_manifest

pytestmark = pytest.mark.slow


def test_sd21_random_export_one_unet_step_at_64x64(tmp_path):
    config = load_config("sd21")
    model, report = load_random(config, seed=0)
    context, source = empty_prompt_context(None, None, 0, config.context_dim)
    out = tmp_path / "sd21"
    build_engine_directory(model, report, config, out, context=context, context_source=source)
    manifest = load_manifest(out)
    assert manifest.data["graphs"]["unet"]["external_data"] == "unet.onnx.data"  # > 2 GB of weights
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 4, 64, 64), dtype=np.float32), "t": np.array([500]),
             "context": context, "cond": rng.standard_normal((1, 4, 64, 64), dtype=np.float32),
             "w": np.array([0.8], np.float32)}
    (eps,) = run_onnx(out / "unet.onnx", feeds)
    with torch.no_grad():
        expected = UNetGraph(model)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    err = float(np.abs(eps - expected).max())
    print(f"sd21 UNet step at 64x64 latent, ONNX Runtime vs torch: max abs error {err:.3g}")
    assert err <= 1e-3
