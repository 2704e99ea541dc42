"""Measured against predicted peak memory of one whole restore (`runtime/plan.py`), torch-free.

    python tools/restore_memory.py engines/tiny-random 512x512 1024x768 [--steps 2] [--tile-size 0]
    python tools/restore_memory.py engines/sd21-fp32 512x512 --backend openvino --cpu-precision bf16
    python tools/restore_memory.py engines/tiny-random 1024x768 --backend openvino --memory-budget 500M

--memory-budget lets the plan choose (untiled when it fits, else 512 px tiles) and prints whether the
measured peak stayed under the budget; a size the plan refuses fails alone. --stages also prints the peak
during each stage's calls against the plan's stage (VmHWM reset before each call, Linux): a stage's peak starts
from the RSS at its call, which still holds the previous graph's buffers where the backend frees them inside.

Each size runs in a fresh process (a random photo of that size, MUSIQ included unless --score is given), so
each peak is its own. Printed per size: RSS after loading the directory, the peak (VmHWM) and the RSS after
the restore (the steady state: every graph compiled or loaded, its activations released), the peak's
anonymous and file-mapped parts at the end, the plan's prediction and its error against the peak, and the
restore's wall time, of which the first call of each graph (OpenVINO compiles there).
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
from adaptbir.runtime.arguments import parse_bytes
from adaptbir.runtime.graphs import GRAPHS
from adaptbir.runtime.sizes import describe_size, parse_size
engines, size, steps, tile, backend, precision, score, budget, by_stage = sys.argv[1:10]
steps, budget = max(int(steps), 2), parse_bytes(budget) if budget else None
tile = None if tile == "auto" or budget else int(tile)
h, w = parse_size(size, multiple=1)
start = time.perf_counter()
pipeline = Pipeline.from_engines(engines, backend=backend, precision=precision or None, memory_budget=budget)
load_s, loaded = time.perf_counter() - start, rss_bytes()
firsts, stages, before = {}, {}, [0]
def reset_peak():  # VmHWM back to the current RSS (Linux); the whole restore's peak kept in before[0]
    before[0] = max(before[0], peak_rss_bytes())
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
for name, session in pipeline.engines.sessions.items():
    def timed(feeds, run=session.run, name=name):
        if by_stage:
            reset_peak()
        begin = time.perf_counter()
        try:
            return run(feeds)
        finally:
            firsts.setdefault(name, time.perf_counter() - begin)
            stage = GRAPHS[name].stage
            stages[stage] = max(stages.get(stage, 0), peak_rss_bytes())
    session.run = timed
photo = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
start = time.perf_counter()
result = pipeline.restore(photo, seed=0, steps=steps, tile_size=tile, score=float(score) if score else None)
restore_s, plan, peak = time.perf_counter() - start, result.plan, max(before[0], peak_rss_bytes())
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
anon, file = (int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
MiB = 2**20
print(f"{describe_size(h, w):>22}  {backend} {result.precision:4}  tiled {str(result.tiled):5}  "
      f"loaded {loaded / MiB:6.0f} MiB in {load_s:5.1f} s  peak {peak / MiB:6.0f} MiB  "
      f"after {rss_bytes() / MiB:6.0f} MiB (anon {anon / MiB:.0f} + file {file / MiB:.0f})  "
      f"predicted {plan.peak_bytes / MiB:6.0f} MiB ({plan.peak_bytes / peak - 1:+.0%}, {plan.peak_stage})  "
      f"{restore_s:.1f} s, first calls " + ", ".join(f"{name} {s:.1f} s" for name, s in firsts.items())
      + ("" if budget is None else f"  budget {budget / MiB:.0f} MiB: {plan.tiles} tile(s), "
         f"{'under' if peak <= budget else 'OVER'} by {abs(budget - peak) / MiB:.0f} MiB"), flush=True)
if by_stage:
    print("    peak during each stage's calls, measured / predicted: " + ", ".join(
        f"{stage} {stages[stage] / MiB:.0f} / {plan.stages[stage] / MiB:.0f} MiB "
        f"({plan.stages[stage] / stages[stage] - 1:+.0%})" for stage in plan.stages if stage in stages), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines")
    parser.add_argument("sizes", nargs="+", help="HxW")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tile-size", default="0", help="px, 0 = untiled, auto = the runtime's choice")
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--cpu-precision", default="", help="openvino: bf16 or f32 (default: the backend's)")
    parser.add_argument("--score", default="", help="give the score (MUSIQ does not run)")
    parser.add_argument("--memory-budget", default="", help="e.g. 500M: the plan tiles by it (--tile-size ignored)")
    parser.add_argument("--stages", action="store_true",
                        help="also the peak during each stage's calls against the plan's (resets VmHWM; Linux)")
    args = parser.parse_args()
    failed = [size for size in args.sizes if subprocess.run(  # a refused size fails alone: the others still run
        [sys.executable, "-c", CHILD, args.engines, size, str(args.steps), args.tile_size, args.backend,
         args.cpu_precision, args.score, args.memory_budget, "1" if args.stages else ""]).returncode]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
