"""The graph descriptions (runtime/graphs.py): each one's sample inputs, flags, memory term and TensorRT sizes
agree with its contract and with the formulas and literals they replaced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaptbir.runtime import memory
from adaptbir.runtime.graphs import GRAPHS, LATENT_FACTOR
from adaptbir.runtime.musiq_patches import FIXED_TOKENS, token_count
from adaptbir.runtime.plan import STAGES

SIZES = [(256, 256), (192, 320)]
CONTEXT = np.random.default_rng(9).standard_normal((1, 77, 32), dtype=np.float32)


def _hyperparameters(name: str) -> dict:
    if name == "micro":
        return json.loads(Path(__file__).with_name("micro_config.json").read_text())
    from adaptbir.export.config import load_config

    return load_config(name).to_dict()


def _literal_sizes(size: tuple[int, int], batch: int, tokens: int) -> dict[str, int]:
    """The symbol sizes export/tensorrt.py computed itself before the descriptions did."""
    return {"B": batch, "H": size[0], "W": size[1], "h": size[0] // 8, "w": size[1] // 8, "N": tokens}


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_sample_feeds_match_the_spec(name, size, batch):
    graph = GRAPHS[name]
    feeds = graph.sample_feeds(np.random.default_rng(0), size, batch, CONTEXT)
    expected = graph.spec.input_shapes(**_literal_sizes(size, batch, token_count(*size)), C=CONTEXT.shape[-1])
    assert list(feeds) == [t.name for t in graph.spec.inputs] == list(expected)
    for t in graph.spec.inputs:
        assert feeds[t.name].dtype == np.dtype(t.dtype) and feeds[t.name].shape == expected[t.name], t.name


def test_sample_feeds_follow_the_latent_factor():
    feeds = GRAPHS["decoder"].sample_feeds(np.random.default_rng(0), (256, 256), 1, factor=4)
    assert feeds["latent"].shape == (1, 4, 64, 64)


def test_sample_feeds_draw_as_before():
    """The same draws in the same order as the former `sample_feeds`, so exports keep their samples."""
    size, rng = (256, 320), np.random.default_rng(5)
    lat = (2, 4, 32, 40)
    image, x, cond, latent = (rng.random((1, 3, *size), dtype=np.float32) * 2 - 1,
                              rng.standard_normal(lat, dtype=np.float32), rng.standard_normal(lat, dtype=np.float32),
                              rng.standard_normal((1, 4, 32, 40), dtype=np.float32))
    ours = np.random.default_rng(5)
    assert np.array_equal(GRAPHS["dual_encoder"].sample_feeds(ours, size, 1)["image"], image)
    unet = GRAPHS["unet"].sample_feeds(ours, size, 2, CONTEXT)
    assert np.array_equal(unet["x"], x) and np.array_equal(unet["cond"], cond)
    assert unet["t"].tolist() == [999, 500] and unet["w"].tolist() == [0.0, np.float32(0.8)]
    assert np.array_equal(unet["context"], np.concatenate([CONTEXT, CONTEXT]))
    assert np.array_equal(GRAPHS["decoder"].sample_feeds(ours, size, 1)["latent"], latent)


def test_musiq_sample_is_a_token_set_of_the_image():
    feeds = GRAPHS["musiq"].sample_feeds(np.random.default_rng(0), (256, 256), 1)
    assert feeds["patches"].shape == (1, FIXED_TOKENS + 64, 3072)  # 64 native patches, as exports had
    assert feeds["scale_idx"][0].tolist() == [0] * 49 + [1] * 144 + [2] * 64
    masked = feeds["mask"][0] == 0
    assert masked.sum() == 19 + 24 and not masked[FIXED_TOKENS:].any()
    assert not feeds["patches"][0][masked].any()


def test_flags():
    assert {name: g.check_batch for name, g in GRAPHS.items()} == {
        "dual_encoder": 1, "unet": 2, "decoder": 1, "musiq": 1}
    assert [name for name, g in GRAPHS.items() if g.fp32_only] == ["musiq"]  # gates never flip on precision
    assert [name for name, g in GRAPHS.items() if not g.tiled] == ["musiq"]
    assert {g.stage for g in GRAPHS.values()} == set(STAGES)
    assert list(GRAPHS) == ["dual_encoder", "unet", "decoder", "musiq"]
    assert all(name == g.name == g.spec.name for name, g in GRAPHS.items())


@pytest.mark.parametrize("config", ["tiny", "micro"])
@pytest.mark.parametrize("latent", [(32, 32), (96, 128), (64, 40)])
def test_memory_terms_are_the_formulas(config, latent):
    hp = _hyperparameters(config)
    lat_h, lat_w = latent
    vae = memory.vae_call_bytes(hp["vae"], lat_h, lat_w)
    assert GRAPHS["dual_encoder"].call_bytes(hp, lat_h, lat_w) == vae
    assert GRAPHS["decoder"].call_bytes(hp, lat_h, lat_w, tokens=500, heads_at_once=1) == vae
    for heads in (None, 1):
        assert (GRAPHS["unet"].call_bytes(hp, lat_h, lat_w, heads_at_once=heads)
                == memory.unet_call_bytes(hp["unet"], lat_h, lat_w, heads))
    tokens = token_count(lat_h * LATENT_FACTOR, lat_w * LATENT_FACTOR)
    assert (GRAPHS["musiq"].call_bytes(hp, lat_h, lat_w, tokens=tokens)
            == memory.musiq_bytes(tokens, lat_h * lat_w * 64, hp["musiq"]))


def test_musiq_memory_needs_the_token_count():
    with pytest.raises(ValueError, match="token count"):
        GRAPHS["musiq"].call_bytes(_hyperparameters("micro"), 32, 32)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_tensorrt_profile_sizes_are_the_former_literals(name):
    from adaptbir.export.tensorrt import ImageProfile, input_shapes

    graph, n_max = GRAPHS[name], 4289
    profile = ImageProfile((512, 512), (512, 768), (1024, 1536), batch=3)
    levels = [(profile.min, 1, token_count(*profile.min)), (profile.opt, 1, token_count(*profile.opt)),
              (profile.max, 3, n_max)]
    for size, batch, tokens in levels:
        assert graph.symbol_sizes(size, batch, tokens) == _literal_sizes(size, batch, tokens)
    spec = graph.spec.resolved(C=1024)
    literal = [spec.input_shapes(**_literal_sizes(*level)) for level in levels]
    assert input_shapes(spec, profile, n_max) == {k: tuple(shapes[k] for shapes in literal) for k in literal[0]}


def test_components_take_batch_precision_and_samples_from_the_descriptions():
    import torch

    from adaptbir.export.components import FULL_SIZE_IMAGE, SAMPLE_IMAGE, components
    from adaptbir.export.config import config_from_dict
    from adaptbir.export.model import AdaptBIR

    config = config_from_dict(_hyperparameters("micro"), "micro")
    torch.manual_seed(0)
    context = torch.from_numpy(CONTEXT)
    comps = components(AdaptBIR(config), context, seed=4)
    assert [c.name for c in comps] == list(GRAPHS)
    rng = np.random.default_rng(4)
    for c in comps:
        graph = GRAPHS[c.name]
        assert c.spec == graph.spec.resolved(C=32) and c.tolerance == graph.spec.tolerance
        assert c.fp16_allowed is not graph.fp32_only
        sample = graph.sample_feeds(rng, SAMPLE_IMAGE, graph.check_batch, CONTEXT)
        assert all(np.array_equal(a.numpy(), b) for a, b in zip(c.sample, sample.values(), strict=True))
        assert (c.full_size_sample is None) is graph.fp32_only
        if c.full_size_sample is not None:
            full = graph.sample_feeds(rng, FULL_SIZE_IMAGE, 1, CONTEXT)
            assert [tuple(t.shape) for t in c.full_size_sample] == [v.shape for v in full.values()]
    assert [c.attention_heads_at_once for c in comps] == [None, 1, None, None]
    assert comps[-1].reference is not None and comps[-1].torch_reference is not comps[-1].module
