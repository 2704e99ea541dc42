"""What each backend is: where it computes, in what precision, how it holds the weights, what it can serve.

Pure data, importable without ONNX Runtime, OpenVINO or TensorRT (the planner asks it before any engine is
loaded); the sessions themselves are made in `backends.py`, which dispatches on `Backend.runtime`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import Manifest


class Device(Enum):
    CPU = "CPU"
    NVIDIA = "NVIDIA GPU"


class Runtime(Enum):
    """What makes a backend's sessions."""

    ONNX_RUNTIME = "ONNX Runtime"
    OPENVINO = "OpenVINO"
    TENSORRT_PLANS = "TensorRT plans"  # the directory's own plans (`adaptbir-export trt`), run by polygraphy


DEFAULT_BACKEND = "ort-cpu"  # exact (the golden tolerances): the default, and the baseline of `adaptbir-export check`
CPU_PRECISIONS = ("bf16", "f32")  # OpenVINO's inference precisions (INFERENCE_PRECISION_HINT)
DEFAULT_WEIGHT_FACTOR = 1.05  # a precision not measured: about the graph files' size
GPU_ORT = "replace the CPU wheel: pip uninstall onnxruntime && pip install onnxruntime-gpu"
GPU_EXTRA = "pip install 'adaptbir[gpu]'"
OPENVINO_EXTRA = "pip install 'adaptbir[openvino]'"


@dataclass(frozen=True)
class Backend:
    """One backend's facts; `BACKENDS` holds the registered ones."""

    name: str
    device: Device
    help: str  # one line, for `--backend`
    runtime: Runtime | None  # None: the engines make their own sessions (see `describe`)
    install: str  # what to install where it is missing (`backend_status`)
    missing: str = ""  # the one-line error when a session cannot be made for want of `install`
    providers: tuple[str, ...] = ()  # ONNX Runtime's execution providers, the backend's own first
    cpu_precisions: tuple[str, ...] = ()  # precisions to choose from (--cpu-precision); () = the directory's own
    # Resident host bytes per graph-file byte, by compute precision, or by "compute/directory" precision where the
    # directory's matters (fitted on measured peaks: benchmarks/README.md, "Restore memory"); devices hold none.
    weight_factors: Mapping[str, float] = field(default_factory=dict, hash=False)
    runtime_bytes: int = 0  # host bytes its runtime holds beside the weights once graphs are compiled (fitted)
    predicts_memory: bool = True  # False: device memory is not modelled, the planner takes the pixel rule

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_factors", MappingProxyType(dict(self.weight_factors)))

    @property
    def on_device(self) -> bool:
        return self.device is not Device.CPU

    @property
    def chooses_precision(self) -> bool:
        """Whether it computes in a chosen CPU precision (`--cpu-precision`) rather than the directory's."""
        return bool(self.cpu_precisions)

    @property
    def runs_plans(self) -> bool:
        """Whether it runs the directory's TensorRT plans, which serve only their profile's shapes."""
        return self.runtime is Runtime.TENSORRT_PLANS

    def host_weight_bytes(self, graph_bytes: int, precision: str, directory_precision: str | None = None) -> int:
        """Host memory held for `graph_bytes` of graph files computed in `precision`, read from a directory of
        `directory_precision` (the manifest's; None: as if its precision were the compute precision or fp32),
        with what the backend's runtime holds beside them (`runtime_bytes`)."""
        if self.on_device:
            return 0
        return self.weight_bytes(graph_bytes, precision, directory_precision) + self.runtime_bytes

    def weight_bytes(self, graph_bytes: int, precision: str, directory_precision: str | None = None) -> int:
        """The weights alone of `host_weight_bytes` (by `weight_factors`), without `runtime_bytes`."""
        factors = self.weight_factors
        factor = factors.get(f"{precision}/{directory_precision}", factors.get(precision, DEFAULT_WEIGHT_FACTOR))
        return int(graph_bytes * factor)

    def musiq_token_limit(self, manifest: Manifest) -> int | None:
        """The most MUSIQ tokens it serves for this directory; None = bounded only by memory."""
        return manifest.musiq.n_max if self.runs_plans else None

    def usable_with(self, manifest: Manifest) -> bool:
        """Whether the directory holds what it runs (TensorRT plans for `trt`; the graphs serve the others)."""
        return not self.runs_plans or manifest.tensorrt is not None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("ort-cpu", Device.CPU, "ONNX Runtime in the directory's precision, exact", Runtime.ONNX_RUNTIME,
            install="pip install adaptbir", providers=("CPUExecutionProvider",),
            weight_factors={"fp32": 1.05,
                            "fp16": 3.5,  # no fp16 kernels on the CPU: every weight becomes fp32 at load
                            # Fitted on the peak of an sd21 hybrid int8 512x512 restore (3 254 MiB from 1 463 MiB
                            # of graphs): 1.09 at load, the rest the QDQ decoder's activation copies, which the
                            # fp32 activation terms do not count.
                            "int8": 1.69}),
    Backend("openvino", Device.CPU, "OpenVINO, bf16 where the CPU has it", Runtime.OPENVINO,
            install=OPENVINO_EXTRA, missing=f"backend openvino needs OpenVINO: {OPENVINO_EXTRA}",
            cpu_precisions=CPU_PRECISIONS,
            # Every weight held twice, as the model compiled from (f16 in bf16: backends.weights_in_f16; fp32 in f32)
            # and as the plugin's packed copy in the compute precision: per byte of an fp16 directory, twice that.
            # Fitted on the peaks of sd21 512x512 restores, bf16 and f32 from the fp32 and the fp16 directory (6 620,
            # 12 359, 6 638, 9 703 MiB; re-measured within 0.2 %), with the plan's OpenVINO terms (runtime/memory.py):
            # MUSIQ (fp32 in every directory, f32 on every backend) by the f32 factor, the other graphs by these.
            weight_factors={"bf16": 1.04, "f32": 2.03, "bf16/fp16": 2.08, "f32/fp16": 3.08,
                            # An int8 directory (QDQ): the int8 source constants beside the plugin's compiled copy;
                            # fitted on sd21 hybrid int8 512x512 restores (4 401 MiB int8+bf16, 4 569 int8+f32).
                            "bf16/int8": 2.64, "f32/int8": 2.69},
            # The plugin's kernels and per-node state of the four compiled graphs beside their weights: fitted on the
            # tiny engines' peaks (20 MiB of weights; 316 MiB measured graph by graph, three quarters the UNet's).
            runtime_bytes=285 * 2**20),
    Backend("ort-cuda", Device.NVIDIA, "ONNX Runtime's CUDA provider", Runtime.ONNX_RUNTIME, install=GPU_ORT,
            missing=f"backend ort-cuda: this onnxruntime has no CUDA provider; {GPU_ORT}",
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"), predicts_memory=False),
    Backend("ort-trt", Device.NVIDIA, "ONNX Runtime's TensorRT provider", Runtime.ONNX_RUNTIME, install=GPU_ORT,
            missing=f"backend ort-trt: this onnxruntime has no TensorRT provider; {GPU_ORT} and install TensorRT "
                    f"({GPU_EXTRA})",
            providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
            predicts_memory=False),
    Backend("trt", Device.NVIDIA, "the directory's TensorRT plans, built by adaptbir-export trt",
            Runtime.TENSORRT_PLANS, install=GPU_EXTRA,
            missing=f"backend trt needs TensorRT and polygraphy: {GPU_EXTRA}", predicts_memory=False),
)}


def describe(name: str) -> Backend:
    """The description of backend `name`. Engines outside the registry (the export's torch engines, which make
    their own sessions) are described as a CPU backend whose memory is modelled with unmeasured weights."""
    return BACKENDS.get(name) or Backend(name, Device.CPU, "", None, install="")


def backend_help() -> str:
    """`--backend`'s help: one clause per backend."""
    return "; ".join(f"{b.name}: {b.help} ({b.device.value})" for b in BACKENDS.values())


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """`--backend` and `--cpu-precision`: shared by `adaptbir restore`, `adaptbir plan` and `adaptbir-ray
    restore`, so a plan is made for the backend the restore runs on."""
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS, help=backend_help())
    parser.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                        help="openvino: compute in bf16 or f32 (default bf16 where the CPU has it; MUSIQ always f32)")
