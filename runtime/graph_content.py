"""What an ONNX graph may reach: every tensor anywhere in it keeps its data inline or names exactly the one
external-data file its manifest entry lists, within that file's size; every node is a standard ONNX
operator; no field is one this onnx cannot read.

ONNX Runtime and OpenVINO open a tensor's `external_data` location wherever the tensor sits: initializers,
sparse tensors, node attributes, subgraphs, model-local functions, training info, and whatever a later
ONNX adds. So every message of the model is visited generically, through protobuf's descriptors (only
message-typed fields: weights' bytes are never touched), and every TensorProto is checked. A field this
onnx cannot read might be one a newer ONNX Runtime reads, so unknown fields are refused; so is any node but
a standard ONNX operator (another domain's node may be run by an execution provider that opens a file it
names, e.g. EPContext).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from .errors import shortened

EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})
_SCALAR, _SINGLE, _REPEATED, _MAP = range(4)


@cache
def _kind(field_: Any) -> int:
    """How a field holds messages: not at all, one, a list, or a map's values."""
    if field_.message_type is None:
        return _SCALAR
    if field_.message_type.GetOptions().map_entry:
        return _MAP if field_.message_type.fields_by_name["value"].message_type is not None else _SCALAR
    repeated = getattr(field_, "is_repeated", None)  # protobuf ≥ 5; `label` is gone in 7
    return _REPEATED if (field_.label == field_.LABEL_REPEATED if repeated is None else repeated) else _SINGLE


@cache
def _bulky_fields(descriptor: Any) -> tuple[tuple[str, int], ...] | None:
    """For a message type with bytes fields (a tensor's raw_data: the weights), its message fields as (name,
    kind), walked one by one so the bytes are never copied; None for the others, which ListFields walks
    faster (it visits only the fields that are set)."""
    if not any(f.type == f.TYPE_BYTES for f in descriptor.fields):
        return None
    return tuple((f.name, _kind(f)) for f in descriptor.fields if _kind(f) != _SCALAR)


def _children(message: Any) -> list[tuple[int, Any]]:
    """The message-holding fields of `message` that are set, as (kind, value)."""
    bulky = _bulky_fields(message.DESCRIPTOR)
    if bulky is None:
        return [(_kind(f), value) for f, value in message.ListFields()]
    return [(kind, getattr(message, name)) for name, kind in bulky if kind != _SINGLE or message.HasField(name)]


def _messages(root: Any) -> Iterator[Any]:
    """Every protobuf message inside `root` (itself included), depth first, without recursion."""
    stack = [root]
    while stack:
        message = stack.pop()
        yield message
        for kind, value in _children(message):
            if kind == _SINGLE:
                stack.append(value)
            elif kind == _REPEATED:
                stack.extend(value)
            elif kind == _MAP:
                stack.extend(value.values())


def _unknown_field_count() -> Any:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf before 4.22
        return lambda message: len(message.UnknownFields())
    return lambda message: len(UnknownFieldSet(message))


@cache
def _standard_operator(domain: str, op_type: str) -> bool:
    import onnx

    return domain in ("", "ai.onnx") and onnx.defs.has(op_type)


def content_problems(model: Any, listed: str | None, extent: int) -> list[str]:
    """What in the model reaches beyond its listed external data (`extent` bytes), or cannot be vetted."""
    import onnx

    tensor_type, node_type = onnx.TensorProto.DESCRIPTOR, onnx.NodeProto.DESCRIPTOR
    unknown_fields = _unknown_field_count()
    foreign: set[str] = set()
    problems = []
    for message in _messages(model):
        descriptor = message.DESCRIPTOR
        if unknown_fields(message):
            problems.append(f"holds a {descriptor.name} with fields this onnx ({onnx.__version__}) does not know")
        if descriptor is tensor_type:
            problems += _external_problems(message, listed, extent, foreign)
        elif descriptor is node_type and not _standard_operator(message.domain, message.op_type):
            problems.append(f"runs {_shown(message.domain or 'ai.onnx')}.{_shown(message.op_type)}, not a standard "
                            "ONNX operator")
    if foreign:
        shown = ", ".join(shortened(repr(location), 80) for location in sorted(foreign))
        problems.insert(0, f"references external data {shown}, but its manifest entry lists {listed!r}")
    return problems


def _external_problems(tensor: Any, listed: str | None, extent: int, foreign: set[str]) -> list[str]:
    """A tensor's external_data (read by ONNX Runtime when data_location is EXTERNAL; refused whenever
    present, as a reader might follow it anyway) names the listed file, within its size."""
    import onnx

    entries = [(entry.key, entry.value) for entry in tensor.external_data]
    if not entries and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return []
    info = dict(entries)
    if len(info) != len(entries) or not info.keys() <= EXTERNAL_KEYS or "location" not in info:
        keys = shortened(repr([key for key, _ in entries]), 80)
        return [f"stores tensor {_shown(tensor.name)!r} externally with keys {keys} (expected location, offset, "
                "length, checksum, each at most once)"]
    if info["location"] != listed:
        foreign.add(info["location"])
        return []
    offset, length = _count(info.get("offset", "0")), _count(info.get("length", "0"))
    if offset is None or length is None or offset + max(length, _nbytes(tensor)) > extent:
        return [f"reads tensor {_shown(tensor.name)!r} at offset {_shown(info.get('offset', '0'))}, length "
                f"{_shown(info.get('length', '(its size)'))} of {listed!r}, which holds {extent} bytes"]
    return []


def _shown(text: str) -> str:
    """Text from a graph, fit for a one-line message: control characters escaped, at most 60 characters."""
    return shortened(repr(text)[1:-1], 60)


def _count(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[0-9]{1,19}", text) else None


def _nbytes(tensor: Any) -> int:
    """The tensor's size from its dims and type, which a reader may use instead of `length`."""
    import onnx

    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 1
    return math.prod(max(dim, 0) for dim in tensor.dims) * itemsize
