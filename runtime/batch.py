"""A batch of images: where each lands (decided before any work), every place it writes tried first, one
image at a time into its report record, the summary and the exit status. `adaptbir restore` and
`adaptbir-ray restore` share it.

A batch continues past an image that fails, reports it, and exits non-zero. Outputs are written atomically,
never outside OUTDIR, and never over an input; SIGINT, SIGTERM and SIGHUP stop it at once: the image being
restored is dropped (an output being written is finished), nothing partial is left. Only regular files are read.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .atomic import TEMPORARIES, close_temporaries, file_kind, open_regular, open_temporaries, temporaries_for
from .backend import add_backend_arguments
from .errors import AdaptBIRError, ArgumentError
from .formats import identify_file
from .image_io import READ_SUFFIXES, WRITE_FORMATS
from .options import RestoreOptions
from .progress import BatchProgress, ImageProgress, plural, say
from .signals import StopSignals

FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "same": ""}  # --format -> suffix
KEPT_SUFFIXES = tuple(f".{name}" for name in WRITE_FORMATS)  # --format same keeps these; other kinds -> .png
APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path  # resolved, under OUTDIR
    skip: bool = False  # the output exists and --on-exists is skip
    temporary_dir: Path | None = None  # where its temporary file is written (None: beside the target)


@dataclass(frozen=True)
class BatchSettings:
    """What a batch needs besides the restore options (`RestoreOptions`): its inputs, the engines and how
    they run, where and how outputs are written, the report. Checked when made (`ArgumentError`)."""

    inputs: tuple[Path, ...]
    out: Path
    engines: Path
    backend: str = "ort-cpu"
    cpu_precision: str | None = None  # openvino: bf16 or f32 (None: bf16 where the CPU has it)
    threads: int | None = None
    format: str = "png"
    quality: int = 95
    on_exists: str = "skip"
    report: Path | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not 0 <= self.quality <= 100:
            raise ArgumentError(f"--quality must be from 0 to 100, not {self.quality}")
        if self.threads is not None and self.threads < 1:
            raise ArgumentError(f"--threads must be at least 1, not {self.threads}")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> BatchSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in vars(args).items() if name in names})

    def output_key(self) -> dict[str, Any]:
        """What, besides the restore options and the engines, decides an output's bytes."""
        return {"format": self.format, "quality": self.quality, "backend": self.backend,
                "cpu_precision": self.cpu_precision}

    def plan(self) -> Inputs:
        """Where every input lands (`plan_jobs`) and the report checked against them, before anything is
        written."""
        inputs = plan_jobs(list(self.inputs), self.out, self.format, self.on_exists)
        check_report(self.report, inputs.jobs)
        return inputs

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The batch's own flags (inputs, -o, --engines, threads, outputs, report); `add_restore_arguments`
        adds the backend's and the restore options' beside them."""
        parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                            help="image files or directories (recursive)")
        parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR",
                            help="output folder (created; folders keep their layout inside it)")
        parser.add_argument("--engines", type=Path, required=True, help="engine directory (adaptbir-export build)")
        parser.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime or OpenVINO (default: all cores)")
        parser.add_argument("--format", default="png", choices=tuple(FORMATS), help="output image format; same: "
                            "the input's (PNG, JPEG, WebP, TIFF, by its suffix), PNG for other kinds")
        parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality (0..100)")
        parser.add_argument("--on-exists", default="skip", choices=("skip", "overwrite", "suffix"),
                            help="when an output exists: keep it, replace it, or write NAME-1, NAME-2, ...")
        parser.add_argument("--report", type=Path, help="append one JSON record per image to this JSONL file")
        parser.add_argument("--quiet", action="store_true", help="no progress, only errors and the summary")


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `adaptbir restore`, shared with `adaptbir-ray restore` (one CLI, two engines)."""
    BatchSettings.add_arguments(parser)
    add_backend_arguments(parser)
    RestoreOptions.add_arguments(parser)


def restore_command(args: argparse.Namespace) -> tuple[BatchSettings, RestoreOptions, Inputs]:
    """The command line as the batch's settings and options; every usage error (exit 2) before the engines
    load and before any image is touched; then where every input lands."""
    settings, options = BatchSettings.from_namespace(args), RestoreOptions.from_namespace(args)
    return settings, options, settings.plan()


@dataclass(frozen=True)
class Inputs:
    """What a batch's inputs hold, decided before any work."""

    jobs: list[Job]
    problems: list[str]  # named inputs that do not exist, outputs that would fall outside OUTDIR: failures
    not_images: list[tuple[Path, str]]  # files the folder walks passed over, each with what it is instead


def walk(folder: Path, root: Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """A folder's images, recursively, in a stable order, and every other file in it with what it is instead
    (`formats.identify`: "PDF document; export its pages as PNG first"). An image is a file with an image
    suffix (a FIFO or device too: named as such when read, never skipped in silence) or a file whose first
    bytes are a format the runtime reads; nothing in a batch's folder of temporaries or inside OUTDIR (`root`)
    is looked at."""
    if root is not None and folder.resolve().is_relative_to(root):  # OUTDIR itself included
        raise ArgumentError(f"{folder}: this input folder is the output folder or inside it; choose another -o")
    images, others = [], []
    for path in sorted(folder.rglob("*")):
        if TEMPORARIES in path.relative_to(folder).parts or path.is_dir() or (
                root is not None and path.parent.resolve().is_relative_to(root)):
            continue
        kind = None if path.suffix.lower() in READ_SUFFIXES else identify_file(path)
        if path.suffix.lower() in READ_SUFFIXES or (kind is not None and kind.readable):
            images.append(path)
        else:
            others.append((path, kind.describe() if kind else "not an image (unrecognised content)"))
    return images, others


def find_inputs(inputs: list[Path], root: Path | None = None
                ) -> tuple[list[tuple[Path, Path]], list[Path], list[tuple[Path, str]]]:
    """(source, its path relative to OUTDIR) of every input image, the named inputs that do not exist, and what
    the folder walks passed over (`walk`). No image at all is a usage error that says what was found."""
    found, missing, others = [], [], []
    for item in inputs:
        if item.is_dir():
            images, skipped = walk(item, root)
            found += [(p, p.relative_to(item)) for p in images]
            others += skipped
        elif item.exists():  # a FIFO or device too: refused by name when read, never opened
            found.append((item, Path(item.name)))
        else:
            missing.append(item)
    if not found:
        seen = [f"{path}: no such file or directory" for path in missing] + [
            f"{path}: {why}" for path, why in others[:5]] + (
            [f"... and {len(others) - 5} more files"] if len(others) > 5 else [])
        raise ArgumentError("no input image" + (f": {'; '.join(seen)}" if seen else " (the folders are empty)"))
    return found, missing, others


def plan_jobs(inputs: list[Path], out: Path, fmt: str, policy: str) -> Inputs:
    """Every input and where it lands, decided before any work (`find_inputs`).

    Files land under OUTDIR by name, folders keep their relative layout; the suffix becomes the output
    format's. Two inputs that would land on one output are refused (naming them); an output that would be
    an input gets the first free `NAME-N` instead; an existing output follows `policy` (skip, overwrite,
    or suffix: the first free `NAME-N`)."""
    root = out.resolve()
    found, missing, not_images = find_inputs(inputs, root)
    found = [(source.absolute(), relative) for source, relative in found]  # records name both ends absolute
    problems = [f"{path}: no such file or directory" for path in missing]
    by_target: dict[Path, list[Path]] = {}
    for source, relative in found:
        by_target.setdefault((root / relative).with_suffix(output_suffix(source, fmt)), []).append(source)
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
    return Inputs(jobs, problems, not_images)


def output_suffix(source: Path, fmt: str) -> str:
    """The suffix of `source`'s output, which is also the format it is written in (`write_output`)."""
    if fmt != "same":
        return FORMATS[fmt]
    suffix = source.suffix.lower()
    return suffix if suffix in KEPT_SUFFIXES else ".png"


def _free_name(target: Path, taken: set[Path], must_not_exist: bool) -> Path:
    n = 1
    while (candidate := target.with_name(f"{target.stem}-{n}{target.suffix}")) in taken or (
            must_not_exist and candidate.exists()):
        n += 1
    return candidate


def check_report(report: Path | None, jobs: list[Job]) -> None:
    if report is None:
        return
    where = report.resolve()
    if where.suffix.lower() in READ_SUFFIXES or where in {j.source.resolve() for j in jobs} | {j.target for j in jobs}:
        raise ArgumentError(f"--report {report}: would write over an image (an input or an output); name a "
                            ".jsonl file")


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


@dataclass
class _Tally:
    failures: list[str]
    done: int = 0
    skipped: int = 0


def restore_batch(settings: BatchSettings, options: RestoreOptions, inputs: Inputs) -> int:
    """Restore the planned jobs (`adaptbir restore`); the exit status: 0 all restored, 1 some failed, 2 a
    write place or the engines unusable (ArgumentError/EngineError raised before any image), 128 + the signal
    when stopped."""
    tally = _Tally(list(inputs.problems))
    with StopSignals() as stop:  # from before the first write to the last line printed
        with prepared_outputs(settings.out, settings.report, inputs.jobs) as jobs:
            loaded = _load(settings, options, stop)
            shown = BatchProgress(len(jobs), quiet=settings.quiet)
            for job in jobs:
                if stop.signum or not _run_job(job, *loaded, settings, stop, shown, tally):
                    break
            shown.close()
        return finish_batch(tally.done, tally.skipped, tally.failures, inputs, settings.out,
                            stop.signum is not None, stop.signum or signal.SIGINT)


def _load(settings: BatchSettings, options: RestoreOptions, stop: StopSignals) -> tuple[Any, RestoreOptions]:
    """The engines and the options on their schedule (a usage error, exit 2, if either fails); (None,
    options) when a stop signal came first."""
    from .pipeline import Pipeline

    try:
        with stop.abandonable():
            pipeline = Pipeline.from_engines(settings.engines, backend=settings.backend, threads=settings.threads,
                                             precision=settings.cpu_precision)
        return pipeline, pipeline.options(options)
    except KeyboardInterrupt as err:
        stop.stopped(err)
        return None, options


def _run_job(job: Job, pipeline, options: RestoreOptions, settings: BatchSettings, stop: StopSignals,
             shown: BatchProgress, tally: _Tally) -> bool:
    """One image, then its record; False when the report cannot take the record (the batch stops)."""
    started = time.perf_counter()
    record = _restore_job(job, pipeline, options, settings, stop, shown, tally)
    record["wall_s"] = round(time.perf_counter() - started, 6)
    try:
        append_report(settings.report, record)
    except OSError as err:
        tally.failures.append(f"--report {settings.report}: cannot append a record ({err.strerror or err}); stopped")
        shown.write(f"adaptbir: {tally.failures[-1]}")
        return False
    return True


def _restore_job(job: Job, pipeline, options: RestoreOptions, settings: BatchSettings, stop: StopSignals,
                 shown: BatchProgress, tally: _Tally) -> dict[str, Any]:
    """Restored and written, skipped, failed or interrupted: the image's report record."""
    from .image_io import read_image

    record: dict[str, Any] = {"input": str(job.source), **pipeline.describe()}
    progress = shown.image(job.source.name, options.steps)
    try:
        if job.skip:
            tally.skipped += 1
            record.update(status="skipped", reason="output exists (--on-exists skip)", output=str(job.target))
        else:
            with stop.abandonable():  # a stop signal drops the image here; past this point it is finished
                result = restore_loaded(pipeline, read_image(job.source), options, progress)
            write_output(job, result.image, settings)
            tally.done += 1
            record.update(status="ok", output=str(job.target), **result.record())
            for warning in result.warnings:
                shown.write(f"adaptbir: {job.source}: warning: {warning}")
        progress.finish(outcome(record))
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


def finish_batch(done: int, skipped: int, failures: list[str], inputs: Inputs, out: Path, interrupted: bool,
                 signum: int = signal.SIGINT) -> int:
    """The batch's summary on stderr, and its exit status: 0 all restored, 1 some failed, 128 + `signum`
    interrupted (130 SIGINT, 143 SIGTERM, 129 SIGHUP). Files the folder walks passed over are counted and
    named, grouped by what they are; they do not fail the batch."""
    verb = "interrupted after" if interrupted else "restored"
    why = f" ({signal.Signals(signum).name})" if interrupted else ""
    total = len(inputs.jobs) + len(inputs.problems)
    others = f", {plural(len(inputs.not_images), 'file')} not an image" if inputs.not_images else ""
    say(f"{verb} {done}, skipped {skipped}, failed {len(failures)} of {plural(total, 'input')}{others} -> {out}{why}")
    for what, paths in _grouped(inputs.not_images).items():
        names = ", ".join(p.name for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        say(f"  not an image: {names} ({what})")
    for failure in failures:
        say(f"  failed: {failure}")
    return 128 + signum if interrupted else 1 if failures else 0


def _grouped(items: list[tuple[Path, str]]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path, what in items:
        groups.setdefault(what, []).append(path)
    return groups


def outcome(record: dict[str, Any]) -> str:
    """An image's last progress line: its status, and for a restored one its sizes and why they changed."""
    return f"{record['status']}, {record['size_change']}" if "size_change" in record else record["status"]


def without_path(err: Exception, source: Path) -> str:
    """The error's message without a leading `source: ` (the caller names the input once)."""
    message = str(err) if isinstance(err, (AdaptBIRError, OSError)) else f"{type(err).__name__}: {err}"
    return message.removeprefix(f"{source}: ")


def restore_loaded(pipeline, image, options: RestoreOptions, progress: ImageProgress | None = None):
    """One image restored with the batch's options (the same call for `adaptbir-ray restore`)."""
    return pipeline.restore(image, options, progress=progress.step if progress else None,
                            on_stage=progress.stage if progress else None)


def write_output(job: Job, out, settings: BatchSettings) -> None:
    """Atomic: the output appears whole or not at all (its temporary file in `job.temporary_dir` if set), in
    the format its suffix names (`output_suffix`)."""
    from .image_io import write_image

    write_image(job.target, out.rgb, alpha=out.alpha, icc_profile=out.icc_profile, exif=out.exif,
                fmt=job.target.suffix, quality=settings.quality, temporary_dir=job.temporary_dir)


def append_report(path: Path | None, record: dict[str, Any]) -> None:
    """One JSON line, flushed to disk before the next image (a crash loses no finished record)."""
    append_records(path, [record])


def append_records(path: Path | None, records: list[dict[str, Any]]) -> None:
    """JSON lines in one write and one fsync (e.g. a dispatched record per image of a large collection)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_regular(path, APPEND), "a") as f:  # never blocks on a FIFO put in its place
        f.write("".join(json.dumps(record) + "\n" for record in records))
        f.flush()
        os.fsync(f.fileno())


