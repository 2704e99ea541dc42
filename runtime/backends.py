"""Execution backends and the `Engines` set that runs the graphs of one engine directory.

`ort-cpu` (default), `openvino`, `ort-cuda`, `ort-trt` (ONNX Runtime's CUDA / TensorRT execution providers)
and `trt` (our own TensorRT plans, run by polygraphy), each described in `backend.py`. Sessions are created
once, when the directory is loaded, and reused; ONNX Runtime sessions may be run from several threads at
once. A backend that is not available fails in one line naming what to install. The GPU backends are
written against the documented APIs and are not validated on hardware (docs/backends.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .backend import BACKENDS, CPU_PRECISIONS, Backend, Runtime
from .errors import EngineError
from .graphs import GRAPHS, GraphSpec
from .manifest import Manifest, load_manifest


class BackendError(EngineError):
    """A backend is not available on this machine."""


class Session(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtSession:
    """One graph on ONNX Runtime. `shared_arena`: allocate from the process's one CPU arena (the runtime,
    which calls graphs again and again); without it memory goes back after every call (a one-off run)."""

    def __init__(self, path: Path, providers: list, threads: int | None, shared_arena: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Not ORT_ENABLE_ALL: its CPU layout pass took 19 s (fp32) and 33 s (fp16) to load the sd21 UNet
        # against 3.4 s and 2.2 s, for a step time within the noise (8.2 vs 8.4 s; 9.1 vs 9.4 s median).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if shared_arena:
            _share_cpu_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
            options.enable_mem_pattern = False  # a pattern block per run would double the arena's peak
        else:
            options.enable_cpu_mem_arena = False
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"ONNX Runtime cannot load {path}: {err}") from err
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._outputs, feeds)


_ARENA_LOCK = threading.Lock()
_ARENA_REGISTERED = False


def _share_cpu_arena(ort) -> None:
    """One CPU arena for every ONNX Runtime session of the process, grown by what is requested.

    Without an arena each large tensor (the N² attention scores) is a fresh mapping whose pages fault in
    on every call: measured, that was a third of a tiny restore at 512 px and half of an untiled one at
    1024x768. An arena per session would hold every graph's peak at once; shared, the process holds about
    its largest single call (+0.2 GiB measured on sd21 at 512 px)."""
    global _ARENA_REGISTERED
    with _ARENA_LOCK:
        if _ARENA_REGISTERED:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        _ARENA_REGISTERED = True


def cache_root() -> Path:
    """Per-user cache folder of compiled engines (TensorRT's, through ONNX Runtime): never inside an engine
    directory, which may be read-only."""
    if os.environ.get("ADAPTBIR_CACHE_DIR"):
        return Path(os.environ["ADAPTBIR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptbir"


def openvino_core():
    try:
        import openvino
    except ImportError as err:
        raise BackendError(BACKENDS["openvino"].missing) from err
    return openvino.Core()


def openvino_precision(core, requested: str | None) -> str:
    """bf16 where the CPU has bf16 arithmetic (OpenVINO's OPTIMIZATION_CAPABILITIES), else f32."""
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if requested is None:
        return "bf16" if "BF16" in capabilities else "f32"
    if requested not in CPU_PRECISIONS:
        raise BackendError(f"CPU precision {requested!r}: choose one of {', '.join(CPU_PRECISIONS)}")
    if requested == "bf16" and "BF16" not in capabilities:
        raise BackendError(f"CPU precision bf16: this CPU has no bf16 arithmetic (OpenVINO reports {capabilities}); "
                           "use --cpu-precision f32")
    return requested


def cpu_precision(backend: str, requested: str | None, core=None) -> str | None:
    """The CPU precision `backend` computes in (OpenVINO: bf16 where the CPU has it, else f32; `requested`
    checked); None for a backend that computes in the directory's precision, which refuses a request."""
    if not BACKENDS[backend].chooses_precision:
        if requested is not None:
            choosers = ", ".join(b.name for b in BACKENDS.values() if b.chooses_precision)
            raise BackendError(f"a CPU precision ({requested}) applies to the {choosers} backend only, not {backend}")
        return None
    return openvino_precision(core or openvino_core(), requested)


class OpenVinoSession:
    """One graph on OpenVINO's CPU plugin, compiled for the static shapes of each call.

    A compiled model per input shape, the most recent `MAX_SHAPES` kept (tiling uses a few tile shapes). Every
    call gets its own infer request, so one session serves several threads at once.

    Memory (measured on `sd21`, benchmarks/README.md, "OpenVINO memory"): a compiled model keeps the model it was
    compiled from (the CPU plugin holds it) beside its own packed copy of the weights, so the weights are prepared
    to be held once in f16 before compiling (`weights_in_f16`): the UNet holds 5.4 GiB, not 8.5, from an fp32 or
    an fp16 directory. Every shape is compiled from the one prepared model, whose weights the compiled models
    share: a second shape adds the packed copy only (2.8 GiB, not 5.4). A compiled model also keeps its
    intermediate buffers after a call; the sessions of one `Engines` share an `OpenVinoMemory`, which frees them
    when another graph's call starts, so that, as with ONNX Runtime's shared arena, only the running graph holds
    its buffers. No compiled-model cache (CACHE_DIR): measured, it saved 4 s of the UNet's 17 s first call and
    held 2.3 GiB more meanwhile (the cached model beside the prepared one).
    """

    MAX_SHAPES = 4

    def __init__(self, core, path: Path, precision: str, threads: int | None, memory: OpenVinoMemory | None = None):
        self._core, self._path, self.precision = core, path, precision
        read_openvino_model(core, path, mapped=True)  # at load, so an unreadable graph fails here, in one line
        release_freed_memory()
        self._config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = str(threads)
        self._model = None  # prepared at the first call; every shape is compiled from it, sharing its weights
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._memory = memory or OpenVinoMemory()

    def _compiled_for(self, feeds: dict[str, np.ndarray]):
        key = tuple(sorted((name, array.shape) for name, array in feeds.items()))
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            import openvino

            if self._model is None:
                self._model = prepared_openvino_model(self._core, self._path, self.precision)
            self._model.reshape({name: openvino.PartialShape(list(shape)) for name, shape in key})
            try:
                compiled = self._core.compile_model(self._model, "CPU", self._config)
            except Exception as err:
                raise EngineError(f"OpenVINO cannot compile {self._path} for {dict(key)}: "
                                  f"{str(err).splitlines()[0]}") from err
            release_freed_memory()
            self._compiled[key] = compiled
            if len(self._compiled) > self.MAX_SHAPES:
                self._compiled.popitem(last=False)
            return compiled

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._memory.call(self):
            compiled = self._compiled_for(feeds)
            results = compiled.create_infer_request().infer(feeds)
            return [np.array(results[output]) for output in compiled.outputs]  # copies out of the request

    def release_buffers(self) -> None:
        """Free every compiled model's intermediate buffers (OpenVINO allocates them again at the next call)."""
        with self._lock:
            for compiled in self._compiled.values():
                compiled.release_memory()


class OpenVinoMemory:
    """The sessions of one `Engines` on OpenVINO: when a call starts, the other sessions that hold intermediate
    buffers and run no call free them. Measured on `sd21` at 512x512: the dual encoder's 0.19 GiB, MUSIQ's 0.09,
    the UNet's 0.06 and the decoder's 0.38 would otherwise all stay held; freeing costs one allocation per graph
    and switch (a restore runs each graph in one stretch: MUSIQ, encoder, UNet steps, decoder)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[OpenVinoSession, int] = {}

    @contextlib.contextmanager
    def call(self, session: OpenVinoSession):
        with self._lock:
            for other, running in list(self._running.items()):
                if other is not session and not running:
                    other.release_buffers()
                    del self._running[other]
            self._running[session] = self._running.get(session, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[session] -= 1


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`; nothing elsewhere). Reading and
    compiling a graph frees many blocks below glibc's mapping threshold, which the heap would otherwise keep:
    0.5 GiB after loading sd21's graphs, measured."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def read_openvino_model(core, path: Path, mapped: bool):
    """The graph at `path`, its weights memory-mapped or read into memory; one line when it cannot be read."""
    try:
        return core.read_model(str(path), config={"ENABLE_MMAP": mapped})
    except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
        raise EngineError(f"OpenVINO cannot read {path}: {str(err).splitlines()[0]}") from err


WEIGHT_OPERATIONS = ("Convolution", "GroupConvolution", "MatMul")  # whose input 1 is a weight
FP16_MAX = 65504.0
# The run-time attribute that marks the Convert of a compressed weight (OpenVINO's `mark_as_decompression`, as its
# fp16-compressed IR has it): the CPU plugin then keeps the f16 constant and packs its own copy from it, where an
# unmarked Convert is folded into an f32 copy of the weight. Not in the Python API; tests/test_openvino_memory.py
# checks on the compiled model that the plugin still reads it.
DECOMPRESSION = "decompression_0"


def prepared_openvino_model(core, path: Path, precision: str):
    """The graph at `path` as every session compiles it for `precision`: weights held in f16 (`weights_in_f16`).
    bf16 reads the weights into memory rather than mapping them: `weights_in_f16` frees each fp32 weight as its
    f16 copy replaces it, where every mapped page read would stay resident until the last one is freed (7.4 GiB
    for a moment on sd21's UNet, against 5.4 held after)."""
    model = read_openvino_model(core, path, mapped=precision != "bf16")
    weights_in_f16(model, precision)
    return model


def weights_in_f16(model, precision: str) -> None:
    """Prepare a read graph so that OpenVINO holds its weights in f16 before compiling it for `precision`: an fp16
    graph (our fp16 directories) becomes an f32 graph whose f16 constants stay f16 behind a decompression Convert
    (the form of OpenVINO's own compressed models; read as is, the plugin converts every f16 weight to an f32 copy);
    in bf16, each fp32 weight (a constant read only as input 1 of a convolution or matmul, within f16's range) is
    replaced by its f16 rounding the same way; the other fp32 constants (timestep frequencies, norm scales) stay.
    Each replaced constant is freed as the walk passes it (the walk holds one node at a time)."""
    import openvino
    import openvino.opset13 as ops

    f16, f32 = openvino.Type.f16, openvino.Type.f32
    nodes = model.get_ordered_ops()
    nodes.reverse()
    while nodes:
        node = nodes.pop()
        kind = node.get_type_name()
        if kind == "Convert" and node.get_output_element_type(0) == f16:  # fp16 graph: its casts to f16 go
            source = node.input_value(0)
            node.output(0).replace(source if source.get_element_type() == f32 else ops.convert(source, f32).output(0))
        elif kind == "Constant" and node.get_output_element_type(0) == f16:
            _decompressed(node, node)
        elif kind == "Constant" and precision == "bf16" and _is_weight(node):
            data = node.get_data()
            if data.size and max(float(data.max()), -float(data.min())) <= FP16_MAX:
                _decompressed(node, ops.constant(data.astype(np.float16)))
            del data
    model.validate_nodes_and_infer_types()


def _is_weight(node) -> bool:
    import openvino

    targets = node.output(0).get_target_inputs()
    return node.get_output_element_type(0) == openvino.Type.f32 and bool(targets) and all(
        t.get_index() == 1 and t.get_node().get_type_name() in WEIGHT_OPERATIONS for t in targets)


def _decompressed(constant, half) -> None:
    """Feed `constant`'s readers from the f16 constant `half` through a marked decompression Convert to f32."""
    import openvino
    import openvino.opset13 as ops

    targets = list(constant.output(0).get_target_inputs())
    convert = ops.convert(half, openvino.Type.f32)
    convert.get_rt_info()[DECOMPRESSION] = ""
    for target in targets:
        target.replace_source_output(convert.output(0))


def ort_providers(backend: Backend, cache_key: str) -> list:
    """ONNX Runtime's providers for `backend`, its own first; one line naming what to install when this
    onnxruntime lacks it."""
    import onnxruntime as ort

    if backend.providers[0] not in ort.get_available_providers():
        raise BackendError(backend.missing)
    return [_provider_options(provider, backend, cache_key) for provider in backend.providers]


def _provider_options(provider: str, backend: Backend, cache_key: str) -> str | tuple[str, dict]:
    if provider != "TensorrtExecutionProvider":
        return provider
    cache = cache_root() / backend.name / cache_key  # never inside the engine directory, which stays closed
    return provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                      "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}


def backend_status() -> dict[str, str]:
    """One line per backend: available (and in what precision), or what to install."""
    return {name: _status(backend) for name, backend in BACKENDS.items()}


def _status(backend: Backend) -> str:
    if backend.runtime is Runtime.OPENVINO:
        try:
            core = openvino_core()
            import openvino
        except BackendError:
            return f"not installed: {backend.install}"
        bf16 = openvino_precision(core, None) == "bf16"
        return (f"available (OpenVINO {openvino.get_version().split('-')[0]}; default precision "
                f"{'bf16: this CPU has bf16 arithmetic' if bf16 else 'f32: no bf16 on this CPU'})")
    if backend.runtime is Runtime.TENSORRT_PLANS:
        try:
            import tensorrt
        except ImportError:
            return f"not available: {backend.install}"
        return f"available (TensorRT {tensorrt.__version__}; needs plans: adaptbir-export trt)"
    import onnxruntime as ort

    if backend.providers[0] not in ort.get_available_providers():
        return f"not available: {backend.install}"
    if backend.on_device:
        return "available"
    return f"available (ONNX Runtime {ort.__version__}; the directory's precision)"


class TrtSession:
    """A TensorRT plan run by polygraphy's `TrtRunner`, like TensorRT's demo `Engine`: one execution context
    and one CUDA stream for the session's life, device buffers allocated on the first call of a shape and
    reused by later calls (grown, never freed per call). Calls are serialised (one context); outputs are
    copied out of the runner's reused host buffers.
    """

    def __init__(self, plan: Path, outputs: list[str]):
        try:
            import tensorrt  # noqa: F401  (polygraphy imports it lazily; fail here, in one line)
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError as err:
            raise BackendError(BACKENDS["trt"].missing) from err
        from polygraphy.exception import PolygraphyException

        self._outputs = outputs
        self._runner = TrtRunner(EngineFromBytes(plan.read_bytes()), name=plan.name)
        try:
            self._runner.activate()
        except PolygraphyException as err:
            raise EngineError(f"TensorRT cannot load {plan}: {str(err).splitlines()[0]}; rebuild it with "
                              "`adaptbir-export trt`") from err
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            outputs = self._runner.infer(feeds, check_inputs=False)
            return [np.array(outputs[name]) for name in self._outputs]


def _validate_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> None:
    names = [t.name for t in spec.inputs]
    if sorted(feeds) != sorted(names):
        raise EngineError(f"{spec.name}: inputs {sorted(feeds)} given, the graph takes {names}")
    for t in spec.inputs:
        array = feeds[t.name]
        if array.dtype != np.dtype(t.dtype) or array.ndim != len(t.dims):
            raise EngineError(f"{spec.name}.{t.name}: expected {t.dtype} {list(t.dims)}, got {array.dtype} "
                              f"{list(array.shape)}")
        for got, want in zip(array.shape, t.dims, strict=True):
            if isinstance(want, int) and got != want:
                raise EngineError(f"{spec.name}.{t.name}: expected shape {list(t.dims)}, got {list(array.shape)}")


class Engines:
    """The graphs of one engine directory on one backend; `run` validates feeds and checks outputs.

    `precision` is OpenVINO's inference precision (bf16 or f32; default bf16 where the CPU has it); the
    other backends compute in the directory's own precision. MUSIQ always runs in f32, so the gates do not
    depend on the backend's precision.
    """

    def __init__(self, manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None,
                 precision: str | None = None):
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.manifest, self.backend, self.threads = manifest, backend, threads  # the name: records, `Result`
        self._core = openvino_core() if BACKENDS[backend].runtime is Runtime.OPENVINO else None
        self._openvino_memory = OpenVinoMemory()  # shared by its OpenVINO sessions
        self.cpu_precision = cpu_precision(backend, precision, self._core)
        self.specs = {name: manifest.graph(name) for name in manifest.graphs}
        self.sessions: dict[str, Session] = {name: self._session(name) for name in self.specs}

    @classmethod
    def load(cls, directory: str | Path, backend: str = "ort-cpu", threads: int | None = None,
             verify: bool = True, precision: str | None = None) -> Engines:
        return cls(load_manifest(directory, verify=verify), backend, threads, precision)

    @property
    def backend_description(self) -> Backend:
        """What the backend is (`backend.py`); `backend` stays its name, as records write it."""
        return BACKENDS[self.backend]

    @property
    def compute_precision(self) -> str:
        """What the UNet, encoders and decoder compute in on this backend: the directory's precision, or the CPU
        precision a backend chooses (OpenVINO: bf16, f32); an int8 directory's quantized layers run int8
        kernels and its other ops (normalisation, attention, element-wise) that precision: "int8+bf16"."""
        if self.cpu_precision is None:
            return self.manifest.precision
        return f"int8+{self.cpu_precision}" if self.manifest.precision == "int8" else self.cpu_precision

    def _session(self, name: str) -> Session:
        runtime = self.backend_description.runtime
        if runtime is Runtime.TENSORRT_PLANS:
            plan = self.manifest.plan_path(name)
            if plan is None:
                raise BackendError(f"backend {self.backend}: {self.manifest.directory} has no TensorRT plan for "
                                   f"{name}; build them with `adaptbir-export trt --engines DIR --shape HxW`")
            return TrtSession(plan, [t.name for t in self.specs[name].outputs])
        if runtime is Runtime.OPENVINO:
            precision = "f32" if _fp32_only(name) else self.cpu_precision
            return OpenVinoSession(self._core, self.manifest.path(name), precision, self.threads,
                                   self._openvino_memory)
        # TensorRT's engine caches live per user, keyed by the graph's files' sha256 (listed, so checked at load).
        shas = "".join(self.manifest.files[f].sha256 for f in self.manifest.graphs[name].files)
        key = hashlib.sha256(shas.encode()).hexdigest()[:32]
        return OrtSession(self.manifest.path(name), ort_providers(self.backend_description, key), self.threads)

    def has(self, name: str) -> bool:
        return name in self.sessions

    def run(self, name: str, feeds: dict[str, np.ndarray], timings: dict[str, float] | None = None
            ) -> list[np.ndarray]:
        spec = self.specs.get(name)
        if spec is None:
            raise EngineError(f"{self.manifest.directory} has no {name} graph")
        _validate_feeds(spec, feeds)
        start = time.perf_counter()
        outputs = self.sessions[name].run(feeds)
        if timings is not None:
            timings["engine_s"] = timings.get("engine_s", 0.0) + time.perf_counter() - start
        precision = "fp32" if _fp32_only(name) else self.compute_precision
        check_finite(name, outputs, (t.name for t in spec.outputs), precision)
        return outputs


def _fp32_only(graph: str) -> bool:
    """Whether a graph computes in f32 on every backend (MUSIQ: the gates must not depend on the precision)."""
    return graph in GRAPHS and GRAPHS[graph].fp32_only


def check_finite(graph: str, outputs: list[np.ndarray], names: Iterable[str], precision: str) -> None:
    """Outputs with NaN/inf are an error that says what to try: for reduced precision (fp16, bf16) the fp32
    directory; in fp32 the weights or the inputs (the arguments are bounded, so a NaN there is not theirs)."""
    for name, array in zip(names, outputs, strict=True):
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            hint = ("an fp32 overflow or NaN weights: check the checkpoint the directory was built from"
                    if precision in ("fp32", "f32") else
                    f"an {precision} overflow?; try the fp32 engine directory (adaptbir-export build --precision "
                    "fp32)" + (" or --cpu-precision f32" if precision.endswith("bf16") else ""))
            raise EngineError(f"{graph} produced {bad} NaN/inf value(s) in '{name}' ({hint})")
