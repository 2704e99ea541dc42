"""`adaptbir-ray restore` on a local Ray cluster (loopback only), micro engines: outputs bit-identical to
`adaptbir restore`, bad images reported while the job goes on, a re-run skips everything finished, a killed
actor loses nothing, a stopped or killed driver leaves no output without its record. The service's tests are
in tests/test_service.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray,  # Ray Serve 2.60's own pydantic fields warn at import; nothing of ours
              pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")]

OPTIONS = ["--steps", "2", "--seed", "7", "--threads", "1", "--quiet"]  # ORT's last bits follow its thread count


def _collection(folder: Path) -> int:
    """Ten good photos (two in a subfolder, one RGBA) and two bad files; returns the good count."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    for i in range(8):
        Image.fromarray((rng.random((40 + 4 * i, 56, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / "sub" / "q.jpg", quality=90)
    Image.fromarray((rng.random((32, 40, 4)) * 255).astype(np.uint8)).save(folder / "sub" / "rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    return 10


def _ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptbir.serve.cli", "restore", *args], capture_output=True,
                          text=True, timeout=600)


def test_batch_equals_the_local_cli_and_resumes(micro_engines, tmp_path):
    from adaptbir.runtime.cli import main as local_main

    good = _collection(tmp_path / "in")
    assert local_main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "local"), "--engines",
                       str(micro_engines), *OPTIONS]) == 1  # the two bad files
    out = tmp_path / "ray"
    first = _ray(str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), "--actors", "1", *OPTIONS)
    assert first.returncode == 1, first.stderr[-3000:]
    assert f"restored {good}, skipped 0, failed 2 of 12" in first.stderr
    # Ray's own output (its token notice, the core worker's C++ lines, Ray Data's warnings) is in OUTDIR/ray.log,
    # named because the run failed; none of it on the terminal
    noise = [word for word in ("Token authentication", "core_worker", "UserWarning", "WARNING") if word in first.stderr]
    assert not noise and f"Ray's own messages of this run: {out / 'ray.log'}" in first.stderr, first.stderr[-3000:]
    assert (out / "ray.log").stat().st_size > 0
    records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    dispatched = [r for r in records if r["status"] == "dispatched"]  # each named before any actor wrote it
    assert len(dispatched) == 12 and records[:12] == dispatched
    records = records[12:]
    assert sorted(r["status"] for r in records) == ["failed"] * 2 + ["ok"] * good
    failed = {Path(r["input"]).name: r["error"] for r in records if r["status"] == "failed"}
    assert "damaged" in failed["broken.png"] and "empty" in failed["empty.jpg"]
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png"))
    assert local == sorted(p.relative_to(out) for p in out.rglob("*.png")) and len(local) == good
    for relative in local:  # every output bit-identical to the single-process command's
        assert (out / relative).read_bytes() == (tmp_path / "local" / relative).read_bytes(), relative
    assert all(r["seed"] == 7 for r in records if r["status"] == "ok")

    again = _ray(str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), "--actors", "1", *OPTIONS)
    assert f"restored 0, skipped {good}, failed 2 of 12" in again.stderr, again.stderr[-3000:]
    records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()][12 + len(records):]
    assert sum(r["status"] == "skipped" and r["reason"] == "finished by a previous run" for r in records) == good


def test_an_actor_killed_mid_job_loses_nothing_and_duplicates_nothing(micro_engines, tmp_path):
    """SIGKILL the restoring actors once their first outputs are written: Ray restarts them and retries the
    images they held; every image ends with exactly one record and one whole output. Also: the default pool
    (as many actors as CPUs at 1 thread) leaves room for the read tasks on a 2-core machine."""
    import time

    good = _collection(tmp_path / "in")
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "adaptbir.serve.cli", "restore", str(tmp_path / "in"), "-o", str(out), "--engines",
           str(micro_engines), *OPTIONS]  # the default pool: CPUs / threads actors (2 × 0.8 CPU on 2 cores)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(out.rglob("*.png"))) < 2 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    written = len(list(out.rglob("*.png")))
    killed = subprocess.run(["pkill", "-9", "-f", r"MapWorker\(Map\(Restorer\)"]).returncode == 0
    _, err = job.communicate(timeout=600)
    assert killed and written < good, (killed, written)  # killed mid-job, with images still to restore
    assert job.returncode == 1, err[-3000:]
    assert f"restored {good}, skipped 0, failed 2 of 12" in err
    records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    records = [r for r in records if r["status"] != "dispatched"]
    inputs = [r["input"] for r in records]
    assert len(inputs) == len(set(inputs)) == 12  # nothing lost, nothing duplicated
    assert sum(r["status"] == "ok" for r in records) == good
    for r in records:
        if r["status"] == "ok":
            Image.open(r["output"]).load()  # whole files
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary file left behind


def _last_records(report: Path) -> dict[str, dict]:
    last = {}
    for line in report.read_text().splitlines():
        record = json.loads(line)
        last[record.get("output", record["input"])] = record
    return last


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_stopped_driver_leaves_no_output_without_its_record(micro_engines, tmp_path, stop):
    """Stop the driver once the first output exists. SIGTERM: exit 143 with the summary. SIGKILL: Ray stops
    its actors (within the bound asserted here), and the outputs they wrote after the driver died, which no
    ok record names, are restored again by the re-run (score and seed recorded), never kept as "output
    exists". Either way no temporary file is left once the re-run is done."""
    import os
    import signal
    import time

    good = _collection(tmp_path / "in")
    out = tmp_path / "ray"
    options = ["--steps", "30", "--threads", "1", "--quiet"]  # long enough for images to be in flight
    cmd = [sys.executable, "-m", "adaptbir.serve.cli", "restore", str(tmp_path / "in"), "-o", str(out),
           "--engines", str(micro_engines), *options]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.rglob("*.png")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.kill(job.pid, getattr(signal, stop))
    killed = time.monotonic()
    _, err = job.communicate(timeout=120)
    if stop == "SIGTERM":
        assert job.returncode == 143 and "interrupted after" in err and "(SIGTERM)" in err, err[-3000:]
    outputs, last_new = len(list(out.rglob("*.png"))), 0.0
    while time.monotonic() - killed < 30:  # Ray's job ownership stops the actors of a dead driver
        time.sleep(0.2)
        if len(list(out.rglob("*.png"))) != outputs:
            outputs, last_new = len(list(out.rglob("*.png"))), time.monotonic() - killed
    actors = subprocess.run(["pgrep", "-f", r"MapWorker\(Map\(Restorer\)"], capture_output=True, text=True)
    assert not actors.stdout and last_new < 10, (actors.stdout, last_new)  # measured: last output 2.4 s after
    before = _last_records(out / "report.jsonl")
    orphans = [p for p in out.rglob("*.png") if before.get(str(p), {}).get("status") != "ok"]
    assert outputs < good and (orphans or stop == "SIGTERM"), (orphans, outputs)  # SIGKILL: outputs unrecorded

    again = _ray(str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), *options)
    assert again.returncode == 1 and "failed 2 of 12" in again.stderr, again.stderr[-3000:]
    after = _last_records(out / "report.jsonl")
    assert sorted(after[str(p)]["status"] for p in out.rglob("*.png")) == ["ok"] * good
    assert not any(r.get("reason") == "output exists (--on-exists skip)" for r in after.values())
    for orphan in orphans:  # restored again: its record has the score and seed the first run lost
        assert after[str(orphan)]["seed"] is not None and "score" in after[str(orphan)]
        Image.open(orphan).load()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries folder, no stray file


@pytest.fixture
def sixteen_cpu_cluster(monkeypatch):
    """An existing cluster (`ray start --head`, loopback) that declares 16 CPUs on this 2-core machine: the
    sizing of a large node, as a job joining with --address meets it. Without token authentication (a
    loopback test cluster; Ray turns it on when ~/.ray/auth_token exists, and then every driver needs
    RAY_AUTH_MODE=token)."""
    import socket

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for `ray start` and the job's driver alike

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=16",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True,
                   timeout=120)
    yield f"127.0.0.1:{port}"
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def test_a_joined_16_cpu_cluster_with_shipped_engines(micro_engines, sixteen_cpu_cluster, tmp_path):
    """--address joins an existing cluster; its default pool (16 CPUs / 4 threads = 4 actors of 3.2 CPUs)
    leaves room for the reads; --ship-engines unpacks the directory once per node into --engine-cache, and
    every output is still bit-identical to `adaptbir restore` with the same options — no --seed: each image's
    seed is derived from its pixels on both."""
    from adaptbir.runtime.cli import main as local_main

    good = _collection(tmp_path / "in")
    options = ["--steps", "2", "--threads", "4", "--quiet"]
    assert local_main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "local"), "--engines",
                       str(micro_engines), *options]) == 1
    out, cache = tmp_path / "ray", tmp_path / "node-cache"
    run = _ray(str(tmp_path / "in"), "-o", str(out), "--engines", str(micro_engines), "--address",
               sixteen_cpu_cluster, "--ship-engines", "--engine-cache", str(cache), *options)
    assert run.returncode == 1 and f"restored {good}, skipped 0, failed 2 of 12" in run.stderr, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    [unpacked] = [p for p in cache.iterdir() if not p.name.startswith(".")]  # one folder for the node
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]  # no staging left
    assert {r["engines"] for r in records if r["status"] == "ok"} == {str(unpacked)}
    for relative in (p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png")):
        assert (out / relative).read_bytes() == (tmp_path / "local" / relative).read_bytes(), relative
