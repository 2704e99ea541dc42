"""benchmarks/gpu_check.py --dry-run: every path of the GPU check that a CPU can run (tiny preset, 128x128)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("dual_encoder", "unet_step", "loop", "decoder", "e2e")


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "r.json"
    # From another directory: the script must import adaptbir from the repository by itself.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["errors"] == {}
    assert "--dry-run" in report["command"]
    assert Path(report["adaptbir_resolved"]) == (REPO / "export").resolve()

    acc = report["accuracy"]
    assert [r["t"] for r in acc["results"]] == [999, 500, 0]
    for r in acc["results"]:
        assert r["nonfinite_fp16"] == r["nonfinite_fp32"] == 0
        assert 0 < r["max_abs"] < 0.1 and r["psnr_db"] > 40
    assert {"dual_encoder.z_restore", "dual_encoder.z_identity", "decoder"} <= acc["vae"].keys()

    eager = report["latency"]["eager"]
    for stage in STAGES:
        entry = eager[stage]
        assert isinstance(entry["median_ms"], float) and entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
    assert eager["loop_check"]["final_latent_finite"] is True
    assert report["latency"]["eager_fp32"]["unet_step"]["median_ms"] > 0

    graphs = report["latency"]["cuda_graphs"]
    assert graphs["status"] == "skipped: no CUDA"
    assert graphs["emulated_check"] == {"loop_max_abs": 0.0, "e2e_max_abs": 0.0}  # static-buffer bookkeeping

    flops = report["flops"]["stages"]
    assert all(flops[s] > 0 for s in STAGES)
    assert flops["loop"] == report["settings"]["steps"] * flops["unet_step"]
    assert flops["e2e"] == flops["dual_encoder"] + flops["loop"] + flops["decoder"]
    throughput = report["throughput"]
    assert throughput["peak_tflops"] == 989.4 and throughput["e2e_lower_bound_ms"] > 0
    assert throughput["stages"]["e2e"]["eager"]["tflops"] > 0

    env = report["environment"]
    assert env["torch"] and env["python"] and env["date_utc"] and env["cuda_available"] in (True, False)
    assert report["musiq"]["status"] == "measured" or report["musiq"]["status"].startswith("not measured")
    assert "result: OK" in proc.stdout and "fp16 vs fp32" in proc.stdout


def test_device_loop_matches_the_runtime_sampler():
    """The on-device loop of the check is runtime/sampler.py's `sample` (same eps model, same noise)."""
    import importlib.util

    import numpy as np
    import torch

    from adaptbir.export.config import load_config
    from adaptbir.export.model import AdaptBIR, Capabilities
    from adaptbir.runtime.sampler import Schedule, sample

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    torch.manual_seed(0)
    model = AdaptBIR(load_config("tiny"), Capabilities(has_musiq=False, has_text_encoder=False)).eval()
    with torch.no_grad():
        work = gpu_check.Workload(torch, model, torch.float32, "cpu", (128, 128), 4, seed=3)
        ours = work.loop().numpy()
        noise = work.noise().numpy()

        def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            return work.unet(torch.from_numpy(x), torch.from_numpy(t), work.context, work.cond, work.w).numpy()

        theirs = sample(eps, noise[0], Schedule.create(4), lambda i: noise[i + 1])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
