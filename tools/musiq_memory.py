"""Measured against predicted memory of one MUSIQ call (`runtime.memory.musiq_bytes`), torch-free.

    python tools/musiq_memory.py engines/tiny-random 2000x3000 [3008x4000 ...]

Each size runs in a fresh process, so that each peak is its own.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import sys
sys.modules["torch"] = None
import numpy as np
from adaptbir.runtime.backends import Engines
from adaptbir.runtime.memory import musiq_bytes, peak_rss_bytes, rss_bytes
from adaptbir.runtime.musiq_patches import token_count
from adaptbir.runtime.sizes import describe_size, parse_size
from adaptbir.runtime.stages import Stages
h, w = parse_size(sys.argv[2], multiple=1)
stages = Stages(Engines.load(sys.argv[1]))
photo = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
before = rss_bytes()
stages.score(photo)
limits = stages.manifest.musiq
n = token_count(h, w, limits.patch_size, limits.longer_side_lengths)
predicted = musiq_bytes(n, h * w, stages.manifest.hyperparameters["musiq"])
print(f"{describe_size(h, w):>20}  N = {n:>6}  measured {(peak_rss_bytes() - before) / 2**20:8.0f} MiB  "
      f"predicted {predicted / 2**20:8.0f} MiB")
"""


def main() -> None:
    engines, *sizes = sys.argv[1:]
    for size in sizes:
        subprocess.run([sys.executable, "-c", CHILD, engines, size], check=True)


if __name__ == "__main__":
    main()
