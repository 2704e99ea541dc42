"""Execution backends and the `Engines` set that runs the graphs of one engine directory.

`ort-cpu` (default), `ort-cuda`, `ort-trt` (ONNX Runtime's CUDA / TensorRT execution providers) and
`trt` (our own TensorRT plans). Sessions are created once, when the directory is loaded, and reused;
ONNX Runtime sessions may be run from several threads at once. A backend that is not available fails in
one line naming what to install. The GPU backends are written against the documented APIs and are not
validated on hardware (see README).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import EngineError
from .graphs import GraphSpec
from .manifest import Manifest, load_manifest

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")
GPU_ORT = "replace the CPU wheel: pip uninstall onnxruntime && pip install onnxruntime-gpu"


class BackendError(EngineError):
    """A backend is not available on this machine."""


class Session(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtSession:
    def __init__(self, path: Path, providers: list, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # No CPU arena: it keeps every tile's peak forever; freeing to the allocator bounds RSS by one call.
        options.enable_cpu_mem_arena = False
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"ONNX Runtime cannot load {path}: {err}") from err
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._outputs, feeds)


def ort_providers(backend: str, directory: Path) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    if backend == "ort-cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendError(f"backend ort-cuda: this onnxruntime has no CUDA provider; {GPU_ORT}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "TensorrtExecutionProvider" not in available:
        raise BackendError(f"backend ort-trt: this onnxruntime has no TensorRT provider; {GPU_ORT} and install "
                           "TensorRT (pip install 'adaptbir[gpu]')")
    cache = directory / "ort_trt_cache"
    trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    return [("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]


class TrtSession:
    """A TensorRT plan run through the TensorRT Python API with device buffers from cuda-python.

    Inputs are copied to the device and outputs back on every call; keeping the latent on the device
    across sampler steps is a later optimisation.
    """

    def __init__(self, plan: Path):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as err:
            raise BackendError("backend trt needs TensorRT and cuda-python: pip install 'adaptbir[gpu]'") from err
        self._trt, self._cudart = trt, cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT cannot deserialize {plan}: rebuild it with `adaptbir-export trt`")
        self._lock = threading.Lock()  # one execution context: calls are serialised
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        _, self._stream = cudart.cudaStreamCreate()

    def _check(self, result) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise EngineError(f"CUDA error {err}")
        return rest[0] if rest else None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cudart, trt = self._cudart, self._trt
        kind = cudart.cudaMemcpyKind
        with self._lock:
            buffers = []
            try:
                for name, array in feeds.items():
                    array = np.ascontiguousarray(array)
                    self._context.set_input_shape(name, array.shape)
                    ptr = self._check(cudart.cudaMalloc(array.nbytes))
                    buffers.append(ptr)
                    self._check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                                       kind.cudaMemcpyHostToDevice, self._stream))
                    self._context.set_tensor_address(name, ptr)
                outputs = []
                for name in self._outputs:
                    shape = tuple(self._context.get_tensor_shape(name))
                    dtype = trt.nptype(self._engine.get_tensor_dtype(name))
                    host = np.empty(shape, dtype=dtype)
                    ptr = self._check(cudart.cudaMalloc(max(host.nbytes, 1)))
                    buffers.append(ptr)
                    self._context.set_tensor_address(name, ptr)
                    outputs.append((host, ptr))
                if not self._context.execute_async_v3(self._stream):
                    raise EngineError("TensorRT execution failed")
                for host, ptr in outputs:
                    self._check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                                       kind.cudaMemcpyDeviceToHost, self._stream))
                self._check(cudart.cudaStreamSynchronize(self._stream))
                return [host for host, _ in outputs]
            finally:
                for ptr in buffers:
                    cudart.cudaFree(ptr)


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
    """The graphs of one engine directory on one backend; `run` validates feeds and checks outputs."""

    def __init__(self, manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None):
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.manifest, self.backend, self.threads = manifest, backend, threads
        self.specs = {name: manifest.graph(name) for name in manifest.data["graphs"]}
        self.sessions: dict[str, Session] = {name: self._session(name) for name in self.specs}

    @classmethod
    def load(cls, directory: str | Path, backend: str = "ort-cpu", threads: int | None = None,
             verify: bool = True) -> Engines:
        return cls(load_manifest(directory, verify=verify), backend, threads)

    def _session(self, name: str) -> Session:
        if self.backend == "trt":
            plan = self.manifest.data.get("tensorrt", {}).get("plans", {}).get(name)
            if not plan:
                raise BackendError(f"backend trt: {self.manifest.directory} has no TensorRT plan for {name}; "
                                   "build them with `adaptbir-export trt --engines DIR --shape HxW`")
            return TrtSession(self.manifest.directory / plan["file"])
        providers = ort_providers(self.backend, self.manifest.directory)
        return OrtSession(self.manifest.path(name), providers, self.threads)

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
        check_finite(name, outputs, (t.name for t in spec.outputs))
        return outputs


def check_finite(graph: str, outputs: list[np.ndarray], names: Iterable[str]) -> None:
    for name, array in zip(names, outputs, strict=True):
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise EngineError(
                f"{graph} produced {bad} NaN/inf value(s) in '{name}' (an fp16 overflow?); try the fp32 engine "
                "directory (adaptbir-export build --precision fp32)"
            )
