"""`adaptbir-ray`: the runtime on a Ray cluster.

    adaptbir-ray restore photos/ -o restored/ --engines /shared/engines/sd21 [--address auto] [--actors 8]
    adaptbir-ray serve --engines engines/sd21 [--host 127.0.0.1 --port 8000 --replicas 2]
    adaptbir-ray submit photos/ --url http://127.0.0.1:8000 -o restored/ [--in-flight 2]

`restore` takes every argument of `adaptbir restore` (`--threads` = threads of each actor), plus where the
cluster is and how many restoring actors to run. Without `--address`: $RAY_ADDRESS, a cluster `ray start`
began on this machine, else a new local one. Engines: a path every node sees, or `--ship-engines`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from adaptbir.runtime.arguments import DefaultsHelp, Parser, bytes_argument, redefine
from adaptbir.runtime.batch import add_restore_arguments, restore_command
from adaptbir.runtime.errors import AdaptBIRError, ArgumentError
from adaptbir.runtime.progress import say
from adaptbir.runtime.signals import STOP_SIGNALS, command

from .submit import add_arguments as add_submit_arguments


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (HOST:6379, ray://HOST:10001, auto); default: "
                        "$RAY_ADDRESS or a cluster `ray start` began on this machine, else a new local one")
    parser.add_argument("--ship-engines", action="store_true", help="copy the engine directory to each node "
                        "through Ray's object store, once per node (for nodes that do not see --engines' path)")
    parser.add_argument("--engine-cache", type=Path, help="where each node keeps shipped engines (default: "
                        "$ADAPTBIR_ENGINE_CACHE or ~/.cache/adaptbir/engines on that node)")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adaptbir-ray", description="AdaptBIR on a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore image files or directories with Ray Data", formatter_class=DefaultsHelp,
                       description="`adaptbir restore` as a Ray Data job: the same arguments and outputs; a re-run "
                       "skips what a previous run finished (its report records); a failing image is reported and "
                       "the job goes on (exit 1), usage errors exit 2.")
    add_restore_arguments(r)
    _cluster_arguments(r)
    r.add_argument("--actors", type=int, help="restoring actors (default: the cluster's CPUs / --threads)")
    r.add_argument("--num-gpus-per-actor", type=float, default=0.0,
                   help="GPUs each actor claims (with --backend trt/ort-cuda/ort-trt on a GPU cluster)")
    redefine(r, "--threads", default=1, help="CPU threads of each actor (ONNX Runtime or OpenVINO)")
    v = sub.add_parser("serve", help="an HTTP service (Ray Serve): POST /restore, jobs (POST /jobs), a page (GET /)",
                       formatter_class=DefaultsHelp, description="Serve the engine directory over HTTP until Ctrl-C "
                       "(see adaptbir.serve.service for the API and adaptbir.serve.client for a client).")
    v.add_argument("--engines", type=Path, required=True, help="engine directory (adaptbir-export build)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--replicas", type=int, default=1, help="replicas, each loading the engines once")
    v.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each replica")
    v.add_argument("--max-ongoing-requests", type=int, default=1, help="images a replica restores at once (on "
                   "a CPU, two at once took 21 %% longer than one after the other: tools/batch_axis.py)")
    v.add_argument("--max-queued-requests", type=int, default=8, help="requests waiting; more are answered 503")
    v.add_argument("--max-bytes", type=bytes_argument, default="50M", help="largest upload (413 above)")
    v.add_argument("--max-pixels", type=int, default=64 * 2**20, help="largest image in pixels (413 above)")
    v.add_argument("--max-steps", type=int, default=200, help="most sampling steps a request may ask (422 above)")
    v.add_argument("--read-timeout", type=float, default=10.0, help="seconds one read of an upload may wait for "
                   "data (408 beyond: a stalled client is cut off)")
    v.add_argument("--body-timeout", type=float, default=60.0, help="seconds a whole upload may take (408 beyond: "
                   "a trickling client is cut off)")
    v.add_argument("--request-timeout", type=float, help="seconds from a complete upload to its result, queue "
                   "included (504 beyond, the restore cancelled at its next step; a job: from its start, then "
                   "failed); default: no limit")
    v.add_argument("--max-buffered", type=bytes_argument, help="upload bytes held at once, all requests together "
                   "(503 beyond; default: 16 × --max-bytes)")
    v.add_argument("--max-jobs", type=int, default=64, help="jobs accepted and not ended, queued or running "
                   "(POST /jobs answers 503 with Retry-After beyond)")
    v.add_argument("--result-ttl", type=float, default=3600.0, help="seconds a job's result and status are kept "
                   "after it ended (then: expired)")
    v.add_argument("--max-event-streams", type=int, default=128, help="job event streams open at once (503 "
                   "beyond: clients then poll GET /jobs/ID; the ingress holds 256 connections in all)")
    v.add_argument("--log", type=Path, default=Path.home() / ".cache" / "adaptbir" / "adaptbir-ray-serve.log",
                   help="where Ray's own output goes (appended); the terminal keeps this command's lines and errors")
    v.add_argument("--max-result-bytes", type=bytes_argument, default="1G", help="bytes of job results kept at once "
                   "(the oldest expire early beyond)")
    _cluster_arguments(v)
    s = sub.add_parser("submit", help="restore photos with a running service, as jobs (POST /jobs)",
                       formatter_class=DefaultsHelp, description="Submit each photo to an adaptbir-ray service as "
                       "a job, follow its progress, and write the results as `adaptbir restore` does: the same "
                       "output names, atomic writes, report records and summary; a failing image is reported and "
                       "the batch goes on (exit 1); a stop signal cancels the jobs at the service.")
    add_submit_arguments(s)
    return parser


def _check_serve_arguments(args: argparse.Namespace) -> None:
    """Each of `serve`'s numbers within its range (ArgumentError: a usage error)."""
    for name in ("replicas", "threads", "max_ongoing_requests", "max_queued_requests", "max_pixels", "max_steps",
                 "max_jobs", "max_event_streams"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    for name in ("read_timeout", "body_timeout", "request_timeout", "result_ttl"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            raise ArgumentError(f"--{name.replace('_', '-')} must be a positive number of seconds, not {value}")
    if args.max_buffered is not None and args.max_buffered < args.max_bytes:
        raise ArgumentError(f"--max-buffered {args.max_buffered} must hold one upload of --max-bytes {args.max_bytes}")


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT, SIGTERM or SIGHUP (then exit 0: stopping is how a service ends); Ray's own output
    goes to --log, this command's lines to the terminal."""
    import logging

    import ray
    from ray import serve

    from adaptbir.runtime.manifest import load_manifest

    from .batch import ray_output_to
    from .service import Limits, connect, start

    _check_serve_arguments(args)
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_steps=args.max_steps,
                    read_timeout=args.read_timeout, body_timeout=args.body_timeout,
                    request_timeout=args.request_timeout, max_buffered=args.max_buffered, max_jobs=args.max_jobs,
                    result_ttl=args.result_ttl, max_result_bytes=args.max_result_bytes,
                    max_event_streams=args.max_event_streams)
    # A bad directory is one line here, not a replica crash loop (shipping hashes every file itself).
    load_manifest(args.engines, verify=not args.ship_engines)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    with ray_output_to(args.log) as routed, contextlib.redirect_stdout(routed.sink):  # Ray's notices: stdout
        connect(args.address)
        for number in STOP_SIGNALS:  # after ray.init, which replaced SIGTERM's handler, and before the service
            signal.signal(number, lambda signum, frame: stop.set())  # answers: a signal then stops it whole
        start(args.engines, host=args.host, port=args.port, replicas=args.replicas, threads=args.threads,
              max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
              limits=limits, address=args.address, ship_engines=args.ship_engines, engine_cache=args.engine_cache)
        serve_logger = logging.getLogger("ray.serve")  # configured by serve.start: into the log as well
        serve_logger.handlers, serve_logger.propagate = [routed], False
        if not stop.is_set():
            say(f"adaptbir-ray: serving {args.engines} on http://{args.host}:{args.port} (Ray's log: {args.log}; "
                "Ctrl-C stops)")
            stop.wait()
        say("adaptbir-ray: stopping the service")
        serve.shutdown()
        ray.shutdown()  # here: its last notices (the controller's shutdown task) still go to the log
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "submit":
            from .submit import submit_command

            return submit_command(args)
        if args.actors is not None and args.actors < 1:
            raise ArgumentError(f"--actors must be at least 1, not {args.actors}")
        if args.num_gpus_per_actor < 0:
            raise ArgumentError(f"--num-gpus-per-actor must be ≥ 0, not {args.num_gpus_per_actor}")
        if args.report is None:  # the report is what a re-run resumes from
            args.report = args.out / "report.jsonl"
        settings, options, inputs = restore_command(args)
        from .batch import restore_on_ray

        return restore_on_ray(args, settings, options, inputs)
    except AdaptBIRError as err:
        say(f"adaptbir-ray: error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
