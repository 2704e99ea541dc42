"""`adaptbir-ray serve`: the runtime behind an HTTP API, as two Ray Serve deployments.

    POST /restore?seed=S&steps=N[&score=..&k=..&w=..]   body: image bytes → the restored PNG
         headers X-AdaptBIR-{Score,Score-Source,Class,K,W,Seed,Steps,Tiled,Timings}
    GET  /healthz → ok        GET /info → engine id, backend, precision, runtime version, limits, restores

`RestoreService`, the ingress (one replica, on the node that ran `start`), serves HTTP itself on host:port
— not through Ray Serve's proxy, which reads every body to its end into memory before the app sees it. It
only waits on I/O and holds many connections at once: it answers /healthz and /info itself, closes a
connection whose request head is not complete within the read timeout, refuses a declared Content-Length
above the limit before reading, reads the body with a per-read and a total deadline (408) while counting
it (413 at the limit, chunked or not: uvicorn stops reading a socket while 64 KiB wait unread, so no more
is ever in memory), within a budget of upload bytes for all requests together (503), checks the parameters
(422) and the image header (413 pixels or decompression bomb, 400 unreadable) — a slow or stalled client
holds no restore slot. Only then does it hand the complete upload to `RestoreWorker` through a
DeploymentHandle, and cancels that call when its client disconnects or the request timeout passes (504).

Each worker replica loads the engine directory once and restores up to `max_ongoing_requests` images at
a time; beyond them `max_queued_requests` wait and any further request is answered 503 — never an
unbounded queue. A restore runs in a thread that holds the worker's slot until it has ended, and stops at
its next sampling step once cancelled: abandoned requests can never make more restores run at once than
configured. Error bodies are one line without server paths. The same seed gives the same image as
`Pipeline.restore` with the same thread count.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from adaptbir.runtime.errors import AdaptBIRError, ArgumentError, InputError
from adaptbir.runtime.options import RestoreOptions

from .shipping import EngineShipment, default_cache, ship

ROUTES = {"/restore": ("POST",), "/healthz": ("GET", "HEAD"), "/info": ("GET", "HEAD")}
INGRESS_CONNECTIONS = 256  # connections the ingress holds at once; beyond, uvicorn answers 503
_PATH = re.compile(r"(?<![\w/.])/(?:[^\s/'\"]+/)+[^\s'\",;:)]*")  # an absolute path with a folder in it
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 50 * 2**20
    max_pixels: int = 64 * 2**20
    max_steps: int = 200
    read_timeout: float = 10.0  # seconds one read of the body may wait for data (408 beyond)
    body_timeout: float = 60.0  # seconds the whole body may take to arrive (408 beyond)
    request_timeout: float | None = None  # seconds from the complete upload to the result (504 beyond)
    max_buffered: int | None = None  # upload bytes held at once, all requests together (default 16 × max_bytes)

    @property
    def buffered(self) -> int:
        return self.max_buffered or 16 * self.max_bytes


class Rejected(Exception):
    """An answer given instead of a restore."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


class Cancelled(Exception):
    """Raised from the progress callback to stop a restore at its next step."""


@dataclass
class Reply:
    """A worker's answer, and its restore counts at that moment."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, message: str) -> Reply:
        return cls(status, (public(message) + "\n").encode(), {"Content-Type": "text/plain; charset=utf-8"})


def public(message: str, names: dict[str, str] | None = None) -> str:
    """One line, with the known server paths named (`names`: path → name) and any other absolute path cut."""
    for path, name in (names or {}).items():
        message = message.replace(path, name)
    lines = message.strip().splitlines() or ["error"]
    return _PATH.sub("<path>", lines[0])[:500]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(public(message) + "\n", status_code=status, headers=headers)


def _refusal(err: Exception) -> Response:
    """The answer to a /restore that did not reach the worker or failed there."""
    if isinstance(err, Rejected):
        return _error(err.status, str(err))
    if isinstance(err, BackPressureError):
        return _error(503, "the service is busy: every restore slot and queue place is taken; retry later",
                      {"Retry-After": f"{err.retry_after_s:g}"} if err.retry_after_s else None)
    if isinstance(err, RayActorError):
        return _error(503, "a restoring replica stopped; retry (Ray Serve restarts it)")
    log.error("adaptbir: /restore failed", exc_info=err)  # a bug: in full in the log, one line to the client
    return _error(500, "internal error (logged by the service)")


def _has_body(request: Request) -> bool:
    return "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"


def _is_bomb(err: BaseException) -> bool:
    """Pillow's decompression-bomb refusal, which image_io reports as an InputError raised from it."""
    from PIL import Image

    context = err.__cause__ or err.__context__
    return isinstance(context, (Image.DecompressionBombError, Image.DecompressionBombWarning))


@contextlib.contextmanager
def _upload_file(body: bytes | bytearray) -> Iterator[str]:
    """The upload as a temporary file, for the runtime's own checked reader."""
    with tempfile.NamedTemporaryFile(suffix=".upload") as upload:
        upload.write(body)
        upload.flush()
        yield upload.name


class Budget:
    """Upload bytes this replica holds at once, for all requests together: each takes what it receives
    (not what it declares, so a stalled client holds nothing) and gives it back when answered."""

    def __init__(self, total: int):
        self.free = total

    @contextlib.contextmanager
    def account(self) -> Iterator[list[int]]:
        held = [0]
        try:
            yield held
        finally:
            self.free += held[0]

    def take(self, held: list[int], size: int) -> None:
        if size > self.free:
            raise Rejected(503, "the service is receiving too many uploads at once; retry later")
        self.free -= size
        held[0] += size


@serve.deployment
class RestoreService:
    """The ingress: HTTP, body, parameters and image header; restores are the worker's."""

    async def __init__(self, worker: DeploymentHandle, limits: dict, host: str, port: int):
        self.worker = worker
        self.limits = Limits(**limits)
        self.budget = Budget(self.limits.buffered)
        self.engine = await worker.describe.remote()  # once: /info never waits for a restore slot
        self.restores: dict[str, dict[str, int]] = {}  # worker replica → its counts at its latest answer
        self.server, self.serving = await _serve_http(self._asgi, host, port, self.limits.read_timeout)

    def __del__(self) -> None:  # Serve stops the replica: uvicorn closes the port on its next tick
        if hasattr(self, "server"):
            self.server.should_exit = True

    async def _asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive)
            response = await self.answer(request)
            if not getattr(request.state, "read", False) and _has_body(request):
                response.headers["Connection"] = "close"  # answered before the body's end: the rest is not wanted
            try:  # a client reading its answer slowly holds the connection no longer than a slow upload
                await asyncio.wait_for(response(scope, receive, send), self.limits.body_timeout)
            except TimeoutError:  # returning mid-answer makes uvicorn close the connection
                log.warning("adaptbir: a client read its answer too slowly; connection closed")

    async def answer(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        methods = ROUTES.get(path)
        if methods is None:
            return _error(404, "no such path: POST /restore, GET /healthz or GET /info")
        if request.method not in methods:
            return _error(405, f"{path} answers {' or '.join(methods)}", headers={"Allow": ", ".join(methods)})
        if path == "/healthz":
            return PlainTextResponse("ok")
        if path == "/info":
            limits = {**asdict(self.limits), "max_buffered": self.limits.buffered}
            return JSONResponse({**self.engine, "limits": limits, "restores": self.restores})
        try:
            return await self._restore(request)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except Exception as err:
            return _refusal(err)

    async def _restore(self, request: Request) -> Response:
        options = self._parameters(request.scope.get("query_string", b""))
        self._check_length(request.headers.get("content-length"))
        with self.budget.account() as held:  # given back once answered
            body = await self._read_body(request.receive, held)
            request.state.read = True
            await asyncio.to_thread(self._check_image, body)
            reply = await self._call_worker(body, options, request.receive)
        if reply.counts:
            self._note(reply.counts)
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    def _parameters(self, query: bytes) -> RestoreOptions:
        """The restore options from the query (`RestoreOptions.from_query`: known names, each once, of its
        type, within the runtime's ranges), on the engines' schedule, within this service's step limit."""
        try:
            options = RestoreOptions.from_query(query.decode("latin-1"))
            options = options.for_schedule(self.engine["default_steps"], self.engine["max_steps"])
        except ArgumentError as err:
            raise Rejected(422, str(err)) from None
        if options.steps > self.limits.max_steps:
            raise Rejected(422, f"steps={options.steps} is above this service's limit of {self.limits.max_steps}")
        return options

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

        with _upload_file(body) as path:
            try:
                height, width = image_size(path)
            except InputError as err:
                raise Rejected(413 if _is_bomb(err) else 400, public(str(err), {path: "upload"})) from None
        if height * width > self.limits.max_pixels:
            raise Rejected(413, f"a {width}×{height} (W×H) image, above the {self.limits.max_pixels} pixel limit")

    async def _call_worker(self, body: bytearray, options: RestoreOptions, receive: Any) -> Reply:
        """The worker's reply; the call is cancelled when the client goes or the request timeout passes."""
        timeout = self.limits.request_timeout
        call = self.worker.restore.remote(body, options, timeout)
        result = asyncio.ensure_future(_resolve(call))
        gone = asyncio.ensure_future(_disconnected(receive))
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

    def _note(self, counts: dict) -> None:
        known = self.restores.get(counts["replica"])
        if known is None or counts["ended"] >= known["ended"]:  # answers may arrive out of order
            self.restores[counts["replica"]] = {k: v for k, v in counts.items() if k != "replica"}


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager:  # the replica's signals are Ray's
        return contextlib.nullcontext()


class _HeadDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol with the deadline it lacks: a request's line and headers must have arrived
    `head_timeout` seconds after the connection opened or the request began, else 408 and the connection
    is closed — a client stalling before its body holds a connection no longer than one stalling in it."""

    head_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            message = f"the request head was not complete within {self.head_timeout:g} s\n".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(message), message))
            self.transport.close()


async def _serve_http(app: Any, host: str, port: int, head_timeout: float) -> tuple[uvicorn.Server, asyncio.Task]:
    """Serve `app` on host:port from this replica's event loop. uvicorn stops reading a connection once 64 KiB
    of its body wait unread (Ray Serve's proxy reads every body to its end, into memory, whatever the app
    does): a body is in memory only as far as the ingress has read it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # a port in use fails here, as this replica's error
    protocol = type("HeadDeadline", (_HeadDeadline,), {"head_timeout": head_timeout})
    config = uvicorn.Config(app, http=protocol, interface="asgi3", lifespan="off", ws="none", proxy_headers=False,
                            server_header=False, access_log=False, log_level="warning",
                            limit_concurrency=INGRESS_CONNECTIONS, timeout_keep_alive=5)
    server = _Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if serving.done():
        serving.result()
        raise RuntimeError(f"could not serve on {host}:{port}")
    return server, serving


async def _resolve(call: Any) -> Reply:
    return await call


async def _disconnected(receive: Any) -> None:
    """Returns once the client has disconnected (the body is read: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Counts:
    """Restores of one worker replica: running now, the most at once, started, cancelled, ended."""

    def __init__(self, replica: str):
        self.lock = threading.Lock()
        self.values = {"running": 0, "peak": 0, "started": 0, "cancelled": 0, "ended": 0}
        self.replica = replica

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self.lock:
            v = self.values
            v["running"] += 1
            v["started"] += 1
            v["peak"] = max(v["peak"], v["running"])
        try:
            yield
        finally:
            with self.lock:
                self.values["running"] -= 1
                self.values["ended"] += 1

    def cancelled(self) -> None:
        with self.lock:
            self.values["cancelled"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"replica": self.replica, **self.values}


@serve.deployment
class RestoreWorker:
    """Loads the engines once; restores complete, checked uploads, `slots` at a time."""

    def __init__(self, engines: str | EngineShipment, threads: int | None, slots: int, cache: str | None = None):
        from adaptbir.runtime.pipeline import Pipeline

        shipped = isinstance(engines, EngineShipment)
        if shipped:  # this node may not see the driver's disk
            engines = engines.unpack(Path(cache) if cache else default_cache())
        self.pipeline = Pipeline.from_engines(engines, threads=threads, verify=not shipped)  # unpack() verified
        self.names = {str(engines): "<engines>"}
        # Held by the restoring thread, not by Ray's request: a request Ray has cancelled frees its Ray slot
        # at once, while its thread runs on to the next step.
        self.gate = asyncio.Semaphore(slots)
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="adaptbir-restore")
        self.counts = Counts(serve.get_replica_context().replica_id.unique_id)

    def describe(self) -> dict:
        """Pipeline.describe() with the engine directory's name only (no server path), and the steps its
        schedule takes by default and at most."""
        info = self.pipeline.describe()
        schedule = self.pipeline.manifest.schedule
        return {**info, "engines": Path(info["engines"]).name, "max_steps": self.pipeline.max_steps,
                "default_steps": schedule.default_steps}

    async def restore(self, body: bytes, options: RestoreOptions, timeout: float | None) -> Reply:
        cancel = threading.Event()
        try:
            return await asyncio.wait_for(self._run(body, options, cancel), timeout)
        except TimeoutError:
            return Reply.text(504, f"no result within the {timeout:g} s request timeout; the restore was cancelled")

    async def _run(self, body: bytes, options: RestoreOptions, cancel: threading.Event) -> Reply:
        await self.gate.acquire()
        job = asyncio.get_running_loop().run_in_executor(self.pool, self._restore, body, options, cancel)
        job.add_done_callback(lambda _: self.gate.release())
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:  # the client went or the timeout passed: stop at the next step
            cancel.set()
            while not job.done():  # and keep this request until its thread has ended
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({job})
            raise

    def _restore(self, body: bytes, options: RestoreOptions, cancel: threading.Event) -> Reply:
        with self.counts.running():
            reply = self._restored(body, options, cancel)
        reply.counts = self.counts.snapshot()
        return reply

    def _restored(self, body: bytes, options: RestoreOptions, cancel: threading.Event) -> Reply:
        def progress(step: int, steps: int) -> None:
            if cancel.is_set():
                raise Cancelled

        try:
            result = self.pipeline.restore(self._read(body), options, progress=progress)
        except Cancelled:
            self.counts.cancelled()
            return Reply.text(499, "cancelled")
        except AdaptBIRError as err:  # ArgumentError 422, InputError 400, the engines failing 500
            status = 422 if isinstance(err, ArgumentError) else 400 if isinstance(err, InputError) else 500
            return Reply.text(status, public(str(err), self.names))
        return self._encoded(result)

    def _read(self, body: bytes) -> Any:
        from adaptbir.runtime.image_io import read_image

        with _upload_file(body) as path:
            try:
                return read_image(path)
            except InputError as err:
                raise InputError(str(err).replace(path, "upload")) from None

    def _encoded(self, result: Any) -> Reply:
        from PIL import Image

        encoded = io.BytesIO()
        Image.fromarray(result.image.rgb).save(encoded, format="PNG")
        headers = {"Content-Type": "image/png", "X-AdaptBIR-Score": str(result.score),
                   "X-AdaptBIR-Score-Source": result.score_source, "X-AdaptBIR-Class": result.label,
                   "X-AdaptBIR-K": str(result.k), "X-AdaptBIR-W": str(result.w), "X-AdaptBIR-Seed": str(result.seed),
                   "X-AdaptBIR-Steps": str(result.steps), "X-AdaptBIR-Tiled": str(result.tiled).lower(),
                   "X-AdaptBIR-Timings": json.dumps(result.timings)}
        return Reply(200, encoded.getvalue(), headers)


def start(engines: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, threads: int = 1,
          max_ongoing_requests: int = 1, max_queued_requests: int = 8, limits: Limits | None = None,
          address: str | None = None, ship_engines: bool = False, engine_cache: Path | None = None) -> None:
    """Deploy the service on the cluster at `address` (None: Ray's default) and return once it answers.
    `ship_engines`: carry the directory to each replica's node through the object store (see shipping)."""
    import ray

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # the ingress serves HTTP itself (see _serve_http)
    worker = RestoreWorker.options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        ray_actor_options={"num_cpus": 0.8 * threads},
    ).bind(ship(Path(engines)) if ship_engines else str(engines), threads, max_ongoing_requests,
           str(engine_cache) if engine_cache else None)
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}  # host:port are this machine's
    app = RestoreService.options(  # waits on I/O only: no CPU claimed
        ray_actor_options={"num_cpus": 0, "resources": here},
    ).bind(worker, asdict(limits or Limits()), host, port)
    serve.run(app, name="adaptbir", route_prefix=None)
