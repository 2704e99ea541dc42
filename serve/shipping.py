"""An engine directory carried to nodes that do not see the driver's disk, through Ray's object store.

    shipment = ship(Path("engines/sd21"))        # driver: the manifest's files, in object-store chunks
    local = shipment.unpack(cache)                # actor/replica: once per node, then from the node's disk

A cluster without shared storage cannot open the driver's path. Ray's `runtime_env` packages are bounded
by a gRPC message (512 MiB), far below an sd21 directory (2.6 GB fp16, 5.2 GB fp32), so the files go
through the object store instead: the driver puts each listed file in 64 MiB chunks (Ray moves them
between nodes and spills them to disk when memory is short), and the first actor on a node writes them
into a node-local cache under a file lock, verifies every sha256 against the manifest and renames the
folder into place — the others on that node wait for it and reuse it, as do later jobs with the same
directory (the folder is named by the manifest's hash). Only the manifest's own files travel.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from adaptbir.runtime.errors import EngineError
from adaptbir.runtime.manifest import MANIFEST, Manifest, load_manifest

CHUNK_BYTES = 64 * 2**20


def default_cache() -> Path:
    """Where a node keeps shipped engine directories: $ADAPTBIR_ENGINE_CACHE, else the user's cache folder."""
    if os.environ.get("ADAPTBIR_ENGINE_CACHE"):
        return Path(os.environ["ADAPTBIR_ENGINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptbir" / "engines"


@dataclass(frozen=True)
class EngineShipment:
    """An engine directory in the object store: a folder name unique to its manifest, and per file (the
    manifest first) the references of its chunks. Holding this keeps the chunks alive."""

    folder: str
    files: dict[str, list] = field(default_factory=dict)  # relative name → [ObjectRef of bytes, ...]

    def unpack(self, cache: Path) -> Path:
        """The engine directory on this node, every file verified against the manifest: written from the
        chunks on first use (one writer per node), reused after — rewritten if a file there was damaged.
        Returns its path (load it with `verify=False`: it has just been checked)."""
        target = cache / self.folder
        if _verified(target):  # the usual case: checked by each actor at once, no lock held
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / f".{self.folder}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other actors of this node wait, then find it done
            if not _verified(target):  # not there yet, left half-written by a crash, or damaged since
                self._write(cache, target)
        return target

    def _write(self, cache: Path, target: Path) -> None:
        import ray

        staging = Path(tempfile.mkdtemp(prefix=f".{self.folder}.", dir=cache))
        try:
            for name, chunks in self.files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("wb") as out:
                    for chunk in chunks:  # one chunk in memory at a time
                        out.write(ray.get(chunk))
            load_manifest(staging, verify=True)  # every sha256 as the manifest says, before anyone uses it
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _verified(directory: Path) -> bool:
    try:
        load_manifest(directory, verify=True)
        return True
    except EngineError:
        return False


def ship(directory: Path, manifest: Manifest | None = None) -> EngineShipment:
    """Put the engine directory's listed files into the object store, after checking them all (pass the
    `manifest` when the caller already loaded it with `verify=True`)."""
    import ray

    manifest = manifest or load_manifest(directory, verify=True)
    names = [MANIFEST, *sorted(manifest.files)]
    folder = f"{manifest.name}-{hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()[:16]}"
    files = {}
    for name in names:
        with (directory / name).open("rb") as source:
            files[name] = [ray.put(chunk) for chunk in iter(lambda s=source: s.read(CHUNK_BYTES), b"")]
    return EngineShipment(folder, files)
