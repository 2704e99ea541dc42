"""Throughput of `adaptbir-ray restore` against `adaptbir restore`, and latency of `adaptbir-ray serve`.

    python -m adaptbir.benchmarks.ray_throughput --engines engines/tiny-random --images 12 --steps 2

Side by side in one run, on generated photos: the local CLI (one process, all threads), the Ray job with
1 actor × all threads and with N actors × 1 thread (cores not oversubscribed), each a fresh command (the
Ray rows include starting a local cluster, reported apart from the per-image rate); then the service
under a fixed concurrent load: p50/p95 latency. Medians over `--runs`. Results: a table and a JSON file.
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
    import socket

    import ray
    from ray import serve

    from adaptbir.serve.client import restore
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
    restore(url, photo, seed=0, steps=args.steps, score=50)  # warm-up

    def one(i: int) -> float:
        start = time.perf_counter()
        restore(url, photo, seed=i, steps=args.steps, score=50)
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        latencies = sorted(pool.map(one, range(args.requests)))
    serve.shutdown()
    ray.shutdown()
    p50, p95 = (round(float(np.percentile(latencies, q)), 3) for q in (50, 95))
    return {"requests": args.requests, "concurrency": args.concurrency, "replicas": replicas, "p50_s": p50,
            "p95_s": p95}


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
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ray-throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {"engines": str(args.engines), "images": args.images, "size": f"{args.height}x{args.width}",
                  "steps": args.steps, "runs": args.runs, "cpus": os.cpu_count(),
                  "batch": batch(args, Path(tmp)), "service": service(args)}
    print(f"cluster start {report['batch']['cluster_start_s']} s (median of {args.runs})")
    print(f"{'job':<34} {'images/min':>10} {'Ray overhead s/image':>21}")
    for name, row in report["batch"]["rows"].items():
        print(f"{name:<34} {row['images_per_min']:>10} {row.get('overhead_per_image_s', ''):>21}")
    s = report["service"]
    print(f"service ({s['replicas']} replicas): {s['requests']} requests, {s['concurrency']} at a time: "
          f"p50 {s['p50_s']} s, p95 {s['p95_s']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
