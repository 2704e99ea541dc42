"""The torch modules behind the runtime's `Engines` interface, so the same `Pipeline` code runs on either.

Used by `adaptbir-bench --compare torch`: identical orchestration, identical inputs, only the engine
calls differ (ONNX Runtime vs torch eager on the same weights and thread count).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from adaptbir.runtime.backends import check_finite
from adaptbir.runtime.manifest import Manifest

from .components import components
from .model import AdaptBIR


class TorchEngines:
    backend = "torch-eager"
    compute_precision = "fp32"  # the torch modules of the export, eager

    def __init__(self, manifest: Manifest, model: AdaptBIR, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.manifest, self.threads = manifest, threads
        self.specs = {name: manifest.graph(name) for name in manifest.graphs}
        context = torch.from_numpy(manifest.load_context())
        self.modules = {c.name: c.torch_reference.eval() for c in components(model, context)}

    def has(self, name: str) -> bool:
        return name in self.modules

    @torch.inference_mode()
    def run(self, name: str, feeds: dict[str, np.ndarray], timings: dict[str, float] | None = None
            ) -> list[np.ndarray]:
        spec = self.specs[name]
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs]
        start = time.perf_counter()
        out = self.modules[name](*inputs)
        if timings is not None:
            timings["engine_s"] = timings.get("engine_s", 0.0) + time.perf_counter() - start
        outputs = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        check_finite(name, outputs, (t.name for t in spec.outputs), self.compute_precision)
        return outputs
