"""The restore plan: memory model, budget-based tiling, `adaptbir plan` (runtime/plan.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from adaptbir.runtime.arguments import parse_bytes
from adaptbir.runtime.backends import Engines
from adaptbir.runtime.cli import main
from adaptbir.runtime.errors import ArgumentError, InputError
from adaptbir.runtime.manifest import load_manifest
from adaptbir.runtime.memory import UNET_ATTENTION_COPIES, GiB
from adaptbir.runtime.pipeline import Pipeline
from adaptbir.runtime.plan import plan_restore
from adaptbir.runtime.preprocess import plan_geometry

MiB = 2**20


@pytest.fixture(scope="module")
def manifest(tiny_engines):
    return load_manifest(tiny_engines, verify=False)


def _plan(manifest, h, w, **options):
    return plan_restore(manifest, plan_geometry(h, w), **options)


def test_budget_decides_tiling(manifest):
    """Untiled whenever the predicted peak fits; 512 px tiles when only they fit; a clear error when not even
    tiles fit; `tile_size` still forces the choice."""
    untiled = _plan(manifest, 768, 1024, memory_budget=16 * GiB)
    assert not untiled.tiled and untiled.tiles == 1 and "fits the 16.0 GiB" in untiled.reason
    assert untiled.tokens == 193 + 24 * 32 and untiled.geometry.padded == (768, 1024)
    tiled = _plan(manifest, 768, 1024, memory_budget=1 * GiB)
    assert tiled.tiled and tiled.tile_px == 512 and tiled.tiles == 6
    assert "over the 1.0 GiB memory budget" in tiled.reason and tiled.peak_bytes <= GiB < untiled.peak_bytes
    with pytest.raises(InputError, match=r"1024×768 \(W×H\) image needs about .* even in 512 px tiles"):
        _plan(manifest, 768, 1024, memory_budget=200 * MiB)
    forced = _plan(manifest, 768, 1024, memory_budget=200 * MiB, tile_size=0)  # the caller's choice wins
    assert not forced.tiled and "tiling turned off" in forced.reason
    assert _plan(manifest, 768, 1024, tile_size=256).tile_px == 256
    given = _plan(manifest, 768, 1024, score_given=True, memory_budget=16 * GiB)
    assert given.tokens is None and "musiq" not in given.stages


def test_the_attention_term_follows_the_manifest(manifest):
    """Graphs written before the one-head-at-a-time attention hold every head's scores: 4 × the term."""
    import dataclasses

    old = dataclasses.replace(manifest, graphs={**manifest.graphs, "unet": dataclasses.replace(
        manifest.graphs["unet"], attention_heads_at_once=None)})
    new_sample = _plan(manifest, 768, 1024, tile_size=0).stages["sample"]
    old_sample = _plan(old, 768, 1024, tile_size=0).stages["sample"]
    tokens = 96 * 128
    assert old_sample - new_sample == UNET_ATTENTION_COPIES * (4 - 1) * tokens**2 * 4  # tiny: 4 heads at level 0


def test_too_large_fails_before_any_engine_runs(tiny_engines, monkeypatch):
    pipeline = Pipeline.from_engines(tiny_engines, memory_budget=200 * MiB)
    monkeypatch.setattr(Engines, "run", lambda *a, **k: pytest.fail("an engine ran"))
    with pytest.raises(InputError, match="even in 512 px tiles"):
        pipeline.restore(np.zeros((768, 1024, 3), np.uint8), seed=0, steps=2)
    with pytest.raises(InputError, match="even in 512 px tiles"):
        pipeline.plan((768, 1024))


@pytest.mark.parametrize(("text", "expected"), [("12G", 12 * GiB), ("12GiB", 12 * GiB), ("800M", 800 * MiB),
                                                ("800mb", 800 * MiB), ("0.5g", GiB // 2), ("2", 2 * GiB)])
def test_memory_sizes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "12X", "-1G", "0", "G"])
def test_bad_memory_sizes(text):
    with pytest.raises(ArgumentError, match="memory size"):
        parse_bytes(text)


def test_plan_command(tiny_engines, tmp_path, capsys):
    """Headers only, nothing runs: a line per image, JSON on request, a missing file is an error (exit 1)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (1024, 768)).save(folder / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: read as 768 wide, 1024 high
    Image.new("RGB", (1024, 768)).save(folder / "turned.jpg", exif=exif)
    rc = main(["plan", str(folder), "--engines", str(tiny_engines), "--memory-budget", "16G"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == 2
    assert "turned.jpg: processing 768×1024 (W×H)" in lines[0] and "untiled: its predicted peak fits" in lines[0]
    assert "wide.png: processing 1024×768 (W×H)" in lines[1] and "961 MUSIQ tokens" in lines[1]
    rc = main(["plan", str(folder / "wide.png"), str(tmp_path / "missing.png"), "--engines", str(tiny_engines),
               "--memory-budget", "1G", "--score", "50", "--json"])
    first, second = map(json.loads, capsys.readouterr().out.splitlines())
    assert rc == 1
    assert first["tiled"] and first["tiles"] == 6 and first["musiq_tokens"] is None
    assert first["sizes"]["input"] == [768, 1024] and first["predicted_peak_gib"] <= 1.0
    assert second == {"input": str(tmp_path / "missing.png"), "error": "file not found; check the path"}


def test_plan_refuses_what_restore_refuses(tiny_engines, tmp_path, capsys):
    """A CPU precision for a backend that computes in the directory's precision: restore's BackendError,
    from `adaptbir plan` too (usage error, exit 2), before any image is planned."""
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    rc = main(["plan", str(tmp_path / "a.png"), "--engines", str(tiny_engines), "--cpu-precision", "bf16"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert "a CPU precision (bf16) applies to the openvino backend only, not ort-cpu" in captured.err
