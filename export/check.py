"""`adaptbir-export check`: every graph of an engine directory on each backend, same inputs, compared.

The first backend (default `ort-cpu`) is the baseline; each other backend's outputs are compared with it by
polygraphy's `Comparator`, with the graph's own tolerance from its description (`runtime/graphs.py`): an
absolute error bound where both sides compute in fp32, the PSNR floor where either computes in reduced
precision (an fp16 directory, OpenVINO bf16). Inputs are the runtime's sample inputs at one image size, so a
user who built TensorRT plans on their GPU proves them against ONNX Runtime in one command.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from adaptbir.runtime.backend import BACKENDS, DEFAULT_BACKEND, describe
from adaptbir.runtime.backends import Engines, backend_status
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.graphs import GRAPHS, GraphSpec, Tolerance
from adaptbir.runtime.manifest import Manifest, load_manifest
from adaptbir.runtime.metrics import psnr_over_range

SIZE = (256, 256)  # the export-time sample size
FULL_PRECISION = ("fp32", "f32")  # the directory's fp32, OpenVINO's f32


class EngineRunner(BaseRunner):
    """One graph of an `Engines` set as a polygraphy runner (feeds validated and outputs checked by `Engines`)."""

    def __init__(self, engines: Engines, graph: str, name: str):
        super().__init__(name=name)
        self.engines, self.graph = engines, graph
        self.spec: GraphSpec = engines.specs[graph]

    def activate_impl(self) -> None:
        pass  # the sessions were created when the directory was loaded

    def deactivate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        metadata = TensorMetadata()
        for t in self.spec.inputs:
            metadata.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else None for d in t.dims])
        return metadata

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        outputs = self.engines.run(self.graph, dict(feed_dict))
        self.inference_time = time.perf_counter() - start
        return OrderedDict((t.name, out) for t, out in zip(self.spec.outputs, outputs, strict=True))


@dataclass
class GraphCheck:
    graph: str
    backend: str
    rule: str
    max_abs: float
    psnr_db: float | None  # worst over the outputs; None when equal
    passed: bool


def _rule(tolerance: Tolerance, reduced: bool) -> tuple[str, Callable]:
    """(description, polygraphy compare function) for one graph and one pair of backends."""
    if reduced and tolerance.fp16_min_psnr_db != float("inf"):
        floor = tolerance.fp16_min_psnr_db

        def psnr_floor(baseline, other) -> OrderedDict:
            return OrderedDict((name, (db := psnr_over_range(other[name], baseline[name])) is None or db >= floor)
                               for name in baseline.keys())

        return f"PSNR >= {floor:g} dB", psnr_floor
    atol = tolerance.fp32_atol
    return f"max abs <= {atol:g}", SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="max")


def default_backends(manifest: Manifest) -> list[str]:
    """ort-cpu, then every other backend available here (trt only where the directory has plans)."""
    status = backend_status()
    return [DEFAULT_BACKEND, *(name for name, b in BACKENDS.items() if name != DEFAULT_BACKEND
                               and status[name].startswith("available") and b.usable_with(manifest))]


def check_directory(directory: Path, backends: list[str] | None = None, size: tuple[int, int] = SIZE,
                    threads: int | None = None, cpu_precision: str | None = None, seed: int = 0,
                    progress: Callable[[str], None] = print) -> list[GraphCheck]:
    """Run every graph on each backend with the same inputs; compare each backend with the first."""
    manifest = load_manifest(directory)
    backends = backends or default_backends(manifest)
    if len(backends) < 2:
        raise AdaptBIRError(f"check needs two backends to compare, got {', '.join(backends)}; name them with "
                            "--backends (e.g. ort-cpu,openvino)")
    engines = {b: Engines(manifest, b, threads, cpu_precision if describe(b).chooses_precision else None)
               for b in backends}
    context = manifest.load_context()
    checks = []
    for graph in manifest.graphs:
        description = GRAPHS[graph]
        feeds = description.sample_feeds(np.random.default_rng(seed), size, description.check_batch, context,
                                         factor=manifest.latent.downsample_factor)
        runners = [EngineRunner(engines[b], graph, b) for b in backends]
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # polygraphy's per-output log: our table says it once
            results = Comparator.run(runners, data_loader=[feeds])
            for i, backend in enumerate(backends[1:], 1):
                reduced = any(engines[b].compute_precision not in FULL_PRECISION for b in (backends[0], backend))
                rule, compare = _rule(manifest.graph(graph).tolerance, reduced and not description.fp32_only)
                verdict = Comparator.compare_accuracy(results, comparisons=[(0, i)], compare_func=compare)
                checks.append(_summary(graph, backend, rule, results[backends[0]][0], results[backend][0],
                                       bool(verdict)))
        progress(_row(checks[-1]) if len(backends) == 2 else f"{graph}: done")
    return checks


def _summary(graph: str, backend: str, rule: str, baseline, other, passed: bool) -> GraphCheck:
    max_abs, worst = 0.0, None
    for name in baseline.keys():
        a, b = np.asarray(other[name], np.float64), np.asarray(baseline[name], np.float64)
        max_abs = max(max_abs, float(np.abs(a - b).max()))
        db = psnr_over_range(a, b)
        worst = db if worst is None or (db is not None and db < worst) else worst
    return GraphCheck(graph, backend, rule, max_abs, worst, passed)


def _row(c: GraphCheck) -> str:
    psnr = "equal" if c.psnr_db is None else f"{c.psnr_db:.1f}"
    return (f"{c.graph:<14} {c.backend:<10} {c.max_abs:>10.2e} {psnr:>8}  {c.rule:<18} "
            f"{'ok' if c.passed else 'MISMATCH'}")


def table(checks: list[GraphCheck], baseline: str) -> str:
    head = f"{'graph':<14} {'backend':<10} {'max abs':>10} {'PSNR dB':>8}  {'rule':<18} against {baseline}"
    return "\n".join([head, *map(_row, checks)])
