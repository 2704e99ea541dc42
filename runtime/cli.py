"""`adaptbir`: restore images with an engine directory, or describe one.

    adaptbir restore photo.jpg scans/ -o restored/ --engines engines/sd21-fp16 [--steps 50] [--seed 0]
    adaptbir plan photo.jpg scans/ --engines engines/sd21-fp16
    adaptbir info engines/sd21-fp16

A batch continues past an image that fails, reports it, and exits non-zero. Every place it writes is
tried before the first image; outputs are written atomically, never outside OUTDIR, and never over an
input; SIGINT, SIGTERM and SIGHUP stop it after the current image with nothing partial left. Only regular
files are read, and every printed line escapes the control characters of the names in it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO, TypeVar

from . import __version__
from .arguments import DefaultsHelp, check_arguments
from .atomic import TEMPORARIES, close_temporaries, file_kind, open_regular, open_temporaries, temporaries_for
from .backends import BACKENDS, CPU_PRECISIONS, backend_status
from .errors import AdaptBIRError, ArgumentError
from .image_io import READ_SUFFIXES
from .manifest import Manifest
from .plan import bytes_argument
from .progress import BatchProgress, ImageProgress, printable

FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT
T = TypeVar("T")


def say(line: str, stream: TextIO | None = None) -> None:
    """Print one line (stderr by default) with the control characters of the names in it escaped."""
    print(printable(line), file=sys.stderr if stream is None else stream)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptbir", description="AdaptBIR blind image restoration runtime")
    parser.add_argument("--version", action="version", version=f"adaptbir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore image files or directories", formatter_class=DefaultsHelp,
                       description="Restore image files or folders (recursively) into OUTDIR; a failing image is "
                       "reported and the batch goes on (exit 1), usage errors exit 2; Ctrl-C, SIGTERM or SIGHUP stop "
                       "it after the current image (exit 128 + the signal: 130, 143, 129).")
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
    temporary_dir: Path | None = None  # where its temporary file is written (None: beside the target)


def image_files(folder: Path) -> list[Path]:
    """What a folder walk picks up, recursively, in a stable order: every entry with an image suffix that is
    not a folder (a FIFO or device too, to be named as such rather than skipped in silence), never anything
    in a batch's folder of temporaries."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in READ_SUFFIXES and not p.is_dir()
                  and TEMPORARIES not in p.relative_to(folder).parts)


def _walk(folder: Path, root: Path) -> list[Path]:
    """`image_files(folder)`, never anything inside OUTDIR (`root`)."""
    if folder.resolve().is_relative_to(root):  # OUTDIR itself included
        raise ArgumentError(f"{folder}: this input folder is the output folder or inside it; choose another -o")
    return [p for p in image_files(folder) if not p.parent.resolve().is_relative_to(root)]


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
        elif item.exists():  # a FIFO or device too: refused by name when read, never opened
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


# --------------------------------------------------------------------------------------------- signals


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) cut an image's reading or restore short."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP, alike, for a whole batch: inside `abandonable()` (reading and restoring
    an image) the image is dropped at once; anywhere else (an output's write, its record) the work finishes
    and the batch stops before the next image. A signal that was ignored (nohup, a background job) stays
    ignored; the previous handlers come back at the end. Main thread only: the one Python signals reach."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._abandon = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def install(self) -> StopSignals:
        """Our handlers; again after a library replaced them (Ray's core worker installs its own SIGTERM
        handler in `ray.init`, which ends the process at once)."""
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                current = signal.getsignal(number)
                if current is not signal.SIG_IGN and current != self._received:
                    previous = signal.signal(number, self._received)
                    self._previous.setdefault(number, previous)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():  # None: set outside Python; the default then
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def _received(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        if self._abandon:
            self._abandon = False
            raise Interrupted(self.signum)

    def stopped(self, err: KeyboardInterrupt) -> None:
        """Note a KeyboardInterrupt that was raised, not signalled (Ctrl-C as Python's default handler
        turns it into one, or a progress callback)."""
        self.signum = self.signum or getattr(err, "signum", signal.SIGINT)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        self._abandon = True
        try:
            if self.signum:  # checked once armed: a signal just before raises here, one after in the handler
                raise Interrupted(self.signum)
            yield
        finally:
            self._abandon = False


# ------------------------------------------------------------------------------ where the batch writes


@contextmanager
def prepared_outputs(out: Path, report: Path | None, jobs: list[Job]) -> Iterator[list[Job]]:
    """Every place the batch writes, tried before any image (else an ArgumentError naming the path and
    why: exit 2): OUTDIR is created with its folder of temporaries, the report opened for appending, and
    each destination folder created and given a file renamed into it from the temporaries, as each output
    will be. Yields the jobs with where their temporary files go. On the way out the temporaries go, and
    so do the folders made here that stayed empty (and, after an error, OUTDIR and an empty report too)."""
    made: list[Path] = []
    mine = None
    try:
        _checked(f"-o {out}", out, _make_folder, out, made)
        kept = len(made)  # OUTDIR and its parents stay once the batch has run
        mine = _checked(f"-o {out}: cannot write in it", out, open_temporaries, out)
        if report is not None:
            _open_report(report, made)
        where = {folder: _writable(folder, source, mine, made) for folder, source in _folders(out, jobs).items()}
        yield [replace(job, temporary_dir=where.get(job.target.parent)) for job in jobs]
    except BaseException:
        _remove_empty(made, mine)
        raise
    _remove_empty([p for p in made[kept:] if p.is_dir()], mine)


def _folders(out: Path, jobs: list[Job]) -> dict[Path, Path | None]:
    """Each folder that will receive an output, with one input that lands there (OUTDIR itself first)."""
    folders: dict[Path, Path | None] = {out.resolve(): None}
    for job in jobs:
        if not job.skip:
            folders.setdefault(job.target.parent, job.source)
    return folders


def _writable(folder: Path, source: Path | None, temporaries: Path, made: list[Path]) -> Path | None:
    what = f"output folder {folder}" + (f" (of {source})" if source else "")
    _checked(what, folder, _make_folder, folder, made)
    return _checked(f"{what}: cannot write in it", folder, temporaries_for, folder, temporaries)


def _open_report(report: Path, made: list[Path]) -> None:
    _checked(f"--report {report}", report, _make_folder, report.parent, made)
    existed = os.path.lexists(report)
    os.close(_checked(f"--report {report}: cannot open it for appending", report, open_regular, report, APPEND))
    if not existed:
        made.append(report)


def _make_folder(folder: Path, made: list[Path]) -> None:
    """`folder` and its missing parents, each one made noted; whatever is in the way is named."""
    for part in [*reversed(folder.parents), folder]:
        if part.is_dir():
            continue
        if os.path.lexists(part):
            raise NotADirectoryError(errno.ENOTDIR, f"{part} is a {file_kind(part) or 'file'}, not a folder")
        part.mkdir(exist_ok=True)
        made.append(part)


def _checked(what: str, path: Path, action: Callable[..., T], *args: Any) -> T:
    """`action(*args)`, an OSError becoming a one-line usage error: `what`, why, and where if elsewhere."""
    try:
        return action(*args)
    except OSError as err:
        where = f" ({err.filename})" if err.filename and Path(err.filename) != path else ""
        raise ArgumentError(f"{what}: {err.strerror or err}{where}") from None


def _remove_empty(paths: list[Path], temporaries: Path | None) -> None:
    """The folder of temporaries, then each of `paths` that is empty, the deepest first."""
    if temporaries is not None:
        close_temporaries(temporaries)
    for path in reversed(paths):
        with suppress(OSError):
            if path.is_dir():
                path.rmdir()  # only when empty
            elif path.stat().st_size == 0:
                path.unlink()


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
    paths = [p for item in args.inputs for p in (image_files(item) if item.is_dir() else [item])]
    failed = 0
    for path in paths:
        try:
            geometry = plan_geometry(*image_size(path), sr_scale=args.sr_scale, resize_back=not args.no_resize_back)
            plan = plan_restore(manifest, geometry, backend=args.backend, precision=precision,
                                tile_size=args.tile_size, score_given=args.score is not None,
                                memory_budget=args.memory_budget)
            _plan_line(args.json, {"input": str(path), **plan.record()}, f"{path}: {plan.summary()}")
        except AdaptBIRError as err:
            failed += 1
            message = without_path(err, path)
            _plan_line(args.json, {"input": str(path), "error": message}, f"{path}: error: {message}")
    return 1 if failed else 0


def _plan_line(as_json: bool, record: dict[str, Any], line: str) -> None:
    """JSON is printed as it is (json.dumps escapes every control character); a line through `say`."""
    if as_json:
        print(json.dumps(record))
    else:
        say(line, sys.stdout)


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


@dataclass
class _Tally:
    failures: list[str]
    done: int = 0
    skipped: int = 0


def _restore(args) -> int:
    jobs, problems = check_restore_arguments(args)
    tally = _Tally(list(problems))
    with StopSignals() as stop:  # from before the first write to the last line printed
        with prepared_outputs(args.out, args.report, jobs) as jobs:
            pipeline = _load(args, stop)
            shown = BatchProgress(len(jobs), quiet=args.quiet)
            for job in jobs:
                if stop.signum or not _run_job(job, pipeline, args, stop, shown, tally):
                    break
            shown.close()
        return finish_batch(tally.done, tally.skipped, tally.failures, len(jobs) + len(problems), args.out,
                            stop.signum is not None, stop.signum or signal.SIGINT)


def _load(args, stop: StopSignals):
    """The engines (a usage error, exit 2, if they cannot load); None when a stop signal came first."""
    from .pipeline import Pipeline

    try:
        with stop.abandonable():
            pipeline = Pipeline.from_engines(args.engines, backend=args.backend, threads=args.threads,
                                             precision=args.cpu_precision, memory_budget=args.memory_budget)
        check_arguments(steps=args.steps, max_steps=pipeline.max_steps)  # this directory's schedule
        return pipeline
    except KeyboardInterrupt as err:
        stop.stopped(err)
        return None


def _run_job(job: Job, pipeline, args, stop: StopSignals, shown: BatchProgress, tally: _Tally) -> bool:
    """One image, then its record; False when the report cannot take the record (the batch stops)."""
    started = time.perf_counter()
    record = _restore_job(job, pipeline, args, stop, shown, tally)
    record["wall_s"] = round(time.perf_counter() - started, 6)
    try:
        append_report(args.report, record)
    except OSError as err:
        tally.failures.append(f"--report {args.report}: cannot append a record ({err.strerror or err}); stopped")
        shown.write(f"adaptbir: {tally.failures[-1]}")
        return False
    shown.advance()
    return True


def _restore_job(job: Job, pipeline, args, stop: StopSignals, shown: BatchProgress, tally: _Tally
                 ) -> dict[str, Any]:
    """Restored and written, skipped, failed or interrupted: the image's report record."""
    from .image_io import read_image

    record: dict[str, Any] = {"input": str(job.source), **pipeline.describe()}
    progress = shown.image(job.source.name)
    try:
        if job.skip:
            tally.skipped += 1
            record.update(status="skipped", reason="output exists (--on-exists skip)", output=str(job.target))
        else:
            with stop.abandonable():  # a stop signal drops the image here; past this point it is finished
                result = restore_loaded(pipeline, read_image(job.source), args, args.seed, progress)
            write_output(job, result.image, args)
            tally.done += 1
            record.update(status="ok", output=str(job.target), **result.record())
            for warning in result.warnings:
                shown.write(f"adaptbir: {job.source}: warning: {warning}")
        progress.finish(record["status"])
    except KeyboardInterrupt as err:  # the image is abandoned (or, if raised after its write, kept)
        stop.stopped(err)
        progress.finish(record.setdefault("status", "interrupted"))
    except Exception as err:  # any per-image failure is recorded and the batch goes on
        message = without_path(err, job.source)
        tally.failures.append(f"{job.source}: {message}")
        record.update(status="failed", error=message)  # the record names the input once, in "input"
        progress.finish("failed")
        shown.write(f"adaptbir: {tally.failures[-1]}")
    return record


def finish_batch(done: int, skipped: int, failures: list[str], total: int, out: Path, interrupted: bool,
                 signum: int = signal.SIGINT) -> int:
    """The batch's summary on stderr, and its exit status: 0 all restored, 1 some failed, 128 + `signum`
    interrupted (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
    verb = "interrupted after" if interrupted else "restored"
    why = f" ({signal.Signals(signum).name})" if interrupted else ""
    say(f"{verb} {done}, skipped {skipped}, failed {len(failures)} of {total} input(s) -> {out}{why}")
    for failure in failures:
        say(f"  failed: {failure}")
    return 128 + signum if interrupted else 1 if failures else 0


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
    """Atomic: the output appears whole or not at all (its temporary file in `job.temporary_dir` if set)."""
    from .image_io import write_image

    write_image(job.target, out.rgb, alpha=out.alpha, icc_profile=out.icc_profile, exif=out.exif,
                fmt=args.format, quality=args.quality, temporary_dir=job.temporary_dir)


def append_report(path: Path | None, record: dict[str, Any]) -> None:
    """One JSON line, flushed to disk before the next image (a crash loses no finished record)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_regular(path, APPEND), "a") as f:  # never blocks on a FIFO put in its place
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
    return "\n".join(map(printable, lines))  # a name in the manifest cannot add a line


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"restore": _restore, "plan": _plan, "info": _info}[args.command](args)
    except AdaptBIRError as err:
        say(f"adaptbir: error: {err}")
        return 2
    except KeyboardInterrupt as err:  # outside a batch (plan, info, a job plan): nothing was written
        number = getattr(err, "signum", signal.SIGINT)
        say(f"adaptbir: interrupted ({signal.Signals(number).name})")
        return 128 + number


if __name__ == "__main__":
    sys.exit(main())
