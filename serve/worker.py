"""`RestoreWorker`, the Ray Serve deployment that restores: each replica loads the engine directory once and
restores complete, checked uploads, `slots` at a time.

One restore is one stream of events (`events`): `{"state": "running"}` once it has a slot, then each stage
as it begins, the gate's decision, each sampling step — each with the worker's clock — and last the
`Reply` (the encoded image and its `X-AdaptBIR-*` headers, or a one-line error). A job follows the
stream; `POST /restore` (`restore`) waits for its last item. A restore runs in a thread that holds the
replica's slot until it has ended, and stops at its next sampling step once its stream is cancelled:
abandoned requests can never make more restores run at once than configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from adaptbir.runtime.errors import AdaptBIRError, ArgumentError, InputError
from adaptbir.runtime.options import RestoreOptions

from .http import public
from .shipping import EngineShipment, default_cache

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # the formats a client may ask


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


@contextlib.contextmanager
def upload_file(body: bytes | bytearray) -> Iterator[str]:
    """The upload as a temporary file, for the runtime's own checked reader."""
    with tempfile.NamedTemporaryFile(suffix=".upload") as upload:
        upload.write(body)
        upload.flush()
        yield upload.name


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

    async def restore(self, body: bytes, options: RestoreOptions, timeout: float | None, fmt: str = "png") -> Reply:
        """The restore's Reply (504 past `timeout` seconds, the restore stopped at its next step)."""
        async def last() -> Reply:
            async for item in self.events(body, options, fmt):
                if isinstance(item, Reply):
                    return item
            raise RuntimeError("a restore's events ended without a reply")

        try:
            return await asyncio.wait_for(last(), timeout)
        except TimeoutError:
            return Reply.text(504, f"no result within the {timeout:g} s request timeout; the restore was cancelled")

    async def events(self, body: bytes, options: RestoreOptions, fmt: str = "png") -> AsyncIterator[dict | Reply]:
        """The restore as a stream of events, its Reply last (see the module's text). Cancelling the stream
        stops the restore at its next step; the stream ends once its thread has."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: dict) -> None:  # from the restoring thread
            loop.call_soon_threadsafe(queue.put_nowait, {**event, "time": time.time()})

        await self.gate.acquire()
        job = loop.run_in_executor(self.pool, self._restore, body, options, fmt, cancel, emit)
        job.add_done_callback(lambda _: self.gate.release())
        job.add_done_callback(queue.put_nowait)  # after every event the thread emitted
        try:
            yield {"state": "running", "replica": self.counts.replica, "time": time.time()}
            while (item := await queue.get()) is not job:
                yield item
            yield job.result()
        except BaseException:  # cancelled (or the consumer gone): stop at the next step, end with the thread
            cancel.set()
            while not job.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({job})
            raise

    def _restore(self, body: bytes, options: RestoreOptions, fmt: str, cancel: threading.Event,
                 emit: Callable[[dict], None]) -> Reply:
        with self.counts.running():
            reply = self._restored(body, options, fmt, cancel, emit)
        reply.counts = self.counts.snapshot()
        return reply

    def _restored(self, body: bytes, options: RestoreOptions, fmt: str, cancel: threading.Event,
                  emit: Callable[[dict], None]) -> Reply:
        def progress(step: int, steps: int) -> None:
            if cancel.is_set():
                raise Cancelled
            emit({"step": step, "steps": steps})

        def gated(gate: Any, seed: int) -> None:
            emit({"gate": {"score": gate.score, "score_source": "given" if options.score is not None else "measured",
                           "class": gate.label, "k": gate.k, "w": gate.w, "seed": seed}})

        try:
            result = self.pipeline.restore(self._read(body), options, progress=progress, on_gate=gated,
                                           on_stage=lambda stage, tiles: emit({"stage": stage, "tiles": tiles}))
        except Cancelled:
            self.counts.cancelled()
            return Reply.text(499, "cancelled")
        except AdaptBIRError as err:  # ArgumentError 422, InputError 400, the engines failing 500
            status = 422 if isinstance(err, ArgumentError) else 400 if isinstance(err, InputError) else 500
            return Reply.text(status, public(str(err), self.names))
        return self._encoded(result, fmt)

    def _read(self, body: bytes) -> Any:
        from adaptbir.runtime.image_io import read_image

        with upload_file(body) as path:
            try:
                return read_image(path)
            except InputError as err:
                raise InputError(str(err).replace(path, "upload")) from None

    @staticmethod
    def _encoded(result: Any, fmt: str) -> Reply:
        from adaptbir.runtime.image_io import encode_image

        image = result.image
        body = encode_image(image.rgb, icc_profile=image.icc_profile, fmt=fmt)
        headers = {"Content-Type": MEDIA_TYPES[fmt], "X-AdaptBIR-Score": str(result.score),
                   "X-AdaptBIR-Score-Source": result.score_source, "X-AdaptBIR-Class": result.label,
                   "X-AdaptBIR-K": str(result.k), "X-AdaptBIR-W": str(result.w), "X-AdaptBIR-Seed": str(result.seed),
                   "X-AdaptBIR-Steps": str(result.steps), "X-AdaptBIR-Tiled": str(result.tiled).lower(),
                   "X-AdaptBIR-Timings": json.dumps(result.timings),
                   "X-AdaptBIR-Record": json.dumps(result.record())}  # sizes, tiling, warnings: a report record
        return Reply(200, body, headers)
