"""`adaptbir`: restore images with an engine directory, or describe one.

    adaptbir restore photo.jpg scans/ -o restored/ --engines engines/sd21-fp16 [--steps 50] [--seed 0]
    adaptbir plan photo.jpg scans/ --engines engines/sd21-fp16
    adaptbir info engines/sd21-fp16

Argument parsing and printing; the batch itself is `runtime/batch.py`. Every printed line escapes the
control characters of the names in it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .arguments import DefaultsHelp, Parser
from .backend import BACKENDS, add_backend_arguments
from .backends import backend_status
from .batch import add_restore_arguments, find_inputs, restore_batch, restore_command, without_path
from .errors import AdaptBIRError
from .manifest import Manifest
from .options import RestoreOptions
from .progress import printable, say
from .signals import command


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adaptbir", description="AdaptBIR blind image restoration runtime")
    parser.add_argument("--version", action="version", version=f"adaptbir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("restore", help="restore image files or directories", formatter_class=DefaultsHelp,
                       description="Restore image files or folders (recursively) into OUTDIR; a failing image is "
                       "reported and the batch goes on (exit 1), usage errors exit 2; Ctrl-C, SIGTERM or SIGHUP stop "
                       "it at once, dropping the image being restored (exit 128 + the signal: 130, 143, 129).")
    add_restore_arguments(r)
    p = sub.add_parser("plan", help="how each image would be restored, before anything runs",
                       formatter_class=DefaultsHelp,
                       description="For each image (its header only): processing size, MUSIQ tokens, tiled or "
                       "untiled and why, and the predicted peak memory against the budget. Nothing runs.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE", help="image files or directories (recursive)")
    p.add_argument("--engines", type=Path, required=True, help="engine directory (adaptbir-export build)")
    add_backend_arguments(p)
    RestoreOptions.add_arguments(p, planning_only=True)
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a line")
    i = sub.add_parser("info", help="print an engine directory's manifest as a table")
    i.add_argument("engines", type=Path, help="engine directory (adaptbir-export build)")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file")
    return parser


def _plan(args) -> int:
    """`adaptbir plan`: the manifest and each image's header only; no engine is loaded."""
    from .backends import cpu_precision
    from .image_io import image_size
    from .manifest import load_manifest
    from .plan import plan_image

    options = RestoreOptions.from_namespace(args)
    manifest = load_manifest(args.engines, verify=False)
    precision = cpu_precision(args.backend, args.cpu_precision)  # refused where restore would refuse it
    found, missing, not_images = find_inputs(args.inputs)  # a missing named file: its own error record below
    failed = 0
    for path in [source for source, _ in found] + missing:
        try:
            plan = plan_image(manifest, image_size(path), options, backend=args.backend, precision=precision)
            _plan_line(args.json, {"input": str(path), **plan.record()}, f"{path}: {plan.summary()}")
        except AdaptBIRError as err:
            failed += 1
            message = without_path(err, path)
            _plan_line(args.json, {"input": str(path), "error": message}, f"{path}: error: {message}")
    for path, what in not_images:
        _plan_line(args.json, {"input": str(path), "not_an_image": what}, f"{path}: not an image: {what}")
    return 1 if failed else 0


def _plan_line(as_json: bool, record: dict[str, Any], line: str) -> None:
    """JSON is printed as it is (json.dumps escapes every control character); a line through `say`."""
    if as_json:
        print(json.dumps(record))
    else:
        say(line, sys.stdout)


def _restore(args) -> int:
    return restore_batch(*restore_command(args))


def _info(args) -> int:
    from .manifest import load_manifest

    print(describe_manifest(load_manifest(args.engines, verify=not args.no_verify)))
    print("\nbackends on this machine")
    for name, status in backend_status().items():
        print(f"  {name:<12} {status}")
    return 0


def describe_manifest(m: Manifest) -> str:
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.capabilities.to_dict().items())
    unet, schedule = m.hyperparameters["unet"], m.schedule
    lines = [
        f"engine directory  {m.name} (schema {m.schema_version}, created {m.created})",
        f"model             preset {m.preset}, UNet {unet['model_channels']} ch × {unet['channel_mult']}, "
        f"context {list(m.context.shape)} ({m.context.source})",
        f"precision         {m.precision}",
        f"capabilities      {caps}",
        f"schedule          {schedule.beta_schedule} {schedule.linear_start}..{schedule.linear_end} over "
        f"{schedule.timesteps}, default {schedule.default_steps} steps",
        f"gating            {m.gating['rule']}",
        f"MUSIQ tokens      {m.musiq.n_min}..{m.musiq.n_max}: {_token_range_meaning(m)}",
        "built with        " + ", ".join(f"{k} {v}" for k, v in m.tools.items()),
        f"runtime range     {m.runtime['min']} <= v < {m.runtime['below']}",
        *_weight_file_lines(m.checkpoint),
        "",
        f"{'graph':<14} {'precision':<9} {'MiB':>9}  {'inputs':<64} parity",
    ]
    for name, g in m.graphs.items():
        inputs = ", ".join(f"{t.name}{list(t.dims)}" for t in g.inputs).replace("'", "")
        lines.append(f"{name:<14} {g.precision:<9} {m.graph_bytes(name) / 2**20:>9.2f}  {inputs:<64} "
                     f"max abs {g.parity['max_abs']:.2e}")
    if m.quantization:
        lines += _quantization_lines(m.quantization)
    if m.tensorrt:
        t = m.tensorrt
        lines.append(f"TensorRT          {t.version} on compute {t.compute_capability}, profile {t.profile}")
    return "\n".join(map(printable, lines))  # a name in the manifest cannot add a line


def _weight_file_lines(checkpoint: dict[str, Any]) -> list[str]:
    """One line per weight file the build read (a free-form section: older manifests have none)."""
    files = checkpoint.get("files") if isinstance(checkpoint, dict) else None
    lines = []
    for file in files if isinstance(files, list) else []:
        if isinstance(file, dict):
            published = f" (the published {file['published']})" if file.get("published") else ""
            lines.append(f"weights           {file.get('role')} {file.get('name')}, "
                         f"sha256 {str(file.get('sha256'))[:16]}{published}")
    return lines


def _token_range_meaning(m: Manifest) -> str:
    """Who the MUSIQ token range binds: the backends that run fixed-profile plans, not the others."""
    bound = [b.name for b in BACKENDS.values() if b.musiq_token_limit(m) is not None]
    return (f"the range the TensorRT profile serves ({', '.join(bound)}; a photo's count: `adaptbir plan`); "
            "the other backends take any count")


def _quantization_lines(q: dict[str, Any]) -> list[str]:
    """An int8 directory's proof: how it was calibrated and what its gate measured against fp32."""
    calibration, gate = q["calibration"], q["gate"]
    measured = ", ".join(f"{c['measure']} {c['worst']:.4g} ({c['rule']})" for c in gate["checks"])
    kept = sum(count for graph in q["float_ops"].values() for count in graph.get("nodes", {}).values())
    return ["", f"int8              scheme {q['scheme']} ({', '.join(q['quantized_ops'])} quantized, {kept} of "
            f"their nodes kept float), {q['tool']}",
            f"calibration       {calibration['photos']} photos + {calibration['held_out']} held out, "
            f"{calibration['steps']} steps, {calibration['source']}, sha256 {calibration['digest'][:16]}",
            f"int8 gate         passed vs fp32 on the held-out photos ({gate['steps']} steps): {measured}"]


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"restore": _restore, "plan": _plan, "info": _info}[args.command](args)
    except AdaptBIRError as err:
        say(f"adaptbir: error: {err}")
        return 2
    except KeyboardInterrupt as err:  # outside a batch (plan, info, a job plan): nothing was written
        number = getattr(err, "signum", signal.SIGINT)
        say(f"adaptbir: interrupted ({signal.Signals(number).name})")
        return 128 + number


if __name__ == "__main__":
    sys.exit(main())
