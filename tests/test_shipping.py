"""--ship-engines without a cluster: the node-side unpacking of an engine directory (Ray's object store
stood in for by the chunks' bytes themselves). Written once and verified, healed when damaged, refused
when what arrived does not match the manifest — never a half-written folder left for the next actor."""

from __future__ import annotations

import pytest

from adaptbir.runtime.errors import EngineError
from adaptbir.runtime.manifest import MANIFEST, load_manifest
from adaptbir.serve.shipping import EngineShipment


@pytest.fixture
def shipment(micro_engines, monkeypatch):
    """The micro directory as a shipment whose 'references' are the chunks themselves (ray.get → identity)."""
    import ray

    monkeypatch.setattr(ray, "get", lambda chunk: chunk)
    names = [MANIFEST, *sorted(load_manifest(micro_engines).files)]
    data = {name: (micro_engines / name).read_bytes() for name in names}
    return EngineShipment("micro-test", {name: [b[:1000], b[1000:]] for name, b in data.items()})


def test_unpacked_once_verified_and_healed(shipment, micro_engines, tmp_path):
    target = shipment.unpack(tmp_path)
    assert target == tmp_path / "micro-test"
    for name in load_manifest(target).files:
        assert (target / name).read_bytes() == (micro_engines / name).read_bytes()
    stamp = (target / "unet.onnx").stat().st_mtime_ns
    assert shipment.unpack(tmp_path) == target and (target / "unet.onnx").stat().st_mtime_ns == stamp  # reused
    with (target / "decoder.onnx").open("r+b") as f:  # damaged on the node since
        f.seek(50)
        f.write(b"\xff\xff")
    shipment.unpack(tmp_path)
    assert (target / "decoder.onnx").read_bytes() == (micro_engines / "decoder.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["micro-test"]  # no staging left


def test_what_arrived_damaged_is_refused_and_nothing_is_left(shipment, tmp_path):
    chunks = shipment.files["unet.onnx"]
    chunks[1] = chunks[1][:-1] + bytes([chunks[1][-1] ^ 1])
    with pytest.raises(EngineError, match=r"unet\.onnx does not match its recorded sha256"):
        shipment.unpack(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
