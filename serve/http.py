"""HTTP for the service's ingress: uvicorn on the replica's own event loop with a deadline on request heads,
one-line error answers without server paths, the budget of upload bytes, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from starlette.responses import PlainTextResponse, Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

INGRESS_CONNECTIONS = 256  # connections the ingress holds at once; beyond, uvicorn answers 503
_PATH = re.compile(r"(?<![\w/.])/(?:[^\s/'\"]+/)+[^\s'\",;:)]*")  # an absolute path with a folder in it


class Rejected(Exception):
    """An answer given instead of what was asked (a restore, a job, its result): a status, one line, and
    headers (Retry-After with a 503)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


def public(message: str, names: dict[str, str] | None = None) -> str:
    """One line, with the known server paths named (`names`: path → name) and any other absolute path cut."""
    for path, name in (names or {}).items():
        message = message.replace(path, name)
    lines = message.strip().splitlines() or ["error"]
    return _PATH.sub("<path>", lines[0])[:500]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(public(message) + "\n", status_code=status, headers=headers)


class Budget:
    """Upload bytes this replica holds at once, for all requests and queued jobs together: each takes what
    it receives (not what it declares, so a stalled client holds nothing) and gives it back when answered —
    or, for a job, when a worker has its upload (`keep`, then `give`)."""

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

    @staticmethod
    def keep(held: list[int]) -> None:
        """What `held` counts stays taken after the request (a queued job's upload): `give` returns it."""
        held[0] = 0

    def give(self, size: int) -> None:
        self.free += size


async def disconnected(receive: Any) -> None:
    """Returns once the client has disconnected (the body is read: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """A Server-Sent Events answer: `next_event(previous)` returns (version, payload) once there is one past
    `previous` (None while nothing changed within `keepalive` seconds: a comment line keeps proxies from
    cutting the stream), or (version, None) to end. Each write must be taken within `write_timeout` (a client
    that stops reading is cut off); a client that disconnects ends the stream at once."""

    def __init__(self, next_event: Callable[[int], Awaitable[tuple[int, dict | None] | None]], write_timeout: float,
                 closed: Callable[[], None] = lambda: None):
        self.next_event = next_event
        self.write_timeout = write_timeout
        self.closed = closed  # called once the stream has ended, however it ended

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await self._write(send, {"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})  # nginx: pass each event on at once
            version = -1
            while not gone.done():
                waiting = asyncio.ensure_future(self.next_event(version))
                await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    return
                event = waiting.result()
                if event is None:
                    await self._body(send, b": keep-alive\n\n")
                    continue
                version, payload = event
                if payload is None:
                    break
                await self._body(send, f"id: {version}\ndata: {json.dumps(payload)}\n\n".encode())
            await self._write(send, {"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            self.closed()

    async def _body(self, send: Any, data: bytes) -> None:
        await self._write(send, {"type": "http.response.body", "body": data, "more_body": True})

    async def _write(self, send: Any, message: dict) -> None:
        await asyncio.wait_for(send(message), self.write_timeout)


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


async def serve_http(app: Any, host: str, port: int, head_timeout: float) -> tuple[uvicorn.Server, asyncio.Task]:
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
