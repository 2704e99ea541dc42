"""adaptbir-export build: ONNX Runtime on each exported graph reproduces the golden contract outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from adaptbir.export.cli import main as export_main
from adaptbir.export.onnx_export import run_onnx
from adaptbir.runtime.errors import EngineError
from adaptbir.runtime.graphs import GRAPHS
from adaptbir.runtime.manifest import load_manifest, schema, write_json_atomic
from adaptbir.runtime.metrics import psnr

UNET_TOL = {"unet_control": 1e-4, "unet_control_8x16": 1e-3}


def _build(reference, out, *extra: str) -> None:
    args = ["build", "--checkpoint", str(reference / "tiny_stage3.safetensors"),
            "--musiq", str(reference / "musiq_random.safetensors"), "--out", str(out), *extra]
    assert export_main(args) == 0


@pytest.fixture(scope="module", params=["preset", "config"])
def tiny_fp32(request, reference, tiny_engines, tmp_path_factory):
    if request.param == "preset":
        return tiny_engines  # the session's golden engines, built with --preset tiny
    out = tmp_path_factory.mktemp("engines") / "tiny-config"
    _build(reference, out, "--config", str(reference / "tiny_config.json"))
    return out


@pytest.fixture(scope="module")
def tiny_fp16(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-fp16"
    _build(reference, out, "--preset", "tiny", "--precision", "fp16")
    return out


def _db(actual: np.ndarray, expected: np.ndarray) -> float:
    """PSNR over the golden output's peak-to-peak range (an fp16 graph is never exactly equal)."""
    return psnr(actual, expected, float(np.ptp(expected)))


@pytest.mark.parametrize("case", sorted(UNET_TOL))
def test_unet_graph_matches_golden(tiny_fp32, golden, parity, case):
    g = golden(case)
    feeds = {"x": g["x_t"], "t": g["t"], "context": g["context"], "cond": g["cond"], "w": g["csft_w"]}
    (eps,) = run_onnx(tiny_fp32 / "unet.onnx", feeds)
    parity(f"onnx {tiny_fp32.name} {case} eps_from_cond", eps, g["eps_from_cond"], UNET_TOL[case])


@pytest.mark.parametrize("case", ["dual_encoder", "dual_encoder_64x128"])
def test_dual_encoder_graph_matches_golden(tiny_fp32, golden, parity, case):
    g = golden(case)
    z_restore, z_identity = run_onnx(tiny_fp32 / "dual_encoder.onnx", {"image": g["x"]})
    parity(f"onnx {tiny_fp32.name} {case} z_restore", z_restore, g["z_restore"], 1e-4)
    parity(f"onnx {tiny_fp32.name} {case} z_identity", z_identity, g["z_identity"], 1e-4)


@pytest.mark.parametrize("case", ["vae_decoder", "vae_decoder_8x16"])
def test_decoder_graph_matches_golden(tiny_fp32, golden, parity, case):
    g = golden(case)
    (image,) = run_onnx(tiny_fp32 / "decoder.onnx", {"latent": g["z"]})
    parity(f"onnx {tiny_fp32.name} {case} image", image, g["image"], 1e-4)


@pytest.mark.parametrize("image", ["a", "b"])
def test_musiq_graph_matches_golden(tiny_fp32, tiny_fp16, golden, parity, musiq_feeds, image):
    g = golden("musiq")
    feeds = musiq_feeds(g[f"x_u8_{image}"])
    for directory in (tiny_fp32, tiny_fp16):  # MUSIQ stays fp32 in fp16 directories
        (score,) = run_onnx(directory / "musiq.onnx", feeds)
        parity(f"onnx {directory.name} musiq {image} score", score, g[f"score_{image}"], 1e-5)


def test_fp16_directory_within_stated_tolerance(tiny_fp16, golden):
    manifest = load_manifest(tiny_fp16)
    assert manifest.precision == "fp16" and manifest.graphs["musiq"].precision == "fp32"
    g = golden("unet_control")
    feeds = {"x": g["x_t"], "t": g["t"], "context": g["context"], "cond": g["cond"], "w": g["csft_w"]}
    (eps,) = run_onnx(tiny_fp16 / "unet.onnx", feeds)
    assert _db(eps, g["eps_from_cond"]) >= GRAPHS["unet"].spec.tolerance.fp16_min_psnr_db
    g = golden("dual_encoder")
    for out, key in zip(run_onnx(tiny_fp16 / "dual_encoder.onnx", {"image": g["x"]}), ["z_restore", "z_identity"],
                        strict=True):
        assert _db(out, g[key]) >= GRAPHS["dual_encoder"].spec.tolerance.fp16_min_psnr_db
    g = golden("vae_decoder")
    (image,) = run_onnx(tiny_fp16 / "decoder.onnx", {"latent": g["z"]})
    assert _db(image, g["image"]) >= GRAPHS["decoder"].spec.tolerance.fp16_min_psnr_db
    unet_fp32 = manifest.graphs["unet"].fp32_ops
    assert unet_fp32["Softmax"] > 0 and unet_fp32["attention logits (MatMul, scale)"] > 0
    assert unet_fp32["InstanceNormalization"] > 0 and unet_fp32["timestep arguments"] > 0


def test_manifest_validates_and_records_the_build(tiny_fp32):
    import jsonschema

    data = json.loads((tiny_fp32 / "manifest.json").read_text())
    jsonschema.validate(data, schema())
    manifest = load_manifest(tiny_fp32)
    assert manifest.capabilities.to_dict() == {"has_csft": True, "has_restoration_encoder": True,
                                               "has_text_encoder": False, "has_musiq": True}
    assert manifest.graph("unet").inputs[2].dims == ("B", 77, 32)
    assert manifest.graph("musiq").inputs[0].dims == ("B", "N", 3072)
    assert set(data["files"]) == {"context.npy", "dual_encoder.onnx", "unet.onnx", "decoder.onnx", "musiq.onnx"}
    for graph in data["graphs"].values():
        assert graph["parity"]["passed"] and graph["parity"]["max_abs"] <= 1e-3


def test_rebuild_reuses_up_to_date_graphs(reference, tiny_fp32, tmp_path, capsys):
    out = tmp_path / tiny_fp32.name
    shutil.copytree(tiny_fp32, out)
    how = ["--preset", "tiny"] if "preset" in out.name else ["--config", str(reference / "tiny_config.json")]
    _build(reference, out, *how)
    assert capsys.readouterr().out.count("up to date, reused") == 4
    (out / "decoder.onnx").write_bytes(b"junk")
    _build(reference, out, *how)
    printed = capsys.readouterr().out
    assert printed.count("up to date, reused") == 3 and "decoder (fp32): tracing" in printed
    load_manifest(out)


@pytest.fixture
def copied(tiny_fp32, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_fp32, out)
    return out


def test_tampered_file_is_detected(copied):
    with (copied / "decoder.onnx").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EngineError, match=r"decoder\.onnx does not match its recorded sha256"):
        load_manifest(copied)


def test_missing_file_is_detected(copied):
    (copied / "unet.onnx").unlink()
    with pytest.raises(EngineError, match=r"unet\.onnx is missing"):
        load_manifest(copied)


@pytest.mark.parametrize("field,value,message", [
    ("schema_version", 99, "schema version 99"),
    ("runtime", {"min": "9.0.0", "below": "10.0.0"}, "built for runtime versions 9.0.0"),
])
def test_incompatible_manifest_is_refused(copied, field, value, message):
    data = json.loads((copied / "manifest.json").read_text())
    data[field] = value
    write_json_atomic(copied / "manifest.json", data)
    with pytest.raises(EngineError, match=message) as info:
        load_manifest(copied)
    assert "adaptbir-export build" in str(info.value)


def test_invalid_manifest_and_wrong_directory(copied, tmp_path):
    data = json.loads((copied / "manifest.json").read_text())
    del data["graphs"]["unet"]
    write_json_atomic(copied / "manifest.json", data)
    with pytest.raises(EngineError, match="invalid manifest at graphs: 'unet' is a required property"):
        load_manifest(copied)
    with pytest.raises(EngineError, match=r"has no manifest\.json"):
        load_manifest(tmp_path)
    with pytest.raises(EngineError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")


def test_cli_errors_are_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adaptbir.export.cli", "build", "--checkpoint", str(tmp_path / "missing.ckpt"),
         "--preset", "tiny", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"adaptbir-export: error: checkpoint {tmp_path / 'missing.ckpt'} "
                                                  "does not exist"]
