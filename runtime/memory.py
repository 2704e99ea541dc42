"""What this process may still allocate, and what it has used: the inputs of every memory budget.

Linux only in substance (/proc and cgroup files); elsewhere the figures are unknown (None) and callers
skip their checks rather than guess.
"""

from __future__ import annotations

import resource
from pathlib import Path

GiB = 1024**3
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork and
    exec, so a child of a large parent (pytest with torch loaded) would report the parent's peak."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), counting reclaimable file cache as
    free; None when there is no limit."""
    for limit_file, usage_file, stat_file, inactive in (
        (_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current", _CGROUP_V2 / "memory.stat", "inactive_file"),
        (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes", _CGROUP_V1 / "memory.stat",
         "total_inactive_file"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # v1 writes a huge number for no limit
            continue
        cache = 0
        try:
            for line in stat_file.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(limit - usage + cache, 0)
    return None


def available_bytes() -> int | None:
    """Memory this process can still allocate without swapping or being OOM-killed: the kernel's
    MemAvailable, capped by the memory cgroup's headroom; None where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    headroom = _cgroup_headroom()
    candidates = [v for v in (available, headroom) if v is not None]
    return min(candidates) if candidates else None


def musiq_bytes(tokens: int, pixels: int, musiq: dict) -> int:
    """Predicted peak of one MUSIQ call on an image of `pixels` pixels giving N tokens, beyond what the
    process held before: five [heads, N, N] float32 attention tensors alive at once (logits, mask, softmax
    and ONNX Runtime's copies; one layer at a time), the patch tensor (N × 3·patch² float32) three times,
    per-token activations, and the image as float32 twice (scaled, resized). Fitted to measured peaks of
    the tiny MUSIQ (4 heads): N = 6115 measured 3.17 GiB, predicted 3.15; N = 11,943 measured 9.4 GiB,
    predicted 11.4 (an overestimate: it guards against an out-of-memory kill)."""
    attention = 5 * musiq["num_heads"] * tokens**2 * 4
    patches = 3 * tokens * 3 * musiq["patch_size"] ** 2 * 4
    activations = 8 * tokens * (musiq["hidden_size"] + musiq["mlp_dim"]) * 4
    return attention + patches + activations + 2 * pixels * 3 * 4
