"""The backend descriptions (runtime/backend.py) and the call sites that ask them instead of comparing names."""

from __future__ import annotations

import dataclasses
import types

import pytest

from adaptbir.export import check
from adaptbir.runtime import backends
from adaptbir.runtime.backend import BACKENDS, CPU_PRECISIONS, Device, Runtime, backend_help, describe
from adaptbir.runtime.backends import BackendError, Engines
from adaptbir.runtime.errors import InputError
from adaptbir.runtime.manifest import load_manifest
from adaptbir.runtime.memory import GiB
from adaptbir.runtime.plan import plan_restore
from adaptbir.runtime.preprocess import plan_geometry

DEVICE_BACKENDS = ("ort-cuda", "ort-trt", "trt")
MiB = 2**20


@pytest.fixture(scope="module")
def manifest(tiny_engines):
    return load_manifest(tiny_engines, verify=False)


def test_the_registry_in_its_order():
    """`choices=BACKENDS` and every listing iterate the names in this order."""
    assert list(BACKENDS) == ["ort-cpu", "openvino", "ort-cuda", "ort-trt", "trt"]
    assert all(name == b.name for name, b in BACKENDS.items())
    help_text = backend_help()
    assert all(f"{name}: " in help_text for name in BACKENDS) and help_text.count("(NVIDIA GPU)") == 3


@pytest.mark.parametrize("name", list(BACKENDS))
def test_where_each_backend_computes_and_holds_its_weights(name):
    b = BACKENDS[name]
    on_device = name in DEVICE_BACKENDS
    assert b.device is (Device.NVIDIA if on_device else Device.CPU) and b.on_device == on_device
    assert b.predicts_memory == (not on_device)  # device memory is not modelled
    for precision in ("fp32", "fp16", "bf16", "f32"):
        assert (b.host_weight_bytes(10**6, precision) == 0) == on_device


def test_measured_weight_factors():
    """Resident host bytes per graph-file byte, as measured (benchmarks/README.md, "Restore memory")."""
    cpu, openvino = BACKENDS["ort-cpu"], BACKENDS["openvino"]
    assert cpu.host_weight_bytes(1000, "fp32") == 1050
    assert cpu.host_weight_bytes(1000, "fp16") == 3500  # fp16 weights become fp32 at load
    held = openvino.host_weight_bytes
    plugin = openvino.runtime_bytes  # the CPU plugin's kernels and per-node state, whatever the weights
    assert plugin == 285 * 2**20 and cpu.runtime_bytes == 0
    assert openvino.weight_bytes(1000, "bf16") == 1040  # the weights alone: what OpenVINO's stages add per graph
    assert held(1000, "bf16") == 1040 + plugin and held(1000, "f32") - plugin == pytest.approx(2030, abs=1)
    # OpenVINO holds f16 and its compute precision whatever the directory's: per byte, fp16 directories cost more
    assert held(1000, "bf16", "fp16") == 2080 + plugin > held(1000, "f32", "fp32")
    assert held(1000, "f32", "fp16") == 3080 + plugin
    assert cpu.host_weight_bytes(1000, "fp16", "fp16") == 3500  # without a pair, the compute precision's factor
    # int8 (QDQ) directories, fitted on sd21 restore peaks of the hybrid directory (benchmarks/README.md)
    assert cpu.host_weight_bytes(1000, "int8") == 1690 and held(1000, "bf16", "int8") == 2640 + plugin
    assert held(1000, "f32", "int8") - plugin == pytest.approx(2690, abs=1)
    assert held(1000, "fp16") - plugin == 1050  # a precision not measured: about the graph files' size
    with pytest.raises(TypeError):
        cpu.weight_factors["fp32"] = 1.0  # a shared description cannot be changed by one caller


def test_compute_precisions():
    assert BACKENDS["openvino"].cpu_precisions == CPU_PRECISIONS == ("bf16", "f32")
    assert [n for n, b in BACKENDS.items() if b.chooses_precision] == ["openvino"]


def test_musiq_token_limit_and_plans(manifest):
    """Only TensorRT plans have a token limit (their profile's n_max), and only they need plans."""
    limits = {name: b.musiq_token_limit(manifest) for name, b in BACKENDS.items()}
    assert limits == {"ort-cpu": None, "openvino": None, "ort-cuda": None, "ort-trt": None,
                      "trt": manifest.musiq.n_max}
    assert manifest.tensorrt is None
    assert [n for n, b in BACKENDS.items() if not b.usable_with(manifest)] == ["trt"]
    with_plans = dataclasses.replace(manifest, tensorrt=types.SimpleNamespace(plans={}))
    assert all(b.usable_with(with_plans) for b in BACKENDS.values())


def test_how_sessions_are_made():
    assert {n: b.runtime for n, b in BACKENDS.items()} == {
        "ort-cpu": Runtime.ONNX_RUNTIME, "openvino": Runtime.OPENVINO, "ort-cuda": Runtime.ONNX_RUNTIME,
        "ort-trt": Runtime.ONNX_RUNTIME, "trt": Runtime.TENSORRT_PLANS}
    assert [n for n, b in BACKENDS.items() if b.runs_plans] == ["trt"]


def test_engines_outside_the_registry_are_modelled_like_the_cpu(manifest):
    """The export's torch engines (`backend = "torch-eager"`) are planned as before: host memory, 1.05."""
    torch = describe("torch-eager")
    assert torch.name == "torch-eager" and torch.runtime is None and torch.predicts_memory
    assert torch.host_weight_bytes(1000, "fp32") == 1050 and torch.musiq_token_limit(manifest) is None
    assert describe("trt") is BACKENDS["trt"]


def test_ort_providers_follow_the_description(monkeypatch, tmp_path):
    import onnxruntime as ort

    monkeypatch.setenv("ADAPTBIR_CACHE_DIR", str(tmp_path))
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: everything)
    assert backends.ort_providers(BACKENDS["ort-cpu"], "key") == ["CPUExecutionProvider"]
    assert backends.ort_providers(BACKENDS["ort-cuda"], "key") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    (trt, options), *rest = backends.ort_providers(BACKENDS["ort-trt"], "key")
    assert trt == "TensorrtExecutionProvider" and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options["trt_engine_cache_path"] == str(tmp_path / "ort-trt" / "key") == options["trt_timing_cache_path"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match=r"^backend ort-cuda: this onnxruntime has no CUDA provider; replace the "
                                           r"CPU wheel: .* pip install onnxruntime-gpu$"):
        backends.ort_providers(BACKENDS["ort-cuda"], "key")
    with pytest.raises(BackendError, match=r"^backend ort-trt: this onnxruntime has no TensorRT provider; .*"
                                           r"onnxruntime-gpu and install TensorRT \(pip install 'adaptbir\[gpu\]'\)$"):
        backends.ort_providers(BACKENDS["ort-trt"], "key")


def test_backend_status_lines(monkeypatch):
    import sys

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as when it is not installed
    status = backends.backend_status()
    assert list(status) == list(BACKENDS)
    assert status["ort-cpu"] == f"available (ONNX Runtime {ort.__version__}; the directory's precision)"
    assert status["ort-cuda"] == "available"
    assert status["ort-trt"] == ("not available: replace the CPU wheel: pip uninstall onnxruntime && pip install "
                                 "onnxruntime-gpu")
    assert status["trt"] == "not available: pip install 'adaptbir[gpu]'"
    assert status["openvino"].startswith("available (OpenVINO ")

    def no_openvino():
        raise BackendError(BACKENDS["openvino"].missing)

    monkeypatch.setattr(backends, "openvino_core", no_openvino)
    assert backends.backend_status()["openvino"] == "not installed: pip install 'adaptbir[openvino]'"


def test_check_compares_what_is_available_and_usable(manifest, monkeypatch):
    monkeypatch.setattr(check, "backend_status", lambda: dict.fromkeys(BACKENDS, "available"))
    assert check.default_backends(manifest) == ["ort-cpu", "openvino", "ort-cuda", "ort-trt"]  # no plans: no trt
    with_plans = dataclasses.replace(manifest, tensorrt=types.SimpleNamespace(plans={}))
    assert check.default_backends(with_plans) == list(BACKENDS)
    monkeypatch.setattr(check, "backend_status", lambda: {**dict.fromkeys(BACKENDS, "not available: x"),
                                                         "ort-cpu": "available"})
    assert check.default_backends(with_plans) == ["ort-cpu"]


def _plan(manifest, h, w, backend, **options):
    return plan_restore(manifest, plan_geometry(h, w), backend=backend, **options)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_device_backends_take_the_pixel_rule(manifest, backend):
    """No memory budget decides on a device: tiles above 768x768 pixels, whatever the budget, and the weights
    are not counted in the process's memory."""
    large = _plan(manifest, 768, 1024, backend, memory_budget=1)
    assert large.tiled and large.tile_px == 512 and "device memory is not predicted" in large.reason
    small = _plan(manifest, 768, 768, backend, memory_budget=1)
    assert not small.tiled and f"{backend}: device memory is not predicted" in small.reason
    host = _plan(manifest, 768, 768, "ort-cpu", tile_size=0)
    device = _plan(manifest, 768, 768, backend, tile_size=0)
    graph_bytes = sum(manifest.graph_bytes(name) for name in manifest.graphs)
    assert host.peak_bytes - device.peak_bytes == BACKENDS["ort-cpu"].host_weight_bytes(graph_bytes, "fp32") > 0


def test_host_backends_are_planned_by_the_budget(manifest):
    for backend in ("ort-cpu", "openvino"):
        assert _plan(manifest, 768, 1024, backend, memory_budget=1 * GiB).tiled
        assert not _plan(manifest, 768, 1024, backend, memory_budget=16 * GiB).tiled
    with pytest.raises(InputError, match="even in 512 px tiles"):
        _plan(manifest, 768, 1024, "ort-cpu", memory_budget=200 * MiB)


@pytest.mark.parametrize("backend", [n for n, b in BACKENDS.items() if not b.chooses_precision])
def test_a_cpu_precision_applies_to_openvino_only(manifest, backend):
    """Refused before any session is made (so also where the GPU backends are missing)."""
    with pytest.raises(BackendError, match=rf"a CPU precision \(f32\) applies to the openvino backend only, not "
                                           rf"{backend}$"):
        Engines(manifest, backend, precision="f32")


def test_unknown_backend(manifest):
    with pytest.raises(BackendError, match=r"unknown backend 'cuda'; choose one of ort-cpu, openvino, ort-cuda, "
                                           r"ort-trt, trt$"):
        Engines(manifest, "cuda")


def test_engines_keep_the_name_and_describe_it(manifest):
    engines = Engines(manifest, "ort-cpu")
    assert engines.backend == "ort-cpu" and engines.backend_description is BACKENDS["ort-cpu"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_musiq_token_limit_is_one_decision_for_plan_and_score(manifest, backend):
    """TensorRT plans refuse tokens above n_max however much memory there is, and `adaptbir plan` says so as
    `restore` would (one function); the other backends are bounded by memory only."""
    from adaptbir.runtime.options import RestoreOptions
    from adaptbir.runtime.plan import musiq_tokens, plan_image

    n_max = manifest.musiq.n_max
    side = next(s for s in range(512, 8192, 64) if manifest.musiq.tokens(s, s) > n_max)
    below = max(s for s in range(512, side, 64) if manifest.musiq.tokens(s, s) <= n_max)
    assert musiq_tokens(manifest, backend, (below, below)) == manifest.musiq.tokens(below, below)
    if backend == "trt":
        for refuse in (lambda: musiq_tokens(manifest, backend, (side, side)),
                       lambda: plan_image(manifest, (side, side), RestoreOptions(), backend=backend)):
            with pytest.raises(InputError, match=rf"\d+ tokens, its profile serves at most {n_max}"):
                refuse()
        assert plan_image(manifest, (side, side), RestoreOptions(score=50.0), backend=backend).tokens is None
    else:
        assert musiq_tokens(manifest, backend, (side, side)) > n_max
