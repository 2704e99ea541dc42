"""How the openvino backend holds memory, on the tiny and micro engines: every weight once in f16 beside the
plugin's own compiled copy, from fp32 and fp16 directories alike (f32 keeps fp32 weights: exact); only weights
are compressed; a graph's intermediate buffers are freed when another graph runs; and an fp16 directory on
openvino stays within the fp16 PSNR floors of the fp32 directory on ort-cpu (the measurements behind the
design: benchmarks/README.md, "OpenVINO memory")."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from adaptbir.export.cli import main as export_main
from adaptbir.runtime import backends
from adaptbir.runtime.backends import DECOMPRESSION, Engines, OpenVinoMemory, openvino_core, weights_in_f16
from adaptbir.runtime.graphs import GRAPHS
from adaptbir.runtime.metrics import psnr
from adaptbir.runtime.pipeline import Pipeline

FINAL_IMAGE_MIN_PSNR_DB = 35.0  # a restore's uint8 image, as tests/test_openvino.py asks of bf16


@pytest.fixture(scope="module")
def tiny_fp16(reference, tmp_path_factory):
    """The golden tiny weights as an fp16 directory (tiny_engines is their fp32 directory)."""
    out = tmp_path_factory.mktemp("engines") / "tiny-fp16"
    assert export_main(["build", "--checkpoint", str(reference / "tiny_stage3.safetensors"), "--musiq",
                        str(reference / "musiq_random.safetensors"), "--preset", "tiny", "--precision", "fp16",
                        "--out", str(out)]) == 0
    return out


def _constants_held(engines: Engines, graph: str, feeds: dict[str, np.ndarray]) -> Counter:
    """Elements of the constants the compiled graph holds, by precision (the plugin's run-time model)."""
    engines.run(graph, feeds)
    (compiled,) = engines.sessions[graph]._compiled.values()
    held: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Const":
            held[info["outputPrecisions"].astype(str)] += int(np.prod(op.get_output_partial_shape(0).to_shape()))
    return held


def _unet_feeds(golden) -> dict[str, np.ndarray]:
    g = golden("unet_control")
    return {"x": g["x_t"], "t": g["t"], "context": g["context"], "cond": g["cond"], "w": g["csft_w"]}


@pytest.mark.parametrize(("directory", "precision"), [("fp32", "bf16"), ("fp16", "bf16"), ("fp16", "f32")])
def test_weights_are_held_in_f16(tiny_engines, tiny_fp16, golden, directory, precision):
    """Without the preparation the plugin folds each weight into an f32 constant (fp32 graphs in bf16, and
    every f16 weight of an fp16 graph), which it holds beside its packed copy: this fails if OpenVINO stops
    reading `DECOMPRESSION`."""
    engines = Engines.load(tiny_engines if directory == "fp32" else tiny_fp16, backend="openvino", precision=precision)
    for graph, feeds in (("unet", _unet_feeds(golden)), ("decoder", {"latent": golden("vae_decoder")["z"]})):
        held = _constants_held(engines, graph, feeds)
        assert held["f16"] > 0.95 * (held["f16"] + held["f32"]), (graph, held)  # biases and norm scales stay f32


def test_f32_keeps_the_fp32_weights(tiny_engines, golden):
    engines = Engines.load(tiny_engines, backend="openvino", precision="f32")
    held = _constants_held(engines, "decoder", {"latent": golden("vae_decoder")["z"]})
    assert held["f32"] > 0 and held["f16"] == 0


def test_only_weights_are_compressed(tiny_engines):
    """bf16 compresses the constants read only as a convolution's or matmul's weight; the timestep frequencies,
    norm scales and biases stay fp32 (as fp16 directories keep them)."""
    import openvino

    model = backends.read_openvino_model(openvino_core(), tiny_engines / "unet.onnx", mapped=False)
    weights_in_f16(model, "bf16")
    f16, f32 = openvino.Type.f16, openvino.Type.f32
    compressed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() in backends.WEIGHT_OPERATIONS:  # a weight or an activation (attention's q·kᵀ)
            weight = op.input_value(1).get_node()
            assert weight.get_type_name() != "Constant", op
            if weight.get_type_name() == "Convert" and weight.input_value(0).get_node().get_type_name() == "Constant":
                assert DECOMPRESSION in weight.get_rt_info().keys() and weight.input_value(0).get_element_type() == f16
                compressed += 1
        if op.get_type_name() in ("Sin", "Cos"):
            frequencies = [v.get_node() for v in op.input_value(0).get_node().input_values()]
            assert any(n.get_type_name() == "Constant" and n.get_output_element_type(0) == f32 for n in frequencies)
    kept = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
            and op.get_output_element_type(0) == f32]
    assert compressed > 100 and kept and all(not backends._is_weight(op) for op in kept)


def test_fp16_directory_within_the_fp16_floors(tiny_engines, tiny_fp16, golden, musiq_feeds):
    """One fp16 directory serves OpenVINO too: each graph on openvino (bf16 and f32) from the fp16 directory
    against ort-cpu on the fp32 one, by the graph's fp16 PSNR floor (runtime/graphs.py); MUSIQ (fp32 in both)
    scores the same; a restore's image within the bf16 floor."""
    ort = Engines.load(tiny_engines)
    feeds = {"unet": _unet_feeds(golden), "dual_encoder": {"image": golden("dual_encoder")["x"]},
             "decoder": {"latent": golden("vae_decoder")["z"]}}
    musiq = musiq_feeds(golden("musiq")["x_u8_a"])
    photo = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    expected = Pipeline(ort).restore(photo, seed=0, steps=20)
    for precision in ("bf16", "f32"):
        engines = Engines.load(tiny_fp16, backend="openvino", precision=precision)
        for name, graph_feeds in feeds.items():
            for got, want in zip(engines.run(name, graph_feeds), ort.run(name, graph_feeds), strict=True):
                db = psnr(got, want, float(np.ptp(want)))
                assert db is not None and db >= GRAPHS[name].spec.tolerance.fp16_min_psnr_db, (precision, name, db)
        np.testing.assert_allclose(engines.run("musiq", musiq)[0], ort.run("musiq", musiq)[0], atol=1e-4)
        result = Pipeline(engines).restore(photo, seed=0, steps=20)
        assert abs(result.score - expected.score) <= 1e-3
        db = psnr(result.image, expected.image, 255.0)
        assert db is None or db >= FINAL_IMAGE_MIN_PSNR_DB, (precision, db)


class _Session:
    def __init__(self, memory: OpenVinoMemory):
        self.memory, self.released = memory, 0

    def release_buffers(self) -> None:
        self.released += 1


def test_buffers_are_freed_when_another_graph_runs():
    memory = OpenVinoMemory()
    a, b, c = (_Session(memory) for _ in range(3))
    with memory.call(a):
        pass
    with memory.call(a):  # the same graph again (the UNet's steps, a tiled stage's tiles): kept
        assert a.released == 0
    with memory.call(b):
        assert a.released == 1
        with memory.call(c):  # b runs (another thread): its buffers stay
            assert (a.released, b.released) == (1, 0)
    with memory.call(a):
        assert (b.released, c.released) == (1, 1)
    with memory.call(b):  # c freed once: nothing to free again until it runs
        assert (a.released, c.released) == (2, 1)


def test_a_restore_frees_each_graph_before_the_next(micro_engines, threads_agree):
    """On the engines: the encoder's buffers go when the UNet starts, and so on; threads still agree."""
    engines = Engines.load(micro_engines, backend="openvino", threads=2, precision="bf16")
    freed: list[str] = []
    lock = threading.Lock()
    for name, session in engines.sessions.items():
        def release(release=session.release_buffers, name=name):
            with lock:
                freed.append(name)
            release()
        session.release_buffers = release
    pipeline = Pipeline(engines)
    pipeline.restore((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8), seed=0, steps=2)
    assert freed[:3] == ["musiq", "dual_encoder", "unet"]
    threads_agree(pipeline, [(np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8) for i in range(3)])


def test_every_shape_is_compiled_from_one_prepared_model(micro_engines, monkeypatch):
    """A second shape shares the first one's prepared weights (it adds only the plugin's packed copy): the graph
    is read and prepared once per session, whatever the shapes."""
    engines = Engines.load(micro_engines, backend="openvino", threads=2, precision="bf16")
    prepared: list[object] = []
    monkeypatch.setattr(backends, "weights_in_f16", lambda model, precision: prepared.append(model))
    for size in (64, 96):
        latent = np.zeros((1, 4, size // 8, size // 8), np.float32)
        engines.run("decoder", {"latent": latent})
    assert len(engines.sessions["decoder"]._compiled) == 2 and len(prepared) == 1


def test_ray_actors_claim_what_openvino_holds_of_an_fp16_directory(tiny_fp16):
    """adaptbir-ray sizes each actor by the plan of a 512×512 restore in the precision OpenVINO computes in (as
    `adaptbir plan` does), not the directory's: an fp16 directory's weights by OpenVINO's bf16/fp16 factor."""
    from pathlib import Path

    from adaptbir.runtime.backends import cpu_precision
    from adaptbir.runtime.batch import BatchSettings
    from adaptbir.runtime.manifest import load_manifest
    from adaptbir.runtime.options import RestoreOptions
    from adaptbir.runtime.plan import plan_image
    from adaptbir.serve.batch import smallest_restore_bytes

    manifest = load_manifest(tiny_fp16)
    settings = BatchSettings(inputs=(), out=Path("out"), engines=tiny_fp16, backend="openvino")
    claimed = smallest_restore_bytes(manifest, settings, RestoreOptions())
    options = RestoreOptions(tile_size=0)
    computed = cpu_precision("openvino", None)
    assert claimed == plan_image(manifest, (512, 512), options, backend="openvino", precision=computed).peak_bytes
    assert claimed != plan_image(manifest, (512, 512), options, backend="openvino", precision="fp16").peak_bytes
