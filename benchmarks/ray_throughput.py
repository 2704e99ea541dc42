"""Throughput of `adaptbir-ray restore` against `adaptbir restore`, and latency of `adaptbir-ray serve`.

    python -m adaptbir.benchmarks.ray_throughput --engines engines/tiny-random --images 12 --steps 2

Side by side in one run, on generated photos: the local CLI (one process, all threads), the Ray job with
1 actor × all threads and with N actors × 1 thread (cores not oversubscribed), each a fresh command (the
Ray rows include starting a local cluster, reported apart from the per-image rate); then the service
under a fixed concurrent load, the same requests as POST /restore and as jobs (submit, follow the events,
fetch the result), interleaved on one service: p50/p95 latency, and for jobs the time to the 202,
the events' lag behind the worker's clock (one machine: one clock) and the time from the done event to the
result. Medians over `--runs`. Results: a table and a JSON file (`--parts service` for the service alone).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"p{i:04d}.png")


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def batch(args, work: Path) -> dict:
    photos = work / "photos"
    _photos(photos, args.images, (args.height, args.width))
    cores = os.cpu_count() or 1
    common = ["--engines", str(args.engines), "--steps", str(args.steps), "--seed", "0", "--score", "50", "--quiet"]
    runs = {
        f"local CLI, {cores} threads": [sys.executable, "-m", "adaptbir.runtime.cli", "restore", str(photos),
                                        "--threads", str(cores), *common],
        f"Ray, 1 actor × {cores} threads": [sys.executable, "-m", "adaptbir.serve.cli", "restore", str(photos),
                                            "--actors", "1", "--threads", str(cores), *common],
        f"Ray, {cores} actors × 1 thread": [sys.executable, "-m", "adaptbir.serve.cli", "restore", str(photos),
                                            "--actors", str(cores), "--threads", "1", *common],
    }
    startup = statistics.median(_timed([sys.executable, "-c", "import ray; ray.init(include_dashboard=False); "
                                        "ray.shutdown()"]) for _ in range(args.runs))
    rows = {}
    for name, cmd in runs.items():
        walls = []
        for run in range(args.runs):
            walls.append(_timed([*cmd, "-o", str(work / f"out-{len(rows)}-{run}")]))
        wall = statistics.median(walls)
        rows[name] = {"wall_s": [round(w, 2) for w in walls], "images_per_min": round(60 * args.images / wall, 2)}
    local = statistics.median(rows[next(iter(rows))]["wall_s"])
    for name in list(rows)[1:]:
        wall = statistics.median(rows[name]["wall_s"])
        rows[name]["overhead_per_image_s"] = round((wall - startup - local) / args.images, 3)
    return {"cluster_start_s": round(startup, 2), "rows": rows}


def service(args) -> dict:
    """The same load as POST /restore and as jobs (submit → events → result), side by side on one service."""
    import socket

    import ray
    from ray import serve

    from adaptbir.serve.service import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replicas = os.cpu_count() or 1  # one thread each: the cores, not oversubscribed
    start(args.engines, port=port, threads=1, replicas=replicas, max_ongoing_requests=args.concurrency,
          max_queued_requests=args.requests)
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((args.height, args.width, 3)) * 255).astype(np.uint8)).save(
        buffer, "PNG")
    photo, url = buffer.getvalue(), f"http://127.0.0.1:{port}"
    _restore_once(url, photo, 0, args.steps)  # warm-up, both paths
    _job_once(url, photo, 0, args.steps)
    calls = {"POST /restore": _restore_once, "jobs": _job_once}
    order = [(name, i) for i in range(args.requests) for name in calls]  # interleaved: the same conditions
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        measured = list(pool.map(lambda task: calls[task[0]](url, photo, task[1], args.steps), order))
    rows = {name: [m for (kind, _), m in zip(order, measured, strict=True) if kind == name] for name in calls}
    serve.shutdown()
    ray.shutdown()
    report = {"requests": args.requests, "concurrency": args.concurrency, "replicas": replicas}
    for name, measured in rows.items():
        report[name] = {key: _percentiles([m[key] for m in measured]) for key in measured[0] if key != "lags_s"}
    report["jobs"]["events_lag_s"] = _percentiles([lag for m in rows["jobs"] for lag in m["lags_s"]])
    return report


def _restore_once(url: str, photo: bytes, seed: int, steps: int) -> dict:
    from adaptbir.serve.client import restore

    start = time.perf_counter()
    restore(url, photo, seed=seed, steps=steps, score=50)
    return {"latency_s": time.perf_counter() - start}


def _job_once(url: str, photo: bytes, seed: int, steps: int) -> dict:
    """One job: the time to its 202, each running event's lag behind the worker's clock (one machine), the
    time from its done event to its result, and the whole."""
    from adaptbir.serve.client import events, result, submit

    start = time.perf_counter()
    job = submit(url, photo, seed=seed, steps=steps, score=50)
    submitted = time.perf_counter()
    lags = []
    for event in events(url, job["id"]):
        if event["state"] == "running":
            lags.append(time.time() - event["time"])
    done = time.perf_counter()
    result(url, job["id"])
    fetched = time.perf_counter()
    return {"latency_s": fetched - start, "submit_s": submitted - start, "done_to_result_s": fetched - done,
            "lags_s": lags}


def _percentiles(values: list[float]) -> dict:
    return {q: round(float(np.percentile(values, int(q[1:]))), 4) for q in ("p50", "p95")} | {
        "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=("batch", "service"), default=["batch", "service"])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ray-throughput.json"))
    args = parser.parse_args()
    report = {"engines": str(args.engines), "images": args.images, "size": f"{args.height}x{args.width}",
              "steps": args.steps, "runs": args.runs, "cpus": os.cpu_count()}
    if "batch" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            report["batch"] = batch(args, Path(tmp))
        print(f"cluster start {report['batch']['cluster_start_s']} s (median of {args.runs})")
        print(f"{'job':<34} {'images/min':>10} {'Ray overhead s/image':>21}")
        for name, row in report["batch"]["rows"].items():
            print(f"{name:<34} {row['images_per_min']:>10} {row.get('overhead_per_image_s', ''):>21}")
    if "service" in args.parts:
        report["service"] = s = service(args)
        print(f"service ({s['replicas']} replicas): {s['requests']} requests, {s['concurrency']} at a time "
              "(p50 / p95 s)")
        for name in ("POST /restore", "jobs"):
            print(f"  {name:<14} " + ", ".join(f"{key.removesuffix('_s')} {v['p50']} / {v['p95']}"
                                               for key, v in s[name].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
