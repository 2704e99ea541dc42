"""Where the weights come from: the files a build reads are hashed and recorded, a missing part names its file."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from adaptbir.export.checkpoint import gather, load_model, load_random
from adaptbir.export.config import load_config
from adaptbir.export.model import CHECKPOINT_PREFIXES
from adaptbir.export.weights import MUSIQ_KONIQ, PARTS, PUBLISHED, SD21_BASE, WeightFile, part_of
from adaptbir.runtime.errors import CheckpointError


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_files_read_are_hashed_into_the_manifest_record(tmp_path, tiny_state, musiq_state):
    checkpoint, musiq = tmp_path / "stage3.ckpt", tmp_path / "musiq.safetensors"
    torch.save({"state_dict": dict(tiny_state)}, checkpoint)
    save_file(musiq_state, str(musiq))
    _, report = load_model(load_config("tiny"), gather(checkpoint, musiq=musiq))
    files = report.record()["files"]
    assert files == [
        {"role": "checkpoint", "name": "stage3.ckpt", "bytes": checkpoint.stat().st_size,
         "sha256": _sha256(checkpoint), "published": None},
        {"role": "musiq", "name": "musiq.safetensors", "bytes": musiq.stat().st_size, "sha256": _sha256(musiq),
         "published": None},
    ]
    summary = report.summary()
    assert f"--checkpoint stage3.ckpt, {checkpoint.stat().st_size:,} bytes, sha256 {_sha256(checkpoint)}" in summary
    assert "not the published" not in summary


def test_in_memory_and_random_weights_record_no_files(tiny_state):
    _, report = load_model(load_config("tiny"), gather(state_dicts={"checkpoint": tiny_state}))
    assert report.record()["files"] == [] and "file " not in report.summary()
    _, random = load_random(load_config("tiny"), 0)
    assert random.record()["files"] == []


def test_a_file_named_like_a_published_one_with_other_bytes_is_noted(tmp_path, tiny_state, musiq_state):
    musiq = tmp_path / MUSIQ_KONIQ.name
    torch.save({"params": dict(musiq_state)}, musiq)
    _, report = load_model(load_config("tiny"), gather(state_dicts={"checkpoint": tiny_state}, musiq=musiq))
    assert report.capabilities.has_musiq  # a note, not an error: the key check decides
    digest = _sha256(musiq)
    note = next(n for n in report.notes if "not the published" in n)
    assert note.startswith(f"{MUSIQ_KONIQ.name} is not the published {MUSIQ_KONIQ.name}: its sha256 starts "
                           f"{digest[:16]}, the published one's e95806b9eae5f381")
    assert f"note: {note}" in report.summary() and note in report.record()["notes"]
    assert report.record()["files"][0]["published"] is None


def test_a_file_with_a_published_hash_is_named_as_that_file(tmp_path, monkeypatch):
    path = tmp_path / "renamed.ckpt"
    path.write_bytes(b"some bytes")
    from adaptbir.export import weights

    twin = replace(SD21_BASE, sha256=_sha256(path))
    monkeypatch.setattr(weights, "PUBLISHED", (twin,))
    record = weights.fingerprint("checkpoint", path)
    assert record.published is twin and record.note() is None
    assert record.line().endswith(f"sha256 {_sha256(path)}: the published v2-1_512-ema-pruned.ckpt")
    assert record.to_dict()["published"] == "v2-1_512-ema-pruned.ckpt"


def test_a_published_name_with_its_published_hash_gets_no_note():
    file = WeightFile("musiq", MUSIQ_KONIQ.name, 1, MUSIQ_KONIQ.sha256, MUSIQ_KONIQ)
    assert file.note() is None and "the published musiq_koniq_ckpt-e95806b9.pth" in file.line()


def test_a_checkpoint_without_the_controlnet_names_the_file_and_the_flag(tmp_path, tiny_state):
    path = tmp_path / "sd_only.safetensors"
    save_file({k: v for k, v in tiny_state.items() if not k.startswith("control_model.")}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(load_config("tiny"), gather(path))
    message = str(info.value)
    assert message.startswith("the checkpoint does not fit the model:\n")
    line = next(line for line in message.splitlines() if "ControlNet" in line)
    assert line == ("  the ControlNet (control_model.*) is missing: it is in the AdaptBIR stage-3 checkpoint "
                    "(the authors', github.com/YingqiLiulll/AdaptBIR; no published download or sha256); "
                    "give --checkpoint STAGE3 or --control FILE")
    assert sum(" missing: " in line for line in message.splitlines()) == 1  # only the parts that miss keys


def test_a_missing_csft_block_names_the_csft_layers_not_the_unet(tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("model.diffusion_model.cft_blocks.7.")}
    with pytest.raises(CheckpointError) as info:
        load_model(load_config("tiny"), gather(state_dicts={"checkpoint": state}))
    missing = [line for line in str(info.value).splitlines() if " missing: " in line]
    assert len(missing) == 1 and missing[0].startswith("  the CSFT layers (model.diffusion_model.cft_blocks.*")
    assert "are missing: they are in the AdaptBIR stage-3 checkpoint" in missing[0] and "--control FILE" in missing[0]


def test_absent_musiq_note_names_the_published_file(tiny_state):
    _, report = load_model(load_config("tiny"), gather(state_dicts={"checkpoint": tiny_state}))
    note = next(n for n in report.notes if n.startswith("no MUSIQ"))
    assert "explicit --score" in note and MUSIQ_KONIQ.name in note and MUSIQ_KONIQ.where[0] in note
    assert "--musiq FILE" in note


def test_the_table_covers_every_checkpoint_prefix():
    assert {part_of(prefix).prefixes[0] for prefix in CHECKPOINT_PREFIXES.values()} == set(
        CHECKPOINT_PREFIXES.values())
    assert part_of("model.diffusion_model.upsample_layers.0.weight").name == "the CSFT layers"
    assert all(part.files and part.flags for part in PARTS)
    assert all(f.sha256 is None or len(f.sha256) == 64 for f in PUBLISHED)


def test_adaptbir_info_shows_one_line_per_file():
    from adaptbir.runtime.cli import _weight_file_lines

    files = [{"role": "checkpoint", "name": "v2-1_512-ema-pruned.ckpt", "bytes": 1, "sha256": SD21_BASE.sha256,
              "published": SD21_BASE.name},
             {"role": "musiq", "name": "m.pth", "bytes": 1, "sha256": "ab" * 32, "published": None}]
    assert _weight_file_lines({"files": files}) == [
        "weights           checkpoint v2-1_512-ema-pruned.ckpt, sha256 88ecb78256145567 "
        "(the published v2-1_512-ema-pruned.ckpt)",
        "weights           musiq m.pth, sha256 abababababababab",
    ]
    assert _weight_file_lines({"sources": ["random weights (seed 0)"]}) == []  # random builds, older manifests
