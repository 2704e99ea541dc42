"""The torch model reproduces every single-pass golden output of the reference (section 8 tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptbir.export.checkpoint import gather, load_model
from adaptbir.export.config import load_config
from adaptbir.export.model import DecoderGraph, DualEncoderGraph, UNetGraph

torch.set_grad_enabled(False)

SINGLE_PASS = 1e-4
UNET_TOL = {"unet_control": 1e-4, "unet_control_8x16": 1e-3}  # 8x16 is ill-conditioned (README §8)
# The bottleneck's control and feature (index 12) are ill-conditioned at these tiny sizes (one or two elements
# per GroupNorm group): the golden float32 values themselves are 2.2e-3 (8x8) from the same model computed in
# float64, and another CPU's kernels (e.g. an AVX-512/AMX Xeon against the reference's machine) land up to
# 7.5e-3 away while eps stays within 5e-5. A wrong block, scale or norm moves them by orders of magnitude more.
BOTTLENECK_TOL = 1e-2


@pytest.fixture(scope="module")
def tiny(reference):
    model, _ = load_model(
        load_config("tiny"),
        gather(reference / "tiny_stage3.safetensors", musiq=reference / "musiq_random.safetensors"),
    )
    return model


def _t(data, key):
    return torch.from_numpy(np.ascontiguousarray(data[key]))


@pytest.mark.parametrize("case", sorted(UNET_TOL))
def test_unet_with_controls(tiny, golden, parity, case):
    g, tol = golden(case), UNET_TOL[case]
    x, t, ctx, w = _t(g, "x_t"), _t(g, "t"), _t(g, "context"), _t(g, "csft_w")
    controls, features = tiny.controlnet(x, _t(g, "c_latent"), t, ctx)
    for i in range(13):
        tolerance = BOTTLENECK_TOL if i == 12 else tol
        parity(f"{case} control_{i:02d}", controls[i], g[f"control_{i:02d}"], tolerance)
        parity(f"{case} feature_{i:02d}", features[i], g[f"feature_{i:02d}"], tolerance)
    parity(f"{case} t_emb", tiny.unet.t_embedding(t), g["t_emb"], SINGLE_PASS)
    parity(f"{case} eps (hint = c_latent)", tiny.eps(x, t, ctx, _t(g, "c_latent"), w), g["eps"], tol)
    parity(f"{case} eps_from_cond (UNet graph)", UNetGraph(tiny)(x, t, ctx, _t(g, "cond"), w),
           g["eps_from_cond"], tol)


@pytest.mark.parametrize("case", sorted(UNET_TOL))
def test_w_zero_is_the_plain_controlnet_path(reference, tiny, golden, parity, case):
    """w = 0 gives bitwise the network without CSFT blocks; that network reproduces `eps_plain`."""
    ckpts = gather(reference / "tiny_stage3.safetensors")
    ckpts.drop_prefix("model.diffusion_model.cft_blocks.", "test: CSFT removed")
    ckpts.drop_prefix("model.diffusion_model.upsample_layers.", "test: CSFT removed")
    plain, report = load_model(load_config("tiny"), ckpts)
    assert not report.capabilities.has_csft and any("w is fixed to 0" in n for n in report.notes)
    g = golden(case)
    args = (_t(g, "x_t"), _t(g, "t"), _t(g, "context"), _t(g, "c_latent"))
    zero = torch.zeros(2)
    assert torch.equal(tiny.eps(*args, zero), plain.eps(*args, zero))
    parity(f"{case} eps_plain (no CSFT)", plain.eps(*args, _t(g, "csft_w")), g["eps_plain"], UNET_TOL[case])
    w = g["csft_w"]
    eps = tiny.eps(*args, _t(g, "csft_w"))
    for j in np.flatnonzero(w == 0):  # bitwise the plain network (the reference's own property), and the golden
        assert torch.equal(eps[j], plain.eps(*args, _t(g, "csft_w"))[j])
        parity(f"{case} eps[w=0] (no CSFT)", eps[j], g["eps"][j], UNET_TOL[case])


@pytest.mark.parametrize("case", ["dual_encoder", "dual_encoder_64x128"])
def test_dual_encoder(tiny, golden, parity, case):
    g = golden(case)
    x, k = _t(g, "x"), float(g["k"])
    moments_r, moments_i = tiny.restoration_moments(x), tiny.identity_moments(x)
    parity(f"{case} moments_r", moments_r, g["moments_r"], SINGLE_PASS)
    parity(f"{case} moments_i", moments_i, g["moments_i"], SINGLE_PASS)
    z_r, z_i = tiny.vae.post_quant_conv(moments_r[:, :4]), tiny.vae.post_quant_conv(moments_i[:, :4])
    parity(f"{case} z_r", z_r, g["z_r"], SINGLE_PASS)
    parity(f"{case} z_i", z_i, g["z_i"], SINGLE_PASS)
    c_latent = z_r * (1 - k) + z_i * k  # reference form: hint mixed in post_quant_conv space
    parity(f"{case} c_latent", c_latent, g["c_latent"], SINGLE_PASS)
    parity(f"{case} control_output", tiny.vae.decoder(c_latent), g["control_output"], SINGLE_PASS)
    z_restore, z_identity = DualEncoderGraph(tiny)(x)
    parity(f"{case} z_restore (graph)", z_restore, g["z_restore"], SINGLE_PASS)
    parity(f"{case} z_identity (graph)", z_identity, g["z_identity"], SINGLE_PASS)
    parity(f"{case} cond = mix", (1 - k) * z_restore + k * z_identity, g["cond"], SINGLE_PASS)
    parity(f"{case} hint_from_cond", tiny.hint_from_cond(_t(g, "cond")), g["c_latent"], SINGLE_PASS)


@pytest.mark.parametrize("case", ["vae_decoder", "vae_decoder_8x16"])
def test_decoder(tiny, golden, parity, case):
    g = golden(case)
    parity(f"{case} z_scaled", _t(g, "z") * tiny.latent_scale_inv, g["z_scaled"], 0.0)
    parity(f"{case} post_quant", tiny.vae.post_quant_conv(_t(g, "z_scaled")), g["post_quant"], SINGLE_PASS)
    parity(f"{case} image (decoder graph)", DecoderGraph(tiny)(_t(g, "z")), g["image"], SINGLE_PASS)
