"""Memory and first-call measurements, each in a fresh session or process: the torch-free peak RSS of a
restore (`probe.py` in a subprocess) and OpenVINO's compilation time with an empty and a warm cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .peaks import timed


def openvino_compile_times(engines_dir: Path, args, size: tuple[int, int]) -> dict[str, float]:
    """The first UNet call at the benchmark shape (where OpenVINO compiles) with an empty compiled-model
    cache, then again in a new session with the cache it left: what a second load of a directory saves."""
    import tempfile

    from adaptbir.runtime.backends import Engines

    feeds = {"x": np.zeros((1, 4, size[0] // 8, size[1] // 8), np.float32), "t": np.array([500])}
    times: dict[str, float] = {}
    saved = os.environ.get("ADAPTBIR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="adaptbir-ov-cache-") as cache:
        os.environ["ADAPTBIR_CACHE_DIR"] = cache
        try:
            for label in ("cold", "warm"):
                start = time.perf_counter()
                engines = Engines.load(engines_dir, backend="openvino", threads=args.threads,
                                       precision=args.cpu_precision)
                times["load_s"] = time.perf_counter() - start
                context = engines.manifest.load_context()
                unet = {**feeds, "context": context, "cond": feeds["x"], "w": np.array([0.5], np.float32)}
                times[f"{label}_first_call_s"] = timed(lambda e=engines, u=unet: e.run("unet", u))
                del engines
        finally:
            if saved is None:
                os.environ.pop("ADAPTBIR_CACHE_DIR", None)
            else:
                os.environ["ADAPTBIR_CACHE_DIR"] = saved
    return times


def peak_rss(engines: Path, size: str, steps: int, threads: int | None, backend: str,
             precision: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.probe", "--engines", str(engines), "--size", size,
           "--steps", str(steps), "--backend", backend] + (["--threads", str(threads)] if threads else []) + (
        ["--cpu-precision", precision] if precision else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "probe failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])
