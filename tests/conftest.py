"""Shared fixtures: the reference golden data (../shared/reference) and the tiny model loaded from it.

Every parity test logs its measured error through `parity`; a summary is printed at the end of the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("ADAPTBIR_REFERENCE", REPO.parent / "shared" / "reference"))

_PARITY: list[tuple[str, str, float, float]] = []


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "tiny_stage3.safetensors").is_file():
        pytest.fail(f"golden data not found in {REFERENCE} (set ADAPTBIR_REFERENCE)", pytrace=False)
    return REFERENCE


@pytest.fixture(scope="session")
def golden(reference):
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(reference / f"{name}.npz") as data:
                cache[name] = {k: data[k] for k in data.files}
        return cache[name]

    return load


def shared_directory(tmp_path_factory, name: str, build) -> Path:
    """A directory built once per test run, also when pytest-xdist runs several workers: the first worker to
    ask builds it (`build(path)`) under a file lock while the others wait; all then read it. Tests never
    write into it (they copy it first)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"
    root.mkdir(exist_ok=True)
    out = root / name
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            build(out)
    return out


def _export(*args: str):
    def build(out: Path) -> None:
        from adaptbir.export.cli import main as export_main

        assert export_main(["build", *args, "--out", str(out)]) == 0

    return build


@pytest.fixture(scope="module")
def tiny_state(reference):
    """The golden tiny stage-3 checkpoint's tensors."""
    from safetensors.torch import load_file

    return load_file(reference / "tiny_stage3.safetensors")


@pytest.fixture(scope="module")
def musiq_state(reference):
    """The golden random MUSIQ weights' tensors."""
    from safetensors.torch import load_file

    return load_file(reference / "musiq_random.safetensors")


@pytest.fixture(scope="session")
def tiny_engines(reference, tmp_path_factory) -> Path:
    """fp32 engine directory exported from the golden tiny weights (built once per run)."""
    return shared_directory(tmp_path_factory, "tiny-preset", _export(
        "--checkpoint", str(reference / "tiny_stage3.safetensors"), "--musiq",
        str(reference / "musiq_random.safetensors"), "--preset", "tiny"))


@pytest.fixture(scope="session")
def micro_engines(tmp_path_factory) -> Path:
    """A smaller model than tiny (8 channels, no level-0 attention; tests/micro_config.json), random weights:
    for tests of the plumbing around the engines (CLI, reports, policies, API kinds), where what the model
    computes does not matter and a restore takes 0.6 s instead of tiny's 3.9 s. Numbers are tiny's."""
    config = Path(__file__).with_name("micro_config.json")
    return shared_directory(tmp_path_factory, "micro-random", _export("--random-weights", "--config", str(config)))


def write_photos(folder: Path, count: int = 4) -> Path:
    """`count` small photo-like PNGs (smooth ramps with some texture) in `folder`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        base = np.linspace(0, 255, 96 * 128 * 3).reshape(96, 128, 3)
        Image.fromarray(np.clip(base * (i + 1) / count + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                        ).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="session")
def photos():
    """`photos(folder, count=4)`: writes photo-like PNGs (calibration sets, batches)."""
    return write_photos


# Random micro weights reach about 26 dB eps and 32 dB images in int8: floors the test build passes.
INT8_FLOORS = ("--gate-min-eps-psnr", "15", "--gate-min-psnr", "20", "--gate-min-ssim", "0.8",
               "--gate-max-musiq-shift", "3")


@pytest.fixture(scope="session")
def int8_engines(tmp_path_factory) -> Path:
    """An int8 micro directory through the whole command: fp32 build, calibration on 3 photos (1 held out),
    quantization, gate."""
    def build(out: Path) -> None:
        calibration = write_photos(out.parent / "int8-calibration")
        _export("--random-weights", "--config", str(Path(__file__).with_name("micro_config.json")), "--precision",
                "int8", "--int8-scheme", "hybrid", "--calibration", str(calibration), "--calibration-steps", "3",
                "--gate-steps", "3",
                *INT8_FLOORS)(out)

    return shared_directory(tmp_path_factory, "micro-int8", build)


@pytest.fixture(scope="session")
def loopback_service():
    """`with loopback_service(engines, cache, **start_arguments) as (url, port):` `adaptbir-ray serve` on a
    cluster of its own bound to loopback (never one that `ray start` left running: tests/test_ray.py starts
    one), its engines shipped through the object store into the node cache `cache`."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def running(engines: Path, cache: Path, **arguments):
        import ray
        from ray import serve

        from adaptbir.serve.service import start

        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            start(engines, port=port, threads=1, ship_engines=True, engine_cache=cache, **arguments)
            yield f"http://127.0.0.1:{port}", port
        finally:
            serve.shutdown()
            ray.shutdown()

    return running


@pytest.fixture(scope="session")
def ray_process():
    """`ray_process(name)`: the pid of this test process's Ray process whose title starts with `ray::name`
    (its own cluster's, not another's), e.g. "ServeReplica:adaptbir:RestoreWorker"."""
    def pid(name: str) -> int:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    continue
        mine = {os.getpid()}
        for _ in range(5):  # driver → raylet → workers
            mine |= {p for p, parent in parents.items() if parent in mine}
        [found] = [p for p in mine if _cmdline(p).startswith(f"ray::{name}".encode())]
        return found

    return pid


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return b""


@pytest.fixture(scope="session")
def musiq_feeds():
    """`musiq_feeds(u8)`: pyiqa's own patch tensor of a uint8 image (the reference), split into the graph's
    inputs."""
    import torch
    from pyiqa.data.multiscale_trans_util import get_multiscale_patches

    def feeds(u8: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(u8).float() / 255
        opts = {"patch_size": 32, "patch_stride": 32, "hse_grid_size": 10, "longer_side_lengths": [224, 384],
                "max_seq_len_from_original_res": -1}
        p = get_multiscale_patches((x - 0.5) * 2, **opts).numpy()
        return {"patches": p[..., :-3], "spatial_idx": p[..., -3].astype(np.int64),
                "scale_idx": p[..., -2].astype(np.int64), "mask": p[..., -1]}

    return feeds


@pytest.fixture(scope="session")
def threads_agree():
    """`threads_agree(pipeline, photos)`: restoring the photos from one thread each gives exactly what
    sequential calls with the same seeds give."""
    import threading

    def check(pipeline, photos: list[np.ndarray]) -> None:
        sequential = [pipeline.restore(p, seed=i, steps=2, score=60).image for i, p in enumerate(photos)]
        parallel: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            parallel[i] = pipeline.restore(photos[i], seed=i, steps=2, score=60).image

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(photos))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, image in enumerate(sequential):
            np.testing.assert_array_equal(parallel[i], image)

    return check


@pytest.fixture
def parity(request):
    """`parity(case, actual, expected, atol)`: assert max |actual − expected| ≤ atol and log it under the
    test module (torch_model, export, openvino, sampler, pipeline, ...)."""
    layer = request.module.__name__.rpartition(".")[2].removeprefix("test_")

    def check(case: str, actual, expected, atol: float) -> float:
        actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        assert actual.shape == expected.shape, f"{case}: shape {actual.shape} != {expected.shape}"
        err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
        _PARITY.append((layer, case, err, atol))
        assert err <= atol, f"{case}: max abs error {err:.3g} > {atol:.3g}"
        return err

    return check


def pytest_sessionfinish(session):
    """A pytest-xdist worker hands its parity records to the controller, which prints the summary."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity"] = _PARITY


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _PARITY.extend(tuple(record) for record in node.workeroutput.get("parity", []))


def pytest_terminal_summary(terminalreporter, config):
    """A short parity summary: per test module, the case closest to its tolerance. The whole table (each
    case once, its worst error) with `-v` or ADAPTBIR_PARITY=full."""
    if not _PARITY:
        return
    cases: dict[tuple[str, str], tuple[float, float]] = {}
    for layer, case, err, atol in _PARITY:
        if (layer, case) not in cases or err > cases[layer, case][0]:
            cases[layer, case] = (err, atol)
    full = config.getoption("verbose") > 0 or os.environ.get("ADAPTBIR_PARITY") == "full"
    write = terminalreporter.write_line
    if full:
        terminalreporter.section(f"parity: max abs error of each of {len(cases)} cases")
        for (layer, case), (err, atol) in sorted(cases.items()):
            write(f"{layer:<14} {case:<58} {err:10.3g}  (tolerance {atol:.0e})")
        return
    terminalreporter.section(f"parity: {len(cases)} cases, the closest to its tolerance per module "
                             "(-v or ADAPTBIR_PARITY=full: all)")
    for layer in sorted({layer for layer, _ in cases}):
        mine = {case: v for (lay, case), v in cases.items() if lay == layer}
        case, (err, atol) = max(mine.items(), key=lambda kv: kv[1][0] / kv[1][1] if kv[1][1] else kv[1][0] > 0)
        write(f"{layer:<14} {len(mine):>3} cases  worst: {case:<50} {err:9.3g}  (tolerance {atol:.0e})")
