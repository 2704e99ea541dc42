"""The build's own machinery: streamed fp16 weights, the staged engine directory, freeing weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaptbir.export import onnx_export
from adaptbir.export.onnx_export import ExportedGraph, fp16_weights, run_onnx
from adaptbir.runtime.atomic import staged_directory


def _graph_with_external_weights(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """softmax(x @ w) @ v + b (Softmax is kept fp32 by the block list), the weights stored as exporter-style
    external files; b holds values the fp16 conversion clamps."""
    rng = np.random.default_rng(0)
    w, v = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    b = rng.standard_normal(64).astype(np.float32)
    b[:3] = [1e-9, -1e-9, 2e5]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="logits"),
             helper.make_node("Softmax", ["xw"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["pv"], name="mix"),
             helper.make_node("Add", ["pv", "b"], ["y"], name="bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (v, "v"), (b, "b"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "g.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return path, w, b


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_fp16_weights_are_converted_while_streamed(tmp_path):
    source, w, b = _graph_with_external_weights(tmp_path)
    graph = ExportedGraph.load(source)
    assert all(not t.raw_data for t in graph.proto.graph.initializer if t.name in "wb")  # weights stayed on disk
    keep = graph.to_fp16()
    assert keep["Softmax"] == ["softmax"]
    out = tmp_path / "out"
    out.mkdir()
    assert graph.save(out / "g.onnx") is None  # small: one self-contained file
    saved = _weights(out / "g.onnx")
    assert saved["b"].dtype == np.float16
    assert np.array_equal(saved["b"].view(np.uint16), fp16_weights(b).view(np.uint16))
    assert saved["b"][2] == np.float16(onnx_export.FP16_MAX_FINITE) and saved["b"][0] > 0 > saved["b"][1]
    assert saved["w"].dtype == np.float16 and np.abs(saved["w"] - w).max() < 4e-3
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    (y16,) = run_onnx(out / "g.onnx", {"x": x})
    (y32,) = run_onnx(source, {"x": x})
    assert y16.dtype == np.float32
    assert np.abs(y16 - y32)[:, 3:].max() < 2e-2 and np.abs(y16[:, 2] - 1e4 - (y32[:, 2] - 2e5)).max() < 8


def test_large_graphs_get_one_external_data_file(tmp_path, monkeypatch):
    source, w, b = _graph_with_external_weights(tmp_path)
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 64 * 1024**2 + 1000)  # anything above 1000 bytes
    out = tmp_path / "out"
    out.mkdir()
    assert ExportedGraph.load(source).save(out / "g.onnx") == "g.onnx.data"
    assert sorted(os.listdir(out)) == ["g.onnx", "g.onnx.data"]
    saved = _weights(out / "g.onnx")
    assert np.array_equal(saved["w"], w) and np.array_equal(saved["b"], b)


def test_inline_weights_are_moved_out_of_the_graph(tmp_path):
    source, w, _ = _graph_with_external_weights(tmp_path)
    inline = tmp_path / "inline"
    inline.mkdir()
    onnx.save_model(onnx.load(str(source)), inline / "g.onnx")  # what the exporter writes under 2 GB
    graph = ExportedGraph.load(inline / "g.onnx")
    assert {t.name for t in graph.proto.graph.initializer if t.raw_data} == {"b"}  # 256 bytes: stays inline
    assert (inline / "g.onnx.weights").is_file()
    out = tmp_path / "out"
    out.mkdir()
    graph.save(out / "g.onnx")
    assert np.array_equal(_weights(out / "g.onnx")["w"], w)


# -------------------------------------------------------------------------------------- staged directory


def _is_engine_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _old_engine_dir(path: Path) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text("old")
    (path / "unet.onnx").write_text("old unet")
    return path


def test_staged_directory_replaces_the_old_one_on_success(tmp_path):
    out = _old_engine_dir(tmp_path / "engines")
    with staged_directory(out, _is_engine_dir) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".engines.building-")
        (staging / "manifest.json").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["engines"]
    assert os.listdir(out) == ["manifest.json"] and (out / "manifest.json").read_text() == "new"


def test_staged_directory_keeps_the_old_one_on_failure(tmp_path):
    out = _old_engine_dir(tmp_path / "engines")
    with pytest.raises(KeyboardInterrupt), staged_directory(out, _is_engine_dir) as staging:
        (staging / "manifest.json").write_text("half")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["engines"]
    assert (out / "manifest.json").read_text() == "old" and (out / "unet.onnx").read_text() == "old unet"


def test_staged_directory_leaves_nothing_when_the_first_build_fails(tmp_path):
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "new", _is_engine_dir):
        raise RuntimeError("parity failed")
    assert os.listdir(tmp_path) == []


def test_staged_directory_never_replaces_a_foreign_folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError), staged_directory(photos, _is_engine_dir):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError), staged_directory(tmp_path / "file", _is_engine_dir):
        pass
    assert (photos / "holiday.jpg").read_bytes() == b"precious"
    with staged_directory(tmp_path / "empty", _is_engine_dir) as staging:  # an empty folder may be filled
        (staging / "manifest.json").write_text("new")


def test_abandoned_staging_of_a_killed_build_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".engines.building-{dead.stdout.strip()}"
    abandoned.mkdir()
    (abandoned / "unet.onnx.data").write_bytes(b"x" * 100)
    live = tmp_path / f".engines.building-{os.getppid()}"  # a build still running elsewhere: left alone
    live.mkdir()
    with staged_directory(tmp_path / "engines", _is_engine_dir) as staging:
        (staging / "manifest.json").write_text("new")
    assert sorted(os.listdir(tmp_path)) == sorted(["engines", live.name])
