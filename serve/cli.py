"""`adaptbir-ray`: the runtime on a Ray cluster.

    adaptbir-ray restore photos/ -o restored/ --engines /shared/engines/sd21 [--address auto] [--actors 8]

`restore` takes every argument of `adaptbir restore` (`--threads` = threads of each actor), plus where the
cluster is and how many restoring actors to run. Without `--address`, a local cluster is started.
"""

from __future__ import annotations

import argparse
import sys

from adaptbir.runtime.arguments import DefaultsHelp
from adaptbir.runtime.cli import check_restore_arguments, restore_arguments
from adaptbir.runtime.errors import AdaptBIRError, ArgumentError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptbir-ray", description="AdaptBIR on a Ray cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore image files or directories with Ray Data", formatter_class=DefaultsHelp,
                       description="`adaptbir restore` as a Ray Data job: the same arguments and outputs; a re-run "
                       "skips what a previous run finished (its report records); a failing image is reported and "
                       "the job goes on (exit 1), usage errors exit 2.")
    restore_arguments(r)
    r.add_argument("--address", help="Ray cluster to join (auto, ray://HOST:10001); default: start a local one")
    r.add_argument("--actors", type=int, help="restoring actors (default: the cluster's CPUs / --threads)")
    r.set_defaults(threads=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.actors is not None and args.actors < 1:
            raise ArgumentError(f"--actors must be at least 1, not {args.actors}")
        jobs, problems = check_restore_arguments(args)
        if args.report is None:  # the report is what a re-run resumes from
            args.report = args.out / "report.jsonl"
        from .batch import restore_on_ray

        return restore_on_ray(args, jobs, problems)
    except AdaptBIRError as err:
        print(f"adaptbir-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
