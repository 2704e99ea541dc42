"""The TensorRT build path, everything that does not need a GPU: sizes, profiles, cache keys, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import pytest

from adaptbir.export import tensorrt as trt_build
from adaptbir.export.tensorrt import ImageProfile, input_shapes, parse_size, plan_key, profile_from_args
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.graphs import GRAPHS


@pytest.mark.parametrize("text,size", [("512x512", (512, 512)), ("768X1024", (768, 1024)), (" 64 x 128 ", (64, 128))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text,message", [("500x512", "multiples of 64"), ("512", "not HxW"), ("0x64", "positive"),
                                          ("axb", "not HxW")])
def test_parse_size_errors(text, message):
    with pytest.raises(AdaptBIRError, match=message):
        parse_size(text)


def test_profiles_from_arguments():
    assert profile_from_args("512x512", None, None, None) == ImageProfile((512, 512), (512, 512), (512, 512), 1)
    p = profile_from_args(None, "512x512", "768x768", "1024x1536", batch=2)
    assert (p.min, p.opt, p.max, p.batch) == ((512, 512), (768, 768), (1024, 1536), 2)
    for args, message in [(("512x512", "512x512", None, None), "not both"),
                          ((None, "512x512", None, "1024x1024"), "all three"),
                          ((None, "1024x1024", "512x512", "2048x2048"), "must grow"),
                          ((None, None, None, None), "all three")]:
        with pytest.raises(AdaptBIRError, match=message):
            profile_from_args(*args)


def test_input_shapes_resolve_every_symbolic_dimension():
    profile = ImageProfile((512, 512), (512, 768), (1024, 1024), batch=2)
    unet = input_shapes(GRAPHS["unet"].spec.resolved(C=1024), profile, n_max=4289)
    assert unet["x"] == ((1, 4, 64, 64), (1, 4, 64, 96), (2, 4, 128, 128))
    assert unet["t"] == ((1,), (1,), (2,))
    assert unet["context"] == ((1, 77, 1024), (1, 77, 1024), (2, 77, 1024))
    assert input_shapes(GRAPHS["dual_encoder"].spec, profile, 4289)["image"][2] == (2, 3, 1024, 1024)
    assert input_shapes(GRAPHS["decoder"].spec, profile, 4289)["latent"][0] == (1, 4, 64, 64)
    musiq = input_shapes(GRAPHS["musiq"].spec, profile, n_max=4289)
    assert musiq["patches"] == ((1, 193 + 256, 3072), (1, 193 + 384, 3072), (2, 4289, 3072))
    assert musiq["mask"][1] == (1, 193 + 384)


def test_plan_key_changes_with_every_ingredient():
    shapes = input_shapes(GRAPHS["decoder"].spec, ImageProfile((512, 512), (512, 512), (512, 512)), 4289)
    base = plan_key("a" * 64, shapes, "11.0.0", "9.0")
    assert base == plan_key("a" * 64, dict(shapes), "11.0.0", "9.0")
    other_shapes = input_shapes(GRAPHS["decoder"].spec, ImageProfile((512, 512), (512, 512), (1024, 1024)), 4289)
    variants = [plan_key("b" * 64, shapes, "11.0.0", "9.0"), plan_key("a" * 64, other_shapes, "11.0.0", "9.0"),
                plan_key("a" * 64, shapes, "11.1.0", "9.0"), plan_key("a" * 64, shapes, "11.0.0", "8.9"),
                plan_key("a" * 64, shapes, "11.0.0", "9.0", flags=("STRONGLY_TYPED", "SPARSE_WEIGHTS"))]
    assert len({base, *variants}) == 6


def test_without_tensorrt_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as when it is not installed
    with pytest.raises(AdaptBIRError, match=r"TensorRT is not installed: install the gpu extra"):
        trt_build.import_tensorrt()


def test_without_gpu_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setattr(trt_build.shutil, "which", lambda name: None)
    with pytest.raises(AdaptBIRError, match="no NVIDIA GPU found"):
        trt_build.gpu_compute_capability()


def test_trt_command_fails_cleanly_on_this_machine(tiny_engines, tmp_path):
    """End to end through the CLI: a real engine directory, no TensorRT here → exit 2 and one line."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_engines, out)
    result = subprocess.run([sys.executable, "-m", "adaptbir.export.cli", "trt", "--engines", str(out),
                             "--shape", "512x512"], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptbir-export: error: ")
    assert ("TensorRT is not installed" in lines[0]) or ("no NVIDIA GPU" in lines[0])


def test_fake_tensorrt_reaches_the_gpu_check(tiny_engines, tmp_path, monkeypatch):
    """With TensorRT importable but no GPU, the error names the GPU (checked before any build)."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_engines, out)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0"))
    monkeypatch.setattr(trt_build, "gpu_compute_capability",
                        lambda: (_ for _ in ()).throw(AdaptBIRError("no NVIDIA GPU found (test)")))
    with pytest.raises(AdaptBIRError, match="no NVIDIA GPU found"):
        list(trt_build.build_plans(out, ImageProfile((512, 512), (512, 512), (512, 512))))


def test_plans_are_recorded_through_the_manifest_and_stale_ones_removed(tiny_engines, tmp_path, monkeypatch):
    """The builder's bookkeeping with TensorRT's build faked: plans listed and hashed, the manifest valid,
    plans of an old profile unlisted and deleted, up-to-date plans reused."""
    from adaptbir.runtime.manifest import load_manifest

    out = tmp_path / "engines"
    shutil.copytree(tiny_engines, out)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0"))
    monkeypatch.setattr(trt_build, "gpu_compute_capability", lambda: "9.0")
    monkeypatch.setattr(trt_build, "_build_plan", lambda trt, path, shapes, gib, timing_cache: (
        f"plan of {path.name} for {sorted(shapes.items())}".encode()))
    small, large = ImageProfile((512, 512), (512, 512), (512, 512)), ImageProfile((512, 512), (768, 768), (1024, 1024))
    assert all("built" in line for line in trt_build.build_plans(out, small))
    first = load_manifest(out)
    plans = {name: first.plan_path(name) for name in first.graphs}
    assert all(p is not None and p.is_file() and p.name in first.files for p in plans.values())
    assert all(line.endswith("up to date") for line in trt_build.build_plans(out, small))
    assert all("built" in line for line in trt_build.build_plans(out, large))
    second = load_manifest(out)
    assert not any(p.exists() or p.name in second.files for p in plans.values())
    assert second.tensorrt.profile["max"] == "1024x1024" and len(second.tensorrt.plans) == len(second.graphs)


def test_plan_is_built_through_polygraphy(tmp_path, monkeypatch):
    """What reaches polygraphy's loaders: a strongly typed network from the ONNX path, one profile with every
    input's (min, opt, max), the workspace limit, and one timing cache loaded before and saved after."""
    import polygraphy.backend.trt as pg_trt

    seen = {}

    def network(path, strongly_typed=None):
        seen["network"] = (path, strongly_typed)
        return "network"

    def config(profiles, load_timing_cache, memory_pool_limits):
        seen["config"] = (profiles, load_timing_cache, memory_pool_limits)
        return "config"

    def build(net, config, save_timing_cache):
        seen["build"] = (net, config, save_timing_cache)
        return b"serialized plan"

    monkeypatch.setattr(pg_trt, "NetworkFromOnnxPath", network)
    monkeypatch.setattr(pg_trt, "CreateConfig", config)
    monkeypatch.setattr(pg_trt, "engine_bytes_from_network", build)
    trt = types.SimpleNamespace(MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    profile = ImageProfile((512, 512), (512, 768), (1024, 1024), batch=2)
    shapes = input_shapes(GRAPHS["decoder"].spec, profile, n_max=4289)
    plan = trt_build._build_plan(trt, tmp_path / "decoder.onnx", shapes, 2.0, tmp_path / "timing.cache")
    assert plan == b"serialized plan"
    assert seen["network"] == (str(tmp_path / "decoder.onnx"), True)
    (profile,), cache, limits = seen["config"]
    assert cache == str(tmp_path / "timing.cache") and limits == {"workspace": 2 * 2**30}
    latent = profile["latent"]
    assert (tuple(latent.min), tuple(latent.opt), tuple(latent.max)) == ((1, 4, 64, 64), (1, 4, 64, 96),
                                                                         (2, 4, 128, 128))
    assert seen["build"] == ("network", "config", str(tmp_path / "timing.cache"))


def test_trt_session_reuses_one_runner_and_copies_outputs(tmp_path, monkeypatch):
    """TrtSession over polygraphy's TrtRunner (faked here: no GPU): activated once, one call per run, outputs
    in the description's order and copied out of the runner's reused buffers."""
    import numpy as np
    import polygraphy.backend.trt as pg_trt

    from adaptbir.runtime.backends import TrtSession

    runners = []

    class FakeRunner:
        def __init__(self, engine, name=None):
            self.engine, self.activations, self.calls = engine, 0, 0
            self.buffers = {"z_restore": np.zeros(3, np.float32), "z_identity": np.zeros(3, np.float32)}
            runners.append(self)

        def activate(self):
            self.activations += 1

        def infer(self, feeds, check_inputs=True):
            self.calls += 1
            for i, buffer in enumerate(self.buffers.values()):
                buffer[:] = feeds["image"].sum() + i  # written in place, as TrtRunner reuses its host buffers
            return self.buffers

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0"))
    monkeypatch.setattr(pg_trt, "TrtRunner", FakeRunner)
    monkeypatch.setattr(pg_trt, "EngineFromBytes", lambda data: ("engine", data))
    (tmp_path / "dual.plan").write_bytes(b"plan")
    session = TrtSession(tmp_path / "dual.plan", ["z_identity", "z_restore"])
    first = session.run({"image": np.ones(2, np.float32)})
    second = session.run({"image": np.full(2, 5, np.float32)})
    (runner,) = runners
    assert runner.engine == ("engine", b"plan") and runner.activations == 1 and runner.calls == 2
    assert [a.tolist() for a in first] == [[3, 3, 3], [2, 2, 2]]  # not overwritten by the second call
    assert [a.tolist() for a in second] == [[11, 11, 11], [10, 10, 10]]


def test_trt_backend_without_tensorrt_is_one_line(tmp_path, monkeypatch):
    from adaptbir.runtime.backends import BackendError, TrtSession

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"pip install 'adaptbir\[gpu\]'"):
        TrtSession(tmp_path / "x.plan", ["eps"])
