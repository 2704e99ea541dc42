"""`adaptbir-ray restore`: a photo collection restored on a Ray cluster with Ray Data.

    adaptbir-ray restore photos/ -o restored/ --engines /shared/engines/sd21 --address auto --actors 8

The same command as `adaptbir restore` (the same arguments, checks, job plan, restore call and atomic
writes), run as a Ray Data pipeline: the planned jobs → read and decode (Ray tasks, a quarter CPU each) →
restore in an actor pool (each actor loads the engine directory once; it writes its outputs atomically) →
the driver appends one report record per image. The engine directory must be on storage every node sees.

Every output is bit-identical to `adaptbir restore` with the same options, `--threads` included (ONNX
Runtime's last bits follow its thread count; here `--threads` is each actor's): with `--seed S` every image
gets S (as there); without, each image gets a seed derived from its output's path inside OUTDIR (recorded),
so no result depends on which actor ran it, or on a retry. Re-running skips every image whose output exists
and whose report record (same input bytes, options and engine id) says ok; a killed actor is restarted by
Ray and its image retried, and a half-written output is never left (atomic writes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

from adaptbir.runtime.cli import Job, append_report, finish_batch, restore_loaded, without_path, write_output

# Options that decide an output's bytes: the resume key covers them (not --report, --quiet, --threads...).
OUTPUT_OPTIONS = ("steps", "seed", "score", "k", "w", "sr_scale", "no_resize_back", "tile_size", "memory_budget",
                  "color_fix", "format", "quality", "backend", "cpu_precision")
READ_CPUS = 0.25  # a read task's share of a CPU
ACTOR_CPU_SHARE = 0.8  # an actor claims this × its threads, so read tasks always find room (a 2-core laptop too)


def image_seed(relative: str) -> int:
    """A 63-bit seed from an output's path inside OUTDIR: the same on every node and every retry."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") >> 1


def resume_key(source: Path, args, engine_id: str) -> str:
    digest = hashlib.sha256(source.read_bytes()) if source.is_file() else hashlib.sha256(b"unreadable")
    options = {name: getattr(args, name) for name in OUTPUT_OPTIONS}
    digest.update(json.dumps({"options": options, "engines": engine_id}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _finished(report: Path | None) -> dict[str, str]:
    """key → output of every ok record of a previous run."""
    if report is None or not report.is_file():
        return {}
    done = {}
    for line in report.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: that image is simply redone
            continue
        if record.get("status") == "ok" and "key" in record:
            done[record["key"]] = record.get("output", "")
    return done


def _read(row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: decode one image (any failure becomes the image's error, never the job's)."""
    from adaptbir.runtime.image_io import read_image

    try:
        return {**row, "image": pickle.dumps(read_image(row["source"])), "error": ""}
    except Exception as err:
        return {**row, "image": b"", "error": without_path(err, Path(row["source"]))}


class Restorer:
    """Ray actor: one Pipeline (the engines loaded once), restoring and writing one image per call."""

    def __init__(self, args):
        from adaptbir.runtime.pipeline import Pipeline

        self.args = args
        self.pipeline = Pipeline.from_engines(args.engines, backend=args.backend, threads=args.threads,
                                              precision=args.cpu_precision, memory_budget=args.memory_budget)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"input": row["source"], "key": row["key"], **self.pipeline.describe()}
        started = time.perf_counter()
        if row["error"]:
            record.update(status="failed", error=row["error"])
        else:
            try:
                result = restore_loaded(self.pipeline, pickle.loads(row["image"]), self.args, row["seed"])
                write_output(Job(Path(row["source"]), Path(row["target"])), result.image, self.args)
                record.update(status="ok", output=row["target"], **result.record())
            except Exception as err:  # any per-image failure is recorded and the job goes on
                record.update(status="failed", error=without_path(err, Path(row["source"])))
        record["wall_s"] = round(time.perf_counter() - started, 6)
        return {"record": json.dumps(record)}


def restore_on_ray(args, jobs: list[Job], problems: list[str]) -> int:
    """Run the planned jobs on the cluster of `args.address` (None: a local one); the exit status of
    `adaptbir restore` (0 all restored, 1 some failed, 130 interrupted: what was written stays whole)."""
    from adaptbir.runtime.manifest import load_manifest

    engine_id = load_manifest(args.engines).identity  # a bad directory stops here, before any work
    done_before, root = _finished(args.report), args.out.resolve()
    items, skipped = [], 0
    for job in jobs:
        key = resume_key(job.source, args, engine_id)
        finished = done_before.get(key) == str(job.target) and job.target.is_file()
        if job.skip or finished:
            skipped += 1
            reason = "finished by a previous run" if finished else "output exists (--on-exists skip)"
            append_report(args.report, {"input": str(job.source), "key": key, "status": "skipped", "reason": reason,
                                        "output": str(job.target)})
            continue
        seed = args.seed if args.seed is not None else image_seed(job.target.relative_to(root).as_posix())
        items.append({"source": str(job.source), "target": str(job.target), "seed": seed, "key": key})
    failures, done, interrupted = list(problems), 0, False
    try:
        for record in _run(args, items) if items else ():
            append_report(args.report, record)
            if record["status"] == "ok":
                done += 1
            else:
                failures.append(f"{record['input']}: {record['error']}")
    except KeyboardInterrupt:  # outputs are written atomically by the actors: nothing partial is left
        interrupted = True
    return finish_batch(done, skipped, failures, len(jobs) + len(problems), args.out, interrupted)


def _run(args, items: list[dict[str, Any]]):
    """The Ray Data pipeline over `items`; yields each image's report record as it finishes."""
    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             logging_level=logging.WARNING if args.quiet else logging.INFO)
    logging.getLogger("ray.data").setLevel(logging.WARNING if args.quiet else logging.INFO)
    threads = args.threads or 1
    actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
    ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))
               .map(_read, num_cpus=READ_CPUS)
               .map(Restorer, fn_constructor_kwargs={"args": args}, compute=ray.data.ActorPoolStrategy(size=actors),
                    num_cpus=ACTOR_CPU_SHARE * threads, num_gpus=args.num_gpus_per_actor or None,
                    max_restarts=-1, max_task_retries=-1))
    for row in dataset.iter_rows():
        yield json.loads(row["record"])
