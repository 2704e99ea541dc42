"""A small client of `adaptbir-ray serve` (standard library only).

    from adaptbir.serve.client import restore
    png, info = restore("http://127.0.0.1:8000", Path("photo.jpg").read_bytes(), seed=0, steps=50)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class ServiceError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def restore(url: str, image: bytes, timeout: float = 600, **parameters: float | int) -> tuple[bytes, dict]:
    """POST the image; returns the restored PNG bytes and the result (score, class, k, w, seed, steps, tiled,
    timings). Raises ServiceError with the HTTP status (400 unreadable, 413 too large, 422 bad parameters,
    503 the service's queue is full: retry later)."""
    query = urllib.parse.urlencode({k: v for k, v in parameters.items() if v is not None})
    request = urllib.request.Request(f"{url.rstrip('/')}/restore?{query}", data=image, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers = {k.lower().removeprefix("x-adaptbir-"): v for k, v in response.headers.items()
                       if k.lower().startswith("x-adaptbir-")}
            info = {**headers, "timings": json.loads(headers.get("timings", "{}"))}
            return response.read(), info
    except urllib.error.HTTPError as err:
        raise ServiceError(err.code, err.read().decode(errors="replace").strip()) from None
