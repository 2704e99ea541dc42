"""What OpenVINO holds for one graph, compiled as the openvino backend compiles it or otherwise, torch-free.

    python tools/openvino_memory.py engines/sd21-fp32 --how read prepared prepared-mapped cache cache

Each `--how` runs in a fresh process: read the UNet, compile it for a 64x64 latent in `--precision` (bf16 by
default), run it `--steps` times. Printed: the peak (VmHWM), the RSS after (anonymous + file-mapped), the
compile time (the first call, reading and preparing included) and the median step. `--how`:
  read             the graph as read (memory-mapped), compiled as is (the backend before issue 23)
  prepared         as the backend does it (`backends.read_openvino_model` + `weights_in_f16`)
  prepared-mapped  the same with the weights memory-mapped (bf16 then holds the fp32 pages until the end)
  cache            prepared, with OpenVINO's compiled-model cache (CACHE_DIR) in a folder made for the run:
                   give it twice, the first fills the cache, the second loads from it
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

CHILD = """
import statistics, sys, time
sys.modules["torch"] = None
from pathlib import Path
import numpy as np
import openvino
from adaptbir.runtime.backends import read_openvino_model, release_freed_memory, weights_in_f16
engines, how, precision, steps, cache = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
core = openvino.Core()
context = np.load(engines / "context.npy")
rng = np.random.default_rng(0)
feeds = {"x": rng.standard_normal((1, 4, 64, 64), np.float32), "t": np.array([500]), "context": context,
         "cond": rng.standard_normal((1, 4, 64, 64), np.float32), "w": np.array([0.5], np.float32)}
config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
if how == "cache":
    config["CACHE_DIR"] = cache
start = time.perf_counter()
mapped = how in ("read", "prepared-mapped") or precision != "bf16"  # the backend maps the weights for f32 only
model = read_openvino_model(core, engines / "unet.onnx", mapped=mapped)
if how != "read":
    weights_in_f16(model, precision)
model.reshape({name: openvino.PartialShape(list(array.shape)) for name, array in feeds.items()})
compiled = core.compile_model(model, "CPU", config)
del model
release_freed_memory()
compile_s = time.perf_counter() - start
times = []
for _ in range(steps):
    begin = time.perf_counter()
    compiled.create_infer_request().infer(feeds)
    times.append(time.perf_counter() - begin)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
gib = {k: int(status[k].split()[0]) / 2**20 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
print(f"{how:16} {precision:4}  peak {gib['VmHWM']:5.2f} GiB  after {gib['VmRSS']:5.2f} GiB "
      f"(anon {gib['RssAnon']:.2f} + file {gib['RssFile']:.2f})  read+prepare+compile {compile_s:5.1f} s  "
      f"step {statistics.median(times):.2f} s", flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines")
    parser.add_argument("--how", nargs="+", default=["read", "prepared"],
                        choices=["read", "prepared", "prepared-mapped", "cache"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaptbir-ov-cache-") as cache:
        for how in args.how:
            subprocess.run([sys.executable, "-c", CHILD, args.engines, how, args.precision, str(args.steps), cache],
                           check=True)


if __name__ == "__main__":
    main()
