#!/usr/bin/env bash
# The one command for a lent GPU machine (docs/architecture.md, "Precision and tolerances"): torch-CUDA fp16 accuracy,
# per-stage latency (eager, CUDA graphs) and FLOPs of our own model definitions, with the machine's python3.
# Writes ${OUT:-benchmarks/results}/gpu_check.json (every number) and gpu_check.txt (this log).
# Arguments go to gpu_check.py (e.g. --runs 20); `--dry-run` tries it on a CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
log="$dest/gpu_check.txt"
if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | tee "$log" || true; else echo "no nvidia-smi" | tee "$log"; fi
# A guard well inside the 8 minutes; the JSON is rewritten after every section, so a cut run keeps its numbers.
timeout -k 10 450 python3 -u benchmarks/gpu_check.py --out "$dest/gpu_check.json" "$@" 2>&1 | tee -a "$log"
