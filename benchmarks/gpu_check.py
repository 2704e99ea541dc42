#!/usr/bin/env python3
"""GPU check of our own model definitions under torch-CUDA: fp16 accuracy, per-stage latency, FLOPs.

Runs on a bare machine (torch + numpy, no install of this package): `adaptbir.export` / `adaptbir.runtime`
are made importable from the repository's folders. It builds the `sd21` model with seeded random weights
on the device and measures, at 512x512 (latent 64x64), batch 1:

  a. fp16 vs fp32 eps of one UNet-with-controls step at t = 999, 500, 0 (max abs error, PSNR, NaN/inf);
  b. latency of the dual encoder, one UNet step, the whole sampler loop (on the device), the decoder and
     end to end, in fp16 eager and fp16 with CUDA graphs (manual torch.cuda.CUDAGraph capture), plus one
     fp32 eager UNet step;
  c. FLOPs (torch.utils.flop_counter) and the achieved TFLOP/s against the H200's dense fp16 peak;
  d. the environment.

    python3 benchmarks/gpu_check.py                       # on the GPU machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --dry-run --out r.json # CPU, tiny preset: every code path but CUDA graphs

Every section is wrapped: a failure is recorded as an error string and the run goes on. The JSON is
rewritten after each section, so a run cut short still leaves what it measured. Exit status 0 when the
fp16-vs-fp32 check and the eager timings completed, else 1.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# NVIDIA H200 SXM datasheet: dense FP16/BF16 tensor-core throughput (1979 TFLOP/s is with 2:4 sparsity).
PEAK_TFLOPS = 989.4
PEAK_NOTE = "NVIDIA H200 SXM datasheet figure, dense FP16/BF16 tensor core (no sparsity)"
STAGES = ("dual_encoder", "unet_step", "loop", "decoder", "e2e")
ACCURACY_TIMESTEPS = (999, 500, 0)
W_CSFT, K_MIX = 0.8, 0.56  # CSFT weight w = k / 0.7 (the gating rule), so the mix uses k = 0.56

Json = dict[str, Any]


# ------------------------------------------------------------------------------------------- imports


def make_importable() -> Path:
    """Put a temporary `adaptbir` package, whose `export` and `runtime` are symlinks to the repository's
    folders, first on sys.path. An (empty) __init__.py makes it win over any installed copy."""
    shim = Path(tempfile.mkdtemp(prefix="adaptbir-gpu-check-"))
    package = shim / "adaptbir"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("export", "runtime"):
        (package / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(shim))
    atexit.register(shutil.rmtree, shim, True)  # rmtree unlinks symlinks, never follows them
    return shim


# ------------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def strict_json(value: Any) -> Any:
    """NaN and inf (not JSON) become None, anywhere in the document."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def error_string(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:2000]


class Report:
    """The JSON document, saved after every section."""

    def __init__(self, path: Path, data: Json):
        self.path, self.data = path, data
        self.data.setdefault("errors", {})

    def save(self) -> None:
        from adaptbir.runtime.atomic import atomic_write

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(strict_json(self.data), indent=2, default=str, allow_nan=False) + "\n"
            atomic_write(self.path, lambda f: f.write(text.encode()))
        except Exception as err:  # never lose the run over the file: the table still prints
            log(f"cannot write {self.path}: {error_string(err)}")

    def section(self, name: str, fn: Callable[[], Any], *path: str) -> Any:
        """Run one section; its result (or its error string) goes under `path` (default: `name`)."""
        log(f"{name} ...")
        parent, key = self.data, name
        if path:
            for part in path[:-1]:
                parent = parent.setdefault(part, {})
            key = path[-1]
        start = time.perf_counter()
        try:
            parent[key] = fn()
            return parent[key]
        except Exception as err:  # a section never stops the run
            self.data["errors"][name] = error_string(err)
            parent[key] = {"error": error_string(err), "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} FAILED: {error_string(err)}")
            return None
        finally:
            self.data.setdefault("section_s", {})[name] = round(time.perf_counter() - start, 3)
            self.save()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny preset, 128x128, 3 steps, 2 warm-up / 2 runs (what the test runs)")
    p.add_argument("--device", help="torch device (default: cuda; cpu with --dry-run)")
    p.add_argument("--preset", help="model preset (default: sd21; tiny with --dry-run)")
    from adaptbir.runtime.sizes import size_argument

    p.add_argument("--size", type=size_argument, help="image HxW, multiples of 64 (default: 512x512; 128x128 dry)")
    p.add_argument("--steps", type=int, help="sampler steps of the loop (default: 50; 3 dry)")
    p.add_argument("--runs", type=int, help="timed runs of a single stage (default: 10; 2 dry)")
    p.add_argument("--loop-runs", type=int, help="timed runs of the loop and e2e (default: 3; 2 dry)")
    p.add_argument("--warmup", type=int, help="warm-up runs of a single stage (default: 3; 2 dry)")
    p.add_argument("--precision", choices=("auto", "fp16", "fp32"), default="auto",
                   help="precision of the timed stages (auto: fp16 on CUDA; fp32 on cpu, where fp16 is emulated)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 with --dry-run, which keeps it steady on a busy machine)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (inputs use seed+1, noise seed+2)")
    p.add_argument("--out", type=Path, help="JSON file (default: gpu_check.json, gpu_check_dry_run.json with\n"
                   "--dry-run, in $OUT when set, else in benchmarks/results/)")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.device = args.device or ("cpu" if dry else "cuda")
    args.preset = args.preset or ("tiny" if dry else "sd21")
    args.size = args.size or ((128, 128) if dry else (512, 512))
    args.steps = args.steps or (3 if dry else 50)
    args.runs = args.runs or (2 if dry else 10)
    args.loop_runs = args.loop_runs or (2 if dry else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if dry else 3)
    args.loop_warmup = min(args.warmup, 2 if dry else 1)
    args.threads = args.threads or (1 if dry else None)
    if not 2 <= args.steps <= 1000:
        p.error("--steps must be between 2 and 1000")
    if args.out is None:
        name = "gpu_check_dry_run.json" if dry else "gpu_check.json"
        args.out = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "benchmarks" / "results" / name
    return args


# --------------------------------------------------------------------------------------- environment


def environment(torch: Any, device: str) -> Json:
    import numpy as np

    env: Json = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    for module in ("onnxruntime", "pyiqa"):
        try:
            env[module] = __import__(module).__version__
        except Exception as err:  # absent or broken: say which
            env[module] = f"absent ({type(err).__name__})"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env.update(
            gpu_name=torch.cuda.get_device_name(index),
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    env["driver"] = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            env["driver"] = out.splitlines()[0] if out else None
        except Exception as err:
            env["driver"] = f"unknown ({error_string(err)})"
    return env


# -------------------------------------------------------------------------------------------- models


def half_copy(model: Any, torch: Any, device: str) -> Any:
    """An fp16 copy with the precision of our fp16 ONNX graphs: convs, linears and the plain GroupNorms
    in fp16; the reference's fp32 islands stay fp32 (GroupNorm32 upcasts its input, so its parameters
    stay fp32; the timestep-embedding constants and latent scales are recreated in fp32; attention
    logits and softmax are fp32 by the model's own code)."""
    from adaptbir.export.unet import GroupNorm32

    half = copy.deepcopy(model).half()
    for module in half.modules():
        if isinstance(module, GroupNorm32):
            module.float()
    with torch.device(device):
        half.reset_constants()
    # The sinusoidal embedding is computed in fp32 (t up to 999); the time MLP then runs in fp16.
    for part in (half.unet, half.controlnet):
        part.time_embed.register_forward_pre_hook(lambda _m, args: tuple(a.half() for a in args))
    return half


class Workload:
    """Seeded inputs and the stage callables of one model at one precision."""

    def __init__(self, torch: Any, model: Any, dtype: Any, device: str, size: tuple[int, int], steps: int,
                 seed: int):
        import numpy as np

        from adaptbir.export.model import DecoderGraph, DualEncoderGraph, UNetGraph
        from adaptbir.runtime.sampler import Schedule

        self.torch, self.dtype, self.device, self.steps, self.seed = torch, dtype, device, steps, seed
        self.encoder, self.unet, self.decoder = DualEncoderGraph(model), UNetGraph(model), DecoderGraph(model)
        cfg = model.config
        height, width = size
        self.latent_shape = (1, 4, height // 8, width // 8)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        self.image = (torch.rand(1, 3, height, width, generator=g, device=device) * 2 - 1).to(dtype)
        self.x = torch.randn(self.latent_shape, generator=g, device=device)  # fp32, as the sampler keeps it
        self.cond = torch.randn(self.latent_shape, generator=g, device=device).to(dtype)
        self.context = torch.randn(1, 77, cfg.context_dim, generator=g, device=device).to(dtype)
        self.w = torch.full((1,), W_CSFT, dtype=dtype, device=device)
        s = cfg.schedule
        schedule = Schedule.from_manifest(s, steps)
        order = list(range(schedule.steps - 1, -1, -1))  # the sampler walks the spaced indices downwards
        self.timesteps = [int(schedule.timesteps[n]) for n in order]
        self.t_all = torch.tensor(self.timesteps, dtype=torch.int64, device=device)
        self.t_mid = self.t_all[len(order) // 2 : len(order) // 2 + 1].clone()
        f32 = np.float32
        # Per iteration: c_a = √(1/ᾱ), c_b = √(1/ᾱ−1), coef1, coef2, σ = √var (0 at n = 0: no noise there),
        # each a float64 coefficient cast to float32 as runtime/sampler.py does.
        rows = [[f32(schedule.sqrt_recip_alphas_cumprod[n]), f32(schedule.sqrt_recipm1_alphas_cumprod[n]),
                 f32(schedule.posterior_mean_coef1[n]), f32(schedule.posterior_mean_coef2[n]),
                 np.sqrt(f32(schedule.posterior_variance[n])) if n else f32(0)] for n in order]
        self.coefs = torch.tensor(np.array(rows, dtype=np.float32), device=device)

    # --- eager stages

    def encode(self) -> Any:
        return self.encoder(self.image)

    def unet_step(self) -> Any:
        return self.unet(self.x.to(self.dtype), self.t_mid, self.context, self.cond, self.w)

    def decode(self, latent: Any | None = None) -> Any:
        return self.decoder((self.x if latent is None else latent).to(self.dtype))

    def mix(self, z_restore: Any, z_identity: Any) -> Any:
        return (z_restore.float() * (1 - K_MIX) + z_identity.float() * K_MIX).to(self.dtype)

    def noise(self) -> Any:
        """x_T, then one draw per iteration (the last drawn, unused), from a seeded device generator."""
        g = self.torch.Generator(device=self.device).manual_seed(self.seed + 2)
        return self.torch.randn((self.steps + 1, *self.latent_shape), generator=g, device=self.device)

    def sampler_step(self, x: Any, t: Any, c: Any, cond: Any, noise: Any | None) -> Any:
        """runtime/sampler.py's `step` in torch: float32 math, eps from the model at its precision."""
        eps = self.unet(x.to(self.dtype), t, self.context, cond, self.w).float()
        x0 = c[0] * x - c[1] * eps
        mean = c[2] * x0 + c[3] * x
        return mean if noise is None else mean + c[4] * noise

    def loop(self, cond: Any | None = None) -> Any:
        cond = self.cond if cond is None else cond
        noise = self.noise()
        x = noise[0]
        for i in range(self.steps):
            last = i == self.steps - 1
            x = self.sampler_step(x, self.t_all[i : i + 1], self.coefs[i], cond, None if last else noise[i + 1])
        return x

    def e2e(self) -> Any:
        cond = self.mix(*self.encode())
        return self.decode(self.loop(cond))


class EmulatedGraph:
    """A CPU stand-in for a captured CUDA graph: `replay()` reruns the function and writes its results into
    the tensors the capture returned, as a real replay does. It checks the static-buffer bookkeeping."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.out = fn()

    def replay(self) -> None:
        new = self.fn()
        pairs = zip(self.out, new, strict=True) if isinstance(self.out, tuple) else [(self.out, new)]
        for dst, src in pairs:
            dst.copy_(src)


class GraphedWorkload:
    """The same stages as CUDA-graph replays of static-input captures (or emulated ones, on CPU)."""

    def __init__(self, work: Workload, emulate: bool = False):
        torch = self.torch = work.torch
        self.work, self.emulate = work, emulate
        self.errors: dict[str, str] = {}
        self.image = work.image.clone()
        self.x_in = work.x.to(work.dtype, copy=True)  # copies: replays write into some of these buffers
        self.t_in = work.t_mid.clone()
        self.latent_in = work.x.to(work.dtype, copy=True)
        # The sampler step reads and writes static buffers; the host copies t, coefficients and noise in.
        self.x_s = work.x.clone()
        self.t_s = work.t_all[:1].clone()
        self.c_s = work.coefs[0].clone()
        self.noise_s = torch.zeros_like(work.x)
        self.cond_s = work.cond.clone()
        self.graphs: dict[str, Any] = {}
        self.outs: dict[str, Any] = {}
        captures = {
            "dual_encoder": lambda: work.encoder(self.image),
            "unet_step": lambda: work.unet(self.x_in, self.t_in, work.context, work.cond, work.w),
            "sampler_step": lambda: work.sampler_step(self.x_s, self.t_s, self.c_s, self.cond_s, self.noise_s),
            "decoder": lambda: work.decoder(self.latent_in),
        }
        for name, fn in captures.items():
            try:
                self.graphs[name], self.outs[name] = self.capture(fn)
            except Exception as err:
                self.errors[name] = error_string(err)
                log(f"CUDA graph capture of {name} failed: {self.errors[name]}")

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        if self.emulate:
            graph = EmulatedGraph(fn)
            return graph, graph.out
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (cuDNN autotuning, allocations) off the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        torch.cuda.synchronize()
        return graph, out

    def has(self, *names: str) -> bool:
        return all(n in self.graphs for n in names)

    def loop(self) -> Any:
        work = self.work
        noise = work.noise()
        self.x_s.copy_(noise[0])
        graph, out = self.graphs["sampler_step"], self.outs["sampler_step"]
        for i in range(work.steps):
            self.t_s.copy_(work.t_all[i : i + 1])
            self.c_s.copy_(work.coefs[i])  # σ = 0 at the last step: mean + 0·noise == mean exactly
            self.noise_s.copy_(noise[i + 1])
            graph.replay()
            self.x_s.copy_(out)
        return self.x_s

    def e2e(self) -> Any:
        self.graphs["dual_encoder"].replay()
        z_restore, z_identity = self.outs["dual_encoder"]
        self.cond_s.copy_(self.work.mix(z_restore, z_identity))
        self.latent_in.copy_(self.loop().to(self.work.dtype))
        self.graphs["decoder"].replay()
        return self.outs["decoder"]

    def stage(self, name: str) -> Callable[[], Any] | None:
        """The callable timed for a stage, or None when a graph it needs was not captured."""
        needs = {"dual_encoder": ("dual_encoder",), "unet_step": ("unet_step",), "loop": ("sampler_step",),
                 "decoder": ("decoder",), "e2e": ("dual_encoder", "sampler_step", "decoder")}[name]
        if not self.has(*needs):
            return None
        if name in ("loop", "e2e"):
            return getattr(self, name)
        return self.graphs[name].replay


# ------------------------------------------------------------------------------------------ measuring


def time_fn(torch: Any, fn: Callable[[], Any], device: str, warmup: int, runs: int) -> Json:
    """Median/min/max in ms: CUDA events around each run (the GPU timeline, launch gaps included) on
    CUDA, perf_counter elsewhere; the device is synchronised before every run."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        sync()
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
            "max_ms": round(max(times), 4), "runs": runs, "warmup": warmup, "all_ms": [round(t, 4) for t in times]}


def compare(torch: Any, ref: Any, out: Any) -> Json:
    """fp16 output vs the fp32 reference: errors, PSNR over the reference's peak-to-peak, non-finite counts."""
    from adaptbir.runtime.metrics import psnr as psnr_db

    ref, out = ref.double(), out.double()
    nonfinite_ref = int((~torch.isfinite(ref)).sum())
    nonfinite_out = int((~torch.isfinite(out)).sum())
    diff = (out - ref).abs()
    mse = float((diff**2).mean())
    ptp = float(ref.max() - ref.min())
    psnr = psnr_db(out.cpu().numpy(), ref.cpu().numpy(), ptp)
    psnr = math.inf if psnr is None else psnr
    return {
        "max_abs": finite_or_none(float(diff.max())),
        "mean_abs": finite_or_none(float(diff.mean())),
        "rmse": finite_or_none(math.sqrt(mse)) if math.isfinite(mse) else None,
        "ref_peak_to_peak": finite_or_none(ptp),
        "ref_std": finite_or_none(float(ref.std())),
        "psnr_db": finite_or_none(psnr),
        "psnr_note": None if math.isfinite(psnr) else "not finite (identical outputs, or NaN/inf present)",
        "nonfinite_fp16": nonfinite_out,
        "nonfinite_fp32": nonfinite_ref,
    }


def count_flops(torch: Any, fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs (matmul/bmm/conv/attention kernels only, 2 per MAC) and the split by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


# --------------------------------------------------------------------------------------------- report


def fmt_ms(entry: Any) -> str:
    """`median [min-max]`, or the status / error of a stage that has no timing."""
    if isinstance(entry, dict) and "median_ms" in entry:
        return f"{entry['median_ms']:.2f} [{entry['min_ms']:.2f}-{entry['max_ms']:.2f}]"
    if isinstance(entry, dict):
        return str(entry.get("status") or entry.get("error") or "-")[:40]
    return "-"


def fmt_num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def render(data: Json) -> str:
    """The human-readable summary printed at the end."""
    s, env = data.get("settings", {}), data.get("environment", {})
    lines = [
        f"AdaptBIR GPU check: {s.get('preset')} at {s.get('size')} (latent {s.get('latent')}), batch 1, "
        f"{s.get('steps')} steps, on {s.get('device')} ({env.get('gpu_name') or platform.machine()})",
        f"torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, driver {env.get('driver')}, "
        f"compute capability {env.get('compute_capability')}, python {env.get('python')}, {env.get('date_utc')}",
        f"timed precision: {s.get('timed_precision')}",
        "",
    ]
    acc = data.get("accuracy", {})
    lines.append(f"a. fp16 vs fp32 eps of one UNet + ControlNet + CSFT step ({acc.get('fp16', 'not run')})")
    if "results" in acc:
        lines.append(f"   {'t':>5} {'max abs':>10} {'mean abs':>10} {'PSNR dB':>8} {'ref p2p':>9} {'NaN/inf':>8}")
        for r in acc["results"]:
            lines.append(f"   {r['t']:>5} {fmt_num(r['max_abs'], '10.3e')} {fmt_num(r['mean_abs'], '10.3e')} "
                         f"{fmt_num(r['psnr_db'], '8.2f')} {fmt_num(r['ref_peak_to_peak'], '9.3f')} "
                         f"{r['nonfinite_fp16'] + r['nonfinite_fp32']:>8}")
        for name, r in acc.get("vae", {}).items():
            if not isinstance(r, dict):
                continue
            lines.append(f"   {name}: max abs {fmt_num(r['max_abs'], '.3e')}, PSNR {fmt_num(r['psnr_db'], '.2f')} dB, "
                         f"NaN/inf {r['nonfinite_fp16'] + r['nonfinite_fp32']}")
    else:
        lines.append(f"   {acc.get('status') or acc.get('error')}")
    lat, thr, flops = data.get("latency", {}), data.get("throughput", {}), data.get("flops", {})
    eager, graphs = lat.get("eager", {}), lat.get("cuda_graphs", {})
    lines += ["", "b/c. latency in ms: median [min-max]; GFLOP; achieved TFLOP/s; best % of the fp16 peak",
              f"   {'stage':<13} {'eager':>27} {'CUDA graphs':>27} {'GFLOP':>9} {'TF/s eager':>10} "
              f"{'TF/s graph':>10} {'% peak':>7}"]
    for stage in STAGES:
        graph = graphs.get("stages", {}).get(stage, graphs)  # a whole-section status/error stands for each stage
        t = thr.get("stages", {}).get(stage, {})
        fractions = [t[m]["fraction_of_peak"] for m in ("eager", "cuda_graphs") if m in t]
        gflop = flops.get("stages", {}).get(stage)
        lines.append(f"   {stage:<13} {fmt_ms(eager.get(stage)):>27} {fmt_ms(graph):>27} "
                     f"{fmt_num(gflop / 1e9 if gflop else None, '9.2f')} "
                     f"{fmt_num(t.get('eager', {}).get('tflops'), '10.2f')} "
                     f"{fmt_num(t.get('cuda_graphs', {}).get('tflops'), '10.2f')} "
                     f"{fmt_num(100 * max(fractions) if fractions else None, '6.2f')}%")
    lines.append(f"   fp32 eager UNet step: {fmt_ms(lat.get('eager_fp32', {}).get('unet_step'))} ms")
    if "e2e_lower_bound_ms" in thr:
        lines.append(f"   e2e lower bound at {thr['peak_tflops']} TFLOP/s ({thr['peak_note']}): "
                     f"{thr['e2e_lower_bound_ms']:.3f} ms")
    checks = (("eager loop", eager.get("loop_check")), ("graphed vs eager", graphs.get("graph_check")),
              ("emulated graphs vs eager", graphs.get("emulated_check")))
    for name, check in checks:
        if check:
            lines.append(f"   {name}: {json.dumps(check)}")
    musiq = data.get("musiq", {})
    text = f"{fmt_ms(musiq['fp32_eager'])} ms, fp32 eager" if "fp32_eager" in musiq else musiq.get("status") or \
        musiq.get("error")
    lines += ["", f"MUSIQ: {text}"]
    if data.get("errors"):
        lines += ["", "errors:"] + [f"   {k}: {v}" for k, v in data["errors"].items()]
    lines += ["", f"result: {'OK' if data.get('ok') else 'INCOMPLETE'}; JSON: {data.get('out')}"]
    return "\n".join(lines)


def show(data: Json) -> None:
    """Print the summary; should the table itself fail, print the JSON rather than nothing."""
    try:
        text = render(data)
    except Exception as err:
        text = f"(table failed: {error_string(err)})\n" + json.dumps(data, indent=2, default=str)
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------- main


class GpuCheck:
    """The sections of one run, in order; each is a method, and a failing one never stops the next."""

    def __init__(self, args: argparse.Namespace, shim: Path):
        import torch

        from adaptbir.export.config import load_config

        self.args, self.torch = args, torch
        self.device, self.cuda = args.device, args.device.startswith("cuda")
        if self.cuda:
            # fp32 means fp32: no TF32 in the reference, nor in the fp32 attention logits of the fp16 model.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        torch.set_grad_enabled(False)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.config = load_config(args.preset)
        # fp16 kernels on CPU are emulated and far slower: by default CPU timings stand in with fp32.
        self.half_timed = args.precision == "fp16" or (args.precision == "auto" and self.cuda)
        self.timed_precision = "fp16" if self.half_timed else "fp32"
        if not self.half_timed and args.precision == "auto":
            self.timed_precision += " (stand-in for fp16 on cpu: fp16 is only timed on CUDA)"
        self.models: Json = {}
        self.work: Workload | None = None
        self.report = Report(args.out, self._header())
        if not Path(self.report.data["adaptbir_from"]).is_relative_to(shim):
            self.report.data["errors"]["imports"] = f"adaptbir.export was not imported from the shim {shim}"

    def _header(self) -> Json:
        args, (height, width) = self.args, self.args.size
        return {
            "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
            "cwd": os.getcwd(),
            "out": str(args.out),
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": {
                "dry_run": args.dry_run, "device": self.device, "preset": args.preset, "size": f"{height}x{width}",
                "latent": f"{height // 8}x{width // 8}", "batch": 1, "steps": args.steps, "runs": args.runs,
                "loop_runs": args.loop_runs, "warmup": args.warmup, "loop_warmup": args.loop_warmup,
                "cpu_threads": self.torch.get_num_threads(),
                "seed": args.seed, "w": W_CSFT, "k": K_MIX, "context": [1, 77, self.config.context_dim],
                "accuracy_timesteps": list(ACCURACY_TIMESTEPS), "timed_precision": self.timed_precision,
                "tf32": False if self.cuda else None, "cudnn_benchmark": True if self.cuda else None,
                "fp16_model": "convs, linears, LayerNorms and plain GroupNorms fp16; GroupNorm32, timestep "
                              "sinusoids, attention logits + softmax fp32 (as in the fp16 ONNX graphs); sampler "
                              "math fp32",
                "loop": "the sampler on the device: eps at the model precision, float32 step math with the "
                        "schedule's float64 coefficients cast to float32; noise from a seeded device generator",
                "flops_note": "torch.utils.flop_counter counts matmul, bmm, conv and attention kernels only "
                              "(2 per MAC); loop = steps x unet_step; e2e = dual_encoder + loop + decoder",
            },
            "adaptbir_from": str(Path(sys.modules["adaptbir.export"].__file__).parent),
            "adaptbir_resolved": str(Path(sys.modules["adaptbir.export"].__file__).resolve().parent),
        }

    def workload(self, model: str, dtype: Any) -> Workload:
        a = self.args
        return Workload(self.torch, self.models[model], dtype, self.device, a.size, a.steps, a.seed)

    def timed(self, fn: Callable[[], Any], stage: str) -> Json:
        a, long = self.args, stage in ("loop", "e2e")
        return time_fn(self.torch, fn, self.device, a.loop_warmup if long else a.warmup,
                       a.loop_runs if long else a.runs)

    # ------------------------------------------------------------------------------------------ sections

    def environment(self) -> Json:
        return environment(self.torch, self.device)

    def build(self) -> Json:
        from adaptbir.export.model import AdaptBIR, Capabilities

        torch, t0 = self.torch, time.perf_counter()
        torch.manual_seed(self.args.seed)
        with torch.device(self.device):  # built in place: sd21 is ~5 GB in fp32
            self.models["fp32"] = AdaptBIR(self.config, Capabilities(has_musiq=False, has_text_encoder=False)).eval()
        self.models["fp32"].requires_grad_(False)
        self.sync()
        t1 = time.perf_counter()
        self.models["fp16"] = half_copy(self.models["fp32"], torch, self.device)
        self.sync()
        info = {"params": sum(p.numel() for p in self.models["fp32"].parameters()),
                "fp32_build_s": round(t1 - t0, 3), "fp16_copy_s": round(time.perf_counter() - t1, 3)}
        if self.cuda:
            info["gpu_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        timed_model = "fp16" if self.half_timed else "fp32"
        self.work = self.workload(timed_model, torch.float16 if self.half_timed else torch.float32)
        self.report.data["settings"]["unet_step_t"] = self.work.timesteps[len(self.work.timesteps) // 2]
        self.report.data["settings"]["loop_timesteps"] = self.work.timesteps
        return info

    def accuracy(self) -> Json:
        torch, device = self.torch, self.device
        ref, half = self.workload("fp32", torch.float32), self.workload("fp16", torch.float16)
        results = []
        for t in ACCURACY_TIMESTEPS:
            tt = torch.tensor([t], dtype=torch.int64, device=device)
            eps32 = ref.unet(ref.x, tt, ref.context, ref.cond, ref.w)
            try:
                eps16 = half.unet(half.x.half(), tt, half.context, half.cond, half.w)
            except Exception as err:
                if self.cuda:
                    raise
                return {"status": f"skipped: fp16 unsupported on {device} ({error_string(err)})"}
            results.append({"t": t, **compare(torch, eps32, eps16.float())})
        psnrs = [r["psnr_db"] for r in results if r["psnr_db"] is not None]
        # The VAE stages too, on the same inputs (on cpu only a 64x64 corner: fp16 convs are slow there).
        side = None if self.cuda else 64
        image, latent = ref.image[..., :side, :side], ref.x[..., : side and side // 8, : side and side // 8]
        vae: Json = {"image": list(image.shape[-2:])}
        pairs = zip(ref.encoder(image), half.encoder(image.half()), strict=True)
        for name, (a, b) in zip(("z_restore", "z_identity"), pairs, strict=True):
            vae[f"dual_encoder.{name}"] = compare(torch, a, b.float())
        vae["decoder"] = compare(torch, ref.decoder(latent), half.decoder(latent.half()).float())
        return {"fp16": f"real fp16 on {device}", "inputs": "x, cond, context seeded random; w = 0.8",
                "results": results, "any_nonfinite": any(r["nonfinite_fp16"] or r["nonfinite_fp32"] for r in results),
                "worst_psnr_db": min(psnrs) if psnrs else None, "vae": vae}

    def latency_eager(self) -> Json:
        work, out = self.work, {"precision": self.timed_precision}
        fns = {"dual_encoder": work.encode, "unet_step": work.unet_step, "loop": work.loop,
               "decoder": work.decode, "e2e": work.e2e}
        for stage, fn in fns.items():
            log(f"  eager {stage}")
            out[stage] = self.timed(fn, stage)
        final = work.loop()
        out["loop_check"] = {"final_latent_finite": bool(self.torch.isfinite(final).all()),
                             "final_latent_std": finite_or_none(float(final.std()))}
        return out

    def latency_eager_fp32(self) -> Json:
        ref = self.workload("fp32", self.torch.float32)
        return {"precision": "fp32" + (" (no TF32)" if self.cuda else ""),
                "unet_step": self.timed(ref.unet_step, "unet_step")}

    def flops(self) -> Json:
        work, stages, by_op = self.work, {}, {}
        for stage, fn in (("dual_encoder", work.encode), ("unet_step", work.unet_step), ("decoder", work.decode)):
            stages[stage], by_op[stage] = count_flops(self.torch, fn)
        stages["loop"] = self.args.steps * stages["unet_step"]
        stages["e2e"] = stages["dual_encoder"] + stages["loop"] + stages["decoder"]
        return {"precision": self.timed_precision, "stages": stages, "by_operator": by_op}

    def musiq(self) -> Json:
        try:
            import pyiqa  # noqa: F401  (only its MUSIQ architecture is used)
        except Exception as err:
            return {"status": f"not measured: pyiqa absent ({type(err).__name__})"}
        import numpy as np

        from adaptbir.export.model import MusiqGraph
        from adaptbir.export.musiq import MusiqScorer
        from adaptbir.runtime.graphs import GRAPHS

        # The scorer alone: what AdaptBIR(config, Capabilities(has_musiq=True)) holds as `.musiq`.
        torch, (height, width) = self.torch, self.args.size
        torch.manual_seed(self.args.seed)
        scorer = MusiqScorer(self.config.musiq)
        scorer.fold_weight_standardisation()  # as exported
        graph = MusiqGraph(scorer.eval().to(self.device))
        feeds = GRAPHS["musiq"].sample_feeds(np.random.default_rng(self.args.seed + 1), (height, width), 1)
        tokens = [torch.from_numpy(t).to(self.device) for t in feeds.values()]
        total, _ = count_flops(torch, lambda: graph(*tokens))
        return {"status": "measured", "precision": "fp32 (MUSIQ is exported in fp32 only)",
                "tokens": int(tokens[0].shape[1]), "fp32_eager": self.timed(lambda: graph(*tokens), "musiq"),
                "flops": total, "score_finite": bool(torch.isfinite(graph(*tokens)).all())}

    def _graph_check(self, graphed: GraphedWorkload) -> Json:
        """The graphed loop and e2e must reproduce the eager ones."""
        out: Json = {}
        if graphed.has("sampler_step"):
            out["loop_max_abs"] = finite_or_none(float((graphed.loop().clone() - self.work.loop()).abs().max()))
        if graphed.has("dual_encoder", "sampler_step", "decoder"):
            out["e2e_max_abs"] = finite_or_none(float((graphed.e2e().clone() - self.work.e2e()).abs().max()))
        return out

    def latency_cuda_graphs(self) -> Json:
        if not self.cuda:
            # What can be checked without CUDA: the static-buffer bookkeeping, with emulated replays.
            emulated = GraphedWorkload(self.work, emulate=True)
            return {"status": "skipped: no CUDA", "emulated_check": self._graph_check(emulated),
                    "emulated_capture_errors": emulated.errors}
        graphed = GraphedWorkload(self.work)
        out: Json = {"precision": self.timed_precision, "method": "torch.cuda.CUDAGraph, manual static-input capture",
                     "capture_errors": graphed.errors, "stages": {}}
        for stage in STAGES:
            fn = graphed.stage(stage)
            if fn is None:
                out["stages"][stage] = {"status": "not captured: " + "; ".join(graphed.errors.values())}
                continue
            log(f"  CUDA graphs {stage}")
            try:
                out["stages"][stage] = self.timed(fn, stage)
            except Exception as err:
                out["stages"][stage] = {"error": error_string(err)}
        out["graph_check"] = self._graph_check(graphed)
        return out

    def throughput(self) -> Json:
        data = self.report.data
        counted = data["flops"]["stages"]
        out: Json = {"peak_tflops": PEAK_TFLOPS, "peak_note": PEAK_NOTE, "stages": {}}
        if not self.cuda:
            out["note"] = "the peak is the H200's: the fractions mean nothing on cpu"
        for stage in STAGES:
            row: Json = {}
            for mode in ("eager", "cuda_graphs"):
                section = data["latency"].get(mode, {})
                entry = section.get("stages", section).get(stage)
                if isinstance(entry, dict) and entry.get("median_ms"):
                    tflops = counted[stage] / (entry["median_ms"] * 1e-3) / 1e12
                    row[mode] = {"tflops": round(tflops, 4), "fraction_of_peak": round(tflops / PEAK_TFLOPS, 6)}
            out["stages"][stage] = row
        out["e2e_lower_bound_ms"] = round(counted["e2e"] / (PEAK_TFLOPS * 1e12) * 1e3, 4)
        return out

    def finish(self) -> int:
        data = self.report.data
        eager_times = data.get("latency", {}).get("eager", {})
        eager_ok = "latency_eager" not in data["errors"] and all("median_ms" in eager_times.get(s, {}) for s in STAGES)
        data["ok"] = bool(eager_ok and "accuracy" not in data["errors"] and "build" not in data["errors"])
        data["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if self.cuda:
            data["gpu_max_allocated_gib"] = round(self.torch.cuda.max_memory_allocated() / 2**30, 2)
        self.report.save()
        show(data)
        return 0 if data["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    shim = make_importable()  # first: the size argument is parsed by the project's own parser
    check = GpuCheck(parse_args(argv), shim)
    report = check.report
    report.section("environment", check.environment)
    if report.section("build", check.build) is None:
        return check.finish()  # no model: nothing else can run
    report.section("accuracy", check.accuracy)
    report.section("latency_eager", check.latency_eager, "latency", "eager")
    report.section("latency_eager_fp32", check.latency_eager_fp32, "latency", "eager_fp32")
    report.section("flops", check.flops)
    report.section("musiq", check.musiq)
    report.section("latency_cuda_graphs", check.latency_cuda_graphs, "latency", "cuda_graphs")
    if "flops" not in report.data["errors"]:
        report.section("throughput", check.throughput)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
