"""The jobs of `adaptbir-ray serve`: a restore that takes minutes, answered with an id at once.

    board = JobBoard(JobLimits(max_jobs=64, result_ttl=3600, max_result_bytes=2**30), release=budget.give)
    job = board.accept(options, "png", body)          # Rejected(503, Retry-After) beyond max_jobs
    job = await board.next()                           # a dispatcher: the oldest queued job
    board.update(job, {"stage": "sample", ...}); board.finish(job, reply)   # or fail / cancel
    board.status(job)                                  # what GET /jobs/{id} and its events say

The board is the job table of the service's ingress replica — the one process that serves HTTP, so a
status, an event stream or a result is answered from its memory without another hop. It holds no
scheduler of its own: `next()` hands the oldest queued job to one of the ingress's dispatchers (as many
as the workers have restore slots), and Ray Serve places each on a replica with a free slot. A job's
upload stays here until it is dispatched (counted in the ingress's upload budget), its result until it
is fetched and its TTL passes (all results together bounded in bytes: the oldest go first). Every
transition is one method here, so a job can only move forward: queued → running → done | failed |
cancelled → expired; a job is never left `running` once its stream has ended (the ingress fails it with
the reason).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import re
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adaptbir.runtime.options import RestoreOptions

from .http import Rejected

STATES = ("queued", "running", "done", "failed", "cancelled", "expired")
ENDED = frozenset({"done", "failed", "cancelled"})
FINAL = ENDED | {"expired"}  # nothing changes any more: an event stream ends
STAGES = ("musiq", "encode", "sample", "decode")
_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits, hex


@dataclass(frozen=True)
class JobLimits:
    max_jobs: int = 64  # accepted and not ended (queued + running); 503 beyond
    result_ttl: float = 3600.0  # seconds an ended job's result and status are kept
    max_result_bytes: int = 1 << 30  # results held at once; the oldest expire early beyond
    max_records: int = 10_000  # expired jobs still answered as `expired` (older ones: 404)


@dataclass
class Job:
    id: str
    options: RestoreOptions
    format: str
    body: bytes | bytearray | None  # the upload, until a replica has it
    seq: int
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"
    stage: str | None = None
    tiles: int = 1
    step: int = 0  # of options.steps
    gate: dict[str, Any] = field(default_factory=dict)  # score, score_source, class, k, w, seed
    error: str | None = None
    result: Any = None  # the worker's Reply once done
    started: float | None = None  # the board's clock, as created and ended
    ended: float | None = None
    changed_at: float = field(default_factory=time.time)  # wall clock of the latest change (the worker's)
    step_times: list[float] = field(default_factory=list)  # seconds of each sampling step so far
    decode_started: float | None = None  # the board's clock (the workers' may be another machine's)
    version: int = 0
    stop: Callable[[], None] | None = None  # cancels its running restore (set by the dispatcher)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def result_bytes(self) -> int:
        return len(self.result.body) if self.result is not None else 0

    def touch(self, at: float | None = None) -> None:
        self.version += 1
        self.changed_at = time.time() if at is None else at
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, version: int, timeout: float) -> bool:
        """Waits until this job's version is past `version` (True) or `timeout` seconds pass (False)."""
        if self.version != version:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except TimeoutError:
            return False


class JobBoard:
    """Accepted jobs, in order; each job's state, progress, gate values, error and result."""

    def __init__(self, limits: JobLimits, release: Callable[[int], None] = lambda size: None,
                 clock: Callable[[], float] = time.monotonic, slots: int = 1):
        self.limits = limits
        self.slots = slots  # jobs restored at once (the dispatchers): a queued job's ETA
        self.release = release  # gives an upload's bytes back to the ingress's budget
        self.clock = clock
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()  # by acceptance
        self.waiting: collections.deque[Job] = collections.deque()  # queued, not dispatched
        self.arrived = asyncio.Event()
        self.result_bytes = 0
        self.seq = 0
        self.step_s: float | None = None  # the latest job's mean step: an ETA before a job's own first step
        self.decode_steps: float | None = None  # the latest decode, in sampling steps of its own job
        self.job_s: float | None = None  # the latest done job's time from start to end (Retry-After, none running)

    # ------------------------------------------------------------------------ accepting and finding

    def check_room(self) -> None:
        """503 with Retry-After while max_jobs jobs are queued or running."""
        self.sweep()
        active = sum(job.state in ("queued", "running") for job in self.jobs.values())
        if active >= self.limits.max_jobs:
            raise Rejected(503, f"the service holds {active} unfinished jobs, its limit; retry later",
                           {"Retry-After": str(self.retry_after())})

    def accept(self, options: RestoreOptions, fmt: str, body: bytes | bytearray) -> Job:
        """A new queued job (503 when there is no room, see `check_room`)."""
        self.check_room()
        self.seq += 1
        job = Job(secrets.token_hex(16), options, fmt, body, self.seq, created=self.clock())
        self.jobs[job.id] = job
        self.waiting.append(job)
        self.arrived.set()
        return job

    def get(self, job_id: str) -> Job:
        """The job with this id (404 for an unknown or malformed id, or one forgotten long ago)."""
        self.sweep()
        job = self.jobs.get(job_id) if _ID.fullmatch(job_id) else None
        if job is None:
            raise Rejected(404, "no such job: unknown id, or expired long ago")
        return job

    def retry_after(self) -> int:
        """Seconds until a running job is expected to end (at least 1): when a new job may be accepted."""
        etas = [eta for job in self.jobs.values() if job.state == "running" and (eta := self.eta(job)) is not None]
        return max(1, round(min(etas, default=self.job_s or 30)))

    # ------------------------------------------------------------------------------ dispatching

    async def next(self) -> Job:
        """The oldest queued job that no dispatcher has taken (waits for one)."""
        while True:
            while self.waiting:
                job = self.waiting.popleft()
                if job.state == "queued":
                    return job
            self.arrived.clear()
            await self.arrived.wait()

    def requeue(self, job: Job) -> None:
        """Back to the head of the queue (the workers' own queue was full)."""
        if job.state == "queued":
            job.stop = None
            self.waiting.appendleft(job)
            self.arrived.set()

    def position(self, job: Job) -> int | None:
        """Queued jobs accepted before this one (0: it is next); None once it runs."""
        if job.state != "queued":
            return None
        return sum(other.state == "queued" and other.seq < job.seq for other in self.jobs.values())

    # ------------------------------------------------------------------------------ transitions

    def update(self, job: Job, event: dict[str, Any]) -> None:
        """A worker's event: {"state": "running"}, {"stage": S}, {"gate": {...}}, {"step": i, "steps": n};
        each with the worker's "time". Ignored once the job has ended (a cancelled job's last steps)."""
        if job.state in FINAL:
            return
        at = event.get("time", time.time())
        if event.get("state") == "running" and job.state == "queued":
            job.state, job.started = "running", self.clock()
            self._drop_body(job)
            self._moved_up(job)
        if "stage" in event:
            job.stage, job.tiles = event["stage"], int(event.get("tiles", 1))
            if job.stage == "decode":
                job.decode_started = self.clock()
        if "gate" in event:
            job.gate = dict(event["gate"])
        if "step" in event:  # since the previous step, or since sampling began
            job.step_times.append(at - job.changed_at)
            job.step = int(event["step"])
        job.touch(at)

    def finish(self, job: Job, reply: Any) -> None:
        """The restore ended with `reply` (a Reply): done with its result, or failed with its message."""
        if job.state in FINAL:
            return
        if reply.status != 200:
            self.fail(job, reply.body.decode(errors="replace").strip())
            return
        size = len(reply.body)
        if size > self.limits.max_result_bytes:
            self.fail(job, f"the result ({size} bytes) is above this service's result store "
                      f"({self.limits.max_result_bytes} bytes)")
            return
        if job.decode_started is not None and job.step_times:
            self.decode_steps = (self.clock() - job.decode_started) / statistics.fmean(job.step_times)
        if job.step_times:
            self.step_s = statistics.fmean(job.step_times)
        if job.started is not None:
            self.job_s = self.clock() - job.started
        job.result = reply
        self.result_bytes += size
        self._end(job, "done")
        self._bound_results()

    def fail(self, job: Job, reason: str) -> None:
        if job.state not in FINAL:
            job.error = reason
            self._end(job, "failed")

    def cancel(self, job: Job) -> None:
        """A queued job never starts; a running one is stopped at its next step (`job.stop`)."""
        if job.state in ("queued", "running"):
            job.error = "cancelled by its client"
            if job.stop is not None:
                job.stop()
            self._end(job, "cancelled")

    def discard(self, job: Job) -> None:
        """An ended job's result dropped at its client's request (DELETE of a done job)."""
        if job.state in ENDED:
            self._expire(job, "deleted by its client")

    def _end(self, job: Job, state: str) -> None:
        was_queued = job.state == "queued"
        job.state, job.ended, job.stop = state, self.clock(), None
        self._drop_body(job)
        job.touch()
        if was_queued:
            self._moved_up(job)

    def _moved_up(self, left: Job) -> None:
        """Queued jobs behind one that left the queue have a new position: an event each."""
        for job in self.jobs.values():
            if job.state == "queued" and job.seq > left.seq:
                job.touch()

    def _drop_body(self, job: Job) -> None:
        if job.body is not None:
            size, job.body = len(job.body), None
            self.release(size)

    # ------------------------------------------------------------------------------- expiring

    def sweep(self) -> None:
        """Ended jobs past their TTL expire; expired records beyond max_records are forgotten."""
        deadline = self.clock() - self.limits.result_ttl
        for job in list(self.jobs.values()):
            if job.state in ENDED and job.ended is not None and job.ended <= deadline:
                self._expire(job, f"kept for {self.limits.result_ttl:g} s after it ended")
        expired = [job_id for job_id, job in self.jobs.items() if job.state == "expired"]
        for job_id in expired[:max(0, len(expired) - self.limits.max_records)]:
            del self.jobs[job_id]

    def _bound_results(self) -> None:
        for job in list(self.jobs.values()):  # oldest first
            if self.result_bytes <= self.limits.max_result_bytes:
                return
            if job.result is not None:
                self._expire(job, "expired early: newer results filled this service's result store")

    def _expire(self, job: Job, why: str) -> None:
        ended_as = job.state
        self.result_bytes -= job.result_bytes
        job.result = None
        job.state = "expired"
        job.error = f"{why} (it ended {ended_as}{': ' + job.error if job.error else ''})"
        job.touch()

    # -------------------------------------------------------------------------------- reading

    def eta(self, job: Job) -> float | None:
        """Seconds left of a running job: its remaining steps at its own mean step time (before its first
        step, the latest finished job's), plus a decode as long as the latest one, in steps. A queued job's:
        `_queued_eta`. None while nothing has been measured."""
        if job.state == "queued":
            return self._queued_eta(job)
        step_s = statistics.fmean(job.step_times) if job.step_times else self.step_s
        if job.state != "running" or step_s is None:
            return None
        decode = (self.decode_steps or 0.0) * step_s
        if job.stage == "decode" and job.decode_started is not None:
            return max(0.0, decode - (self.clock() - job.decode_started))
        return (self._steps(job) - job.step) * step_s + decode

    def _queued_eta(self, job: Job) -> float | None:
        """When the slots free (the running jobs' ETAs), the jobs ahead of it each take the first free one for
        as long as the latest job took; it starts on the next and takes as long."""
        position = self.position(job)
        if self.job_s is None or position is None:
            return None
        free = [eta if (eta := self.eta(other)) is not None else self.job_s
                for other in self.jobs.values() if other.state == "running"]
        free += [0.0] * max(0, self.slots - len(free))
        heapq.heapify(free)
        for _ in range(position):
            heapq.heapreplace(free, free[0] + self.job_s)
        return free[0] + self.job_s

    @staticmethod
    def _steps(job: Job) -> int:
        return job.options.steps or 0  # the service fills them in from the engines' schedule

    def status(self, job: Job) -> dict[str, Any]:
        """What GET /jobs/{id} answers and each event says."""
        ended = job.ended if job.ended is not None else self.clock()
        eta = self.eta(job)
        expires = (job.ended + self.limits.result_ttl - self.clock()) if job.state in ENDED and job.ended else None
        url = f"/jobs/{job.id}"
        return {
            "id": job.id, "state": job.state, "position": self.position(job), "stage": job.stage,
            "tiles": job.tiles, "step": job.step, "steps": self._steps(job), "elapsed_s": round(ended - job.created, 3),
            "eta_s": None if eta is None else round(eta, 1),
            "score": job.gate.get("score"), "score_source": job.gate.get("score_source"),
            "class": job.gate.get("class"), "k": job.gate.get("k"), "w": job.gate.get("w"),
            "seed": None if job.gate.get("seed") is None else str(job.gate["seed"]),  # 63 bits: beyond a JS number
            "error": job.error, "format": job.format,
            "expires_in_s": None if expires is None else round(max(expires, 0.0), 1),
            "time": job.changed_at, "status_url": url, "events_url": f"{url}/events", "result_url": f"{url}/result",
        }

    def counts(self) -> dict[str, int]:
        """Jobs per state, and the bytes of results held (GET /info)."""
        counts = dict.fromkeys(STATES, 0)
        for job in self.jobs.values():
            counts[job.state] += 1
        return {**counts, "result_bytes": self.result_bytes}
