"""int8 engine directories (export/quantize.py): calibrated on photos, gated against fp32 on held-out ones,
recorded in the manifest, refused below a floor with the previous directory left as it was, and run by
ort-cpu and OpenVINO. Micro model, random weights: the numbers say nothing of real quality — the gate is
what protects a user; these tests prove that it is measured, recorded and enforced."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from adaptbir.export.quantize import (
    Floors,
    Int8Options,
    QuantizationError,
    _checked_feeds,
    calibration_photos,
    default_calibration,
    quantize_directory,
    ssim,
)
from adaptbir.runtime.cli import describe_manifest
from adaptbir.runtime.errors import EngineError
from adaptbir.runtime.manifest import load_manifest
from adaptbir.runtime.metrics import psnr
from adaptbir.runtime.pipeline import Pipeline


def test_the_default_scheme_is_hybrid_and_only_matmul_schemes_keep_nodes_float():
    """hybrid is the default by measurement (sd21, benchmarks/README.md); the test build runs it too: the
    scheme with the most machinery (attention MatMuls kept float by name)."""
    from adaptbir.export.cli import _parser
    from adaptbir.export.quantize import SCHEMES

    args = _parser().parse_args(["build", "--random-weights", "--precision", "int8", "--out", "x"])
    assert args.int8_scheme == Int8Options.scheme == "hybrid"
    assert SCHEMES["conv"].float_nodes(None) == [] and SCHEMES["full"].float_nodes(None) == []


def test_an_int8_build_records_its_calibration_and_gate(int8_engines):
    manifest = load_manifest(int8_engines)  # every file listed and hashed: the closed-directory checks pass
    q = manifest.quantization
    assert manifest.precision == "int8" and q["scheme"] == "hybrid" and q["quantized_ops"] == ["Conv", "MatMul", "Gemm"]
    # hybrid: attention's activation x activation MatMuls stay float, by name in the graph's entry
    kept = manifest.graphs["unet"].fp32_ops["float"]
    assert q["float_ops"]["unet"]["nodes"] == {"MatMul": len(kept["names"])} and kept["names"]
    assert all(name.endswith("MatMul") or "MatMul" in name for name in kept["names"])
    assert {name: g.precision for name, g in manifest.graphs.items()} == {
        "dual_encoder": "int8", "unet": "int8", "decoder": "int8", "musiq": "fp32"}  # the gate's scorer stays fp32
    calibration = q["calibration"]
    assert calibration["photos"] == 3 and calibration["held_out"] == 1 and len(calibration["digest"]) == 64
    gate = q["gate"]
    assert gate["passed"] and gate["floors"] == {"eps_psnr_db": 15, "image_psnr_db": 20, "image_ssim": 0.8,
                                                  "musiq_shift": 3}
    assert gate["worst"]["eps_psnr_db"] >= 15 and gate["worst"]["image_ssim"] >= 0.8
    assert set(gate["eps_psnr_db"]) <= {"t 667-999", "t 333-666", "t 0-332"} and len(gate["eps_psnr_db"]) == 3
    assert all(g.source_key != "" for g in manifest.graphs.values())
    assert [c["measure"] for c in gate["checks"]] == ["eps_psnr_db", "image_psnr_db", "image_ssim", "musiq_shift"]
    assert [c["rule"] for c in gate["checks"]] == ["≥ 15", "≥ 20", "≥ 0.8", "≤ 3"]
    text = describe_manifest(manifest)
    assert "int8 gate         passed vs fp32" in text and "calibration       3 photos + 1 held out" in text
    total = sum(manifest.graphs[g].fp32_ops["float"]["nodes"].get("MatMul", 0) for g in q["float_ops"])
    assert total > len(kept["names"]) and f"{total} of their nodes kept float" in text
    assert "musiq_shift" in text and "(≤ 3)" in text


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_int8_restores_within_the_gate_of_fp32(int8_engines, micro_engines, photos, tmp_path, backend):
    """The held-out photo through the int8 directory on each backend, against the fp32 directory on ort-cpu
    with the same seed and score: within the recorded image floors (OpenVINO runs int8 kernels with bf16
    elsewhere, so it gets the floors of bf16 too: the PSNR floor minus 6 dB)."""
    photo = np.asarray(Image.open(photos(tmp_path / "p") / "photo3.png"))
    manifest = load_manifest(int8_engines)
    floors = manifest.quantization["gate"]["floors"]
    fp32 = Pipeline.from_engines(micro_engines, threads=1).restore(photo, seed=3, steps=2, score=50.0)
    int8 = Pipeline.from_engines(int8_engines, backend=backend, threads=1).restore(photo, seed=3, steps=2, score=50.0)
    # what it computes in, said as it is: int8 kernels, the rest in fp32 (ONNX Runtime) or OpenVINO's CPU precision
    assert int8.precision == "int8" if backend == "ort-cpu" else int8.precision in ("int8+bf16", "int8+f32")
    db = psnr(int8.image, fp32.image, 255)
    assert db is None or db >= floors["image_psnr_db"] - (6 if backend == "openvino" else 0), db
    assert ssim(int8.image, fp32.image) >= floors["image_ssim"] - 0.05


def test_a_floor_above_reach_refuses_and_keeps_the_previous_directory(micro_engines, photos, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(micro_engines, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    options = Int8Options(photos(tmp_path / "photos", 3), calibration_steps=2, gate_steps=2,
                          floors=Floors(eps_psnr_db=200.0))
    with pytest.raises(QuantizationError, match=r"fail the gate .*eps_psnr_db .*floor ≥ 200.*nothing was written"):
        quantize_directory(micro_engines, out, options, progress=lambda line: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "photos"]  # no staging left behind


def test_int8_phases_that_would_not_fit_are_refused_before_calibrating(micro_engines, photos, tmp_path,
                                                                      monkeypatch):
    """The int8 phases' peak (calibration and gate restores as the runtime plans them, each graph's quantizer
    child by its file size) is said, and checked against the available memory before the first restore."""
    import adaptbir.export.quantize as quantize

    calibrated, said = [], []
    monkeypatch.setattr(quantize, "record_feeds", lambda *args: calibrated.append(args))
    monkeypatch.setattr(quantize, "available_bytes", lambda: 2**20)
    options = Int8Options(photos(tmp_path / "photos", 3), calibration_steps=2, gate_steps=2)
    refusal = (r"the int8 phases need about \d+\.\d GiB more memory at their peak "
               r"\((calibration restores|gate restores|quantizing \w+)\), but only 0\.0 GiB")
    with pytest.raises(QuantizationError, match=refusal):
        quantize_directory(micro_engines, tmp_path / "out", options, progress=said.append)
    assert not calibrated and not (tmp_path / "out").exists()
    assert said[0].startswith("memory: int8 phases predicted peak ")
    manifest = load_manifest(micro_engines)
    phases = quantize.predict_int8_memory(manifest, [("a", np.zeros((512, 512, 3), np.uint8))], held=2**30)
    assert set(phases) == {"calibration restores", "gate restores", "quantizing dual_encoder", "quantizing unet",
                           "quantizing decoder"}
    assert phases["gate restores"] > phases["calibration restores"] > 2**30


def test_a_changed_int8_graph_is_refused_at_load(int8_engines, tmp_path):
    copied = tmp_path / "int8"
    shutil.copytree(int8_engines, copied)
    with open(copied / "unet.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00")
    with pytest.raises(EngineError, match=r"unet\.onnx does not match its recorded sha256"):
        load_manifest(copied)


@pytest.mark.parametrize("case,message", [("empty", "0 readable photo"),
                                          ("too few", "2 readable photo.*at least 3"),
                                          ("unreadable", "bad.png"), ("missing", "not a folder of photos")])
def test_bad_calibration_folders_are_one_line(tmp_path, photos, case, message):
    folder = tmp_path / "cal"
    folder.mkdir()
    if case in ("too few", "unreadable"):
        photos(folder, 2 if case == "too few" else 3)
    if case == "unreadable":
        (folder / "bad.png").write_bytes(b"not an image")
    with pytest.raises(QuantizationError, match=message) as info:
        calibration_photos(folder / "missing" if case == "missing" else folder)
    assert "\n" not in str(info.value)


def test_a_calibration_run_that_meets_nan_is_refused():
    feeds = {"unet": [{"x": np.array([np.nan], np.float32)}]}
    with pytest.raises(QuantizationError, match="fed unet NaN/inf values"):
        _checked_feeds(feeds)


def test_the_default_calibration_set_is_made_the_same_everywhere():
    first, second = default_calibration(), default_calibration()
    assert len(first.photos) == 12 and first.digest == second.digest
    assert {name.rsplit("-", 1)[1] for name, _ in first.photos} == {"mild", "medium", "severe"}
    calibrate, held = first.split()
    assert len(held) == 3 and len(calibrate) == 9 and not set(n for n, _ in held) & set(n for n, _ in calibrate)
    assert all(rgb.dtype == np.uint8 and max(rgb.shape[:2]) <= 512 for _, rgb in first.photos)


def test_ssim():
    """1 for the same image, symmetric, falling as noise grows, and near the closed form for independent
    noise on a uniform image: (2σx² + C2) / (2σx² + σn² + C2) (means equal, so the luminance term is 1)."""
    rng = np.random.default_rng(0)
    image = rng.integers(64, 192, (96, 96, 3)).astype(np.uint8)
    noisy = {s: np.clip(image + rng.normal(0, s, image.shape), 0, 255).astype(np.uint8) for s in (10, 25, 50)}
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, noisy[25]) == pytest.approx(ssim(noisy[25], image))
    assert ssim(image, noisy[10]) > ssim(image, noisy[25]) > ssim(image, noisy[50])
    var, c2 = (128**2 - 1) / 12, (0.03 * 255) ** 2
    assert ssim(image, noisy[25]) == pytest.approx((2 * var + c2) / (2 * var + 25**2 + c2), abs=0.03)


def test_calibrating_and_quantizing_apart_gives_ort_s_one_call_graph(micro_engines, tmp_path):
    """The quantizer runs as two processes (calibration, then quantization from ONNX Runtime's calibration
    cache) to halve its peak memory: the graph is the one `quantize_static` writes in one call."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from adaptbir.export.quantize import SCHEMES, quantize_graph, record_feeds

    pipeline = Pipeline.from_engines(micro_engines)
    photos = [(f"p{i}", np.asarray(Image.fromarray(_noise(48, 64, i)))) for i in range(2)]
    feeds = record_feeds(pipeline, photos, steps=2, seed=0, progress=lambda line: None)["unet"]
    scheme = SCHEMES["conv"]
    quantize_graph(micro_engines / "unet.onnx", tmp_path / "apart.onnx", feeds, scheme)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(micro_engines / "unet.onnx"), str(tmp_path / "one.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=list(scheme.ops), calibrate_method=CalibrationMethod.MinMax)
    apart, one = (onnx.load(str(tmp_path / f"{name}.onnx")).graph for name in ("apart", "one"))
    assert [n.op_type for n in apart.node] == [n.op_type for n in one.node]
    assert {t.name: t.raw_data for t in apart.initializer} == {t.name: t.raw_data for t in one.initializer}


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
