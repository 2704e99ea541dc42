"""`adaptbir-ray submit`: photos restored by a running `adaptbir-ray serve` as jobs, and written as `adaptbir
restore` writes them — the same output names, atomic writes, report records, progress and summary.

    adaptbir-ray submit photos/ --url http://127.0.0.1:8000 -o restored/ [--in-flight 4] [--steps 50 --seed 0]

Each image is one job (`client.submit`), followed through its event stream (`client.wait`: queue place,
stage, step and ETA) and fetched when done. `--in-flight N` keeps N jobs at the service at once (its
replicas × slots restore them side by side; more wait in its queue); a 503 (the service's job limit) is
retried after the Retry-After it gives. A failed image is reported and the batch goes on (exit 1); a stop
signal cancels the jobs at the service and ends with the summary (128 + the signal).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
import urllib.error
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_any
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptbir.runtime.atomic import atomic_write
from adaptbir.runtime.batch import Job, append_report, check_report, finish_batch, outcome, plan_jobs, prepared_outputs
from adaptbir.runtime.errors import ArgumentError
from adaptbir.runtime.options import RestoreOptions
from adaptbir.runtime.progress import BatchProgress, ImageProgress
from adaptbir.runtime.signals import StopSignals

from . import client

FORMATS = ("png", "jpeg", "webp")  # what the service encodes
MAX_RETRY_WAIT = 60.0  # seconds between tries of a job the service had no room for, at most


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="PHOTO", help="image files or directories (recursive)")
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000 (adaptbir-ray serve)")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR",
                        help="output folder (created; folders keep their layout inside it)")
    parser.add_argument("--format", default="png", choices=FORMATS, help="output image format (the service encodes it)")
    parser.add_argument("--on-exists", default="skip", choices=("skip", "overwrite", "suffix"),
                        help="when an output exists: keep it, replace it, or write NAME-1, NAME-2, ...")
    parser.add_argument("--report", type=Path, help="append one JSON record per image to this JSONL file")
    parser.add_argument("--in-flight", type=int, default=1, metavar="N", help="jobs kept at the service at once "
                        "(its replicas × --max-ongoing-requests restore side by side)")
    parser.add_argument("--quiet", action="store_true", help="no progress, only errors and the summary")
    RestoreOptions.add_arguments(parser, query_only=True)


@dataclass
class _Batch:
    """What the threads share: the service, the query, the progress, the jobs at the service (id by input),
    and the event that stops them."""

    url: str
    query: dict[str, Any]
    fmt: str
    engine: dict[str, Any]
    shown: BatchProgress
    concurrent: bool
    halt: threading.Event = field(default_factory=threading.Event)
    at_service: dict[Path, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def submit_command(args: argparse.Namespace) -> int:
    """The exit status: 0 all restored, 1 some failed, 2 a usage error or an unreachable service, 128 + the
    signal when stopped."""
    if args.in_flight < 1:
        raise ArgumentError(f"--in-flight must be at least 1, not {args.in_flight}")
    options = RestoreOptions.from_namespace(args)  # checked here: a typo is a usage error, not N failures
    query = {"steps": options.steps, "seed": options.seed, "score": options.score, "k": options.k, "w": options.w,
             "format": args.format}
    inputs = plan_jobs(list(args.inputs), args.out, args.format, args.on_exists)
    check_report(args.report, inputs.jobs)
    engine = _engine(args.url)
    done, skipped, failures = 0, 0, list(inputs.problems)
    with StopSignals() as stop:
        with prepared_outputs(args.out, args.report, inputs.jobs) as jobs:
            shown = BatchProgress(len(jobs), quiet=args.quiet)
            batch = _Batch(args.url.rstrip("/"), query, args.format, engine, shown, args.in_flight > 1)
            for record in _run(batch, jobs, args.in_flight, stop):
                append_report(args.report, record)
                done += record["status"] == "ok"
                skipped += record["status"] == "skipped"
                if record["status"] == "failed":
                    failures.append(f"{record['input']}: {record['error']}")
                    shown.write(f"adaptbir-ray: {failures[-1]}")
            shown.close()
        return finish_batch(done, skipped, failures, inputs, args.out, stop.signum is not None,
                            stop.signum or signal.SIGINT)


def _engine(url: str) -> dict[str, Any]:
    """The service's engines as a report record names them (GET /info); a usage error when unreachable."""
    try:
        info = client.info(url)
    except (OSError, client.ServiceError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise ArgumentError(f"--url {url}: no adaptbir-ray service answers there ({reason})") from None
    return {key: info.get(key) for key in ("engines", "engine_id", "backend", "precision", "compute_precision",
                                           "runtime")}


def _run(batch: _Batch, jobs: list[Job], in_flight: int, stop: StopSignals):
    """Each image's record as it ends, `in_flight` at the service at once; a stop signal cancels the jobs
    there (their records say interrupted) and submits no more."""
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="adaptbir-submit") as pool:
        running: set[Future] = set()
        pending = list(jobs)
        try:
            with stop.abandonable():
                while pending or running:
                    while pending and len(running) < in_flight:
                        running.add(pool.submit(_one, batch, pending.pop(0)))
                    finished, running = wait_any(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        yield future.result()
        except KeyboardInterrupt as err:
            stop.stopped(err)
            _cancel_all(batch)
            for future in running:
                yield future.result()


def _cancel_all(batch: _Batch) -> None:
    batch.halt.set()
    with batch.lock:
        ids = list(batch.at_service.values())
    for job_id in ids:  # each waiting thread then sees its job end at once
        try:
            client.cancel(batch.url, job_id)
        except (OSError, client.ServiceError):
            pass


def _one(batch: _Batch, job: Job) -> dict[str, Any]:
    """One image: submitted, followed, fetched and written — its report record."""
    record: dict[str, Any] = {"input": str(job.source), **batch.engine}
    hooks = batch.shown.image(job.source.name)
    started = time.perf_counter()
    try:
        if job.skip:
            record.update(status="skipped", reason="output exists (--on-exists skip)", output=str(job.target))
        elif batch.halt.is_set():
            record.update(status="interrupted")
        else:
            _restore(batch, job, hooks, record)
    except (OSError, ValueError, client.ServiceError) as err:  # the service's refusal, a lost connection
        message = err.message if isinstance(err, client.ServiceError) else str(err)
        record.update(status="failed", error=message)
    hooks.finish("failed" if record["status"] == "failed" else outcome(record))
    record["wall_s"] = round(time.perf_counter() - started, 6)
    return record


def _restore(batch: _Batch, job: Job, hooks: ImageProgress, record: dict[str, Any]) -> None:
    """Submitted, followed to its end, fetched and written; `record` says how it went."""
    submitted = _submit(batch, job.source.read_bytes())
    if submitted is None:
        record.update(status="interrupted")
        return
    record.update(job=submitted["id"], service=batch.url)
    with batch.lock:
        batch.at_service[job.source] = submitted["id"]
    try:
        follow = None if batch.concurrent and batch.shown.mode == "bars" else _Follow(hooks)  # one steps bar
        final = client.wait(batch.url, submitted["id"], progress=follow)
    finally:
        with batch.lock:
            batch.at_service.pop(job.source, None)
    if final["state"] == "cancelled" and batch.halt.is_set():
        record.update(status="interrupted")
    elif final["state"] != "done":
        record.update(status="failed", error=f"the job ended {final['state']}: {final.get('error') or 'no reason'}")
    else:
        image, info = client.result(batch.url, submitted["id"])
        atomic_write(job.target, lambda f: f.write(image), job.temporary_dir)
        record.update(status="ok", output=str(job.target), **json.loads(info.get("record", "{}")))


def _submit(batch: _Batch, body: bytes) -> dict[str, Any] | None:
    """The job's first status; while the service has no room (503), tried again after its Retry-After.
    None when the batch was stopped meanwhile."""
    while not batch.halt.is_set():
        try:
            return client.submit(batch.url, body, **batch.query)
        except client.ServiceError as err:
            if err.status != 503:
                raise
            batch.halt.wait(min(err.retry_after or 5.0, MAX_RETRY_WAIT))
    return None


class _Follow:
    """A job's events as the local CLI's progress: its queue place, each stage as it begins, each step."""

    def __init__(self, hooks: ImageProgress):
        self.hooks = hooks
        self.place: tuple[str, Any] | None = None  # ("queued", position) or ("stage", name)
        self.step = 0

    def __call__(self, status: dict[str, Any]) -> None:
        place = ("queued", status["position"]) if status["state"] == "queued" else ("stage", status["stage"])
        if place != self.place and place[1] is not None:
            self.place = place
            self.hooks.steps = status["steps"]
            ahead = f"{place[1]} ahead" if place[1] else "next in line"
            self.hooks.stage(status["stage"] if place[0] == "stage" else f"waiting at the service, {ahead}",
                             status["tiles"])
        if status["stage"] == "sample" and status["step"] > self.step:
            self.step = status["step"]
            self.hooks.step(status["step"], status["steps"])
