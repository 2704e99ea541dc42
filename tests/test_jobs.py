"""The service's job board without a cluster: a job only moves forward, positions and the events of a queue
that moves, cancelling, the accepted-jobs bound with its Retry-After, TTL expiry and the bound on result
bytes (a clock the test moves), unknown and malformed ids, and the upload budget given back on every path.
The same board behind HTTP, on a loopback cluster: tests/test_service_jobs.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from adaptbir.runtime.options import RestoreOptions
from adaptbir.serve.http import Rejected
from adaptbir.serve.jobs import JobBoard, JobLimits

OPTIONS = RestoreOptions(steps=10, seed=1)


@dataclass
class Reply:  # the worker's Reply, as far as the board reads it
    status: int
    body: bytes
    headers: dict = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _board(**limits) -> tuple[JobBoard, Clock, list[int]]:
    clock, released = Clock(), []
    return JobBoard(JobLimits(**limits), release=released.append, clock=clock), clock, released


def _run(board: JobBoard, job, steps: int = 10, start: float = 0.0, of: int = 10) -> None:
    """A worker's events up to sampling step `steps` of `of`, 0.1 s a step."""
    board.update(job, {"state": "running", "time": start})
    board.update(job, {"stage": "musiq", "tiles": 1, "time": start})
    board.update(job, {"gate": {"score": 55.0, "score_source": "measured", "class": "medium", "k": 0.55,
                                "w": 0.55 / 0.7, "seed": 2**62 + 1}, "time": start + 0.1})
    board.update(job, {"stage": "sample", "tiles": 1, "time": start + 0.2})
    for i in range(1, steps + 1):
        board.update(job, {"step": i, "steps": of, "time": start + 0.2 + 0.1 * i})


def test_a_job_moves_forward_and_says_where_it_is():
    board, _, released = _board()
    job = board.accept(OPTIONS, "png", b"12345")
    status = board.status(job)
    assert (status["state"], status["position"], status["steps"], status["eta_s"]) == ("queued", 0, 10, None)
    assert len(job.id) == 32 and int(job.id, 16) >= 0 and status["result_url"] == f"/jobs/{job.id}/result"
    _run(board, job, steps=4)
    status = board.status(job)
    assert (status["state"], status["stage"], status["step"], status["class"]) == ("running", "sample", 4, "medium")
    assert status["seed"] == str(2**62 + 1)  # a string: JavaScript's numbers hold 53 bits
    assert released == [5]  # the upload went back to the budget once a worker had it
    assert status["eta_s"] == pytest.approx(6 * 0.1, abs=0.05)  # 6 steps left at 0.1 s
    board.finish(job, Reply(200, b"image"))
    assert board.status(job)["state"] == "done" and board.counts()["result_bytes"] == 5
    board.update(job, {"step": 9, "steps": 10})  # a late event of an ended job changes nothing
    board.cancel(job)
    assert board.status(job)["state"] == "done" and board.status(job)["step"] == 4


def test_failures_are_said_in_one_line_and_a_failed_job_frees_its_upload():
    board, _, released = _board()
    job = board.accept(OPTIONS, "png", b"123")
    board.finish(job, Reply(400, b"upload: not an image\n"))
    assert (job.state, job.error, released) == ("failed", "upload: not an image", [3])
    other = board.accept(OPTIONS, "png", b"1234")
    board.fail(other, "the restoring replica stopped")
    assert other.state == "failed" and released == [3, 4]


def test_queue_positions_and_their_events():
    board, _, released = _board()
    jobs = [board.accept(OPTIONS, "png", b"x") for _ in range(4)]
    assert [board.position(j) for j in jobs] == [0, 1, 2, 3]
    versions = [j.version for j in jobs]
    board.cancel(jobs[1])  # a queued job never starts; those behind it move up, each with an event
    assert (jobs[1].state, released) == ("cancelled", [1])
    assert [board.position(j) for j in jobs] == [0, None, 1, 2]
    assert [j.version > v for j, v in zip(jobs, versions, strict=True)] == [False, True, True, True]
    taken = asyncio.run(_take(board, 2))
    assert taken == [jobs[0], jobs[2]]  # the cancelled one is passed over
    board.requeue(jobs[2])  # the workers had no room: first again
    assert asyncio.run(_take(board, 1)) == [jobs[2]]


async def _take(board: JobBoard, count: int) -> list:
    return [await asyncio.wait_for(board.next(), 1) for _ in range(count)]


def test_a_running_job_is_stopped_through_its_dispatcher():
    board, _, _ = _board()
    job = board.accept(OPTIONS, "png", b"x")
    stopped = []
    job.stop = lambda: stopped.append(True)
    _run(board, job, steps=2)
    board.cancel(job)
    assert (job.state, stopped, job.error) == ("cancelled", [True], "cancelled by its client")


def test_accepted_jobs_are_bounded_with_a_retry_after():
    board, _, _ = _board(max_jobs=2)
    first, second = board.accept(OPTIONS, "png", b"x"), board.accept(OPTIONS, "png", b"x")
    with pytest.raises(Rejected) as full:
        board.accept(OPTIONS, "png", b"x")
    assert full.value.status == 503 and int(full.value.headers["Retry-After"]) >= 1
    _run(board, first, steps=5)  # 5 steps left at 0.1 s: retry in about 1 s
    with pytest.raises(Rejected) as full:
        board.check_room()
    assert full.value.headers["Retry-After"] == "1"
    board.finish(first, Reply(200, b"x"))
    assert board.accept(OPTIONS, "png", b"x").state == "queued"  # room again
    assert second.state == "queued"


def test_results_expire_after_their_ttl_and_old_records_are_forgotten():
    board, clock, _ = _board(result_ttl=60, max_records=2)
    jobs = [board.accept(OPTIONS, "png", b"x") for _ in range(3)]
    for job in jobs:
        board.finish(job, Reply(200, b"12"))
    clock.now += 59
    assert board.get(jobs[0].id).state == "done" and board.status(jobs[0])["expires_in_s"] == 1
    clock.now += 1
    assert [board.get(j.id).state for j in jobs[1:]] == ["expired", "expired"] and jobs[0].result is None
    assert board.counts()["result_bytes"] == 0 and "kept for 60 s" in jobs[1].error
    with pytest.raises(Rejected) as gone:  # beyond max_records expired ones: the oldest is forgotten
        board.get(jobs[0].id)
    assert gone.value.status == 404


def test_result_bytes_are_bounded_the_oldest_expiring_first():
    board, _, _ = _board(max_result_bytes=10)
    jobs = [board.accept(OPTIONS, "png", b"x") for _ in range(4)]
    for job in jobs[:3]:
        board.finish(job, Reply(200, b"1234"))
    assert [j.state for j in jobs[:3]] == ["expired", "done", "done"] and board.result_bytes == 8
    assert "newer results filled" in jobs[0].error
    board.finish(jobs[3], Reply(200, b"x" * 11))  # larger than the whole store: failed, nothing evicted
    assert jobs[3].state == "failed" and "result store" in jobs[3].error and board.result_bytes == 8
    board.discard(jobs[1])  # DELETE of a done job drops its result
    assert jobs[1].state == "expired" and board.result_bytes == 4 and "deleted by its client" in jobs[1].error


@pytest.mark.parametrize("job_id", ["", "0" * 32, "0" * 31, "Z" * 32, "../../etc/passwd", "0" * 33, "%00"])
def test_unknown_and_malformed_ids_are_404(job_id):
    board, _, _ = _board()
    board.accept(OPTIONS, "png", b"x")
    with pytest.raises(Rejected) as unknown:
        board.get(job_id)
    assert unknown.value.status == 404


def test_a_change_wakes_a_waiting_event_stream():
    async def scenario() -> tuple[bool, bool]:
        board, _, _ = _board()
        job = board.accept(OPTIONS, "png", b"x")
        quiet = await job.changed(job.version, 0.05)  # nothing happened: a keep-alive
        waiting = asyncio.ensure_future(job.changed(job.version, 5))
        await asyncio.sleep(0.01)
        board.update(job, {"state": "running"})
        return quiet, await waiting

    assert asyncio.run(scenario()) == (False, True)


def _measured(board: JobBoard, clock: Clock) -> None:
    """One job done: 10 steps at 0.1 s, 1 s of the board's clock until its decode, a decode of 0.5 s (5 steps'
    worth): 1.5 s in all."""
    job = board.accept(OPTIONS, "png", b"x")
    _run(board, job, steps=10)
    clock.now += 1.0
    board.update(job, {"stage": "decode", "tiles": 1})
    clock.now += 0.5
    board.finish(job, Reply(200, b"x"))


def test_the_eta_counts_a_decode_as_long_as_the_latest_one():
    """After `_measured`, job 2 at step 8 of 10 has 2 steps and a 5-step decode left; with nothing running,
    Retry-After is the latest job's whole time."""
    board, clock, _ = _board(max_jobs=1)
    _measured(board, clock)
    second = board.accept(OPTIONS, "png", b"x")
    with pytest.raises(Rejected) as full:
        board.check_room()
    assert full.value.headers["Retry-After"] == "2"  # none running: the first job's 1.5 s, rounded
    _run(board, second, steps=8)
    assert board.eta(second) == pytest.approx(2 * 0.1 + 5 * 0.1)
    board.update(second, {"stage": "decode", "tiles": 1})
    clock.now += 0.2
    assert board.eta(second) == pytest.approx(0.3)


def test_a_queued_job_is_expected_when_the_jobs_ahead_of_it_leave_it_a_slot():
    """Two slots, the latest job took 1.5 s: with one job running (0.7 s left) and one free slot, the first
    queued job starts at once (ETA 1.5 s), the second when the running one ends (0.7 + 1.5), the third after
    the first queued one (1.5 + 1.5)."""
    board, clock, _ = _board()
    board.slots = 2
    assert board.eta(board.accept(OPTIONS, "png", b"x")) is None  # nothing measured yet
    board.cancel(next(iter(board.jobs.values())))
    _measured(board, clock)
    running = board.accept(OPTIONS, "png", b"x")
    queued = [board.accept(OPTIONS, "png", b"x") for _ in range(3)]
    _run(board, running, steps=8)  # 0.7 s left (see the test above)
    assert [board.eta(j) for j in queued] == pytest.approx([1.5, 0.7 + 1.5, 3.0])
    assert board.status(queued[1])["eta_s"] == 2.2
