"""Full-size (`sd21`) builds with random weights, fp32 and fp16: slow, not in the default run (`make test-slow`).

Each build frees the torch weights as it goes (as the CLI does), so torch's expected step is computed
before the fp32 build; the fp16 directory is judged against the fp32 one by PSNR, as everywhere else.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptbir.export.build import build_engine_directory, empty_prompt_context
from adaptbir.export.checkpoint import load_random
from adaptbir.export.config import load_config
from adaptbir.export.model import UNetGraph
from adaptbir.export.onnx_export import run_onnx
from adaptbir.runtime.graphs import GRAPHS
from adaptbir.runtime.manifest import load_manifest
from adaptbir.runtime.metrics import psnr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    """Both directories and torch's eps for one UNet step at a 64x64 latent (512x512 image)."""
    config = load_config("sd21")
    context, source = empty_prompt_context(None, None, 0, config.context_dim)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 4, 64, 64), dtype=np.float32), "t": np.array([500]),
             "context": context, "cond": rng.standard_normal((1, 4, 64, 64), dtype=np.float32),
             "w": np.array([0.8], np.float32)}
    root = tmp_path_factory.mktemp("sd21")
    dirs = {}
    for precision in ("fp32", "fp16"):
        model, report = load_random(config, seed=0)
        if precision == "fp32":
            with torch.no_grad():
                expected = UNetGraph(model)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        dirs[precision] = root / precision
        build_engine_directory(model, report, config, dirs[precision], precision=precision, context=context,
                               context_source=source, free=True)
        del model
    return dirs, feeds, expected


def test_sd21_fp32_unet_step_matches_torch(sd21):
    dirs, feeds, expected = sd21
    manifest = load_manifest(dirs["fp32"])
    assert manifest.graphs["unet"].external_data == "unet.onnx.data"  # > 2 GB of weights
    (eps,) = run_onnx(dirs["fp32"] / "unet.onnx", feeds)
    err = float(np.abs(eps - expected).max())
    print(f"sd21 UNet step at 64x64 latent, ONNX Runtime fp32 vs torch: max abs error {err:.3g}")
    assert err <= 1e-3


def test_sd21_fp16_graphs_pass_their_checks_at_full_size(sd21):
    dirs, _, _ = sd21
    manifest = load_manifest(dirs["fp16"])
    assert manifest.precision == "fp16" and manifest.graphs["musiq"].precision == "fp32"
    assert manifest.graphs["unet"].external_data == "unet.onnx.data"  # 2.4 GB of fp16 weights
    for name in ("dual_encoder", "unet", "decoder"):
        graph = manifest.graphs[name]
        floor = GRAPHS[name].spec.tolerance.fp16_min_psnr_db
        for parity in (graph.parity, graph.parity_full_size):
            assert math.isfinite(parity["max_abs"]) and parity["psnr_db"] >= floor, (name, parity)
        assert graph.parity_full_size["image"] == [512, 512]
    fp32_bytes = sum(e.bytes for e in load_manifest(dirs["fp32"]).files.values())
    fp16_bytes = sum(e.bytes for e in manifest.files.values())
    assert fp16_bytes < 0.55 * fp32_bytes  # everything but MUSIQ halved


def test_sd21_fp16_unet_step_against_fp32(sd21):
    dirs, feeds, _ = sd21
    (eps32,) = run_onnx(dirs["fp32"] / "unet.onnx", feeds)
    (eps16,) = run_onnx(dirs["fp16"] / "unet.onnx", feeds)
    db = psnr(eps16, eps32, float(np.ptp(eps32)))
    print(f"sd21 UNet step at 64x64 latent, ONNX Runtime fp16 vs fp32: PSNR {db:.1f} dB")
    assert np.all(np.isfinite(eps16)) and db >= GRAPHS["unet"].spec.tolerance.fp16_min_psnr_db
