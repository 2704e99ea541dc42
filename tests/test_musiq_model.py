"""MUSIQ behind the patch-tensor interface reproduces the golden scores (reduced width and full size)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyiqa.data.multiscale_trans_util import get_multiscale_patches
from safetensors.torch import load_file

from adaptbir.export.config import MusiqConfig, load_config
from adaptbir.export.musiq import MusiqScorer

torch.set_grad_enabled(False)
SCORE_TOL = 1e-5  # reference README §5: MUSIQ scores of an independent float32 implementation


def _patches(scorer: MusiqScorer, u8: np.ndarray):
    """pyiqa's own multi-scale patch tensor for a uint8 NCHW image, split into the graph's inputs."""
    x = torch.from_numpy(u8).float() / 255
    p = get_multiscale_patches((x - 0.5) * 2, **scorer.net.data_preprocess_opts)
    return p[..., :-3], p[..., -3].long(), p[..., -2].long(), p[..., -1]


def _scorer(cfg: MusiqConfig, state: dict[str, torch.Tensor]) -> MusiqScorer:
    scorer = MusiqScorer(cfg).eval()
    scorer.net.load_state_dict(state, strict=True)
    return scorer


@pytest.fixture(scope="module")
def reduced(reference):
    return load_config("tiny").musiq, load_file(reference / "musiq_random.safetensors")


@pytest.mark.parametrize("image", ["a", "b"])
@pytest.mark.parametrize("folded", [False, True], ids=["stdconv", "folded"])
def test_reduced_musiq_scores(reduced, golden, parity, image, folded):
    scorer = _scorer(*reduced)
    g = golden("musiq")
    inputs = _patches(scorer, g[f"x_u8_{image}"])
    assert tuple(inputs[0].shape[:2]) == tuple(g[f"patches_shape_{image}"][:2])
    if folded:
        scorer.fold_weight_standardisation()
    parity(f"musiq {image} score ({'folded' if folded else 'stdconv'})", scorer(*inputs),
           g[f"score_{image}"], SCORE_TOL)


def test_scorer_equals_pyiqa_forward(reduced, golden):
    """Our patch interface is pyiqa's forward minus its preprocessing, bit for bit."""
    scorer = _scorer(*reduced)
    u8 = golden("musiq")["x_u8_a"]
    expected = scorer.net(torch.from_numpy(u8).float() / 255).flatten()
    assert torch.equal(scorer(*_patches(scorer, u8)), expected)


def test_masked_padding_tokens_do_not_change_the_score(reduced, golden):
    scorer = _scorer(*reduced)
    patches, spatial, scale, mask = _patches(scorer, golden("musiq")["x_u8_a"])
    pad = 40
    padded = (
        torch.cat([patches, torch.randn(1, pad, patches.shape[-1])], 1),
        torch.cat([spatial, torch.zeros(1, pad, dtype=torch.long)], 1),
        torch.cat([scale, torch.zeros(1, pad, dtype=torch.long)], 1),
        torch.cat([mask, torch.zeros(1, pad)], 1),
    )
    assert abs(scorer(*padded).item() - scorer(patches, spatial, scale, mask).item()) < 1e-6


def recipe_state(tsv_lines: list[str], seed_base: int) -> dict[str, torch.Tensor]:
    """The full-size weights of reference README §3.9, regenerated from the recipe."""
    state = {}
    for i, line in enumerate(tsv_lines):
        key, shape_text, _ = line.split("\t")
        shape = [int(s) for s in shape_text.strip("[]").split(",") if s]
        numel = math.prod(shape)
        r = 2 * np.random.RandomState(seed_base + i).random_sample(numel) - 1
        layer, leaf = (key.split(".")[-2], key.split(".")[-1]) if "." in key else ("", key)
        if leaf in ("position_emb", "scale_emb") or key == "transformer_encoder.cls":
            values = 0.5 * r
        elif layer.startswith(("gn", "norm")) or layer == "encoder_norm":
            values = 1 + 0.3 * r if leaf == "weight" else 0.1 * r
        elif leaf == "bias":
            values = 0.1 * r
        else:
            values = r * math.sqrt(3 / math.prod(shape[1:]))
        state[key] = torch.from_numpy(values.astype(np.float32).reshape(shape))
    return state


def test_full_size_musiq_from_recipe(reference, golden, parity):
    recipe = golden("musiq_full_recipe")
    lines = (reference / "keys_musiq.tsv").read_text().splitlines()
    state = recipe_state(lines, int(recipe["seed_base"]))
    sums = np.array([v.double().sum().item() for v in state.values()])
    np.testing.assert_allclose(sums, recipe["checksum_sum"], rtol=1e-6, atol=1e-6)
    first4 = np.stack([np.pad(v.flatten()[:4].numpy(), (0, max(0, 4 - v.numel()))) for v in state.values()])
    np.testing.assert_array_equal(first4, recipe["checksum_first4"])
    scorer = _scorer(load_config("sd21").musiq, state)
    for image in "ab":
        inputs = _patches(scorer, golden("musiq")[f"x_u8_{image}"])
        parity(f"musiq full-size recipe {image} score", scorer(*inputs), recipe[f"score_{image}"], SCORE_TOL)
