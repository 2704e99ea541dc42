"""`adaptbir`: restore images with an engine directory, or describe one.

    adaptbir restore photo.jpg scans/ -o restored/ --engines engines/sd21-fp16 [--steps 50] [--seed 0]
    adaptbir info engines/sd21-fp16

A batch continues past an image that fails, reports it, and exits non-zero. Outputs are written
atomically, never outside OUTDIR, and never over an input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .backends import BACKENDS, CPU_PRECISIONS, backend_status
from .errors import AdaptBIRError, InputError

FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}


def _steps(text: str) -> int:
    steps = int(text)
    if not 2 <= steps <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 2 and 1000, not {steps}")
    return steps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptbir", description="AdaptBIR blind image restoration runtime")
    parser.add_argument("--version", action="version", version=f"adaptbir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore image files or directories")
    r.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or directories (recursive)")
    r.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR")
    r.add_argument("--engines", type=Path, required=True, help="engine directory (adaptbir-export build)")
    r.add_argument("--backend", default="ort-cpu", choices=BACKENDS,
                   help="ort-cpu (default), openvino (CPU, bf16 where the CPU has it), ort-cuda, ort-trt, trt")
    r.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="openvino: compute in bf16 or f32 (default bf16 where the CPU has it; MUSIQ always f32)")
    r.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime or OpenVINO (default: all cores)")
    r.add_argument("--steps", type=_steps, default=50, help="sampling steps (2..1000)")
    r.add_argument("--seed", type=int, help="seed of every image (default: a fresh seed each, recorded)")
    r.add_argument("--score", type=float, help="use this MUSIQ score instead of running MUSIQ")
    r.add_argument("--k", type=float, help="override the latent interpolation weight k")
    r.add_argument("--w", type=float, help="override the CSFT strength w")
    r.add_argument("--sr-scale", type=float, default=1.0, help="super-resolution pre-scale")
    r.add_argument("--no-resize-back", action="store_true", help="keep the processing size")
    r.add_argument("--tile-size", type=int, help="tile size in px (multiple of 64; 0 = never tile; default auto)")
    r.add_argument("--color-fix", default="none", choices=("none", "adain", "wavelet"))
    r.add_argument("--format", default="png", choices=tuple(FORMATS))
    r.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    r.add_argument("--on-exists", default="skip", choices=("skip", "overwrite", "suffix"))
    r.add_argument("--report", type=Path, help="append one JSON record per image to this JSONL file")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    i = sub.add_parser("info", help="print an engine directory's manifest as a table")
    i.add_argument("engines", type=Path)
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file")
    return parser


@dataclass(frozen=True)
class Job:
    source: Path
    relative: Path  # where it lands under OUTDIR (suffix replaced by the output format)


def collect_jobs(inputs: list[Path], out: Path, fmt: str) -> tuple[list[Job], list[str]]:
    """Files as given; directories walked recursively with their relative layout kept."""
    jobs, problems = [], []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            jobs += [Job(p, p.relative_to(item).with_suffix(FORMATS[fmt])) for p in files]
        elif item.is_file():
            jobs.append(Job(item, Path(item.name).with_suffix(FORMATS[fmt])))
        else:
            problems.append(f"{item}: no such file or directory")
    return jobs, problems


def output_path(job: Job, out: Path, policy: str, inputs: set[Path]) -> Path | None:
    """Destination under OUTDIR, or None to skip; never outside OUTDIR and never an input file."""
    root = out.resolve()
    target = (root / job.relative).resolve()
    if root not in target.parents:
        raise InputError(f"{job.source}: output {target} would fall outside {root}")
    n = 1
    while target in inputs or (target.exists() and policy == "suffix"):
        target = target.with_name(f"{job.relative.stem}-{n}{target.suffix}")
        n += 1
    if target.exists() and policy == "skip":
        return None
    return target


def _progress_bar(total: int, desc: str, quiet: bool, position: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=position == 0, position=position, unit="img"
                if position == 0 else "step", file=sys.stderr, dynamic_ncols=True)


def _restore(args) -> int:
    from .image_io import read_image, write_image
    from .pipeline import Pipeline

    pipeline = Pipeline.from_engines(args.engines, backend=args.backend, threads=args.threads,
                                     precision=args.cpu_precision)
    jobs, problems = collect_jobs(args.inputs, args.out, args.format)
    inputs = {j.source.resolve() for j in jobs}
    failures = [(p.split(":")[0], p) for p in problems]
    done = skipped = 0
    images = _progress_bar(len(jobs), "images", args.quiet)
    for job in jobs:
        record: dict[str, Any] = {"input": str(job.source), **pipeline.describe()}
        started = time.perf_counter()
        try:
            target = output_path(job, args.out, args.on_exists, inputs)
            if target is None:
                skipped += 1
                record.update(status="skipped", reason="output exists (--on-exists skip)")
            else:
                loaded = read_image(job.source)
                steps = _progress_bar(args.steps, job.source.name, args.quiet, position=1)
                try:
                    result = pipeline.restore(
                        loaded, seed=args.seed, steps=args.steps, score=args.score, k=args.k, w=args.w,
                        sr_scale=args.sr_scale, resize_back=not args.no_resize_back, color_fix=args.color_fix,
                        tile_size=args.tile_size, progress=lambda i, n, bar=steps: bar.update(1))
                finally:
                    steps.close()
                out = result.image
                write_image(target, out.rgb, alpha=out.alpha, icc_profile=out.icc_profile, exif=out.exif,
                            fmt=args.format, quality=args.quality)
                done += 1
                record.update(status="ok", output=str(target), **result.record())
                for warning in result.warnings:
                    images.write(f"adaptbir: {job.source}: warning: {warning}", file=sys.stderr)
        except (AdaptBIRError, OSError, ValueError) as err:
            failures.append((str(job.source), str(err)))
            record.update(status="failed", error=str(err))
            images.write(f"adaptbir: {job.source}: {err}", file=sys.stderr)
        record["wall_s"] = round(time.perf_counter() - started, 6)
        _report(args.report, record)
        images.update(1)
    images.close()
    print(f"restored {done}, skipped {skipped}, failed {len(failures)} of {len(jobs) + len(problems)} input(s)"
          f" -> {args.out}", file=sys.stderr)
    for source, error in failures:
        print(f"  failed: {error if error.startswith(source) else f'{source}: {error}'}", file=sys.stderr)
    return 1 if failures else 0


def _report(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _info(args) -> int:
    from .manifest import load_manifest

    print(describe_manifest(load_manifest(args.engines, verify=not args.no_verify).data))
    print("\nbackends on this machine")
    for name, status in backend_status().items():
        print(f"  {name:<12} {status}")
    return 0


def describe_manifest(data: dict[str, Any]) -> str:
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in data["capabilities"].items())
    hp = data["hyperparameters"]
    lines = [
        f"engine directory  {data['name']} (schema {data['schema_version']}, created {data['created']})",
        f"model             preset {data['preset']}, UNet {hp['unet']['model_channels']} ch × "
        f"{hp['unet']['channel_mult']}, context {data['context']['shape']} ({data['context']['source']})",
        f"precision         {data['precision']}",
        f"capabilities      {caps}",
        f"schedule          {data['schedule']['beta_schedule']} {data['schedule']['linear_start']}.."
        f"{data['schedule']['linear_end']} over {data['schedule']['timesteps']}, default "
        f"{data['schedule']['default_steps']} steps",
        f"MUSIQ tokens      {data['musiq']['n_min']}..{data['musiq']['n_max']}",
        "built with        " + ", ".join(f"{k} {v}" for k, v in data["tools"].items()),
        f"runtime range     {data['runtime']['min']} <= v < {data['runtime']['below']}",
        "",
        f"{'graph':<14} {'precision':<9} {'MiB':>9}  {'inputs':<64} parity",
    ]
    for name, g in data["graphs"].items():
        size = sum(data["files"][f]["bytes"] for f in (g["file"], g.get("external_data")) if f) / 2**20
        inputs = ", ".join(f"{t['name']}{t['shape']}" for t in g["inputs"]).replace("'", "")
        p = g["parity"]
        lines.append(f"{name:<14} {g['precision']:<9} {size:>9.2f}  {inputs:<64} max abs {p['max_abs']:.2e}")
    if data.get("tensorrt"):
        t = data["tensorrt"]
        lines.append(f"TensorRT          {t['version']} on compute {t['compute_capability']}, profile {t['profile']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"restore": _restore, "info": _info}[args.command](args)
    except AdaptBIRError as err:
        print(f"adaptbir: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
