"""`adaptbir-ray restore`: a photo collection restored on a Ray cluster with Ray Data.

    adaptbir-ray restore photos/ -o restored/ --engines /shared/engines/sd21 --address auto --actors 8

The same command as `adaptbir restore` (the same arguments, checks, job plan, restore call and atomic
writes), run as a Ray Data pipeline: the planned jobs → read and decode (Ray tasks, a quarter CPU each) →
restore in an actor pool (each actor loads the engine directory once; it writes its outputs atomically) →
the driver appends one report record per image. The engine directory is on storage every node sees, or
carried to each node once through Ray's object store with `--ship-engines` (see shipping.py). Inputs are
read by the read tasks, not by the driver (it hashes only the images a re-run may skip).

Every output is bit-identical to `adaptbir restore` with the same options, `--threads` included (ONNX
Runtime's last bits follow its thread count; here `--threads` is each actor's): with `--seed S` every image
gets S; without, each image's seed is derived from its pixels, as there (`options.seed_for`, recorded), so no
result depends on which actor ran it, or on a retry. (Tiling follows the memory budget: each actor
plans within its claimed share of its node's memory unless `--memory-budget` is given, so an image large
enough to tile under one budget and not the other differs; give the same budget to both commands.)
Re-running skips every image whose output exists and whose report record (same input bytes, options and
engine id) says ok; a killed actor is restarted by Ray and its image retried, and a half-written output is
never left (atomic writes). The report names every image as "dispatched" before any actor may write it, so
an output written after its driver died (Ray stops a dead driver's actors within seconds, not at once) is
known to be unfinished, and a re-run restores it again instead of keeping it as "output exists".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import pickle
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adaptbir.runtime.batch import (
    BatchSettings,
    Inputs,
    Job,
    append_records,
    append_report,
    finish_batch,
    outcome,
    prepared_outputs,
    restore_loaded,
    without_path,
    write_output,
)
from adaptbir.runtime.errors import ArgumentError
from adaptbir.runtime.manifest import Manifest
from adaptbir.runtime.options import RestoreOptions
from adaptbir.runtime.progress import BatchProgress, plural, say
from adaptbir.runtime.signals import StopSignals

from .shipping import EngineShipment, default_cache, ship

READ_CPUS = 0.25  # a read task's share of a CPU
READ_MEMORY_SHARE = 0.1  # of a node's memory, left to read tasks when actors claim theirs
ACTOR_CPU_SHARE = 0.8  # an actor claims this × its threads, so read tasks always find room (a 2-core laptop too)


def _fit(cpus: float, claim: float) -> int:
    """How many claims of `claim` CPUs a node with `cpus` free places."""
    return int(max(cpus, 0.0) / claim + 1e-9)


def pool_size(node_cpus: list[float], threads: int, actors: int | None = None) -> tuple[int, float]:
    """Restoring actors and the CPUs each claims from Ray, so that every actor can be placed and a read task
    still finds room: by default one actor per `threads` CPUs of the cluster, each claiming 0.8 × threads —
    less when that would not fit (more actors than cores, more threads than a node has): a claim is a
    scheduling share, the threads run regardless. Without room for reads, the job would wait forever."""
    if max(node_cpus, default=0.0) <= READ_CPUS:
        raise ArgumentError(f"the Ray cluster has no node with a CPU to spare (CPUs per node: {node_cpus})")

    def placed(claim: float) -> int:  # actors that fit while one node (the best one) keeps a read's share
        fits = [_fit(cpus, claim) for cpus in node_cpus]
        return sum(fits) + max(_fit(cpus - READ_CPUS, claim) - n for cpus, n in zip(node_cpus, fits, strict=True))

    actors = actors or max(1, int(sum(node_cpus) // threads))
    claim = ACTOR_CPU_SHARE * threads
    if placed(claim) < actors:  # the largest claim that places them all (bisection: placed() only grows)
        low, high = 0.0, claim
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (middle, high) if placed(middle) >= actors else (low, middle)
        claim = low
    return actors, math.floor(claim * 1e4) / 1e4  # Ray's resolution


def actor_memory(nodes: list[tuple[float, float]], actors: int, claim: float, needed: int,
                 budget: int | None = None) -> tuple[int, int]:
    """(actors, bytes each) for nodes of (CPUs, Ray `memory` bytes): each actor claims its memory from Ray
    and plans its restores (tiling) within it, so actors placed side by side on a node cannot together run
    it out of memory — an OOM-killed actor would be restarted and its image retried forever. By default an
    actor gets 90 % of its node's memory divided by the actors its CPUs place there (the smallest such
    share); a `budget` (--memory-budget) is claimed as given, and fewer actors run when fewer fit.
    `needed`: what a 512×512 restore needs (below it, no image could be restored)."""
    per_node = [(_fit(cpus, claim) if claim else actors, memory * (1 - READ_MEMORY_SHARE))
                for cpus, memory in nodes]  # the rest: read tasks (Ray Data starts none without memory left)
    share = int(min((memory / count for count, memory in per_node if count), default=0))
    each = budget or share
    if each < needed:
        raise ArgumentError(f"each restoring actor would get {each / 2**30:.1f} GiB of memory, but a 512×512 "
                            f"restore needs about {needed / 2**30:.1f} GiB: run fewer actors (--actors, or more "
                            "--threads each) or give a --memory-budget that fits")
    fitting = sum(min(count, int(memory // each)) for count, memory in per_node)
    return min(actors, fitting), each


def smallest_restore_bytes(manifest: Manifest, settings: BatchSettings, options: RestoreOptions) -> int:
    """Predicted peak of restoring a 512×512 image with these options: what any actor must be allowed. The
    precision is the one the actors compute in (OpenVINO: bf16 where the CPU has it), as `adaptbir plan` asks,
    so an fp16 directory's weights are counted as OpenVINO holds them, not as ONNX Runtime would."""
    from adaptbir.runtime.backends import cpu_precision
    from adaptbir.runtime.plan import plan_image

    precision = cpu_precision(settings.backend, settings.cpu_precision)
    plan = plan_image(manifest, (512, 512), replace(options, tile_size=0), backend=settings.backend,
                      precision=precision)
    return plan.peak_bytes


def options_salt(options: RestoreOptions, settings: BatchSettings, engine_id: str) -> bytes:
    """What, besides the input's bytes, decides an output: the options, the output settings, the engines
    (--report, --quiet, --threads... do not)."""
    decisive = {**options.key(), **settings.output_key()}
    return json.dumps({"options": decisive, "engines": engine_id}, sort_keys=True, default=str).encode()


def resume_key(data: bytes, salt: bytes) -> str:
    """The resume key of an image: sha256 of its file's bytes and the options' salt."""
    return hashlib.sha256(data + salt).hexdigest()


def _file_key(source: Path, salt: bytes) -> str:
    try:
        return resume_key(source.read_bytes(), salt)
    except OSError:
        return ""


def _last_records(report: Path | None) -> dict[str, dict[str, Any]]:
    """output → the last record naming it in a previous run's report (dispatched, ok, failed, ...)."""
    if report is None or not report.is_file():
        return {}
    last = {}
    for line in report.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: that image is simply redone
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str):
            last[record["output"]] = record
    return last


def _read(row: dict[str, Any], salt: bytes) -> dict[str, Any]:
    """Ray task: the image's resume key and decoded pixels (a failure becomes the image's error, never the
    job's). Inputs are read here, on the cluster, not by the driver."""
    from adaptbir.runtime.image_io import read_image

    source = Path(row["source"])
    try:
        key = row["key"] or _file_key(source, salt)
        return {**row, "key": key, "image": pickle.dumps(read_image(source)), "error": ""}
    except Exception as err:
        return {**row, "key": row["key"], "image": b"", "error": without_path(err, source)}


class Restorer:
    """Ray actor: one Pipeline (the engines loaded once), restoring and writing one image per call."""

    def __init__(self, options: RestoreOptions, settings: BatchSettings, shipment: EngineShipment | None = None,
                 memory: int | None = None, engine_cache: Path | None = None):
        from adaptbir.runtime.pipeline import Pipeline

        self.options, self.settings = options, settings
        engines = shipment.unpack(engine_cache or default_cache()) if shipment else settings.engines
        self.pipeline = Pipeline.from_engines(engines, backend=settings.backend, threads=settings.threads,
                                              precision=settings.cpu_precision, memory_budget=memory,
                                              verify=shipment is None)  # unpack() has just verified it

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"input": row["source"], "key": row["key"], **self.pipeline.describe()}
        started = time.perf_counter()
        if row["error"]:
            record.update(status="failed", error=row["error"])
        else:
            try:
                result = restore_loaded(self.pipeline, pickle.loads(row["image"]), self.options)
                job = Job(Path(row["source"]), Path(row["target"]),
                          temporary_dir=Path(row["temporaries"]) if row["temporaries"] else None)
                write_output(job, result.image, self.settings)
                record.update(status="ok", output=row["target"], **result.record())
            except Exception as err:  # any per-image failure is recorded and the job goes on
                record.update(status="failed", error=without_path(err, Path(row["source"])))
        record["wall_s"] = round(time.perf_counter() - started, 6)
        return {"record": json.dumps(record)}


def restore_on_ray(cluster: argparse.Namespace, settings: BatchSettings, options: RestoreOptions,
                   inputs: Inputs) -> int:
    """Run the planned jobs on the cluster of `cluster.address` (None: a local one); the exit status of
    `adaptbir restore` (0 all restored, 1 some failed, 128 + the signal when SIGINT, SIGTERM or SIGHUP
    stopped it: what was written stays whole). Every place the job writes is tried first (exit 2)."""
    from adaptbir.runtime.manifest import load_manifest

    manifest = load_manifest(settings.engines)  # every file hashed once, here: a bad directory stops the job
    options = options.for_schedule(manifest.schedule.default_steps, manifest.max_steps)
    salt = options_salt(options, settings, manifest.identity)
    log = settings.out / RAY_LOG
    with StopSignals() as stop, prepared_outputs(settings.out, settings.report, inputs.jobs) as jobs, \
            ray_output_to(log):
        items, skipped = _dispatch(settings, options, jobs, salt)
        failures, done = list(inputs.problems), 0
        shown = BatchProgress(len(items), quiet=settings.quiet)
        job = _Job(cluster, settings, options, manifest)
        records = _run(job, items, salt, shown, stop) if items else iter(())
        while (record := _next(records, stop)) is not None:
            append_report(settings.report, record)
            if record["status"] == "ok":
                done += 1
            else:
                failures.append(f"{record['input']}: {record['error']}")
                shown.write(f"adaptbir-ray: {failures[-1]}")
            shown.finished(Path(record["input"]).name, outcome(record), record["wall_s"])
        shown.close()
        status = finish_batch(done, skipped, failures, inputs, settings.out,
                              stop.signum is not None, stop.signum or signal.SIGINT)
        if status and log.stat().st_size:
            say(f"  Ray's own messages of this run: {log}")  # not printed on success; errors were
        return status


RAY_LOG = "ray.log"  # in OUTDIR, beside the report


class _RayLog(logging.Handler):
    """Ray's log records into the job's log, and those at ERROR and above to the terminal as well."""

    def __init__(self, sink, terminal) -> None:
        super().__init__(logging.INFO)
        self.sink, self.terminal = sink, terminal
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        self.sink.write(line)
        if record.levelno >= logging.ERROR:
            self.terminal.write(line)


@contextmanager
def ray_output_to(log: Path) -> Iterator[logging.Handler]:
    """Ray's own output during the job goes to `log`, this program's keeps the terminal: its C++ log lines
    (written to file descriptor 2 by the driver's core worker), its Python loggers' records below ERROR and
    its warnings. A run that succeeds then prints only its own lines; one that fails names the log. Ray's
    errors (ERROR and above) still reach the terminal. `ray.init` empties the `ray` logger's handlers, which
    leaves its records to `logging.lastResort`: both are routed here. Yields the handler, for loggers a library
    configures later (Ray Serve's, in `serve.start`)."""
    import ray
    import ray.data  # noqa: F401  (both configure their loggers when imported: done here, before ours are set)

    with open(log, "a", encoding="utf-8") as sink:
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
        shown, show_warning, ray_logger = sys.stderr, warnings.showwarning, logging.getLogger("ray")
        handlers, level, last_resort = list(ray_logger.handlers), ray_logger.level, logging.lastResort
        routed = _RayLog(sink, terminal)
        try:
            sys.stderr = terminal  # Python writes (ours, the progress bars) keep the terminal
            os.dup2(sink.fileno(), 2)  # fd 2: the C++ core worker's lines
            ray_logger.handlers, ray_logger.level, logging.lastResort = [routed], logging.INFO, routed
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sink.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            yield routed
        finally:
            _disconnect_ray()
            sys.stdout.flush()
            os.dup2(terminal.fileno(), 2)
            sys.stderr, warnings.showwarning, logging.lastResort = shown, show_warning, last_resort
            ray_logger.handlers, ray_logger.level = handlers, level
            terminal.close()
    if log.stat().st_size == 0:
        log.unlink()


def _disconnect_ray() -> None:
    """Leave the cluster while Ray's output still goes to the log (at exit it would print to the terminal)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _next(records, stop: StopSignals) -> dict[str, Any] | None:
    """The next finished image's record; None at the end or once a stop signal came (while waiting: at once;
    while a record was being appended: after it). Outputs are written atomically by the actors."""
    try:
        with stop.abandonable():
            return next(records, None)
    except KeyboardInterrupt as err:
        stop.stopped(err)
        return None


def _dispatch(settings: BatchSettings, options: RestoreOptions, jobs: list[Job], salt: bytes
              ) -> tuple[list[dict[str, Any]], int]:
    """The images to restore (and how many are skipped), each recorded in the report before any actor may
    write it: whatever happens to the driver from here on, an output without a later ok record is known to
    be unfinished."""
    last = _last_records(settings.report)
    # Only an image whose output exists and was recorded ok can be skipped: only those are hashed here (in
    # threads: it is file I/O); every other image's key is computed by the read task that loads it.
    candidates = [job for job in jobs if last.get(str(job.target), {}).get("status") == "ok" and job.target.is_file()]
    with ThreadPoolExecutor(8) as pool:
        keys = dict(zip(candidates, pool.map(lambda job: _file_key(job.source, salt), candidates), strict=True))
    items, records = [], []
    for job in jobs:
        before = last.get(str(job.target), {})
        finished = job in keys and keys[job] == before.get("key")
        # An output this job's report names as dispatched and no more is unfinished (an actor wrote it after
        # its driver died, before the record): restored again, not kept as "output exists".
        if finished or (job.skip and before.get("status") != "dispatched"):
            reason = "finished by a previous run" if finished else "output exists (--on-exists skip)"
            records.append({"input": str(job.source), "key": keys.get(job, ""), "status": "skipped",
                            "reason": reason, "output": str(job.target)})
            continue
        items.append({"source": str(job.source), "target": str(job.target), "key": keys.get(job, ""),
                      "temporaries": str(job.temporary_dir or "")})
        records.append({"input": str(job.source), "status": "dispatched", "output": str(job.target)})
    append_records(settings.report, records)
    return items, len(records) - len(items)


@dataclass(frozen=True)
class _Job:
    """One `adaptbir-ray restore` run: where the cluster is and how many actors (the command line's cluster
    flags; the driver's only), the batch's settings and options, the engines' manifest."""

    cluster: argparse.Namespace
    settings: BatchSettings
    options: RestoreOptions
    manifest: Manifest


def _run(job: _Job, items: list[dict[str, Any]], salt: bytes, shown: BatchProgress, stop: StopSignals):
    """The Ray Data pipeline over `items`; yields each image's report record as it finishes."""
    import ray
    import ray.data  # configures its logger on import: quieted after

    cluster, settings = job.cluster, job.settings
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             configure_logging=False)  # its loggers are set by ray_output_to
    stop.install()  # ray.init replaced the SIGTERM handler with one that ends the driver at once
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # progress is ours: one line or bar per image
    ray.data.DataContext.get_current().enable_progress_bars = False
    nodes = [(node["Resources"].get("CPU", 0.0), node["Resources"].get("memory", 0.0))
             for node in ray.nodes() if node["Alive"]]
    actors, claim = pool_size([cpus for cpus, _ in nodes], settings.threads, cluster.actors)
    actors = min(actors, len(items))  # an actor per image at most: each more would load the engines for nothing
    needed = smallest_restore_bytes(job.manifest, settings, job.options)
    actors, memory = actor_memory(nodes, actors, claim, needed, job.options.memory_budget)
    if not settings.quiet:
        shown.write(f"adaptbir-ray: {plural(len(items), 'image')}, {plural(actors, 'actor')} × "
                    f"{plural(settings.threads, 'thread')} (each claiming {plural(claim, 'CPU')} and "
                    f"{memory / 2**30:.1f} GiB) on {plural(len(nodes), 'node')}"
                    + (", shipping the engines to each node" if cluster.ship_engines else ""))
    # else every node sees the engines' path
    shipment = ship(settings.engines, job.manifest) if cluster.ship_engines else None
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))
               .map(_read, fn_kwargs={"salt": salt}, num_cpus=READ_CPUS)
               .map(Restorer, fn_constructor_kwargs={"options": job.options, "settings": settings,
                                                     "shipment": shipment, "memory": memory,
                                                     "engine_cache": cluster.engine_cache},
                    compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=claim, memory=memory,
                    num_gpus=cluster.num_gpus_per_actor or None))  # Ray Data restarts killed actors, retries tasks
    for row in dataset.iter_rows():
        yield json.loads(row["record"])
