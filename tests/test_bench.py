"""adaptbir-bench on the micro model (tests/micro_config.json, `--config`): every stage, the torch ratios and
the overhead are reported.

No timing thresholds here: benchmarks measure, tests check that the measurement is complete."""

from __future__ import annotations

import json
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
    assert report["memory"]["peak_rss_mib"] > 0 and report["memory"]["torch_loaded"] is False
    assert result_file.with_suffix(".png").stat().st_size > 0
    assert "runtime overhead" in result.stdout and "ratio" in result.stdout


def test_bench_fp16_accuracy_report(workdir, tmp_path):
    result_file = tmp_path / "fp16.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--config", str(MICRO), "--runs", "1", "--warmup", "0",
           "--compare", "fp16", "--stages", "unet_step", "--steps", "2", "--size", "256x256", "--no-memory",
           "--json", str(result_file)]
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


def test_bench_openvino_against_ort_cpu(workdir, tmp_path):
    result_file = tmp_path / "ov.json"
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.bench", "--config", str(MICRO), "--runs", "1", "--warmup", "0",
           "--compare", "openvino", "--cpu-precision", "bf16", "--stages", "unet_step", "--steps", "2",
           "--size", "256x256", "--json", str(result_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    assert report["sides"] == ["runtime", "ort-cpu"]
    assert report["compute_precision"] == {"runtime": "bf16", "ort-cpu": "fp32"}
    assert len(report["stages"]["unet_step"]["ratio_runtime_over_ort-cpu"]["pairs"]) == 1
    accuracy = report["accuracy"]
    assert (accuracy["subject"], accuracy["baseline"]) == ("openvino bf16", "ort-cpu fp32")
    assert accuracy["graphs"]["unet"]["psnr_db"] >= 40 and accuracy["graphs"]["dual_encoder"]["psnr_db"] >= 40
    assert accuracy["graphs"]["decoder"]["psnr_db"] >= 35 and accuracy["final_image_psnr_db"] >= 35
    assert accuracy["musiq_max_abs_shift"] <= 1e-3
    compile_times = report["openvino_compile"]
    assert compile_times["cold_first_call_s"] > 0 and compile_times["warm_first_call_s"] > 0
    assert report["memory"]["backend"] == "openvino" and report["memory"]["compute_precision"] == "bf16"
    assert report["memory_baseline"]["backend"] == "ort-cpu" and report["memory_baseline"]["peak_rss_mib"] > 0
