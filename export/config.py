"""Model hyper-parameters: the `sd21` and `tiny` presets, or any JSON file in the same schema.

The schema is the reference's `tiny_config.json`: one section per component (`unet`, `controlnet`,
`vae`, `restoration_encoder`, `musiq`, optionally `text_encoder`), plus `schedule`, `latent`,
`context` and `control_scales`. Unknown keys (notes, versions) are ignored; missing required keys
are reported by name.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from adaptbir.runtime.errors import ConfigError
from adaptbir.runtime.manifest import ScheduleConfig  # the manifest's section: one schedule description

SCHEDULE_KEYS = ("linear_start", "linear_end", "timesteps")  # what a model config may set (the rest is fixed)

PRESETS = ("sd21", "tiny")


def _take(cls, section: dict[str, Any], where: str):
    """Build dataclass `cls` from the keys of `section` it declares; list any that are missing."""
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - section.keys())
    if missing:
        raise ConfigError(f"config section '{where}' lacks {', '.join(missing)}")
    values = {k: v for k, v in section.items() if k in names}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


@dataclass(frozen=True)
class UNetConfig:
    """SD 2.x UNet (also the ControlNet's encoder half)."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_head_channels: int
    context_dim: int
    in_channels: int = 4
    out_channels: int = 4
    transformer_depth: int = 1
    hint_channels: int = 4
    csft_hidden_channels: int = 128
    groupnorm_groups: int = 32
    groupnorm_eps: float = 1e-5
    transformer_groupnorm_eps: float = 1e-6
    layernorm_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL encoder/decoder (`ddconfig` of the reference)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    groupnorm_groups: int = 32
    groupnorm_eps: float = 1e-6


@dataclass(frozen=True)
class MusiqConfig:
    """pyiqa MUSIQ constructor arguments (KonIQ: one output class)."""

    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    patch_size: int = 32
    num_class: int = 1
    num_scales: int = 3
    spatial_pos_grid_size: int = 10
    use_scale_emb: bool = True
    longer_side_lengths: tuple[int, ...] = (224, 384)


@dataclass(frozen=True)
class TextEncoderConfig:
    """OpenCLIP ViT-H/14 text tower, of which SD 2.x uses the penultimate layer."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    heads: int = 16
    layers: int = 24
    layers_used: int = 23
    layernorm_eps: float = 1e-5
    sot_token: int = 49406
    eot_token: int = 49407


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of one AdaptBIR model."""

    name: str
    unet: UNetConfig
    controlnet: UNetConfig
    vae: VAEConfig
    restoration_encoder: VAEConfig
    musiq: MusiqConfig
    schedule: ScheduleConfig
    text_encoder: TextEncoderConfig | None
    context_dim: int
    scale_factor: float = 0.18215
    control_scales: tuple[float, ...] = (1.0,) * 13

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in raw or not isinstance(raw[key], dict):
        raise ConfigError(f"config lacks the '{key}' section")
    return raw[key]


def config_from_dict(raw: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Parse a configuration in the tiny_config.json schema."""
    unet = _take(UNetConfig, _section(raw, "unet"), "unet")
    control = _take(UNetConfig, _section(raw, "controlnet"), "controlnet")
    text = _take(TextEncoderConfig, raw["text_encoder"], "text_encoder") if raw.get("text_encoder") else None
    context_dim = int(raw.get("context", {}).get("shape", [None, 77, unet.context_dim])[-1])
    config = ModelConfig(
        name=str(raw.get("name", name)),
        unet=unet,
        controlnet=control,
        vae=_take(VAEConfig, _section(raw, "vae"), "vae"),
        restoration_encoder=_take(VAEConfig, raw.get("restoration_encoder") or raw["vae"], "restoration_encoder"),
        musiq=_take(MusiqConfig, _section(raw, "musiq"), "musiq"),
        schedule=_take(ScheduleConfig, {k: v for k, v in raw.get("schedule", {}).items() if k in SCHEDULE_KEYS},
                       "schedule"),
        text_encoder=text,
        context_dim=context_dim,
        scale_factor=float(raw.get("latent", {}).get("scale_factor", 0.18215)),
        control_scales=tuple(float(s) for s in raw.get("control_scales", (1.0,) * 13)),
    )
    _validate(config)
    return config


def _validate(config: ModelConfig) -> None:
    u, c = config.unet, config.controlnet
    problems = []
    if u.num_res_blocks != 2:
        problems.append("the CSFT upsample points assume unet.num_res_blocks == 2")
    if len(u.channel_mult) != 4:
        problems.append("the 13 control features assume 4 UNet levels (channel_mult of length 4)")
    for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions"):
        if getattr(u, key) != getattr(c, key):
            problems.append(f"controlnet.{key} must equal unet.{key}")
    if u.context_dim != config.context_dim or c.context_dim != config.context_dim:
        problems.append("unet/controlnet context_dim must equal the context width")
    if len(config.control_scales) != 13:
        problems.append("control_scales must have 13 values")
    if config.vae.ch_mult != config.restoration_encoder.ch_mult or config.vae.ch != config.restoration_encoder.ch:
        problems.append("the restoration encoder must have the VAE's shape")
    if 2 ** (len(config.vae.ch_mult) - 1) != 8:
        problems.append("the latent must be 8x down-sampled (vae.ch_mult of length 4)")
    if config.text_encoder and config.text_encoder.width != config.context_dim:
        problems.append("text_encoder.width must equal the context width")
    if problems:
        raise ConfigError("invalid model configuration: " + "; ".join(problems))


def load_config(preset: str | None = None, path: str | Path | None = None) -> ModelConfig:
    """A shipped preset by name, or a JSON file in the same schema."""
    if (preset is None) == (path is None):
        raise ConfigError("give exactly one of a preset name or a config file")
    if path is not None:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        return config_from_dict(raw, name=path.stem)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)} or pass a config file")
    text = resources.files("adaptbir.export").joinpath("presets", f"{preset}.json").read_text()
    return config_from_dict(json.loads(text), name=preset)
