"""Peak memory of the runtime alone: one end-to-end restore in a fresh, torch-free process.

    python -m adaptbir.benchmarks.probe --engines DIR --size 512x512 --steps 50 [--threads T] [--backend B]

Prints one JSON line: peak RSS (MiB), end-to-end seconds, and whether torch was importable (never).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from adaptbir.runtime.memory import peak_rss_bytes


def peak_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


def main(argv: list[str] | None = None) -> None:
    sys.modules["torch"] = None  # the runtime must not need it; any import would fail loudly here
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", required=True)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--cpu-precision", help="OpenVINO's precision (bf16 or f32)")
    args = parser.parse_args(argv)

    import numpy as np

    from adaptbir.runtime.pipeline import Pipeline
    from adaptbir.runtime.sizes import parse_size

    h, w = parse_size(args.size)
    before = peak_rss_mib()
    pipeline = Pipeline.from_engines(args.engines, backend=args.backend, threads=args.threads,
                                     precision=args.cpu_precision)
    loaded = peak_rss_mib()
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    start = time.perf_counter()
    pipeline.restore(image, seed=0, steps=args.steps)
    elapsed = time.perf_counter() - start
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "after_load_rss_mib": loaded, "before_load_rss_mib": before,
                      "e2e_s": elapsed, "torch_loaded": False, "backend": args.backend,
                      "compute_precision": pipeline.engines.compute_precision}))


if __name__ == "__main__":
    main()
