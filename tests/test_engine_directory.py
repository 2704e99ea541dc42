"""An engine directory closed in every corner (issue 21): no ONNX construct reaches an unlisted file, the
manifest is parsed within bounds, every section the runtime reads is required and typed, each graph file is
the graph its entry declares, and the schedule holds for every step count. Each class of attack is refused
at load in one line (an `EngineError`; `adaptbir info` exits 2), never after MUSIQ and the encoder ran.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from adaptbir.runtime import cli
from adaptbir.runtime.errors import AdaptBIRError, EngineError
from adaptbir.runtime.manifest import (
    JSON_MAX_DEPTH,
    MANIFEST,
    MANIFEST_MAX_BYTES,
    FileRecord,
    Manifest,
    ScheduleConfig,
    load_manifest,
    read_manifest,
    write_json_atomic,
)
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.plan import plan_restore
from adaptbir.runtime.preprocess import plan_geometry
from adaptbir.runtime.sampler import Schedule, check_schedule


@pytest.fixture
def copied(micro_engines, tmp_path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(micro_engines, out)
    return out


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _edit(directory: Path, change: Callable[[dict], object]) -> None:
    data = _manifest(directory)
    change(data)
    write_json_atomic(directory / MANIFEST, data)


def _relist(directory: Path, *names: str) -> None:
    """Record the true size and sha256 of `names`: an attacker who controls the whole directory."""
    _edit(directory, lambda d: d["files"].update({n: FileRecord.of(directory / n).__dict__ for n in names}))


def _refused(directory: Path, *fragments: str) -> str:
    """Refused at load in one line naming every fragment; `adaptbir info` says the same and exits 2."""
    with pytest.raises(EngineError) as info:
        load_manifest(directory)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _info_refuses(directory: Path, capsys) -> str:
    assert cli.main(["info", str(directory)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptbir: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- 1. no ONNX construct reaches a file


def _external(name: str, location: str = "secret.bin", **entries: str) -> TensorProto:
    """A 4-float tensor stored externally at `location` (offset 0, length 16 unless `entries` say else)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, "offset": "0", "length": "16", **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _sparse(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(_external(name), helper.make_tensor(f"{name}_i", TensorProto.INT64, [1], [2]),
                                     [4])


def _branch(name: str, node: onnx.NodeProto | None = None, sparse: bool = False) -> onnx.GraphProto:
    """A subgraph that outputs a constant: through `node`, or a (sparse) initializer reaching the file."""
    out = f"{name}_out"
    nodes = [node] if node else [helper.make_node("Identity", [f"{name}_w"], [out])]
    graph = helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4])])
    if node is None:
        (graph.sparse_initializer if sparse else graph.initializer).append(
            _sparse(f"{name}_w") if sparse else _external(f"{name}_w"))
    return graph


def _constant(output: str, **value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], **value)


def _loop(model: onnx.ModelProto) -> None:
    body = _branch("body", sparse=True)
    body.input.extend([helper.make_tensor_value_info("i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    body.node.append(helper.make_node("Identity", ["c"], ["c_out"]))
    body.output.insert(0, helper.make_tensor_value_info("c_out", TensorProto.BOOL, []))
    model.graph.initializer.append(helper.make_tensor("trips", TensorProto.INT64, [], [1]))
    model.graph.node.append(helper.make_node("Loop", ["trips", ""], ["scan"], body=body))


def _function(model: onnx.ModelProto) -> None:
    body = _constant("f_out", value=_external("f_value"))
    model.functions.append(helper.make_function("local", "Reach", [], ["f_out"], [body],
                                                [helper.make_opsetid("", 18)]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("Reach", [], ["reached"], domain="local"))


def _training_info(model: onnx.ModelProto) -> None:
    model.training_info.add().initialization.CopyFrom(_branch("init"))


def _if(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(helper.make_tensor("flag", TensorProto.BOOL, [], [True]))
    then = _branch("then", _constant("then_out", value=_external("then_value")))
    model.graph.node.append(helper.make_node("If", ["flag"], ["chosen"], then_branch=then,
                                             else_branch=_branch("else", _constant("else_out", value_float=1.0))))


def _attribute(**value) -> Callable[[onnx.ModelProto], None]:
    return lambda model: model.graph.node.append(_constant("k", **value))


def _tensors_attribute(model: onnx.ModelProto) -> None:
    node = model.graph.node[0]
    node.attribute.append(helper.make_attribute("stowaways", [_external("t0"), _external("t1")]))


def _default_location_entry(model: onnx.ModelProto) -> None:
    """data_location DEFAULT but an external_data entry: a reader might follow it anyway."""
    tensor = _external("quiet")
    tensor.data_location = TensorProto.DEFAULT
    tensor.float_data.extend([0.0] * 4)
    model.graph.initializer.append(tensor)


CONSTRUCTS = {
    "initializer": lambda model: model.graph.initializer.append(_external("w_extra")),
    "sparse initializer": lambda model: model.graph.sparse_initializer.append(_sparse("s_extra")),
    "tensor attribute": _attribute(value=_external("k_value")),
    "sparse tensor attribute": _attribute(sparse_value=_sparse("k_sparse")),
    "tensors attribute": _tensors_attribute,
    "model-local function": _function,
    "If branch": _if,
    "Loop body (sparse)": _loop,
    "training info": _training_info,
    "external_data without EXTERNAL": _default_location_entry,
}


@contextlib.contextmanager
def _never_opened(path: Path) -> Iterator[None]:
    """`path` becomes a FIFO; whoever opens it to read blocks until a writer comes, which a watcher notices
    (a non-blocking open for writing succeeds only then), releases, and reports."""
    os.mkfifo(path)
    opened, stop = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader
                time.sleep(0.002)
                continue
            opened.set()
            os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    assert not opened.is_set(), f"{path.name} was opened"


def _rewrite(directory: Path, graph: str, change: Callable[[onnx.ModelProto], None]) -> None:
    """Change a graph file and list it with its new, true sha256."""
    path = directory / f"{graph}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    change(model)
    path.write_bytes(model.SerializeToString())
    _relist(directory, path.name)


@pytest.mark.parametrize("construct", CONSTRUCTS)
def test_no_onnx_construct_reaches_an_unlisted_file(copied, construct):
    """Through every tensor-bearing construct onnx.helper builds, a decoder that reads an unlisted file of
    the directory is refused at load, naming the graph, and the file is never opened (it is a FIFO)."""
    _rewrite(copied, "decoder", CONSTRUCTS[construct])
    with _never_opened(copied / "secret.bin"):
        with pytest.raises(EngineError) as info:
            Pipeline.from_engines(copied)
    message = str(info.value)
    assert "\n" not in message
    assert "decoder.onnx (graph decoder) references external data 'secret.bin', but its manifest entry lists None" \
        in message, message


def _with_external_data(directory: Path) -> onnx.ModelProto:
    """The decoder's weights in `decoder.onnx.data`, listed: an honest directory, which loads."""
    model = onnx.load(str(directory / "decoder.onnx"))
    onnx.save(model, str(directory / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
              size_threshold=0)
    _edit(directory, lambda d: d["graphs"]["decoder"].update(external_data="decoder.onnx.data"))
    _relist(directory, "decoder.onnx", "decoder.onnx.data")
    load_manifest(directory)
    return onnx.load(str(directory / "decoder.onnx"), load_external_data=False)


def _last_external(model: onnx.ModelProto) -> TensorProto:
    return [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL][-1]


def _set(key: str, value: str) -> Callable[[onnx.ModelProto, int], None]:
    def change(model: onnx.ModelProto, size: int) -> None:
        entries = {e.key: e for e in _last_external(model).external_data}
        entries[key].value = value.format(size=size)
    return change


def _add_entry(key: str, value: str) -> Callable[[onnx.ModelProto, int], None]:
    def change(model: onnx.ModelProto, size: int) -> None:
        entry = _last_external(model).external_data.add()
        entry.key, entry.value = key, value
    return change


@pytest.mark.parametrize("change,fragment", [
    (_set("location", "../../outside/secret.bin"), "references external data '../../outside/secret.bin'"),
    (_set("location", "./decoder.onnx.data"), "references external data './decoder.onnx.data'"),
    (_set("location", "*/_ORT_MEM_ADDR_/*"), "references external data '*/_ORT_MEM_ADDR_/*'"),
    (_add_entry("location", "other.bin"), "expected location, offset, length, checksum, each at most once"),
    (_add_entry("basepath", "/"), "with keys ['location', 'offset', 'length', 'basepath']"),
    (_set("offset", "{size}"), "of 'decoder.onnx.data', which holds"),
    (_set("length", "{size}"), "of 'decoder.onnx.data', which holds"),
    (_set("offset", "-4"), "at offset -4"),
    (_set("offset", "0x10"), "at offset 0x10"),
], ids=["dotdot", "other spelling", "ORT memory address", "second location", "unknown key", "offset beyond",
        "length beyond", "negative offset", "hex offset"])
def test_external_data_is_the_listed_file_within_its_size(copied, change, fragment):
    model = _with_external_data(copied)
    size = (copied / "decoder.onnx.data").stat().st_size
    change(model, size)
    (copied / "decoder.onnx").write_bytes(model.SerializeToString())
    _relist(copied, "decoder.onnx")
    _refused(copied, "decoder.onnx (graph decoder) ", fragment)


def _unknown_field(model: onnx.ModelProto) -> None:
    node = model.graph.node[0]
    node.ParseFromString(node.SerializeToString() + b"\xa0\x06\x01")  # field 100, varint 1: not in onnx.proto


def _unknown_location(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    tensor.ParseFromString(tensor.SerializeToString() + b"\x70\x07")  # data_location 7: no such value


@pytest.mark.parametrize("change,fragment", [
    (lambda m: m.graph.node.append(helper.make_node("EPContext", [], ["ctx"], domain="com.microsoft", embed_mode=0,
                                                    ep_cache_context="engine.ctx")),
     "runs com.microsoft.EPContext, not a standard ONNX operator"),
    (lambda m: m.graph.node.append(helper.make_node("Hello", [], ["hi"])), "runs ai.onnx.Hello"),
    (_unknown_field, "holds a NodeProto with fields this onnx"),
    (_unknown_location, "holds a TensorProto with fields this onnx"),
], ids=["EPContext", "unknown operator", "unknown field", "unknown enum value"])
def test_graph_holds_only_what_this_check_understands(copied, change, fragment):
    """A node of another domain may be run by an execution provider that opens a file it names (EPContext);
    a field or enum value this onnx cannot read may be one a newer ONNX Runtime acts on."""
    _rewrite(copied, "decoder", change)
    _refused(copied, "decoder.onnx (graph decoder) ", fragment)


# --------------------------------------------------------------------------- 2. the manifest's JSON


def _text(change: Callable[[str], str]) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        path = directory / MANIFEST
        path.write_text(change(path.read_text()))
    return write


def _nested(depth: int) -> Callable[[Path], None]:
    return _text(lambda t: t.replace('"hyperparameters": {', '"hyperparameters": {"deep": ' + "[" * depth
                                     + "]" * depth + ", ", 1))


@pytest.mark.parametrize("attack,fragment", [
    (_text(lambda t: "[" * 100_000 + "]" * 100_000), f"nested deeper than {JSON_MAX_DEPTH} levels"),
    (_nested(JSON_MAX_DEPTH + 2), f"nested deeper than {JSON_MAX_DEPTH} levels"),
    (_text(lambda t: t.replace('"timesteps": 1000', '"timesteps": 1' + "0" * 5000)), "outside the 64-bit range"),
    (_text(lambda t: t.replace('"timesteps": 1000', f'"timesteps": {2**63}')), "outside the 64-bit range"),
    (_text(lambda t: t.replace('"linear_start": 0.00085', '"linear_start": NaN')), "NaN is not a finite number"),
    (_text(lambda t: t.replace('"linear_start": 0.00085', '"linear_start": Infinity')), "Infinity is not a finite"),
    (_text(lambda t: t.replace('"scale_factor": 0.18215', '"scale_factor": -Infinity')), "-Infinity is not a fin"),
    (_text(lambda t: t.replace('"scale_factor": 0.18215', '"scale_factor": 1e999')), "1e999 is not finite"),
    (_text(lambda t: t.replace('"precision": "fp32"', '"precision": "fp32", "precision": "fp16"', 1)),
     "key 'precision' appears twice"),
    (_text(lambda t: t.replace('"name": "', '"name": "\\ud800', 1)), "holds a lone surrogate"),
    (lambda d: (d / MANIFEST).write_bytes(b'{"name": "\xff"}'), "codec can't decode"),
    (_text(lambda t: t + " " * MANIFEST_MAX_BYTES), "is larger than 16 MiB"),
    (_text(lambda t: "[]"), "manifest schema version None"),
    (_text(lambda t: t[: len(t) // 2]), "cannot read"),
], ids=["100k nested arrays", "nested 34", "5000 digits", "2**63", "NaN", "Infinity", "-Infinity", "1e999",
        "duplicate key", "lone surrogate", "not UTF-8", "17 MiB", "not an object", "truncated"])
def test_manifest_json_is_parsed_within_bounds(copied, capsys, attack, fragment):
    attack(copied)
    _refused(copied, str(copied / MANIFEST), fragment)
    assert fragment in _info_refuses(copied, capsys)


def test_deep_manifest_is_one_line_in_a_fresh_process(copied):
    """As a user meets it: `adaptbir info` in its own process (its own recursion limit), no traceback."""
    _text(lambda t: "[" * 100_000 + "]" * 100_000)(copied)
    result = subprocess.run([sys.executable, "-m", "adaptbir.runtime.cli", "info", str(copied)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, \
        result.stderr[-2000:]
    assert "nested deeper than" in result.stderr


def test_manifest_file_follows_the_rule_of_every_file(copied, tmp_path, capsys):
    """manifest.json: a symlink staying inside the directory is followed; one leaving it, a FIFO (which
    would block the reader), a directory and a symlink loop are refused."""
    (copied / MANIFEST).rename(copied / "manifest-real.json")
    (copied / MANIFEST).symlink_to("manifest-real.json")
    assert load_manifest(copied).graphs["decoder"].file == "decoder.onnx"
    (copied / MANIFEST).unlink()
    (copied / "manifest-real.json").rename(tmp_path / "outside.json")
    (copied / MANIFEST).symlink_to(tmp_path / "outside.json")
    _refused(copied, "manifest.json leaves the engine directory", str(tmp_path / "outside.json"))
    _info_refuses(copied, capsys)
    (copied / MANIFEST).unlink()
    with _never_opened(copied / MANIFEST):
        _refused(copied, "manifest.json is not a regular file")
    (copied / MANIFEST).unlink()
    (copied / MANIFEST).mkdir()
    _refused(copied, "manifest.json is not a regular file")
    (copied / MANIFEST).rmdir()
    (copied / MANIFEST).symlink_to(MANIFEST)
    _refused(copied, "manifest.json is a symlink loop")


def test_listed_file_in_a_symlink_loop_is_refused(copied):
    (copied / "decoder.onnx").unlink()
    (copied / "decoder.onnx").symlink_to("decoder.onnx")
    _refused(copied, "decoder.onnx is a symlink loop")


# ------------------------------------------------------------- 3. every section the runtime reads


def _drop(*path: str | int) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path
        for key in parents:
            data = data[key]
        del data[last]
    return change


def _put(value: object, *path: str | int) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path
        for key in parents:
            data = data[key]
        data[last] = value
    return change


@pytest.mark.parametrize("change,fragment", [
    (_put({}, "hyperparameters"), "at hyperparameters: 'unet' is a required property"),
    (_drop("hyperparameters", "unet", "model_channels"), "at hyperparameters/unet: 'model_channels' is a required"),
    (_drop("hyperparameters", "vae"), "'vae' is a required property"),
    (_drop("hyperparameters", "musiq", "num_heads"), "'num_heads' is a required property"),
    (_put({}, "schedule"), "at schedule: 'beta_schedule' is a required property"),
    (_drop("musiq"), "'musiq' is a required property"),
    (_drop("graphs", "decoder", "parity", "max_abs"), "'max_abs' is a required property"),
    (_put(1000.0, "schedule", "timesteps"), "at schedule/timesteps: 1000.0 is not of type 'integer'"),
    (_put(0, "hyperparameters", "unet", "model_channels"), "0 is less than the minimum of 1"),
    (_put([], "hyperparameters", "vae", "ch_mult"), "at hyperparameters/vae/ch_mult: [] should be non-empty"),
    (_put("tiny", "graphs", "unet", "parity", "max_abs"), "'tiny' is not of type 'number'"),
    (_put(12, "musiq", "spatial_pos_grid_size"), "10 was expected"),
    (_put(10**9, "schedule", "timesteps"), "is greater than the maximum of 100000"),
    (_put("../../x", "name"), "at name: '../../x' does not match"),
    (_put([2, 77, 32], "context", "shape"), "at context/shape/0: 1 was expected"),
    (_put({"min": 1, "below": []}, "runtime"), "built for runtime versions 1 ≤ v < []"),
], ids=["empty hyperparameters", "no model_channels", "no vae", "no num_heads", "empty schedule", "no musiq",
        "no parity max_abs", "float timesteps", "zero channels", "empty ch_mult", "string max_abs", "grid 12",
        "1e9 timesteps", "name with a path", "context batch 2", "runtime of other types"])
def test_sections_the_runtime_reads_are_required_and_typed(copied, capsys, change, fragment):
    _edit(copied, change)
    _refused(copied, fragment)
    _info_refuses(copied, capsys)


def _leaves(value: object, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict | list):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _leaves(item, (*path, key))
    if path:
        yield path


def _positions(data: dict) -> list[tuple]:
    """One path per place in the format: list items, graphs and files alike are tried once each."""
    def general(path: tuple) -> tuple:
        return tuple("*" if isinstance(key, int) or (i == 1 and path[0] in ("graphs", "files")) else key
                     for i, key in enumerate(path))
    return list({general(path): path for path in reversed(list(_leaves(data)))}.values())


def _other_type(value: object) -> object:
    return {str: 7, bool: "yes", int: "7", float: "7.5", list: {}, dict: []}.get(type(value), "x")


def _use(manifest: Manifest) -> None:
    """What the runtime reads from a loaded manifest before and during a restore, and `adaptbir info`."""
    cli.describe_manifest(manifest)
    for size, tile in (((512, 512), None), ((1024, 768), 512)):
        try:
            plan_restore(manifest, plan_geometry(*size), tile_size=tile)
        except AdaptBIRError:  # e.g. an honest "does not fit in memory"
            pass
    for steps in {2, manifest.schedule.default_steps, manifest.max_steps}:
        Schedule.from_manifest(manifest.schedule, steps)
    for name in manifest.graphs:
        manifest.graph(name), manifest.graph_bytes(name)
    manifest.identity, manifest.referenced_files(), json.dumps(manifest.to_dict())


def test_a_manifest_that_loads_is_one_the_runtime_can_use(copied):
    """By construction rather than by list: every field of a real manifest, deleted or given a value of
    another JSON type, is either refused at load (one line) or not needed by what the runtime reads."""
    original = _manifest(copied)
    accepted = 0
    for path in _positions(original):
        for mutate in ("delete", "retype"):
            data = copy.deepcopy(original)
            *parents, last = path
            parent = data
            for key in parents:
                parent = parent[key]
            if mutate == "delete":
                del parent[last]
            else:
                parent[last] = _other_type(parent[last])
            write_json_atomic(copied / MANIFEST, data)
            try:
                manifest = read_manifest(copied)
            except EngineError as err:
                assert "\n" not in str(err)
                continue
            accepted += 1
            try:
                _use(manifest)
            except Exception as err:  # any failure names a field that should have been refused
                pytest.fail(f"{mutate} {'/'.join(map(str, path))}: loads, then {type(err).__name__}: {err}")
    assert accepted > 40  # free-form fields (checkpoint, notes, fp32_ops, ...) stay free


# ------------------------------------------------------------- 4. each graph file is the graph declared


def _rename_input(old: str, new: str) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        for value in model.graph.input:
            value.name = new if value.name == old else value.name
        for node in model.graph.node:
            node.input[:] = [new if name == old else name for name in node.input]
    return change


def _dims(value: onnx.ValueInfoProto) -> onnx.TensorShapeProto:
    return value.type.tensor_type.shape


def _retype(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE


def _rerank(model: onnx.ModelProto) -> None:
    del _dims(model.graph.input[0]).dim[-1]


def _fix_height(model: onnx.ModelProto) -> None:
    _dims(model.graph.input[0]).dim[2].dim_value = 8  # `h` fixed: every other image size would fail


def _swap_outputs(model: onnx.ModelProto) -> None:
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(reversed(outputs))


def _swap_file(directory: Path) -> None:
    shutil.copy(directory / "dual_encoder.onnx", directory / "decoder.onnx")
    _relist(directory, "decoder.onnx")


def _graph(name: str, change: Callable[[onnx.ModelProto], None]) -> Callable[[Path], None]:
    return lambda directory: _rewrite(directory, name, change)


def _manifest_change(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda directory: _edit(directory, change)


def _context_width(directory: Path) -> None:
    np.save(directory / "context.npy", np.zeros((1, 77, 16), np.float32))
    _relist(directory, "context.npy")
    _edit(directory, _put([1, 77, 16], "context", "shape"))


def _declared_width(directory: Path) -> None:
    _context_width(directory)
    _edit(directory, _put(["B", 77, 16], "graphs", "unet", "inputs", 2, "shape"))


@pytest.mark.parametrize("attack,fragment", [
    (_graph("decoder", _rename_input("latent", "z")),
     "decoder.onnx (graph decoder) does not match its manifest entry: inputs ['z'], expected ['latent']"),
    (_manifest_change(_put("z", "graphs", "decoder", "inputs", 0, "name")),
     "graph decoder: inputs ['z'], expected ['latent']"),
    (_graph("decoder", _retype), "input 'latent' is float64 ['B', 4, 'h', 'w'], expected float32"),
    (_manifest_change(_put("int64", "graphs", "unet", "inputs", 4, "dtype")), "input 'w' is int64 ['B'], expected "),
    (_graph("decoder", _rerank), "input 'latent' is float32 ['B', 4, 'h'], expected float32 ['B', 4, 'h', 'w']"),
    (_graph("decoder", _fix_height), "input 'latent' is float32 ['B', 4, 8, 'w']"),
    (_graph("dual_encoder", _swap_outputs), "outputs ['z_identity', 'z_restore'], expected ['z_restore', 'z_"),
    (_swap_file, "decoder.onnx (graph decoder) does not match its manifest entry: inputs ['image'], expected"),
    (_manifest_change(_put("dual_encoder.onnx", "graphs", "decoder", "file")),
     "dual_encoder.onnx (graph decoder) does not match its manifest entry"),
    (_context_width, "context shape [1, 77, 16] does not fit the UNet's context input ['B', 77, 32]"),
    (_declared_width, "unet.onnx (graph unet) does not match its manifest entry: input 'context' is float32 "
                      "['B', 77, 32], expected float32 ['B', 77, 16]"),
    (_manifest_change(lambda d: d["graphs"].update(extra=d["graphs"]["decoder"])),
     "graph 'extra' is not one this runtime runs"),
], ids=["graph input renamed", "declared input renamed", "graph dtype", "declared dtype", "graph rank",
        "graph fixes h", "graph outputs swapped", "decoder swapped for the encoder", "entry names the encoder",
        "context width", "declared context width", "unknown graph"])
def test_each_graph_is_the_graph_its_entry_declares(copied, attack, fragment):
    """Else the directory loads, and every image fails after MUSIQ and the encoder ran (or, with the
    encoder's outputs swapped, k mixes the wrong latents without any failure)."""
    attack(copied)
    _refused(copied, fragment)


# ------------------------------------------------------------------------------------ 5. the schedule


@pytest.mark.parametrize("schedule,fragment", [
    ({"linear_start": 0.012, "linear_end": 0.00085}, "need 0 < start < end < 1"),
    ({"linear_end": 0.9999}, "not finite in float32"),
    ({"linear_start": 1e-300}, "alphas_cumprod is not strictly decreasing"),
    ({"timesteps": 10}, "default_steps 50 is not in 2..10"),
    ({"timesteps": 1}, "1 is less than the minimum of 2"),
    ({"default_steps": 1001}, "1001 is greater than the maximum of 1000"),
], ids=["start above end", "alphas underflow", "beta rounds to 0", "fewer timesteps than steps", "1 timestep",
        "default steps above 1000"])
def test_inconsistent_schedule_is_refused(copied, capsys, schedule, fragment):
    _edit(copied, lambda d: d["schedule"].update(schedule))
    _refused(copied, fragment)
    _info_refuses(copied, capsys)


@pytest.mark.parametrize("section,fragment", [
    (lambda d: d["musiq"], "longer_side_lengths (224,) differs from the model's [224, 384]"),
    (lambda d: d["hyperparameters"]["musiq"], "longer_side_lengths (224, 384) differs from the model's [224]"),
], ids=["limits", "model"])
def test_musiq_limits_must_be_the_models_patch_grid(copied, section, fragment):
    """The runtime cuts patches and counts tokens with the `musiq` section; the graph was built with the
    hyperparameters' grid. Stored twice, they must agree, or every score would be of the wrong patches."""
    _edit(copied, lambda d: section(d).update(longer_side_lengths=[224]))
    _refused(copied, fragment)


def test_max_steps_is_the_schedules_own_limit(copied):
    assert load_manifest(copied).max_steps == 1000
    _edit(copied, lambda d: d["schedule"].update(timesteps=40, default_steps=40))
    manifest = load_manifest(copied)
    assert manifest.max_steps == 40
    Schedule.from_manifest(manifest.schedule, 40)


@pytest.mark.parametrize("linear_end,timesteps,at_the_limit", [
    (0.012, 1000, False), (0.0988395772998, 1000, True), (0.4548697427245, 200, True), (0.0480756311672, 2000, True)])
def test_an_accepted_schedule_holds_for_every_step_count(linear_end, timesteps, at_the_limit):
    """`check_schedule` builds two schedules and vouches for every step count: verified by building each,
    at SD's schedule and at the largest linear_end it accepts (the float32 coefficients near overflow)."""
    max_steps = min(1000, timesteps)
    check_schedule(0.00085, linear_end, timesteps, max_steps)
    if at_the_limit:
        with pytest.raises(ValueError, match="not finite in float32"):
            check_schedule(0.00085, linear_end * 1.001, timesteps, max_steps)
    for steps in range(2, max_steps + 1):
        with np.errstate(over="ignore"):
            schedule = Schedule.create(steps, 0.00085, linear_end, timesteps)
            bad = [name for name, values in vars(schedule).items()
                   if values.dtype == np.float64 and not np.all(np.isfinite(values.astype(np.float32)))]
        assert not bad, (steps, bad)


# --------------------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("change,fragment", [
    (lambda m: replace(m, schedule=ScheduleConfig(timesteps=10)), "default_steps 50 is not in 2..10"),
    (lambda m: replace(m, hyperparameters={**m.hyperparameters, "eps": float("nan")}), "NaN is not a finite number"),
], ids=["schedule", "NaN"])
def test_the_builder_never_writes_what_the_runtime_refuses(copied, change, fragment):
    before = (copied / MANIFEST).read_bytes()
    with pytest.raises(EngineError, match=fragment):
        change(load_manifest(copied)).write(copied)
    assert (copied / MANIFEST).read_bytes() == before
