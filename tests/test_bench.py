"""adaptbir-bench on the micro model (tests/micro_config.json, `--config`, or its engine directory): every stage,
the torch ratios, the overhead, the machine's peaks and the fractions of them are reported; the comparisons
(fp16, openvino, int8) have their accuracy blocks.

No timing thresholds here: benchmarks measure, tests check that the measurement is complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adaptbir.benchmarks.stages import STAGES

MICRO = Path(__file__).with_name("micro_config.json")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working folder for every bench run: the tiny engines it builds under engines/ are reused (up to
    date) by the next run instead of being rebuilt."""
    return tmp_path_factory.mktemp("bench")


def test_bench_with_torch_comparison(workdir, tmp_path):
    result_file = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--config", str(MICRO), "--runs", "1",
           "--compare", "torch", "--json", str(result_file), "--warmup", "0", "--steps", "2", "--size", "256x256",
           "--peak-sizes", "512"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    assert report["sides"] == ["runtime", "torch"]
    assert set(report["stages"]) == set(STAGES)
    for stage, entry in report["stages"].items():
        for side in ("runtime", "torch"):
            assert entry[side]["median"] > 0 and entry[side]["min"] <= entry[side]["max"], (stage, side)
        ratio = entry["ratio_runtime_over_torch"]  # one run: the pair is the ratio of the two medians
        assert ratio["pairs"] == [pytest.approx(entry["runtime"]["median"] / entry["torch"]["median"], rel=1e-6)]
    overhead = report["stages"]["e2e"]["overhead"]
    assert overhead["median"] >= 0 and 0 <= overhead["fraction_median"] < 1
    assert report["flops"]["unet_step"] > 0 and report["matmul_peak"]["fp32_gflops"] > 0
    assert report["matmul_peak"]["sizes"] == [512]
    assert report["peaks"]["peak_gflops"]["ort-cpu f32"] > 0  # the runtime side against its own peak
    assert report["fraction_of_peak"]["unet_step"]["runtime"]["peak"] == "ort-cpu f32"
    assert "torch" not in report["fraction_of_peak"]["unet_step"]  # no torch kernels measured
    assert report["memory"]["peak_rss_mib"] > 0 and report["memory"]["torch_loaded"] is False
    assert result_file.with_suffix(".png").stat().st_size > 0
    assert "runtime overhead" in result.stdout and "ratio" in result.stdout


def test_bench_fp16_accuracy_report(workdir, tmp_path):
    result_file = tmp_path / "fp16.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--config", str(MICRO), "--runs", "1", "--warmup", "0",
           "--compare", "fp16", "--stages", "unet_step", "--steps", "2", "--size", "256x256", "--no-memory",
           "--no-peaks", "--json", str(result_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    assert report["sides"] == ["runtime", "fp32"] and report["settings"]["precision"] == "fp16"
    assert len(report["stages"]["unet_step"]["ratio_runtime_over_fp32"]["pairs"]) == 1  # fp16 time / fp32 time
    accuracy = report["accuracy"]
    assert (accuracy["subject"], accuracy["baseline"]) == ("fp16", "fp32")
    assert set(accuracy["graphs"]) == {"dual_encoder", "unet", "decoder", "musiq"}
    assert all(g["finite"] for g in accuracy["graphs"].values())
    assert accuracy["graphs"]["unet"]["psnr_db"] >= 40 and accuracy["graphs"]["decoder"]["psnr_db"] >= 35
    assert accuracy["graphs"]["musiq"]["max_abs"] == 0 and accuracy["musiq_graph_identical"]
    assert accuracy["musiq_max_abs_shift"] == 0 and accuracy["gate_flips_near_40_70"] == []
    assert accuracy["final_image_steps"] == 2 and accuracy["final_image_psnr_db"] >= 35
    assert "fp32 ms" in result.stdout and "fp16 vs fp32 (same inputs" in result.stdout


def test_bench_openvino_against_ort_cpu_on_an_engine_directory(micro_engines, tmp_path):
    """--compare openvino needs no torch weights: the same directory on both backends, without --preset; the
    machine's peaks, every stage's fraction of its side's peak and OpenVINO's profile are in the report."""
    result_file = tmp_path / "ov.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--engines", str(micro_engines), "--runs", "1",
           "--warmup", "0", "--compare", "openvino", "--cpu-precision", "bf16", "--stages", "unet_step",
           "--steps", "2", "--size", "256x256", "--peak-runs", "2", "--json", str(result_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    assert report["sides"] == ["runtime", "ort-cpu"] and report["backends"] == {"runtime": "openvino",
                                                                                  "ort-cpu": "ort-cpu"}
    assert report["compute_precision"] == {"runtime": "bf16", "ort-cpu": "fp32"}
    assert len(report["stages"]["unet_step"]["ratio_runtime_over_ort-cpu"]["pairs"]) == 1
    accuracy = report["accuracy"]
    assert (accuracy["subject"], accuracy["baseline"]) == ("openvino bf16", "ort-cpu fp32")
    assert accuracy["graphs"]["unet"]["psnr_db"] >= 40 and accuracy["graphs"]["dual_encoder"]["psnr_db"] >= 40
    assert accuracy["graphs"]["decoder"]["psnr_db"] >= 35 and accuracy["final_image_psnr_db"] >= 35
    assert accuracy["musiq_max_abs_shift"] <= 1e-3
    load_times = report["openvino_load"]
    assert load_times["load_s"] > 0 and load_times["first_call_s"] > 0
    assert report["memory"]["backend"] == "openvino" and report["memory"]["compute_precision"] == "bf16"
    assert report["memory_baseline"]["backend"] == "ort-cpu" and report["memory_baseline"]["peak_rss_mib"] > 0
    # FLOPs from the directory's hyper-parameters (meta device), peaks of every backend/precision
    assert report["flops"]["unet_step"] > 0 and report["fp32_weight_bytes"] > 0
    peaks = report["peaks"]
    assert set(peaks["peak_gflops"]) == {"ort-cpu f32", "ort-cpu int8", "openvino f32", "openvino bf16",
                                         "openvino int8"}
    assert all(v > 0 for v in peaks["peak_gflops"].values())
    ops = {k["op"] for k in peaks["kernels"].values()}
    assert ops == {"conv", "matmul"} and all(k["gflop"] > 0 for k in peaks["kernels"].values())
    for key, by_kernel in peaks["measured"].items():
        assert set(by_kernel) == set(peaks["kernels"]), key
        assert all(len(m["gflops"]) == 2 and m["gflops_median"] > 0 for m in by_kernel.values())
    fractions = report["fraction_of_peak"]["unet_step"]
    assert fractions["runtime"]["peak"] == "openvino bf16" and fractions["ort-cpu"]["peak"] == "ort-cpu f32"
    assert all(f["fraction"] > 0 and f["gflops"] > 0 for f in fractions.values())
    profile = report["openvino_profile"]["runtime"]  # only the openvino side is profiled
    assert set(report["openvino_profile"]) == {"runtime"} and profile["precision"] == "bf16"
    assert "Convolution" in profile["by_type"] and profile["latent"] == [32, 32]
    assert sum(t["share"] for t in profile["by_type"].values()) == pytest.approx(1.0)
    assert all(t["ms"] >= 0 and t["nodes"] > 0 for t in profile["by_type"].values())
    assert "machine peaks" in result.stdout and "OpenVINO profile" in result.stdout


def test_bench_int8_against_fp32_with_a_stand_in(micro_engines, tmp_path):
    """--compare int8, structure only: a copy of an fp32 directory stands in for the int8 one (no int8
    directory exists yet), so the accuracy is exact."""
    stand_in = tmp_path / "int8-stand-in"
    shutil.copytree(micro_engines, stand_in)
    result_file = tmp_path / "int8.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--engines", str(micro_engines), "--compare", "int8",
           "--int8-engines", str(stand_in), "--runs", "1", "--warmup", "0", "--stages", "unet_step,decoder",
           "--steps", "2", "--size", "256x256", "--no-memory", "--no-peaks", "--no-profile", "--also", "openvino",
           "--json", str(result_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    # --also: the fp32 directory on a second backend in the same run (int8 on one backend against fp32 on another)
    assert report["sides"] == ["runtime", "fp32", "openvino"]
    assert report["backends"] == {"runtime": "ort-cpu", "fp32": "ort-cpu", "openvino": "openvino"}
    assert len(report["stages"]["unet_step"]["ratio_runtime_over_openvino"]["pairs"]) == 1
    assert "openvino ms" in result.stdout and "fp32 ms" in result.stdout
    assert report["settings"]["engines"] == str(stand_in)
    assert report["settings"]["baseline_engines"] == str(micro_engines)
    for stage in ("unet_step", "decoder"):
        assert len(report["stages"][stage]["ratio_runtime_over_fp32"]["pairs"]) == 1
    accuracy = report["accuracy"]
    assert (accuracy["subject"], accuracy["baseline"]) == ("int8", "fp32")
    assert set(accuracy["graphs"]) == {"dual_encoder", "unet", "decoder", "musiq"}
    assert all(g["max_abs"] == 0 for g in accuracy["graphs"].values())
    assert accuracy["final_image_max_abs_u8"] == 0 and "peaks" not in report
    assert "int8 vs fp32 (same inputs" in result.stdout and "not an int8 one" in result.stdout


@pytest.mark.parametrize("extra", [["--also", "ort-cpu"], ["--also", "openvino", "--compare", "openvino"]])
def test_bench_also_needs_another_backend_and_a_directory_comparison(micro_engines, extra, capsys):
    from adaptbir.benchmarks.bench import main

    assert main(["--engines", str(micro_engines), "--no-memory", *extra]) == 2
    assert "--also BACKEND adds the fp32 directory on another backend" in capsys.readouterr().err


def test_bench_int8_directory_against_fp32(int8_engines, micro_engines, tmp_path):
    """--compare int8 on a real int8 directory (the int8 micro build, same random weights as micro_engines):
    the int8 side is measured against its backend's int8 peak, MUSIQ (fp32 in both) against f32."""
    result_file = tmp_path / "int8.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--engines", str(micro_engines), "--compare", "int8",
           "--int8-engines", str(int8_engines), "--runs", "1", "--warmup", "0", "--stages", "unet_step,musiq",
           "--steps", "2", "--size", "256x256", "--no-memory", "--peak-runs", "1", "--json", str(result_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    assert report["directory_precision"] == {"runtime": "int8", "fp32": "fp32"}
    fractions = report["fraction_of_peak"]
    assert fractions["unet_step"]["runtime"]["peak"] == "ort-cpu int8"
    assert fractions["unet_step"]["fp32"]["peak"] == "ort-cpu f32"
    assert fractions["musiq"]["runtime"]["peak"] == "ort-cpu f32"
    graphs = report["accuracy"]["graphs"]
    assert all(g["finite"] for g in graphs.values()) and graphs["musiq"]["max_abs"] == 0
    assert graphs["unet"]["psnr_db"] is not None and graphs["unet"]["max_abs"] > 0  # really quantized
    assert "ort-cpu int8 ms" in result.stdout and "not an int8 one" not in result.stdout


def test_peaks_only_and_kernel_shapes(tmp_path, monkeypatch):
    """--peaks-only builds nothing; the measured shapes follow the hyper-parameters (sd21: 320 ch at 64²,
    640 at 32², 1280 at 16² for a 512x512 image)."""
    from adaptbir.benchmarks.bench import main
    from adaptbir.benchmarks.peaks import CHAIN, unet_kernels
    from adaptbir.export.config import load_config

    kernels = unet_kernels(load_config("sd21").to_dict(), (512, 512))
    assert [k.name for k in kernels if k.op == "conv"] == ["conv3x3 320ch 64x64", "conv3x3 640ch 32x32",
                                                           "conv3x3 1280ch 16x16"]
    assert [k.name for k in kernels if k.op == "matmul"] == ["matmul 4096x320x1280", "matmul 1024x640x2560",
                                                             "matmul 256x1280x5120"]
    assert kernels[0].flops == CHAIN * 2 * 9 * 320 * 320 * 64 * 64
    result_file = tmp_path / "peaks.json"
    monkeypatch.chdir(tmp_path)  # a build would write engines/ here
    assert main(["--config", str(MICRO), "--peaks-only", "--size", "256x256", "--peak-runs", "2", "--threads", "1",
                 "--json", str(result_file)]) == 0
    report = json.loads(result_file.read_text())
    assert "stages" not in report and report["settings"]["peaks_only"] is True
    assert not list(tmp_path.glob("engines"))  # nothing built
    peaks = report["peaks"]
    assert peaks["kernels"]["conv3x3 8ch 32x32"]["op"] == "conv"  # the micro model: 8 channels
    assert all(v > 0 for v in peaks["peak_gflops"].values()) and "ort-cpu int8" in peaks["peak_gflops"]


def test_side_peak_keys():
    from adaptbir.benchmarks.peaks import side_peak_key

    assert side_peak_key("openvino", "fp32", "bf16", "unet_step") == "openvino bf16"
    assert side_peak_key("openvino", "fp32", "f32", "decoder") == "openvino f32"
    assert side_peak_key("ort-cpu", "fp32", "fp32", "loop") == "ort-cpu f32"
    assert side_peak_key("openvino", "int8", "bf16", "unet_step") == "openvino int8"
    assert side_peak_key("ort-cpu", "int8", "int8", "e2e") == "ort-cpu int8"
    assert side_peak_key("openvino", "fp32", "bf16", "musiq") == "openvino f32"  # MUSIQ computes in f32


@pytest.mark.parametrize("args, message", [
    (["--compare", "int8"], "--compare int8 and --int8-engines DIR go together"),
    (["--int8-engines", "X"], "--compare int8 and --int8-engines DIR go together"),
    (["--compare", "torch"], "--compare torch needs --preset"),
    (["--compare", "openvino", "--backend", "openvino"], "choose another --backend"),
])
def test_bench_refusals(micro_engines, capsys, args, message):
    from adaptbir.benchmarks.bench import main

    assert main(["--engines", str(micro_engines), "--no-memory", *args]) == 2
    assert message in capsys.readouterr().err
