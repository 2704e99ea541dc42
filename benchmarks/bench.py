"""`adaptbir-bench`: per-stage latency of the runtime, its ratio to PyTorch eager, overhead and memory.

    adaptbir-bench --preset tiny --runs 5 --compare torch          # random weights built on the fly
    adaptbir-bench --preset sd21 --stages unet --size 512x512 --runs 3 --compare torch
    adaptbir-bench --engines engines/sd21-fp16 --runs 5              # an existing directory (no torch)
    adaptbir-bench --config my_config.json --compare torch            # any hyper-parameters, random weights

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
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adaptbir.runtime.arguments import DefaultsHelp
from adaptbir.runtime.backends import CPU_PRECISIONS
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.sizes import parse_size

from .memory import openvino_compile_times, peak_rss
from .peaks import matmul_peak, stage_flops
from .report import chart, table
from .stages import STAGES, StageRunner, accuracy, measure

RESULTS = Path("benchmarks/results")


# ----------------------------------------------------------------------------------------------- setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptbir-bench", description=__doc__.split("\n\n")[0].replace("`", ""),
                                formatter_class=DefaultsHelp)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", type=Path, help="an existing engine directory")
    source.add_argument("--preset", choices=("tiny", "sd21"), help="random weights of this preset, built on the fly")
    source.add_argument("--config", type=Path,
                        help="random weights of this hyper-parameter file (as adaptbir-export build --config)")
    source.add_argument("--checkpoint", type=Path, help="build engines from this checkpoint (sd21 hyper-parameters)")
    p.add_argument("--musiq", type=Path, help="MUSIQ weights with --checkpoint")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="of engines built on the fly")
    p.add_argument("--runs", type=int, default=5, help="measured runs per stage (medians over them)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs before them")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the loop and end-to-end stages")
    p.add_argument("--size", default="512x512", help="image HxW (multiples of 64; short side >= 512 avoids upscaling)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--backend", default="ort-cpu", help="runtime backend measured")
    p.add_argument("--threads", type=int, help="threads for ONNX Runtime and torch (default: all cores)")
    p.add_argument("--compare", choices=("torch", "fp16", "openvino"),
                   help="torch: alternate with torch eager on the same weights; "
                   "fp16: accuracy and speed of fp16 engines against fp32 ones of the same weights; "
                   "openvino: the openvino backend (--cpu-precision) against --backend on the same directory")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="OpenVINO's precision (default bf16 where the CPU has it)")
    p.add_argument("--no-memory", action="store_true", help="skip the torch-free peak-RSS subprocess")
    p.add_argument("--peak-sizes", default="2048,4096", metavar="N,N",
                   help="square matmul sizes of the machine-peak measurement")
    p.add_argument("--json", type=Path, help="result file (default benchmarks/results/bench-NAME.json)")
    return p


def _prepare(args, precision: str | None = None, keep_model: bool = True) -> tuple[Path, Any]:
    """The engine directory, and the torch model with the same weights (None for --engines, or when the
    build may free it as it goes: `keep_model=False` bounds the build's memory as the CLI's)."""
    precision = precision or args.precision
    if args.engines:
        if args.compare:
            raise AdaptBIRError(f"--compare {args.compare} needs --preset, --config or --checkpoint: "
                                "an engine directory holds no torch weights")
        return args.engines, None
    from adaptbir.export.build import WeightSource, build
    from adaptbir.export.config import load_config

    if args.preset or args.config:
        config, source = load_config(args.preset, args.config), WeightSource(random_seed=0)
        name = f"bench-{config.name}-random-{precision}"
    else:
        config, source = load_config("sd21"), WeightSource(args.checkpoint, musiq=args.musiq)
        name = f"bench-{args.checkpoint.stem}-{precision}"
    out = Path("engines") / name
    print(f"engines: {out}", file=sys.stderr)
    built = build(config, source, out, precision=precision, keep_model=keep_model,
                  progress=lambda text: print(f"  {text}", file=sys.stderr))
    return out, built.model


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
        report["matmul_peak"] = matmul_peak(args.threads, tuple(int(n) for n in args.peak_sizes.split(",")))
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
