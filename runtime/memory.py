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


_JOINT_PEAKS: dict[str, int] = {}  # a child process's peak + what its parent held meanwhile, by what it ran


def note_joint_peak(nbytes: int, what: str) -> None:
    """Note what this process and a child it waited for held together at most (the child's peak RSS plus this
    process's RSS when it started it): `peak_with_children` counts it."""
    _JOINT_PEAKS[what] = max(nbytes, _JOINT_PEAKS.get(what, 0))


def peak_with_children() -> tuple[int, str]:
    """(bytes, what set it): the larger of this process's peak RSS and the noted joint peaks with children."""
    return max([(peak_rss_bytes(), "this process"), *((n, what) for what, n in _JOINT_PEAKS.items())])


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


# ------------------------------------------------------------------------------------- one restore on OpenVINO
#
# OpenVINO's CPU plugin (runtime/backends.py, `OpenVinoSession`) holds a restore's memory differently, measured
# stage by stage on the tiny engines (`python tools/restore_memory.py engines/tiny-random HxW... --backend
# openvino --stages`; benchmarks/README.md, "Restore memory"):
# * a graph is read, prepared and compiled at its first call and held from then on: a stage holds the graphs run
#   so far (MUSIQ, the encoders, the UNet, the decoder, in that order), where ONNX Runtime holds all four from
#   the load. A compiled model holds, beside its weights, the plugin's kernels and per-node state
#   (`Backend.runtime_bytes`, all four graphs; `OPENVINO_COMPILED_SHARES` says how much each);
# * a compiled model keeps its intermediate buffers after a call until another graph's call starts
#   (`OpenVinoMemory`): a stage holds its own buffers, as with ONNX Runtime's shared arena;
# * the buffers are planned for the compiled shape (memory reused between nodes) and hold values in the compute
#   precision (bf16: 2 bytes; MUSIQ f32). The UNet's self-attention is fused (no [N, N] scores: at N = 24 576,
#   1 536×1 024 px, the UNet's call holds next to nothing), the VAE mid-block's is not: one [N, N] score matrix,
#   whose memory the VAE's full-resolution activations reuse (the larger of the two is held, not their sum).
# The process itself counts as `PROCESS_BYTES` (OpenVINO's measured 99 MiB after loading: the difference is in the
# fit of `Backend.runtime_bytes`), the image as `IMAGE_BYTES_PER_PIXEL` (the tiny peaks grow by 46 B a pixel beyond
# the attention).

# Of `Backend.runtime_bytes`, what each stage's graph holds once compiled (buffers freed, heap trimmed; tiny
# engines, bf16 and f32 alike: MUSIQ 37, dual encoder 29, UNet 240, decoder 10 MiB).
OPENVINO_COMPILED_SHARES = {"musiq": 0.12, "encode": 0.09, "sample": 0.76, "decode": 0.03}
OPENVINO_UNET_VALUES = 10  # per level-0 token and channel of a UNet call (tiny: ~15 MiB more from 4 096 to 24 576)
OPENVINO_VAE_ATTENTION_COPIES = 1  # VAE mid-block [N, N] score matrices (tiny: 1 152 MiB bf16, 2 304 f32 at N = 24 576)
# Values per full-resolution pixel and channel of a VAE call: the encoder's first level (ch · ch_mult[0]), the
# decoder's full-resolution input (it upsamples the second level's ch · ch_mult[1] channels). Fitted on `sd21` bf16,
# 512×512 against 1 024×768 (peaks 6 610 and 7 420 MiB: 810 MiB more for 3 × the pixels; the encoder's stage
# 1 038 and 1 288 MiB, predicted 876 and 1 284); on the tiny engines (32 channels throughout) the attention is the
# larger from 512×512 up.
OPENVINO_VAE_VALUES = 3
# MUSIQ's buffers per token (f32), linear in the tokens (its attention is fused too): the graph alone, 449 to 4 289
# tokens, 220-230 KiB a token on the tiny MUSIQ and on `sd21`'s alike (the patches', not the width's); 200 KiB
# fits the restores (the stage's peak over what it held before).
OPENVINO_MUSIQ_TOKEN_BYTES = 200 * 1024


def value_bytes(precision: str) -> int:
    """Bytes of one activation in a backend's compute precision (bf16, "int8+bf16": 2; f32, fp32 and the rest: 4)."""
    return 2 if precision.endswith("bf16") else 4


def openvino_unet_call_bytes(unet: dict, lat_h: int, lat_w: int, precision: str) -> int:
    """One UNet-with-controls call on OpenVINO: level-0 activations only (its attention is fused)."""
    return OPENVINO_UNET_VALUES * lat_h * lat_w * unet["model_channels"] * unet["channel_mult"][0] * value_bytes(
        precision)


def openvino_vae_call_bytes(vae: dict, lat_h: int, lat_w: int, precision: str, decoder: bool) -> int:
    """One encoder or decoder call on OpenVINO: the mid-block's [N, N] scores or the full-resolution activations,
    whichever is larger (one buffer plan reuses the memory)."""
    attention = OPENVINO_VAE_ATTENTION_COPIES * (lat_h * lat_w) ** 2
    channels = vae["ch"] * (max(vae["ch_mult"][:2]) if decoder else vae["ch_mult"][0])
    activations = OPENVINO_VAE_VALUES * 64 * lat_h * lat_w * channels
    return max(attention, activations) * value_bytes(precision)


def openvino_musiq_bytes(tokens: int, pixels: int) -> int:
    """One MUSIQ call on OpenVINO (always f32): buffers that grow with the token count, and the image as float32
    twice (scaled, resized) as on ONNX Runtime."""
    return OPENVINO_MUSIQ_TOKEN_BYTES * tokens + 2 * pixels * 3 * 4
