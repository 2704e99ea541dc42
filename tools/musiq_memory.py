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
from adaptbir.runtime.musiq_patches import batch_feeds, extract_tokens
from adaptbir.runtime.sizes import describe_size, parse_size
h, w = parse_size(sys.argv[2], multiple=1)
engines = Engines.load(sys.argv[1])
photo = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
before = rss_bytes()
tokens = extract_tokens(photo, engines.manifest.musiq.longer_side_lengths)
engines.run("musiq", batch_feeds([tokens]))
n = len(tokens.mask)
predicted = musiq_bytes(n, h * w, engines.manifest.hyperparameters["musiq"])
print(f"{describe_size(h, w):>20}  N = {n:>6}  measured {(peak_rss_bytes() - before) / 2**20:8.0f} MiB  "
      f"predicted {predicted / 2**20:8.0f} MiB")
"""


def main() -> None:
    engines, *sizes = sys.argv[1:]
    for size in sizes:
        subprocess.run([sys.executable, "-c", CHILD, engines, size], check=True)


if __name__ == "__main__":
    main()
