"""`adaptbir-bench`: per-stage latency of the runtime, its ratio to PyTorch eager, overhead and memory.

    adaptbir-bench --preset tiny --runs 5 --compare torch          # random weights built on the fly
    adaptbir-bench --preset sd21 --stages unet --size 512x512 --runs 3 --compare torch
    adaptbir-bench --engines engines/sd21-fp16 --runs 5              # an existing directory (no torch)

Warm-up runs, then N runs; each stage reports median, min and max. With `--compare torch` the same weights
run through the torch modules (eager, same thread count) behind the same pipeline code, alternating with
the runtime run by run, and the ratio runtime/torch is taken pair by pair. Results: a table, a JSON file
and a PNG chart under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from adaptbir.runtime.backends import CPU_PRECISIONS
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.sizes import parse_size

STAGES = ("musiq", "dual_encoder", "unet_step", "loop", "decoder", "e2e")
RESULTS = Path("benchmarks/results")


# ----------------------------------------------------------------------------------------------- setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptbir-bench", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", type=Path, help="an existing engine directory")
    source.add_argument("--preset", choices=("tiny", "sd21"), help="random weights of this preset, built on the fly")
    source.add_argument("--checkpoint", type=Path, help="build engines from this checkpoint (sd21 hyper-parameters)")
    p.add_argument("--musiq", type=Path, help="MUSIQ weights with --checkpoint")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="of engines built on the fly")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the loop and end-to-end stages")
    p.add_argument("--size", default="512x512", help="image HxW (multiples of 64; short side >= 512 avoids upscaling)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--threads", type=int, help="threads for ONNX Runtime and torch (default: all cores)")
    p.add_argument("--compare", choices=("torch", "fp16", "openvino"),
                   help="torch: alternate with torch eager on the same weights; "
                   "fp16: accuracy and speed of fp16 engines against fp32 ones of the same weights; "
                   "openvino: the openvino backend (--cpu-precision) against --backend on the same directory")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="OpenVINO's precision (default bf16 where the CPU has it)")
    p.add_argument("--no-memory", action="store_true", help="skip the torch-free peak-RSS subprocess")
    p.add_argument("--json", type=Path, help="result file (default benchmarks/results/bench-NAME.json)")
    return p


def _prepare(args, precision: str | None = None, keep_model: bool = True) -> tuple[Path, Any]:
    """The engine directory, and the torch model with the same weights (None for --engines, or when the
    build may free it as it goes: `keep_model=False` bounds the build's memory as the CLI's)."""
    precision = precision or args.precision
    if args.engines:
        if args.compare:
            raise AdaptBIRError(f"--compare {args.compare} needs --preset or --checkpoint: an engine directory holds "
                                "no torch weights")
        return args.engines, None
    from adaptbir.export.build import WeightSource, build
    from adaptbir.export.config import load_config

    if args.preset:
        config, source = load_config(args.preset), WeightSource(random_seed=0)
        name = f"bench-{args.preset}-random-{precision}"
    else:
        config, source = load_config("sd21"), WeightSource(args.checkpoint, musiq=args.musiq)
        name = f"bench-{args.checkpoint.stem}-{precision}"
    out = Path("engines") / name
    print(f"engines: {out}", file=sys.stderr)
    built = build(config, source, out, precision=precision, keep_model=keep_model,
                  progress=lambda text: print(f"  {text}", file=sys.stderr))
    return out, built.model


# -------------------------------------------------------------------------------------------- stages


class StageRunner:
    """Callables per stage for one pipeline; all inputs are fixed so both sides see the same data."""

    def __init__(self, pipeline, size: tuple[int, int], steps: int):
        from adaptbir.runtime.musiq_patches import batch_feeds, extract_tokens
        from adaptbir.runtime.preprocess import to_model_range
        from adaptbir.runtime.sampler import Schedule

        self.pipeline, self.steps = pipeline, steps
        rng = np.random.default_rng(0)
        self.photo = (rng.random((*size, 3)) * 255).astype(np.uint8)
        self.image = to_model_range(self.photo)
        h, w = size[0] // 8, size[1] // 8
        self.latent = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        self.cond = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        self.musiq_feeds = batch_feeds([extract_tokens(self.photo)])
        self.unet_feeds = {"x": self.latent, "t": np.array([500]), "context": pipeline.context,
                           "cond": self.cond, "w": np.array([0.8], np.float32)}
        self.schedule = Schedule.from_manifest(pipeline.manifest.schedule, steps)

    def run(self, stage: str) -> dict[str, float]:
        """Seconds of one execution of `stage`, plus engine time and overhead for e2e."""
        from adaptbir.runtime.sampler import NoiseSource, sample
        from adaptbir.runtime.stages import Timings

        engines = self.pipeline.engines
        start = time.perf_counter()
        if stage == "musiq":
            engines.run("musiq", self.musiq_feeds)
        elif stage == "dual_encoder":
            engines.run("dual_encoder", {"image": self.image})
        elif stage == "unet_step":
            engines.run("unet", self.unet_feeds)
        elif stage == "loop":
            timings = Timings()
            eps = self.pipeline.stages.eps_model(self.cond, 0.8, None, timings)
            noise = NoiseSource(0, self.latent.shape)
            sample(eps, noise.draw(), self.schedule, lambda i: noise.draw())
        elif stage == "decoder":
            engines.run("decoder", {"latent": self.latent})
        elif stage == "e2e":
            result = self.pipeline.restore(self.photo, seed=0, steps=self.steps, tile_size=0)
            total = time.perf_counter() - start
            engine = result.timings["engine_s"]
            return {"s": total, "engine_s": engine, "overhead_s": total - engine}
        else:
            raise AdaptBIRError(f"unknown stage {stage!r}")
        return {"s": time.perf_counter() - start}


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(runners: dict[str, StageRunner], stages: list[str], warmup: int, runs: int,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """Alternate the sides run by run (runtime, torch, runtime, torch, ...) for every stage."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {side: [] for side in runners} for s in stages}
    for stage in stages:
        for i in range(warmup + runs):
            for side, runner in runners.items():
                result = runner.run(stage)
                if i >= warmup:
                    samples[stage][side].append(result)
            progress(f"{stage}: run {i + 1}/{warmup + runs}{' (warm-up)' if i < warmup else ''}")
    out: dict[str, Any] = {}
    for stage, by_side in samples.items():
        entry: dict[str, Any] = {side: summarize([r["s"] for r in rs]) for side, rs in by_side.items()}
        if stage == "e2e":
            rt = by_side["runtime"]
            entry["runtime"]["engine_median"] = statistics.median(r["engine_s"] for r in rt)
            overhead = [r["overhead_s"] for r in rt]
            entry["overhead"] = {**summarize(overhead),
                                 "fraction_median": statistics.median(r["overhead_s"] / r["s"] for r in rt)}
        for other in by_side.keys() - {"runtime"}:
            ratios = [a["s"] / b["s"] for a, b in zip(by_side["runtime"], by_side[other], strict=True)]
            entry[f"ratio_runtime_over_{other}"] = {**summarize(ratios), "pairs": ratios}
        out[stage] = entry
    return out


# -------------------------------------------------------------------------------------- precision

GATE_SCORES = (39.9, 40.0, 40.1, 69.9, 70.0, 70.1)


def accuracy(subject: StageRunner, baseline: StageRunner, labels: tuple[str, str], size: tuple[int, int],
             steps: int) -> dict[str, Any]:
    """A reduced-precision side (fp16 engines, OpenVINO bf16) against its fp32 baseline on the same inputs:
    every graph's PSNR over the baseline's range, the final image of a `steps`-step restore, MUSIQ."""
    from adaptbir.runtime.gating import gate
    from adaptbir.runtime.metrics import psnr, psnr_over_range

    pipelines = {"baseline": baseline.pipeline, "subject": subject.pipeline}
    graphs: dict[str, Any] = {}
    calls = {"dual_encoder": {"image": baseline.image}, "unet": baseline.unet_feeds,
             "decoder": {"latent": baseline.latent}}
    if pipelines["baseline"].engines.has("musiq"):
        calls["musiq"] = baseline.musiq_feeds
    for name, feeds in calls.items():
        pairs = list(zip(pipelines["subject"].engines.run(name, feeds), pipelines["baseline"].engines.run(name, feeds),
                         strict=True))
        dbs = [db for a, b in pairs if (db := psnr_over_range(a, b)) is not None]
        graphs[name] = {"max_abs": max(float(np.abs(a - b).max()) for a, b in pairs),
                        "psnr_db": min(dbs) if dbs else None,
                        "finite": all(bool(np.all(np.isfinite(a))) for a, _ in pairs)}
    images = {p: pipe.restore(baseline.photo, seed=0, steps=steps, score=55).image for p, pipe in pipelines.items()}
    scores = {}
    for seed in range(4):  # a few different photos
        photo = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
        scores[seed] = {p: pipe.score(photo) for p, pipe in pipelines.items()}
    shift = max(abs(v["subject"] - v["baseline"]) for v in scores.values())
    # a score closer than `shift` to a class boundary may change class: those of GATE_SCORES that would
    flips = sorted({s for s in GATE_SCORES for d in (-shift, shift) if gate(s + d).label != gate(s).label})
    return {
        "subject": labels[0], "baseline": labels[1],
        "graphs": graphs,
        "final_image_steps": steps,
        "final_image_psnr_db": psnr(images["subject"], images["baseline"], peak=255.0),
        "final_image_max_abs_u8": int(np.abs(images["subject"].astype(int) - images["baseline"]).max()),
        "musiq_scores": scores, "musiq_max_abs_shift": shift,
        "gate_flips_near_40_70": flips,
        "musiq_graph_identical": pipelines["subject"].manifest.files["musiq.onnx"]
        == pipelines["baseline"].manifest.files["musiq.onnx"],
    }


# ------------------------------------------------------------------------------------- arithmetic


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
        seconds = min(_timed(fn) for _ in range(repeats))
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


def openvino_compile_times(engines_dir: Path, args, size: tuple[int, int]) -> dict[str, float]:
    """The first UNet call at the benchmark shape (where OpenVINO compiles) with an empty compiled-model
    cache, then again in a new session with the cache it left: what a second load of a directory saves."""
    import tempfile

    from adaptbir.runtime.backends import Engines

    feeds = {"x": np.zeros((1, 4, size[0] // 8, size[1] // 8), np.float32), "t": np.array([500])}
    times: dict[str, float] = {}
    saved = os.environ.get("ADAPTBIR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="adaptbir-ov-cache-") as cache:
        os.environ["ADAPTBIR_CACHE_DIR"] = cache
        try:
            for label in ("cold", "warm"):
                start = time.perf_counter()
                engines = Engines.load(engines_dir, backend="openvino", threads=args.threads,
                                       precision=args.cpu_precision)
                times["load_s"] = time.perf_counter() - start
                context = np.load(engines_dir / "context.npy")
                unet = {**feeds, "context": context, "cond": feeds["x"], "w": np.array([0.5], np.float32)}
                times[f"{label}_first_call_s"] = _timed(lambda e=engines, u=unet: e.run("unet", u))
                del engines
        finally:
            if saved is None:
                os.environ.pop("ADAPTBIR_CACHE_DIR", None)
            else:
                os.environ["ADAPTBIR_CACHE_DIR"] = saved
    return times


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss(engines: Path, size: str, steps: int, threads: int | None, backend: str,
             precision: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.probe", "--engines", str(engines), "--size", size,
           "--steps", str(steps), "--backend", backend] + (["--threads", str(threads)] if threads else []) + (
        ["--cpu-precision", precision] if precision else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "probe failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- output


def table(report: dict[str, Any]) -> str:
    stages = report["stages"]
    compare = next((side for side in report["sides"] if side != "runtime"), None)
    subject = f"{report['settings'].get('backend_under_test', 'runtime')} {report['compute_precision']['runtime']}" \
        if "compute_precision" in report else "runtime"
    head = f"{'stage':<14} {subject + ' ms (median [min..max])':>34}"
    if compare:
        head += f" {compare + ' ms':>12} {'ratio':>7}"
    if report.get("flops"):
        head += f" {'GFLOP':>9} {'GFLOP/s':>9}"
    lines = [head]
    for stage, e in stages.items():
        rt = e["runtime"]
        row = f"{stage:<14} {rt['median'] * 1e3:>12.2f} [{rt['min'] * 1e3:>8.2f}..{rt['max'] * 1e3:>9.2f}]"
        if compare:
            row += f" {e[compare]['median'] * 1e3:>12.2f} {e[f'ratio_runtime_over_{compare}']['median']:>7.3f}"
        if report.get("flops") and stage in report["flops"]:
            gflop = report["flops"][stage] / 1e9
            row += f" {gflop:>9.2f} {gflop / rt['median']:>9.1f}"
        lines.append(row)
    if "e2e" in stages:
        o = stages["e2e"]["overhead"]
        lines.append(f"runtime overhead (e2e wall - engine time): {o['median'] * 1e3:.2f} ms = "
                     f"{o['fraction_median']:.3%} of end to end")
    if report.get("matmul_peak"):
        p = report["matmul_peak"]
        lines.append(f"machine matmul peak (square matmul, n in {p['sizes']}): fp32 {p['fp32_gflops']:.1f} GFLOP/s "
                     f"(torch {p['torch_fp32_gflops']:.1f}, ONNX Runtime {p['ort_fp32_gflops']:.1f}), "
                     f"bf16 {p['bf16_gflops']:.1f} GFLOP/s (torch {p['torch_bf16_gflops']:.1f}"
                     + (f", OpenVINO {p['openvino_bf16_gflops']:.1f})" if "openvino_bf16_gflops" in p else ")"))
    mem = report.get("memory", {})
    if "peak_rss_mib" in mem:
        lines.append(f"runtime peak RSS (torch-free process, one e2e): {mem['peak_rss_mib']:.0f} MiB"
                     + (f" = {mem['rss_over_fp32_weights']:.2f} x fp32 weights" if "rss_over_fp32_weights" in mem
                        else ""))
    base = report.get("memory_baseline", {})
    if "peak_rss_mib" in base:
        lines.append(f"baseline peak RSS (same restore, {report['sides'][1]}): {base['peak_rss_mib']:.0f} MiB")
    lines.append("engine files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report["engine_bytes"].items()))
    if "openvino_compile" in report:
        c = report["openvino_compile"]
        lines.append(f"OpenVINO first UNet call (compiles for the shape): cold cache {c['cold_first_call_s']:.1f} s, "
                     f"warm cache {c['warm_first_call_s']:.1f} s; directory load {c['load_s']:.1f} s")
    if "accuracy" in report:
        a = report["accuracy"]
        lines.append(f"{a['subject']} vs {a['baseline']} (same inputs; ratio above = {a['subject']} / "
                     f"{a['baseline']} time):")
        for name, g in a["graphs"].items():
            psnr = "exact" if g["psnr_db"] in (None, float("inf")) else f"{g['psnr_db']:.1f} dB"
            lines.append(f"  {name:<14} max abs {g['max_abs']:.3g}, PSNR {psnr}"
                         + ("" if g.get("finite", True) else " — NOT FINITE (fp16 overflow)"))
        psnr = a["final_image_psnr_db"]
        lines.append(f"  final image    PSNR {'exact' if psnr is None else f'{psnr:.1f} dB'} (uint8, "
                     f"max {a['final_image_max_abs_u8']} levels, {a.get('final_image_steps', '?')} steps)")
        lines.append(f"  MUSIQ          max score shift {a['musiq_max_abs_shift']:.3g} (graph identical: "
                     f"{a['musiq_graph_identical']}); of {', '.join(map(str, GATE_SCORES))} these change class: "
                     f"{a['gate_flips_near_40_70'] or 'none'}")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if s not in ("loop", "e2e")]
    sides = report["sides"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        xs = [j + i * width for j in range(len(stages))]
        axes[0].bar(xs, [report["stages"][s][side]["median"] * 1e3 for s in stages], width, label=side)
    axes[0].set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(stages))], stages)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("per stage")
    axes[0].legend()
    if "e2e" in report["stages"]:
        for i, side in enumerate(sides):
            axes[1].bar(i, report["stages"]["e2e"][side]["median"], label=side)
        axes[1].set_xticks(range(len(sides)), sides)
        axes[1].set_ylabel("s (median)")
        axes[1].set_title(f"end to end, {report['settings']['steps']} steps")
    fig.suptitle(f"{report['settings']['name']} — {report['settings']['size']}, {report['machine']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def run(args) -> dict[str, Any]:
    from adaptbir.runtime.backends import Engines
    from adaptbir.runtime.pipeline import Pipeline

    size = parse_size(args.size)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise AdaptBIRError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.compare == "fp16":  # the fp16 directory is measured against the fp32 one; no torch weights kept
        fp32_dir, _ = _prepare(args, "fp32", keep_model=False)
        engines_dir, model = _prepare(args, "fp16", keep_model=False)
    else:  # the torch model is kept for --compare torch and FLOP counts; an OpenVINO comparison needs the memory
        engines_dir, model = _prepare(args, keep_model=args.compare != "openvino")
    if args.compare == "openvino" and args.backend == "openvino":
        raise AdaptBIRError("--compare openvino measures openvino against --backend: choose another --backend")
    compile_times = openvino_compile_times(engines_dir, args, size) if args.compare == "openvino" else None
    backend = "openvino" if args.compare == "openvino" else args.backend
    engines = Engines.load(engines_dir, backend=backend, threads=args.threads, precision=args.cpu_precision)
    if not engines.has("musiq") and "musiq" in stages:
        stages.remove("musiq")
    runners = {"runtime": StageRunner(Pipeline(engines), size, args.steps)}
    report_accuracy = None
    if args.compare == "torch":
        from adaptbir.export.torch_engines import TorchEngines

        runners["torch"] = StageRunner(Pipeline(TorchEngines(engines.manifest, model, args.threads)), size, args.steps)
    elif args.compare == "fp16":
        fp32 = Engines.load(fp32_dir, backend=args.backend, threads=args.threads, precision=args.cpu_precision)
        runners["fp32"] = StageRunner(Pipeline(fp32), size, args.steps)
        report_accuracy = accuracy(runners["runtime"], runners["fp32"], ("fp16", "fp32"), size, args.steps)
    elif args.compare == "openvino":
        baseline = Engines.load(engines_dir, backend=args.backend, threads=args.threads)
        runners[args.backend] = StageRunner(Pipeline(baseline), size, args.steps)
        labels = (f"openvino {engines.compute_precision}", f"{args.backend} {baseline.compute_precision}")
        report_accuracy = accuracy(runners["runtime"], runners[args.backend], labels, size, args.steps)
    threads = args.threads or os.cpu_count()
    report: dict[str, Any] = {
        "settings": {"name": engines_dir.name, "engines": str(engines_dir), "size": args.size, "steps": args.steps,
                     "runs": args.runs, "warmup": args.warmup, "backend": args.backend,
                     "precision": engines.manifest.precision, "backend_under_test": backend,
                     "command": " ".join(["adaptbir-bench", *sys.argv[1:]])},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": threads, "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sides": list(runners),
        "compute_precision": {side: r.pipeline.engines.compute_precision for side, r in runners.items()},
        "stages": measure(runners, stages, args.warmup, args.runs, lambda m: print(f"  {m}", file=sys.stderr)),
        "engine_bytes": {k: v.bytes for k, v in engines.manifest.files.items()},
    }
    if report_accuracy is not None:
        report["accuracy"] = report_accuracy
    if compile_times is not None:
        report["openvino_compile"] = compile_times
    if model is not None:
        report["flops"] = stage_flops(model, runners["runtime"])
        report["matmul_peak"] = matmul_peak(args.threads)
        report["fp32_weight_bytes"] = 4 * sum(p.numel() for p in model.parameters())
    if not args.no_memory:
        report["memory"] = peak_rss(engines_dir, args.size, args.steps, args.threads, backend, engines.cpu_precision)
        if args.compare in ("fp16", "openvino"):  # the same restore on the baseline side, for the ratio
            base = next(r.pipeline.engines for side, r in runners.items() if side != "runtime")
            report["memory_baseline"] = peak_rss(base.manifest.directory, args.size, args.steps, args.threads,
                                                 base.backend, base.cpu_precision)
        if "peak_rss_mib" in report["memory"] and report.get("fp32_weight_bytes"):
            report["memory"]["rss_over_fp32_weights"] = report["memory"]["peak_rss_mib"] * 2**20 / report[
                "fp32_weight_bytes"]
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except AdaptBIRError as err:
        print(f"adaptbir-bench: error: {err}", file=sys.stderr)
        return 2
    path = args.json or RESULTS / f"bench-{report['settings']['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    chart(report, path.with_suffix(".png"))
    print(table(report))
    print(f"results: {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
