"""Jobs on `adaptbir-ray serve` (a local Ray cluster on loopback, micro engines, one restore slot): a job's
events in order and its result equal to POST /restore's with the same seed, pixel for pixel; cancelling a
queued job (it never starts) and a running one (the next job starts without waiting for it); results
expiring after their TTL; the bound on accepted jobs; unknown and malformed ids; `adaptbir-ray submit`; the
page in Debian's Chromium; and a worker replica killed mid-job, which fails the job with its reason."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptbir.serve import client

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")]

MAX_JOBS, TTL, STREAMS = 4, 6.0, 3
LONG = {"steps": 200, "score": 50, "seed": 1}  # about 7 s on one micro slot here
SCREENSHOT = os.environ.get("ADAPTBIR_PAGE_SCREENSHOT")  # also save the finished page there (docs/page.png)


@pytest.fixture(scope="module")
def service(micro_engines, tmp_path_factory, loopback_service):
    """One worker replica restoring one image at a time, 4 queued requests, at most 4 unfinished jobs,
    results kept 6 s, 3 event streams at once."""
    from adaptbir.serve.service import Limits

    limits = Limits(max_bytes=2**22, max_steps=200, max_jobs=MAX_JOBS, result_ttl=TTL, max_event_streams=STREAMS)
    with loopback_service(micro_engines, tmp_path_factory.mktemp("node-cache"), max_ongoing_requests=1,
                          max_queued_requests=4, limits=limits) as (url, _):
        yield url


@pytest.fixture(scope="module")
def photo(tmp_path_factory, photos) -> bytes:
    return (photos(tmp_path_factory.mktemp("photo"), 1) / "photo0.png").read_bytes()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _get(url: str, method: str = "GET") -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


def _counts(url: str) -> dict:
    """The worker replica's restore counts (one replica)."""
    restores = list(json.loads(_get(f"{url}/info")[1])["restores"].values())
    return restores[0] if restores else {"started": 0, "cancelled": 0}


def _until(check, timeout: float = 30, every: float = 0.05):
    """check()'s first true value within `timeout` seconds."""
    end = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < end, "timed out"
        time.sleep(every)
    return value


def _running(url: str, job_id: str) -> dict:
    return _until(lambda: (s := client.status(url, job_id))["state"] == "running" and s["step"] >= 1 and s)


def test_a_job_streams_its_progress_and_ends_with_the_image_restore_gives(service, photo):
    job = client.submit(service, photo, seed=3, steps=12)
    assert job["state"] == "queued" and re.fullmatch(r"[0-9a-f]{32}", job["id"])
    received = []
    for event in client.events(service, job["id"]):
        received.append((time.time(), event))
    events = [event for _, event in received]
    states = [e["state"] for e in events]
    assert states[-1] == "done" and states == sorted(states, key=("queued", "running", "done").index), states
    stages = [e["stage"] for e in events if e["stage"]]
    assert list(dict.fromkeys(stages)) == ["musiq", "encode", "sample", "decode"], stages
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 12 and all(e["steps"] == 12 for e in events)
    gated = [e for e in events if e["class"] is not None]
    assert gated and gated[0]["stage"] in ("musiq", "encode") and all(e["eta_s"] is not None for e in events
                                                                        if e["stage"] == "sample" and e["step"])
    final = events[-1]
    image, info = client.result(service, job["id"])
    same, same_info = client.restore(service, photo, seed=3, steps=12)
    np.testing.assert_array_equal(_pixels(image), _pixels(same))
    for key in ("score", "class", "k", "w", "seed", "steps", "tiled"):
        assert info[key] == same_info[key], key
    assert (final["seed"], str(final["score"]), final["class"]) == (info["seed"], info["score"], info["class"])
    lags = [at - e["time"] for at, e in received if e["state"] == "running"]
    print(f"\n{len(events)} events; lag behind the worker's clock: median {np.median(lags) * 1000:.1f} ms, "
          f"max {max(lags) * 1000:.1f} ms")

    jpeg = client.submit(service, photo, seed=3, steps=2, score=50, format="jpeg")
    assert client.wait(service, jpeg["id"])["state"] == "done"
    status, body, headers = _get(f"{service}/jobs/{jpeg['id']}/result")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff"


def test_cancelling_a_queued_job_and_a_running_one(service, photo):
    """A queued job never starts; a running one stops at its next step and the next job starts at once,
    not when the cancelled one would have ended."""
    before = _counts(service)
    running, queued = client.submit(service, photo, **LONG), client.submit(service, photo, **LONG)
    quick = client.submit(service, photo, seed=2, steps=2, score=50)
    at = _running(service, running["id"])
    assert [client.status(service, j["id"])["position"] for j in (queued, quick)] == [0, 1]
    with pytest.raises(client.ServiceError) as early:
        client.result(service, queued["id"])
    assert early.value.status == 409 and "queued" in early.value.message
    assert client.cancel(service, queued["id"])["state"] == "cancelled"
    assert client.status(service, quick["id"])["position"] == 0  # moved up
    left = client.status(service, running["id"])["eta_s"]
    cancelled_at = time.monotonic()
    assert client.cancel(service, running["id"])["state"] == "cancelled"
    assert client.wait(service, quick["id"], timeout=60)["state"] == "done"
    waited = time.monotonic() - cancelled_at
    print(f"\nthe next job ended {waited:.2f} s after the running one was cancelled at step {at['step']} of 200 "
          f"({left:.1f} s of it left)")
    assert waited < left, (waited, left)
    stopped = client.status(service, running["id"])
    assert stopped["step"] < 200 and stopped["error"] == "cancelled by its client"
    assert client.status(service, queued["id"])["stage"] is None  # never ran
    after = _counts(service)
    assert after["started"] - before["started"] == 2 and after["cancelled"] - before["cancelled"] == 1, (before, after)
    assert _get(f"{service}/jobs/{running['id']}/result")[0] == 409


def test_results_expire_after_their_ttl(service, photo):
    job = client.submit(service, photo, seed=0, steps=2, score=50)
    assert client.wait(service, job["id"], timeout=60)["state"] == "done"
    assert _get(f"{service}/jobs/{job['id']}/result")[0] == 200
    expired = _until(lambda: (s := client.status(service, job["id"]))["state"] == "expired" and s, timeout=TTL + 5,
                     every=0.5)
    assert f"kept for {TTL:g} s" in expired["error"]
    status, body, _ = _get(f"{service}/jobs/{job['id']}/result")
    assert status == 410 and b"gone" in body


def test_accepted_jobs_are_bounded(service, photo):
    jobs = [client.submit(service, photo, **LONG) for _ in range(MAX_JOBS)]
    try:
        with pytest.raises(client.ServiceError) as full:
            client.submit(service, photo, **LONG)
        assert full.value.status == 503 and full.value.retry_after >= 1
    finally:
        for job in jobs:
            client.cancel(service, job["id"])
    again = client.submit(service, photo, seed=0, steps=2, score=50)
    assert client.wait(service, again["id"], timeout=60)["state"] == "done"


def test_event_streams_are_bounded_and_the_client_falls_back_to_polling(service, photo):
    """With 3 event streams open a fourth is refused (503, Retry-After) while every other request is answered;
    `client.wait` then follows the job by its status; a closed stream frees its place."""
    job = client.submit(service, photo, **LONG)
    _running(service, job["id"])
    streams = [urllib.request.urlopen(f"{service}/jobs/{job['id']}/events", timeout=30) for _ in range(STREAMS)]
    try:
        for stream in streams:
            assert stream.readline().startswith(b"id: ")  # each is open and has its first event
        status, body, headers = _get(f"{service}/jobs/{job['id']}/events")
        assert status == 503 and headers["retry-after"] == "5" and b"event streams" in body, body
        assert _get(f"{service}/healthz")[0] == 200 and client.status(service, job["id"])["state"] == "running"
        seen = []
        waiting = threading.Thread(target=lambda: seen.append(client.wait(service, job["id"], poll=0.2)))
        waiting.start()
        client.cancel(service, job["id"])
        waiting.join(timeout=30)
        assert seen and seen[0]["state"] == "cancelled"  # by polling: no stream was free
    finally:
        for stream in streams:
            stream.close()
    again = client.submit(service, photo, seed=0, steps=2, score=50)
    assert _until(lambda: _get(f"{service}/jobs/{again['id']}/events")[0] == 200, timeout=10)  # places free again
    client.wait(service, again["id"], timeout=60)


def test_unknown_and_malformed_ids_and_bad_submissions(service, photo):
    for job_id in ("0" * 32, "xyz", "0" * 33, "..", "%2e%2e"):
        for tail in ("", "/events", "/result"):
            assert _get(f"{service}/jobs/{job_id}{tail}")[0] == 404, (job_id, tail)
        assert _get(f"{service}/jobs/{job_id}", "DELETE")[0] == 404
    assert _get(f"{service}/jobs/{'0' * 32}", "POST")[0] == 405
    for query, body, status in [("steps=201", photo, 422), ("format=gif", photo, 422), ("seed=x", photo, 422),
                                ("steps=2", b"not an image", 400)]:
        with pytest.raises(client.ServiceError) as refused:
            client.submit(service, body, **dict([query.split("=")]))
        assert refused.value.status == status, query
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(service).netloc, timeout=30)
    connection.putrequest("POST", "/jobs?steps=2")  # 10 GB declared: refused before the body is read
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders(b"0123456789")
    assert connection.getresponse().status == 413
    connection.close()
    assert json.loads(_get(f"{service}/info")[1])["jobs"]["queued"] == 0  # none of them was accepted


def test_adaptbir_ray_submit_writes_what_the_local_pipeline_gives(service, micro_engines, photos, tmp_path):
    from adaptbir.runtime.image_io import read_image
    from adaptbir.runtime.pipeline import Pipeline

    folder = photos(tmp_path / "in", 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    command = [sys.executable, "-m", "adaptbir.serve.cli", "submit", str(folder), "--url", service, "-o",
               str(tmp_path / "out"), "--steps", "3", "--seed", "5", "--score", "50", "--in-flight", "2",
               "--report", str(tmp_path / "report.jsonl")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "restored 3, skipped 0, failed 1 of 4 inputs" in run.stderr and "broken.png" in run.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, (tmp_path / "report.jsonl").read_text().splitlines())}
    assert records["broken.png"]["status"] == "failed" and "damaged" in records["broken.png"]["error"]
    local = Pipeline.from_engines(micro_engines, threads=1)
    for name in ("photo0.png", "photo1.png", "photo2.png"):
        record = records[name]
        assert (record["status"], record["seed"], record["class"], record["steps"]) == ("ok", 5, "medium", 3)
        assert re.fullmatch(r"[0-9a-f]{32}", record["job"]) and record["engine_id"].startswith("micro-random@")
        expected = local.restore(read_image(folder / name), seed=5, steps=3, score=50).image
        np.testing.assert_array_equal(np.asarray(Image.open(record["output"]).convert("RGB")), expected.rgb)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "restored 0, skipped 3, failed 1" in again.stderr, again.stderr


def test_a_stopped_submit_cancels_its_jobs_at_the_service(service, photos, tmp_path):
    folder = photos(tmp_path / "in", 1)
    command = [sys.executable, "-m", "adaptbir.serve.cli", "submit", str(folder), "--url", service, "-o",
               str(tmp_path / "out"), "--report", str(tmp_path / "report.jsonl"), "--steps", "200", "--score", "50"]
    submit = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        _until(lambda: json.loads(_get(f"{service}/info")[1])["jobs"]["running"] == 1, timeout=60)
        submit.send_signal(signal.SIGINT)
        _, stderr = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == 130 and "interrupted after 0" in stderr, stderr
    [record] = map(json.loads, (tmp_path / "report.jsonl").read_text().splitlines())
    assert record["status"] == "interrupted"
    assert client.status(service, record["job"])["state"] == "cancelled"
    assert not (tmp_path / "out" / "photo0.png").exists()


# A file dropped on the drop zone as a person's drag would (Selenium cannot drag a file from the desktop):
# the image at URL (arguments[0]) in a DataTransfer, dispatched as a drop event.
DROP = """
const [url, done] = arguments;
fetch(url).then((answer) => answer.blob()).then((blob) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], "dropped.png", {type: "image/png"}));
  document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
  done();
});
"""


def _browser():
    """Debian's Chromium, headless, driven by its own ChromeDriver (`make browser` installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for program in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert shutil.which(program), f"{program} is missing: `make browser` installs Debian's chromium and driver"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=412,915"):  # a phone's screen
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_the_page_restores_a_photo_in_a_browser_and_cancels_another(service, tmp_path):
    """A photo chosen, restored and shown with its slider; its result dropped on the page as a second photo and
    cancelled while running; a file that is not an image refused in words."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = np.linspace(0, 255, 384 * 512 * 3).reshape(384, 512, 3)
    noisy = np.clip(base + np.random.default_rng(0).normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_bytes(b"these are notes, not a photo")
    browser = _browser()
    try:
        browser.get(service + "/")
        element = browser.find_element
        state = lambda: element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
        WebDriverWait(browser, 20).until(lambda _: "micro-random@" in element(By.ID, "engine").text)

        element(By.ID, "steps").send_keys("30")
        element(By.ID, "file").send_keys(str(tmp_path / "photo.png"))
        fractions = []
        WebDriverWait(browser, 120, poll_frequency=0.05).until(
            lambda _: fractions.append(float(element(By.ID, "progress").get_attribute("value"))) or state() == "done")
        assert fractions == sorted(fractions) and fractions[-1] == 1 and len(set(fractions)) > 3, fractions
        assert element(By.ID, "class").text in ("severe", "medium", "mild") and element(By.ID, "score").text != "—"
        assert element(By.ID, "compare").is_displayed() and element(By.ID, "slider").is_displayed()
        WebDriverWait(browser, 20).until(lambda _: browser.execute_script(
            "return document.getElementById('result').complete && document.getElementById('result').naturalWidth"))
        assert browser.execute_script("return document.getElementById('result').naturalWidth") == 512
        assert element(By.ID, "download").get_attribute("href").endswith("/result")
        clip = element(By.ID, "result").value_of_css_property("clip-path")
        browser.execute_script("const s = document.getElementById('slider'); s.value = 20; "
                               "s.dispatchEvent(new Event('input'))")
        assert element(By.ID, "result").value_of_css_property("clip-path") != clip
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # phone
        if SCREENSHOT:
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(412, height + 160)  # the whole page: the window's frame takes some
            browser.save_screenshot(SCREENSHOT)
            browser.set_window_size(412, 915)

        element(By.ID, "steps").clear()
        element(By.ID, "steps").send_keys("200")
        browser.execute_async_script(DROP, element(By.ID, "download").get_attribute("href"))  # the result, dropped
        WebDriverWait(browser, 60, poll_frequency=0.05).until(
            lambda _: state() == "running" and float(element(By.ID, "progress").get_attribute("value")) > 0)
        element(By.ID, "cancel").click()
        WebDriverWait(browser, 20).until(lambda _: state() == "cancelled")
        assert json.loads(_get(f"{service}/info")[1])["jobs"]["running"] == 0

        element(By.ID, "file").send_keys(str(tmp_path / "notes.png"))  # refused by the service, said in words
        WebDriverWait(browser, 20).until(lambda _: element(By.ID, "error").is_displayed())
        assert "not" in element(By.ID, "error").text.lower() or "image" in element(By.ID, "error").text.lower()
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/jobs?" not in e["message"]]
        assert not errors, errors  # nothing failed but the refused upload
    finally:
        browser.quit()


def test_a_replica_killed_mid_job_fails_the_job_with_its_reason(service, photo, ray_process):
    """Last in this module: the worker replica is SIGKILLed while restoring; its job ends failed, saying so,
    and Ray Serve's new replica takes the next job."""
    job = client.submit(service, photo, **LONG)
    _running(service, job["id"])
    os.kill(ray_process("ServeReplica:adaptbir:RestoreWorker"), signal.SIGKILL)
    final = client.wait(service, job["id"], timeout=60)
    assert final["state"] == "failed" and "replica stopped" in final["error"], final
    print(f"\nkilled mid-job: {final['error']}")

    def restored() -> bool:
        try:
            retry = client.submit(service, photo, seed=0, steps=2, score=50)
        except client.ServiceError:
            return False
        return client.wait(service, retry["id"], timeout=120)["state"] == "done"

    _until(restored, timeout=180, every=2)


def test_adaptbir_ray_serve_says_two_lines_and_stops_on_sigterm(micro_engines, tmp_path):
    """The command itself, on a cluster of its own: its terminal holds its two lines, Ray's and Ray Serve's
    own output is in --log, the page and /healthz answer, SIGTERM stops it with exit 0."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "adaptbir.serve.cli", "serve", "--engines", str(micro_engines), "--port",
               str(port), "--address", "local", "--log", str(log)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        said = server.stderr.readline()  # once it says so, it serves (and a signal stops it whole)
        assert said == f"adaptbir-ray: serving {micro_engines} on {url} (Ray's log: {log}; Ctrl-C stops)\n", said
        assert _answers(url + "/healthz")
        status, page, headers = _get(url + "/")
        assert status == 200 and b'id="file"' in page and "default-src 'self'" in headers["content-security-policy"]
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=120)
    finally:
        server.kill()
    assert server.returncode == 0, stderr
    assert stderr.splitlines() == ["adaptbir-ray: stopping the service"], stderr
    assert stdout == "" and "Application 'adaptbir' is ready" in log.read_text()


def _answers(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False
