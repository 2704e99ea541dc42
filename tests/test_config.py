"""Configurations: the shipped presets, and any JSON in the tiny_config.json schema."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from adaptbir.export.cli import main as export_main
from adaptbir.export.config import config_from_dict, load_config
from adaptbir.runtime.errors import ConfigError
from adaptbir.runtime.manifest import load_manifest


def test_shipped_tiny_preset_equals_the_reference_config(reference):
    assert dataclasses.replace(load_config(path=reference / "tiny_config.json"), name="tiny") == load_config("tiny")


def test_sd21_preset_has_the_full_size_hyperparameters():
    c = load_config("sd21")
    assert (c.unet.model_channels, c.unet.channel_mult, c.unet.num_head_channels, c.context_dim) == (
        320, (1, 2, 4, 4), 64, 1024)
    assert (c.vae.ch, c.vae.ch_mult) == (128, (1, 2, 4, 4))
    assert (c.musiq.hidden_size, c.musiq.num_layers, c.musiq.num_heads, c.musiq.mlp_dim) == (384, 14, 6, 1152)
    assert c.text_encoder is not None and c.text_encoder.layers_used == 23


def _variant(reference) -> dict:
    """Other heads, context width, attention levels, VAE multipliers and MUSIQ depth than the shipped one."""
    raw = json.loads((reference / "tiny_config.json").read_text())
    raw = copy.deepcopy(raw)
    for part in ("unet", "controlnet"):
        raw[part].update(num_head_channels=16, context_dim=48, attention_resolutions=[2, 1],
                         channel_mult=[1, 2, 2, 2])
    raw["context"]["shape"] = [None, 77, 48]
    for part in ("vae", "restoration_encoder"):
        raw[part].update(ch_mult=[1, 2, 2, 1])
    raw["musiq"].update(num_layers=3, hidden_size=64, num_heads=2, mlp_dim=64)
    return raw


def test_any_config_in_the_schema_exports_and_passes_parity(reference, tmp_path):
    path = tmp_path / "variant.json"
    path.write_text(json.dumps(_variant(reference)))
    out = tmp_path / "variant"
    assert export_main(["build", "--random-weights", "--seed", "3", "--config", str(path), "--out", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest.graph("unet").inputs[2].dims == ("B", 77, 48)
    assert manifest.hyperparameters["musiq"]["num_layers"] == 3
    assert all(g.parity["passed"] for g in manifest.graphs.values())


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["unet"].update(num_res_blocks=3), "num_res_blocks == 2"),
    (lambda r: r["controlnet"].update(model_channels=64), "controlnet.model_channels must equal"),
    (lambda r: r.pop("vae"), "lacks the 'vae' section"),
    (lambda r: r["unet"].pop("model_channels"), "'unet' lacks model_channels"),
])
def test_inconsistent_configs_are_refused(reference, edit, message):
    raw = json.loads((reference / "tiny_config.json").read_text())
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_unknown_preset_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'sd15'"):
        load_config("sd15")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path=tmp_path / "bad.json")
