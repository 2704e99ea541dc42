"""`adaptbir-ray serve` on a local Ray cluster (loopback only), micro engines: results equal the local
Pipeline's; nobody can stall it: stalled and trickling uploads hold no restore slot and are cut off (408),
clients that hang up stop their restore and never make more run at once than configured, a big chunked
upload is cut at the limit in bounded memory, every limit has its status code and no answer shows a server
path. Each bound is stated where it is asserted."""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray,  # Ray Serve 2.60's own pydantic fields warn at import; nothing of ours
              pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")]

SLOTS, QUEUED = 2, 4  # restores at once, requests waiting: the service fixture's configuration
READ_TIMEOUT, BODY_TIMEOUT, REQUEST_TIMEOUT = 2.0, 5.0, 15.0


@dataclass
class Service:
    url: str
    port: int
    cache: Path  # the node cache the engines were shipped into


@pytest.fixture(scope="module")
def service(micro_engines, tmp_path_factory, loopback_service):
    """The HTTP service on a local cluster bound to loopback: one worker replica, 2 restores at a time, 4
    queued, 1 MiB uploads, 8 MiB of them held at once, short timeouts; its engines shipped through the object
    store into a node cache."""
    from adaptbir.serve.service import Limits

    cache = tmp_path_factory.mktemp("node-cache")
    limits = Limits(max_bytes=2**20, max_pixels=1024 * 1024, max_steps=200, read_timeout=READ_TIMEOUT,
                    body_timeout=BODY_TIMEOUT, request_timeout=REQUEST_TIMEOUT, max_buffered=8 * 2**20)
    with loopback_service(micro_engines, cache, max_ongoing_requests=SLOTS, max_queued_requests=QUEUED,
                          limits=limits) as (url, port):
        yield Service(url, port, cache)


def _png(h: int, w: int, seed: int, smooth: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.linspace(0, 255, h * w * 3).reshape(h, w, 3) if smooth else rng.random((h, w, 3)) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height and whose data is empty: what a header check sees."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _connect(service: Service, head: str, body: bytes = b"") -> socket.socket:
    """A raw connection that has sent `head` (request line and headers, without the blank line) and body."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=60)
    sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\n\r\n".encode() + body)
    return sock


def _answer(sock: socket.socket, timeout: float = 60) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        return response.status, response.read()
    finally:
        sock.close()


def _call(service: Service, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
    """Status, body and seconds taken of one ordinary request."""
    started = time.monotonic()
    request = urllib.request.Request(service.url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read(), time.monotonic() - started
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.monotonic() - started


def _info(service: Service) -> dict:
    status, body, _ = _call(service, "GET", "/info")
    assert status == 200
    return json.loads(body)


def _restores(service: Service) -> dict:
    """The worker replica's restore counts, as of its latest answer (one replica here; none before)."""
    counts = list(_info(service)["restores"].values()) or [dict.fromkeys(("peak", "started", "cancelled"), 0)]
    assert len(counts) == 1, counts
    return counts[0]


def test_service_answers_concurrent_requests_as_the_local_pipeline(service, micro_engines):
    from adaptbir.runtime.pipeline import Pipeline
    from adaptbir.serve.client import restore

    assert _call(service, "GET", "/healthz")[:2] == (200, b"ok")
    info = _info(service)
    [unpacked] = [p.name for p in service.cache.iterdir() if not p.name.startswith(".")]
    assert info["engine_id"].startswith("micro-random@") and info["engines"] == unpacked  # shipped, by name
    photos = [_png(40 + 8 * (i % 3), 56, i) for i in range(20)]
    with ThreadPoolExecutor(max_workers=3) as pool:  # a bounded client: within the queue, never refused
        answers = list(pool.map(lambda i: restore(service.url, photos[i], seed=i, steps=2, score=50), range(20)))
    local = Pipeline.from_engines(micro_engines, threads=1)
    for i, (png, info) in enumerate(answers):
        assert (info["seed"], info["steps"], info["class"]) == (str(i), "2", "medium")
        expected = local.restore(Image.open(io.BytesIO(photos[i])).convert("RGB"), seed=i, steps=2, score=50).image
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(expected))


def test_every_limit_has_its_status_code(service):
    """Each refusal with its status, before any restore slot is taken (except what only the engines know)."""
    photo = _png(40, 40, 0)

    def status(method: str, path: str, body: bytes | None = None) -> int:
        return _call(service, method, path, body)[0]

    assert status("POST", "/restore?seed=0&steps=2&score=50", b"not an image") == 400
    assert status("POST", "/restore?seed=0&steps=2&score=50", photo[:200]) == 400  # header fine, data truncated
    assert status("POST", "/restore?seed=0&steps=2", _png_header(1025, 1024)) == 413  # 1 px above 1024²
    assert status("POST", "/restore?seed=0&steps=2", _png_header(30000, 30000)) == 413  # a decompression bomb
    assert status("POST", "/restore?seed=0", b"\0" * (2**20 + 1)) == 413  # Content-Length, checked first
    for query in ("steps=201", "steps=1", "seed=x", "seed=-1", "score=nan", "k=2", "seed=1&seed=2", "colour=red",
                  "steps="):
        assert status("POST", f"/restore?{query}", photo) == 422, query
    assert status("GET", "/restore") == 405 and status("POST", "/healthz", b"") == 405
    assert status("PUT", "/info", b"") == 405 and status("GET", "/nowhere") == 404
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(service.url + "/restore", timeout=30)
    assert wrong.value.headers["Allow"] == "POST"
    assert status("POST", "/restore?seed=0&steps=2&score=50", photo) == 200  # and it goes on serving

    assert status("HEAD", "/healthz") == 200

    # 413 from the declared length, before reading: 10 GB declared, 10 bytes sent, answered at once and the
    # connection closed (the rest of the body is not wanted)
    started = time.monotonic()
    sock = _connect(service, "POST /restore?seed=0&steps=2 HTTP/1.1\r\nContent-Length: 10000000000", b"0123456789")
    sock.settimeout(10)
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 413 and response.getheader("Connection") == "close"
    assert response.read() and sock.recv(1) == b"" and time.monotonic() - started < 5
    sock.close()
    # 413 counted while streaming: chunked, no length declared, 2 MiB against 1 MiB
    sock = _connect(service, "POST /restore?seed=0&steps=2 HTTP/1.1\r\nTransfer-Encoding: chunked")
    assert _send_chunked(sock, 2 * 2**20) == 413


def _send_chunked(sock: socket.socket, total: int, chunk: int = 64 * 2**10) -> int:
    """Send `total` bytes in chunks from a thread (until the server stops reading); the status answered."""
    def send() -> None:
        data = f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n"
        try:
            for _ in range(total // chunk):
                sock.sendall(data)
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed: the rest is not wanted
            pass

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return _answer(sock, timeout=60)[0]
    finally:
        sender.join(timeout=60)


def test_back_pressure_answers_503_and_the_service_goes_on(service):
    from adaptbir.serve.client import ServiceError, restore

    def status(seed: int) -> int:
        try:
            restore(service.url, photo, seed=seed, steps=2, score=50)
            return 200
        except ServiceError as err:
            return err.status

    photo = _png(48, 48, 1)
    with ThreadPoolExecutor(max_workers=16) as pool:  # 16 at once: 2 running + 4 queued, the rest 503 at once
        codes = list(pool.map(status, range(16)))
    assert codes.count(503) >= 1 and codes.count(200) >= SLOTS + QUEUED and set(codes) <= {200, 503}, codes
    assert status(0) == 200


def test_stalled_and_trickling_uploads_starve_nothing(service):
    """8 connections declare 100 kB and stop after 10 bytes, 4 stop inside their headers, 4 send nothing, one
    sends 100 bytes every 0.5 s: /healthz answers within 1 s and a restore within 5 s meanwhile (a restore
    alone: ~0.5 s); the stalled ones get 408 after READ_TIMEOUT (+3 s), the trickle after BODY_TIMEOUT (+3 s)
    although each of its reads arrives in time."""
    head = "POST /restore?seed=0&steps=2&score=50 HTTP/1.1\r\nContent-Length: 100000"
    started = time.monotonic()
    stalled = [_connect(service, head, b"0123456789") for _ in range(8)]
    for partial in [b"POST /restore?seed=0 HTTP/1.1\r\nContent-Le"] * 4 + [b""] * 4:
        stalled.append(socket.create_connection(("127.0.0.1", service.port), timeout=60))
        stalled[-1].sendall(partial)
    trickle = _connect(service, head)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.5):
            try:
                trickle.sendall(b"\0" * 100)
            except OSError:
                return

    dripping = threading.Thread(target=drip)
    dripping.start()
    try:
        time.sleep(0.5)  # all of them inside the service
        health = [_call(service, "GET", "/healthz")[2] for _ in range(5)]
        code, _, restored = _call(service, "POST", "/restore?seed=0&steps=2&score=50", _png(48, 48, 2))
        assert code == 200 and max(health) < 1.0 and restored < 5.0, (health, restored)
        with ThreadPoolExecutor(max_workers=len(stalled)) as pool:
            cut = list(pool.map(lambda s: (_answer(s, timeout=30)[0], time.monotonic() - started), stalled))
        assert all(code == 408 and READ_TIMEOUT <= t < READ_TIMEOUT + 3 for code, t in cut), cut
        code, elapsed = _answer(trickle, timeout=30)[0], time.monotonic() - started
        assert code == 408 and BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 3, (code, elapsed)
    finally:
        stop.set()
        dripping.join()
    print(f"\nunder 16 stalled connections + 1 trickle: /healthz max {max(health) * 1000:.0f} ms, a restore "
          f"{restored:.2f} s; stalled cut at {max(t for _, t in cut):.2f} s, the trickle at {elapsed:.2f} s")


def test_upload_bytes_held_at_once_are_bounded(service):
    """Eight uploads stall just below 1 MiB each, filling the 8 MiB held at once: a ninth upload is refused
    503 at once instead of adding to memory; once the stalled ones are cut (408) uploads go through again."""
    almost = 2**20 - 64
    stalled = [_connect(service, "POST /restore?seed=0&steps=2 HTTP/1.1\r\nContent-Length: 1048576", b"\0" * almost)
               for _ in range(8)]
    time.sleep(0.5)  # all of it received
    photo = _png(48, 48, 6)
    code, _, took = _call(service, "POST", "/restore?seed=0&steps=2&score=50", photo)
    assert code == 503 and took < 2, (code, took)
    assert all(_answer(s, timeout=30)[0] == 408 for s in stalled)
    assert _call(service, "POST", "/restore?seed=0&steps=2&score=50", photo)[0] == 200


def test_abandoned_requests_never_run_beyond_the_slots(service):
    """Eight clients, one every 0.25 s, each asking for a 1.4 s restore and hanging up 1 s after sending:
    the replica's count of restores running at once never exceeds its 2 slots (a request Ray has cancelled
    frees its Ray slot at once; its thread must not run on beside the next one), and they are cancelled."""
    before = _restores(service)
    photo = _png(512, 512, 3)
    head = f"POST /restore?seed=0&steps=40&score=50 HTTP/1.1\r\nContent-Length: {len(photo)}"

    def abandon(i: int) -> None:
        time.sleep(0.25 * i)
        sock = _connect(service, head, photo)
        time.sleep(1.0)
        sock.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(abandon, range(8)))
    time.sleep(1.0)  # the last cancellations land
    assert _call(service, "POST", "/restore?seed=0&steps=2&score=50", _png(48, 48, 4))[0] == 200
    after = _restores(service)
    assert after["peak"] == SLOTS and after["running"] == 0, after
    assert after["cancelled"] - before["cancelled"] >= 2, (before, after)  # stopped mid-restore, not run out
    print(f"\nabandoned clients: {after['started'] - before['started'] - 1} restores started, "
          f"{after['cancelled'] - before['cancelled']} cancelled, at most {after['peak']} at once")


def _memory(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def test_a_big_chunked_upload_is_cut_at_the_limit_in_bounded_memory(service, ray_process):
    """64 MiB chunked (no length declared) against the 1 MiB limit: 413, and the ingress replica's peak RSS
    grows by less than 8 MiB (before: the whole body was buffered, ~3.6 × its size; behind Ray Serve's
    proxy, which reads every body to its end, 30–120 MiB here)."""
    ingress = ray_process("ServeReplica:adaptbir:RestoreService")
    Path(f"/proc/{ingress}/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _memory(ingress, "VmRSS")
    sock = _connect(service, "POST /restore?seed=0&steps=2 HTTP/1.1\r\nTransfer-Encoding: chunked")
    assert _send_chunked(sock, 64 * 2**20) == 413
    growth = _memory(ingress, "VmHWM") - base
    print(f"\n64 MiB chunked upload: the ingress's peak RSS grew by {growth / 2**20:.1f} MiB")
    assert growth < 8 * 2**20, growth


def test_the_request_timeout_answers_504_and_cancels_the_restore(service):
    """A ~50 s restore (1024², 200 steps) against the 15 s request timeout: 504 within 15–17 s; its restore
    stops at its next sampling step (cancelled count +1) and the next request is answered within 20 s."""
    before = _restores(service)
    code, body, timed_out = _call(service, "POST", "/restore?seed=0&steps=200&score=50", _png(1024, 1024, 0, True))
    assert code == 504 and REQUEST_TIMEOUT <= timed_out < REQUEST_TIMEOUT + 2, (code, body, timed_out)
    assert b"timeout" in body and body.count(b"\n") == 1
    code, _, elapsed = _call(service, "POST", "/restore?seed=0&steps=2&score=50", _png(48, 48, 5))
    assert code == 200 and elapsed < 20, elapsed
    print(f"\nrequest timeout {REQUEST_TIMEOUT:g} s: 504 after {timed_out:.2f} s, the next restore {elapsed:.2f} s")
    after = _restores(service)
    assert after["cancelled"] == before["cancelled"] + 1 and after["peak"] == SLOTS, (before, after)


def test_no_server_path_in_info_or_any_error(service, micro_engines):
    """/info and every error body: one line, none of the server's paths (engines, node cache, temporary
    files, home), nor any other absolute path."""
    import tempfile

    bodies = [_call(service, "GET", "/info")[1]]
    for method, path, body in [("POST", "/restore?seed=0&steps=2&score=50", b"not an image"),
                               ("POST", "/restore?seed=0&steps=2&score=50", _png(40, 40, 0)[:200]),
                               ("POST", "/restore?seed=0&steps=2&score=50", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                               ("POST", "/restore?seed=0&steps=2", _png_header(30000, 30000)),
                               ("POST", "/restore?seed=0&steps=2", _png_header(2000, 2000)),
                               ("POST", "/restore?bad=1", b""), ("GET", "/restore", None), ("GET", "/x", None)]:
        code, answer, _ = _call(service, method, path, body)
        assert code >= 400 and answer.count(b"\n") == 1, (code, answer)
        bodies.append(answer)
    secret = [str(micro_engines), str(service.cache), tempfile.gettempdir(), str(Path.home()), "/proc", "/usr"]
    for text in (b.decode() for b in bodies):
        assert not any(s in text for s in secret) and not re.search(r"(^|[\s'\"])/\w+/", text), text
