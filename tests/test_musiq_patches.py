"""The numpy MUSIQ patch extraction (adaptbir.runtime.musiq_patches) reproduces pyiqa 0.1.16's patch tensor.

Checked against the golden file (`musiq.npz`, README §3.9) and live against pyiqa / torch. On x86-64 the
numpy code is bit-exact to torch's CPU kernel (it emulates the FMAs torch is compiled with); the tolerances
below are the contract, the measured errors are printed in the parity table.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from adaptbir.runtime.errors import InputError
from adaptbir.runtime.musiq_patches import (
    FIXED_TOKENS,
    MusiqTokens,
    batch_feeds,
    bicubic_resize,
    extract_tokens,
    pad_tokens,
    token_count,
)

PIXEL_TOL = 2e-4  # per pixel value (values in [-1, 1] plus bicubic overshoot)
ROWSUM_TOL = 2e-3  # float64 sum (or abs-sum) over the 3072 pixels of a row: 3072 values of PIXEL_TOL-level error
RESIZE_TOL = 1e-5


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_grad_enabled(False)
    return torch


@pytest.fixture(scope="module")
def pyiqa_patches(torch):
    """pyiqa's own patch tensor [N, 3075] of a uint8 HWC image, as MUSIQ's forward builds it."""
    util = pytest.importorskip("pyiqa.data.multiscale_trans_util")

    def run(u8: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255 - 0.5) * 2
        out = util.get_multiscale_patches(x, patch_size=32, patch_stride=32, hse_grid_size=10,
                                          longer_side_lengths=[224, 384], max_seq_len_from_original_res=-1)
        assert out.shape[0] == 1
        return out[0].numpy()

    return run


def _meta(tokens: MusiqTokens) -> np.ndarray:
    """The last 3 columns of pyiqa's tensor: spatial index, scale index, mask (float32, as pyiqa stores them)."""
    return np.stack([tokens.spatial_idx, tokens.scale_idx, tokens.mask], axis=1).astype(np.float32)


def _random_u8(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1000 * h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("image", ["a", "b"])
def test_golden_patches(golden, parity, image):
    g = golden("musiq")
    u8 = g[f"x_u8_{image}"][0].transpose(1, 2, 0)  # NCHW -> HWC
    tokens = extract_tokens(u8)

    assert (1, *tokens.patches.shape[:1], tokens.patches.shape[1] + 3) == tuple(g[f"patches_shape_{image}"])
    assert tokens.patches.dtype == np.float32
    assert tokens.spatial_idx.dtype == np.int64 and tokens.scale_idx.dtype == np.int64
    assert tokens.mask.dtype == np.float32
    assert np.array_equal(_meta(tokens), g[f"patches_meta_{image}"])

    pixels = tokens.patches.astype(np.float64)
    parity(f"musiq patches {image}: row sums", pixels.sum(1), g[f"patches_pixel_rowsum_{image}"], ROWSUM_TOL)
    parity(f"musiq patches {image}: row abs-sums", np.abs(pixels).sum(1), g[f"patches_pixel_rowabssum_{image}"],
           ROWSUM_TOL)

    rows = g[f"patches_sample_rows_{image}"]
    sample = g[f"patches_sample_{image}"]
    parity(f"musiq patches {image}: sample rows", tokens.patches[rows], sample[:, :3072], PIXEL_TOL)
    assert np.array_equal(_meta(tokens)[rows], sample[:, 3072:])


# ------------------------------------------------------------------------------------------------ live pyiqa

SIZES = [(200, 300), (512, 384), (33, 700), (1000, 999), (64, 64), (17, 5), (512, 512), (384, 224),
         (224, 384), (32, 32), (1, 300), (95, 1), (640, 320)]


@pytest.mark.parametrize(("h", "w"), SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_pyiqa(pyiqa_patches, parity, h, w):
    u8 = _random_u8(h, w)
    expected = pyiqa_patches(u8)
    tokens = extract_tokens(u8)
    assert tokens.patches.shape == (expected.shape[0], 3072)
    assert len(tokens) == token_count(h, w)
    assert np.array_equal(_meta(tokens), expected[:, 3072:])
    parity(f"musiq patches vs pyiqa {h}x{w}", tokens.patches, expected[:, :3072], PIXEL_TOL)


def test_hashed_spatial_index_matches_pyiqa(torch):
    """The hash grid (`F.interpolate(arange(10), count, 'nearest')` in float32) for every patch count."""
    util = pytest.importorskip("pyiqa.data.multiscale_trans_util")
    for ch, cw in [(c, c) for c in range(1, 130)] + [(3, 41), (41, 3), (20, 7), (64, 48)]:
        expected = util.get_hashed_spatial_pos_emb_index(10, ch, cw)[0].numpy()
        tokens = extract_tokens(np.zeros((32 * ch, 32 * cw, 3), np.uint8), longer_side_lengths=())
        assert np.array_equal(tokens.spatial_idx, expected.astype(np.int64)), (ch, cw)


# ------------------------------------------------------------------------------------------------ resize

RESIZES = [((200, 300), (149, 224)), ((200, 300), (256, 384)), ((512, 384), (224, 168)), ((33, 700), (11, 224)),
           ((17, 5), (224, 66)), ((1000, 999), (384, 384)), ((8, 8), (13, 29)), ((1, 10), (1, 17)),
           ((10, 1), (3, 1)), ((64, 64), (64, 64)), ((5, 7), (384, 384))]


@pytest.mark.parametrize(("src", "dst"), RESIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in RESIZES])
def test_bicubic_resize_matches_torch(torch, parity, src, dst):
    x = (np.random.default_rng(src[0] * 7 + dst[1]).random((3, *src), dtype=np.float32) - 0.5) * 2.2
    expected = torch.nn.functional.interpolate(torch.from_numpy(x)[None], dst, mode="bicubic", align_corners=False)
    out = bicubic_resize(x, *dst)
    assert out.dtype == np.float32 and out.shape == (3, *dst)
    parity(f"bicubic {src[0]}x{src[1]} -> {dst[0]}x{dst[1]}", out, expected[0].numpy(), RESIZE_TOL)


def test_bicubic_resize_same_size_is_identity():
    x = np.random.default_rng(3).random((3, 40, 50), dtype=np.float32)
    assert np.array_equal(bicubic_resize(x, 40, 50), x)


# ------------------------------------------------------------------------------------------------ API


@pytest.mark.parametrize(("h", "w"), [(200, 300), (17, 5), (32, 64), (1000, 999)])
def test_token_layout(h, w):
    tokens = extract_tokens(_random_u8(h, w))
    n_orig = -(-h // 32) * -(-w // 32)
    assert len(tokens) == token_count(h, w) == FIXED_TOKENS + n_orig
    assert np.array_equal(tokens.scale_idx[FIXED_TOKENS:], np.full(n_orig, 2))
    assert np.all(tokens.mask[FIXED_TOKENS:] == 1)
    # padding rows of the resized scales are all zero (scale index too), real rows have mask 1
    pad = tokens.mask == 0
    assert np.all(tokens.patches[pad] == 0) and np.all(tokens.spatial_idx[pad] == 0)
    assert np.all(tokens.scale_idx[pad] == 0)
    assert np.all((tokens.spatial_idx >= 0) & (tokens.spatial_idx < 100))


def test_pad_tokens_and_batch_feeds():
    a, b = extract_tokens(_random_u8(200, 300)), extract_tokens(_random_u8(64, 64))
    padded = pad_tokens(b, len(a))
    assert len(padded) == len(a)
    assert np.array_equal(padded.patches[: len(b)], b.patches) and np.all(padded.patches[len(b):] == 0)
    assert np.all(padded.mask[len(b):] == 0) and np.all(padded.spatial_idx[len(b):] == 0)
    assert pad_tokens(a, len(a)) is a

    feeds = batch_feeds([a, b])
    n = len(a)
    assert set(feeds) == {"patches", "spatial_idx", "scale_idx", "mask"}
    assert feeds["patches"].shape == (2, n, 3072) and feeds["patches"].dtype == np.float32
    assert feeds["spatial_idx"].shape == (2, n) and feeds["spatial_idx"].dtype == np.int64
    assert feeds["scale_idx"].shape == (2, n) and feeds["scale_idx"].dtype == np.int64
    assert feeds["mask"].shape == (2, n) and feeds["mask"].dtype == np.float32
    assert feeds["mask"][1].sum() == b.mask.sum()

    fixed = batch_feeds([b], n=500)
    assert fixed["patches"].shape == (1, 500, 3072) and fixed["mask"].shape == (1, 500)


def test_too_many_tokens_raise_input_error():
    tokens = extract_tokens(_random_u8(200, 300))  # 263 tokens
    with pytest.raises(InputError, match=r"too large.*needs N = 263.*N_max is 250"):
        pad_tokens(tokens, 250)
    with pytest.raises(InputError, match="N_max is 200"):
        batch_feeds([tokens], n=200)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                 np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8, 3), np.uint8),
                                 np.zeros((1, 2000, 3), np.uint8)],
                         ids=["float", "gray", "rgba", "empty", "1x2000"])
def test_unusable_images_raise_input_error(bad):
    with pytest.raises(InputError):
        extract_tokens(bad)


def test_extraction_is_fast():
    u8 = _random_u8(2048, 1536)
    extract_tokens(u8)
    start = time.perf_counter()
    tokens = extract_tokens(u8)
    elapsed = time.perf_counter() - start
    assert len(tokens) == FIXED_TOKENS + 64 * 48
    assert elapsed < 2.0, f"2048x1536 extraction took {elapsed:.2f} s (vectorised code takes ~0.1 s)"


def test_import_does_not_load_torch():
    code = "import sys, adaptbir.runtime.musiq_patches; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
