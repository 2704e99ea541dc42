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
    """An answer other than 200: `status`, the service's one-line message, and for 503 the seconds the
    service asked to wait before retrying (`retry_after`, None when it did not say)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


def restore(url: str, image: bytes, timeout: float = 600, **parameters: float | int) -> tuple[bytes, dict]:
    """POST the image; returns the restored PNG bytes and the result (score, class, k, w, seed, steps, tiled,
    timings). Raises ServiceError with the HTTP status: 400 not a readable image, 408 the upload was too
    slow, 413 the upload or the image too large (or a decompression bomb), 422 bad parameters, 500 the
    engines failed on this image, 503 busy (every restore slot and queue place taken: retry later), 504 no
    result within the service's request timeout. `timeout`: this client's own, per socket operation."""
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
        retry = err.headers.get("Retry-After", "")
        raise ServiceError(err.code, err.read().decode(errors="replace").strip(),
                           float(retry) if retry.isdigit() else None) from None
