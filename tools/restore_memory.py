"""Measured against predicted peak memory of one whole restore (`runtime/plan.py`), torch-free.

    python tools/restore_memory.py engines/tiny-random 512x512 1024x768 [--steps 1] [--tile-size 0]

Each size runs in a fresh process (a random photo of that size, MUSIQ included), so each peak is its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys, time
sys.modules["torch"] = None
import numpy as np
from adaptbir.runtime.memory import peak_rss_bytes, rss_bytes
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.sizes import describe_size, parse_size
engines, size, steps, tile, backend = sys.argv[1], sys.argv[2], max(int(sys.argv[3]), 2), sys.argv[4], sys.argv[5]
tile = None if tile == "auto" else int(tile)
h, w = parse_size(size, multiple=1)
pipeline = Pipeline.from_engines(engines, backend=backend)
loaded = rss_bytes()
photo = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
start = time.perf_counter()
result = pipeline.restore(photo, seed=0, steps=steps, tile_size=tile)
plan = result.plan
MiB = 2**20
print(f"{describe_size(h, w):>22}  tiled {str(result.tiled):5}  loaded {loaded / MiB:7.0f} MiB  "
      f"peak {peak_rss_bytes() / MiB:7.0f} MiB  predicted {plan.peak_bytes / MiB:7.0f} MiB "
      f"({plan.peak_bytes / peak_rss_bytes() - 1:+.0%}, {plan.peak_stage})  {time.perf_counter() - start:.1f} s",
      flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines")
    parser.add_argument("sizes", nargs="+", help="HxW")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--tile-size", default="0", help="px, 0 = untiled, auto = the runtime's choice")
    parser.add_argument("--backend", default="ort-cpu")
    args = parser.parse_args()
    for size in args.sizes:
        subprocess.run([sys.executable, "-c", CHILD, args.engines, size, str(args.steps), args.tile_size,
                        args.backend], check=True)


if __name__ == "__main__":
    main()
