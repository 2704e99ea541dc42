"""`make demo`: the main job on the embedded default.

1. build tiny engines from seeded random weights (`adaptbir-export build --random-weights --preset tiny`),
   reusing them when they are up to date;
2. restore a real photo (matplotlib's bundled `grace_hopper.jpg`; nothing is downloaded) with the
   torch-free runtime, 50 steps, and write it to `out/demo/`;
3. print the per-stage timing table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from matplotlib import cbook

from adaptbir.export.build import WeightSource, build
from adaptbir.export.config import load_config
from adaptbir.runtime.arguments import DefaultsHelp, Parser
from adaptbir.runtime.image_io import read_image, write_image
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.progress import BatchProgress
from adaptbir.runtime.sizes import describe_size

ENGINES = Path("engines/tiny-random")
OUT = Path("out/demo")
STAGES = ("preprocess", "musiq", "encode", "sample", "decode", "postprocess")


def build_tiny_random(out: Path, seed: int) -> None:
    build(load_config("tiny"), WeightSource(random_seed=seed), out, seed=seed,
          progress=lambda text: print("\n".join(f"    {line}" for line in text.splitlines())))


def timing_table(timings: dict[str, float], steps: int) -> str:
    total = timings["total_s"]
    rows = [f"  {'stage':<28} {'seconds':>9} {'share':>7}"]
    for stage in STAGES:
        if f"{stage}_s" in timings:
            seconds = timings[f"{stage}_s"]
            rows.append(f"  {stage:<28} {seconds:>9.3f} {seconds / total:>7.1%}")
    rows.append(f"  {'  one UNet step (mean)':<28} {timings['sample_s'] / steps:>9.3f}")
    rows.append(f"  {'total':<28} {total:>9.3f}")
    rows.append(f"  {'inside engine calls':<28} {timings['engine_s']:>9.3f} {timings['engine_s'] / total:>7.1%}")
    overhead = total - timings["engine_s"]
    rows.append(f"  {'runtime overhead':<28} {overhead:>9.3f} {overhead / total:>7.1%}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m adaptbir.demo", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the noise")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    args = parser.parse_args(argv)

    print(f"1/3 engines: tiny preset, random weights (seed {args.seed}) -> {ENGINES}")
    started = time.perf_counter()
    build_tiny_random(ENGINES, args.seed)
    print(f"    ready in {time.perf_counter() - started:.1f} s")

    photo = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    image = read_image(photo)
    print(f"2/3 restore {photo.name} (the portrait of Grace Hopper matplotlib ships, a public-domain U.S. Navy "
          f"photo), {describe_size(*image.rgb.shape[:2])}, {args.steps} steps, ort-cpu")
    pipeline = Pipeline.from_engines(ENGINES, threads=args.threads)
    shown = BatchProgress(1)
    progress = shown.image(photo.name, args.steps)
    result = pipeline.restore(image, seed=args.seed, steps=args.steps, progress=progress.step,
                              on_stage=progress.stage)
    progress.finish(f"restored, {result.plan.geometry.journey()}")
    shown.close()
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / "grace_hopper.png"
    out = result.image
    write_image(target, out.rgb, alpha=out.alpha, icc_profile=out.icc_profile, exif=out.exif)
    (OUT / "grace_hopper.json").write_text(json.dumps({**result.record(), **pipeline.describe()}, indent=1))
    print(f"    wrote {target}, {describe_size(*out.rgb.shape[:2])}, record in {OUT / 'grace_hopper.json'}")
    print(f"    MUSIQ score {result.score:.3f} -> class {result.label}, k = {result.k}, w = {result.w:.3f}")

    print("3/3 timings (one run, not a benchmark: see adaptbir-bench)")
    print(timing_table(result.timings, args.steps))
    print(
        f"\nThese engines hold RANDOM weights: the restored picture is noise-like, and the random MUSIQ gives a "
        f"meaningless score near 0 ({result.score:.2f}; often negative), hence the severe class (k = 0, w = 0)."
        "\nFor real restorations build engines from the "
        "checkpoints:\n  adaptbir-export build --checkpoint adaptbir_stage3.ckpt --musiq musiq_koniq_ckpt-e95806b9.pth"
        " --preset sd21 --out engines/sd21\n  adaptbir restore photo.jpg -o restored/ --engines engines/sd21 "
        "--backend openvino\n(fp32 engines for CPUs, OpenVINO computing in bf16 where the CPU has it; fp16 for GPUs)"
    )


if __name__ == "__main__":
    main()
