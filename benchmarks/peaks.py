"""What the machine and the model could do at best: FLOPs per stage and the CPU's measured matmul peak."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .stages import StageRunner


def stage_flops(model, runner: StageRunner) -> dict[str, float]:
    """FLOPs of each graph's torch module on the benchmark inputs (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adaptbir.export.model import DecoderGraph, DualEncoderGraph, MusiqGraph, UNetGraph

    def count(module, *inputs) -> float:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        return float(counter.get_total_flops())

    f = runner.unet_feeds
    flops = {
        "dual_encoder": count(DualEncoderGraph(model), runner.image),
        "unet_step": count(UNetGraph(model), f["x"], f["t"], f["context"], f["cond"], f["w"]),
        "decoder": count(DecoderGraph(model), runner.latent),
    }
    if model.musiq is not None:
        m = runner.musiq_feeds
        flops["musiq"] = count(MusiqGraph(model.musiq), m["patches"], m["spatial_idx"], m["scale_idx"], m["mask"])
    flops["loop"] = flops["unet_step"] * runner.steps
    flops["e2e"] = sum(flops.get(s, 0.0) for s in ("musiq", "dual_encoder", "loop", "decoder"))
    return flops


def matmul_peak(threads: int | None, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3) -> dict[str, Any]:
    """Best achieved GFLOP/s of a square matmul on this CPU with the same thread count: fp32 through torch
    (oneDNN/MKL) and through ONNX Runtime's MatMul (MLAS, what the engines use), bf16 through torch."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    if threads:
        torch.set_num_threads(threads)
    best: dict[str, float] = {}

    def record(key: str, n: int, fn: Callable[[], object]) -> None:
        fn()
        seconds = min(timed(fn) for _ in range(repeats))
        best[key] = max(best.get(key, 0.0), 2 * n**3 / seconds / 1e9)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for n in sizes:
        for name, dtype in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            record(name, n, lambda a=a, b=b: torch.mm(a, b))
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {x: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for x in "ab"}
        record("ort_fp32", n, lambda s=session, f=feeds: s.run(None, f))
        try:  # OpenVINO's bf16 MatMul (oneDNN AVX512_BF16/AMX), what the openvino backend runs on
            import openvino

            config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                      **({"INFERENCE_NUM_THREADS": str(threads)} if threads else {})}
            compiled = openvino.Core().compile_model(openvino.Core().read_model(model.SerializeToString()),
                                                     "CPU", config)
            request = compiled.create_infer_request()
            record("openvino_bf16", n, lambda r=request, f=feeds: r.infer(f))
        except ImportError:
            pass
    return {**{f"{k}_gflops": v for k, v in best.items()},
            "fp32_gflops": max(best["torch_fp32"], best["ort_fp32"]),
            "bf16_gflops": max(best["torch_bf16"], best.get("openvino_bf16", 0.0)), "sizes": list(sizes)}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
