"""Does stacking two same-shape requests on the batch axis pay on this backend? One UNet step (the stage
that is 90+ % of a restore) timed three ways, alternating in one process: two requests one after the
other (batch 1 twice), the same two in one call (batch 2), and the two as concurrent batch-1 calls from two
threads (what `adaptbir-ray serve --max-ongoing-requests 2` does today). Prints medians and ratios.

    python tools/batch_axis.py engines/sd21 [--latent 64x64] [--threads 2] [--runs 7] [--backend ort-cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from adaptbir.runtime.backends import Engines
from adaptbir.runtime.sizes import parse_size


def _feeds(engines: Engines, batch: int, height: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    channels = engines.manifest.context.shape[-1]
    return {"x": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
            "t": np.full(batch, 500, np.int64),
            "context": rng.standard_normal((batch, 77, channels), dtype=np.float32),
            "cond": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
            "w": np.full(batch, 0.5, np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines")
    parser.add_argument("--latent", default="64x64", help="latent H×W (an image 8 times larger)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--backend", default="ort-cpu")
    args = parser.parse_args()
    height, width = parse_size(args.latent, multiple=8)
    engines = Engines.load(args.engines, args.backend, args.threads)
    one, two = _feeds(engines, 1, height, width), _feeds(engines, 2, height, width)
    halves = [{k: v[i:i + 1] for k, v in two.items()} for i in range(2)]
    batched = engines.run("unet", two)[0]
    for i, half in enumerate(halves):  # stacking must not change a request's result beyond rounding
        np.testing.assert_allclose(engines.run("unet", half)[0][0], batched[i], atol=1e-4)
    pool = ThreadPoolExecutor(2)
    ways = {"batch 1, one after the other": lambda: [engines.run("unet", h) for h in halves],
            "batch 2, one call": lambda: engines.run("unet", two),
            "batch 1, two threads at once": lambda: list(pool.map(lambda h: engines.run("unet", h), halves))}
    engines.run("unet", one)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.runs):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["batch 1, one after the other"])
    print(f"{args.engines}, latent {height}x{width}, {args.backend}, {args.threads} threads, "
          f"median of {args.runs} (two requests' UNet step):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<30} {median * 1000:9.1f} ms   {median / base:5.2f}×")


if __name__ == "__main__":
    main()
