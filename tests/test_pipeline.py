"""The runtime pipeline end to end on the tiny engines: golden e2e, API, threads, tiling, failures."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptbir.runtime.backends import Engines
from adaptbir.runtime.errors import EngineError, InputError
from adaptbir.runtime.metrics import psnr
from adaptbir.runtime.musiq_patches import token_count
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.stages import Stages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tiny_engines):
    return Pipeline.from_engines(tiny_engines, threads=2)


@pytest.fixture(scope="module")
def quick(micro_engines):
    """For what the API does around the engines (kinds, sizes, seeds, threads, progress): the micro model."""
    return Pipeline.from_engines(micro_engines, threads=2)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic photo (gradients + a few discs), uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([yy, xx, 1 - (yy + xx) / 2], axis=-1) * 200
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * max(h, w)
        img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] += rng.uniform(-60, 60, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino-f32"])
def test_end_to_end_golden(pipeline, golden, parity, backend):
    """pipeline_e2e.npz through the float-input entry point (steps 4-6 on an already padded image); OpenVINO
    in f32 meets the same contract with the same tolerances.

    The golden case cannot enter through `restore` on a uint8 image: its input is a float image that is not
    uint8-born (off by up to 1/255), 64x128 (below the 512 px short side `restore` scales up to), and the
    reference ran no MUSIQ for it. Scoring is checked against the golden scores separately
    (`test_musiq_chain_matches_the_golden_scores`), pre- and post-processing in test_stages.py."""
    g = golden("pipeline_e2e")
    engines = pipeline.engines
    if backend == "openvino-f32":  # the openvino extra is part of the test install: never skipped
        engines = Engines(engines.manifest, backend="openvino", precision="f32")
    pipeline = Pipeline(engines, context=g["context"])  # the text-encoder stand-in of the golden
    decision = pipeline.decide(float(g["musiq_score"]))
    assert decision.k == float(g["k"]) and decision.w == pytest.approx(float(g["csft_w"]), abs=1e-15)
    x = np.ascontiguousarray(g["control_img_hwc"].transpose(2, 0, 1)[None])
    result = pipeline.restore_float(x, score=float(g["musiq_score"]), steps=int(g["steps"]), x_T=g["x_T"],
                                    noise=g["noise"])
    assert (result.gate.k, result.gate.w) == (decision.k, decision.w)
    parity(f"e2e {backend} final_latent_contract", result.final_latent, g["final_latent_contract"], 1e-3)
    diff = np.abs(result.image_u8.astype(np.int16) - g["output_u8_contract"].astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size, (diff.max(), np.count_nonzero(diff))


def test_restore_returns_the_input_kind_and_size(quick):
    photo = _photo(70, 90)
    result = quick.restore(photo, seed=3, steps=2)
    assert isinstance(result.image, np.ndarray) and result.image.shape == (70, 90, 3)
    assert result.seed == 3 and result.steps == 2 and result.label in ("severe", "medium", "mild")
    assert result.sizes == {"input": [70, 90], "processing": [512, 659], "padded": [512, 704], "output": [70, 90]}
    stages = ("preprocess", "musiq", "encode", "sample", "decode", "postprocess", "total", "engine")
    assert all(result.timings[f"{stage}_s"] >= 0 for stage in stages)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 77, np.uint8)])
    out = quick.restore(rgba, seed=3, steps=2, score=55).image
    assert out.shape == (70, 90, 4) and np.all(out[..., 3] == 77)
    pil = quick.restore(Image.fromarray(photo), seed=3, steps=2, score=55, sr_scale=2).image
    assert isinstance(pil, Image.Image) and pil.size == (180, 140)


def test_same_seed_same_result_and_threads_agree(quick, threads_agree):
    threads_agree(quick, [_photo(64, 64, seed=s) for s in range(3)])


def test_gating_and_overrides(pipeline):
    photo = _photo(64, 64)
    measured = pipeline.restore(photo, seed=0, steps=2)
    assert measured.score < 0 and measured.score_source == "measured"  # random MUSIQ weights score negative
    assert (measured.k, measured.w, measured.label) == (0.0, 0.0, "severe")
    assert measured.warnings and "treated as severe" in measured.warnings[0]
    given = pipeline.restore(photo, seed=0, steps=2, score=80)
    assert (given.score, given.score_source) == (80, "given") and "musiq_s" not in given.timings
    assert (given.k, given.w, given.label) == (0.7, pytest.approx(1.0), "mild")
    custom = pipeline.restore(photo, seed=0, steps=2, score=50, k=0.3, w=0.9)
    assert (custom.k, custom.w, custom.label) == (0.3, 0.9, "medium")


def test_progress_is_called_per_step_and_may_cancel(quick):
    calls = []
    quick.restore(_photo(64, 64), seed=0, steps=3, score=50, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    class Cancelled(Exception):
        pass

    def cancel(i, n):
        raise Cancelled

    with pytest.raises(Cancelled):
        quick.restore(_photo(64, 64), seed=0, steps=3, score=50, progress=cancel)


def test_on_step_hands_each_steps_x0_beside_progress(quick):
    from adaptbir.runtime.pipeline import SamplerStep

    steps: list[SamplerStep] = []
    calls = []
    result = quick.restore(_photo(64, 80), seed=0, steps=3, score=50, on_step=steps.append,
                           progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and [s.step for s in steps] == [1, 2, 3]
    h, w = (d // 8 for d in result.sizes["padded"])
    assert all(s.denoised.shape == s.x.shape == (1, 4, h, w) for s in steps)
    assert steps[0].timestep > steps[1].timestep > steps[2].timestep == 0

    def stop(s):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # raising from on_step stops the restore, as from progress
        quick.restore(_photo(64, 64), seed=0, steps=3, score=50, on_step=stop)


def test_nan_output_is_a_clear_error(quick, monkeypatch):
    session = quick.engines.sessions["decoder"]
    monkeypatch.setattr(session, "run", lambda feeds: [np.full((1, 3, 512, 512), np.nan, np.float32)])
    with pytest.raises(EngineError, match=r"decoder produced .* NaN/inf .* \(an fp32 overflow or NaN weights"):
        quick.restore(_photo(64, 64), seed=0, steps=2, score=50)  # an fp32 directory: not "fp16 overflow?"


@pytest.mark.parametrize("precision,hint", [("fp16", "an fp16 overflow?; try the fp32 engine directory"),
                                            ("bf16", "or --cpu-precision f32"), ("f32", "an fp32 overflow")])
def test_nan_hint_follows_the_precision_computed_in(precision, hint):
    from adaptbir.runtime.backends import check_finite

    with pytest.raises(EngineError, match=re.escape(hint)):
        check_finite("unet", [np.array([1.0, np.inf], np.float32)], ["eps"], precision)


def test_absurd_sizes_are_refused(pipeline):
    with pytest.raises(InputError, match="above the 64 Mpx limit"):
        pipeline.restore(np.zeros((2, 4096, 3), np.uint8), steps=2, score=50)


def test_one_tile_through_the_tiling_code_equals_untiled(pipeline, monkeypatch):
    """A grid of one 512 px tile, forced through the tiled path (windows, per-step eps blending, decoder
    blending at scale 8), gives exactly the untiled result."""
    photo = _photo(512, 512)
    untiled = pipeline.restore(photo, seed=1, steps=2, score=60, tile_size=0)
    import adaptbir.runtime.stages as stages

    grids, blend, plan = [], stages.blend, Stages.plan
    monkeypatch.setattr(Stages, "plan", lambda *a, **k: dataclasses.replace(plan(*a, **k), tile_px=512))
    monkeypatch.setattr(stages, "blend", lambda fn, windows, *a, **k: grids.append(windows) or blend(fn, windows, *a,
                                                                                                      **k))
    tiled = pipeline.restore(photo, seed=1, steps=2, score=60)
    assert tiled.tiled and not untiled.tiled
    assert len(grids) == 4 and all(len(g) == 1 and (g[0].h, g[0].w) == (64, 64) for g in grids)  # enc, 2 steps, dec
    np.testing.assert_array_equal(untiled.image, tiled.image)


@pytest.mark.parametrize("image", ["a", "b"])
def test_musiq_chain_matches_the_golden_scores(pipeline, golden, parity, image):
    """The runtime's own chain, uint8 image → numpy patches → musiq.onnx, against the reference's scores."""
    g = golden("musiq")
    u8 = np.ascontiguousarray(g[f"x_u8_{image}"][0].transpose(1, 2, 0))
    parity(f"runtime musiq chain score {image}", [pipeline.score(u8)], g[f"score_{image}"], 1e-5)


TILED_MIN_PSNR_DB = 20.0  # measured (docs/memory.md, "Size, memory and tiling"): random tiny weights, noisy pictures


def test_1024x768_untiled_by_default_and_tiled_under_a_small_budget(pipeline):
    """The reference's untiled pass whenever it fits the memory budget; tiles under a small budget, close to it."""
    photo = _photo(768, 1024)
    untiled = pipeline.restore(photo, seed=2, steps=2, score=60)
    tiled = pipeline.restore(photo, seed=2, steps=2, score=60, memory_budget=1024 * 2**20)
    assert not untiled.tiled and "fits the" in untiled.record()["tiling"]
    assert tiled.tiled and "over the 1.0 GiB memory budget" in tiled.record()["tiling"]
    assert tiled.image.shape == untiled.image.shape == photo.shape
    db = psnr(tiled.image, untiled.image, 255.0)
    print(f"tiled vs untiled 1024x768, 2 steps: PSNR {db:.1f} dB")
    assert db >= TILED_MIN_PSNR_DB


def test_runtime_imports_no_torch(micro_engines, tmp_path):
    """A fresh interpreter where torch cannot be imported restores an image through the API and the CLI."""
    Image.fromarray(_photo(40, 60)).save(tmp_path / "in.png")
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from adaptbir.runtime import backends, cli, colorfix, gating, graphs, image_io, manifest, musiq_patches
from adaptbir.runtime import pipeline, preprocess, sampler, tiling
p = pipeline.Pipeline.from_engines({str(micro_engines)!r})
out = p.restore(np.zeros((40, 60, 3), np.uint8), seed=0, steps=2).image
assert out.shape == (40, 60, 3)
rc = cli.main(["restore", {str(tmp_path / "in.png")!r}, "-o", {str(tmp_path / "out")!r}, "--engines",
               {str(micro_engines)!r}, "--steps", "2", "--quiet"])
assert rc == 0, rc
assert sys.modules["torch"] is None
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "in.png").is_file()


LARGE_PEAK_RSS_MIB = 2048  # measured 1.0 GiB on micro, 1.07 on tiny (docs/memory.md, "Size, memory and tiling")


def test_2048x1536_restores_tiled_within_a_memory_bound(micro_engines):
    """A fresh torch-free process restores a 2048x1536 photo tiled (its untiled pass would need ~19 GiB, over
    a 4 GiB budget); its peak RSS stays under the bound and within ±25 % of the plan's prediction."""
    code = f"""
import sys
sys.modules["torch"] = None
import numpy as np
from adaptbir.benchmarks.probe import peak_rss_mib
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.stages import Stages
p = Pipeline.from_engines({str(micro_engines)!r}, memory_budget=4 * 2**30)
image = (np.random.default_rng(0).random((1536, 2048, 3)) * 255).astype(np.uint8)
r = p.restore(image, seed=0, steps=2)
assert r.tiled and r.image.shape == (1536, 2048, 3), (r.tiled, r.image.shape)
print(peak_rss_mib(), r.plan.peak_bytes / 2**20)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mib, predicted_mib = map(float, result.stdout.strip().splitlines()[-1].split())
    print(f"2048x1536 tiled, 2 steps: peak RSS {peak_mib:.0f} MiB, predicted {predicted_mib:.0f} MiB")
    assert peak_mib < LARGE_PEAK_RSS_MIB
    assert abs(predicted_mib / peak_mib - 1) <= 0.25


def test_readme_api_snippet_runs_as_written(tiny_engines, tmp_path, monkeypatch):
    """The README's Python example, in a folder where `make demo` has built engines/tiny-random (steps cut
    from the default 50 to 2 for time; nothing else changed)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    fast = snippet.replace("seed=0)", "seed=0, steps=2)").replace("w=0.5)", "w=0.5, steps=2)")
    assert fast.count("steps=2") == 2
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "tiny-random").symlink_to(tiny_engines)
    monkeypatch.chdir(tmp_path)
    exec(compile(fast, "README.md", "exec"), {})
    assert Image.open(tmp_path / "restored.png").size == (512, 600)


def test_musiq_scores_beyond_the_tensorrt_token_limit_as_pyiqa_does(pipeline, reference):
    """ONNX Runtime takes any token count: a 2112x2112 photo (4549 tokens, above the directory's n_max of a
    2048x2048 image) is scored exactly as pyiqa's own MUSIQ scores it (same tiny random weights)."""
    import torch
    from safetensors.torch import load_file

    from adaptbir.export.config import load_config
    from adaptbir.export.musiq import MusiqScorer

    photo = _photo(2112, 2112)
    assert token_count(2112, 2112) > pipeline.manifest.musiq.n_max
    scorer = MusiqScorer(load_config("tiny").musiq).eval()
    scorer.net.load_state_dict(load_file(reference / "musiq_random.safetensors"), strict=True)
    with torch.inference_mode():
        expected = float(scorer.net(torch.from_numpy(photo.transpose(2, 0, 1)[None].copy()).float() / 255))
    assert abs(pipeline.score(photo) - expected) <= 1e-5, (pipeline.score(photo), expected)


def test_musiq_limits_are_clear_errors_before_any_patch_is_extracted(pipeline, monkeypatch):
    import adaptbir.runtime.stages as stages

    extracted = []
    monkeypatch.setattr(stages, "extract_tokens", lambda *a: extracted.append(a))
    photo = np.zeros((2112, 2112, 3), np.uint8)
    monkeypatch.setattr(pipeline.engines, "backend", "trt")
    with pytest.raises(InputError, match=r"4549 tokens, its profile serves at most 4289; give the score"):
        pipeline.score(photo)
    monkeypatch.setattr(pipeline.engines, "backend", "ort-cpu")
    monkeypatch.setattr(stages, "available_bytes", lambda: 2**30)
    with pytest.raises(InputError, match=r"MUSIQ on this image needs about 1\.[0-9] GiB \(4549 tokens.*1\.0 GiB are "
                                         r"available; give the score"):
        pipeline.score(photo)
    assert not extracted
