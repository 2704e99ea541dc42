"""`adaptbir-bench`: per-stage latency of the runtime, its ratio to PyTorch eager, overhead and memory.

    adaptbir-bench --preset tiny --runs 5 --compare torch          # random weights built on the fly
    adaptbir-bench --preset sd21 --stages unet --size 512x512 --runs 3 --compare torch
    adaptbir-bench --engines engines/sd21-fp16 --runs 5              # an existing directory (no torch weights)
    adaptbir-bench --engines DIR --compare openvino                   # OpenVINO against ONNX Runtime, one directory
    adaptbir-bench --engines DIR --compare int8 --int8-engines DIR8   # an int8 directory against the fp32 one
    adaptbir-bench --preset sd21 --peaks-only                         # the machine's peaks at sd21's UNet shapes
    adaptbir-bench --config my_config.json --compare torch            # any hyper-parameters, random weights

Warm-up runs, then N runs; each stage reports median, min and max. With `--compare torch` the same weights
run through the torch modules (eager, same thread count) behind the same pipeline code, alternating with
the runtime run by run, and the ratio runtime/torch is taken pair by pair. The machine's peaks are measured
in the same run with each backend's own kernels (f32, bf16, int8 convolutions and matmuls at the UNet's
shapes), and every stage is reported as a fraction of its backend/precision's peak. Results: a table, a
JSON file and a PNG chart under benchmarks/results/.
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

from adaptbir.runtime.arguments import DefaultsHelp, Parser
from adaptbir.runtime.backends import CPU_PRECISIONS
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.signals import command
from adaptbir.runtime.sizes import parse_size

from .memory import openvino_load_times, openvino_profile, peak_rss
from .peaks import machine_peaks, matmul_peak, meta_model, side_peak_key, stage_flops, unet_kernels
from .report import chart, table
from .stages import STAGES, StageRunner, accuracy, measure

RESULTS = Path("benchmarks/results")


# ----------------------------------------------------------------------------------------------- setup


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="adaptbir-bench", description=__doc__.split("\n\n")[0].replace("`", ""),
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
    p.add_argument("--compare", choices=("torch", "fp16", "openvino", "int8"),
                   help="torch: alternate with torch eager on the same weights; "
                   "fp16: accuracy and speed of fp16 engines against fp32 ones of the same weights; "
                   "openvino: the openvino backend (--cpu-precision) against --backend on the same directory "
                   "(--engines works: no torch weights needed); "
                   "int8: the --int8-engines directory against the fp32 one, both on --backend")
    p.add_argument("--int8-engines", type=Path, metavar="DIR",
                   help="with --compare int8: an int8 directory (adaptbir-export build --precision int8) of the "
                   "same model as the fp32 one")
    p.add_argument("--also", metavar="BACKEND",
                   help="with --compare int8/fp16: the fp32 directory on BACKEND too, in the same run (--compare "
                   "int8 --backend openvino --also ort-cpu: int8 on OpenVINO against ONNX Runtime fp32)")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="OpenVINO's precision (default bf16 where the CPU has it)")
    p.add_argument("--no-memory", action="store_true", help="skip the torch-free peak-RSS subprocess")
    p.add_argument("--peak-sizes", default="2048,4096", metavar="N,N",
                   help="square matmul sizes of the torch/ONNX Runtime matmul peak (--compare torch)")
    p.add_argument("--peak-runs", type=int, default=5,
                   help="runs per kernel of the machine peaks (f32/bf16/int8 conv and matmul at the UNet's shapes)")
    p.add_argument("--no-peaks", action="store_true", help="skip the machine peaks and the fractions of them")
    p.add_argument("--peaks-only", action="store_true",
                   help="only the machine peaks, at the UNet's shapes of the source's hyper-parameters and --size "
                   "(builds and loads no engines)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip OpenVINO's per-node-type profile of the UNet step (made when openvino is measured)")
    p.add_argument("--json", type=Path, help="result file (default benchmarks/results/bench-NAME.json)")
    return p


def _prepare(args, precision: str | None = None, keep_model: bool = True) -> tuple[Path, Any]:
    """The engine directory, and the torch model with the same weights (None for --engines, or when the
    build may free it as it goes: `keep_model=False` bounds the build's memory as the CLI's)."""
    precision = precision or args.precision
    if args.engines:
        if args.compare in ("torch", "fp16"):
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


def _check(args) -> None:
    """Refusals that need nothing loaded."""
    if args.compare == "openvino" and args.backend == "openvino":
        raise AdaptBIRError("--compare openvino measures openvino against --backend: choose another --backend")
    if args.also is not None and (args.compare not in ("fp16", "int8") or args.also == args.backend):
        raise AdaptBIRError("--also BACKEND adds the fp32 directory on another backend than --backend to --compare "
                            "int8 or fp16")
    if (args.compare == "int8") != (args.int8_engines is not None):
        raise AdaptBIRError("--compare int8 and --int8-engines DIR go together: the int8 directory is measured "
                            "against the fp32 one (--engines, or built from --preset/--config/--checkpoint)")


def _side_plans(args, engines_dir: Path, fp32_dir: Path | None) -> dict[str, tuple[Path, str, str | None]]:
    """Each side's (directory, backend, requested CPU precision); "runtime" is the side under test."""
    if args.compare == "openvino":  # the same directory on both backends
        return {"runtime": (engines_dir, "openvino", args.cpu_precision),
                args.backend: (engines_dir, args.backend, None)}
    if args.compare in ("fp16", "int8"):  # two directories of the same weights on the same backend
        subject = engines_dir if args.compare == "fp16" else args.int8_engines
        baseline = fp32_dir if args.compare == "fp16" else engines_dir
        sides = {"runtime": (subject, args.backend, args.cpu_precision),
                 "fp32": (baseline, args.backend, args.cpu_precision)}
        if args.also:  # the fp32 directory on another backend, in the same run
            sides[args.also] = (baseline, args.also, None)
        return sides
    return {"runtime": (engines_dir, args.backend, args.cpu_precision)}


def _accuracy_labels(args, engines: dict[str, Any]) -> tuple[str, str] | None:
    if args.compare in ("fp16", "int8"):
        return args.compare, "fp32"
    if args.compare == "openvino":
        return (f"openvino {engines['runtime'].compute_precision}",
                f"{args.backend} {engines[args.backend].compute_precision}")
    return None


def _hyperparameters(args) -> tuple[str, dict[str, Any]]:
    """The model's name and hyper-parameters, without building anything: the directory's, or the preset's."""
    if args.engines:
        from adaptbir.runtime.manifest import load_manifest

        manifest = load_manifest(args.engines, verify=False)
        return manifest.name, manifest.hyperparameters
    from adaptbir.export.config import load_config

    config = load_config(args.preset or (None if args.config else "sd21"), args.config)
    return config.name, config.to_dict()


def _settings(args, name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "size": args.size, **more, "command": " ".join(["adaptbir-bench", *sys.argv[1:]])}


def _machine(args) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "threads": args.threads or os.cpu_count(), "python": platform.python_version()}


def _peaks(args, hyperparameters: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    return machine_peaks(unet_kernels(hyperparameters, size), args.threads, args.peak_runs)


def run_peaks_only(args) -> dict[str, Any]:
    """`--peaks-only`: the machine's peaks at the UNet's shapes of the source's hyper-parameters; builds and
    loads nothing."""
    name, hyperparameters = _hyperparameters(args)
    return {"settings": _settings(args, f"peaks-{name}", peaks_only=True), "machine": _machine(args),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "peaks": _peaks(args, hyperparameters, parse_size(args.size))}


def peak_fractions(report: dict[str, Any]) -> dict[str, Any]:
    """Every stage's GFLOP/s on every side over the peak of that side's backend and precision (same run)."""
    out: dict[str, Any] = {}
    peaks = report["peaks"]["peak_gflops"]
    for stage, entry in report["stages"].items():
        for side in report["sides"]:
            key = side_peak_key(report["backends"][side], report["directory_precision"].get(side),
                                report["compute_precision"][side], stage)
            if stage in report["flops"] and key in peaks:
                gflops = report["flops"][stage] / entry[side]["median"] / 1e9
                out.setdefault(stage, {})[side] = {"peak": key, "gflops": gflops, "fraction": gflops / peaks[key]}
    return out


# --------------------------------------------------------------------------------------------- main


def run(args) -> dict[str, Any]:
    from adaptbir.runtime.backends import Engines, cpu_precision
    from adaptbir.runtime.manifest import load_manifest
    from adaptbir.runtime.pipeline import Pipeline

    _check(args)
    if args.peaks_only:
        return run_peaks_only(args)
    size = parse_size(args.size)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise AdaptBIRError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    fp32_dir = None
    if args.compare == "fp16":  # the fp16 directory is measured against the fp32 one; no torch weights kept
        fp32_dir, _ = _prepare(args, "fp32", keep_model=False)
        engines_dir, model = _prepare(args, "fp16", keep_model=False)
    else:  # the torch model is kept for --compare torch only (FLOPs are counted on the meta device)
        engines_dir, model = _prepare(args, keep_model=args.compare == "torch")
    plans = _side_plans(args, engines_dir, fp32_dir)
    # first-call times and profiles in sessions of their own, before the measured sides hold their memory
    load_times = openvino_load_times(engines_dir, args, size) if args.compare == "openvino" else None
    profiles = {side: openvino_profile(load_manifest(directory, verify=False), size,
                                       cpu_precision("openvino", precision), args.threads, max(1, args.runs))
                for side, (directory, backend, precision) in plans.items()
                if backend == "openvino" and not args.no_profile}
    engines = {side: Engines.load(directory, backend=backend, threads=args.threads, precision=precision)
               for side, (directory, backend, precision) in plans.items()}
    subject = engines["runtime"]
    if args.compare == "int8" and subject.manifest.hyperparameters != engines["fp32"].manifest.hyperparameters:
        raise AdaptBIRError(f"--int8-engines {args.int8_engines} and {engines_dir} hold different models "
                            "(their manifests' hyperparameters differ)")
    if not subject.has("musiq") and "musiq" in stages:
        stages.remove("musiq")
    runners = {side: StageRunner(Pipeline(e), size, args.steps) for side, e in engines.items()}
    if args.compare == "torch":
        from adaptbir.export.torch_engines import TorchEngines

        runners["torch"] = StageRunner(Pipeline(TorchEngines(subject.manifest, model, args.threads)), size, args.steps)
    labels = _accuracy_labels(args, engines)
    report_accuracy = None if labels is None else accuracy(runners["runtime"], next(
        r for side, r in runners.items() if side != "runtime"), labels, size, args.steps)
    report: dict[str, Any] = {
        "settings": _settings(args, subject.manifest.directory.name, engines=str(subject.manifest.directory),
                              steps=args.steps, runs=args.runs, warmup=args.warmup, compare=args.compare,
                              backend=args.backend,
                              precision=subject.manifest.precision, backend_under_test=subject.backend,
                              **({"baseline_engines": str(engines_dir)} if args.compare == "int8" else {})),
        "machine": _machine(args),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sides": list(runners),
        "backends": {side: getattr(r.pipeline.engines, "backend", side) for side, r in runners.items()},
        "compute_precision": {side: r.pipeline.engines.compute_precision for side, r in runners.items()},
        "directory_precision": {side: e.manifest.precision for side, e in engines.items()},
        "stages": measure(runners, stages, args.warmup, args.runs, lambda m: print(f"  {m}", file=sys.stderr)),
        "engine_bytes": {k: v.bytes for k, v in subject.manifest.files.items()},
    }
    if report_accuracy is not None:
        report["accuracy"] = report_accuracy
    if load_times is not None:
        report["openvino_load"] = load_times
    if profiles:
        report["openvino_profile"] = profiles
    counted = meta_model(subject.manifest)  # None without torch
    if counted is not None:
        report["flops"] = stage_flops(counted, runners["runtime"])
        report["fp32_weight_bytes"] = 4 * sum(p.numel() for p in counted.parameters())
    if not args.no_peaks:
        report["peaks"] = _peaks(args, subject.manifest.hyperparameters, size)
        if "flops" in report:
            report["fraction_of_peak"] = peak_fractions(report)
    if model is not None:
        report["matmul_peak"] = matmul_peak(args.threads, tuple(int(n) for n in args.peak_sizes.split(",")))
    if not args.no_memory:
        report["memory"] = peak_rss(subject.manifest.directory, args.size, args.steps, args.threads, subject.backend,
                                    subject.cpu_precision)
        others = {side: e for side, e in engines.items() if side != "runtime"}  # the same restore, for the ratios
        measured = {side: peak_rss(e.manifest.directory, args.size, args.steps, args.threads, e.backend,
                                   e.cpu_precision) for side, e in others.items()}
        if measured:
            report["memory_sides"] = measured
            report["memory_baseline"] = next(iter(measured.values()))  # the first other side, as before --also
        if "peak_rss_mib" in report["memory"] and report.get("fp32_weight_bytes"):
            report["memory"]["rss_over_fp32_weights"] = report["memory"]["peak_rss_mib"] * 2**20 / report[
                "fp32_weight_bytes"]
    return report


@command
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
    print(table(report))
    if "stages" in report:
        chart(report, path.with_suffix(".png"))
        print(f"results: {path} and {path.with_suffix('.png')}")
    else:
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
