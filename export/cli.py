"""`adaptbir-export`: build engine directories from checkpoints (or seeded random weights), and TensorRT plans.

    adaptbir-export build --checkpoint CKPT [--control CKPT] [--restoration-vae CKPT] [--musiq CKPT]
                          [--preset sd21|tiny | --config FILE.json] [--precision fp32|fp16]
                          [--context FILE.npy] --out engines/NAME
    adaptbir-export build --random-weights --seed 0 --preset tiny --out engines/tiny
    adaptbir-export trt --engines engines/NAME [--shape 512x512 | --min HxW --opt HxW --max HxW]
    adaptbir-export check --engines engines/NAME [--backends ort-cpu,openvino,trt]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from adaptbir.runtime.arguments import DefaultsHelp, Parser
from adaptbir.runtime.backends import BACKENDS, CPU_PRECISIONS
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.manifest import Manifest
from adaptbir.runtime.signals import StopSignals, command
from adaptbir.runtime.sizes import describe_size, size_argument

from .quantize import SCHEMES, Floors, Int8Options


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adaptbir-export", description=__doc__.split("\n\n")[0].replace("`", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="export the ONNX engine directory", formatter_class=DefaultsHelp)
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="AdaptBIR stage-3 checkpoint, or an SD 2.1-base one")
    source.add_argument("--random-weights", action="store_true", help="seeded random weights (tests, demos)")
    build.add_argument("--control", type=Path, help="ControlNet + CSFT weights (override/complete --checkpoint)")
    build.add_argument("--restoration-vae", type=Path, help="stage-1 VAE checkpoint for the restoration encoder")
    build.add_argument("--musiq", type=Path, help="pyiqa's musiq_koniq_ckpt-e95806b9.pth")
    config = build.add_mutually_exclusive_group()
    config.add_argument("--preset", choices=("sd21", "tiny"), help="hyper-parameters (default sd21)")
    config.add_argument("--config", type=Path, help="hyper-parameters from a JSON file (tiny_config.json schema)")
    build.add_argument("--seed", type=int, default=0, help="seed of --random-weights and of a random context")
    build.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                       help="of the UNet, encoders, decoder (MUSIQ stays fp32); int8: calibrated and gated, below")
    build.add_argument("--context", type=Path, help="[1,77,C] .npy replacing the empty-prompt context")
    build.add_argument("--musiq-n-max", type=int, help="largest MUSIQ token count the engines must serve")
    build.add_argument("--out", type=Path, required=True, help="engine directory to write (engines/NAME)")
    build.add_argument("--ignore-memory-check", action="store_true",
                       help="build even when the predicted peak memory exceeds the available memory")
    int8 = build.add_argument_group("int8 (--precision int8)", "calibration on photos, then a gate against fp32 on "
                                    "held-out ones; below a floor nothing is written")
    int8.add_argument("--calibration", type=Path, help="folder of degraded photos like yours (default: matplotlib's "
                      "sample photos, synthetically degraded)")
    int8.add_argument("--int8-scheme", choices=tuple(SCHEMES), default=Int8Options.scheme,
                      help="; ".join(f"{name}: {scheme.help}" for name, scheme in SCHEMES.items()))
    int8.add_argument("--calibration-steps", type=int, default=10, help="sampling steps of each calibration run")
    int8.add_argument("--gate-steps", type=int, default=10, help="sampling steps of each gate restore")
    floors = Floors()
    int8.add_argument("--gate-min-eps-psnr", type=float, default=floors.eps_psnr_db,
                      help="UNet eps PSNR (dB) vs fp32, worst timestep range")
    int8.add_argument("--gate-min-psnr", type=float, default=floors.image_psnr_db,
                      help="restored image PSNR (dB) vs fp32, worst held-out photo")
    int8.add_argument("--gate-min-ssim", type=float, default=floors.image_ssim, help="restored image SSIM vs fp32")
    int8.add_argument("--gate-max-musiq-shift", type=float, default=floors.musiq_shift,
                      help="MUSIQ score shift of the restored image vs fp32 (0-100 scale)")

    trt = sub.add_parser("trt", help="build TensorRT plans from an engine directory (needs a GPU + TensorRT)",
                         formatter_class=DefaultsHelp)
    trt.add_argument("--engines", type=Path, required=True, help="engine directory to add the plans to")
    trt.add_argument("--shape", help="one image size HxW (multiple of 64), e.g. 512x512")
    trt.add_argument("--min", dest="min_shape", help="smallest image HxW of the profile")
    trt.add_argument("--opt", dest="opt_shape", help="image HxW TensorRT optimises for")
    trt.add_argument("--max", dest="max_shape", help="largest image HxW of the profile")
    trt.add_argument("--batch", type=int, default=1, help="largest batch of the profile")
    trt.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace limit")

    check = sub.add_parser("check", help="run every graph on several backends with the same inputs and compare",
                           formatter_class=DefaultsHelp)
    check.add_argument("--engines", type=Path, required=True, help="engine directory to check")
    check.add_argument("--backends", help=f"comma-separated, the first is the baseline ({', '.join(BACKENDS)}; "
                                          "default: ort-cpu and every other backend available here)")
    check.add_argument("--size", type=size_argument, default=(256, 256), help="image HxW of the sample inputs")
    check.add_argument("--cpu-precision", choices=CPU_PRECISIONS, help="openvino: bf16 or f32 (default: bf16 "
                                                                        "where the CPU has it)")
    check.add_argument("--threads", type=int, help="CPU threads per backend")
    return parser


def _check_memory(args, config):
    from adaptbir.runtime.memory import available_bytes

    from .memory import check_fits, predict_build_memory
    from .model import Capabilities

    # Random weights have no text tower; a checkpoint may (SD's own does): counted while it is loaded.
    caps = Capabilities(has_text_encoder=config.text_encoder is not None and not args.random_weights)
    fp32_first = args.precision == "int8"  # an int8 build builds (and checks) the fp32 graphs first
    memory = predict_build_memory(config, "fp32" if fp32_first else args.precision, caps)
    print(f"memory: {memory.summary()}")
    if not args.ignore_memory_check:
        check_fits(memory, available_bytes(), f"building {config.name} {args.precision} engines")
    return memory


def _build(args) -> None:
    from adaptbir.runtime.memory import GiB, peak_with_children

    from .build import WeightSource, build
    from .config import load_config

    started = time.perf_counter()
    config = load_config(path=args.config) if args.config else load_config(args.preset or "sd21")
    memory = _check_memory(args, config)
    source = WeightSource(random_seed=args.seed) if args.random_weights else WeightSource(
        args.checkpoint, args.control, args.restoration_vae, args.musiq)
    built = build(config, source, args.out, precision=args.precision, context_file=args.context, seed=args.seed,
                  n_max=args.musiq_n_max, int8=_int8_options(args) if args.precision == "int8" else None)
    print(summary_table(built.manifest))
    peak, where = peak_with_children()
    print(f"engine directory {args.out} ready in {time.perf_counter() - started:.1f} s "
          f"(peak memory {peak / GiB:.2f} GiB, {where}; predicted {memory.total / GiB:.2f} GiB)")


def _int8_options(args) -> Int8Options:
    for name in ("calibration_steps", "gate_steps"):
        if not 2 <= getattr(args, name) <= 1000:
            raise AdaptBIRError(f"--{name.replace('_', '-')} must be from 2 to 1000, not {getattr(args, name)}")
    floors = Floors(args.gate_min_eps_psnr, args.gate_min_psnr, args.gate_min_ssim, args.gate_max_musiq_shift)
    return Int8Options(args.calibration, args.int8_scheme, args.calibration_steps, args.gate_steps, floors, args.seed,
                       check_memory=not args.ignore_memory_check)


def summary_table(manifest: Manifest) -> str:
    rows = [f"{'file':<24} {'MiB':>9}  {'precision':<9} {'max abs':>10} {'PSNR dB':>8}  parity"]

    def row(file: str, size: str, precision: str, parity: dict) -> str:
        psnr = "exact" if parity["psnr_db"] is None else f"{parity['psnr_db']:.1f}"
        return (f"{file:<24} {size:>9}  {precision:<9} {parity['max_abs']:>10.2e} {psnr:>8}  "
                f"ok ({parity['tolerance']})")

    for name, graph in manifest.graphs.items():
        rows.append(row(graph.file, f"{manifest.graph_bytes(name) / 2**20:.2f}", graph.precision, graph.parity))
        if graph.parity_full_size:
            full = graph.parity_full_size
            rows.append(row(f"  at {describe_size(*full['image'])}", "", "", full))
    context = manifest.files[manifest.context.file].bytes
    rows.append(f"{manifest.context.file:<24} {context / 2**20:>9.2f}  {'fp32':<9} ({manifest.context.source})")
    return "\n".join(rows)


def _trt(args) -> None:
    from .tensorrt import build_plans, profile_from_args

    profile = profile_from_args(args.shape, args.min_shape, args.opt_shape, args.max_shape, args.batch)
    for line in build_plans(args.engines, profile, workspace_gib=args.workspace_gib):
        print(line)


def _check(args) -> int:
    from .check import check_directory, table

    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    checks = check_directory(args.engines, backends, args.size, args.threads, args.cpu_precision,
                             progress=lambda line: None)
    print(table(checks, backends[0] if backends else "ort-cpu"))
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} comparisons within tolerance"
          + (f"; mismatches: {', '.join(f'{c.graph} on {c.backend}' for c in failed)}" if failed else ""))
    return 1 if failed else 0


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM and SIGHUP stop a build as Ctrl-C does: every staging and temporary folder is removed on the way
    # out (a stopped sd21 int8 build would otherwise leave its 5.4 GB fp32 folder) and the previous output stays.
    with StopSignals() as stop:
        try:
            with stop.abandonable():
                return {"build": _build, "trt": _trt, "check": _check}[args.command](args) or 0
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                stop.stopped(err)
            if stop.signum:  # whatever a library turned the interrupt into on the way out (ImportError, ...)
                print(f"adaptbir-export: stopped by {signal.Signals(stop.signum).name}; nothing was written, the "
                      "previous output (if any) is as it was", file=sys.stderr)
                return 128 + stop.signum
            if isinstance(err, AdaptBIRError):
                print(f"adaptbir-export: error: {err}", file=sys.stderr)
                return 2
            raise


if __name__ == "__main__":
    sys.exit(main())
