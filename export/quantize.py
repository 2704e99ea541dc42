"""int8 engine directories: calibrated on the user's photos, gated on the user's own weights.

    adaptbir-export build --checkpoint CKPT --precision int8 [--calibration photos/] --out engines/sd21-int8

The fp32 graphs are built first (in a temporary directory), then run as the real loop runs them — MUSIQ,
the gate, the dual encoder, the sampler over the timesteps it visits, the decoder — on the calibration
photos, recording every graph's inputs. ONNX Runtime's static quantization (`quantize_static`, QDQ format:
QuantizeLinear/DequantizeLinear pairs, int8 per-channel weights, uint8 activations, MinMax ranges) turns
the encoder, UNet and decoder into int8 graphs that ONNX Runtime (MLAS int8 kernels), OpenVINO (fused into
int8 kernels) and TensorRT (explicit quantization) all read; MUSIQ stays fp32 (the gate must not move).

Before anything is written the int8 graphs are compared with the fp32 ones on held-out photos: the UNet's
eps PSNR per timestep range, and whole restorations with the same seed by PSNR, SSIM and the MUSIQ shift
of the result. Below a floor the build refuses with the table and the previous directory stays. Int8
quality cannot be known without the user's weights: this gate is the proof, made where the weights are.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from adaptbir.runtime.atomic import staged_directory
from adaptbir.runtime.backend import describe
from adaptbir.runtime.backends import release_freed_memory
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.graphs import GRAPHS
from adaptbir.runtime.image_io import read_image
from adaptbir.runtime.manifest import FileRecord, GraphEntry, Manifest, read_manifest
from adaptbir.runtime.memory import GiB, available_bytes, note_joint_peak, peak_rss_bytes, rss_bytes
from adaptbir.runtime.metrics import output_errors, psnr, psnr_over_range


@dataclass(frozen=True)
class Scheme:
    """Which nodes take int8 inputs (weights and activations); every other node stays float."""

    ops: tuple[str, ...]  # the op types quantized
    attention: bool  # also MatMuls of two activations (attention's QK^T and AV), which carry no weights
    help: str

    def float_nodes(self, graph) -> list[str]:
        """The nodes of `ops` this scheme keeps float: activation × activation MatMuls unless `attention`."""
        if self.attention or "MatMul" not in self.ops:
            return []
        constant = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                          for o in n.output}
        return [n.name for n in graph.node if n.op_type == "MatMul" and not constant.intersection(n.input)]


SCHEMES = {
    "hybrid": Scheme(("Conv", "MatMul", "Gemm"), False, "every layer with weights int8 (convolutions, linear "
                     "layers); attention's activation x activation matmuls float"),
    "conv": Scheme(("Conv",), False, "convolutions only; linear layers and attention float"),
    "full": Scheme(("Conv", "MatMul", "Gemm"), True, "attention's activation x activation matmuls int8 too"),
}
MIN_IMAGES = 3  # two to calibrate on, one held out for the gate
CALIBRATION_SIDE = 512  # photos are centre-cropped to at most this: SD's own size, and a bounded run
SAMPLES_PER_GRAPH = 48  # recorded inputs handed to the quantizer per graph, spread over photos and steps
CALIBRATION_WINDOW = 32  # latent units (256 px): the spatial window of each calibration input (`_windowed`)
EPS_RANGES = ((667, 1000, "t 667-999"), (333, 667, "t 333-666"), (0, 333, "t 0-332"))


class QuantizationError(AdaptBIRError):
    """The calibration photos or run are unusable, or the int8 graphs fail the gate."""


@dataclass(frozen=True)
class Floors:
    """What the int8 directory must reach against fp32 on the held-out photos (settable per build)."""

    eps_psnr_db: float = 30.0  # the UNet's eps, worst timestep range
    image_psnr_db: float = 30.0  # final images, worst photo
    image_ssim: float = 0.90  # final images, worst photo
    musiq_shift: float = 3.0  # |MUSIQ(int8 result) - MUSIQ(fp32 result)|, worst photo, 0-100 scale


@dataclass(frozen=True)
class Calibration:
    photos: tuple[tuple[str, np.ndarray], ...]  # (name, uint8 HxWx3), in a stable order
    source: str  # the folder, or the default set's description

    @property
    def digest(self) -> str:
        digest = hashlib.sha256()
        for name, rgb in self.photos:
            digest.update(name.encode() + b"\0" + str(rgb.shape).encode() + rgb.tobytes())
        return digest.hexdigest()

    def split(self) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
        """(calibrate on, held out): every fourth photo is held out, at least one."""
        last = len(self.photos) - 1
        held = {i for i in range(len(self.photos)) if i % 4 == 3} or {last}
        return ([p for i, p in enumerate(self.photos) if i not in held],
                [p for i, p in enumerate(self.photos) if i in held])


# ------------------------------------------------------------------------------------------ photos


def _cropped(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = max(0, (h - CALIBRATION_SIDE) // 2), max(0, (w - CALIBRATION_SIDE) // 2)
    return np.ascontiguousarray(rgb[top:top + CALIBRATION_SIDE, left:left + CALIBRATION_SIDE])


def calibration_photos(folder: Path | None) -> Calibration:
    """The user's degraded photos (every image in `folder`, recursively, as a batch walks it: other files are
    passed over), or the default set."""
    if folder is None:
        return default_calibration()
    from adaptbir.runtime.batch import walk

    if not folder.is_dir():
        raise QuantizationError(f"--calibration {folder}: not a folder of photos")
    photos = []
    for path in walk(folder)[0]:
        try:
            photos.append((path.relative_to(folder).as_posix(), _cropped(read_image(path).rgb)))
        except AdaptBIRError as err:
            raise QuantizationError(f"--calibration {path}: {err}") from None
    if len(photos) < MIN_IMAGES:
        raise QuantizationError(f"--calibration {folder}: {len(photos)} readable photo(s), at least {MIN_IMAGES} "
                                "are needed (calibration and a held-out photo for the int8 gate)")
    return Calibration(tuple(photos), f"folder {folder.name}")


def _degraded(rgb: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise and JPEG, stronger with `level` (0 mild, 1 medium, 2 severe): the three MUSIQ classes."""
    image = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur((0.6, 1.5, 3.0)[level]))
    noisy = np.asarray(image, np.float32) + rng.normal(0, (3.0, 8.0, 18.0)[level], rgb.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=(85, 45, 15)[level])
    return np.asarray(Image.open(buffer).convert("RGB"))


def default_calibration() -> Calibration:
    """Photos matplotlib ships (a portrait and a still life), cropped at two places each and degraded at three
    strengths: 12 photos, made the same way on every machine (seeded), nothing downloaded."""
    from matplotlib import cbook

    rng = np.random.default_rng(0)
    photos = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        rgb = np.asarray(Image.open(cbook.get_sample_data(name, asfileobj=False)).convert("RGB"))
        h, w = rgb.shape[:2]
        for crop, (top, left) in enumerate(((0, 0), (h // 3, w // 3))):
            window = _cropped(rgb[top:, left:])
            for level in range(3):
                photos.append((f"{Path(name).stem}-{crop}-{('mild', 'medium', 'severe')[level]}",
                               _degraded(window, level, rng)))
    return Calibration(tuple(photos), "default: matplotlib's sample photos, blurred, noised and JPEG-compressed")


# ------------------------------------------------------------------------------------------ recording


class Recorder:
    """Wraps `Engines.run` to keep every feed of the graphs being quantized (copies: the caller reuses
    its arrays), so the quantizer sees exactly what the real loop feeds."""

    def __init__(self, engines, graphs: list[str]):
        self.engines, self.feeds = engines, {name: [] for name in graphs}
        self._run = engines.run

    def __enter__(self) -> Recorder:
        def run(name: str, feeds: dict[str, np.ndarray], timings=None):
            if name in self.feeds:
                self.feeds[name].append({k: np.array(v) for k, v in feeds.items()})
            return self._run(name, feeds, timings)

        self.engines.run = run
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engines.run  # the class's method again


def _windowed(feeds: list[dict[str, np.ndarray]], factor: int) -> list[dict[str, np.ndarray]]:
    """Each recorded feed cut to a window of at most `CALIBRATION_WINDOW` latent units (a corner or the
    centre, in turn): ONNX Runtime's calibration session keeps far more than the runtime's (no graph
    optimisation, its own arena), and the level-0 attention grows with the window's square — 15.7 GiB for the
    tiny UNet on a 512×704 image, measured. Tiled restores run the UNet on such windows anyway."""
    windowed = []
    for i, feed in enumerate(feeds):
        windowed.append({name: _window(array, i % 5, factor if name == "image" else 1)
                         for name, array in feed.items()})
    return windowed


def _window(array: np.ndarray, place: int, scale: int) -> np.ndarray:
    if array.ndim != 4:  # t, w, context: not spatial
        return array
    size = CALIBRATION_WINDOW * scale
    h, w = array.shape[2:]
    top = (0, 0, h - size, h - size, (h - size) // 2)[place] if h > size else 0
    left = (0, w - size, 0, w - size, (w - size) // 2)[place] if w > size else 0
    return np.ascontiguousarray(array[:, :, top:top + size, left:left + size])


def _spread(items: list, count: int) -> list:
    """At most `count` items, evenly spread (every photo, every stretch of timesteps)."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def record_feeds(pipeline, photos: list[tuple[str, np.ndarray]], steps: int, seed: int,
                 progress: Callable[[str], None]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each quantized graph's inputs over whole restores of `photos` (score, gate, encode, `steps` steps,
    decode)."""
    graphs = [name for name in pipeline.manifest.graphs if not GRAPHS[name].fp32_only]
    with Recorder(pipeline.engines, graphs) as recorder:
        for i, (name, rgb) in enumerate(photos, 1):
            progress(f"calibration run {i}/{len(photos)}: {name}")
            pipeline.restore(rgb, seed=seed, steps=steps)
    factor = pipeline.manifest.latent.downsample_factor
    return {name: _windowed(_spread(feeds, SAMPLES_PER_GRAPH), factor) for name, feeds in recorder.feeds.items()}


# ------------------------------------------------------------------------------------------ quantizing


def quantize_graph(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], scheme: Scheme
                   ) -> dict[str, Any]:
    """`source` → a QDQ int8 graph at `target` (its weights in `target`.data when the source had external
    data); returns what stayed float: the op types never quantized and the `scheme.ops` nodes kept float (count
    by op type, and names). ONNX Runtime's quantizer holds several copies of the model at once: calibration
    (the graph augmented with range outputs and a session running it) and quantization (the graph and its
    quantized copy) each run in their own child process, the ranges passing between them in ONNX Runtime's
    calibration cache, so the peak is the larger of the two, not their sum, and goes back to the system."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    kept = scheme.float_nodes(graph)
    external = any(source.parent.glob(f"{source.name}.data")) or source.stat().st_size > 2**30
    with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=target.parent) as scratch:
        ranges = Path(scratch) / "ranges.json"
        in_child_process(_calibrate, source, ranges, feeds, scheme.ops, external)
        in_child_process(_quantize_static, source, target, ranges, scheme.ops, kept, external)
    ops = {n.name: n.op_type for n in graph.node}
    written = onnx.load(str(target), load_external_data=False).graph
    never = {n.op_type for n in written.node} - set(scheme.ops) - {"QuantizeLinear", "DequantizeLinear"}
    return {"ops": sorted(never), "nodes": dict(Counter(ops[name] for name in kept)), "names": sorted(kept)}


def _calibrate(source: Path, ranges: Path, feeds: list[dict[str, np.ndarray]], ops: tuple[str, ...],
               external: bool) -> None:
    """The activation ranges of `ops`' inputs and outputs over `feeds` (min/max), saved to `ranges`."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, save_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    calibrator = create_calibrator(source, list(ops), augmented_model_path=str(ranges.with_name("augmented.onnx")),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external)
    calibrator.collect_data(Reader())
    save_tensors_data(calibrator.compute_data(), ranges)


def _quantize_static(source: Path, target: Path, ranges: Path, ops: tuple[str, ...], kept: list[str],
                     external: bool) -> None:
    """The QDQ graph of `source` with the calibrated `ranges` (ONNX Runtime's cache: no calibration here)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process: the graphs are already optimised
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as scratch:
        written = Path(scratch) / target.name
        quantize_static(str(source), str(written), None, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(ops), nodes_to_exclude=kept,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
                        calibration_cache_path=ranges)
        model = onnx.load(str(written))  # external data read back in: saved again under the directory's names
    _save(model, target, external)


def in_child_process(function: Callable[..., None], *args: Any) -> None:
    """`function(*args)` in a fresh (spawned) Python process; its exception comes back as a QuantizationError
    with its message. However the call ends — a stop signal in this process included — the child is ended.
    The child's peak RSS, on top of what this process held meanwhile, is noted (`note_joint_peak`): this
    process's own peak does not see it."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, function, args), daemon=True)
    held = rss_bytes() or 0
    child.start()
    send.close()
    try:
        child.join()
        failure, peak = receive.recv() if receive.poll() else (f"the process ended with status {child.exitcode}", 0)
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
        receive.close()
    note_joint_peak(held + peak, f"{getattr(function, '__name__', 'a child')} in a child process")
    if failure:
        raise QuantizationError(f"{getattr(function, '__name__', 'the call')} failed: {failure}")


def _child_main(send, function: Callable[..., None], args: tuple) -> None:
    failure = ""
    try:
        function(*args)
    except BaseException as err:  # the parent says what failed, in one line
        failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        send.send((failure, peak_rss_bytes()))
        send.close()


def _save(model, target: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{target.name}.data", size_threshold=1024)
    else:
        onnx.save(model, str(target))


# ------------------------------------------------------------------------------------------ the gate


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two uint8 HxWx3 images (Wang et al. 2004: Gaussian window σ = 1.5,
    K1 = 0.01, K2 = 0.03, over the three channels)."""
    from scipy.ndimage import gaussian_filter

    x, y = a.astype(np.float64), b.astype(np.float64)
    blur = lambda v: gaussian_filter(v, sigma=(1.5, 1.5, 0), truncate=3.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))))


@dataclass
class GateResult:
    floors: Floors
    eps_psnr_db: dict[str, float]  # worst per timestep range
    photos: list[dict[str, Any]]  # per held-out photo: psnr_db, ssim, musiq_shift

    @property
    def worst(self) -> dict[str, float]:
        return {"eps_psnr_db": min(self.eps_psnr_db.values()),
                "image_psnr_db": min(p["psnr_db"] for p in self.photos),
                "image_ssim": min(p["ssim"] for p in self.photos),
                "musiq_shift": max(p["musiq_shift"] for p in self.photos)}

    @property
    def checks(self) -> list[dict[str, Any]]:
        """Each measure's worst value against its floor: the MUSIQ shift must stay at or below its floor,
        the rest at or above."""
        checks = []
        for name, value in self.worst.items():
            floor, ceiling = getattr(self.floors, name), name == "musiq_shift"
            checks.append({"measure": name, "worst": value, "rule": f"{'≤' if ceiling else '≥'} {floor:g}",
                           "passed": value <= floor if ceiling else value >= floor})
        return checks

    @property
    def failures(self) -> list[str]:
        return [f"{c['measure']} {c['worst']:.4g} (floor {c['rule']})" for c in self.checks if not c["passed"]]

    def table(self) -> str:
        lines = [f"{'int8 vs fp32':<22} {'measured':>10}  floor"]
        lines += [f"{c['measure']:<22} {c['worst']:>10.4g}  {c['rule']}" for c in self.checks]
        lines += [f"  eps {r:<17} {db:>10.2f}" for r, db in self.eps_psnr_db.items()]
        lines += [f"  {p['photo'][:20]:<20} {p['psnr_db']:>10.2f}  ssim {p['ssim']:.4f}  musiq shift "
                  f"{p['musiq_shift']:.3f}" for p in self.photos]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"floors": asdict(self.floors), "worst": self.worst, "checks": self.checks,
                "eps_psnr_db": self.eps_psnr_db, "photos": self.photos, "passed": not self.failures}


def _eps_psnr(fp32, int8, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The worst eps PSNR per timestep range of the int8 UNet against the fp32 one, on the same feeds."""
    worst: dict[str, float] = {}
    for feed in feeds:
        t = int(feed["t"][0])
        label = next(label for low, high, label in EPS_RANGES if low <= t < high)
        db = psnr_over_range(int8.run("unet", feed)[0], fp32.run("unet", feed)[0]) or math.inf
        worst[label] = min(worst.get(label, math.inf), db)
    return {label: worst[label] for _, _, label in EPS_RANGES if label in worst}


def run_gate(fp32, int8, held_out: list[tuple[str, np.ndarray]], steps: int, seed: int, floors: Floors,
             progress: Callable[[str], None]) -> GateResult:
    """Restore each held-out photo with both pipelines (same seed), compare the results and the UNet's eps."""
    photos, unet_feeds = [], []
    for name, rgb in held_out:
        progress(f"int8 gate: {name}")
        with Recorder(fp32.engines, ["unet"]) as recorder:
            reference = fp32.restore(rgb, seed=seed, steps=steps)
        unet_feeds += recorder.feeds["unet"]
        result = int8.restore(rgb, seed=seed, steps=steps, score=reference.score)  # the same gate decision
        shift = abs(fp32.stages.score(result.image) - fp32.stages.score(reference.image))
        photos.append({"photo": name, "psnr_db": round(psnr(result.image, reference.image, 255) or math.inf, 3),
                       "ssim": round(ssim(result.image, reference.image), 5), "musiq_shift": round(shift, 4)})
    return GateResult(floors, _eps_psnr(fp32.engines, int8.engines, unet_feeds), photos)


def graph_parity(fp32, int8, name: str, feeds: list[dict[str, np.ndarray]], floor: float) -> dict[str, Any]:
    """The int8 graph against the fp32 one on recorded feeds: the manifest entry's `parity`."""
    errors = [output_errors(int8.run(name, feed), fp32.run(name, feed)) for feed in feeds]
    if any(e is None for e in errors):
        raise QuantizationError(f"the int8 {name} returned NaN/inf where fp32 did not")
    max_abs, max_rel, worst = (max(e[0] for e in errors), max(e[1] for e in errors), min(e[2] for e in errors))
    return {"max_abs": max_abs, "max_rel": max_rel, "psnr_db": None if worst == math.inf else round(worst, 3),
            "tolerance": f"int8 gate (held-out photos; eps PSNR >= {floor:g} dB)", "passed": True}


# ------------------------------------------------------------------------------------------ the build


@dataclass(frozen=True)
class Int8Options:
    calibration: Path | None = None
    # hybrid, by measurement on sd21 (benchmarks/README.md, "sd21 int8"; over fp32, same runs): UNet step on
    # ort-cpu 0.50x (conv 0.61x); 10-step restore on OpenVINO 0.85x of bf16 (conv 0.92x); half conv's files.
    # (The tiny UNet, bound by attention, had ranked conv first: "int8 quantizers".)
    scheme: str = "hybrid"
    calibration_steps: int = 10
    gate_steps: int = 10
    floors: Floors = Floors()
    seed: int = 0
    threads: int | None = None
    check_memory: bool = True  # refuse before calibrating when the predicted peak exceeds the available memory


# The larger of the quantizer's two child processes per byte of the graph file it reads, and the child's own
# start: measured on the sd21 UNet (4.82 GiB with the ControlNet), calibration 12.2 GiB (the graph augmented
# with a min/max output per calibrated tensor, and ONNX Runtime running it), quantization about 5 GiB
# (benchmarks/README.md, "The sd21 int8 build").
QUANTIZER_BYTES_PER_GRAPH_BYTE = 2.5
QUANTIZER_CHILD_BYTES = 256 * 2**20


def predict_int8_memory(manifest: Manifest, photos: list[tuple[str, np.ndarray]], held: int) -> dict[str, int]:
    """The peak of each int8 phase, this process and its children together, from the fp32 directory and
    the calibration photos, `held` being what this process holds now (libraries, the fp32 build's leftovers):
    the restores of calibration and gate as the runtime plans them on ort-cpu (the gate holds the fp32 and
    the int8 sessions at once; the int8 graphs counted at their fp32 size, an upper bound), each graph's
    quantizer child by its file size."""
    from adaptbir.runtime.memory import PROCESS_BYTES
    from adaptbir.runtime.options import RestoreOptions
    from adaptbir.runtime.plan import plan_image

    restore = max(plan_image(manifest, rgb.shape[:2], RestoreOptions(), backend="ort-cpu").peak_bytes
                  for _, rgb in photos) - PROCESS_BYTES
    weights = describe("ort-cpu").weight_bytes(sum(manifest.graph_bytes(name) for name in manifest.graphs), "fp32")
    phases = {"calibration restores": held + restore, "gate restores": held + restore + weights}
    for name in manifest.graphs:
        if not GRAPHS[name].fp32_only:
            child = QUANTIZER_CHILD_BYTES + QUANTIZER_BYTES_PER_GRAPH_BYTE * manifest.graph_bytes(name)
            phases[f"quantizing {name}"] = held + int(child)
    return phases


def quantize_directory(fp32_dir: Path, out: Path, options: Int8Options, progress: Callable[[str], None] = print
                       ) -> Manifest:
    """An int8 engine directory at `out` from the fp32 one at `fp32_dir`, calibrated and gated; nothing is
    written (the previous `out` stays) unless every floor holds."""
    from adaptbir.runtime.pipeline import Pipeline

    if options.scheme not in SCHEMES:
        raise QuantizationError(f"int8 scheme {options.scheme!r}: choose one of {', '.join(SCHEMES)}")
    calibration = calibration_photos(options.calibration)
    calibrate, held_out = calibration.split()
    _check_int8_memory(read_manifest(fp32_dir), calibration.photos, options, progress)
    fp32 = Pipeline.from_engines(fp32_dir, threads=options.threads)
    progress(f"calibrating on {len(calibrate)} photos ({calibration.source}), {len(held_out)} held out")
    feeds = _checked_feeds(record_feeds(fp32, calibrate, options.calibration_steps, options.seed, progress))
    manifest = fp32.manifest
    del fp32  # its sessions are not held while the quantizer runs (the build's peak, export/memory.py)
    release_freed_memory()
    from .build import is_engine_directory

    with staged_directory(out, is_engine_directory) as staging:
        entries, float_ops = _quantized_graphs(manifest, staging, feeds, options.scheme, calibration.digest,
                                               progress)
        provisional = _int8_manifest(manifest, out.name, staging, entries, {}).write(staging)
        fp32 = Pipeline.from_engines(fp32_dir, threads=options.threads)
        int8 = Pipeline.from_engines(staging, threads=options.threads)
        gate = run_gate(fp32, int8, held_out, options.gate_steps, options.seed, options.floors, progress)
        progress("int8 gate:\n" + gate.table())
        if gate.failures:
            raise QuantizationError("the int8 graphs fail the gate against fp32 on the held-out photos: "
                                    + "; ".join(gate.failures) + "; nothing was written. Try --int8-scheme conv, "
                                    "more or more typical --calibration photos, or keep the fp32/fp16 directory")
        for name, entry in entries.items():
            if name not in feeds:  # kept fp32 (MUSIQ): its export parity stands
                continue
            parity = graph_parity(fp32.engines, int8.engines, name, feeds[name][-8:], options.floors.eps_psnr_db)
            entries[name] = replace(entry, parity=parity)
        section = {"tool": _tool(), "scheme": options.scheme, "quantized_ops": list(SCHEMES[options.scheme].ops),
                   "float_ops": {graph: {"ops": f["ops"], "nodes": f["nodes"]} for graph, f in float_ops.items()},
                   "calibration": {
                       "source": calibration.source, "digest": calibration.digest, "photos": len(calibrate),
                       "held_out": len(held_out), "steps": options.calibration_steps,
                       "samples": {name: len(f) for name, f in feeds.items()}},
                   "gate": {**gate.to_dict(), "steps": options.gate_steps, "seed": options.seed}}
        manifest = _int8_manifest(provisional, out.name, staging, entries, section).write(staging)
    return replace(manifest, directory=out)


def _check_int8_memory(manifest: Manifest, photos, options: Int8Options, progress: Callable[[str], None]) -> None:
    """Say the int8 phases' predicted peak, and refuse in one line before calibrating when it exceeds what the
    system can still give (the fp32 graphs are built; nothing of the int8 directory is)."""
    held = rss_bytes() or 0
    phases = predict_int8_memory(manifest, list(photos), held)
    phase = max(phases, key=phases.__getitem__)
    progress(f"memory: int8 phases predicted peak {phases[phase] / GiB:.1f} GiB ({phase})")
    available = available_bytes()
    if options.check_memory and available is not None and phases[phase] - held > available:
        raise QuantizationError(f"the int8 phases need about {(phases[phase] - held) / GiB:.1f} GiB more memory at "
                                f"their peak ({phase}), but only {available / GiB:.1f} GiB is available; close other "
                                "programs, calibrate on fewer or smaller photos, or build on a larger machine "
                                "(--ignore-memory-check builds anyway)")


def _checked_feeds(feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, list[dict[str, np.ndarray]]]:
    for name, recorded in feeds.items():
        if not recorded:
            raise QuantizationError(f"the calibration run never called {name}")
        if not all(np.all(np.isfinite(v)) for feed in recorded for v in feed.values()):
            raise QuantizationError(f"the calibration run fed {name} NaN/inf values: the fp32 graphs overflow on "
                                    "these photos; check the checkpoint, or calibrate on other photos")
    return feeds


def _quantized_graphs(fp32: Manifest, staging: Path, feeds, scheme: str, digest: str,
                      progress: Callable[[str], None]) -> tuple[dict[str, GraphEntry], dict[str, dict[str, Any]]]:
    """Every graph of the directory in `staging`: quantized ones from the feeds, the others (MUSIQ) copied."""
    shutil.copy2(fp32.context_path, staging / fp32.context.file)
    entries, float_ops = {}, {}
    for name, entry in fp32.graphs.items():
        if name not in feeds:
            for file in entry.files:
                shutil.copy2(fp32.directory / file, staging / file)
            entries[name] = entry
            continue
        progress(f"quantizing {name} ({scheme}) on {len(feeds[name])} recorded inputs")
        target = staging / entry.file
        float_ops[name] = quantize_graph(fp32.path(name), target, feeds[name], SCHEMES[scheme])
        data = f"{entry.file}.data"
        # Its own source key: a later fp32 build into the same folder must never take it for its graph.
        key = hashlib.sha256(f"{entry.source_key} int8 {scheme} {digest}".encode()).hexdigest()
        entries[name] = replace(entry, precision="int8", external_data=data if (staging / data).is_file() else None,
                                fp32_ops={"float": float_ops[name]}, source_key=key)
    return entries, float_ops


def _int8_manifest(base: Manifest, name: str, staging: Path, entries: dict[str, GraphEntry], section: dict
                   ) -> Manifest:
    files = {base.context.file: FileRecord.of(staging / base.context.file)}
    for entry in entries.values():
        files.update({file: FileRecord.of(staging / file) for file in entry.files})
    return replace(base, name=name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   precision="int8", graphs=entries, files=files, quantization=section or None, tensorrt=None)


def _tool() -> str:
    import onnxruntime

    return f"onnxruntime.quantization.quantize_static {onnxruntime.__version__} (QDQ, MinMax, per-channel)"

