"""Which int8 quantizer should the build use: ONNX Runtime's static QDQ quantization or NNCF? Measured on the UNet.

    python tools/int8_quantizers.py engines/tiny-random [--steps 6] [--held-out-steps 6] [--calls 9] \
        [--variants ort-hybrid ort-conv nncf-transformer nncf-hybrid nncf-cnn] [--json out/int8.json] [--keep DIR]

UNet feeds are recorded as the build records them (`record_feeds` on the calibration part of
`default_calibration().split()`, `--steps` sampling steps, at most 48, windowed to 32 latents), and
un-windowed on the held-out photos (`Recorder` around whole restores, `--held-out-steps` steps). Each
variant quantizes the fp32 `unet.onnx` in a fresh subprocess (this script with `--quantize`), which
records the quantizer's wall time and the peak RSS (VmHWM of that process, or of the child process
`quantize_graph` starts, whichever is larger; `start_rss_gib` is the RSS once the libraries, the graph and
the feeds are loaded):

  ort-hybrid        `quantize_graph(..., SCHEMES["hybrid"])`: the build's default (QDQ, MinMax, per-channel)
  ort-conv          `quantize_graph(..., SCHEMES["conv"])`
  ort-full          `quantize_graph(..., SCHEMES["full"])`
  nncf-transformer  `nncf.quantize(model, nncf.Dataset(feeds), model_type=TRANSFORMER)` (preset MIXED:
                    symmetric int8 weights, asymmetric activations; SmoothQuant on MatMuls, bias correction)
  nncf-hybrid       the same with `IgnoredScope(names=...)` = the hybrid scheme's float nodes (attention's
                    activation × activation MatMuls)
  nncf-cnn          `nncf.quantize` without a model type (preset PERFORMANCE: symmetric activations too)

Then, in this process: which nodes each graph quantized (a node reads a DequantizeLinear output; for Conv,
MatMul and Gemm both inputs) and what ONNX Runtime's CPU graph optimisation fuses them into (QLinearConv,
QLinearMatMul, MatMulIntegerToFloat, ...: `ort_kernels`); the eps PSNR of each int8 UNet against the fp32
one on the held-out feeds, worst per timestep range (the build's gate metric, on ONNX Runtime); the median
time of one UNet call on a held-out feed (middle timestep range, 64×64 latent) on ONNX Runtime CPU and on
OpenVINO CPU, in the precision the openvino backend picks on this CPU (bf16 where it has bf16) and in f32,
through the runtime's own sessions (`OrtSession`, `OpenVinoSession`), every graph called in turn in each
round (this machine is noisy: only ratios within one run count; the ratio to fp32 is the median of the
rounds' ratios, `ratio_of_min` that of the fastest calls). Per backend also the timing feed's eps PSNR
against fp32 on ONNX Runtime, and on OpenVINO how many of the compiled model's convolutions and
fully-connected layers run in u8/i8 (`get_runtime_model()`, each op's rt_info `runtimePrecision`). A graph
a backend cannot compile is recorded with the error. Prints a markdown table; `--json` writes everything.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]
VARIANTS = ("ort-hybrid", "ort-conv", "ort-full", "nncf-transformer", "nncf-hybrid", "nncf-cnn")
DEFAULT_VARIANTS = ("ort-hybrid", "ort-conv", "nncf-transformer", "nncf-hybrid")
WEIGHTED = ("Conv", "MatMul", "Gemm")  # the op types that may compute in int8 (both inputs dequantized)
OV_KERNELS = ("Convolution", "FullyConnected", "MatMul")  # OpenVINO CPU layer types of those


# ------------------------------------------------------------------------------------------ the subprocess


def _rss_gib(key: str) -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[key].split()[0]) / 2**20


def _peak_gib() -> float:
    """This process's peak RSS or its children's, whichever is larger (`quantize_graph` runs ONNX Runtime's
    quantizer in a child process of its own)."""
    return max(_rss_gib("VmHWM"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)


def quantize_child(variant: str, work: Path) -> None:
    """Quantize `work`/fp32.onnx with `variant` on `work`/calibration.pkl into `work`/`variant`.onnx; write
    `work`/`variant`.json (seconds, peak and start RSS)."""
    import onnx

    from adaptbir.export.quantize import SCHEMES, quantize_graph

    source, target = work / "fp32.onnx", work / f"{variant}.onnx"
    feeds: list[Feed] = pickle.loads((work / "calibration.pkl").read_bytes())
    if variant.startswith("ort-"):
        import onnxruntime.quantization  # noqa: F401  (loaded before `start`, as nncf is)

        start_rss = _rss_gib("VmRSS")
        began = time.perf_counter()
        quantize_graph(source, target, feeds, SCHEMES[variant.removeprefix("ort-")])
        seconds = time.perf_counter() - began
    else:
        import nncf

        model = onnx.load(str(source))
        kwargs: dict[str, Any] = {"subset_size": len(feeds)}
        if variant in ("nncf-transformer", "nncf-hybrid"):
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        if variant == "nncf-hybrid":
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=SCHEMES["hybrid"].float_nodes(model.graph))
        start_rss = _rss_gib("VmRSS")
        began = time.perf_counter()
        quantized = nncf.quantize(model, nncf.Dataset(feeds), **kwargs)
        onnx.save(quantized, str(target))
        seconds = time.perf_counter() - began
    record = {"seconds": round(seconds, 1), "peak_rss_gib": round(_peak_gib(), 2),
              "start_rss_gib": round(start_rss, 2)}
    (work / f"{variant}.json").write_text(json.dumps(record))


def run_quantizer(variant: str, work: Path) -> dict[str, Any]:
    """`quantize_child` in a fresh process; its record, or the error it ended with."""
    log = work / f"{variant}.log"
    began = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, __file__, "--quantize", variant, str(work)], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    wall = round(time.perf_counter() - began, 1)
    if done.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1:])
        return {"error": str(error), "log_tail": lines[-30:], "process_s": wall}
    return {**json.loads((work / f"{variant}.json").read_text()), "process_s": wall}


# ------------------------------------------------------------------------------------------ measuring


def recorded_feeds(engines: Path, steps: int, held_out_steps: int, seed: int, threads: int
                   ) -> tuple[list[Feed], list[Feed]]:
    """(calibration feeds as the build records them, un-windowed held-out feeds)."""
    from adaptbir.export.quantize import Recorder, default_calibration, record_feeds
    from adaptbir.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_engines(engines, threads=threads)
    calibrate, held_out = default_calibration().split()
    print(f"recording: {len(calibrate)} calibration photos ({steps} steps), {len(held_out)} held out "
          f"({held_out_steps} steps)", flush=True)
    calibration = record_feeds(pipeline, calibrate, steps, seed, lambda line: None)["unet"]
    with Recorder(pipeline.engines, ["unet"]) as recorder:
        for _, rgb in held_out:
            pipeline.restore(rgb, seed=seed, steps=held_out_steps)
    return calibration, recorder.feeds["unet"]


def census(path: Path) -> dict[str, Any]:
    """Per op type, how many nodes read a DequantizeLinear output (`WEIGHTED`: both inputs, i.e. int8
    compute), of how many; and the count of QuantizeLinear nodes (activation quantizers)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    total, int8 = Counter(), Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        total[node.op_type] += 1
        reads = [i in dequantized for i in node.input[:2]]
        if (node.op_type in WEIGHTED and len(reads) == 2 and all(reads)) or (
                node.op_type not in WEIGHTED and any(i in dequantized for i in node.input)):
            int8[node.op_type] += 1
    return {"int8": {op: f"{int8[op]}/{total[op]}" for op in sorted(int8, key=lambda o: -int8[o])},
            "float_weighted": {op: total[op] - int8[op] for op in WEIGHTED if total[op] - int8[op]},
            "quantizers": sum(n.op_type == "QuantizeLinear" for n in graph.node)}


def ort_kernels(path: Path) -> dict[str, int]:
    """What ONNX Runtime CPU makes of a QDQ graph: the op types of its optimised graph (the runtime's level,
    ORT_ENABLE_EXTENDED, where the QDQ fusions run) that compute in int8, and the convolutions and matmuls
    left in float."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_suffix(".ort-optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    Path(options.optimized_model_filepath).unlink()
    int8 = {op: n for op, n in ops.most_common() if op.startswith("QLinear") or op in ("QGemm", "MatMulIntegerToFloat")}
    return {**int8, **{f"float {op}": ops[op] for op in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")
                       if ops[op]}}


def eps_psnr(session, references: list[np.ndarray], feeds: list[Feed]) -> dict[str, float]:
    """Worst eps PSNR per timestep range against the fp32 outputs `references` (the gate's rule)."""
    from adaptbir.export.quantize import EPS_RANGES
    from adaptbir.runtime.metrics import psnr_over_range

    worst: dict[str, float] = {}
    for feed, reference in zip(feeds, references, strict=True):
        t = int(feed["t"][0])
        label = next(label for low, high, label in EPS_RANGES if low <= t < high)
        db = psnr_over_range(session.run(feed)[0], reference) or math.inf
        worst[label] = min(worst.get(label, math.inf), db)
    return {label: round(worst[label], 2) for _, _, label in EPS_RANGES if label in worst}


def openvino_int8(session) -> dict[str, Any]:
    """Of the compiled model's ops by OpenVINO CPU layer type, how many run in u8/i8 (every type that has
    any, and the convolutions and matmuls in any case), and which kernels (primitive types) those run."""
    compiled = next(iter(session._compiled.values()))  # the runtime's session: its one compiled shape
    total, int8, kernels = Counter(), Counter(), Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].astype(str))
        total[kind] += 1
        if str(info["runtimePrecision"].astype(str)).lower() in ("u8", "i8"):
            int8[kind] += 1
            kernels[f"{kind}: {info['primitiveType'].astype(str)}"] += 1
    kinds = [k for k in OV_KERNELS if total[k]] + sorted(k for k in int8 if k not in OV_KERNELS)
    return {"ops": {kind: f"{int8[kind]}/{total[kind]}" for kind in kinds}, "kernels": dict(kernels)}


def timed(session, feed: Feed) -> float:
    began = time.perf_counter()
    session.run(feed)
    return time.perf_counter() - began


def error_text(err: BaseException) -> str:
    """The lines of an error and its causes that say something (OpenVINO's first line names only a file)."""
    lines, seen = [], err
    while seen is not None:
        lines += [line.strip() for line in str(seen).splitlines() if line.strip()]
        seen = seen.__cause__
    telling = [line for line in lines if not line.startswith("Exception from src/inference")]
    return " / ".join(dict.fromkeys(telling or lines))


def timing_feed(held_out: list[Feed]) -> int:
    """A held-out feed from the middle timestep range, 64×64 (a 512×512 photo) where there is one."""
    from adaptbir.export.quantize import EPS_RANGES

    low, high, _ = EPS_RANGES[1]

    def rank(i: int) -> tuple[int, int]:
        t, shape = int(held_out[i]["t"][0]), held_out[i]["x"].shape[2:]
        return (0 if low <= t < high else 1, 0 if shape == (64, 64) else 1)

    return min(range(len(held_out)), key=rank)


def measure(work: Path, variants: list[str], held_out: list[Feed], calls: int, threads: int
            ) -> dict[str, dict[str, Any]]:
    """Eps PSNR (ONNX Runtime), then the alternating timing on each backend, for fp32 and each variant. A graph
    a backend cannot load or run is recorded with the error and left out of that backend's timing."""
    from adaptbir.runtime.backends import OpenVinoSession, OrtSession, openvino_core, openvino_precision
    from adaptbir.runtime.metrics import psnr_over_range

    names = ["fp32", *variants]
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    ort = {name: OrtSession(work / f"{name}.onnx", ["CPUExecutionProvider"], threads) for name in names}
    print(f"eps PSNR on {len(held_out)} held-out feeds", flush=True)
    references = [ort["fp32"].run(feed)[0] for feed in held_out]
    for name in variants:
        results[name]["eps_psnr_db"] = eps_psnr(ort[name], references, held_out)
    index = timing_feed(held_out)
    feed, reference = held_out[index], references[index]
    core = openvino_core()
    default = openvino_precision(core, None)  # what the openvino backend computes in on this CPU
    backends: dict[str, Any] = {"ort-cpu": lambda name: ort[name]}
    for precision in dict.fromkeys([default, "f32"]):
        backends[f"openvino-{precision}"] = lambda name, p=precision: OpenVinoSession(core, work / f"{name}.onnx",
                                                                                       p, threads)
    sessions: dict[str, dict[str, Any]] = {backend: {} for backend in backends}
    for backend, make in backends.items():
        for name in names:  # warm-up: compiles OpenVINO's model for this shape, fills ONNX Runtime's arena
            try:
                session = make(name)
                eps = session.run(feed)[0]
            except Exception as err:  # a graph this backend cannot compile or run: that is a result too
                results[name][backend] = {"error": error_text(err)}
                print(f"  {name} on {backend}: {results[name][backend]['error']}", flush=True)
                continue
            sessions[backend][name] = session
            results[name][backend] = {"eps_psnr_db": round(psnr_over_range(eps, reference) or math.inf, 2)}
            if backend.startswith("openvino"):
                results[name][backend]["int8_ops"] = openvino_int8(session)
    shape = "x".join(map(str, feed["x"].shape[2:]))
    print(f"timing one UNet call (latent {shape}, t {int(feed['t'][0])}), {calls} rounds, {len(names)} graphs, "
          f"{', '.join(backends)}", flush=True)
    times = {backend: {name: [] for name in by_name} for backend, by_name in sessions.items()}
    for round_ in range(calls):
        for backend, by_name in sessions.items():
            order = list(by_name)
            order = order[round_ % len(order):] + order[:round_ % len(order)]  # who goes first rotates
            for name in order:
                times[backend][name].append(timed(by_name[name], feed))
    for backend, by_name in times.items():
        base = by_name.get("fp32")
        for name, values in by_name.items():
            # the ratio: the median of each round's ratio to fp32 (calls seconds apart share the machine's load),
            # and the ratio of the fastest calls (what an unloaded machine would approach)
            paired = statistics.median(v / b for v, b in zip(values, base, strict=True)) if base else math.nan
            fastest = min(values) / min(base) if base else math.nan
            results[name][backend].update({
                "median_ms": round(statistics.median(values) * 1000, 1), "min_ms": round(min(values) * 1000, 1),
                "ratio": round(paired, 3), "ratio_of_min": round(fastest, 3),
                "ms": [round(v * 1000, 1) for v in values]})
    results["fp32"]["timing_feed"] = {"latent": shape, "t": int(feed["t"][0]), "openvino_default": default}
    return results


# ------------------------------------------------------------------------------------------ the report


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import openvino

    found = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
             "openvino": openvino.get_version().split("-")[0], "numpy": np.__version__}
    try:
        import nncf

        found["nncf"] = nncf.__version__
    except ImportError:
        found["nncf"] = "not installed"
    return found


def table(results: dict[str, dict[str, Any]], variants: list[str]) -> str:
    """Markdown: eps PSNR per range (ONNX Runtime), quantizing, then per backend the step time (median; its
    ratio to fp32: the median of the rounds' ratios, and the ratio of the fastest calls), the timing feed's eps
    PSNR there, and OpenVINO's int8 convolutions and fully-connected layers."""
    from adaptbir.export.quantize import EPS_RANGES

    ranges = [label for _, _, label in EPS_RANGES]
    backends = [b for b in results["fp32"] if b == "ort-cpu" or b.startswith("openvino-")]
    head = ["graph", *(f"eps {r}" for r in ranges), "quantize", "peak RSS"]
    for backend in backends:
        head += [f"{backend} step", f"{backend} eps"] + (["int8 kernels"] if backend.startswith("openvino") else [])
    rows = [head]
    for name in ["fp32", *variants]:
        r = results[name]
        if "error" in r:
            rows.append([name, f"quantizing failed: {r['error'][:160]}"])
            continue
        eps = r.get("eps_psnr_db", {})
        row = [name, *(f"{eps[label]:.2f}" if label in eps else "—" for label in ranges)]
        row += [f"{r['seconds']:.0f} s" if "seconds" in r else "—",
                f"{r['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in r else "—"]
        for backend in backends:
            b = r.get(backend, {})
            if "error" in b:
                failed = ["fails: " + b["error"].split(" / ")[-1][:60], "—"]
                row += failed + (["—"] if backend.startswith("openvino") else [])
                continue
            row += [f"{b['median_ms']:.0f} ms, {b['ratio']:.2f}× (min {b['ratio_of_min']:.2f}×)",
                    f"{b['eps_psnr_db']:.2f}"]
            if backend.startswith("openvino"):
                row.append(", ".join(f"{k} {v}" for k, v in b["int8_ops"]["ops"].items() if k in OV_KERNELS))
        rows.append(row)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="?", default="engines/tiny-random", help="an fp32 engine directory")
    parser.add_argument("--steps", type=int, default=6, help="sampling steps of each calibration restore")
    parser.add_argument("--held-out-steps", type=int, default=6, help="sampling steps of each held-out restore")
    parser.add_argument("--calls", type=int, default=9, help="timed rounds (after a warm-up call)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (feeds, graphs, logs); "
                        "run again with the same --keep to reuse its feeds and the graphs already quantized")
    parser.add_argument("--quantize", nargs=2, metavar=("VARIANT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize:
        quantize_child(args.quantize[0], Path(args.quantize[1]))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8-quantizers-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "held_out.pkl").is_file():
            calibration, held_out = recorded_feeds(Path(args.engines), args.steps, args.held_out_steps, args.seed,
                                                   args.threads)
            (work / "calibration.pkl").write_bytes(pickle.dumps(calibration))
            (work / "held_out.pkl").write_bytes(pickle.dumps(held_out))
        else:
            print(f"reusing the feeds in {work}", flush=True)
            calibration = pickle.loads((work / "calibration.pkl").read_bytes())
            held_out = pickle.loads((work / "held_out.pkl").read_bytes())
        if not (work / "fp32.onnx").exists():
            (work / "fp32.onnx").symlink_to(Path(args.engines).resolve() / "unet.onnx")
        quantized: dict[str, dict[str, Any]] = {}
        for variant in args.variants:
            if (work / f"{variant}.json").is_file() and (work / f"{variant}.onnx").is_file():
                quantized[variant] = {**json.loads((work / f"{variant}.json").read_text()), "reused": True}
            else:
                print(f"quantizing: {variant} on {len(calibration)} feeds", flush=True)
                quantized[variant] = run_quantizer(variant, work)
            print(f"  {variant}: {quantized[variant].get('error') or quantized[variant]}", flush=True)
        ok = [v for v in args.variants if "error" not in quantized[v]]
        for variant in ok:
            quantized[variant]["census"] = census(work / f"{variant}.onnx")
            quantized[variant]["ort_kernels"] = ort_kernels(work / f"{variant}.onnx")
            print(f"  {variant}: {quantized[variant]['census']}", flush=True)
        measured = measure(work, ok, held_out, args.calls, args.threads)
    results = {name: {**quantized.get(name, {}), **measured.get(name, {})} for name in ["fp32", *args.variants]}
    report = table(results, args.variants)
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "engines": args.engines, "versions": versions(), "cpu": _cpu(),
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                          if k not in ("json", "quantize")},
            "calibration_feeds": len(calibration), "held_out_feeds": len(held_out),
            "calibration_latent": "x".join(map(str, calibration[0]["x"].shape[2:])),
            "wall_s": round(time.perf_counter() - started), "results": results, "table": report}, indent=1))
        print(f"written: {args.json}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
