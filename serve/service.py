"""`adaptbir-ray serve`: the runtime behind an HTTP API, as two Ray Serve deployments.

    POST   /restore?seed=S&steps=N[&score=&k=&w=&format=]   body: image bytes → the restored image
           headers X-AdaptBIR-{Score,Score-Source,Class,K,W,Seed,Steps,Tiled,Timings}
    POST   /jobs?<the same query>          body: image bytes → 202 {"id", "status_url", ...}
    GET    /jobs/{id}                      the job's state, queue position, stage, step, ETA, gate values, error
    GET    /jobs/{id}/events               the same, as Server-Sent Events while it changes, ending when it ends
    GET    /jobs/{id}/result               the restored image and its X-AdaptBIR-* headers (409 not done, 410 expired)
    DELETE /jobs/{id}                      cancels it (a queued job never starts; a running one stops at its
                                           next step); a done job's result is dropped
    GET    /   a page to try it in a browser        GET /healthz → ok        GET /info → engines, limits, counts

`RestoreService`, the ingress (one replica, on the node that ran `start`), serves HTTP itself on host:port
— not through Ray Serve's proxy, which reads every body to its end into memory before the app sees it. It
only waits on I/O and holds many connections at once: it closes a connection whose request head is not
complete within the read timeout, refuses a declared Content-Length above the limit before reading, reads
the body with a per-read and a total deadline (408) while counting it (413 at the limit, chunked or not:
uvicorn stops reading a socket while 64 KiB wait unread, so no more is ever in memory), within a budget of
upload bytes for all requests and queued jobs together (503), checks the parameters (422) and the image
header (413 pixels or decompression bomb, 400 unreadable) — a slow or stalled client holds no restore slot,
and a job is accepted only once all of that passed. A /restore then goes to `RestoreWorker` through a
DeploymentHandle, cancelled when its client disconnects or the request timeout passes (504). A job goes to
the job board (`jobs.py`); one dispatcher per worker slot streams each job's restore from a worker
(`worker.py`) and records its events. Error bodies are one line without server paths. The same seed gives
the same image as `Pipeline.restore` with the same thread count, whether asked by /restore or as a job.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from adaptbir.runtime.errors import ArgumentError, InputError
from adaptbir.runtime.options import RestoreOptions

from .http import Budget, ClientGone, EventStream, Rejected, disconnected, error, public, serve_http
from .jobs import FINAL, Job, JobBoard, JobLimits
from .shipping import ship
from .worker import MEDIA_TYPES, Reply, RestoreWorker, upload_file

__all__ = ["Limits", "RestoreService", "RestoreWorker", "connect", "start"]

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("page")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/page.css": ("page.css", "text/css; charset=utf-8"),
          "/page.js": ("page.js", "text/javascript; charset=utf-8")}
# The page asks nothing of any other origin: a browser enforces it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                "base-uri 'none'; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache"}
KEEPALIVE = 15.0  # seconds between comment lines of a quiet event stream
_JOB = r"/jobs/(?P<job_id>[^/]*)"
# path pattern → (methods, handler): every path the service answers
ROUTES = {
    "/restore": (("POST",), "restore"), "/jobs": (("POST",), "submit"),
    _JOB: (("GET", "HEAD", "DELETE"), "job"), _JOB + "/events": (("GET",), "job_events"),
    _JOB + "/result": (("GET", "HEAD"), "job_result"),
    "/healthz": (("GET", "HEAD"), "healthz"), "/info": (("GET", "HEAD"), "info"),
    **{path: (("GET", "HEAD"), "page") for path in STATIC},
}
_ROUTES = [(re.compile(pattern), methods, name) for pattern, (methods, name) in ROUTES.items()]


def _route(path: str) -> tuple[tuple[str, ...], str, re.Match] | None:
    """The methods, handler name and match of the route `path` takes (None: no such path)."""
    for pattern, methods, name in _ROUTES:
        if match := pattern.fullmatch(path):
            return methods, name, match
    return None


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 50 * 2**20
    max_pixels: int = 64 * 2**20
    max_steps: int = 200
    read_timeout: float = 10.0  # seconds one read of the body may wait for data (408 beyond)
    body_timeout: float = 60.0  # seconds the whole body may take to arrive (408 beyond)
    request_timeout: float | None = None  # seconds from the complete upload to the result (504 beyond);
    # for a job, from its start to its end (it may wait in the queue for longer)
    max_buffered: int | None = None  # upload bytes held at once, all requests together (default 16 × max_bytes)
    max_jobs: int = 64  # jobs accepted and not ended (503 beyond)
    result_ttl: float = 3600.0  # seconds a job's result and status are kept after it ended
    max_result_bytes: int = 2**30  # results kept at once (the oldest expire early beyond)
    max_event_streams: int = 128  # event streams open at once (503 beyond): connections stay for uploads

    @property
    def buffered(self) -> int:
        return self.max_buffered or 16 * self.max_bytes

    def jobs(self) -> JobLimits:
        return JobLimits(self.max_jobs, self.result_ttl, self.max_result_bytes)


def _refusal(err: Exception) -> Response:
    """The answer to a request that did not reach a worker or failed there."""
    if isinstance(err, Rejected):
        return error(err.status, str(err), err.headers)
    if isinstance(err, BackPressureError):
        return error(503, "the service is busy: every restore slot and queue place is taken; retry later",
                     {"Retry-After": f"{err.retry_after_s:g}"} if err.retry_after_s else None)
    if isinstance(err, RayActorError):
        return error(503, "a restoring replica stopped; retry (Ray Serve restarts it)")
    log.error("adaptbir: a request failed", exc_info=err)  # a bug: in full in the log, one line to the client
    return error(500, "internal error (logged by the service)")


def _has_body(request: Request) -> bool:
    return "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"


def _is_bomb(err: BaseException) -> bool:
    """Pillow's decompression-bomb refusal, which image_io reports as an InputError raised from it."""
    from PIL import Image

    context = err.__cause__ or err.__context__
    return isinstance(context, (Image.DecompressionBombError, Image.DecompressionBombWarning))


def _image_response(reply: Reply, status: int = 200) -> Response:
    return Response(reply.body, status_code=status, headers=reply.headers)


@serve.deployment
class RestoreService:
    """The ingress: HTTP, body, parameters and image header, and the jobs; restores are the worker's."""

    async def __init__(self, worker: DeploymentHandle, limits: dict, host: str, port: int, dispatchers: int = 1):
        self.worker = worker
        self.limits = Limits(**limits)
        self.budget = Budget(self.limits.buffered)
        self.board = JobBoard(self.limits.jobs(), release=self.budget.give, slots=dispatchers)
        self.engine = await worker.describe.remote()  # once: /info never waits for a restore slot
        self.restores: dict[str, dict[str, int]] = {}  # worker replica → its counts at its latest answer
        self.streams = 0  # event streams open
        self.page = {path: (PAGE / name).read_bytes() for path, (name, _) in STATIC.items()}
        loop = asyncio.get_running_loop()  # one dispatcher per worker slot: Ray Serve places each job
        self.tasks = [loop.create_task(self._dispatch()) for _ in range(dispatchers)]
        self.tasks.append(loop.create_task(self._sweep()))
        self.server, self.serving = await serve_http(self._asgi, host, port, self.limits.read_timeout)

    def __del__(self) -> None:  # Serve stops the replica: uvicorn closes the port on its next tick
        if hasattr(self, "server"):
            self.server.should_exit = True

    # ----------------------------------------------------------------------------------- HTTP

    async def _asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.answer(request)
        if isinstance(response, EventStream):  # as long as the job runs; each write has its own deadline
            await response(scope, receive, send)
            return
        if not getattr(request.state, "read", False) and _has_body(request):
            response.headers["Connection"] = "close"  # answered before the body's end: the rest is not wanted
        try:  # a client reading its answer slowly holds the connection no longer than a slow upload
            await asyncio.wait_for(response(scope, receive, send), self.limits.body_timeout)
        except TimeoutError:  # returning mid-answer makes uvicorn close the connection
            log.warning("adaptbir: a client read its answer too slowly; connection closed")

    async def answer(self, request: Request) -> Response | EventStream:
        path = request.url.path.rstrip("/") or "/"
        route = _route(path)
        if route is None:
            return error(404, "no such path: POST /restore or /jobs, GET /jobs/ID, /healthz, /info or / (the page)")
        methods, name, match = route
        if request.method not in methods:
            return error(405, f"{path} answers {' or '.join(methods)}", headers={"Allow": ", ".join(methods)})
        handler: Callable[..., Awaitable[Response | EventStream]] = getattr(self, f"_{name}")
        try:
            return await handler(request, **match.groupdict())
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except Exception as err:
            return _refusal(err)

    async def _healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def _info(self, request: Request) -> Response:
        limits = {**asdict(self.limits), "max_buffered": self.limits.buffered}
        return JSONResponse({**self.engine, "limits": limits, "restores": self.restores, "jobs": self.board.counts()})

    async def _page(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        return Response(self.page[path], media_type=STATIC[path][1], headers=PAGE_HEADERS)

    # ------------------------------------------------------------------------------ the upload

    async def _upload(self, request: Request, held: list[int]) -> tuple[RestoreOptions, str, bytearray]:
        """Options, output format and the checked image bytes of a /restore or a job, every limit applied."""
        options, fmt = self._parameters(request.scope.get("query_string", b""))
        self._check_length(request.headers.get("content-length"))
        body = await self._read_body(request.receive, held)
        request.state.read = True
        await asyncio.to_thread(self._check_image, body)
        return options, fmt, body

    def _parameters(self, query: bytes) -> tuple[RestoreOptions, str]:
        """The restore options from the query (`RestoreOptions.from_pairs`: known names, each once, of its
        type, within the runtime's ranges), on the engines' schedule, within this service's step limit; and
        the output format (`format`, png by default)."""
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        formats = [value.lower() for name, value in pairs if name == "format"]  # the output's, not the restore's
        if len(formats) > 1 or (formats and formats[0] not in MEDIA_TYPES):
            raise Rejected(422, f"format={formats[0][:20]!r}: one of {', '.join(MEDIA_TYPES)}, given once")
        fmt = formats[0] if formats else "png"
        try:
            options = RestoreOptions.from_pairs([(name, value) for name, value in pairs if name != "format"])
            options = options.for_schedule(self.engine["default_steps"], self.engine["max_steps"])
        except ArgumentError as err:
            raise Rejected(422, str(err)) from None
        if options.steps > self.limits.max_steps:
            raise Rejected(422, f"steps={options.steps} is above this service's limit of {self.limits.max_steps}")
        return options, fmt

    def _check_length(self, declared: str | None) -> None:
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_bytes:
            raise Rejected(413, f"an upload of {declared} bytes, above the {self.limits.max_bytes} byte limit")

    async def _read_body(self, receive: Any, held: list[int]) -> bytearray:
        """The body, read message by message: each read within read_timeout, all of it within body_timeout,
        never more than max_bytes kept."""
        limits, loop = self.limits, asyncio.get_running_loop()
        end = loop.time() + limits.body_timeout
        body = bytearray()
        while True:
            wait = min(limits.read_timeout, end - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0))
            except TimeoutError:
                why = (f"no data for {limits.read_timeout:g} s" if wait == limits.read_timeout
                       else f"not complete within {limits.body_timeout:g} s")
                raise Rejected(408, f"the upload was too slow: {why}") from None
            if message["type"] != "http.request":
                raise ClientGone
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limits.max_bytes:
                raise Rejected(413, f"the upload is above the {limits.max_bytes} byte limit")
            self.budget.take(held, len(chunk))
            body += chunk
            if not message.get("more_body", False):
                return body

    def _check_image(self, body: bytearray) -> None:
        """The image header, read as the runtime reads it: 400 unreadable, 413 too many pixels or a bomb."""
        from adaptbir.runtime.image_io import image_size

        with upload_file(body) as path:
            try:
                height, width = image_size(path)
            except InputError as err:
                raise Rejected(413 if _is_bomb(err) else 400, public(str(err), {path: "upload"})) from None
        if height * width > self.limits.max_pixels:
            raise Rejected(413, f"a {width}×{height} (W×H) image, above the {self.limits.max_pixels} pixel limit")

    # -------------------------------------------------------------------------------- /restore

    async def _restore(self, request: Request) -> Response:
        with self.budget.account() as held:  # given back once answered
            options, fmt, body = await self._upload(request, held)
            reply = await self._call_worker(body, options, fmt, request.receive)
        self._note(reply)
        return _image_response(reply, reply.status)

    async def _call_worker(self, body: bytearray, options: RestoreOptions, fmt: str, receive: Any) -> Reply:
        """The worker's reply; the call is cancelled when the client goes or the request timeout passes."""
        timeout = self.limits.request_timeout
        call = self.worker.restore.remote(body, options, timeout, fmt)
        result = asyncio.ensure_future(_resolve(call))
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled (the replica stopping): the restore must stop too
            if not result.done():
                call.cancel()
                result.cancel()
            gone.cancel()
        if result in done:
            return result.result()
        if gone in done:
            raise ClientGone
        raise Rejected(504, f"no result within the {timeout:g} s request timeout (waiting included); the restore "
                       "was cancelled: retry later, with fewer steps or a smaller image")

    def _note(self, reply: Reply) -> None:
        counts = reply.counts
        if not counts:
            return
        known = self.restores.get(counts["replica"])
        if known is None or counts["ended"] >= known["ended"]:  # answers may arrive out of order
            self.restores[counts["replica"]] = {k: v for k, v in counts.items() if k != "replica"}

    # ----------------------------------------------------------------------------------- jobs

    async def _submit(self, request: Request) -> Response:
        self.board.check_room()  # before reading an upload that could not be accepted
        with self.budget.account() as held:
            options, fmt, body = await self._upload(request, held)
            job = self.board.accept(options, fmt, body)
            self.budget.keep(held)  # the job holds its upload until a worker has it (JobBoard.release)
        status = self.board.status(job)
        return JSONResponse(status, status_code=202, headers={"Location": status["status_url"]})

    async def _job(self, request: Request, job_id: str) -> Response:
        job = self.board.get(job_id)
        if request.method == "DELETE":
            if job.state in FINAL:
                self.board.discard(job)
            else:
                self.board.cancel(job)
        return JSONResponse(self.board.status(job))

    async def _job_events(self, request: Request, job_id: str) -> EventStream:
        job = self.board.get(job_id)
        if self.streams >= self.limits.max_event_streams:
            raise Rejected(503, f"{self.streams} event streams are open, this service's limit: follow GET "
                           f"/jobs/{job.id} instead, or retry later", {"Retry-After": "5"})

        async def next_event(previous: int) -> tuple[int, dict | None] | None:
            if previous == job.version and job.state in FINAL:
                return previous, None  # the final state was sent
            if not await job.changed(previous, KEEPALIVE):
                return None
            return job.version, self.board.status(job)

        self.streams += 1
        return EventStream(next_event, self.limits.body_timeout, closed=self._stream_closed)

    def _stream_closed(self) -> None:
        self.streams -= 1

    async def _job_result(self, request: Request, job_id: str) -> Response:
        job = self.board.get(job_id)
        if job.state == "done":
            return _image_response(job.result)
        if job.state == "expired":
            raise Rejected(410, f"the result is gone: {job.error}")
        progress = {"queued": f"position {self.board.position(job)} in the queue",
                    "running": f"{job.stage or 'starting'}, step {job.step} of {job.options.steps}"}
        raise Rejected(409, f"the job is {job.state}, not done: " + progress.get(job.state, job.error or ""))

    async def _dispatch(self) -> None:
        """Takes the oldest queued job, one at a time, for as long as the replica lives."""
        while True:
            job = await self.board.next()
            try:
                await self._run(job)
            except Exception as err:  # a bug: the job fails with a line, the dispatcher goes on
                log.error("adaptbir: a job failed", exc_info=err)
                self.board.fail(job, "internal error (logged by the service)")

    async def _run(self, job: Job) -> None:
        """One job's restore, streamed from a worker replica into the board; never left running."""
        stream = self.worker.options(stream=True).events.remote(job.body, job.options, job.format)
        job.stop = stream.cancel
        timeout, requeued = self.limits.request_timeout, False
        try:
            await asyncio.wait_for(self._follow(job, stream), timeout)
        except BackPressureError as err:  # /restore requests hold every place: wait, then try again
            stream.cancel()
            self.board.requeue(job)
            requeued = True
            await asyncio.sleep(err.retry_after_s or 1.0)
        except TimeoutError:
            stream.cancel()
            self.board.fail(job, f"no result within the {timeout:g} s request timeout; the restore was cancelled")
        except RayActorError as err:
            self.board.fail(job, "the restoring replica stopped (crashed or was killed; Ray Serve restarts it): "
                            + public(str(err)).split(":")[0])
        except Exception:
            if job.state != "cancelled":  # else: the stream ended because the client cancelled the job
                raise
        finally:
            if job.state not in FINAL and not requeued:
                self.board.fail(job, "its restore ended without a result")

    async def _follow(self, job: Job, stream: Any) -> None:
        async for item in stream:
            if isinstance(item, Reply):
                self._note(item)
                self.board.finish(job, item)
            else:
                self.board.update(job, item)

    async def _sweep(self) -> None:
        """Expires results past their TTL even when nobody asks."""
        while True:
            await asyncio.sleep(1.0)
            self.board.sweep()


async def _resolve(call: Any) -> Reply:
    return await call


def connect(address: str | None) -> None:
    """Join the cluster at `address` (None: Ray's default), once per process. `ray.init` replaces SIGTERM's
    handler with one that exits at once — even when it has nothing to do — so it is called only once: a command
    installs its own handler after this call, and no later call replaces it."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def start(engines: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, threads: int = 1,
          max_ongoing_requests: int = 1, max_queued_requests: int = 8, limits: Limits | None = None,
          address: str | None = None, ship_engines: bool = False, engine_cache: Path | None = None) -> None:
    """Deploy the service on the cluster at `address` (None: Ray's default) and return once it answers.
    `ship_engines`: carry the directory to each replica's node through the object store (see shipping)."""
    import ray

    connect(address)
    serve.start(proxy_location="Disabled")  # the ingress serves HTTP itself (see http.serve_http)
    worker = RestoreWorker.options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        ray_actor_options={"num_cpus": 0.8 * threads},
    ).bind(ship(Path(engines)) if ship_engines else str(engines), threads, max_ongoing_requests,
           str(engine_cache) if engine_cache else None)
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}  # host:port are this machine's
    app = RestoreService.options(  # waits on I/O only: no CPU claimed
        ray_actor_options={"num_cpus": 0, "resources": here},
    ).bind(worker, asdict(limits or Limits()), host, port, replicas * max_ongoing_requests)
    serve.run(app, name="adaptbir", route_prefix=None)
