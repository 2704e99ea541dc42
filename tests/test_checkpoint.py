"""Checkpoint loading: variants, exact key names, loud failures, the full-size layout without memory."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from adaptbir.export.checkpoint import (
    IGNORED_DENOISE_COPY,
    IGNORED_MUSIQ_DUMMY,
    IGNORED_MUSIQ_REPLACED,
    IGNORED_RESTORATION_VAE,
    IGNORED_SCHEDULE,
    IGNORED_TEXT,
    gather,
    load_model,
    own_copy,
    read_state_dict,
)
from adaptbir.export.config import load_config
from adaptbir.runtime.errors import CheckpointError
from adaptbir.runtime.memory import rss_bytes


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def baseline(reference):
    model, _ = load_model(load_config("tiny"), gather(reference / "tiny_stage3.safetensors"))
    return model


@pytest.mark.parametrize("variant", ["plain", "state_dict", "module_prefix", "safetensors"])
def test_checkpoint_variants_load_identically(tmp_path, tiny_state, baseline, variant):
    if variant == "safetensors":
        path = tmp_path / "stage3.safetensors"
        save_file(tiny_state, str(path))
    else:
        obj = {
            "plain": dict(tiny_state),
            "state_dict": {"state_dict": dict(tiny_state), "epoch": 3, "global_step": 1000},
            "module_prefix": {f"module.{k}": v for k, v in tiny_state.items()},
        }[variant]
        path = tmp_path / "stage3.ckpt"
        torch.save(obj, path)
    model, report = load_model(load_config("tiny"), gather(path))
    assert _same_weights(model, baseline)
    assert report.capabilities.has_csft and report.capabilities.has_restoration_encoder


def test_ignored_keys_are_reported_by_group(tiny_state, musiq_state):
    _, report = load_model(load_config("tiny"), gather(state_dicts={"checkpoint": tiny_state,
                                                                  "musiq": musiq_state}))
    assert len(report.ignored[IGNORED_SCHEDULE]) == 13
    assert len(report.ignored[IGNORED_DENOISE_COPY]) == sum(k.startswith("denoise_encoder.") for k in tiny_state)
    assert all(k.startswith("preprocess_model.") for k in report.ignored[IGNORED_RESTORATION_VAE])
    assert report.loaded["musiq_model.net."] == len(musiq_state)


def test_denoise_encoder_alone_is_the_restoration_encoder(tiny_state, baseline):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("preprocess_model.")}
    model, report = load_model(load_config("tiny"), gather(state_dicts={"checkpoint": state}))
    assert report.capabilities.has_restoration_encoder and _same_weights(model, baseline)


def test_missing_restoration_encoder_is_reported_not_hidden(tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith(("preprocess_model.", "denoise_encoder."))}
    model, report = load_model(load_config("tiny"), gather(state_dicts={"checkpoint": state}))
    assert not report.capabilities.has_restoration_encoder and model.restoration_encoder is None
    assert any("k is fixed to 1" in note for note in report.notes)


def test_parts_given_separately(tmp_path, tiny_state, musiq_state, baseline):
    """SD base + ControlNet/CSFT file + stage-1 VAE (bare AutoencoderKL keys) + pyiqa MUSIQ weights."""
    control_prefixes = ("control_model.", "model.diffusion_model.cft_blocks.",
                        "model.diffusion_model.upsample_layers.")
    sd = {k: v for k, v in tiny_state.items()
          if not k.startswith((*control_prefixes, "preprocess_model.", "denoise_encoder."))}
    control = {k: v for k, v in tiny_state.items() if k.startswith(control_prefixes)}
    vae = {k[len("preprocess_model."):]: v for k, v in tiny_state.items() if k.startswith("preprocess_model.")}
    vae["loss.logvar"] = torch.zeros(())
    paths = {}
    for name, state in {"sd": sd, "control": control, "vae": vae}.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    paths["musiq"] = tmp_path / "musiq_koniq_ckpt.pth"
    torch.save({"params": dict(musiq_state)}, paths["musiq"])
    model, report = load_model(load_config("tiny"), gather(
        paths["sd"], control=paths["control"], restoration_vae=paths["vae"], musiq=paths["musiq"]))
    assert _same_weights(torch.nn.ModuleList([model.unet, model.controlnet, model.vae, model.restoration_encoder]),
                         torch.nn.ModuleList([baseline.unet, baseline.controlnet, baseline.vae,
                                              baseline.restoration_encoder]))
    assert report.capabilities.has_musiq and report.capabilities.has_csft


def test_missing_block_lists_the_keys(tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("model.diffusion_model.output_blocks.4.")}
    with pytest.raises(CheckpointError) as info:
        load_model(load_config("tiny"), gather(state_dicts={"checkpoint": state}))
    message = str(info.value)
    n = sum(k.startswith("model.diffusion_model.output_blocks.4.") for k in tiny_state)
    assert f"{n} missing key(s)" in message
    block = "model.diffusion_model.output_blocks.4"
    assert f"{block}.*: {n} key(s), e.g. {block}." in message


def test_missing_csft_block_is_an_error_not_a_capability(tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("model.diffusion_model.cft_blocks.7.")}
    with pytest.raises(CheckpointError, match=r"cft_blocks\.7\.\*: 8 key\(s\)"):
        load_model(load_config("tiny"), gather(state_dicts={"checkpoint": state}))


def test_wrong_shape_and_unexpected_key_are_listed(tiny_state):
    state = dict(tiny_state)
    state["control_model.zero_convs.3.0.weight"] = torch.zeros(32, 32, 3, 3)
    state["control_model.input_hint_block.0.weight"] = torch.zeros(16, 4, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_model(load_config("tiny"), gather(state_dicts={"checkpoint": state}))
    message = str(info.value)
    assert "control_model.zero_convs.3.0.weight: checkpoint (32, 32, 3, 3), model (32, 32, 1, 1)" in message
    assert "1 unexpected key(s)" in message and "control_model.input_hint_block.0" in message


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_execute_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit()}}, f, protocol=2)  # torch.save's protocol: no warning
    with pytest.raises(CheckpointError, match="refused to load"):
        read_state_dict(path)


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(junk)


# ---------------------------------------------------------------- full-size layout on the meta device


def _meta_state(tsv, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {}
    for line in tsv.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        assert dtype == "float32"
        dims = [int(s) for s in shape.strip("[]").split(",") if s]
        state[prefix + key] = torch.empty(dims, device="meta")
    return state


def test_full_size_stage3_layout_loads_on_meta(reference):
    state = _meta_state(reference / "keys_stage3_full.tsv")
    state["musiq_model.dummy_param"] = torch.empty(0, device="meta")
    model, report = load_model(load_config("sd21"), gather(state_dicts={"checkpoint": state}), device="meta")
    caps = report.capabilities
    assert caps.has_csft and caps.has_restoration_encoder and caps.has_text_encoder and caps.has_musiq
    ignored = report.ignored
    assert len(ignored[IGNORED_SCHEDULE]) == 13
    assert len(ignored[IGNORED_RESTORATION_VAE]) == sum(
        k.startswith(("preprocess_model.decoder.", "preprocess_model.quant_conv.", "preprocess_model.post_quant"))
        for k in state)
    assert len(ignored[IGNORED_DENOISE_COPY]) == sum(k.startswith("denoise_encoder.") for k in state)
    assert sorted(ignored[IGNORED_TEXT]) == sorted(
        k for k in state if k.endswith(("text_projection", "logit_scale")) or ".resblocks.23." in k)
    assert ignored[IGNORED_MUSIQ_DUMMY] == ["musiq_model.dummy_param"]
    n_params = sum(p.numel() for p in model.parameters())
    used = sum(v.numel() for k, v in state.items() if not any(k in keys for keys in ignored.values()))
    assert n_params == used


@pytest.mark.parametrize("prefix", ["musiq_model.net.", ""])
def test_separate_full_size_musiq_file(reference, prefix):
    state = _meta_state(reference / "keys_stage3_full.tsv")
    musiq = _meta_state(reference / "keys_musiq.tsv", prefix)
    _, report = load_model(load_config("sd21"), gather(state_dicts={"checkpoint": state, "musiq": musiq}),
                           device="meta")
    assert len(report.ignored[IGNORED_MUSIQ_REPLACED]) == sum(k.startswith("musiq_model.") for k in state)
    assert report.loaded["musiq_model.net."] == len(musiq) == 248


def test_mapped_checkpoint_is_copied_without_keeping_its_pages(tmp_path):
    """A build frees the model part by part: the weights must live in the process's own memory, and the
    checkpoint's mapped pages must not stay resident beside them (they did: 14.4 GiB for an sd21 fp16 build)."""
    path = tmp_path / "big.ckpt"
    expected = {f"w{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i)) for i in range(256)}
    torch.save({"state_dict": expected}, path)  # 256 MiB, a zip: memory-mapped when read
    mapped = read_state_dict(path)
    before = rss_bytes()
    copies = {k: own_copy(v, torch.float32) for k, v in mapped.items()}
    grown = rss_bytes() - before
    assert all(torch.equal(copies[k], v) and torch.equal(mapped[k], v) for k, v in expected.items())
    assert all(copies[k].untyped_storage().data_ptr() != mapped[k].untyped_storage().data_ptr() for k in expected)
    assert grown < 1.25 * 256 * 2**20  # the copies only: the pages read through the mapping were dropped
    halves = {k: own_copy(v, torch.float16) for k, v in list(mapped.items())[:4]}
    assert all(h.dtype == torch.float16 for h in halves.values())
