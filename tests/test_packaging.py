"""The environment `make` builds: pyiqa's MUSIQ imports without pyiqa's heavy dependency tree."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adaptbir.export.config import PRESETS, load_config


def test_pyiqa_musiq_arch_imports():
    import pyiqa.archs.musiq_arch as musiq_arch

    assert hasattr(musiq_arch, "MUSIQ")


@pytest.mark.parametrize("name", ["transformers", "bitsandbytes", "datasets"])
def test_heavy_pyiqa_dependencies_are_absent(name):
    assert importlib.util.find_spec(name) is None, f"{name} is installed; pyiqa must be installed --no-deps"


def test_pyiqa_stray_folders_are_pruned():
    """pyiqa's wheel ships a top-level `tests/` (and build/, docs/...) that could shadow ours."""
    dist = importlib.metadata.distribution("pyiqa")
    stray = [f for f in dist.files or [] if f.parts[0] in {"tests", "build", "docs", "options", "ResultsCalibra"}]
    left = [str(f) for f in stray if Path(dist.locate_file(f)).exists()]
    assert not left, f"run tools/prune_pyiqa.py: {left[:3]}"


def test_presets_ship_inside_the_package():
    for name in PRESETS:
        assert load_config(name).name == name


def test_runtime_import_is_torch_free():
    code = "import sys, adaptbir.runtime, adaptbir.runtime.errors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_building_the_package_warns_about_nothing_in_its_metadata(tmp_path):
    """A fresh install builds the wheel; setuptools' warnings about our pyproject (a deprecated license
    table, a data folder missing from `packages`) would be the first lines a new user reads."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                             "-w", str(tmp_path), str(repo)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    warnings = [line.strip() for line in output.splitlines() if "Warning" in line or "deprecated" in line]
    assert not warnings, warnings
    wheel = next(tmp_path.glob("adaptbir-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    page = {f"adaptbir/serve/page/{name}" for name in ("index.html", "page.css", "page.js")}  # the service's
    assert {"adaptbir/export/presets/tiny.json", "adaptbir/runtime/manifest.schema.json", *page} <= set(names)
