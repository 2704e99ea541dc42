"""A small client of `adaptbir-ray serve` (standard library only).

    from adaptbir.serve.client import restore, submit, wait, result, cancel
    png, info = restore("http://127.0.0.1:8000", Path("photo.jpg").read_bytes(), seed=0, steps=50)

    job = submit(url, Path("photo.jpg").read_bytes(), seed=0)          # at once: {"id", "state", ...}
    final = wait(url, job["id"], progress=lambda s: print(s["stage"], s["step"], s["steps"], s["eta_s"]))
    png, info = result(url, job["id"])                                 # when final["state"] == "done"
    cancel(url, job["id"])                                             # or stop it

`wait` follows the job's event stream (one event per change: stage, step, ETA, the gate's values) and falls
back to asking its status when the stream breaks, until the job has ended.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

FINAL = ("done", "failed", "cancelled", "expired")  # a job in one of these states changes no more


class ServiceError(Exception):
    """An answer other than 2xx: `status`, the service's one-line message, and for 503 the seconds the
    service asked to wait before retrying (`retry_after`, None when it did not say)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _call(url: str, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 60
          ) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a 2xx answer; ServiceError for any other."""
    request = urllib.request.Request(f"{url.rstrip('/')}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/octet-stream"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(), dict(response.headers.items())
    except urllib.error.HTTPError as err:
        raise _service_error(err) from None


def _service_error(err: urllib.error.HTTPError) -> ServiceError:
    retry = err.headers.get("Retry-After", "")
    message = err.read().decode(errors="replace").strip()
    return ServiceError(err.code, message, float(retry) if retry.isdigit() else None)


def _query(parameters: dict[str, Any]) -> str:
    return urllib.parse.urlencode({k: v for k, v in parameters.items() if v is not None})


def _image_info(headers: dict[str, str]) -> dict[str, Any]:
    """The X-AdaptBIR-* headers as a result: score, score-source, class, k, w, seed, steps, tiled, timings."""
    info = {k.lower().removeprefix("x-adaptbir-"): v for k, v in headers.items() if k.lower().startswith("x-adaptbir-")}
    return {**info, "timings": json.loads(info.get("timings", "{}"))}


def info(url: str, timeout: float = 30) -> dict[str, Any]:
    """GET /info: the engines (engine_id, backend, precision, ...), the limits, restores and jobs counts."""
    return json.loads(_call(url, "/info", timeout=timeout)[0])


def restore(url: str, image: bytes, timeout: float = 600, **parameters: float | int | str) -> tuple[bytes, dict]:
    """POST the image; returns the restored image's bytes (PNG unless format="jpeg"/"webp") and the result
    (score, class, k, w, seed, steps, tiled, timings). Raises ServiceError with the HTTP status: 400 not a
    readable image, 408 the upload was too slow, 413 the upload or the image too large (or a decompression
    bomb), 422 bad parameters, 500 the engines failed on this image, 503 busy (every restore slot and queue
    place taken: retry later), 504 no result within the service's request timeout. `timeout`: this
    client's own, per socket operation."""
    body, headers = _call(url, f"/restore?{_query(parameters)}", "POST", image, timeout)
    return body, _image_info(headers)


def submit(url: str, image: bytes, timeout: float = 120, **parameters: float | int | str) -> dict[str, Any]:
    """POST the image as a job (the parameters of `restore`); returns its status at once (`id`, `state`,
    `position`, ...). The same refusals as `restore`, before the job exists; 503 also when the service holds
    as many unfinished jobs as it takes (`retry_after` says when to try again)."""
    body, _ = _call(url, f"/jobs?{_query(parameters)}", "POST", image, timeout)
    return json.loads(body)


def status(url: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """The job's status: state (queued, running, done, failed, cancelled, expired), position, stage, step,
    steps, elapsed_s, eta_s, score, class, k, w, seed, error. ServiceError 404 for an unknown id."""
    return json.loads(_call(url, f"/jobs/{job_id}", timeout=timeout)[0])


def events(url: str, job_id: str, timeout: float = 60) -> Iterator[dict[str, Any]]:
    """The job's status at once and at each change, from its event stream, until it ends (the last one has
    a final state). `timeout` per read: the service writes at least every 15 s."""
    request = urllib.request.Request(f"{url.rstrip('/')}/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise _service_error(err) from None
    with response:
        data: list[str] = []
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:  # a blank line ends an event
                event = json.loads("\n".join(data))
                data = []
                yield event
                if event["state"] in FINAL:
                    return


def wait(url: str, job_id: str, progress: Callable[[dict[str, Any]], None] | None = None,
         timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
    """The job's final status, once it has ended. `progress(status)` is called at each change (raise from it
    to stop waiting: the job goes on unless cancelled). When the event stream breaks or is refused (503: the
    service's streams are all taken), the status is asked every `poll` seconds until the stream can be
    followed again. `timeout`: seconds in all (TimeoutError)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            for event in events(url, job_id):
                if progress is not None:
                    progress(event)
                if event["state"] in FINAL:
                    return event
        except (OSError, ValueError, ServiceError) as err:  # the stream broke, or the service has too many
            if isinstance(err, ServiceError) and err.status != 503:  # open (503): ask, then follow again
                raise
        current = status(url, job_id)
        if current["state"] in FINAL:
            if progress is not None:
                progress(current)
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not end within {timeout:g} s (it is {current['state']})")
        time.sleep(poll)


def result(url: str, job_id: str, timeout: float = 120) -> tuple[bytes, dict[str, Any]]:
    """The done job's image and result (as `restore`'s); ServiceError 409 while not done (or failed,
    cancelled), 410 once expired, 404 unknown."""
    body, headers = _call(url, f"/jobs/{job_id}/result", timeout=timeout)
    return body, _image_info(headers)


def cancel(url: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """Cancels the job (a queued one never starts, a running one stops at its next step; a done job's
    result is dropped); returns its status."""
    return json.loads(_call(url, f"/jobs/{job_id}", "DELETE", timeout=timeout)[0])
