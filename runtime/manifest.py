"""The engine directory's manifest: its one owner. Typed sections, written and read through the schema.

The exporter creates a `Manifest`, the TensorRT builder extends it (`with_tensorrt`), and every reader
(pipeline, backends, CLIs, benchmarks) uses the typed view. `write` and `load_manifest` both validate
against `manifest.schema.json`.

A directory is closed: every file the runtime opens (graphs, their external data, TensorRT plans, the
context) is listed under `files` by a relative name with its size and sha256; names are plain paths inside
the directory (no absolute paths, no `..`), symlinks must stay inside it, and no tensor anywhere in an ONNX
graph reaches a file but the external-data file its entry lists. The manifest is parsed within bounds, its
sections are required and typed, and they agree with each other and with the graph files, so a directory
that loads can restore. These checks do not depend on the ONNX Runtime version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .arguments import STEPS
from .atomic import SpecialFileError, atomic_write, file_kind, open_regular
from .errors import EngineError, shortened
from .gating import RULE
from .graph_content import content_problems
from .graphs import GRAPHS, GraphSpec, TensorSpec, contract_problems, onnx_problems
from .musiq_patches import token_count
from .sampler import check_schedule

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONTEXT_FILE = "context.npy"
# Directories built by this runtime version series are readable by it; a new minor may change the contract.
RUNTIME_RANGE = {"min": "0.1.0", "below": "0.2.0"}
REBUILD = "rebuild it with `adaptbir-export build ... --out DIR`"
# A listed file: relative, '/'-separated, every component starting with a letter, digit or '_' (so no
# absolute path, no '.' or '..' component, no hidden file). The schema holds the same pattern.
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:  # a listed file swapped for a FIFO cannot block the check
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def schema() -> dict[str, Any]:
    return json.loads(resources.files("adaptbir.runtime").joinpath("manifest.schema.json").read_text())


def write_json_atomic(path: Path, data: Any) -> None:
    """A reader never sees half a file."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def _from(cls, data: dict[str, Any], **converted: Any):
    """A section dataclass from its (schema-validated) JSON object; `converted` replaces raw fields."""
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in data.items() if k in names}, **converted})


def _json(value: Any) -> Any:
    """A section as JSON: dataclasses become objects, tuples lists; None-valued optional fields and fields
    not stored (the manifest's directory) are dropped."""
    if isinstance(value, TensorSpec):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _json(getattr(value, f.name)) for f in fields(value) if f.metadata.get("stored", True)
                and not (f.metadata.get("optional") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


OPTIONAL = {"optional": True}


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class Capabilities:
    """Which optional parts a model has; missing parts degrade honestly (docs/architecture.md)."""

    has_csft: bool = True  # without: w is fixed to 0
    has_restoration_encoder: bool = True  # without: k is fixed to 1
    has_text_encoder: bool = False  # without: the context comes from a file or a seed
    has_musiq: bool = True  # without: the score must be given

    def to_dict(self) -> dict[str, bool]:
        return _json(self)


@dataclass(frozen=True)
class Latent:
    scale_factor: float
    channels: int = 4
    downsample_factor: int = 8
    pad_multiple: int = 64


@dataclass(frozen=True)
class ScheduleConfig:
    """The diffusion schedule: SD's values by default; a model config may set the first three."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    default_steps: int = 50
    beta_schedule: str = "linear"
    parameterization: str = "eps"
    variance: str = "fixed_small"


@dataclass(frozen=True)
class MusiqLimits:
    n_max: int
    n_min: int
    patch_size: int
    longer_side_lengths: tuple[int, ...]
    spatial_pos_grid_size: int

    def tokens(self, height: int, width: int) -> int:
        """MUSIQ's token count for a (padded) image of these sizes: its resized scales' and its own patches."""
        return token_count(height, width, self.patch_size, self.longer_side_lengths)


@dataclass(frozen=True)
class ContextEntry:
    shape: tuple[int, ...]
    source: str
    file: str = CONTEXT_FILE


@dataclass(frozen=True)
class GraphEntry:
    file: str
    external_data: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    fp32_ops: dict[str, Any]
    parity: dict[str, Any]
    source_key: str
    parity_full_size: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    # How many heads' [N, N] attention scores the graph holds at once (the memory model's input); None:
    # every head (directories written before the UNet's self-attention went one head at a time).
    attention_heads_at_once: int | None = field(default=None, metadata=OPTIONAL)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphEntry:
        return _from(cls, data, inputs=tuple(map(TensorSpec.from_dict, data["inputs"])),
                     outputs=tuple(map(TensorSpec.from_dict, data["outputs"])))

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, self.external_data) if self.external_data else (self.file,)


@dataclass(frozen=True)
class Plan:
    file: str
    key: str
    shapes: dict[str, list[list[int]]]


@dataclass(frozen=True)
class TensorRTSection:
    version: str
    compute_capability: str
    flags: tuple[str, ...]
    profile: dict[str, Any]
    timing_cache: str
    plans: dict[str, Plan]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorRTSection:
        return _from(cls, data, flags=tuple(data["flags"]),
                     plans={name: _from(Plan, p) for name, p in data["plans"].items()})


@dataclass(frozen=True)
class Manifest:
    """An engine directory's description. `directory` is where it was read from or written to (not stored)."""

    name: str
    created: str
    precision: str
    preset: str
    hyperparameters: dict[str, Any]
    latent: Latent
    schedule: ScheduleConfig
    capabilities: Capabilities
    musiq: MusiqLimits
    context: ContextEntry
    graphs: dict[str, GraphEntry]
    files: dict[str, FileRecord]
    checkpoint: dict[str, Any]
    tools: dict[str, str]
    gating: dict[str, Any] = field(default_factory=lambda: dict(RULE))
    runtime: dict[str, str] = field(default_factory=lambda: dict(RUNTIME_RANGE))
    schema_version: int = SCHEMA_VERSION
    tensorrt: TensorRTSection | None = field(default=None, metadata=OPTIONAL)
    # int8 directories: the quantizer and scheme, the calibration set's digest and size, the ops left float,
    # and the gate's floors and numbers (export/quantize.py).
    quantization: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    directory: Path | None = field(default=None, compare=False, metadata={"stored": False})

    # ------------------------------------------------------------------------------- (de)serialising

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path | None = None) -> Manifest:
        musiq = data["musiq"]
        return _from(
            cls, data, directory=directory,
            latent=_from(Latent, data["latent"]), schedule=_from(ScheduleConfig, data["schedule"]),
            capabilities=_from(Capabilities, data["capabilities"]),
            musiq=_from(MusiqLimits, musiq, longer_side_lengths=tuple(musiq["longer_side_lengths"])),
            context=_from(ContextEntry, data["context"], shape=tuple(data["context"]["shape"])),
            graphs={name: GraphEntry.from_dict(g) for name, g in data["graphs"].items()},
            files={name: _from(FileRecord, f) for name, f in data["files"].items()},
            checkpoint=data.get("checkpoint", {}),
            tensorrt=TensorRTSection.from_dict(data["tensorrt"]) if data.get("tensorrt") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return _json(self)

    def write(self, directory: Path) -> Manifest:
        """Validate (JSON values, schema, listed files, consistency) and write `directory/manifest.json`
        atomically: the builder never writes a manifest the runtime would refuse."""
        directory = Path(directory)
        data = self.to_dict()
        parse_manifest(directory / MANIFEST, json.dumps(data).encode())  # never a value the reader refuses
        _check_schema(directory / MANIFEST, data)
        manifest = replace(self, directory=directory)
        manifest._check_listed()
        manifest._check_consistent()
        write_json_atomic(directory / MANIFEST, data)
        return manifest

    def with_tensorrt(self, section: TensorRTSection, files: dict[str, FileRecord]) -> Manifest:
        """This manifest with `section`'s plans; plan files of a previous section no longer used are unlisted."""
        stale = {p.file for p in self.tensorrt.plans.values()} if self.tensorrt else set()
        kept = {name: record for name, record in self.files.items() if name not in stale}
        return replace(self, tensorrt=section, files={**kept, **files})

    # ---------------------------------------------------------------------------------------- views

    def graph(self, name: str) -> GraphSpec:
        """The graph's description: its recorded inputs and outputs, the runtime's tolerance for it."""
        g = self.graphs[name]
        known = GRAPHS[name].spec if name in GRAPHS else None
        return replace(known, inputs=g.inputs, outputs=g.outputs) if known else GraphSpec(name, g.inputs, g.outputs)

    def _file(self, name: str) -> Path:
        if self.directory is None:
            raise EngineError("this manifest was not read from an engine directory")
        return self.directory / name

    def path(self, graph: str) -> Path:
        return self._file(self.graphs[graph].file)

    @property
    def context_path(self) -> Path:
        return self._file(self.context.file)

    def load_context(self) -> np.ndarray:
        """The [1,77,C] float32 context: a plain .npy (never a pickle) of the recorded shape."""
        path = self.context_path
        try:
            context = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise EngineError(f"{path}: not a plain float32 .npy array ({err}); {REBUILD}") from err
        if context.dtype != np.float32 or context.shape != self.context.shape:
            raise EngineError(f"{path}: {context.dtype} {list(context.shape)}, the manifest records float32 "
                              f"{list(self.context.shape)}; {REBUILD}")
        return context

    def plan_path(self, graph: str) -> Path | None:
        plan = self.tensorrt.plans.get(graph) if self.tensorrt else None
        return self._file(plan.file) if plan else None

    def graph_bytes(self, name: str) -> int:
        """Bytes on disk of a graph, its external data included."""
        return sum(self.files[f].bytes for f in self.graphs[name].files)

    @property
    def identity(self) -> str:
        """Short id of the directory's weights: its name and the UNet graph's sha256."""
        unet = self.graphs["unet"]
        return f"{self.name}@{self.files[unet.file].sha256[:12]}"

    def referenced_files(self) -> dict[str, str]:
        """Every file the runtime may open → what uses it."""
        used = {self.context.file: "context"}
        for name, graph in self.graphs.items():
            used[graph.file] = f"graph {name}"
            if graph.external_data:
                used[graph.external_data] = f"external data of graph {name}"
        if self.tensorrt:
            used.update({p.file: f"TensorRT plan of {name}" for name, p in self.tensorrt.plans.items()})
        return used

    @property
    def max_steps(self) -> int:
        """The most sampling steps this directory's schedule allows: its timesteps, at most the runtime's
        limit (`arguments.STEPS`). Every count from 2 to this was checked at load (`check_schedule`)."""
        return min(STEPS[1], self.schedule.timesteps)

    @property
    def _where(self) -> Path | str:
        return self.directory / MANIFEST if self.directory else MANIFEST

    def _check_consistent(self) -> None:
        """Sections that must agree for a restore to run at all: each declared graph with what the runtime
        feeds and reads, the context with the UNet's context input, the schedule with every step count."""
        problems = [f"graph {name}: {problem}" for name, g in self.graphs.items()
                    for problem in contract_problems(GraphSpec(name, g.inputs, g.outputs))]
        if not problems:
            problems += self._context_problems()
        schedule = self.schedule
        try:
            check_schedule(schedule.linear_start, schedule.linear_end, schedule.timesteps, self.max_steps)
        except ValueError as err:
            problems.append(f"schedule: {err}")
        if not 2 <= schedule.default_steps <= self.max_steps:
            problems.append(f"schedule: default_steps {schedule.default_steps} is not in 2..{self.max_steps}")
        if self.musiq.n_min > self.musiq.n_max:
            problems.append(f"musiq: n_min {self.musiq.n_min} is above n_max {self.musiq.n_max}")
        problems += self._musiq_problems()
        if problems:
            raise EngineError(f"{self._where}: inconsistent manifest: {'; '.join(problems)}; {REBUILD}")

    def _musiq_problems(self) -> list[str]:
        """The patch grid is recorded twice, in the model's hyperparameters (what the graph was built with) and in
        the `musiq` limits (what the runtime cuts patches and counts tokens with): they must be one grid."""
        model = self.hyperparameters.get("musiq")
        if not isinstance(model, dict):
            return []
        return [f"musiq: {name} {getattr(self.musiq, name)!r} differs from the model's {model[name]!r}"
                for name in ("patch_size", "longer_side_lengths", "spatial_pos_grid_size")
                if name in model and _json(getattr(self.musiq, name)) != _json(model[name])]

    def _context_problems(self) -> list[str]:
        """The context file is fed as the UNet's `context` input [B, 77, C] (77 and C as fixed there)."""
        declared = next(t.dims for t in self.graphs["unet"].inputs if t.name == "context")
        shape = self.context.shape
        if all(not isinstance(want, int) or got == want for got, want in zip(shape[1:], declared[1:], strict=True)):
            return []
        return [f"context shape {list(shape)} does not fit the UNet's context input {list(declared)}"]

    def _check_listed(self) -> None:
        where = self._where
        unlisted = [f"{file} ({what})" for file, what in self.referenced_files().items() if file not in self.files]
        if unlisted:
            raise EngineError(f"{where}: not listed under `files` with a sha256: {', '.join(unlisted)}; {REBUILD}")
        for name in self.files:
            _check_name(where, name)


# -------------------------------------------------------------------------------------------- loading


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and validate `directory/manifest.json` and the files it lists, before any of them is used.

    Always: schema, versions, gating rule, every used file listed, names confined to the directory,
    sizes, and each ONNX graph's external-data references. With `verify`, also every file's sha256.
    """
    manifest = read_manifest(directory)
    check_files(manifest, verify)
    return manifest


def _nearby(directory: Path) -> str:
    """What to do about a wrong engine path: the engine directories in the places a user would mean (the
    path's parent, the current folder, and an `engines/` folder in either), or how to build one."""
    found: set[str] = set()
    for place in {directory.parent, Path("."), directory.parent / "engines", Path("engines")}:
        try:
            found |= {str(p) for p in place.iterdir() if (p / MANIFEST).is_file()}
        except OSError:  # not there, or not readable
            continue
    if not found:
        return "build one with `adaptbir-export build ... --out DIR` (or `make demo` for tiny random engines)"
    shown = ", ".join(sorted(found)[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return f"engine directories found nearby: {shown}"


def _not_a_directory(path: Path) -> str:
    """Why `path` is no engine directory: absent, or something else (a graph file inside one: its folder)."""
    kind = file_kind(path)
    if kind is None:
        return f"engine directory {path} does not exist; {_nearby(path)}"
    if (path.parent / MANIFEST).is_file():
        return f"{path} is a {kind} inside an engine directory; give the directory: {path.parent}"
    return f"{path} is a {kind}, not an engine directory; {_nearby(path)}"


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest alone, validated (schema, versions, gating rule, listed names, consistency), its files
    unchecked: for the builder, which checks each file it reuses itself."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(_not_a_directory(directory))
    path = directory / MANIFEST
    data = parse_manifest(path, _manifest_bytes(directory))
    _check_versions(path, data)
    _check_schema(path, data)
    if data["gating"] != RULE:
        raise EngineError(f"{path}: built with the gating rule {data['gating'].get('rule')!r}, this runtime applies "
                          f"{RULE['rule']!r}; {REBUILD}")
    manifest = Manifest.from_dict(data, directory)
    manifest._check_listed()
    manifest._check_consistent()
    return manifest


# ----------------------------------------------------------------------------------- reading the JSON

MANIFEST_MAX_BYTES = 16 * 2**20  # real manifests are a few KiB
JSON_MAX_DEPTH = 32  # real manifests nest 7 levels deep
INT64 = 2**63


class _Refused(ValueError):
    """A JSON value no manifest holds, raised from inside json's parse hooks."""


def _manifest_bytes(directory: Path) -> bytes:
    """manifest.json follows the rule of every listed file: a regular file inside the directory (symlinks
    resolved), and of a bounded size, so a FIFO, a device or a huge file is refused before it is read."""
    path = directory / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise EngineError(f"{directory} has no {MANIFEST}: not an engine directory; {_nearby(directory)}")
    resolved = _resolved(path)
    if resolved is None:
        raise EngineError(f"{path} is a symlink loop; {REBUILD}")
    if not resolved.is_relative_to(directory.resolve()):
        raise EngineError(f"{path} leaves the engine directory (it resolves to {resolved}); {REBUILD}")
    try:
        with os.fdopen(open_regular(resolved), "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
    except SpecialFileError:
        raise EngineError(f"{path} is not a regular file; {REBUILD}") from None
    except OSError as err:
        raise EngineError(f"cannot read {path}: {err}; {REBUILD}") from err
    if len(raw) > MANIFEST_MAX_BYTES:
        raise EngineError(f"{path} is larger than {MANIFEST_MAX_BYTES // 2**20} MiB: not a manifest; {REBUILD}")
    return raw


def _resolved(path: Path) -> Path | None:
    """`path` with every symlink followed; None for a loop (RuntimeError before Python 3.13, then OSError)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def parse_manifest(path: Path, raw: bytes) -> Any:
    """JSON as a manifest holds it: finite numbers, integers within 64 bits, no duplicate keys, nesting
    and strings bounded (each a one-line EngineError naming `path`, never a traceback)."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_int=_int, parse_float=_float, parse_constant=_constant,
                          object_pairs_hook=_object)
        _check_values(data)
    except RecursionError:
        raise EngineError(f"cannot read {path}: nested deeper than {JSON_MAX_DEPTH} levels; {REBUILD}") from None
    except (UnicodeDecodeError, ValueError) as err:  # _Refused and json.JSONDecodeError are ValueErrors
        raise EngineError(f"cannot read {path}: {err}; {REBUILD}") from err
    return data


def _int(text: str) -> int:
    # The length first: int() of thousands of digits is slow, and refused by Python itself above 4300.
    value = int(text) if len(text) <= 20 else None
    if value is None or not -INT64 <= value < INT64:
        raise _Refused(f"integer {shortened(text, 24)} is outside the 64-bit range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {shortened(text, 24)} is not finite")
    return value


def _constant(text: str) -> float:
    raise _Refused(f"{text} is not a finite number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:  # readers disagree on which duplicate wins
            raise _Refused(f"key {shortened(key, 40)!r} appears twice in one object")
        data[key] = value
    return data


def _check_values(data: Any) -> None:
    """Nesting depth and strings (a lone surrogate cannot be printed or written), without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused(f"string {shortened(value, 40)!r} holds a lone surrogate") from None
        elif isinstance(value, (dict, list)):
            if depth > JSON_MAX_DEPTH:
                raise _Refused(f"nested deeper than {JSON_MAX_DEPTH} levels")
            stack.extend((item, depth + 1) for item in ([*value, *value.values()] if isinstance(value, dict)
                                                         else value))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3])


def _check_versions(path: Path, data: Any) -> None:
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != SCHEMA_VERSION:
        raise EngineError(
            f"{path}: manifest schema version {found!r}, this runtime ({__version__}) reads version "
            f"{SCHEMA_VERSION}; {REBUILD}"
        )
    wanted = data.get("runtime", {})
    try:
        ok = _version(wanted["min"]) <= _version(__version__) < _version(wanted["below"])
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        wanted = wanted if isinstance(wanted, dict) else {}
        raise EngineError(
            f"{path}: built for runtime versions {shortened(str(wanted.get('min')), 40)} ≤ v < "
            f"{shortened(str(wanted.get('below')), 40)}, this runtime is {__version__}; {REBUILD}"
        )


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    base = jsonschema.Draft202012Validator
    # JSON Schema counts 1.0 as an integer; the runtime would then hand a float to range() or numpy.
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, value: isinstance(value, int)
                                         and not isinstance(value, bool))
    return jsonschema.validators.extend(base, type_checker=checker)(schema())


def _check_schema(path: Path, data: dict[str, Any]) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) if isinstance(p, int) else repr(p)[1:-1] for p in error.absolute_path)
        raise EngineError(f"{path}: invalid manifest at {where or '(top level)'}: "
                          f"{shortened(error.message.replace(chr(10), ' '), 200)}; {REBUILD}")


def _check_name(where: Path | str, name: str) -> None:
    if not FILE_NAME.fullmatch(name):
        why = "an absolute path" if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) else (
            "a '..' or hidden component" if ".." in name or "/." in name or name.startswith(".") else
            "not a plain relative name")
        raise EngineError(f"{where}: file name {name!r} is {why}; an engine directory names only files inside "
                          f"itself; {REBUILD}")


# ---------------------------------------------------------------------------------------- the files


def check_files(manifest: Manifest, verify: bool = True) -> None:
    """Every listed file is a regular file inside the directory (symlinks resolved) with the recorded size
    (and, with `verify`, sha256); then each ONNX graph, parsed once: it reaches no file but its listed
    external data (`graph_content.content_problems`), and its inputs and outputs are the ones its entry declares."""
    directory = manifest.directory
    root = directory.resolve()
    problems = []
    for name, record in manifest.files.items():
        resolved = _resolved(directory / name)
        if resolved is None:
            problems.append(f"{name} is a symlink loop")
        elif not resolved.is_relative_to(root):
            problems.append(f"{name} leaves the engine directory (it resolves to {resolved})")
        elif not resolved.is_file():
            problems.append(f"{name} is missing" if not resolved.exists() else f"{name} is not a regular file")
        elif resolved.stat().st_size != record.bytes or (verify and sha256_file(resolved) != record.sha256):
            problems.append(f"{name} does not match its recorded sha256 (modified, swapped or truncated)")
    if not problems:
        for graph_name in manifest.graphs:
            problems += _graph_problems(manifest, graph_name)
    if problems:
        raise EngineError(f"engine directory {directory}: " + "; ".join(problems) + f"; {REBUILD}")


def _graph_problems(manifest: Manifest, name: str) -> list[str]:
    import onnx

    entry = manifest.graphs[name]
    try:  # the graph alone: its external data is never read here
        model = onnx.load(str(manifest.path(name)), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        return [f"{entry.file} is not a readable ONNX graph ({type(err).__name__}: {_first_line(err)})"]
    extent = manifest.files[entry.external_data].bytes if entry.external_data else 0
    problems = content_problems(model, entry.external_data, extent)
    mismatches = onnx_problems(GraphSpec(name, entry.inputs, entry.outputs), model.graph)
    if mismatches:
        problems.append("does not match its manifest entry: " + ", ".join(mismatches))
    return [f"{entry.file} (graph {name}) " + "; ".join(_capped(problems))] if problems else []


def _first_line(err: BaseException) -> str:
    return shortened((str(err).splitlines() or [""])[0], 200)


def _capped(problems: list[str], limit: int = 4) -> list[str]:
    unique = list(dict.fromkeys(problems))
    return unique[:limit] + ([f"and {len(unique) - limit} more problems"] if len(unique) > limit else [])
