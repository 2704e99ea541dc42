"""`adaptbir-ray serve`: the runtime behind an HTTP API, as a Ray Serve deployment.

    POST /restore?seed=S&steps=N[&score=..&k=..&w=..]   body: image bytes → the restored PNG
         headers X-AdaptBIR-{Score,Score-Source,Class,K,W,Seed,Steps,Tiled,Timings}
    GET  /healthz → ok        GET /info → engine id, backend, precision, runtime version

Each replica loads the engine directory once and restores up to `max_ongoing_requests` images at a time (in
threads: one `Pipeline` serves several at once); beyond them `max_queued_requests` wait, and any further
request is answered 503 by Ray Serve at once — never an unbounded queue. Limits answer before any engine
runs: 413 for a body or an image too large, 400 for what is not a readable image, 422 for bad parameters.
The same seed gives the same image as `Pipeline.restore` with the same thread count.
"""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from adaptbir.runtime.errors import AdaptBIRError, ArgumentError, InputError

from .shipping import EngineShipment, default_cache, ship

PARAMETERS = {"seed": int, "steps": int, "score": float, "k": float, "w": float}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 50 * 2**20
    max_pixels: int = 64 * 2**20
    max_steps: int = 200


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@serve.deployment
class RestoreService:
    def __init__(self, engines: str | EngineShipment, threads: int | None, limits: dict, cache: str | None = None):
        from adaptbir.runtime.pipeline import Pipeline

        shipped = isinstance(engines, EngineShipment)
        if shipped:  # this node may not see the driver's disk
            engines = engines.unpack(Path(cache) if cache else default_cache())
        self.pipeline = Pipeline.from_engines(engines, threads=threads, verify=not shipped)  # unpack() verified
        self.limits = Limits(**limits)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if request.method == "GET" and path == "/healthz":
            return PlainTextResponse("ok")
        if request.method == "GET" and path == "/info":
            return JSONResponse({**self.pipeline.describe(), "limits": asdict(self.limits)})
        if request.method != "POST" or path != "/restore":
            return PlainTextResponse("POST /restore, GET /healthz or GET /info\n", status_code=404)
        try:
            body = await request.body()
            if len(body) > self.limits.max_bytes:
                raise Rejected(413, f"upload of {len(body)} bytes, above the {self.limits.max_bytes} byte limit")
            options = self._parameters(request)
            result = await asyncio.to_thread(self._restore, body, options)
        except Rejected as err:
            return PlainTextResponse(f"{err}\n", status_code=err.status)
        except ArgumentError as err:
            return PlainTextResponse(f"{err}\n", status_code=422)
        except InputError as err:
            return PlainTextResponse(f"{err}\n", status_code=400)
        except AdaptBIRError as err:  # the engines failed on this image (say, NaNs from fp16): said, not hidden
            return PlainTextResponse(f"{err}\n", status_code=500)
        return result

    def _parameters(self, request: Request) -> dict:
        options = {}
        for name, kind in PARAMETERS.items():
            if name in request.query_params:
                try:
                    options[name] = kind(request.query_params[name])
                except ValueError:
                    raise Rejected(422, f"{name}={request.query_params[name]!r} is not a {kind.__name__}") from None
        unknown = set(request.query_params) - set(PARAMETERS)
        if unknown:
            raise Rejected(422, f"unknown parameter(s) {sorted(unknown)}; known: {', '.join(PARAMETERS)}")
        steps = options.get("steps", 50)  # Pipeline.restore's default
        if steps > self.limits.max_steps:
            raise Rejected(422, f"steps={steps} is above this service's limit of {self.limits.max_steps}")
        return options

    def _restore(self, body: bytes, options: dict) -> Response:
        from PIL import Image

        from adaptbir.runtime.image_io import image_size, read_image

        with tempfile.NamedTemporaryFile(suffix=".upload") as upload:  # the runtime's own, checked reader
            upload.write(body)
            upload.flush()
            height, width = image_size(upload.name)
            if height * width > self.limits.max_pixels:
                raise Rejected(413, f"a {width}×{height} (W×H) image, above the {self.limits.max_pixels} pixel limit")
            loaded = read_image(upload.name)
        result = self.pipeline.restore(loaded, **options)
        encoded = io.BytesIO()
        Image.fromarray(result.image.rgb).save(encoded, format="PNG")
        headers = {"X-AdaptBIR-Score": str(result.score), "X-AdaptBIR-Score-Source": result.score_source,
                   "X-AdaptBIR-Class": result.label, "X-AdaptBIR-K": str(result.k), "X-AdaptBIR-W": str(result.w),
                   "X-AdaptBIR-Seed": str(result.seed), "X-AdaptBIR-Steps": str(result.steps),
                   "X-AdaptBIR-Tiled": str(result.tiled).lower(), "X-AdaptBIR-Timings": json.dumps(result.timings)}
        return Response(encoded.getvalue(), media_type="image/png", headers=headers)


def start(engines: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, threads: int = 1,
          max_ongoing_requests: int = 1, max_queued_requests: int = 8, limits: Limits | None = None,
          address: str | None = None, ship_engines: bool = False, engine_cache: Path | None = None) -> None:
    """Deploy the service on the cluster at `address` (None: Ray's default) and return once it answers.
    `ship_engines`: carry the directory to each replica's node through the object store (see shipping)."""
    import ray

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = RestoreService.options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        ray_actor_options={"num_cpus": 0.8 * threads},
    ).bind(ship(Path(engines)) if ship_engines else str(engines), threads, asdict(limits or Limits()),
           str(engine_cache) if engine_cache else None)
    serve.run(app, name="adaptbir", route_prefix="/")
