"""The engine directory's manifest: schema, writing helpers, and validation when a directory is loaded.

A directory is accepted only when its manifest matches the JSON schema, its schema version and runtime
range fit this runtime, and every file it lists exists with the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import atomic_write
from .errors import EngineError
from .graphs import GraphSpec, TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Directories built by this runtime version series are readable by it; a new minor may change the contract.
RUNTIME_RANGE = {"min": "0.1.0", "below": "0.2.0"}
REBUILD = "rebuild it with `adaptbir-export build ... --out DIR`"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3])


def schema() -> dict[str, Any]:
    return json.loads(resources.files("adaptbir.runtime").joinpath("manifest.schema.json").read_text())


def write_json_atomic(path: Path, data: Any) -> None:
    """A reader never sees half a manifest."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


@dataclass
class Manifest:
    directory: Path
    data: dict[str, Any]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def capabilities(self) -> dict[str, bool]:
        return self.data["capabilities"]

    def graph(self, name: str) -> GraphSpec:
        g = self.data["graphs"][name]
        return GraphSpec(name, tuple(map(TensorSpec.from_dict, g["inputs"])),
                         tuple(map(TensorSpec.from_dict, g["outputs"])))

    def path(self, name: str) -> Path:
        return self.directory / self.data["graphs"][name]["file"]


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and validate `directory/manifest.json`; with `verify`, check every file's sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"engine directory {directory} does not exist; {REBUILD}")
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{directory} has no {MANIFEST}: not an engine directory; {REBUILD}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EngineError(f"cannot read {path}: {err}; {REBUILD}") from err
    _check_versions(path, data)
    _check_schema(path, data)
    if verify:
        verify_files(directory, data["files"])
    return Manifest(directory, data)


def _check_versions(path: Path, data: dict[str, Any]) -> None:
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != SCHEMA_VERSION:
        raise EngineError(
            f"{path}: manifest schema version {found!r}, this runtime ({__version__}) reads version "
            f"{SCHEMA_VERSION}; {REBUILD}"
        )
    wanted = data.get("runtime", {})
    try:
        ok = _version(wanted["min"]) <= _version(__version__) < _version(wanted["below"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise EngineError(
            f"{path}: built for runtime versions {wanted.get('min')} ≤ v < {wanted.get('below')}, "
            f"this runtime is {__version__}; {REBUILD}"
        )


def _check_schema(path: Path, data: dict[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise EngineError(f"{path}: invalid manifest at {where}: {err.message}; {REBUILD}") from err


def verify_files(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    problems = []
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            problems.append(f"{name} does not match its recorded sha256 (modified or truncated)")
    if problems:
        raise EngineError(f"engine directory {directory}: " + "; ".join(problems) + f"; {REBUILD}")


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
