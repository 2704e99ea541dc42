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


MUSIQ_ATTENTION_COPIES = 4


def musiq_bytes(tokens: int, pixels: int, musiq: dict) -> int:
    """Predicted peak of one MUSIQ call on an image of `pixels` pixels giving N tokens, beyond what the
    process held before: four [heads, N, N] float32 attention tensors alive at once (logits, mask, softmax
    and ONNX Runtime's copies; one layer at a time), the patch tensor (N × 3·patch² float32) three times,
    per-token activations, and the image as float32 twice (scaled, resized). Fitted to measured peaks of
    the tiny MUSIQ (4 heads; `tools/musiq_memory.py`, `tools/restore_memory.py`; benchmarks/README.md)."""
    attention = MUSIQ_ATTENTION_COPIES * musiq["num_heads"] * tokens**2 * 4
    patches = 3 * tokens * 3 * musiq["patch_size"] ** 2 * 4
    activations = 8 * tokens * (musiq["hidden_size"] + musiq["mlp_dim"]) * 4
    return attention + patches + activations + 2 * pixels * 3 * 4


# ------------------------------------------------------------------------------------- one restore
#
# A restore's peak is the process (interpreter and libraries), the weights as the backend holds them, and the
# largest stage: MUSIQ, the dual encoder, one UNet-with-controls call, or the decoder, each on the whole image
# or on one tile. ONNX Runtime's shared arena keeps its largest call's blocks for the next, so the peak is the
# largest stage, not their sum. The factors were fitted on measured peaks (benchmarks/README.md, "Restore
# memory"; `python tools/restore_memory.py`).

PROCESS_BYTES = 130 * 2**20  # python, numpy, Pillow, ONNX Runtime, before any session
# The weights as each backend holds them: `Backend.host_weight_bytes` (runtime/backend.py).
UNET_ATTENTION_COPIES = 2.5  # [N, N] float32 tensors per head alive at once (logits, scaled, softmax; fitted)
VAE_ATTENTION_COPIES = 2  # the VAE mid-block's (its scale is folded by ONNX Runtime)
UNET_ACTIVATIONS = 40  # float32 values alive per level-0 token and channel (GEGLU, skips, ControlNet outputs)
VAE_ACTIVATIONS = 4  # float32 values alive per full-resolution pixel and channel (resblocks, conv buffers)
IMAGE_BYTES_PER_PIXEL = 48  # the padded image, its float copies, blend buffers, the decoded image (fitted)


def unet_call_bytes(unet: dict, lat_h: int, lat_w: int, heads_at_once: int | None) -> int:
    """One UNet-with-controls call on a [1,4,lat_h,lat_w] latent: the level-0 activations of the UNet and its
    ControlNet, and the level-0 self-attention (if the UNet has one) — `heads_at_once` heads' [N, N] scores,
    N = lat_h·lat_w; None = every head (graphs exported before attention went one head at a time)."""
    tokens, channels = lat_h * lat_w, unet["model_channels"] * unet["channel_mult"][0]
    heads = channels // unet["num_head_channels"] if heads_at_once is None else heads_at_once
    attention = UNET_ATTENTION_COPIES * heads * tokens**2 * 4 if 1 in unet["attention_resolutions"] else 0
    return attention + UNET_ACTIVATIONS * tokens * channels * 4


def vae_call_bytes(vae: dict, lat_h: int, lat_w: int) -> int:
    """One encoder or decoder call: full-resolution activations at the first level's channels and the
    mid-block's single-head attention at latent resolution."""
    channels = vae["ch"] * vae["ch_mult"][0]
    pixels = 64 * lat_h * lat_w
    return VAE_ACTIVATIONS * pixels * channels * 4 + VAE_ATTENTION_COPIES * (lat_h * lat_w) ** 2 * 4
