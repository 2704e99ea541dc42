"""Runtime stages on their own: gating, pre/post-processing, colour fix, tiling helpers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptbir.runtime.colorfix import adain, color_fix, wavelet
from adaptbir.runtime.errors import InputError
from adaptbir.runtime.gating import classify, gate
from adaptbir.runtime.preprocess import finish, plan_geometry, prepare, to_model_range, to_uint8
from adaptbir.runtime.tiling import Tile, blend, gaussian_weights, tile_starts, tiles


def test_gating_reproduces_the_reference_table(reference):
    table = json.loads((reference / "gating.json").read_text())["table"]
    for row in table:
        g = gate(row["musiq"])
        assert (g.k, g.w) == (row["k"], row["csft_w"]), row
        assert np.float32(g.k) == np.float32(row["k_float32"]) and np.float32(1 - g.k) == row["one_minus_k_float32"]


@pytest.mark.parametrize("score,label", [(-3.0, "severe"), (40.0, "severe"), (40.01, "medium"), (69.99, "medium"),
                                         (70.0, "mild"), (95.0, "mild")])
def test_classes(score, label):
    assert classify(score) == label and gate(score).label == label


def test_negative_score_is_severe_with_nothing_applied():
    g = gate(-1.2)
    assert (g.k, g.w, g.label) == (0.0, 0.0, "severe")


@pytest.mark.parametrize("size,sr,processing,padded", [
    ((600, 512), 1.0, (600, 512), (640, 512)),
    ((100, 300), 1.0, (512, 1536), (512, 1536)),
    ((101, 300), 1.0, (512, 1521), (512, 1536)),
    ((300, 200), 2.0, (768, 512), (768, 512)),
    ((1, 1), 1.0, (512, 512), (512, 512)),
])
def test_geometry_follows_scale_auto(size, sr, processing, padded):
    g = plan_geometry(*size, sr_scale=sr)
    assert (g.processing, g.padded) == (processing, padded)
    assert g.output == (int(np.ceil(size[0] * sr)), int(np.ceil(size[1] * sr)))
    assert plan_geometry(*size, sr_scale=sr, resize_back=False).output == processing


def test_prepare_pads_by_edge_replication_and_finish_crops():
    rgb = (np.arange(600 * 512 * 3) % 251).astype(np.uint8).reshape(600, 512, 3)
    g = plan_geometry(600, 512)
    padded = prepare(rgb, g)
    assert padded.shape == (640, 512, 3)
    np.testing.assert_array_equal(padded[:600], rgb)
    np.testing.assert_array_equal(padded[639], rgb[599])
    np.testing.assert_array_equal(finish(padded, g), rgb)


def test_model_range_and_uint8_truncation():
    u8 = np.array([[[0, 128, 255]]], np.uint8)
    x = to_model_range(u8)
    assert x.dtype == np.float32 and x.shape == (1, 3, 1, 1)
    np.testing.assert_array_equal(x.ravel(), (np.array([0, 128, 255]) / 255 * 2 - 1).astype(np.float32))
    decoded = np.array([-1.5, -1.0, 0.0, 0.00392, 0.999, 1.2], np.float32).reshape(1, 1, 1, 6).repeat(3, 1)
    # 0.00392·127.5 + 127.5 = 127.9998 → 127 (truncated, not rounded); values clip to [0, 255]
    assert to_uint8(decoded)[0, :, 0].tolist() == [0, 0, 127, 127, 254, 255]


def test_sizes_beyond_the_limit_and_bad_scale_are_refused():
    with pytest.raises(InputError, match="Mpx limit"):
        plan_geometry(2, 4096)
    with pytest.raises(InputError, match="sr_scale must be positive"):
        plan_geometry(64, 64, sr_scale=0)


# --- colour fix against a torch transcription of the reference formulas


def _torch_adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    def stats(feat):
        b, c = feat.shape[:2]
        var = feat.reshape(b, c, -1).var(dim=2) + eps
        return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)

    (sm, ss), (cm, cs) = stats(style), stats(content)
    return (content - cm) / cs * ss + sm


def _torch_wavelet(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32)[None, None].repeat(3, 1, 1, 1) / 16

    def decompose(image):
        high = torch.zeros_like(image)
        for i in range(5):
            r = 2**i
            low = F.conv2d(F.pad(image, (r, r, r, r), mode="replicate"), kernel, groups=3, dilation=r)
            high += image - low
            image = low
        return high, image

    return decompose(content)[0] + decompose(style)[1]


def test_colour_fix_matches_the_reference_formulas():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, 64, 96), dtype=np.float32) * 0.7 + 0.1
    ref = rng.standard_normal((1, 3, 64, 96), dtype=np.float32) * 0.4 - 0.2
    expected = _torch_adain(torch.from_numpy(image), torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(adain(image, ref), expected, rtol=0, atol=1e-5)
    expected = _torch_wavelet(torch.from_numpy(image), torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(wavelet(image, ref), expected, rtol=0, atol=1e-5)
    assert color_fix(image, ref, "none") is image
    with pytest.raises(ValueError, match="colour fix must be one of"):
        color_fix(image, ref, "histogram")


# --- tiling


@pytest.mark.parametrize("length", [64, 65, 96, 100, 192, 257])
def test_tiles_cover_with_the_overlap(length):
    starts = tile_starts(length, 64, 32)
    assert starts[0] == 0 and starts[-1] + 64 == max(length, 64)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + 64] = True
    assert covered.all()
    assert all(b - a <= 32 for a, b in itertools.pairwise(starts))


def test_blend_of_a_constant_is_the_constant_and_weights_are_positive():
    assert gaussian_weights(64, 64).min() > 0
    grid = tiles(100, 150, 64, 32)
    out = blend(lambda t: np.full((1, 2, t.h * 8, t.w * 8), 3.5, np.float32), grid, (1, 2, 800, 1200), scale=8)
    np.testing.assert_allclose(out, 3.5, rtol=1e-6)
    single = blend(lambda t: np.ones((1, 1, t.h, t.w), np.float32), [Tile(0, 0, 8, 8)], (1, 1, 8, 8))
    assert single.shape == (1, 1, 8, 8)
