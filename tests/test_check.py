"""`adaptbir-export check`: every graph on two backends with the same inputs, compared by polygraphy."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from adaptbir.export import check
from adaptbir.export.cli import main as export_main


def test_openvino_f32_agrees_with_onnx_runtime(tiny_engines):
    checks = check.check_directory(tiny_engines, ["ort-cpu", "openvino"], cpu_precision="f32",
                                   progress=lambda line: None)
    assert [c.graph for c in checks] == ["dual_encoder", "unet", "decoder", "musiq"]
    for c in checks:
        tolerance = 1e-3 if c.graph == "musiq" else 1e-4
        assert c.passed and c.rule == f"max abs <= {tolerance:g}" and c.max_abs <= tolerance, c


def test_bf16_is_judged_by_the_psnr_floor(tiny_engines):
    checks = {c.graph: c for c in check.check_directory(tiny_engines, ["ort-cpu", "openvino"], cpu_precision="bf16",
                                                         progress=lambda line: None)}
    assert checks["decoder"].rule == "PSNR >= 35 dB" and checks["unet"].rule == "PSNR >= 40 dB"
    assert checks["musiq"].rule == "max abs <= 0.001"  # MUSIQ runs in f32 on every backend
    assert all(c.passed and (c.graph == "musiq" or c.psnr_db >= 40) for c in checks.values())


def test_a_backend_that_drifts_is_reported(tiny_engines, monkeypatch, capsys):
    """The comparison can fail: OpenVINO's decoder output shifted by 1e-2 is a mismatch, exit status 1."""
    infer = check.EngineRunner.infer_impl

    def drifting(self, feed_dict) -> OrderedDict:
        out = infer(self, feed_dict)
        if self.name == "openvino" and self.graph == "decoder":
            out["image"] = out["image"] + 1e-2
        return out

    monkeypatch.setattr(check.EngineRunner, "infer_impl", drifting)
    code = export_main(["check", "--engines", str(tiny_engines), "--backends", "ort-cpu,openvino",
                        "--cpu-precision", "f32"])
    printed = capsys.readouterr().out
    assert code == 1 and "3 of 4 comparisons within tolerance; mismatches: decoder on openvino" in printed
    assert "decoder        openvino     1.00e-02" in printed and "MISMATCH" in printed


def test_one_backend_is_not_a_comparison(tiny_engines, capsys):
    assert export_main(["check", "--engines", str(tiny_engines), "--backends", "ort-cpu"]) == 2
    assert "check needs two backends" in capsys.readouterr().err


def test_unavailable_backend_is_one_line(tiny_engines, capsys):
    assert export_main(["check", "--engines", str(tiny_engines), "--backends", "ort-cpu,ort-cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "onnxruntime-gpu" in err


@pytest.mark.parametrize("size", ["100x100", "512"])
def test_bad_size_is_a_usage_error(tiny_engines, size):
    with pytest.raises(SystemExit):
        export_main(["check", "--engines", str(tiny_engines), "--size", size])
