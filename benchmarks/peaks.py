"""What the machine and the model could do at best: FLOPs per stage, and the CPU's peaks measured in the same
run with each backend's own kernels at the UNet's shapes (`machine_peaks`), or as square matmuls (`matmul_peak`,
beside torch for `--compare torch`)."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .stages import StageRunner

KERNEL_LEVELS = 3  # UNet levels whose shapes are measured (sd21 at 512x512: 320 ch 64², 640 ch 32², 1280 ch 16²)
CHAIN = 4  # kernels in a row per measured graph: the layout reorders at its two ends weigh little
FF_MULT = 4  # the transformer feed-forward's inner width, × channels (export/attention.py)


def meta_model(manifest):
    """The torch modules of a directory's hyper-parameters on the meta device: shapes without weights or
    arithmetic, for counting FLOPs and parameters of any directory at any size. None where torch is not
    installed."""
    try:
        import torch
    except ImportError:
        return None
    from adaptbir.export.config import config_from_dict
    from adaptbir.export.model import AdaptBIR

    config = config_from_dict(manifest.hyperparameters, name=manifest.name)
    with torch.device("meta"):
        return AdaptBIR(config, dataclasses.replace(manifest.capabilities, has_text_encoder=False)).eval()


def stage_flops(model, runner: StageRunner) -> dict[str, float]:
    """FLOPs of each graph's torch module on the benchmark inputs (torch's FlopCounterMode), the inputs moved
    to the model's device (the meta device: `meta_model`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adaptbir.export.model import DecoderGraph, DualEncoderGraph, MusiqGraph, UNetGraph

    device = next(model.parameters()).device

    def count(module, *inputs) -> float:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*(torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in inputs))
        return float(counter.get_total_flops())

    f = runner.unet_feeds
    flops = {
        "dual_encoder": count(DualEncoderGraph(model), runner.image),
        "unet_step": count(UNetGraph(model), f["x"], f["t"], f["context"], f["cond"], f["w"]),
        "decoder": count(DecoderGraph(model), runner.latent),
    }
    if model.musiq is not None and runner.pipeline.engines.has("musiq"):
        m = runner.musiq_feeds
        flops["musiq"] = count(MusiqGraph(model.musiq), m["patches"], m["spatial_idx"], m["scale_idx"], m["mask"])
    flops["loop"] = flops["unet_step"] * runner.steps
    flops["e2e"] = sum(flops.get(s, 0.0) for s in ("musiq", "dual_encoder", "loop", "decoder"))
    return flops


# ------------------------------------------------------------------------------ kernels at the UNet's shapes


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One measured graph: CHAIN 3×3 convolutions C→C (padding 1) on a [1, C, H, W] map, or CHAIN matmuls of
    the transformer's feed-forward on [H·W, C] tokens (C→4C, 4C→C, ...); constant weights, as in the UNet."""

    op: str  # "conv" or "matmul"
    channels: int
    height: int
    width: int

    @property
    def name(self) -> str:
        c, h, w = self.channels, self.height, self.width
        return f"conv3x3 {c}ch {h}x{w}" if self.op == "conv" else f"matmul {h * w}x{c}x{FF_MULT * c}"

    @property
    def flops(self) -> float:
        c, pixels = self.channels, self.height * self.width
        return float(CHAIN * 2 * pixels * c * c * (9 if self.op == "conv" else FF_MULT))

    def input_shape(self) -> list[int]:
        return [1, self.channels, self.height, self.width] if self.op == "conv" else [
            self.height * self.width, self.channels]

    def weight_shapes(self) -> list[tuple[int, ...]]:
        c = self.channels
        return [(c, c, 3, 3)] if self.op == "conv" else [(c, FF_MULT * c), (FF_MULT * c, c)]

    def onnx(self, int8: bool) -> bytes:
        """The graph; `int8`: QDQ form (uint8 activations, int8 weights, QuantizeLinear/DequantizeLinear around
        every kernel, as a QDQ-quantized model has them), which ONNX Runtime and OpenVINO fuse into int8 kernels."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        nodes, inits = [], []

        def const(name: str, array: np.ndarray) -> str:
            inits.append(numpy_helper.from_array(array, name))
            return name

        def node(op: str, inputs: list[str], output: str, **attrs) -> str:
            nodes.append(helper.make_node(op, inputs, [output], **attrs))
            return output

        if int8:  # activations ~N(0, 1) (variance-preserving weights): [-4, 4] in 255 levels
            qa = [const("a_scale", np.array(8 / 255, np.float32)), const("a_zero", np.array(128, np.uint8))]
            w_zero = const("w_zero", np.array(0, np.int8))
        x = "x"
        for i in range(CHAIN):
            shape = self.weight_shapes()[i % len(self.weight_shapes())]
            std = 1 / np.sqrt(np.prod(shape[1:]) if self.op == "conv" else shape[0])
            if int8:
                levels = rng.integers(-127, 128, shape, dtype=np.int8)  # uniform: std 127/√3
                w_scale = const(f"w{i}_scale", np.array(std * np.sqrt(3) / 127, np.float32))
                w = node("DequantizeLinear", [const(f"w{i}", levels), w_scale, w_zero], f"w{i}_dq")
                x = node("DequantizeLinear", [node("QuantizeLinear", [x, *qa], f"q{i}"), *qa], f"dq{i}")
            else:
                w = const(f"w{i}", (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32))
            if self.op == "conv":
                x = node("Conv", [x, w], f"y{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            else:
                x = node("MatMul", [x, w], f"y{i}")
        if int8:
            x = node("DequantizeLinear", [node("QuantizeLinear", [x, *qa], "q_out"), *qa], "dq_out")
        node("Identity", [x], "y")
        graph = helper.make_graph(nodes, self.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    self.input_shape())],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()


def unet_kernels(hyperparameters: dict[str, Any], size: tuple[int, int]) -> list[Kernel]:
    """The UNet's convolution shapes at its first KERNEL_LEVELS levels for an image of `size` (H, W), and its
    feed-forward matmul at those of them with attention; from the directory's hyper-parameters."""
    unet = hyperparameters["unet"]
    factor = 2 ** (len(hyperparameters["vae"]["ch_mult"]) - 1)  # the latent's down-sampling
    kernels = []
    for level, mult in enumerate(unet["channel_mult"][:KERNEL_LEVELS]):
        ds = 2**level
        h, w = -(-size[0] // (factor * ds)), -(-size[1] // (factor * ds))
        channels = unet["model_channels"] * mult
        kernels.append(Kernel("conv", channels, h, w))
        if ds in unet["attention_resolutions"]:
            kernels.append(Kernel("matmul", channels, h, w))
    return kernels


def peak_key(backend: str, precision: str) -> str:
    """The peak a side computing in `precision` on `backend` is measured against: "openvino bf16", "ort-cpu f32"."""
    return f"{backend} {'f32' if precision in ('fp32', 'f32') else precision}"


STAGE_GRAPHS = {"musiq": "musiq", "dual_encoder": "dual_encoder", "unet_step": "unet", "loop": "unet",
                "decoder": "decoder"}


def side_peak_key(backend: str, directory_precision: str | None, compute_precision: str, stage: str) -> str:
    """The peak a stage is measured against: its backend's int8 kernels for an int8 directory, else those of
    the precision it computes in; f32 for a graph that computes in f32 everywhere (MUSIQ)."""
    from adaptbir.runtime.graphs import GRAPHS

    graph = GRAPHS.get(STAGE_GRAPHS.get(stage, ""))
    if graph is not None and graph.fp32_only:
        return peak_key(backend, "f32")
    return peak_key(backend, "int8" if directory_precision == "int8" else compute_precision)


def openvino_config(precision: str, threads: int | None, **extra: str) -> dict[str, str]:
    """The compile configuration of the openvino backend (runtime/backends.py) without its cache folder."""
    return {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            **({"INFERENCE_NUM_THREADS": str(threads)} if threads else {}), **extra}


def ort_runner(model: bytes, threads: int | None) -> Callable[[dict[str, np.ndarray]], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def openvino_runner(model: bytes, precision: str, threads: int | None) -> Callable[[dict[str, np.ndarray]], object]:
    import openvino

    core = openvino.Core()
    request = core.compile_model(core.read_model(model), "CPU", openvino_config(precision, threads)
                                 ).create_infer_request()
    return request.infer


def _kernel_sides(threads: int | None) -> list[tuple[str, bool, Callable[[bytes], Callable]]]:
    """(peak key, int8 graph, runner factory) for every backend/precision this machine has."""
    sides = [(peak_key("ort-cpu", "f32"), False, lambda m: ort_runner(m, threads)),
             (peak_key("ort-cpu", "int8"), True, lambda m: ort_runner(m, threads))]
    try:
        from adaptbir.runtime.backends import openvino_core, openvino_precision

        default = openvino_precision(openvino_core(), None)  # bf16 where the CPU has it, else f32
    except Exception:  # OpenVINO not installed: ONNX Runtime's peaks only
        return sides
    for precision in dict.fromkeys(("f32", default)):
        sides.append((peak_key("openvino", precision), False, lambda m, p=precision: openvino_runner(m, p, threads)))
    # the QDQ graph under the backend's default hint: its convolutions and matmuls run in int8 either way
    sides.append((peak_key("openvino", "int8"), True, lambda m: openvino_runner(m, default, threads)))
    return sides


def machine_peaks(kernels: list[Kernel], threads: int | None, runs: int = 5,
                  progress: Callable[[str], None] = lambda text: print(f"  {text}", file=sys.stderr)
                  ) -> dict[str, Any]:
    """GFLOP/s of every kernel on every backend/precision (median over `runs` after one unmeasured call, in
    which OpenVINO and ONNX Runtime pick and prepare their kernels); a backend/precision's peak is its best
    kernel's median."""
    measured: dict[str, dict[str, Any]] = {}
    for key, int8, make in _kernel_sides(threads):
        measured[key] = {}
        for kernel in kernels:
            feeds = {"x": np.random.default_rng(1).standard_normal(kernel.input_shape(), dtype=np.float32)}
            run = make(kernel.onnx(int8))
            run(feeds)
            rates = [kernel.flops / timed(lambda r=run, f=feeds: r(f)) / 1e9 for _ in range(runs)]
            measured[key][kernel.name] = {"gflops_median": statistics.median(rates), "gflops": rates}
            progress(f"peak {key}, {kernel.name}: {statistics.median(rates):.1f} GFLOP/s")
            del run
    best = {key: max(by_kernel.items(), key=lambda kv: kv[1]["gflops_median"]) for key, by_kernel in measured.items()}
    return {
        "runs": runs, "threads": threads, "chain": CHAIN,
        "kernels": {k.name: {"op": k.op, "channels": k.channels, "height": k.height, "width": k.width,
                             "gflop": k.flops / 1e9} for k in kernels},
        "measured": measured,
        "peak_gflops": {key: entry["gflops_median"] for key, (_, entry) in best.items()},
        "peak_kernel": {key: name for key, (name, _) in best.items()},
    }


# ------------------------------------------------------------------------------------- square matmuls


def matmul_peak(threads: int | None, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3) -> dict[str, Any]:
    """Best achieved GFLOP/s of a square matmul on this CPU with the same thread count: fp32 through torch
    (oneDNN/MKL) and through ONNX Runtime's MatMul (MLAS, what the engines use), bf16 through torch."""
    import torch
    from onnx import TensorProto, helper

    if threads:
        torch.set_num_threads(threads)
    best: dict[str, float] = {}

    def record(key: str, n: int, fn: Callable[[], object]) -> None:
        fn()
        seconds = min(timed(fn) for _ in range(repeats))
        best[key] = max(best.get(key, 0.0), 2 * n**3 / seconds / 1e9)

    for n in sizes:
        for name, dtype in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            record(name, n, lambda a=a, b=b: torch.mm(a, b))
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
        feeds = {x: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for x in "ab"}
        run = ort_runner(model, threads)
        record("ort_fp32", n, lambda r=run, f=feeds: r(f))
        try:  # OpenVINO's bf16 MatMul (oneDNN AVX512_BF16/AMX), what the openvino backend runs on
            run = openvino_runner(model, "bf16", threads)
            record("openvino_bf16", n, lambda r=run, f=feeds: r(f))
        except ImportError:
            pass
    return {**{f"{k}_gflops": v for k, v in best.items()},
            "fp32_gflops": max(best["torch_fp32"], best["ort_fp32"]),
            "bf16_gflops": max(best["torch_bf16"], best.get("openvino_bf16", 0.0)), "sizes": list(sizes)}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
