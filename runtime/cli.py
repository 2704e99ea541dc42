"""`adaptbir`: restore images with an engine directory, or describe one.

    adaptbir restore photo.jpg scans/ -o restored/ --engines engines/sd21-fp16 [--steps 50] [--seed 0]
    adaptbir plan photo.jpg scans/ --engines engines/sd21-fp16
    adaptbir info engines/sd21-fp16

A batch continues past an image that fails, reports it, and exits non-zero. Outputs are written
atomically, never outside OUTDIR, and never over an input.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .arguments import DefaultsHelp, check_arguments
from .backends import BACKENDS, CPU_PRECISIONS, backend_status
from .errors import AdaptBIRError, ArgumentError
from .image_io import READ_SUFFIXES
from .manifest import Manifest
from .plan import bytes_argument
from .progress import BatchProgress, ImageProgress

FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptbir", description="AdaptBIR blind image restoration runtime")
    parser.add_argument("--version", action="version", version=f"adaptbir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore image files or directories", formatter_class=DefaultsHelp,
                       description="Restore image files or folders (recursively) into OUTDIR; a failing image is "
                       "reported and the batch goes on (exit 1), usage errors exit 2, Ctrl-C exits 130.")
    restore_arguments(r)
    p = sub.add_parser("plan", help="how each image would be restored, before anything runs",
                       formatter_class=DefaultsHelp,
                       description="For each image (its header only): processing size, MUSIQ tokens, tiled or "
                       "untiled and why, and the predicted peak memory against the budget. Nothing runs.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE", help="image files or directories (recursive)")
    p.add_argument("--engines", type=Path, required=True, help="engine directory (adaptbir-export build)")
    _planning_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a line")
    i = sub.add_parser("info", help="print an engine directory's manifest as a table")
    i.add_argument("engines", type=Path, help="engine directory (adaptbir-export build)")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file")
    return parser


def restore_arguments(r: argparse.ArgumentParser) -> None:
    """The arguments of `adaptbir restore`, shared with `adaptbir-ray restore` (one CLI, two engines)."""
    r.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or directories (recursive)")
    r.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR",
                   help="output folder (created; folders keep their layout inside it)")
    r.add_argument("--engines", type=Path, required=True, help="engine directory (adaptbir-export build)")
    _planning_options(r)
    r.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime or OpenVINO (default: all cores)")
    r.add_argument("--steps", type=int, default=50, help="sampling steps (2..1000)")
    r.add_argument("--seed", type=int, help="seed of every image (default: a fresh seed each, recorded)")
    r.add_argument("--k", type=float, help="override the latent interpolation weight k")
    r.add_argument("--w", type=float, help="override the CSFT strength w")
    r.add_argument("--color-fix", default="none", choices=("none", "adain", "wavelet"),
                   help="match the colours of the input's reconstruction")
    r.add_argument("--format", default="png", choices=tuple(FORMATS), help="output image format")
    r.add_argument("--quality", type=int, default=95, help="jpg/webp quality (0..100)")
    r.add_argument("--on-exists", default="skip", choices=("skip", "overwrite", "suffix"),
                   help="when an output exists: keep it, replace it, or write NAME-1, NAME-2, ...")
    r.add_argument("--report", type=Path, help="append one JSON record per image to this JSONL file")
    r.add_argument("--quiet", action="store_true", help="no progress, only errors and the summary")


def _planning_options(parser: argparse.ArgumentParser) -> None:
    """The options that decide how an image runs: shared by `restore` and `plan`, so a plan is the restore's."""
    parser.add_argument("--backend", default="ort-cpu", choices=BACKENDS,
                        help="ort-cpu, openvino (CPU, bf16 where the CPU has it), ort-cuda, ort-trt, trt")
    parser.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                        help="openvino: compute in bf16 or f32 (default bf16 where the CPU has it; MUSIQ always f32)")
    parser.add_argument("--score", type=float, help="use this MUSIQ score instead of running MUSIQ")
    parser.add_argument("--sr-scale", type=float, default=1.0, help="super-resolution pre-scale (0.125..16)")
    parser.add_argument("--no-resize-back", action="store_true", help="keep the processing size")
    parser.add_argument("--tile-size", type=int, help="tile size in px (multiple of 64; 0 = never tile; default: "
                        "untiled whenever the predicted peak fits the memory budget, else 512 px tiles)")
    parser.add_argument("--memory-budget", type=bytes_argument, metavar="SIZE",
                        help="memory a restore may use, e.g. 12G (default: 85%% of what the process can reach)")


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path  # resolved, under OUTDIR
    skip: bool = False  # the output exists and --on-exists is skip


def _walk(folder: Path, root: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order; never anything inside OUTDIR (`root`)."""
    if folder.resolve().is_relative_to(root):  # OUTDIR itself included
        raise ArgumentError(f"{folder}: this input folder is the output folder or inside it; choose another -o")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in READ_SUFFIXES and p.is_file()
                  and not p.parent.resolve().is_relative_to(root))


def plan_jobs(inputs: list[Path], out: Path, fmt: str, policy: str) -> tuple[list[Job], list[str]]:
    """Every input and where it lands, decided before any work; problems are inputs that do not exist.

    Files land under OUTDIR by name, folders keep their relative layout; the suffix becomes the output
    format's. Two inputs that would land on one output are refused (naming them); an output that would be
    an input gets the first free `NAME-N` instead; an existing output follows `policy` (skip, overwrite,
    or suffix: the first free `NAME-N`)."""
    root = out.resolve()
    found, problems = [], []
    for item in inputs:
        if item.is_dir():
            found += [(p, p.relative_to(item)) for p in _walk(item, root)]
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            problems.append(f"{item}: no such file or directory")
    by_target: dict[Path, list[Path]] = {}
    for source, relative in found:
        by_target.setdefault((root / relative).with_suffix(FORMATS[fmt]), []).append(source)
    collisions = [f"{', '.join(map(str, sources))} -> {target}" for target, sources in by_target.items()
                  if len(sources) > 1]
    if collisions:
        raise ArgumentError("several inputs would be written to the same output (the same file given twice, or "
                            f"names differing only in folder or suffix): {'; '.join(collisions)}; rename them or "
                            "restore them into separate output folders")
    sources = {source.resolve() for source, _ in found}
    taken: set[Path] = set()
    jobs = []
    for target, (source,) in by_target.items():
        resolved = target.resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{source}: its output {resolved} would fall outside {root}")
            continue
        if resolved in sources or (policy == "suffix" and resolved.exists()):
            resolved = _free_name(resolved, sources | taken | set(by_target), must_not_exist=policy == "suffix")
        taken.add(resolved)
        jobs.append(Job(source, resolved, skip=policy == "skip" and resolved.exists()))
    return jobs, problems


def _free_name(target: Path, taken: set[Path], must_not_exist: bool) -> Path:
    n = 1
    while (candidate := target.with_name(f"{target.stem}-{n}{target.suffix}")) in taken or (
            must_not_exist and candidate.exists()):
        n += 1
    return candidate


def _check_report(report: Path | None, jobs: list[Job]) -> None:
    if report is None:
        return
    where = report.resolve()
    if where.suffix.lower() in READ_SUFFIXES or where in {j.source.resolve() for j in jobs} | {j.target for j in jobs}:
        raise ArgumentError(f"--report {report}: would write over an image (an input or an output); name a "
                            ".jsonl file")


@contextmanager
def _writes_complete():
    """Ctrl-C during a write takes effect after it, so an output and its report line are written whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _plan(args) -> int:
    """`adaptbir plan`: the manifest and each image's header only; no engine is loaded."""
    from .backends import openvino_core, openvino_precision
    from .image_io import image_size
    from .manifest import load_manifest
    from .plan import plan_restore
    from .preprocess import plan_geometry

    check_arguments(score=args.score, sr_scale=args.sr_scale, tile_size=args.tile_size)
    manifest = load_manifest(args.engines, verify=False)
    precision = openvino_precision(openvino_core(), args.cpu_precision) if args.backend == "openvino" else None
    paths = [p for item in args.inputs for p in (
        sorted(f for f in item.rglob("*") if f.suffix.lower() in READ_SUFFIXES and f.is_file())
        if item.is_dir() else [item])]
    failed = 0
    for path in paths:
        try:
            geometry = plan_geometry(*image_size(path), sr_scale=args.sr_scale, resize_back=not args.no_resize_back)
            plan = plan_restore(manifest, geometry, backend=args.backend, precision=precision,
                                tile_size=args.tile_size, score_given=args.score is not None,
                                memory_budget=args.memory_budget)
            print(json.dumps({"input": str(path), **plan.record()}) if args.json else f"{path}: {plan.summary()}")
        except AdaptBIRError as err:
            failed += 1
            message = without_path(err, path)
            print(json.dumps({"input": str(path), "error": message}) if args.json else f"{path}: error: {message}")
    return 1 if failed else 0


def check_restore_arguments(args) -> tuple[list[Job], list[str]]:
    """Usage errors first, all before the engines load and before any image is touched (exit 2); then
    where every input lands (`plan_jobs`)."""
    check_arguments(steps=args.steps, seed=args.seed, score=args.score, k=args.k, w=args.w,
                    sr_scale=args.sr_scale, color_fix=args.color_fix, tile_size=args.tile_size)
    if not 0 <= args.quality <= 100:
        raise ArgumentError(f"--quality must be from 0 to 100, not {args.quality}")
    if args.threads is not None and args.threads < 1:
        raise ArgumentError(f"--threads must be at least 1, not {args.threads}")
    jobs, problems = plan_jobs(args.inputs, args.out, args.format, args.on_exists)
    _check_report(args.report, jobs)
    return jobs, problems


def _restore(args) -> int:
    from .image_io import read_image
    from .pipeline import Pipeline

    jobs, problems = check_restore_arguments(args)
    pipeline = Pipeline.from_engines(args.engines, backend=args.backend, threads=args.threads,
                                     precision=args.cpu_precision, memory_budget=args.memory_budget)
    failures = list(problems)
    done = skipped = 0
    shown = BatchProgress(len(jobs), quiet=args.quiet)
    interrupted = False
    for job in jobs:
        record: dict[str, Any] = {"input": str(job.source), **pipeline.describe()}
        started = time.perf_counter()
        progress = shown.image(job.source.name)
        try:
            if job.skip:
                skipped += 1
                record.update(status="skipped", reason="output exists (--on-exists skip)", output=str(job.target))
            else:
                result = restore_loaded(pipeline, read_image(job.source), args, args.seed, progress)
                with _writes_complete():
                    write_output(job, result.image, args)
                    done += 1
                    record.update(status="ok", output=str(job.target), **result.record())
                for warning in result.warnings:
                    shown.write(f"adaptbir: {job.source}: warning: {warning}")
            progress.finish(record["status"])
        except KeyboardInterrupt:  # the current image is abandoned (or, if Ctrl-C came during its write, kept)
            interrupted = True
            record.setdefault("status", "interrupted")
        except Exception as err:  # any per-image failure is recorded and the batch goes on
            message = without_path(err, job.source)
            failures.append(f"{job.source}: {message}")
            record.update(status="failed", error=message)  # the record names the input once, in "input"
            progress.finish("failed")
            shown.write(f"adaptbir: {failures[-1]}")
        record["wall_s"] = round(time.perf_counter() - started, 6)
        with _writes_complete():
            append_report(args.report, record)
        shown.advance()
        if interrupted:
            break
    shown.close()
    return finish_batch(done, skipped, failures, len(jobs) + len(problems), args.out, interrupted)


def finish_batch(done: int, skipped: int, failures: list[str], total: int, out: Path, interrupted: bool) -> int:
    """The batch's summary on stderr, and its exit status: 0 all restored, 1 some failed, 130 interrupted."""
    verb = "interrupted after" if interrupted else "restored"
    print(f"{verb} {done}, skipped {skipped}, failed {len(failures)} of {total} input(s) -> {out}", file=sys.stderr)
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 130 if interrupted else 1 if failures else 0


def without_path(err: Exception, source: Path) -> str:
    """The error's message without a leading `source: ` (the caller names the input once)."""
    message = str(err) if isinstance(err, (AdaptBIRError, OSError)) else f"{type(err).__name__}: {err}"
    return message.removeprefix(f"{source}: ")


def restore_loaded(pipeline, image, args, seed: int | None, progress: ImageProgress | None = None):
    """One image restored with the command's options (the same call for `adaptbir-ray restore`)."""
    return pipeline.restore(
        image, seed=seed, steps=args.steps, score=args.score, k=args.k, w=args.w, sr_scale=args.sr_scale,
        resize_back=not args.no_resize_back, color_fix=args.color_fix, tile_size=args.tile_size,
        progress=progress.step if progress else None, on_stage=progress.stage if progress else None)


def write_output(job: Job, out, args) -> None:
    """Atomic: the output appears whole or not at all."""
    from .image_io import write_image

    write_image(job.target, out.rgb, alpha=out.alpha, icc_profile=out.icc_profile, exif=out.exif,
                fmt=args.format, quality=args.quality)


def append_report(path: Path | None, record: dict[str, Any]) -> None:
    """One JSON line, flushed to disk before the next image (a crash loses no finished record)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _info(args) -> int:
    from .manifest import load_manifest

    print(describe_manifest(load_manifest(args.engines, verify=not args.no_verify)))
    print("\nbackends on this machine")
    for name, status in backend_status().items():
        print(f"  {name:<12} {status}")
    return 0


def describe_manifest(m: Manifest) -> str:
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.capabilities.to_dict().items())
    unet, schedule = m.hyperparameters["unet"], m.schedule
    lines = [
        f"engine directory  {m.name} (schema {m.schema_version}, created {m.created})",
        f"model             preset {m.preset}, UNet {unet['model_channels']} ch × {unet['channel_mult']}, "
        f"context {list(m.context.shape)} ({m.context.source})",
        f"precision         {m.precision}",
        f"capabilities      {caps}",
        f"schedule          {schedule.beta_schedule} {schedule.linear_start}..{schedule.linear_end} over "
        f"{schedule.timesteps}, default {schedule.default_steps} steps",
        f"gating            {m.gating['rule']}",
        f"MUSIQ tokens      {m.musiq.n_min}..{m.musiq.n_max}",
        "built with        " + ", ".join(f"{k} {v}" for k, v in m.tools.items()),
        f"runtime range     {m.runtime['min']} <= v < {m.runtime['below']}",
        "",
        f"{'graph':<14} {'precision':<9} {'MiB':>9}  {'inputs':<64} parity",
    ]
    for name, g in m.graphs.items():
        inputs = ", ".join(f"{t.name}{list(t.dims)}" for t in g.inputs).replace("'", "")
        lines.append(f"{name:<14} {g.precision:<9} {m.graph_bytes(name) / 2**20:>9.2f}  {inputs:<64} "
                     f"max abs {g.parity['max_abs']:.2e}")
    if m.tensorrt:
        t = m.tensorrt
        lines.append(f"TensorRT          {t.version} on compute {t.compute_capability}, profile {t.profile}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"restore": _restore, "plan": _plan, "info": _info}[args.command](args)
    except AdaptBIRError as err:
        print(f"adaptbir: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
