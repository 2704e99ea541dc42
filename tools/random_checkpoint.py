"""Write seeded random weights as an AdaptBIR stage-3 checkpoint in the reference's exact key layout.

    python tools/random_checkpoint.py --preset sd21 --text-encoder --out /tmp/sd21-random.ckpt

For measuring what a build from a real checkpoint costs (loading, memory) where the real weights are not
at hand: `adaptbir-export build --checkpoint` reads this file exactly as it reads the authors' one. The
format follows the file's suffix: `.safetensors`, or a Lightning-style `{"state_dict": ...}` zip pickle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adaptbir.export.checkpoint import to_checkpoint_key
from adaptbir.export.config import load_config
from adaptbir.export.model import AdaptBIR, Capabilities


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("sd21", "tiny"), default="sd21")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-encoder", action="store_true", help="include the OpenCLIP text tower (SD's own)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    torch.manual_seed(args.seed)
    caps = Capabilities(has_text_encoder=args.text_encoder and config.text_encoder is not None)
    state = {to_checkpoint_key(k): v for k, v in AdaptBIR(config, caps).state_dict().items()}
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(args.out))
    else:
        torch.save({"state_dict": state}, args.out)
    print(f"{args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e9:.2f} G parameters")


if __name__ == "__main__":
    main()
