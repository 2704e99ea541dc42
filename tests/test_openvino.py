"""The openvino backend on the tiny engines: f32 meets the golden contract as ort-cpu does, bf16 stays within
the PSNR bounds of ort-cpu fp32, nothing is written to disk, errors are one line."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from adaptbir.runtime import backends
from adaptbir.runtime.backends import BackendError, Engines
from adaptbir.runtime.errors import EngineError
from adaptbir.runtime.metrics import psnr
from adaptbir.runtime.pipeline import Pipeline

# The openvino extra is part of the test install (make install): these tests fail, never skip, without it.

UNET_TOL = {"unet_control": 1e-4, "unet_control_8x16": 1e-3}  # the same tolerances as ort-cpu's
BF16_MIN_PSNR_DB = {"dual_encoder": 40.0, "unet": 40.0, "decoder": 35.0, "final image": 35.0}


@pytest.fixture(scope="module")
def f32(tiny_engines):
    return Engines.load(tiny_engines, backend="openvino", threads=2, precision="f32")


@pytest.fixture(scope="module")
def bf16(tiny_engines):
    return Engines.load(tiny_engines, backend="openvino", threads=2, precision="bf16")


@pytest.fixture(scope="module")
def ort(tiny_engines):
    return Engines.load(tiny_engines, threads=2)


def _unet_feeds(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"x": g["x_t"], "t": g["t"], "context": g["context"], "cond": g["cond"], "w": g["csft_w"]}


@pytest.mark.parametrize("case", sorted(UNET_TOL))
def test_f32_unet_matches_golden(f32, golden, parity, case):
    g = golden(case)
    (eps,) = f32.run("unet", _unet_feeds(g))
    parity(f"openvino f32 {case} eps_from_cond", eps, g["eps_from_cond"], UNET_TOL[case])


def test_f32_encoder_decoder_musiq_match_golden(f32, golden, parity, musiq_feeds):
    for case in ("dual_encoder", "dual_encoder_64x128"):
        g = golden(case)
        z_restore, z_identity = f32.run("dual_encoder", {"image": g["x"]})
        parity(f"openvino f32 {case} z_restore", z_restore, g["z_restore"], 1e-4)
        parity(f"openvino f32 {case} z_identity", z_identity, g["z_identity"], 1e-4)
    for case in ("vae_decoder", "vae_decoder_8x16"):
        g = golden(case)
        (image,) = f32.run("decoder", {"latent": g["z"]})
        parity(f"openvino f32 {case} image", image, g["image"], 1e-4)
    g = golden("musiq")
    for image in ("a", "b"):
        (score,) = f32.run("musiq", musiq_feeds(g[f"x_u8_{image}"]))
        parity(f"openvino f32 musiq {image} score", score, g[f"score_{image}"], 1e-5)


def test_bf16_within_psnr_of_ort_fp32(bf16, ort, golden):
    assert bf16.compute_precision == "bf16" and bf16.sessions["musiq"].precision == "f32"
    g = golden("unet_control")
    feeds = {"unet": _unet_feeds(g), "dual_encoder": {"image": golden("dual_encoder")["x"]},
             "decoder": {"latent": golden("vae_decoder")["z"]}}
    for name, graph_feeds in feeds.items():
        for a, b in zip(bf16.run(name, graph_feeds), ort.run(name, graph_feeds), strict=True):
            db = psnr(a, b, float(np.ptp(b)))
            assert db is not None and db >= BF16_MIN_PSNR_DB[name], (name, db)
    photo = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    results = [Pipeline(e).restore(photo, seed=0, steps=50) for e in (bf16, ort)]
    assert abs(results[0].score - results[1].score) <= 1e-3  # MUSIQ in f32: the gate cannot move
    db = psnr(results[0].image, results[1].image, 255.0)
    assert db >= BF16_MIN_PSNR_DB["final image"], db
    assert (results[0].backend, results[0].precision) == ("openvino", "bf16")


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def test_nothing_is_written_and_a_read_only_directory_serves(tiny_engines, tmp_path, monkeypatch):
    """No compiled-model cache (measured: it held the cached model beside the prepared one while loading;
    benchmarks/README.md): OpenVINO writes nothing, neither into the engine directory, which may be read-only,
    nor into the per-user cache; a second load computes the same."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAPTBIR_CACHE_DIR", str(cache))
    engines = shutil.copytree(tiny_engines, tmp_path / "read-only")  # the session's directory is shared
    before = sorted(p.name for p in engines.iterdir())
    for p in engines.iterdir():
        p.chmod(stat.S_IRUSR)
    latent = np.zeros((1, 4, 8, 8), np.float32)
    images = [Engines.load(engines, backend="openvino", precision="f32").run("decoder", {"latent": latent})[0]
              for _ in range(2)]
    np.testing.assert_array_equal(*images)
    assert not _files(cache) and sorted(p.name for p in engines.iterdir()) == before


def test_several_shapes_and_threads(micro_engines, threads_agree):
    """Compiled models per shape and one infer request per call: plumbing, so on the micro model."""
    engines = Engines.load(micro_engines, backend="openvino", threads=2, precision="bf16")
    pipeline = Pipeline(engines)
    photo = (np.random.default_rng(1).random((600, 520, 3)) * 255).astype(np.uint8)
    tiled = pipeline.restore(photo, seed=1, steps=2, score=50, tile_size=512)  # tiles of several shapes
    assert tiled.tiled and tiled.image.shape == photo.shape
    threads_agree(pipeline, [photo[: 64 + 32 * i, :96] for i in range(3)])  # one infer request per call
    sessions = engines.sessions["unet"]  # latents 64x64 (the tiles), 64x96, 88x64: one compiled model each
    assert 1 < len(sessions._compiled) <= sessions.MAX_SHAPES


def test_precision_errors_are_one_line(tiny_engines, monkeypatch):
    with pytest.raises(BackendError, match="applies to the openvino backend only"):
        Engines.load(tiny_engines, backend="ort-cpu", precision="bf16")
    with pytest.raises(BackendError, match="choose one of bf16, f32"):
        Engines.load(tiny_engines, backend="openvino", precision="fp8")

    class NoBf16:
        def get_property(self, device, name):
            return ["FP32", "INT8"]

    monkeypatch.setattr(backends, "openvino_core", lambda: NoBf16())
    with pytest.raises(BackendError, match=r"this CPU has no bf16 arithmetic.*--cpu-precision f32"):
        backends.openvino_precision(NoBf16(), "bf16")
    assert backends.openvino_precision(NoBf16(), None) == "f32"  # the default follows the CPU


def test_missing_openvino_names_the_extra(tiny_engines, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(BackendError, match=r"pip install 'adaptbir\[openvino\]'"):
        Engines.load(tiny_engines, backend="openvino")


def test_unreadable_graph_is_one_line(tiny_engines, tmp_path):
    """A graph OpenVINO cannot read fails in one line; in a directory, the load checks catch it first."""
    import shutil

    from adaptbir.runtime.backends import OpenVinoSession, openvino_core
    from adaptbir.runtime.manifest import FileRecord

    broken = tmp_path / "broken"
    shutil.copytree(tiny_engines, broken)
    (broken / "decoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(EngineError, match=r"OpenVINO cannot read .*decoder\.onnx") as info:
        OpenVinoSession(openvino_core(), broken / "decoder.onnx", "f32", None)
    assert "\n" not in str(info.value)
    data = json.loads((broken / "manifest.json").read_text())
    data["files"]["decoder.onnx"] = FileRecord.of(broken / "decoder.onnx").__dict__  # a consistent manifest
    (broken / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match=r"decoder\.onnx is not a readable ONNX graph") as info:
        Engines.load(broken, backend="openvino", verify=False)
    assert "\n" not in str(info.value)
