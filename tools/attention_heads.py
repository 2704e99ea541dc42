"""One self-attention layer exported batched and one head at a time, timed side by side in one ONNX Runtime
process (the measurement behind export/attention.py's per-head form).

    python tools/attention_heads.py [TOKENS=4096] [--runs 7]      # sd21 level 0: 5 heads x 64, 320 channels
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from adaptbir.export.attention import CrossAttention


class Batched(torch.nn.Module):
    """Every head's scores at once: the form the UNet had before."""

    def __init__(self, attention: CrossAttention):
        super().__init__()
        self.a = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a
        q, k, v = a._split(a.to_q(x)), a._split(a.to_k(x)), a._split(a.to_v(x))
        out = a._attend(q, k, v)
        bh, n, d = out.shape
        out = out.reshape(bh // a.heads, a.heads, n, d).transpose(1, 2)
        return a.to_out(out.reshape(-1, n, a.heads * d))


def _session(module: torch.nn.Module, x: torch.Tensor, path: Path) -> ort.InferenceSession:
    torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      opset_version=17, dynamic_axes={"x": {1: "n"}})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # as the runtime's
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokens", type=int, nargs="?", default=4096)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    attention = CrossAttention(320, 320, 5, 64).eval()
    x = torch.randn(1, args.tokens, 320)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"batched": _session(Batched(attention), x, Path(tmp) / "batched.onnx"),
                    "per head": _session(attention, x, Path(tmp) / "per_head.onnx")}
        feed = {"x": x.numpy()}
        outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
        print(f"max abs difference {float(np.abs(outputs['batched'] - outputs['per head']).max()):.3g}")
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.runs):  # alternating, so both see the same machine
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        ms = [v * 1e3 for v in t]
        print(f"{name:9} N={args.tokens}: median {statistics.median(ms):.1f} ms [{min(ms):.1f}..{max(ms):.1f}]")
    print(f"ratio per head / batched: {statistics.median(times['per head']) / statistics.median(times['batched']):.3f}")


if __name__ == "__main__":
    main()
